"""`phd bench scaling`: the real trainer under torchrun at 1 and 2 processes, reported as markdown and JSON."""

from __future__ import annotations

import json
import os

from train_utils import one_thread  # noqa: F401 (autouse fixture)

from phd.bench.scaling import train_flops_per_token
from phd.commands import main
from phd.config import PHDConfig


def test_flops_grow_with_the_copies_and_the_window():
    vanilla = PHDConfig.preset("cpu-1m")
    cswa = vanilla.with_variant("PHD-CSWA-3-16-32")
    matmuls = 2 * vanilla.d_model * vanilla.d_model + 2 * vanilla.d_model * vanilla.n_kv_heads * vanilla.head_dim
    matmuls += 3 * vanilla.d_model * vanilla.d_ff
    head = 2 * vanilla.d_model * vanilla.vocab_size
    attention = 4 * vanilla.d_model * (256 / 2 + 1) * vanilla.n_layers
    assert train_flops_per_token(vanilla, 256) == 3 * (2 * matmuls * vanilla.n_layers + head + attention)
    # Without the LM head (run once per token): K copies cost more than K vanilla tokens (the copies also see
    # their group and window) and far less than naive repetition (a K times longer causal sequence).
    names = ("vanilla", cswa.name, "repeat-3")
    body = {v: train_flops_per_token(vanilla.with_variant(v), 256) - 3 * head for v in names}
    assert 3 * body["vanilla"] < body[cswa.name] < body["repeat-3"]


def test_scaling_benchmark_reports_both_process_counts(tmp_path, capsys):
    argv = ["bench", "scaling", "--variants", "PHD-CSWA-2-4-8", "--procs", "1", "2", "--seq-len", "32",
            "--batch-size", "4", "--steps", "3", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    cores = os.cpu_count() or 1
    threads = [str(max(cores // p, 1)) for p in (1, 2)]
    assert [(r["procs"], r["micro_batch"], r["threads"]) for r in rows] == [(1, 4, threads[0]), (2, 2, threads[1])]
    # on CPU both runs share the same cores: efficiency compares throughput on the same hardware
    assert rows[0]["efficiency"] is None and rows[1]["efficiency"] == rows[1]["tok_per_s"] / rows[0]["tok_per_s"]
    assert all(r["tok_per_s"] > 0 and r["mfu"] is None for r in rows)
    assert f"| PHD-CSWA-2-4-8 | 2 | {threads[1]} |" in (tmp_path / "scaling.md").read_text()
