"""The training loop and what it keeps: steps until done, out of time or signalled, with periodic
checkpoints; the JSON-lines run log (and the option history read back from it); the EMA of the weights;
the learning-rate warm-up."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoints import TrainingError
from .options import PRECISIONS

LOG_NAME = "log.jsonl"


class JsonlLog:
    """Append-only JSON-lines log (one record per line, flushed at once); its folder is created with the
    first record, so a run that fails before it starts leaves nothing behind."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._opened = False

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a record cut short by a crash must not swallow the first record of the resumed run
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self._opened = True

    def write(self, **record) -> None:
        if not self._opened:
            self._open()
        record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()


def round_floats(record: dict, ndigits: int) -> dict:
    """``record`` with its float values rounded to ``ndigits`` (for log records)."""
    return {k: (round(v, ndigits) if isinstance(v, float) else v) for k, v in record.items()}


class EMA:
    """Exponential moving average of a model's parameters, with the usual warm-up of the decay.

    The effective decay at update ``n`` is ``min(decay, (1 + n) / (10 + n))`` so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, sb in zip(self.model.buffers(), model.buffers()):
            eb.copy_(sb)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["model"])


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (runs are extended by resuming)."""
    if warmup <= 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup)


def option_stages(log_path: str | os.PathLike, key: str, default=None) -> list[tuple[int, object]]:
    """``(first step, value)`` of each stretch of a run trained with one value of option ``key``, read
    from the "start" records of its log: a resume with another value (a cool-down ``--lr``, a switch of
    ``--precision``) begins a new stretch, a resume from an earlier checkpoint drops the stretches after
    it, a fresh start clears them. ``default`` stands for a start record without ``key`` (older logs)."""
    stages: list[tuple[int, object]] = []
    try:
        lines = Path(log_path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return stages
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if rec.get("event") != "start":
            continue
        step, value = int(rec["step"]), rec["options"].get(key, default)
        stages = [s for s in stages if s[0] < step] if rec.get("resume") else []
        if not stages or stages[-1][1] != value:
            stages.append((step, value))
    return stages


def lr_stages(log_path: str | os.PathLike) -> list[tuple[int, float]]:
    """The learning-rate stretches of a run (see :func:`option_stages`)."""
    return [(step, float(lr)) for step, lr in option_stages(log_path, "lr")]


def describe_lr(stages: list[tuple[int, float]], warmup: int) -> str:
    """The learning-rate history for a model README, e.g. "lr 0.0002 (linear warm-up 200 steps) to step
    8,000, then 0.0001 (each change a resume with `--lr`)"."""
    if not stages:
        return "lr unknown (no start record in the log)"
    text = f"lr {stages[0][1]:g} (linear warm-up {warmup} steps"
    if len(stages) == 1:
        return text + ", then constant)"
    text += ")"
    for step, lr in stages[1:]:
        text += f" to step {step:,}, then {lr:g}"
    return text + " (each change a resume with `--lr`)"


def describe_precision(stages: list[tuple[int, object]]) -> str:
    """The arithmetic history for a model README, e.g. "fp32 to step 11,000, then bf16 mixed precision (...)"."""
    if not stages:
        return "fp32"
    text = PRECISIONS[stages[0][1]]
    for step, value in stages[1:]:
        text += f" to step {step:,}, then {PRECISIONS[value]}"
    return text


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can write a last checkpoint before exiting."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def run_loop(
    *,
    start_step: int,
    steps: int,
    elapsed_before: float,
    step_fn,
    checkpoint_fn,
    log: JsonlLog,
    log_every: int = 50,
    ckpt_every_s: float = 300.0,
    ckpt_every_steps: int = 0,
    max_minutes: float | None = None,
    progress: bool = True,
    progress_interval: float = 10.0,
    desc: str = "train",
) -> dict:
    """Run ``step_fn(step) -> (loss, lr)`` from ``start_step`` to ``steps``.

    ``checkpoint_fn(step, elapsed)`` is called every ``ckpt_every_s`` seconds of wall time and/or every
    ``ckpt_every_steps`` steps, and once at the end (steps reached, ``max_minutes`` spent, or
    SIGTERM/SIGINT). ``elapsed`` is the cumulative training wall time over all sessions.
    Returns {"step", "loss" (mean of the last logging window), "elapsed"}.
    """
    from tqdm import tqdm

    t_start = time.time()
    last_ckpt = t_start
    step = start_step
    window: list[float] = []
    last_loss = float("nan")
    bar = tqdm(
        total=steps, initial=step, desc=desc, disable=not progress, mininterval=progress_interval,
        dynamic_ncols=True,
    )
    deadline = t_start + max_minutes * 60 if max_minutes else None
    saved_at = None
    with StopFlag() as flag:
        try:
            while step < steps and not flag.stop:
                if deadline is not None and time.time() >= deadline:
                    break
                loss, lr = step_fn(step)
                if not math.isfinite(loss):  # keep the last good checkpoint
                    raise TrainingError(f"loss is not finite at step {step} ({loss})")
                step += 1
                window.append(loss)
                bar.update(1)
                if step % log_every == 0 or step == steps:
                    last_loss = sum(window) / len(window)
                    window.clear()
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    log.write(step=step, loss=last_loss, lr=lr, elapsed=round(elapsed_before + time.time() - t_start, 1))
                now = time.time()
                if (ckpt_every_s and now - last_ckpt >= ckpt_every_s) or (
                    ckpt_every_steps and step % ckpt_every_steps == 0
                ):
                    checkpoint_fn(step, elapsed_before + now - t_start)
                    last_ckpt = time.time()
                    saved_at = step
        finally:
            bar.close()
        if saved_at != step:
            checkpoint_fn(step, elapsed_before + time.time() - t_start)
    if window:
        last_loss = sum(window) / len(window)
    return {"step": step, "loss": last_loss, "elapsed": elapsed_before + time.time() - t_start}
