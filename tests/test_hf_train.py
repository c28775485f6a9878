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
