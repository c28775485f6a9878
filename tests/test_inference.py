"""Inference equals training: prefill and every decode step give the training-time forward's logits.

Each batch mixes prompt lengths (1, C-1, C, C+1 and > L*W), so one run covers every row phase; decoding runs
past chunk boundaries. The reference is the dense forward (the rule of masks.allowed) over each row alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from phd import PHDTransformer
from phd.bench.agreement import INFERENCE_VARIANTS, LOGIT_TOL, edge_lengths, logit_error, tiny_model
from phd.inference.engine import hidden_widths
from phd.model import Block

TOL = LOGIT_TOL
VARIANTS = INFERENCE_VARIANTS


def _model(name: str, seed: int = 0, **arch) -> PHDTransformer:
    return tiny_model(name, seed, **arch)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("positions", ["expanded", "shared"])
@pytest.mark.parametrize("norm, qk_norm", [("pre", False), ("post", True)])
def test_prefill_and_decode_equal_training_forward(name, positions, norm, qk_norm):
    model = _model(name, positions=positions, norm=norm, qk_norm=qk_norm)
    steps = (model.config.chunk or 3) + 3
    assert logit_error(model, edge_lengths(model.config), steps) <= TOL


@pytest.mark.parametrize("name", ["PHD-3", "PHD-SWA-3-2-inf", "PHD-CSWA-4-3-2", "repeat-2", "vanilla"])
def test_full_prefill_equals_training_forward(name):
    model = _model(name, norm="post", qk_norm=True)
    assert logit_error(model, edge_lengths(model.config), steps=4, mode="full") <= TOL


@pytest.mark.parametrize("name", ["vanilla", "repeat-3", "PHD-2", "PHD-SWA-3-2-inf", "PHD-CSWA-4-3-2"])
@pytest.mark.parametrize("mode", ["bounded", "full"])
def test_one_layer_function_serves_training_prefill_and_decode(name, mode, monkeypatch):
    """Block.forward is the only layer code: a change made there changes the training forward and every cache path
    alike (they still agree), and prefill and each decode step call it once per layer."""
    model = _model(name, norm="post", qk_norm=True)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    calls = []
    real = Block.forward

    def changed(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs) + 0.5

    monkeypatch.setattr(Block, "forward", changed)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)
    assert logit_error(model, edge_lengths(model.config), steps=3, mode=mode) <= TOL
    calls.clear()
    cache = model.new_cache(1, 12)
    model.prefill(ids, cache, mode=mode)
    model.decode_step(ids[:, 0], cache)
    assert calls == [*model.layers, *model.layers]


def _random_config(rng: random.Random) -> dict:
    heads = rng.choice([2, 4])
    k = rng.randint(1, 5)
    kind = rng.choice(["PHD", "SWA", "CSWA", "CSWA", "naive"])
    w, c = rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 3, 4])
    name = {"PHD": f"PHD-{k}", "SWA": f"PHD-SWA-{k}-{w}-inf", "CSWA": f"PHD-CSWA-{k}-{w}-{c}",
            "naive": f"repeat-{k}"}[kind]
    return dict(
        name=name, d_model=rng.choice([32, 48, 64]), n_layers=rng.choice([2, 3]), n_heads=heads,
        n_kv_heads=rng.choice([1, heads]), d_ff=rng.choice([40, 64]), positions=rng.choice(["expanded", "shared"]),
        norm=rng.choice(["pre", "post"]), qk_norm=rng.random() < 0.5, tie_embeddings=rng.random() < 0.5,
        rope_theta=rng.choice([10000.0, 500.0]),
    )


@pytest.mark.parametrize("seed", range(16))
def test_random_configurations(seed):
    arch = _random_config(random.Random(seed))
    model = _model(arch.pop("name"), seed=seed, **arch)
    cfg = model.config
    steps = (cfg.chunk or 2) + 2
    assert logit_error(model, edge_lengths(cfg), steps, seed=seed) <= TOL, cfg.name


def test_window_wider_than_chunk_and_decode_across_many_chunks():
    model = _model("PHD-CSWA-3-5-2", n_layers=3)
    assert logit_error(model, [1, 2, 3, 7], steps=9) <= TOL


def test_long_prompt_past_the_swa_bound_uses_only_the_bounded_hidden_set():
    """A prompt much longer than L*W + 1: bounded prefill is exact though it computes few hidden tokens."""
    model = _model("PHD-SWA-3-2-inf", n_layers=3)
    widths = hidden_widths(model.config, 40)
    assert widths[0] == (3 * 2 + 1, 2 * 2 + 1) and widths[-1] == (2 + 1, 1)
    assert logit_error(model, [40, 23], steps=3) <= TOL


def test_attention_mask_left_padding_equals_right_padding_with_lengths():
    model = _model("PHD-CSWA-3-2-4")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    right = ids.clone()
    right[1, 5:] = 0
    left = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids[1:2, :5]], dim=1)
    left_mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    a, b = model.new_cache(2, 12), model.new_cache(2, 12)
    ref = model.prefill(right, a, lengths=torch.tensor([9, 5]))
    out = model.prefill(torch.cat([ids[:1], left]), b, attention_mask=left_mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    token = torch.tensor([3, 4])
    torch.testing.assert_close(model.decode_step(token, b), model.decode_step(token, a), atol=1e-6, rtol=0)


def test_prefill_resets_the_cache():
    model = _model("PHD-SWA-2-2-inf")
    cache = model.new_cache(1, 16)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.prefill(torch.tensor([[1, 2, 3, 4, 5, 6]]), cache)
    model.decode_step(torch.tensor([9]), cache)
    again = model.prefill(ids, cache)
    torch.testing.assert_close(again, model.prefill(ids, model.new_cache(1, 16)), atol=0, rtol=0)
    assert cache.lengths.tolist() == [4]


# ----- cache size and layout -----


@pytest.mark.parametrize("name", ["vanilla", "PHD-4", "PHD-SWA-3-16-inf", "PHD-CSWA-4-16-32", "repeat-3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_nbytes_is_vanilla_plus_the_fixed_window(name, dtype):
    model = _model(name, n_layers=3, n_kv_heads=2, d_model=32, n_heads=4)
    cfg = model.config
    batch, max_len, elem = 2, 50, torch.tensor([], dtype=dtype).element_size()
    vanilla = cfg.n_layers * 2 * batch * max_len * cfg.n_kv_heads * cfg.head_dim * elem
    cache = model.new_cache(batch, max_len, dtype=dtype)
    if cfg.naive:
        assert cache.nbytes == cfg.repeat_k * vanilla
    else:
        window = cfg.n_layers * 2 * batch * (cfg.repeat_k - 1) * (cfg.window or 0) * cfg.n_kv_heads * cfg.head_dim
        assert cache.nbytes == vanilla + window * elem
    # The only other allocation: K-1 slots per layer for the current step's hidden K/V.
    extra = 0 if cfg.naive else cfg.n_layers * 2 * batch * (cfg.repeat_k - 1) * cfg.n_kv_heads * cfg.head_dim * elem
    assert cache.allocated_nbytes == cache.nbytes + extra
    assert cache.nbytes == model.new_cache(batch, max_len, dtype=dtype).nbytes  # independent of content


def test_cswa_ring_is_emptied_at_each_chunk_boundary():
    model = _model("PHD-CSWA-3-4-3")
    cache = model.new_cache(1, 20)
    model.prefill(torch.tensor([[1, 2, 3, 4, 5]]), cache)  # positions 0..4; chunk of 4 is [3, 5]
    ring = cache.slot_pos[0, : cache.ring_slots]
    assert sorted(set(ring[ring >= 0].tolist())) == [3, 4]
    model.decode_step(torch.tensor([6]), cache)  # position 5, same chunk
    model.decode_step(torch.tensor([7]), cache)  # position 6 starts a chunk: only itself remains
    ring = cache.slot_pos[0, : cache.ring_slots]
    assert sorted(set(ring[ring >= 0].tolist())) == [6]


def test_decode_writes_in_place_without_growing_the_cache():
    model = _model("PHD-SWA-3-2-inf")
    cache = model.new_cache(2, 12)
    pointers = [t.data_ptr() for t in cache.keys]
    model.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache)
    for token in range(5):
        model.decode_step(torch.tensor([token, token + 1]), cache)
    assert [t.data_ptr() for t in cache.keys] == pointers
    assert cache.lengths.tolist() == [8, 8]


# ----- errors -----


def test_errors_name_the_problem():
    model = _model("PHD-CSWA-2-2-4")
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="empty: call prefill"):
        model.decode_step(torch.tensor([1, 2]), cache)
    with pytest.raises(ValueError, match="prompt has 9 tokens but the cache holds at most capacity=8"):
        model.prefill(torch.ones(2, 9, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.prefill(torch.ones(2, 0, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="a prompt is empty"):
        model.prefill(torch.ones(2, 3, dtype=torch.long), cache, lengths=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="token id 61, outside the vocabulary"):
        model.prefill(torch.tensor([[1, 61], [1, 2]]), cache)
    with pytest.raises(ValueError, match="token id -1"):
        model.prefill(torch.tensor([[1, -1], [1, 2]]), cache)
    with pytest.raises(ValueError, match="cache was made for batch_size=2"):
        model.prefill(torch.ones(3, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="mode='paper' is unknown"):
        model.prefill(torch.ones(2, 2, dtype=torch.long), cache, mode="paper")
    with pytest.raises(ValueError, match="one contiguous run"):
        model.prefill(torch.ones(2, 3, dtype=torch.long), cache, attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]]))
    # Padding beyond a row's length may hold anything (e.g. -100): it is never checked nor read.
    model.prefill(torch.tensor([[1, 2, 3], [4, -100, -100]]), cache, lengths=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="token id 99"):
        model.decode_step(torch.tensor([1, 99]), cache)
    with pytest.raises(ValueError, match=r"token_ids must be \[batch_size=2\]"):
        model.decode_step(torch.tensor([[1, 2]]), cache)
    for _ in range(5):
        model.decode_step(torch.tensor([1, 2]), cache)
    with pytest.raises(ValueError, match="cache is full"):
        model.decode_step(torch.tensor([1, 2]), cache)
    with pytest.raises(ValueError, match="another model config"):
        _model("PHD-3").prefill(torch.ones(2, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="another model config"):
        _model("PHD-3").decode_step(torch.tensor([1, 2]), cache)
