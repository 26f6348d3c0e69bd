"""Helpers shared by the prior loaders: safe checkpoint reading, JSON/YAML configs, one-line errors, dtypes.

Kept free of diffusers imports so that listing priors (``diffrestore priors``) starts fast.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from .base import PriorLoadError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (PriorLoadError messages are one line)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a float torch dtype, or one of 'fp32', 'fp16', 'bf16' (and their long names)."""
    if dtype is None:
        return None
    resolved = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).lower())
    if resolved not in _DTYPES.values():
        raise PriorLoadError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return resolved


# --------------------------------------------------------------------------------------------------
# configs


def _read_mapping(path: Path, fmt: str, parse: Callable[[str], Any], errors: tuple, expected: str) -> dict:
    try:
        data = parse(Path(path).read_text())
    except (OSError, UnicodeDecodeError, *errors) as e:
        raise PriorLoadError(f"{path}: cannot read {fmt} ({first_line(e)})") from e
    if not isinstance(data, dict):
        raise PriorLoadError(f"{path}: expected {expected}")
    return data


def read_json(path: Path) -> dict:
    return _read_mapping(path, "JSON", json.loads, (json.JSONDecodeError,), "a JSON object")


def read_yaml(path: Path, expected: str = "a YAML mapping") -> dict:
    import yaml

    return _read_mapping(path, "YAML", yaml.safe_load, (yaml.YAMLError,), expected)


# --------------------------------------------------------------------------------------------------
# checkpoints


class _Inert:
    """Stands in for any class a checkpoint pickles besides tensors (Lightning callbacks, optimizer
    state classes, numpy scalars...): it accepts and ignores its arguments, so no foreign code runs."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _stand_ins(path: Path) -> list[tuple[type, str]]:
    """An inert class for each global that ``weights_only=True`` does not allow in the checkpoint ``path``
    (found by reading the pickle's opcodes, which runs nothing), paired with the global's full name."""
    stand_ins = []
    for full_name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        module, _, name = full_name.rpartition(".")
        stand_ins.append((type(name, (_Inert,), {"__module__": f"inert.{module}"}), full_name))
    return stand_ins


def _unpickler_reason(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only reader refused, without its paragraphs of advice."""
    for line in str(e).splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if "GLOBAL" in line or "Unsupported" in line or "unrecognized" in line:
            return line.split(". ")[0].rstrip(".")
    return "objects other than tensors"


def _torch_load(path: Path, **kwargs) -> Any:
    """torch.load on CPU, memory-mapped when the format allows it: tensor data of a multi-GB file is
    only read when used, so a failed first attempt costs just the (small) pickle."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, **kwargs)
    except RuntimeError as e:
        if "mmap" not in str(e):  # legacy (non-zip) format cannot be memory-mapped
            raise
    return torch.load(path, map_location="cpu", **kwargs)


def load_weights(path: Path) -> Any:
    """The object stored in a ``.pt``/``.ckpt``/``.safetensors`` file, without running pickled code.

    ``torch.load(weights_only=True)``; a checkpoint that also pickles other objects (official Lightning
    checkpoints carry callbacks and optimizer state) is read again with ``weights_only=True`` with every
    such class replaced by an inert stand-in (modules torch blocks, such as ``os``, stay refused).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise PriorLoadError(f"{path}: not a readable safetensors file ({first_line(e)})") from e
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise PriorLoadError(f"{path}: cannot read ({e.strerror or e})") from e
    if magic != b"PK" and magic[:1] != b"\x80":  # zip (torch.save) or pickle protocol >= 2 (legacy)
        raise PriorLoadError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        try:
            return _torch_load(path, weights_only=True)
        except pickle.UnpicklingError:
            if magic != b"PK":  # the legacy format cannot be scanned for its globals
                raise
        with torch.serialization.safe_globals(_stand_ins(path)):
            return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise PriorLoadError(f"{path}: refused, it pickles what could run code ({_unpickler_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a user error here
        raise PriorLoadError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {first_line(e)})") from e


def tensor_state_dict(obj: Any, path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat tensors of a Lightning-style checkpoint (under ``state_dict``) or of a plain state dict."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise PriorLoadError(f"{path}: not a checkpoint (no state_dict)")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``tensor_state_dict(load_weights(path))``."""
    return tensor_state_dict(load_weights(path), path)


# --------------------------------------------------------------------------------------------------
# diffusers folders


def from_pretrained(cls, folder: Path, dtype: torch.dtype | None = None):
    """``cls.from_pretrained`` offline, strictly: any missing, unexpected or mismatched weight is an error."""
    try:
        model, info = cls.from_pretrained(
            str(folder), local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True, torch_dtype=dtype
        )
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for bad folders
        raise PriorLoadError(f"cannot load {cls.__name__} from {folder}: {first_line(e)}") from e
    problems = [
        f"{len(keys)} {what.replace('_', ' ')} (e.g. {sorted(map(str, keys))[0]})"
        for what in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if (keys := info.get(what))
    ]
    if problems:
        raise PriorLoadError(f"{folder}: weights do not match config.json: {'; '.join(problems)}")
    return model
