"""Fine-tuning PHDForCausalLM the transformers way: activation checkpointing, resized embeddings, Trainer, LoRA."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_utils import VOCAB, tiny_phd  # noqa: E402
from train_utils import one_thread  # noqa: E402, F401 (autouse fixture)

from phd.hf import PHDForCausalLM  # noqa: E402


def batch(seed: int = 0, rows: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def grads(model: PHDForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_recomputes_blocks_and_changes_no_gradient() -> None:
    model = PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-3-2-4")).train()
    ids = batch()
    plain = grads(model, ids)
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.model.checkpoint_fn is not None
    checked = grads(model, ids)
    assert len(calls) == 2  # forward, then the recomputation in the backward pass
    assert plain.keys() == checked.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checked[name], grad, atol=1e-6, rtol=0, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and model.model.checkpoint_fn is None


def test_resized_embeddings_are_used_by_generate_at_once() -> None:
    model = PHDForCausalLM.from_native(tiny_phd("PHD-SWA-2-3-inf"), eos_token_id=2, pad_token_id=0)
    model.resize_token_embeddings(VOCAB + 5)
    assert model.config.vocab_size == model.model.config.vocab_size == VOCAB + 5
    assert model.model.lm_head.weight is model.model.embed.weight
    out = model.generate(torch.tensor([[5, 6, VOCAB + 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_trainer_with_gradient_checkpointing_trains(tmp_path) -> None:
    model = PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-2-3-5"))
    data = [{"input_ids": ids, "labels": ids} for ids in batch(1, rows=8, length=16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3,
        gradient_checkpointing=True, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    before = model.model.layers[0].attn.wq.weight.detach().clone()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert model.is_gradient_checkpointing
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.model.layers[0].attn.wq.weight, before)


def test_lora_adapter_trains_saves_and_reloads(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    targets = ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]

    def base() -> PHDForCausalLM:
        return PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-3-2-4", seed=0))

    model = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == set(targets)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(base(), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        got = reloaded.eval()(input_ids=ids, use_cache=False).logits
        untouched = base()(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, untouched, atol=1e-3)
    out = reloaded.generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


LLAMA_TARGETS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate",
                 "up_proj": "w_up", "down_proj": "w_down"}


@pytest.mark.parametrize("targets, adapted", [
    (None, {"wq", "wv"}),  # PEFT's default for model_type "phd": Llama's (q_proj, v_proj)
    (["q_proj", "v_proj"], {"wq", "wv"}),
    (list(LLAMA_TARGETS), set(LLAMA_TARGETS.values())),
    (["wq", "wv"], {"wq", "wv"}),
])
def test_lora_finds_the_projections_by_llama_names_and_by_default(tmp_path, targets, adapted) -> None:
    """PEFT's defaults and Llama's module names adapt the native projections (same adapter as the native names),
    without changing a weight name: the base model's state_dict and parameters are those of the native model, and
    the adapter is saved under the native names and loads back the same."""
    peft = pytest.importorskip("peft")
    model = PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-3-2-4", seed=0))
    keys, count = set(model.state_dict()), len(list(model.parameters()))
    assert count == len(list(model.model.parameters())) and len(list(model.modules())) == 1 + len(
        list(model.model.modules()))
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))
    wrapped = {name.split(".")[-1] for name, m in model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == adapted
    assert {k.replace(".base_layer", "") for k in lora.get_base_model().state_dict() if "lora_" not in k} == keys
    ids = batch(3)
    lora.eval()
    with torch.no_grad():
        got = lora(input_ids=ids, use_cache=False).logits
    lora.save_pretrained(tmp_path / "adapter")
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    assert {key.split(".")[-3] for key in saved} == adapted
    reloaded = peft.PeftModel.from_pretrained(PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-3-2-4", seed=0)),
                                              tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, got, atol=1e-6, rtol=0)
    if targets == ["q_proj", "v_proj"]:  # the same adapter as the native names, to the last bit
        plain = PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-3-2-4", seed=0))
        torch.manual_seed(1)
        native = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv"],
                                                            init_lora_weights=False)).eval()
        with torch.no_grad():
            torch.testing.assert_close(native(input_ids=ids, use_cache=False).logits, got, atol=0, rtol=0)


def test_the_training_forward_with_padding_is_one_graph_under_torch_compile() -> None:
    """torch.compile(model, fullgraph=True) takes PHDForCausalLM's training forward (labels and a left-padded
    attention_mask, as Trainer passes them): the padding check and the token-id check are device-side asserts in a
    compiled graph, and nothing asks whether a tensor is an inference tensor. The eager backend only traces (no
    inductor compile), so this is cheap."""
    import torch._dynamo
    from hf_utils import left_padded

    model = PHDForCausalLM.from_native(tiny_phd("PHD-CSWA-3-2-4")).train()
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]])
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        loss = compiled(ids, attention_mask=mask, labels=ids).loss
        assert torch.equal(loss, model(ids, attention_mask=mask, labels=ids).loss)
    finally:
        torch._dynamo.reset()
