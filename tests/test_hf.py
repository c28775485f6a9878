"""transformers integration: conversion parity (Llama, OLMo2), save/load round trip, padding, generate()."""

from __future__ import annotations

import json
import logging.handlers
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_utils import VOCAB, left_padded, tiny_phd, tiny_transformers  # noqa: E402

import phd  # noqa: E402
from phd.commands import main as phd_main  # noqa: E402
from phd.config import ConfigError  # noqa: E402
from phd.errors import PHDError  # noqa: E402
from phd.hf import PHDForCausalLM, PHDHFConfig  # noqa: E402
from phd.hf.convert import ConversionError, from_transformers, to_transformers  # noqa: E402

# ----- conversion parity -----


@pytest.mark.parametrize("family", ["llama", "olmo2"])
@pytest.mark.parametrize("tie", [True, False])
def test_k1_conversion_matches_transformers_logits(family: str, tie: bool) -> None:
    hf = tiny_transformers(family, tie)
    model = from_transformers(hf)
    assert model.config.repeat_k == 1 and model.config.is_causal and model.config.tie_embeddings == tie
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


def test_a_weight_of_the_wrong_shape_is_one_line(tmp_path) -> None:
    """A tensor whose shape contradicts config.json once ended in transformers' RuntimeError traceback (after its
    multi-line load report): one line naming the tensor and both shapes, and nothing written."""
    from safetensors.torch import load_file, save_file

    tiny_transformers("llama", tie=False).save_pretrained(tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(state, weights, metadata={"format": "pt"})
    reports = logging.handlers.BufferingHandler(100)  # what transformers' loader logs (its report is a warning)
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(reports)
    try:
        with pytest.raises(SystemExit) as err:
            phd_main(["convert", str(tmp_path / "llama"), str(tmp_path / "out")])
    finally:
        logger.removeHandler(reports)
    assert str(err.value) == (f"phd convert: {tmp_path / 'llama'} does not hold a complete model: mismatched "
                              "model.layers.0.mlp.up_proj.weight (shape [95, 64] in the file, [96, 64] for its "
                              "config.json) (1); convert an unmodified checkpoint")
    assert not any("LOAD REPORT" in str(r.msg) for r in reports.buffer) and not (tmp_path / "out").exists()


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


# ----- a --to phd-hf folder: trust_remote_code in a fresh process, and the phd CLI -----

LOAD_SCRIPT = """
import sys, torch, transformers
torch.set_num_threads(1)
assert "phd.hf" not in sys.modules
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.tensor([[5, 6, 7, 8, 9]])
print(type(model).__name__, model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist())
base = transformers.AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)  # the base model: hidden states
with torch.no_grad():
    hidden = base(ids).last_hidden_state
    same = torch.allclose(model.get_output_embeddings()(hidden), model(ids, use_cache=False).logits, atol=1e-5)
print(type(base).__name__, tuple(hidden.shape), same)
"""


def _python(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(phd.__file__).parents[1]), "HF_MODULES_CACHE": str(tmp_path / "hfm"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)


def test_phd_hf_folder_loads_with_trust_remote_code_in_a_fresh_process(tmp_path) -> None:
    tiny_transformers("llama").save_pretrained(tmp_path / "llama")
    out = tmp_path / "phd-hf"
    args = ["convert", str(tmp_path / "llama"), str(out), "--to", "phd-hf", "--variant", "PHD-CSWA-2-3-5"]
    assert phd_main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_phd.PHDForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_phd.PHDModel"
    assert (out / "modeling_phd.py").exists() and (out / "configuration_phd.py").exists()
    native = phd.io.load_model(out)
    expected = phd.generate(native, torch.tensor([5, 6, 7, 8, 9]), 8, stop_tokens=[2]).tolist()
    run = _python(tmp_path, LOAD_SCRIPT, str(out))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines() == [f"PHDForCausalLM {expected + [0] * (13 - len(expected))}",
                                               "PHDModel (1, 5, 64) True"]
    # without the phd package: one line says what to install
    missing = _python(tmp_path, "import sys; sys.modules['phd'] = None\n" + LOAD_SCRIPT, str(out))
    assert missing.returncode != 0
    assert 'this PHD model needs the phd package with its transformers extra: pip install "phd[hf]"' in missing.stderr


# ----- what Llama-family tools expect: config attributes, AutoModel -----

LLAMA_ATTRIBUTES = ("head_dim", "hidden_act", "rope_parameters", "rope_scaling", "attention_bias", "attention_dropout",
                    "mlp_bias")


def test_config_has_the_llama_attributes_with_the_llama_values(tmp_path) -> None:
    """The attributes Llama tools read are those of the same K = 1 model as a LlamaConfig (to_transformers), also
    after a save / load; they are views of the native fields, not a second copy in config.json."""
    native = from_transformers(tiny_transformers("llama"))  # rope_theta 5000, 4 heads of 16
    config = PHDHFConfig.from_phd(native.config)
    llama = to_transformers(native).config
    for name in LLAMA_ATTRIBUTES:
        assert getattr(config, name) == getattr(llama, name), name
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 5000.0} and config.head_dim == 16
    config.save_pretrained(tmp_path)
    assert not set(LLAMA_ATTRIBUTES) & set(json.loads((tmp_path / "config.json").read_text()))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert {n: getattr(loaded, n) for n in LLAMA_ATTRIBUTES} == {n: getattr(llama, n) for n in LLAMA_ATTRIBUTES}


def test_config_takes_the_llama_attributes_a_phd_model_has_and_refuses_others() -> None:
    fields = PHDHFConfig.from_phd(tiny_phd().config).to_dict()
    same = PHDHFConfig(**fields, head_dim=16, hidden_act="silu", attention_bias=False, attention_dropout=0.0,
                       mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 777.0})
    assert same.rope_theta == 777.0 and same.to_phd().rope_theta == 777.0  # rope_theta lives in one place
    refused = {"head_dim": 32, "hidden_act": "gelu", "attention_bias": True, "attention_dropout": 0.1,
               "mlp_bias": True, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5},
               "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    for name, value in refused.items():
        with pytest.raises(ConfigError, match=rf"^{name.replace('scaling', 'parameters')}=.* is not supported"):
            PHDHFConfig(**fields, **{name: value})


def test_automodel_gives_the_base_model_llama_hidden_states_at_k1(tmp_path) -> None:
    """AutoModel loads PHDModel from a PHDForCausalLM folder: at K = 1 its last_hidden_state is LlamaModel's on the
    same weights; for any variant the LM head over it gives the causal LM's logits; left padding is moved away."""
    llama = tiny_transformers("llama")
    PHDForCausalLM.from_native(from_transformers(llama)).save_pretrained(tmp_path / "k1")
    base = transformers.AutoModel.from_pretrained(tmp_path / "k1")
    assert type(base).__name__ == "PHDModel" and not base.training
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, llama.model(ids).last_hidden_state, atol=1e-5,
                                   rtol=0)
    causal = PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-3-2-4"))
    causal.save_pretrained(tmp_path / "cswa")
    base = transformers.AutoModel.from_pretrained(tmp_path / "cswa")
    padded, mask = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    with torch.no_grad():
        hidden = base(padded, attention_mask=mask).last_hidden_state
        logits = causal(padded, attention_mask=mask, use_cache=False).logits
        alone = base(torch.tensor([[11, 12, 13]])).last_hidden_state
    torch.testing.assert_close(causal.get_output_embeddings()(hidden) * mask[..., None], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[1, 3:], alone[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="PHDModel has no cache"):
        base(padded, use_cache=True)


def test_cli_takes_a_phd_hf_folder(tmp_path, capsys) -> None:
    from train_utils import make_data

    llama = tiny_transformers("llama", vocab_size=300)
    llama.save_pretrained(tmp_path / "llama")
    folder = tmp_path / "phd-hf"
    assert phd_main(["convert", str(tmp_path / "llama"), str(folder), "--to", "phd-hf"]) == 0
    data = make_data(tmp_path / "data")
    out = tmp_path / "loss.json"
    assert phd_main(["eval", str(folder), "--data", str(data), "--seq-len", "32", "--max-tokens", "128",
                     "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["loss"]["loss"] > 0
    capsys.readouterr()
    assert phd_main(["generate", "--checkpoint", str(folder), "--prompt-ids", "5,6,7", "--temperature", "0",
                     "--max-new-tokens", "4"]) == 0
    expected = phd.generate(from_transformers(llama), torch.tensor([5, 6, 7]), 4, stop_tokens=[2])
    assert capsys.readouterr().out.split() == [str(t) for t in expected[3:].tolist()]
    assert phd_main(["convert", str(folder), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert phd_main(["convert", str(folder), str(tmp_path / "native"), "--to", "phd"]) == 0
    native = phd.io.load_model(tmp_path / "native")
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, llama(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(native(ids).logits, llama(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("field, value, error", [
    ("repeat_k", 3, "sets repeat_k=3, but model.safetensors was written as PHD-CSWA-2-4-8 with repeat_k=2: "
                    "config.json was edited or belongs to another model; set repeat_k back to 2"),
    ("chunk", 4, "sets chunk=4, but model.safetensors was written as PHD-CSWA-2-4-8 with chunk=8"),
    ("rms_norm_eps", 0.1, "sets rms_norm_eps=0.1, but model.safetensors was written as PHD-CSWA-2-4-8 with "
                          "rms_norm_eps=1e-06"),
    ("window", 4096, "window=4096 is invalid: W must be <= max_seq_len=256"),
])
def test_an_edited_phd_hf_config_is_refused(tmp_path, field, value, error) -> None:
    """A phd-hf folder whose config.json was edited once loaded (phd and transformers alike) as another variant:
    save_pretrained records the config in the weights' metadata, and both loaders check config.json against it."""
    from safetensors import safe_open

    tiny_transformers("llama").save_pretrained(tmp_path / "llama")
    folder = tmp_path / "phd-hf"
    assert phd_main(["convert", str(tmp_path / "llama"), str(folder), "--to", "phd-hf", "--variant",
                     "PHD-CSWA-2-4-8"]) == 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata()["variant"] == "PHD-CSWA-2-4-8"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 300}))
    assert phd.io.load_model(folder).config.max_seq_len == 300  # a longer context: the weights do not mind
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(PHDError, match=error):
        phd.io.load_model(folder)
    with pytest.raises(PHDError, match=error):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_transformers_config_carries_every_native_field() -> None:
    import dataclasses

    from phd.hfnames import RENAMED, SAME

    names = {f.name for f in dataclasses.fields(PHDHFConfig)}
    assert set(RENAMED) | set(SAME) <= names
    assert set(RENAMED.values()) | set(SAME) == {f.name for f in dataclasses.fields(phd.PHDConfig)}
    native = phd.PHDConfig.preset("cpu-1m", "PHD-CSWA-3-16-32", qk_norm=True, init_std=0.01)
    assert PHDHFConfig.from_phd(native).to_phd() == native


# ----- what a converted folder carries: the generation config, and a tokenizer that needs no remote code -----

CHAT_EOS = 7  # a chat model's turn end (<|im_end|>), listed before end-of-text as Qwen-style configs do


def _chat_llama(folder: Path, eos: list[int]) -> torch.nn.Module:
    """A tiny Llama saved with a chat model's generation_config.json: several eos ids and sampling defaults."""
    llama = tiny_transformers("llama")
    llama.save_pretrained(folder)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=eos, pad_token_id=0, do_sample=True, temperature=0.7,
                                  top_p=0.8, repetition_penalty=1.05).save_pretrained(folder)
    return llama


def test_conversion_keeps_the_sources_generation_config(tmp_path) -> None:
    """Every conversion used to write a fresh default (eos = the tokenizer's one id): the source's own
    generation_config.json (every eos id, sampling defaults) is kept, to phd-hf, to phd and back, and to hf."""
    _chat_llama(tmp_path / "llama", [CHAT_EOS, 2])
    folders = {"phd-hf": tmp_path / "phd-hf", "phd": tmp_path / "native", "hf": tmp_path / "back"}
    assert phd_main(["convert", str(tmp_path / "llama"), str(folders["phd-hf"]), "--to", "phd-hf"]) == 0
    assert phd_main(["convert", str(tmp_path / "llama"), str(folders["phd"])]) == 0
    assert phd_main(["convert", str(folders["phd-hf"]), str(folders["hf"]), "--to", "hf"]) == 0
    assert phd_main(["convert", str(folders["phd"]), str(tmp_path / "phd-hf-2"), "--to", "phd-hf"]) == 0
    folders["phd -> phd-hf"] = tmp_path / "phd-hf-2"
    for what, folder in folders.items():
        kept = transformers.GenerationConfig.from_pretrained(folder)
        assert kept.eos_token_id == [CHAT_EOS, 2], what
        assert (kept.do_sample, kept.temperature, kept.top_p, kept.repetition_penalty) == (True, 0.7, 0.8, 1.05), what
    model = transformers.AutoModelForCausalLM.from_pretrained(folders["phd-hf"])
    assert model.generation_config.eos_token_id == [CHAT_EOS, 2]


def test_phd_generate_stops_where_transformers_does(tmp_path, capsys) -> None:
    """`phd generate` on a chat model's folder ran past its turn end (it stopped at end-of-text only): by default it
    stops at every eos id of the folder's generation_config.json, as transformers' generate() does."""
    prompt = [5, 6, 7, 8, 9]
    free = phd.generate(from_transformers(tiny_transformers("llama")), torch.tensor(prompt), 12)[5:].tolist()
    stop = free[3]  # a token the model produces early: the chat model's turn end in this test
    _chat_llama(tmp_path / "llama", [stop, 2])
    folder = tmp_path / "phd-hf"
    assert phd_main(["convert", str(tmp_path / "llama"), str(folder), "--to", "phd-hf"]) == 0
    capsys.readouterr()
    assert phd_main(["generate", "--checkpoint", str(folder), "--prompt-ids", "5,6,7,8,9", "--temperature", "0",
                     "--max-new-tokens", "12"]) == 0
    ours = [int(t) for t in capsys.readouterr().out.split()]
    cut = min(free.index(t) for t in (stop, 2) if t in free)
    assert ours == free[: cut + 1] and len(ours) < 12
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    assert theirs[0, 5:].tolist() == ours
    # --stop replaces the default
    assert phd_main(["generate", "--checkpoint", str(folder), "--prompt-ids", "5,6,7,8,9", "--temperature", "0",
                     "--max-new-tokens", "12", "--stop", f"#{free[-1]}"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == free[: free.index(free[-1]) + 1]


def test_a_bad_generation_config_is_one_line(tmp_path, capsys) -> None:
    tiny_transformers("llama").save_pretrained(tmp_path / "llama")
    folder = tmp_path / "phd-hf"
    assert phd_main(["convert", str(tmp_path / "llama"), str(folder), "--to", "phd-hf"]) == 0
    (folder / "generation_config.json").write_text('{"eos_token_id": "<|im_end|>"}')
    capsys.readouterr()
    assert phd_main(["generate", "--checkpoint", str(folder), "--prompt-ids", "5,6", "--max-new-tokens", "2"]) == 2
    assert "generation_config.json: eos_token_id must be a token id or a list of ids, not '<|im_end|>'" in \
        capsys.readouterr().err


TOKENIZER_SCRIPT = """
import sys, transformers
assert "phd.hf" not in sys.modules
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "True")
print(type(tok).__name__, tok.convert_tokens_to_ids("c"))
"""


@pytest.mark.parametrize("trust", [True, False])
def test_the_tokenizer_of_a_phd_hf_folder_needs_no_remote_code(tmp_path, trust: bool) -> None:
    """tokenizer_config.json names a standard class and no auto_map, so the tokenizer never runs the folder's code:
    with trust_remote_code=False (or True) AutoTokenizer loads it in a process without phd.hf, without asking.
    (Without the argument transformers asks first anyway: AutoTokenizer reads the model config, whose auto_map
    `trust_remote_code` model loading needs.)"""
    from test_hf_generate import char_tokenizer

    tiny_transformers("llama").save_pretrained(tmp_path / "llama")
    char_tokenizer().save_pretrained(tmp_path / "llama")
    folder = tmp_path / "phd-hf"
    assert phd_main(["convert", str(tmp_path / "llama"), str(folder), "--to", "phd-hf"]) == 0
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "auto_map" not in config
    assert transformers.models.auto.tokenization_auto.tokenizer_class_from_name(config["tokenizer_class"]) is not None
    run = subprocess.run([sys.executable, "-c", TOKENIZER_SCRIPT, str(folder), str(trust)], stdin=subprocess.DEVNULL,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hfm")},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr
    assert run.stdout.split() == ["TokenizersBackend", "2"]
