import pytest
import torch

from phd import PHDConfig, PHDTransformer

ARCH = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)


def _model(name="vanilla", seed=0, **changes):
    torch.manual_seed(seed)
    return PHDTransformer(PHDConfig.from_name(name, **{**ARCH, **changes}))


def _ids(batch=2, T=19, seed=1):
    return torch.randint(0, ARCH["vocab_size"], (batch, T), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_loss():
    model = _model("PHD-CSWA-3-4-8")
    ids = _ids()
    out = model(ids, targets=ids)
    assert out.logits.shape == (2, 19, ARCH["vocab_size"])
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


@pytest.mark.parametrize("name", ["PHD-1", "PHD-SWA-1-4-inf", "PHD-CSWA-1-4-8", "repeat-1"])
def test_k1_is_vanilla_for_every_variant(name):
    ids = _ids()
    torch.testing.assert_close(_model(name)(ids).logits, _model("vanilla")(ids).logits, atol=0, rtol=0)


def test_vanilla_is_a_standard_causal_transformer():
    """Changing a later token never changes earlier logits; the first logit depends on the first token only."""
    model = _model("vanilla")
    ids = _ids(T=12)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % ARCH["vocab_size"]
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", ["PHD-3", "PHD-CSWA-2-4-8", "PHD-SWA-3-2-inf", "repeat-3"])
def test_phd_is_causal_in_positions(name):
    model = _model(name)
    ids = _ids(T=16)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % ARCH["vocab_size"]
    torch.testing.assert_close(model(ids).logits[:, :9], model(changed).logits[:, :9], atol=0, rtol=0)


def test_naive_repetition_is_causal_attention_over_the_repeated_sequence():
    k = 3
    naive, vanilla = _model(f"repeat-{k}"), _model("vanilla")
    ids = _ids(T=10)
    repeated = ids.repeat_interleave(k, dim=1)
    expected = vanilla(repeated).logits[:, k - 1 :: k]
    torch.testing.assert_close(naive(ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["PHD-3", "PHD-CSWA-3-4-8", "PHD-SWA-2-2-inf"])
def test_original_stream_is_the_vanilla_model_with_shared_positions(name):
    """Spec section 3: originals never see hidden tokens, so with shared positions they ARE vanilla."""
    ids = _ids(T=15)
    phd, vanilla = _model(name, positions="shared"), _model("vanilla", positions="shared")
    h_phd = phd.hidden_states(ids)[:, :15]
    h_vanilla = vanilla.hidden_states(ids)
    torch.testing.assert_close(h_phd, h_vanilla, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["expanded", "shared"])
@pytest.mark.parametrize("norm, qk_norm, tie", [("pre", False, False), ("post", True, True)])
@pytest.mark.parametrize("name", ["PHD-2", "PHD-CSWA-3-4-8", "PHD-SWA-5-2-inf", "PHD-CSWA-2-16-4"])
def test_split_backend_matches_dense_on_logits_and_parameter_gradients(name, positions, norm, qk_norm, tie):
    changes = dict(positions=positions, norm=norm, qk_norm=qk_norm, tie_embeddings=tie)
    ids = _ids(T=23)
    results = []
    for backend in ("dense", "split"):
        model = _model(name, **changes)
        out = model(ids, targets=ids, backend=backend)
        out.loss.backward()
        results.append((out.logits, {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=0)
    for name_, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name_], atol=2e-5, rtol=1e-4, msg=lambda m, n=name_: f"{n}: {m}")


def test_bf16_autocast_training_step_runs_and_matches_fp32_roughly():
    model = _model("PHD-CSWA-3-4-8")
    ids = _ids(T=32)
    ref = model(ids, targets=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets=ids)
    out.loss.backward()
    assert abs(out.loss.item() - ref.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_input_shape_is_named():
    with pytest.raises(ValueError, match="batch, seq_len"):
        _model()(torch.zeros(5, dtype=torch.long))


def test_rope_positions_are_the_spec_table():
    """Spec section 4, by hand for K = 3, T = 4: copy s of position n at K*n + s - 1 (expanded), n (shared), in the
    training layout [originals | hidden, position-major]; decoding continues the same table."""
    from phd.inference import generate

    table = {
        "expanded": [0, 3, 6, 9, 1, 2, 4, 5, 7, 8, 10, 11],
        "shared": [0, 1, 2, 3, 0, 0, 1, 1, 2, 2, 3, 3],
    }
    for positions, expected in table.items():
        model = _model("PHD-CSWA-3-2-4", positions=positions)
        seen: list[list[int]] = []
        real = model.rope
        model.rope = lambda p, real=real, seen=seen: seen.append(p.flatten().tolist()) or real(p)
        model(_ids(T=4))
        assert seen == [expected], positions
        seen.clear()
        generate(model, _ids(batch=1, T=4), max_new_tokens=2)
        used = sorted({p for call in seen for p in call})
        assert used == (list(range(15)) if positions == "expanded" else list(range(5))), positions
