"""`phd bench compile`: a training step with torch.compile'd blocks against the same step in eager mode, per
variant, timed round-robin in one process; plus the first (compiling) step's cost and the largest loss difference.

This is what made `compile: true` the study's default on CPU: the same losses to float tolerance, about 1.25x per
step on the small models the study trains, for a few seconds of compilation per run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from ..config import PHDConfig
from ..model import PHDTransformer
from ..train.parallelize import apply_compile
from .timing import CLOCKS, interleaved_medians, machine_line, markdown_table, write_report


def _stepper(config: PHDConfig, compiled: bool, batch: tuple[torch.Tensor, torch.Tensor], seed: int):
    """One AdamW training step of a fresh model (same seed: same weights either way); returns step() -> loss."""
    torch.manual_seed(seed)
    model = PHDTransformer(config)
    if compiled:
        apply_compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs, targets = batch

    def step() -> float:
        loss = model(inputs, targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def run(args: Any) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    rows, data = [], []
    for variant in args.variants:
        config = PHDConfig.preset(args.preset, variant)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
        batch = (ids[:, :-1], ids[:, 1:])
        steps, first, losses = {}, {}, {}
        for compiled in (False, True):
            step = _stepper(config, compiled, batch, seed=0)
            start = time.perf_counter()
            losses[compiled] = [step()]
            first[compiled] = time.perf_counter() - start
            steps[compiled] = step
        for _ in range(args.check_steps - 1):  # the two runs from the same weights on the same batch
            for compiled in (False, True):
                losses[compiled].append(steps[compiled]())
        diff = max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True))
        times = interleaved_medians({c: steps[c] for c in (False, True)}, repeats=args.repeats, warmup=1, clock=clock)
        speedup = times[False] / times[True]
        rows.append([variant, f"{times[False] * 1e3:.0f} ms", f"{times[True] * 1e3:.0f} ms", f"{speedup:.2f}x",
                     f"{first[True]:.1f} s ({first[False]:.1f} s eager)", f"{diff:.1e}"])
        data.append({"variant": variant, "eager_s": times[False], "compiled_s": times[True], "speedup": speedup,
                     "first_step_compiled_s": first[True], "first_step_eager_s": first[False],
                     "max_loss_diff": diff, "check_steps": args.check_steps})
        print(f"{variant}: compiled {speedup:.2f}x eager, first step {first[True]:.1f} s", file=sys.stderr)
    header = (f"torch.compile'd blocks vs eager, one training step (forward, backward, AdamW), {args.preset}, "
              f"seq_len {args.seq_len}, batch {args.batch_size}; median of {args.repeats} round-robin repeats "
              f"({args.clock} clock); {machine_line()}. The first step includes compilation (a warm on-disk "
              "inductor cache makes later runs' first steps shorter); loss difference: largest over the first "
              f"{args.check_steps} steps of the two runs from the same weights on the same batch.")
    table = markdown_table(["variant", "eager / step", "compiled / step", "speed-up", "first step, compiled",
                            "max loss difference"], rows)
    path = write_report(args.out, "compile", header + "\n\n" + table, {"rows": data, "machine": machine_line()})
    print(header + "\n\n" + table)
    print(f"written to {path}")
    return 0
