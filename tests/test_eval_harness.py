"""lm-eval integration: scoring with the training-time forward, local task data, one task end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import phd  # noqa: E402
from phd.commands import main as phd_main  # noqa: E402
from phd.data.shards import write_meta, write_split  # noqa: E402
from phd.eval import evaluate_loss  # noqa: E402
from phd.eval.harness import PHDLM  # noqa: E402
from phd.eval.tasks import TaskBuilder, TaskDataError  # noqa: E402
from phd.io import save_model  # noqa: E402

TEXT = (
    "the cat sat on the mat. the dog sat on the log. a bird flew over the house and the tree. "
    "she reads a book in the garden while the sun goes down over the quiet river. "
) * 20


def tiny_model(vocab: int, variant: str = "PHD-CSWA-3-2-4", seed: int = 0) -> phd.PHDTransformer:
    torch.manual_seed(seed)
    config = phd.PHDConfig.from_name(variant, vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                     d_ff=64, tie_embeddings=True, init_std=0.1, max_seq_len=128)
    return phd.PHDTransformer(config).eval()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    from phd.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([TEXT], vocab_size=300).tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token="<|endoftext|>")


def request(*args):
    return SimpleNamespace(args=args)


def test_loglikelihood_is_the_training_forward_log_probability_at_any_batch_size(tokenizer) -> None:
    model = tiny_model(len(tokenizer))
    pairs = [("the cat sat on", " the mat"), ("a bird", " flew over the house"), ("", "the dog"),
             ("she reads a book ", "in the garden")]
    batched = PHDLM(model, tokenizer, batch_size=3).loglikelihood([request(*p) for p in pairs])
    alone = PHDLM(model, tokenizer, batch_size=1).loglikelihood([request(*p) for p in pairs])
    for (lp_b, greedy_b), (lp_a, greedy_a) in zip(batched, alone, strict=True):
        assert lp_b == pytest.approx(lp_a, abs=1e-4) and greedy_b == greedy_a
    lm = PHDLM(model, tokenizer)
    for (context, continuation), (lp, greedy) in zip(pairs, batched, strict=True):
        ctx, cont = lm._encode_pair(context, continuation)
        ids = torch.tensor([(ctx or [tokenizer.eos_token_id]) + cont])
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids[:, :-1]).logits[0, -len(cont):], dim=-1)
        expected = logprobs.gather(1, torch.tensor(cont)[:, None]).sum()
        assert lp == pytest.approx(float(expected), abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


def test_trailing_context_space_moves_to_the_continuation(tokenizer) -> None:
    lm = PHDLM(tiny_model(len(tokenizer)), tokenizer)
    assert lm._encode_pair("the cat sat on ", "the mat") == lm._encode_pair("the cat sat on", " the mat")


def write_piqa(root, docs: list[dict]) -> None:
    datasets.Dataset.from_list(docs).save_to_disk(str(root / "piqa" / "plain_text" / "validation"))


PIQA = [
    {"goal": "how do you sit on a mat?", "sol1": "the cat sat on the mat.", "sol2": "the river goes down.", "label": 0},
    {"goal": "where does the bird fly?", "sol1": "over the house.", "sol2": "in the garden while the sun", "label": 1},
    {"goal": "what does she read?", "sol1": "a book.", "sol2": "the log.", "label": 0},
    {"goal": "where is the dog?", "sol1": "on the log.", "sol2": "on the quiet house.", "label": 1},
    {"goal": "what sat on the mat?", "sol1": "the cat.", "sol2": "the tree.", "label": 0},
]


def test_one_local_task_end_to_end(tmp_path, tokenizer_file, tokenizer, capsys) -> None:
    write_piqa(tmp_path / "tasks", PIQA)
    model = tiny_model(len(tokenizer))
    save_model(model, tmp_path / "model", tokenizer=tokenizer_file)
    out = tmp_path / "results.json"
    argv = ["eval", str(tmp_path / "model"), "--tasks", "piqa", "--tasks-data", str(tmp_path / "tasks"),
            "--limit", "4", "--batch-size", "2", "--out", str(out)]
    assert phd_main(argv) == 0
    assert "piqa" in capsys.readouterr().out
    row = json.loads(out.read_text())["tasks"]["piqa"]
    assert row["n"] == 4 and row["split"] == "validation"
    # The same accuracy by hand: lm-eval's prompt, the continuation with the higher log-likelihood.
    lm = PHDLM(model, tokenizer)
    right = right_norm = 0
    for doc in PIQA[:4]:
        context = f"Question: {doc['goal']}\nAnswer:"
        choices = [" " + doc["sol1"], " " + doc["sol2"]]
        scores = [lp for lp, _ in lm.loglikelihood([request(context, c) for c in choices])]
        right += int(np.argmax(scores)) == doc["label"]
        right_norm += int(np.argmax([s / len(c) for s, c in zip(scores, choices, strict=True)])) == doc["label"]
    assert row["acc"] == pytest.approx(right / 4) and row["acc_norm"] == pytest.approx(right_norm / 4)


def test_missing_local_data_names_the_folders_searched(tmp_path) -> None:
    builder = TaskBuilder(tmp_path)
    with pytest.raises(TaskDataError, match="no local copy of allenai/ai2_arc"):
        builder.build("arc_easy")
    with pytest.raises(ValueError, match="lm-eval has no task 'nonsense'"):
        builder.build("nonsense")


def test_cli_loss_on_token_shards(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.random.default_rng(1).integers(0, 50, size=300).astype(np.uint16)
    write_split(data, "train", tokens[:100])
    write_split(data, "val", tokens[100:])
    split = {"tokens": 0, "documents": 1}
    write_meta(data, {"dtype": "uint16", "vocab_size": 50, "eos_id": 0,
                      "splits": {"train": {**split, "tokens": 100}, "val": {**split, "tokens": 200}}})
    model = tiny_model(50)
    save_model(model, tmp_path / "model")
    out = tmp_path / "loss.json"
    assert phd_main(["eval", str(tmp_path / "model"), "--data", str(data), "--seq-len", "32", "--out", str(out)]) == 0
    loss = json.loads(out.read_text())["loss"]
    assert loss["windows"] == 6 and loss["split"] == "val"
    assert loss["loss"] == pytest.approx(evaluate_loss(model, tokens[100:], seq_len=32).loss, abs=1e-6)
