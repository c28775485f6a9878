"""`phd bench inference --quick` runs end to end and writes a consistent report (timings themselves are not
asserted: they are the benchmark's business, not a test's)."""

from __future__ import annotations

import json

from phd.commands import main


def test_quick_benchmark_writes_report(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "inference", "--quick", "--ks", "1,2", "--repeats", "1", "--warmup", "0",
                 "--batches", "1", "--out", str(out)]) == 0
    report = json.loads((out / "inference.json").read_text())
    labels = [row["label"] for row in report["rows"]]
    assert labels == ["vanilla", "repeat-2", "PHD-2", "PHD-SWA-2-4-inf", "PHD-SWA-2-4-inf (full prefill)",
                      "PHD-CSWA-2-4-8"]
    rows = {row["label"]: row for row in report["rows"]}
    assert all(row["prefill_s"]["128"] > 0 for row in report["rows"])
    assert rows["PHD-SWA-2-4-inf (full prefill)"]["decode_ratio"]["1"] is None  # same decode as bounded
    assert rows["repeat-2"]["cache_ratio"] == 2.0 and rows["PHD-2"]["cache_ratio"] == 1.0
    assert rows["PHD-SWA-2-4-inf"]["hidden_token_share"] < rows["PHD-SWA-2-4-inf (full prefill)"]["hidden_token_share"]
    assert report["goals"][-1]["met"] is True  # cache bytes: exactly vanilla + the fixed window
    text = (out / "inference.md").read_text()
    assert "| PHD-CSWA-2-4-8 |" in text and "## Goals" in text and "## The memory bound" in text
    bound = report["memory_bound"]  # the weights' bytes (tied embedding read once by the LM head) / bandwidth
    assert bound["weight_bytes"] == 4 * report["environment"]["params"] and bound["seconds"] > 0
    assert set(report["matmul_seconds"]) == {"row", "column"} and report["environment"]["weights"] == "row"
