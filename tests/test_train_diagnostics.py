"""Training health diagnostics, z-loss and compiled training: each against a plain reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from train_utils import make_data, one_thread, tiny_config  # noqa: F401

from phd.config import PHDConfig
from phd.model import PHDTransformer
from phd.train.diagnostics import ScoreProbe, UpdateRatio, grad_norms, probe_logits, summarize_health
from phd.train.trainer import Trainer, read_metrics

VARIANTS = ["vanilla", "PHD-3", "PHD-CSWA-3-2-4", "repeat-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("diag") / "data")


def small_model(variant: str) -> PHDTransformer:
    torch.manual_seed(0)
    cfg = PHDConfig.from_name(variant, vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                              max_seq_len=64)
    return PHDTransformer(cfg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_probe_is_the_model_and_records_the_largest_allowed_score(variant):
    """The probe's attention is the model's attention (same logits), and its maximum is over allowed keys only:
    computed here by hand from layer 0's q and k with the layout's mask."""
    model = small_model(variant)
    ids = torch.randint(0, 300, (1, 16))
    health = probe_logits(model, ids)
    with torch.no_grad():
        check_probe(model, ids, health, variant)


def check_probe(model, ids, health, variant):
    ref = model(ids).logits
    assert health["out_logit_max"] == pytest.approx(float(ref.abs().amax()), abs=2e-3)
    assert len(health["attn_logit_max"]) == 2
    layout = model.layout(16)
    block = model.layers[0]
    cos, sin = model.rope_at(*layout.index())
    h = layout.expand(model.embed(ids))
    a = block.attn_norm(h)
    q, k = block.attn.project_q(a, cos, sin), block.attn.project_kv(a, cos, sin)[0]
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    expected = scores.masked_fill(~layout.dense_mask(), -math.inf).amax()
    assert health["attn_logit_max"][0] == pytest.approx(float(expected), abs=2e-3)
    if variant.startswith("PHD"):  # masked scores must not count: the unmasked maximum is larger here
        assert float(scores.amax()) > float(expected)


def test_score_probe_attention_equals_dense_reference():
    model = small_model("PHD-CSWA-3-2-4")
    layout = model.layout(8)
    q, k, v = torch.randn(1, 4, 24, 8), torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)
    from phd.attention import dense_attention

    torch.testing.assert_close(ScoreProbe(layout)(q, k, v), dense_attention(q, k, v, layout), atol=1e-5, rtol=1e-5)


def test_update_ratio_and_grad_norms_by_layer():
    model = small_model("PHD-3")
    before = UpdateRatio(model)
    with torch.no_grad():
        model.layers[1].mlp.w_up.weight.mul_(1.5)
    ratios = before.ratios()
    assert ratios["layer0"] == 0 and ratios["embed"] == 0 and ratios["layer1"] > 0.05
    model(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8))).loss.backward()
    norms = grad_norms(model)
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(total, rel=1e-3)
    assert set(norms) == {"embed", "layer0", "layer1", "head"}


def test_trainer_logs_health_at_probe_steps_without_changing_training(data, tmp_path):
    """Diagnostics are read-only: the losses of a probed run equal an unprobed one's exactly."""
    plain = Trainer(tiny_config(data, tmp_path / "plain", max_steps=4))
    plain.fit()
    probed = Trainer(tiny_config(data, tmp_path / "probed", max_steps=4, diagnostics_every=2))
    probed.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "plain") if "loss" in r]
    records = [r for r in read_metrics(tmp_path / "probed") if "loss" in r]
    assert [r["loss"] for r in records] == losses
    assert [r["step"] for r in records if "attn_logit_max" in r] == [1, 2, 4]
    assert all(set(r["update_ratio"]) == {"embed", "layer0", "layer1", "head"} for r in records
               if "update_ratio" in r)
    health = summarize_health(read_metrics(tmp_path / "probed"), clip=1.0)
    assert health["skipped"] == 0 and health["attn_logit_max"] > 0 and health["update_ratio_max"] > 0
    assert health["grad_norm_max"] == max(r["grad_norm"] for r in records)


def test_z_loss_adds_its_gradient_and_logs_the_cross_entropy(data, tmp_path):
    """With z_loss the update follows CE + z * mean(logsumexp^2); the logged loss stays the CE of the batch."""
    reference = Trainer(tiny_config(data, tmp_path / "ref", max_steps=1, z_loss=0.5, clip=None))
    micro = reference.loader.next_step()  # the step's micro-batches, as the trainer below will read them
    model = reference.model
    objective, ce = 0.0, 0.0
    for inputs, targets in micro:
        out = model(inputs, targets)
        ce += float(out.loss) / len(micro)
        objective = objective + (out.loss + 0.5 * torch.logsumexp(out.logits.float(), -1).pow(2).mean()) / len(micro)
    grads = torch.autograd.grad(objective, list(model.parameters()))
    expected_ce = ce
    trainer = Trainer(tiny_config(data, tmp_path / "z", max_steps=1, z_loss=0.5, clip=None))
    result = trainer.train_step()
    assert result.loss == pytest.approx(expected_ce, abs=1e-4)
    assert result.grad_norm == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)), rel=1e-4)


def test_z_loss_is_validated(data, tmp_path):
    from phd.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="z_loss"):
        tiny_config(data, tmp_path, z_loss=-1)
    with pytest.raises(TrainConfigError, match="diagnostics_every"):
        tiny_config(data, tmp_path, diagnostics_every=-2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["vanilla", "PHD-CSWA-2-4-8"])
def test_compiled_training_equals_eager(data, tmp_path, variant):
    """torch.compile (the study's default) trains the same run: losses within float tolerance over 4 steps."""
    losses = {}
    for compile_ in (False, True):
        trainer = Trainer(tiny_config(data, tmp_path / f"c{compile_}", variant=variant, max_steps=4, compile=compile_))
        trainer.fit()
        losses[compile_] = [r["loss"] for r in read_metrics(tmp_path / f"c{compile_}") if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert F.l1_loss(torch.tensor(losses[True]), torch.tensor(losses[False])) < 1e-4


@pytest.mark.slow
def test_bench_compile_reports_speedup_first_step_and_loss_difference(tmp_path):
    import json

    from phd.commands import main

    assert main(["bench", "compile", "--variants", "PHD-CSWA-2-4-8", "--seq-len", "16", "--batch-size", "2",
                 "--repeats", "1", "--check-steps", "2", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "compile.json").read_text())["rows"][0]
    assert row["variant"] == "PHD-CSWA-2-4-8" and row["speedup"] > 0 and row["max_loss_diff"] < 1e-4
    assert "speed-up" in (tmp_path / "compile.md").read_text()


def test_compile_without_a_compiler_trains_eagerly_and_says_so(data, tmp_path, monkeypatch, capsys):
    """compile=true where torch.compile cannot work (no C++ compiler on CPU): one message, eager training, the
    same losses as compile=false."""
    import phd.train.parallelize as par

    monkeypatch.setattr(par, "compile_problem", lambda device_type: "InvalidCxxCompiler: none found")
    Trainer(tiny_config(data, tmp_path / "c", max_steps=2, compile=True)).fit()
    assert "torch.compile does not work here (InvalidCxxCompiler: none found); training eagerly" in \
        capsys.readouterr().err
    Trainer(tiny_config(data, tmp_path / "e", max_steps=2)).fit()
    loss = [[r["loss"] for r in read_metrics(tmp_path / x) if "loss" in r] for x in ("c", "e")]
    assert loss[0] == loss[1]


@pytest.mark.slow
def test_compile_problem_names_a_missing_compiler():
    import subprocess
    import sys

    code = "from phd.train.parallelize import compile_problem; print(compile_problem('cpu'))"
    env = {**__import__("os").environ, "CXX": "/nonexistent-cxx", "TORCHINDUCTOR_CACHE_DIR": "/tmp/phd-no-cxx-cache"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "Compiler" in out.stdout, out.stdout + out.stderr
