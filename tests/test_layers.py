"""The layering rule of docs/architecture.md: the commands (phd.commands) sit on top of the library; no library
module imports them or argparse, so the library can be used, and tested, without any command-line code."""

import ast
from pathlib import Path

import phd

SRC = Path(phd.__file__).parent
COMMANDS = SRC / "commands"


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved against its package)."""
    package = path.relative_to(SRC.parent).with_suffix("").parts
    package = package if path.name == "__init__.py" else package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _library() -> list[Path]:
    return [p for p in SRC.rglob("*.py") if COMMANDS not in p.parents and p.name != "__main__.py"]


def test_the_library_imports_no_argparse():
    offenders = [str(p.relative_to(SRC)) for p in _library() if "argparse" in _imports(p)]
    assert not offenders, f"argparse belongs to phd.commands only: {offenders}"


def test_the_library_imports_no_command():
    offenders = [str(p.relative_to(SRC)) for p in _library()
                 if any(name == "phd.commands" or name.startswith("phd.commands.") for name in _imports(p))]
    assert not offenders, f"the library must not import phd.commands: {offenders}"
