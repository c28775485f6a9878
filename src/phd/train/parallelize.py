"""Process groups and the one step that makes a plain PHDTransformer trainable at scale.

`parallelize` applies, in torchtitan's order: activation checkpointing per block, then `torch.compile` per
block, then FSDP2 (`fully_shard` on every block and on the root), or DDP as the replicated reference. The
model file knows nothing of this beyond its `checkpoint_fn` switch.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ..checks import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group started by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.

    A single process (no WORLD_SIZE, or 1) creates no process group at all.
    """
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), device_id=device
                                if device.type == "cuda" else None)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (a no-op without a process group)."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (memory for compute): the model's own switch,
    the one transformers' gradient_checkpointing_enable sets too."""

    model.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)


@functools.cache
def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run here (inductor needs a C++ compiler on CPU, Triton on CUDA), or None when a
    tiny function compiles and runs. Asked once per process, before a model is compiled: a failure would
    otherwise surface at the first step, hours into a queue."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, backend="inductor", dynamic=False)
        fn(torch.ones(8, device=device_type))
    except Exception as err:  # noqa: BLE001 (any failure means: train eagerly)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{type(err).__name__}: {first[:200]}"
    return None


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every block separately: identical blocks share one compiled graph, and FSDP hooks stay eager."""
    for block in model.layers:
        block.compile(fullgraph=False, dynamic=False, backend=backend)


def apply_fsdp(model: nn.Module, device: torch.device, bf16: bool) -> None:
    """FSDP2: each block, then the root (embeddings, final norm, head). On CUDA with bf16: bf16 parameters for
    compute, fp32 gradient reduction."""

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict = {"mesh": mesh}
    if bf16 and device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by the backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < last, **kwargs)
    fully_shard(model, **kwargs)


def parallelize(
    model: nn.Module, info: DistInfo, *, bf16: bool, compile: bool, activation_checkpointing: bool,
    data_parallel: str = "fsdp",
) -> nn.Module:
    """The one place where a model becomes distributed / compiled / checkpointed. FSDP2 works in place; DDP
    returns a wrapper (whose `module` is the model)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        problem = compile_problem(info.device.type)
        if problem is None:
            apply_compile(model)
        elif info.is_main:
            print(f"[phd train] torch.compile does not work here ({problem}); training eagerly: the same losses, "
                  "about 1.25x slower per step on CPU. Install a C++ compiler (CPU) or Triton (CUDA) to compile, "
                  "or set compile=false to silence this", file=sys.stderr)
    if info.distributed and data_parallel == "fsdp":
        apply_fsdp(model, info.device, bf16)
    elif info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The PHDTransformer inside a DDP wrapper (FSDP2 keeps the model itself)."""

    return model.module if isinstance(model, DistributedDataParallel) else model
