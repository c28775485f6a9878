"""Sampling options, generation and the `phd generate` command."""

from __future__ import annotations

import pytest
import torch

import phd
from phd import PHDConfig, PHDTransformer
from phd.commands import main
from phd.inference.sampling import SamplingConfig, apply_repetition_penalty, restrict_support, sample
from phd.inference.weights import packing_available
from phd.io import save_model

VOCAB = 40


def _model(name: str = "PHD-CSWA-3-2-4", seed: int = 0) -> PHDTransformer:
    torch.manual_seed(seed)
    cfg = PHDConfig.from_name(name, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                              max_seq_len=64)
    return PHDTransformer(cfg).eval()


def _greedy_by_forward(model: PHDTransformer, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding the slow way: the whole training forward for every new token."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


# ----- sampling -----


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    gen = torch.Generator().manual_seed(0)
    draws = lambda cfg: {int(sample(logits, cfg, gen)) for _ in range(300)}  # noqa: E731
    assert draws(SamplingConfig(temperature=1.0)) == {0, 1, 2, 3}
    assert draws(SamplingConfig(temperature=1.0, top_k=2)) == {1, 3}
    assert draws(SamplingConfig(temperature=1.0, top_p=0.7)) == {1, 3}  # 0.5 + 0.3 is the smallest set >= 0.7
    assert draws(SamplingConfig(temperature=1.0, top_p=0.5)) == {1}
    assert draws(SamplingConfig(temperature=1.0, top_k=3, top_p=0.9)) == {1, 2, 3}
    kept = restrict_support(logits, top_k=None, top_p=0.81)
    assert torch.isinf(kept).tolist() == [[True, False, False, False]]


def test_greedy_and_temperature():
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, 0.0, -1.0]])
    assert sample(logits, SamplingConfig()).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    cold = {int(sample(logits[:1], SamplingConfig(temperature=1e-3), gen)) for _ in range(50)}
    hot = {int(sample(logits[:1], SamplingConfig(temperature=100.0), gen)) for _ in range(200)}
    assert cold == {1} and hot == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 1.5]])
    seen = torch.tensor([[True, True, False]])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 1.5]]))
    assert sample(logits, SamplingConfig(repetition_penalty=2.0), seen=seen).tolist() == [2]
    assert sample(logits, SamplingConfig(), seen=seen).tolist() == [0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
        (dict(top_k=0), "top_k=0 is invalid"),
        (dict(top_p=0.0), "top_p=0.0 is invalid"),
        (dict(top_p=1.5), "top_p=1.5 is invalid"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0 is invalid"),
    ],
)
def test_bad_sampling_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


# ----- generate -----


@pytest.mark.parametrize("name", ["vanilla", "repeat-2", "PHD-CSWA-3-2-4", "PHD-SWA-2-2-inf"])
def test_greedy_generate_equals_argmax_of_the_training_forward(name):
    model = _model(name)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    out = phd.generate(model, ids, max_new_tokens=8)
    assert torch.equal(out, _greedy_by_forward(model, ids, 8))
    assert torch.equal(phd.generate(model, ids, 8, prefill_mode="full"), out)
    assert torch.equal(phd.generate(model, ids[0], 8), out[0])  # a 1-D prompt gives a 1-D result


def test_column_major_weights_change_storage_not_values_nor_tokens():
    """Column-major linear weights (`phd bench inference --weights column`): same values, same module tree, the
    tied embedding untouched, idempotent, and the same greedy tokens as row-major weights."""
    from phd.inference.weights import column_major_linears

    model, reference = _model("PHD-CSWA-3-2-4"), _model("PHD-CSWA-3-2-4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert column_major_linears(model) == 7 * model.config.n_layers + 1 and column_major_linears(model) == 0
    w = model.layers[0].mlp.w_up.weight
    assert w.stride() == (1, w.shape[0]) and model.embed.weight.stride() == (model.config.d_model, 1)
    tied = PHDTransformer(PHDConfig.from_name("vanilla", preset="cpu-1m"))
    assert column_major_linears(tied) == 7 * tied.config.n_layers  # the tied LM head stays row-major
    assert tied.lm_head.weight.stride() == (tied.config.d_model, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(phd.generate(model, ids, 8), phd.generate(reference, ids, 8))


needs_mkl = pytest.mark.skipif(not packing_available(), reason="this PyTorch has no MKL packed GEMM")


@needs_mkl
@pytest.mark.parametrize("name", ["vanilla", "PHD-3", "PHD-CSWA-3-2-4"])
def test_packed_linears_decode_the_same_tokens(name):
    """Decode with MKL-packed linears (decode_linears beyond 8 rows, or without the rows kernel) gives the plain
    model's greedy tokens for batches whose K x B rows are packed and for others (they fall back to F.linear)."""
    from phd.inference import decode_linears

    model, reference = _model(name), _model(name)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    k = model.config.repeat_k
    assert decode_linears(model, 2 * k, kernel=False) == (7 * model.config.n_layers + 1 if k * 2 > 1 else 0)
    assert torch.equal(phd.generate(model, ids, 8), phd.generate(reference, ids, 8))
    assert torch.equal(phd.generate(model, ids[:1], 8), phd.generate(reference, ids[:1], 8))
    assert torch.equal(_greedy_by_forward(model, ids, 3), _greedy_by_forward(reference, ids, 3))


@needs_mkl
def test_packs_serve_only_their_rows_and_an_unchanged_weight():
    """The pack is used for inputs of exactly `rows` rows (a wrong pack planted on purpose shows where), never for
    other row counts, never once the weight changed in place or was replaced, never when a gradient is wanted;
    state_dict, module tree and values are untouched; plain_linears restores nn.Linear."""
    from phd.inference import decode_linears, plain_linears
    from phd.inference.weights import DecodeLinear

    model = _model("PHD-2")
    keys = list(model.state_dict())
    assert decode_linears(model, 1, kernel=False) == 0 and not any(isinstance(m, DecodeLinear) for m in model.modules())
    n = decode_linears(model, 12)  # beyond the rows kernel: MKL packs
    assert n == 7 * model.config.n_layers + 1 and decode_linears(model, 12) == n  # idempotent
    assert list(model.state_dict()) == keys
    lin = model.layers[0].mlp.w_up
    assert isinstance(lin, DecodeLinear) and isinstance(lin, torch.nn.Linear) and not lin.use_kernel
    x12, x5 = torch.randn(3, 4, lin.in_features), torch.randn(5, lin.in_features)
    with torch.no_grad():
        assert torch.allclose(lin(x12), x12 @ lin.weight.T, atol=1e-5)
        lin.packed = torch.ops.mkl._mkl_reorder_linear_weight(torch.zeros_like(lin.weight), 12)  # planted
        assert lin(x12).abs().max() == 0  # the pack serves 12 rows ...
        assert torch.allclose(lin(x5), x5 @ lin.weight.T, atol=1e-5)  # ... and nothing else
    x12.requires_grad_(True)
    assert torch.allclose(lin(x12), x12 @ lin.weight.T, atol=1e-5)  # a gradient is wanted: plain kernel
    with torch.no_grad():
        lin.weight.mul_(2)  # changed in place: the pack is stale, not used
        assert torch.allclose(lin(x12), x12 @ lin.weight.T, atol=1e-5)
    decode_linears(model, 12)  # repacked from the new weight
    with torch.no_grad():
        assert torch.allclose(lin(x12), x12 @ lin.weight.T, atol=1e-5)
        lin.weight.data = lin.weight.data.clone() + 1  # replaced: not the packed storage any more
        assert torch.allclose(lin(x12), x12 @ lin.weight.T, atol=1e-5)
    assert plain_linears(model) == n and type(lin) is torch.nn.Linear and not hasattr(lin, "packed")
    tied = PHDTransformer(PHDConfig.from_name("PHD-2", preset="cpu-1m"))
    assert decode_linears(tied, 12) == 7 * tied.config.n_layers  # the tied LM head is the embedding: not packed


def test_seed_makes_sampling_reproducible():
    model = _model()
    ids = torch.tensor([[1, 2, 3]])
    run = lambda seed: phd.generate(model, ids, 12, temperature=1.0, seed=seed)  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_top_k_one_is_greedy():
    model = _model()
    ids = torch.tensor([[4, 5, 6]])
    assert torch.equal(phd.generate(model, ids, 6, temperature=1.5, top_k=1, seed=0), phd.generate(model, ids, 6))


def test_stop_tokens_end_each_row_and_pad_after():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    free = phd.generate(model, ids, 10)
    stop = int(free[0, 4 + 2])  # row 0's third new token
    out = phd.generate(model, ids, 10, stop_tokens=[stop], pad_id=-1)
    for row, full in zip(out, free, strict=True):
        new, expected = row[4:].tolist(), full[4:].tolist()
        cut = expected.index(stop) + 1 if stop in expected else len(expected)
        assert new[:cut] == expected[:cut]
        assert all(t == -1 for t in new[cut:])
    if stop in free[1, 4:].tolist():  # both rows stopped: generation ends early
        assert out.shape[1] < free.shape[1]


def test_stop_at_first_token_ends_generation():
    model = _model()
    ids = torch.tensor([[1, 2, 3]])
    first = int(phd.generate(model, ids, 1)[0, -1])
    out = phd.generate(model, ids, 20, stop_tokens=[first])
    assert out.tolist() == [[1, 2, 3, first]]


def test_mixed_prompt_lengths_generate_like_single_rows():
    model = _model("PHD-SWA-3-2-inf")
    a, b = torch.tensor([3, 9, 4, 1, 7, 7]), torch.tensor([5, 2])
    batch = torch.zeros(2, 6, dtype=torch.long)
    batch[0], batch[1, :2] = a, b
    out = phd.generate(model, batch, 5, lengths=torch.tensor([6, 2]), pad_id=-1)
    assert out[0].tolist() == phd.generate(model, a, 5).tolist()
    assert out[1, :7].tolist() == phd.generate(model, b, 5).tolist()
    assert out[1, 7:].tolist() == [-1] * 4


def test_generate_errors():
    model = _model()
    with pytest.raises(ValueError, match="prompt is empty"):
        phd.generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    # a cache the caller sized (max_len) is a hard limit; max_seq_len is not (the length rule, phd.checks)
    with pytest.raises(ValueError, match="prompt has 65 tokens, more than the maximum length max_len=64"):
        phd.generate(model, torch.ones(1, 65, dtype=torch.long), 3, max_len=64)
    with pytest.raises(ValueError, match="use max_new_tokens <= 4"):
        phd.generate(model, torch.ones(1, 60, dtype=torch.long), 10, max_len=64)
    with pytest.raises(ValueError, match="token id 40, outside the vocabulary"):
        phd.generate(model, torch.tensor([[1, 40]]), 3)


# ----- the command line -----


def _export(tmp_path, name="PHD-CSWA-3-2-4"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    model = _model(name)
    save_model(model, tmp_path / "export", tokenizer=tmp_path / "tok.json")
    return model, tok, tmp_path / "export"


def test_cli_streams_the_greedy_continuation(tmp_path, capsys):
    model, tok, export = _export(tmp_path)
    args = ["generate", "--checkpoint", str(export), "--prompt", "w3 w7 w1", "--max-new-tokens", "6",
            "--temperature", "0", "--stop", "#999"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    prompt = tok.encode("w3 w7 w1").ids
    expected = phd.generate(model, torch.tensor(prompt), 6)[3:].tolist()
    assert out.strip() == tok.decode(expected, skip_special_tokens=False)
    assert "6 new tokens" in err and "tokens/s" in err


def test_cli_prepares_the_k_decode_rows_unless_told_not_to(tmp_path, capsys, monkeypatch):
    """`phd generate` prepares its linears for the K rows of a decode step (same text as plain); --plain-linears
    leaves nn.Linear's own kernels."""
    import phd.commands.generate as command

    calls = []
    monkeypatch.setattr(command, "decode_linears", lambda model, rows: calls.append(rows) or 0)
    _, _, export = _export(tmp_path)
    args = ["generate", "--checkpoint", str(export), "--prompt-ids", "5,6", "--temperature", "0",
            "--max-new-tokens", "5"]
    assert main(args) == 0 and calls == [3]
    prepared = capsys.readouterr().out
    assert main([*args, "--plain-linears"]) == 0 and calls == [3]
    assert capsys.readouterr().out == prepared


def test_cli_prompt_ids_and_default_stop_token(tmp_path, capsys):
    model, _, export = _export(tmp_path)
    first = int(phd.generate(model, torch.tensor([5, 6]), 1)[-1])
    assert main(["generate", "--checkpoint", str(export), "--prompt-ids", "5,6", "--temperature", "0",
                 "--stop", f"#{first}", "--max-new-tokens", "9"]) == 0
    assert capsys.readouterr().out.split() == [str(first)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt-ids", "3,400"], "token id 400, outside the vocabulary"),
        (["--prompt-ids", "3,x"], "must be comma-separated integers"),
        (["--prompt", "w1", "--stop", "w1 w2"], "not a single token"),
    ],
)
def test_cli_errors(tmp_path, capsys, extra, message):
    _, _, export = _export(tmp_path)
    assert main(["generate", "--checkpoint", str(export), *extra]) == 2
    assert message in capsys.readouterr().err


def test_temperature_applies_before_top_p():
    """p = (0.73, 0.27) at temperature 1 keeps both tokens under top_p 0.75; at temperature 0.25 the first
    holds 0.98 of the mass, so top_p keeps it alone: the second token must never be drawn."""
    logits = torch.tensor([[1.0, 0.0]]).expand(4000, 2)
    draws = sample(logits, SamplingConfig(temperature=0.25, top_p=0.75), torch.Generator().manual_seed(0))
    assert draws.unique().tolist() == [0]


def test_repetition_penalty_sees_generated_tokens_through_generate():
    """generate() equals a hand-written greedy loop whose penalty covers the prompt and every generated token."""
    from phd.inference import generate

    model, prompt = _model(seed=3), torch.tensor([[5, 6, 7]])
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(16):
            logits = model(seq).logits[:, -1].float()
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, seq, True)
            logits = torch.where(seen, torch.where(logits > 0, logits / 3.0, logits * 3.0), logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, prompt, 16, repetition_penalty=3.0), seq)
