"""`phd bench inference --quick` runs end to end and writes a consistent report (timings themselves are not
asserted: they are the benchmark's business, not a test's)."""

from __future__ import annotations

import importlib.util
import json

import torch

from phd.commands import main
from phd.inference.kernels import rows_linear_op
from phd.inference.weights import decode_applies, packing_available


def test_quick_benchmark_writes_report(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "inference", "--quick", "--ks", "1,2", "--repeats", "1", "--warmup", "0",
                 "--batches", "1", "--out", str(out)]) == 0
    report = json.loads((out / "inference.json").read_text())
    labels = [row["label"] for row in report["rows"]]
    plain = decode_applies("cpu", torch.float32)  # decode_linears (the default) is measured beside plain rows
    assert labels == ["vanilla", *["vanilla (plain linears)"] * plain, "repeat-2", "PHD-2", "PHD-SWA-2-4-inf",
                      "PHD-SWA-2-4-inf (full prefill)", "PHD-CSWA-2-4-8", *["PHD-CSWA-2-4-8 (plain linears)"] * plain]
    rows = {row["label"]: row for row in report["rows"]}
    assert all(row["prefill_s"]["128"] > 0 for row in report["rows"] if row["family"] != "plain")
    if plain:  # decode only: their prefill is the other rows' own
        assert rows["vanilla (plain linears)"]["prefill_s"]["128"] is None
        assert rows["PHD-CSWA-2-4-8 (plain linears)"]["decode_s_per_token"]["1"] > 0
    assert rows["PHD-SWA-2-4-inf (full prefill)"]["decode_ratio"]["1"] is None  # same decode as bounded
    assert rows["repeat-2"]["cache_ratio"] == 2.0 and rows["PHD-2"]["cache_ratio"] == 1.0
    assert rows["PHD-SWA-2-4-inf"]["hidden_token_share"] < rows["PHD-SWA-2-4-inf (full prefill)"]["hidden_token_share"]
    assert report["goals"][-1]["met"] is True  # cache bytes: exactly vanilla + the fixed window
    text = (out / "inference.md").read_text()
    assert "| PHD-CSWA-2-4-8 |" in text and "## Goals" in text and "## The memory bound" in text
    bound = report["memory_bound"]  # the weights' bytes (tied embedding read once by the LM head) / bandwidth
    assert bound["weight_bytes"] == 4 * report["environment"]["params"] and bound["seconds"] > 0
    assert report["environment"]["weights"] == "default"  # what model.decode_step gives any model
    kernel = rows_linear_op() is not None
    assert set(report["matmul_seconds"]) == ({"row", "column"} | ({"packed"} if packing_available() else set())
                                             | ({"kernel"} if kernel else set()))
    if kernel:  # the kernel serves up to 8 rows only
        assert set(report["matmul_seconds"]["kernel"]) == {"1", "2"}
    assert "(this run: what decode_step does: the rows kernel up to 8 rows, nn.Linear's own beyond" in text
    generate = report["generate"]  # end to end at batch 1, each path's ratio to vanilla through that path
    paths = {"phd.generate"} | ({"transformers generate()"} if importlib.util.find_spec("transformers") else set())
    assert set(generate) == paths
    for by_name in generate.values():
        assert by_name["vanilla"]["ratio"] == 1.0 and set(by_name) == {"vanilla", "PHD-CSWA-2-4-8"}
    assert "## End to end: generate at batch 1" in text and "| phd.generate |" in text
