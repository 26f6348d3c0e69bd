"""The training checkpoint file, and TrainingError, the one-line error every trainer raises.

A checkpoint holds only what ``torch.load(weights_only=True)`` reads back: dicts, lists, tuples,
tensors, numbers, strings, booleans and None (model, EMA and AdamW state dicts, the numpy and torch
RNG states, step, wall time, options). Nothing in it can run code when it is read, and a file that
needs more than that (a planted pickle, a checkpoint written with other objects) is refused with one
line. It is written to a temporary file beside its target and renamed over it, so a run killed
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..image_io import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"

# what a checkpoint of Trainer.save must hold, and the type each entry must have
REQUIRED = {"kind": str, "model_cfg": dict, "model": dict, "ema": dict, "opt": dict, "rng": dict,
            "step": int, "elapsed": (int, float), "options": dict}  # fmt: skip

_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


class TrainingError(ValueError):
    """A training request that cannot be carried out (bad option, missing checkpoint, ...)."""


def one_line(exc: BaseException) -> str:
    """An exception as one short line: a TrainingError's message, an OSError's file and reason, else the
    first sentence of the message (torch appends paragraphs of advice)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return text if isinstance(exc, TrainingError) else text.split(". ")[0].rstrip(".")


def check_plain(obj, where: str = "checkpoint") -> None:
    """Raise TypeError if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse to read,
    so a checkpoint that could not be resumed is never written."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN) or isinstance(obj, np.generic):
        raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored (plain values and tensors only)")


def save_run_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` of ``state`` (plain values and tensors only, see :func:`check_plain`) to a temporary
    file beside ``path``, fsync, then rename over ``path``."""
    check_plain(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def read_run_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """The dict stored in ``path`` by :func:`save_run_checkpoint`, read with ``weights_only=True``;
    TrainingError (one line) if it is missing, unreadable, or holds anything but plain values and tensors."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise TrainingError(
            f"{path}: refused: it stores objects other than tensors and plain values (not a checkpoint of this "
            "version of diffrestore; start a new --run)"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise TrainingError(f"{path}: not a readable checkpoint, truncated or damaged? ({one_line(e)})") from None
    if not isinstance(state, dict):
        raise TrainingError(f"{path}: not a training checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def load_run_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict:
    """:func:`read_run_checkpoint`, checked to hold everything a resume needs (of ``kind``, if given)."""
    state = read_run_checkpoint(path)
    wrong = [k for k, t in REQUIRED.items() if not isinstance(state.get(k), t)]
    if wrong:
        raise TrainingError(f"{path}: not a training checkpoint (missing or malformed: {', '.join(wrong)})")
    if kind is not None and state["kind"] != kind:
        raise TrainingError(f"{path}: a checkpoint of a {state['kind']!r} run, not of {kind!r}")
    return state


def read_options(path: str | os.PathLike) -> dict:
    """The "options" record of the checkpoint ``path`` (what a plain ``--resume`` continues with)."""
    options = read_run_checkpoint(path, mmap=True).get("options", {})
    if not isinstance(options, dict):
        raise TrainingError(f"{path}: not a training checkpoint (malformed options)")
    return options


def rng_state(np_rng: np.random.Generator, gen: torch.Generator) -> dict:
    """Both RNG states as plain values: numpy's bit-generator dict (names and Python ints) and torch's
    state tensor."""
    state = np_rng.bit_generator.state
    return {"numpy": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in state.items()},
            "torch": gen.get_state()}  # fmt: skip


def set_rng_state(np_rng: np.random.Generator, gen: torch.Generator, state: dict) -> None:
    """Restore :func:`rng_state`; a state of another generator type or shape is a TrainingError."""
    try:
        np_rng.bit_generator.state = state["numpy"]
        gen.set_state(state["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainingError(f"checkpoint: malformed RNG state ({one_line(e)})") from None
