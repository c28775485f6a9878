"""transformers integration: conversion parity (Llama, OLMo2), save/load round trip, padding, generate()."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import phd  # noqa: E402
from phd.cli import main as phd_main  # noqa: E402
from phd.convert import ConversionError, from_transformers, to_transformers  # noqa: E402
from phd.hf import PHDForCausalLM, PHDHFConfig  # noqa: E402

VOCAB = 101


def tiny_transformers(family: str = "llama", tie: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised transformers model with GQA (4 query / 2 kv heads) and non-trivial norm weights."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    else:
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**fields))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    return model.eval()


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ----- conversion parity -----


@pytest.mark.parametrize("family", ["llama", "olmo2"])
@pytest.mark.parametrize("tie", [True, False])
def test_k1_conversion_matches_transformers_logits(family: str, tie: bool) -> None:
    hf = tiny_transformers(family, tie)
    model = from_transformers(hf)
    assert model.config.is_vanilla and model.config.tie_embeddings == tie
    assert model.config.norm == ("pre" if family == "llama" else "post") and model.config.n_kv_heads == 2
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_to_transformers_round_trip(family: str) -> None:
    hf = tiny_transformers(family, tie=False)
    back = to_transformers(from_transformers(hf))
    assert type(back) is type(hf)
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_conversion_to_a_phd_variant_keeps_every_weight() -> None:
    hf = tiny_transformers("olmo2")
    model = from_transformers(hf, repeat_k=2, window=4, chunk=8)
    assert model.config.name == "PHD-CSWA-2-4-8" and model.config.positions == "shared"
    vanilla = from_transformers(hf)
    for name, tensor in vanilla.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(ConversionError, match="K = 1"):
        to_transformers(model)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
            "rope_type='llama3'",
        ),
        (dict(attention_bias=True), "attention_bias=True"),
        (dict(mlp_bias=True), "mlp_bias=True"),
        (dict(head_dim=32), "head_dim=32"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ],
)
def test_conversion_refuses_what_the_native_model_cannot_express(overrides: dict, message: str) -> None:
    hf = tiny_transformers("llama", **overrides)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_transformers(hf)


def test_conversion_refuses_other_families() -> None:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ConversionError, match="model_type='gpt2' is not supported"):
        from_transformers(transformers.GPT2LMHeadModel(config))


# ----- the PHD transformers model -----


def tiny_phd(variant: str = "PHD-CSWA-3-2-4", tie: bool = True, seed: int = 0) -> phd.PHDTransformer:
    torch.manual_seed(seed)
    config = phd.PHDConfig.from_name(variant, vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                     d_ff=96, tie_embeddings=tie, init_std=0.15, max_seq_len=256)
    return phd.PHDTransformer(config).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_from_pretrained_round_trip(tmp_path, tie: bool) -> None:
    native = tiny_phd(tie=tie)
    PHDForCausalLM.from_native(native, eos_token_id=2).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, PHDForCausalLM) and isinstance(loaded.config, PHDHFConfig)
    assert loaded.config.to_phd() == native.config
    assert (loaded.model.lm_head.weight is loaded.model.embed.weight) == tie
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, native(ids).logits, atol=0, rtol=0)


def test_invalid_phd_config_is_refused_with_the_native_message() -> None:
    with pytest.raises(phd.ConfigError, match="a chunk needs a window"):
        PHDHFConfig(repeat_k=2, chunk=4)


def test_left_padding_gives_the_unpadded_logits_and_loss() -> None:
    native = tiny_phd()
    model = PHDForCausalLM.from_native(native)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids)
        for row, prompt in enumerate(prompts):
            alone = native(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(out.logits[row, -len(prompt):], alone, atol=1e-5, rtol=0)
        total = sum(native(torch.tensor([p[:-1]]), targets=torch.tensor([p[1:]])).loss * (len(p) - 1) for p in prompts)
    torch.testing.assert_close(out.loss, total / sum(len(p) - 1 for p in prompts), atol=1e-5, rtol=0)


def test_attention_mask_with_holes_is_refused() -> None:
    model = PHDForCausalLM.from_native(tiny_phd())
    with pytest.raises(ValueError, match="one contiguous run"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1]]))


# ----- generate() -----


def test_generate_at_k1_equals_transformers_llama_generate() -> None:
    hf = tiny_transformers("llama")
    model = PHDForCausalLM.from_native(from_transformers(hf), eos_token_id=2, pad_token_id=0)
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("variant", ["PHD-CSWA-3-2-4", "PHD-SWA-2-3-inf", "PHD-3"])
def test_generate_equals_native_generate_row_by_row(variant: str) -> None:
    native = tiny_phd(variant)
    model = PHDForCausalLM.from_native(native, eos_token_id=2, pad_token_id=0)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17]]
    ids, mask = left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    for row, prompt in enumerate(prompts):
        alone = phd.generate(native, torch.tensor(prompt), 20, stop_tokens=[2], pad_id=0)
        new = out[row, ids.shape[1]:].tolist()
        expected = alone[len(prompt):].tolist()
        assert new == expected + [0] * (len(new) - len(expected))


def test_generate_pads_a_row_after_its_end_of_sequence_token() -> None:
    native = tiny_phd()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    first = int(native(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    model = PHDForCausalLM.from_native(native, eos_token_id=first, pad_token_id=0)
    ids, mask = left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    width = ids.shape[1]
    assert out[0, width] == first and (out[0, width + 1:] == 0).all()
    alone = phd.generate(native, torch.tensor(prompts[1]), 8, stop_tokens=[first], pad_id=0)
    assert out[1, width:].tolist()[: len(alone) - len(prompts[1])] == alone[len(prompts[1]):].tolist()


def test_sampling_follows_the_native_sampler_with_the_same_seed() -> None:
    native = tiny_phd()
    model = PHDForCausalLM.from_native(native, eos_token_id=2, pad_token_id=0)
    prompt = torch.tensor([[5, 6, 7, 8]])
    got = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.95, seed=3)
    expected = phd.generate(native, prompt, 12, temperature=0.9, top_k=20, top_p=0.95, seed=3, stop_tokens=[2],
                            pad_id=0)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2), "num_beams=1"),
    (dict(output_scores=True), "does not support \\['output_scores'\\]"),
    (dict(streamer=object()), "does not support \\['streamer'\\]"),
])
def test_generate_refuses_what_it_does_not_implement(kwargs: dict, message: str) -> None:
    model = PHDForCausalLM.from_native(tiny_phd())
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, **kwargs)


# ----- phd convert -----


def test_cli_converts_a_directory_to_an_export_and_back(tmp_path, capsys) -> None:
    hf = tiny_transformers("olmo2", tie=False)
    hf.save_pretrained(tmp_path / "olmo2")
    assert phd_main(["convert", str(tmp_path / "olmo2"), str(tmp_path / "export"), "--check"]) == 0
    assert "max |logit difference| vs the source on 64 tokens = 0" in capsys.readouterr().out
    native = phd.io.load_model(tmp_path / "export")
    assert phd_main(["convert", str(tmp_path / "export"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(native(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_cli_reports_bad_input_in_one_line(tmp_path) -> None:
    with pytest.raises(SystemExit, match="phd convert: GGUF file .*missing.gguf does not exist"):
        phd_main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
    hf = tiny_transformers("llama", attention_bias=True)
    hf.save_pretrained(tmp_path / "biased")
    with pytest.raises(SystemExit, match="phd convert: attention_bias=True is not supported"):
        phd_main(["convert", str(tmp_path / "biased"), str(tmp_path / "out")])


def test_cli_converts_to_a_phd_variant_in_transformers_format(tmp_path) -> None:
    tiny_transformers("llama").save_pretrained(tmp_path / "llama")
    args = ["convert", str(tmp_path / "llama"), str(tmp_path / "phd-hf"), "--to", "phd-hf",
            "--variant", "PHD-CSWA-2-16-32"]
    assert phd_main(args) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "phd-hf")
    assert isinstance(loaded, PHDForCausalLM)
    assert loaded.config.to_phd().name == "PHD-CSWA-2-16-32" and loaded.config.positions == "shared"


# ----- GGUF (a file written here: no download) -----


def _gguf_row_order(weight, heads: int):
    """llama.cpp's layout of q/k projection rows: the two rotary halves of each head interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def write_tiny_gguf(path, hf) -> None:
    """The weights of a tiny tied-embedding Llama as an F32 GGUF file, as llama.cpp's converter lays them out."""
    gguf = pytest.importorskip("gguf")
    c = hf.config
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        for theirs, ours in names.items():
            w.add_tensor(f"blk.{i}.{theirs}.weight", sd[f"{layer}{ours}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _gguf_row_order(sd[layer + "self_attn.q_proj.weight"],
                                                               c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _gguf_row_order(sd[layer + "self_attn.k_proj.weight"],
                                                               c.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_converts_with_the_original_logits(tmp_path) -> None:
    pytest.importorskip("accelerate")
    hf = tiny_transformers("llama", tie=True)
    write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    assert phd_main(["convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "export")]) == 0
    native = phd.io.load_model(tmp_path / "export")
    assert native.config.tie_embeddings and native.config.n_kv_heads == 2
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_a_checkpoint_missing_a_weight_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_transformers("llama", tie=False).save_pretrained(tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.0.mlp.up_proj.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"missing model.layers.0.mlp.up_proj.weight \(1\); unexpected model.extra"):
        phd_main(["convert", str(tmp_path / "llama"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused(tmp_path) -> None:
    hf = tiny_transformers("llama", tie=False)
    with torch.no_grad():
        hf.model.norm.weight[0] = float("inf")
    hf.save_pretrained(tmp_path / "llama")
    with pytest.raises(SystemExit, match="NaN or inf weights in norm.weight"):
        phd_main(["convert", str(tmp_path / "llama"), str(tmp_path / "out"), "--to", "phd-hf"])
    assert not (tmp_path / "out").exists()


def _write_gguf(path, arch: str, tensors: dict, fields=()) -> None:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    for field in fields:
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)
    for name, value in tensors.items():
        writer.add_tensor(name, value.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_of_another_architecture_or_incomplete_is_one_line(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": torch.zeros(8, 4)})
    with pytest.raises(SystemExit, match="holds a 'gpt2' GGUF model; phd converts 'llama' and 'olmo2'"):
        phd_main(["convert", str(tmp_path / "gpt2.gguf"), str(tmp_path / "out")])
    hf = tiny_transformers("llama", tie=True)
    write_tiny_gguf(tmp_path / "full.gguf", hf)
    fields = [f for f in gguf.GGUFReader(str(tmp_path / "full.gguf")).fields.values()
              if f.name.startswith(("llama.", "tokenizer."))]
    _write_gguf(tmp_path / "embd.gguf", "llama", {"token_embd.weight": hf.model.embed_tokens.weight}, fields)
    with pytest.raises(SystemExit, match="does not hold a complete model: missing"):
        phd_main(["convert", str(tmp_path / "embd.gguf"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
