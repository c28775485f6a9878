"""The training loop: one process or a torchrun job, the same code path.

Setup checks everything that can be checked before the first step (data, tokenizer and model vocabularies,
resume compatibility), then the loop runs gradient accumulation, clipping, the NaN/inf policy, periodic
validation, metrics (JSONL + a progress bar on rank 0) and atomic checkpoints. At the end the consolidated
model is exported to RUN/model/ (config.json + model.safetensors + tokenizer.json).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import PHDConfig
from ..data.shards import DataError, TokenShards, open_shards
from ..errors import PHDError
from ..eval.perplexity import eval_batches, loss_sums
from ..fsutil import DirLock, LockedError, WriteError, reporting_write_errors
from ..io import load_model, save_model
from ..model import PHDTransformer
from .checkpoint import Checkpointer, check_model_config, load_checkpoint
from .config import TrainConfig, TrainConfigError
from .diagnostics import PROBE_TOKENS, UpdateRatio, grad_norms, probe_logits
from .loader import TokenLoader
from .optim import apply_config, build_optimizer, build_scheduler, optim_settings
from .parallelize import DistInfo, any_rank, parallelize

METRICS = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl ([] before the first); a line torn by a kill mid-write is skipped."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class TrainingError(PHDError, RuntimeError):
    """Training cannot continue (non-finite loss under nan_policy=stop, too many skipped steps...)."""


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool = False
    health: dict[str, Any] | None = None  # the diagnostics of this step, when it was probed


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    skipped: int = 0
    consecutive_skipped: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def check_vocab(shards: TokenShards, model_config: PHDConfig) -> None:
    """The data's tokenizer, its meta.json and the model must agree on the vocabulary, before any work starts."""
    tok_path = shards.tokenizer_path
    if tok_path.exists():
        tok_vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size(with_added_tokens=True)
        if tok_vocab != shards.vocab_size:
            raise DataError(
                f"{tok_path} has {tok_vocab} tokens but {shards.root / 'meta.json'} says vocab_size="
                f"{shards.vocab_size}: the data was not made with this tokenizer; rebuild it with `phd data`"
            )
    if model_config.vocab_size != shards.vocab_size:
        raise DataError(
            f"model vocab_size={model_config.vocab_size} but the data in {shards.root} was tokenized with "
            f"vocab_size={shards.vocab_size}; set model.vocab_size={shards.vocab_size} or use data made with a "
            f"{model_config.vocab_size}-token tokenizer"
        )


def resolve_bf16(dtype: str, device: torch.device) -> bool:
    if dtype == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return dtype == "bfloat16"


class StopSignal:
    """Turns SIGTERM and Ctrl-C (SIGINT) into a request to stop after the current step and save; a second
    Ctrl-C aborts at once. Every rank asks every step (one tiny all-reduce), so all ranks stop, and save, at the
    same step even if the signal reached them at different times."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, distributed: bool, log=print) -> None:
        self.distributed, self.flag, self.previous, self.log = distributed, False, {}, log
        self.name = "SIGTERM"

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
        self.flag, self.name = True, signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.log("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to abort without saving)")

    def requested(self) -> bool:
        return any_rank(self.flag) if self.distributed else self.flag


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None) -> None:
        self.cfg, self.info = cfg, info or DistInfo()
        self.run_dir = Path(cfg.out)
        self.model_config = cfg.model.build()
        self.shards = open_shards(cfg.data)
        check_vocab(self.shards, self.model_config)
        cfg.grad_accum(self.info.world)  # refuses a process count that does not divide the batch
        if cfg.eval_every and len(self.shards.val) <= cfg.seq_len:
            raise DataError(
                f"the val split of {cfg.data} holds {len(self.shards.val)} tokens, not one sequence of seq_len+1="
                f"{cfg.seq_len + 1}; rebuild the data with a held-out split or set eval_every=0"
            )
        self.loader = TokenLoader(
            self.shards.train, cfg.seq_len, cfg.batch_size, cfg.micro_batch, self.info.rank, self.info.world, cfg.seed
        )
        self.bf16 = resolve_bf16(cfg.dtype, self.info.device)
        # FSDP's mixed-precision policy casts parameters on CUDA; everywhere else autocast does.
        fsdp = self.info.distributed and cfg.data_parallel == "fsdp"
        self.autocast = self.bf16 and not (fsdp and self.info.device.type == "cuda")
        if self.info.is_main:
            self._make_run_dir()
        self.lock = DirLock(self.run_dir)
        self._lock()
        try:
            self.checkpointer = Checkpointer(
                self.run_dir, cfg.checkpoint_keep, self.info.rank, self.shards.tokenizer_path
            )
            latest = self.checkpointer.latest()

            self.model = self._build_model(cfg.init_from if latest is None else None)
            self.optimizer = build_optimizer(self.model, cfg)
            self.scheduler = build_scheduler(self.optimizer, cfg)
            self.progress = Progress()
            self.resumed_from: Path | None = None
            if latest is not None:
                self._resume(latest)
            if self.info.is_main:
                self._record_config()
                self._truncate_metrics()
        except BaseException:
            self.lock.release()
            raise

    def _make_run_dir(self) -> None:
        """RUN itself; a path that cannot be a folder (`out=/proc/x`, a file, no permission) is one line naming out."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrainConfigError(
                f"out={self.cfg.out!r} is invalid: the run folder cannot be created ({err.strerror or err}); give a "
                "folder you can write"
            ) from None

    def _lock(self) -> None:
        """One process (job) per run folder: rank 0 holds RUN/train.lock from here to the end of fit()."""
        error: LockedError | None = None
        if self.info.is_main:
            try:
                self.lock.acquire()
            except LockedError as err:
                error = err
        if any_rank(error is not None):
            raise error or LockedError(f"{self.run_dir} is in use by another process (see rank 0's error)")

    def _build_model(self, init_from: str | None) -> torch.nn.Module:
        """Same seeded init on every rank (or the weights of an export), then parallelize."""
        torch.manual_seed(self.cfg.seed)
        model = PHDTransformer(self.model_config)
        if init_from:
            source = load_model(init_from)
            check_model_config(source.config, self.model_config, init_from)
            model.load_state_dict(source.state_dict())
        model.to(self.info.device)
        return parallelize(
            model, self.info, bf16=self.bf16, compile=self.cfg.compile,
            activation_checkpointing=self.cfg.activation_checkpointing, data_parallel=self.cfg.data_parallel,
        )

    # ----- state -----
    def trainer_state(self) -> dict[str, Any]:
        p = self.progress
        return {
            "step": p.step, "tokens": p.tokens, "skipped": p.skipped, "loader": self.loader.state_dict(),
            "scheduler": self.scheduler.state_dict(), "data": self._data_fingerprint(),
            "optim": optim_settings(self.cfg),
        }

    def _data_fingerprint(self) -> dict[str, Any]:
        return {"train_tokens": len(self.shards.train), "seq_len": self.cfg.seq_len, "seed": self.cfg.seed}

    def _resume(self, path: Path) -> None:
        """Restore everything; refuse a model that differs in any field or a run already past its end; apply
        optimiser and schedule settings as the new config says (logged)."""
        meta = load_checkpoint(path, self.model, self.optimizer)
        state = meta["trainer"]
        if state["step"] > self.cfg.total_steps:
            raise TrainingError(
                f"{path} is at step {state['step']}, past this config's end at step {self.cfg.total_steps} "
                "(max_steps / max_tokens): raise them to continue, or export that step with `phd export`"
            )
        changed = {k: (v, state.get("data", {}).get(k)) for k, v in self._data_fingerprint().items()}
        changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
        if changed:
            what = ", ".join(f"{k}: {old} then, {new} now" for k, (new, old) in changed.items())
            self._log(f"warning: the data order differs from the checkpoint's ({what}); the run continues with the "
                      "new order, so it will not repeat an uninterrupted run exactly")
        self.loader.load_state_dict(state["loader"])
        self.scheduler.load_state_dict(state["scheduler"])
        apply_config(self.optimizer, self.scheduler, self.cfg)
        saved = state.get("optim", {})
        optim = {k: (saved.get(k), v) for k, v in optim_settings(self.cfg).items() if saved.get(k, v) != v}
        if optim:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in optim.items())
            self._log(f"resume changes the optimiser/schedule ({what}): from step {state['step'] + 1} on, the lr "
                      "and AdamW settings are exactly the new config's")
        self.progress = Progress(step=state["step"], tokens=state["tokens"], skipped=state["skipped"])
        self.resumed_from = path
        self._log(f"resumed from {path} (step {state['step']}, saved by {meta['world']} process(es))")

    def _record_config(self) -> None:
        """config.json: the config being trained from now on, plus one history entry per resume (its step and
        what it changed), so the folder says what every step was trained with."""
        path = self.run_dir / "config.json"
        history: list[dict[str, Any]] = []
        if self.resumed_from is not None:
            old: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                old = json.loads(path.read_text())
            history = list(old.pop("resumes", []))
            new = self.cfg.to_dict()
            diff = {k: [old.get(k), new[k]] for k in new if k in old and old[k] != new[k] and k != "progress"}
            history.append({"step": self.progress.step, "time": time.time(), "changed": diff})
        with reporting_write_errors(path):
            self.cfg.save(path, resumes=history)

    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(
            self.progress.step, self.model, self.optimizer, self.model_config, self.trainer_state(), self.info.world
        )

    # ----- one step -----
    def forward_loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The objective of one micro-batch: mean next-token loss, plus z_loss * mean logsumexp(logits)^2 when
        z_loss > 0 (that term is also added to self._z_term, so the logged loss stays the cross-entropy). The
        seam tests use to inject faults."""
        ctx = torch.autocast(self.info.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            out = self.model(inputs, targets)
        if not self.cfg.z_loss:
            return out.loss
        z = self.cfg.z_loss * torch.logsumexp(out.logits.float(), dim=-1).pow(2).mean()
        self._z_term = self._z_term + z.detach()
        return out.loss + z

    def _probing(self, step: int) -> bool:
        """Diagnostics at this step: every diagnostics_every steps and at step 1, on a single process."""
        every = self.cfg.diagnostics_every
        return bool(every) and not self.info.distributed and (step == 1 or step % every == 0)

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients across ranks only in the backward of the last micro-batch of a step."""
        if isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext() if last else self.model.no_sync()
        if self.info.distributed:
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _all_mean(self, value: Tensor) -> Tensor:
        if self.info.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.info.world
        return value

    def train_step(self) -> StepResult:
        cfg, device = self.cfg, self.info.device
        self.model.train()
        micro = self.loader.next_step()
        step = self.progress.step + 1
        health = None
        if self._probing(step):  # before this step's update: the weights the loss below is computed with
            health = probe_logits(self.model, micro[0][0][:1, :PROBE_TOKENS].to(device))
        total = torch.zeros((), device=device)
        self._z_term = torch.zeros((), device=device)
        for i, (inputs, targets) in enumerate(micro):
            with self._gradient_sync(i == len(micro) - 1):
                loss = self.forward_loss(inputs.to(device), targets.to(device)) / len(micro)
                loss.backward()
            total += loss.detach().float()
        loss_value = self._all_mean(total - self._z_term / len(micro))  # the cross-entropy, without the z-loss
        if health is not None:
            health["grad_norm_by_layer"] = grad_norms(self.model)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip or math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]  # what this step's update uses
        loss_f, norm_f = float(loss_value), float(norm)
        skipped = not (math.isfinite(loss_f) and math.isfinite(norm_f))
        if skipped:
            self._non_finite(step, loss_f, norm_f)
        else:
            update = UpdateRatio(self.model) if health is not None else None
            self.optimizer.step()
            if update is not None:
                health["update_ratio"] = update.ratios()
            self.progress.consecutive_skipped = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step = step
        self.progress.tokens += cfg.tokens_per_step
        return StepResult(step, loss_f, norm_f, lr, skipped, health)

    def _non_finite(self, step: int, loss: float, norm: float) -> None:
        what = f"loss={loss} grad_norm={norm} at step {step}"
        latest = self.checkpointer.latest()
        good = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        if self.cfg.nan_policy == "stop":
            raise TrainingError(f"non-finite {what}; stopping (nan_policy=stop); {good}")
        self.progress.skipped += 1
        self.progress.consecutive_skipped += 1
        if self.progress.consecutive_skipped > self.cfg.max_skipped_steps:
            raise TrainingError(
                f"non-finite {what}: {self.progress.consecutive_skipped} steps in a row skipped, more than "
                f"max_skipped_steps={self.cfg.max_skipped_steps}; stopping; {good}. Lower lr or check the data"
            )
        self._log(f"non-finite {what}: step skipped (nan_policy=skip), parameters unchanged")

    # ----- validation -----
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss of eval_iters * batch_size validation windows spread over the split (any process
        count); `phd eval --sequences` scores the same windows with the same function."""
        cfg, device = self.cfg, self.info.device
        self.model.eval()
        batches = eval_batches(
            self.shards.val, cfg.seq_len, cfg.eval_iters * cfg.batch_size, cfg.micro_batch, self.info.rank,
            self.info.world,
        )
        sums = loss_sums(self.model, batches, device, self.autocast)
        if self.info.distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self.model.train()
        return float(sums[0] / sums[1])

    # ----- the loop -----
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to cfg.total_steps (or stop after step `stop_after`, as an interruption would), then export.

        SIGTERM (what schedulers send before preempting a job) or Ctrl-C ends the run after the current step,
        with a checkpoint to resume from. The run folder's lock is released when fit returns.
        """
        self._lock()
        try:
            return self._fit(stop_after)
        finally:
            self.lock.release()

    def _fit(self, stop_after: int | None) -> dict[str, Any]:
        cfg, p = self.cfg, self.progress
        total = cfg.total_steps
        end = min(total, stop_after) if stop_after else total
        bar = self._bar(total)
        val_loss: float | None = None
        train_time, trained_tokens = 0.0, 0
        window_time, window_tokens = 0.0, 0
        last: StepResult | None = None
        stopped = False
        with StopSignal(self.info.distributed, self._log) as stop:
            while p.step < end and not stopped:
                t0 = time.perf_counter()
                last = self.train_step()
                dt = time.perf_counter() - t0
                train_time, trained_tokens = train_time + dt, trained_tokens + cfg.tokens_per_step
                window_time, window_tokens = window_time + dt, window_tokens + cfg.tokens_per_step
                record: dict[str, Any] = {
                    "step": last.step, "loss": last.loss if not last.skipped else None, "lr": last.lr,
                    "grad_norm": last.grad_norm if math.isfinite(last.grad_norm) else None, "tokens": p.tokens,
                }
                if last.skipped:
                    record["skipped"] = True
                if last.health is not None:
                    record.update(last.health)
                p.history.append(record)
                if last.step % cfg.log_every == 0 or last.step == total or last.health is not None:
                    record["tok_per_s"] = window_tokens / window_time if window_time else None
                    self._write_metrics(record)
                    window_time, window_tokens = 0.0, 0
                if cfg.eval_every and (last.step % cfg.eval_every == 0 or last.step == total):
                    val_loss = self.evaluate()
                    self._write_metrics({"step": last.step, "val_loss": val_loss, "tokens": p.tokens})
                    self._log(f"step {last.step}: val loss {val_loss:.4f}")
                due = bool(cfg.checkpoint_every) and (last.step % cfg.checkpoint_every == 0 or last.step == total)
                stopped = stop.requested() and last.step < total
                if due or stopped:
                    self.save_checkpoint()
                if stopped:
                    self._log(f"{stop.name}: stopped after step {last.step} with a checkpoint; run again to resume")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last.loss:.4f}", tok_s=f"{trained_tokens / train_time:,.0f}")
        if bar is not None:
            bar.close()
        exported = self.export(self.run_dir / "model") if p.step == total else None
        return {
            "step": p.step, "tokens": p.tokens, "train_loss": last.loss if last else None, "val_loss": val_loss,
            "tok_per_s": trained_tokens / train_time if train_time else None, "train_time": train_time,
            "params": self.model_config.num_params(), "skipped": p.skipped, "variant": self.model_config.name,
            "stopped": stopped, "exported": str(exported) if exported else None,
        }

    def export(self, out: Path) -> Path | None:
        """The consolidated model in io.save_model's format (collective; rank 0 writes)."""

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        model = PHDTransformer(self.model_config)
        model.load_state_dict(state)
        tokenizer = self.shards.tokenizer_path
        try:
            return save_model(model, out, tokenizer if tokenizer.exists() else None, overwrite=True)
        except WriteError as err:
            raise err.with_fix(self._export_fix(out)) from None

    def _export_fix(self, out: Path) -> str:
        """How to get the trained model after a failed final export: from the last checkpoint, if there is one."""
        if self.cfg.checkpoint_every:
            return f"free space, then export the last checkpoint: phd export {self.run_dir} --out {out} --overwrite"
        return "free space and train again (checkpoint_every=0: no checkpoint holds the trained weights)"

    # ----- output -----
    def _bar(self, total: int):
        if not (self.info.is_main and self.cfg.progress):
            return None

        return tqdm(total=total, initial=self.progress.step, desc=self.model_config.name, dynamic_ncols=True)

    def _log(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(f"[phd train] {message}", file=sys.stderr)  # above the progress bar, not through it

    def _write_metrics(self, record: dict[str, Any]) -> None:
        """Append one record to RUN/metrics.jsonl; a full disk is one line naming the file (WriteError)."""
        if self.info.is_main:
            with reporting_write_errors(self.run_dir / METRICS), open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def _truncate_metrics(self) -> None:
        """On resume, drop records of steps after the checkpoint (a killed run logged them; they are redone)."""
        path = self.run_dir / METRICS
        if not path.exists():
            return
        keep = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= self.progress.step]  # torn: redone
        with reporting_write_errors(path):
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def train(cfg: TrainConfig, info: DistInfo | None = None) -> dict[str, Any]:
    return Trainer(cfg, info).fit()
