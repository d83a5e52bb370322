"""The one training loop every method shares: optimise, log, checkpoint, resume.

A method supplies an `Objective` (its trainable parameters and a loss for one
micro-batch); the loop owns everything else, in diffusers' training-script order:
optimizer -> resume from the newest `checkpoint-{step}` -> loop -> checkpoint -> result.

Resuming gives the same result as never stopping: all randomness of a step (which
photos, which noise, which timesteps) comes from a generator seeded by (seed, step,
micro-batch), and a checkpoint holds the adapter and the optimizer state.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..config import TrainConfig
from ..progress import progress
from .parallel import SINGLE, Ranks
from .prodigy import Prodigy
from .subjects import TuningError

CHECKPOINT_PREFIX = "checkpoint-"
KEEP_CHECKPOINTS = 2


class Objective(Protocol):
    """What a method gives the loop. Two optional hooks: `parameter_groups(lr)` returns
    optimiser groups ({"params", "lr"}) for parts that train at their own rates (a token
    row beside K/V weights), and `after_step()` runs after each optimiser step (restoring
    embedding rows that must not move)."""

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...

    def adapter_state(self) -> dict[str, torch.Tensor]: ...

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # one row per optimiser step
    resumed_from: int | None = None

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def step_generator(seed: int, step: int, micro: int, device: torch.device | str = "cpu") -> torch.Generator:
    # Distinct, reproducible streams per (step, micro-batch), independent of history.
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 64 + micro)


def make_optimizer(params: list[torch.nn.Parameter] | list[dict], config: TrainConfig, learning_rate: float) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "prodigy":
        # Under warm-up the lr factor is small; the safeguard keeps it out of d's denominator
        # so the estimate does not overshoot (the package's advice for warm-up).
        return Prodigy(params, lr=learning_rate, weight_decay=config.weight_decay,
                       safeguard_warmup=config.warmup_steps > 0)
    if config.optimizer == "adamw8bit":
        return _adamw_8bit(params, config, learning_rate)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=config.weight_decay)


def _adamw_8bit(params: list[torch.nn.Parameter] | list[dict], config: TrainConfig,
                learning_rate: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit moments (a quarter of AdamW's optimizer memory, the
    `--use_8bit_adam` of diffusers' scripts); its kernels are CUDA's."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    if any(p.device.type != "cuda" for p in tensors):
        raise TuningError("train.optimizer adamw8bit runs on CUDA GPUs only (bitsandbytes' 8-bit kernels); "
                          "on this device use --set train.optimizer=adamw")
    try:
        import bitsandbytes
    except ImportError:
        raise TuningError("train.optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes` on the GPU "
                          "machine, or use --set train.optimizer=adamw") from None
    return bitsandbytes.optim.AdamW8bit(params, lr=learning_rate, weight_decay=config.weight_decay)


def checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in work_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and (path / "state.pt").exists():
            found.append((int(suffix), path))
    return sorted(found)


def _save_checkpoint(work_dir: Path, step: int, objective: Objective, optimizer: torch.optim.Optimizer,
                     history: list[dict[str, float]], scaler: torch.amp.GradScaler | None) -> Path:
    # Written beside, then renamed into place: a kill mid-save never leaves a checkpoint
    # that looks complete but is not.
    tmp = work_dir / f".{CHECKPOINT_PREFIX}{step}.{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    torch.save({"step": step, "adapter": objective.adapter_state(), "optimizer": optimizer.state_dict(),
                "history": history, "scaler": scaler.state_dict() if scaler else None}, tmp / "state.pt")
    final = work_dir / f"{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in checkpoints(work_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def train(
    objective: Objective,
    config: TrainConfig,
    work_dir: Path,
    steps: int,
    learning_rate: float,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    ranks: Ranks = SINGLE,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Run `steps` optimiser steps, resuming from `work_dir`'s newest checkpoint.

    `stop_after` ends the run early (as an interruption would), after checkpointing.
    `on_checkpoint` gets each finished checkpoint's folder (`Catalog.keep_work` keeps it
    beyond this machine).
    In a data-parallel job (`ranks`, training/parallel.py) this process computes its share
    of each step's micro-batches; only the leader checkpoints and shows progress.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    groups = (objective.parameter_groups(learning_rate) if hasattr(objective, "parameter_groups")
              else [{"params": objective.parameters(), "lr": learning_rate}])
    params = [p for group in groups for p in group["params"]]  # what is clipped: exactly what is optimised
    for group in groups:
        group["initial_lr"] = group["lr"]  # what warm-up scales (torch's schedulers' key)
    optimizer = make_optimizer(groups, config, learning_rate)
    after_step = getattr(objective, "after_step", None)
    device_type = torch.device(device).type
    # fp16 gradients of small LoRA weights underflow without loss scaling; bf16 needs none.
    scaler = torch.amp.GradScaler(device_type) if autocast_dtype == torch.float16 else None
    result = TrainResult(steps)
    start = 0
    found = checkpoints(work_dir)
    if found:
        start, path = found[-1]
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        objective.load_adapter_state(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        result.history = list(state["history"])
        result.resumed_from = start

    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype not in (None, torch.float32)
                else contextlib.nullcontext())
    accumulation = config.gradient_accumulation
    # A follower rank's output is a pipe, never a terminal: its progress lines go nowhere.
    with progress(steps, "train", initial=start, say=None if ranks.leader else _silent) as shown:
        for step in range(start, steps):
            # Warm-up as a function of the step alone: nothing to checkpoint, resume stays exact.
            warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * warm
            totals: dict[str, float] = {}
            for micro in ranks.micro_batches(accumulation):
                with autocast:
                    loss, metrics = objective.loss(step_generator(config.seed, step, micro, device))
                if not torch.isfinite(loss):
                    kept = checkpoints(work_dir)
                    raise TuningError(f"training diverged: loss {loss.item()} at step {step + 1} (last good "
                                      f"checkpoint: {kept[-1][1] if kept else 'none yet'}); lower the learning "
                                      f"rate, or train in bf16 rather than fp16")
                (scaler.scale(loss / accumulation) if scaler else loss / accumulation).backward()
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value / accumulation
            ranks.sum_gradients(params)
            totals = ranks.sum_figures(totals)
            if scaler:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            if config.max_grad_norm > 0:
                totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            if scaler:
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step:
                after_step()
            row = {"step": float(step + 1), **totals}
            result.history.append(row)
            if on_step:
                on_step(step + 1, row)
            shown.update(1, loss=totals.get("loss", float("nan")))
            done = step + 1
            if ranks.leader and (done % config.checkpoint_every == 0 or done == steps or done == stop_after):
                saved = _save_checkpoint(work_dir, done, objective, optimizer, result.history, scaler)
                if on_checkpoint is not None:
                    on_checkpoint(saved)
            if done == stop_after:
                break
    return result



def _silent(line: str) -> None:
    pass
