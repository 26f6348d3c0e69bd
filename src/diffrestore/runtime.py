"""Process-wide runtime settings applied when ``diffrestore`` is imported: the C allocator and precision.

The allocator: by default glibc serves blocks above a dynamic threshold (at most 32 MiB) with ``mmap`` and
hands them back to the kernel on ``free``, and trims the top of its heap whenever 128 KiB or more is free
there. A diffusion sampler allocates and frees the same large activation tensors at every network call, so
every call pays page faults for fresh zeroed memory: at 1024x1024 more system than user time. ``mallopt``
through ``ctypes`` turns both off in the running process (``MALLOC_*_`` environment variables are read once,
when glibc starts, so setting them from Python has no effect), so freed activations are reused. Outputs are
unchanged (only where memory comes from differs); the cost is a higher resident size, measured in
``docs/results/2026-12-03-cpu-scaling.md``. Set ``DIFFRESTORE_MALLOC=system`` to keep glibc's defaults;
``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` given in the environment are respected as they are.
Other C libraries (musl, macOS, Windows) are left alone.

Precision: ``auto_dtype`` picks bfloat16 for networks on a CPU with native bf16 arithmetic (AVX512-BF16 or
AMX), where it costs no measured quality and runs faster, else float32.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["tune_allocator", "allocator_tuned", "cpu_has_native_bf16", "auto_dtype", "pick_dtype", "warn_cpu_fp16"]

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


OPT_OUT = "DIFFRESTORE_MALLOC"

_tuned = False


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel (see the module doc).

    Idempotent; returns whether the setting is in effect. A no-op outside glibc, with
    ``DIFFRESTORE_MALLOC=system``, or when the user set ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get(OPT_OUT, "").strip().lower() in ("system", "0", "off", "no", "false"):
        return False
    if "MALLOC_MMAP_MAX_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    # M_TRIM_THRESHOLD -1 disables trimming (mallopt(3)); M_MMAP_MAX 0 serves every block from the heap
    _tuned = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    return _tuned


def allocator_tuned() -> bool:
    """Whether ``tune_allocator`` is in effect in this process."""
    return _tuned


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX-BF16), as PyTorch's oneDNN uses it."""
    try:
        import torch

        if not torch.backends.mkldnn.is_available():
            return False
        if hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (ImportError, RuntimeError, AttributeError):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def auto_dtype(device) -> str:
    """The network precision ``--dtype auto`` means on ``device``: "bf16" on a CUDA device with bf16 or a
    CPU with native bf16, else "fp32"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def pick_dtype(name: str | None, device) -> str:
    """A precision name ("auto", "fp32", "fp16", "bf16"; None means "auto") as the concrete one to run:
    "auto" per ``auto_dtype``; fp16 on a CPU warns (``warn_cpu_fp16``)."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return auto_dtype(device)
    warn_cpu_fp16(name, device)
    return name


def warn_cpu_fp16(dtype, device) -> None:
    """One warning line on stderr when fp16 networks are asked for on a CPU, where they run ~15x slower than fp32."""
    import torch

    if str(dtype) in ("fp16", "float16", "torch.float16") and torch.device(device).type == "cpu":
        print("diffrestore: warning: fp16 on a CPU runs about 15x slower than fp32; use --dtype auto or bf16", file=sys.stderr)
