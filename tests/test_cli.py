import subprocess
import sys

import pytest

from phd.commands import COMMANDS, main

BLOCK_EXTRAS = (
    "import sys\n"
    "for name in ('transformers', 'lm_eval', 'matplotlib', 'datasets'):\n"
    "    sys.modules[name] = None  # importing it now raises ImportError, as on a core-only install\n"
)


def test_every_command_is_registered_without_the_optional_extras():
    code = BLOCK_EXTRAS + (
        "import phd.commands\nparser = phd.commands.build_parser()\n"
        "print(sorted(parser._subparsers._group_actions[0].choices))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == sorted(COMMANDS)


def test_a_missing_extra_is_one_clear_line(tmp_path):
    code = BLOCK_EXTRAS + (
        f"import phd.commands\nsys.exit(phd.commands.main(['convert', '{tmp_path}', '{tmp_path / 'out'}']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert "pip install" in result.stderr and "Traceback" not in result.stderr


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0
    assert "usage: phd" in capsys.readouterr().out
