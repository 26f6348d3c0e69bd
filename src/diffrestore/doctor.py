"""``diffrestore doctor``: which optional pieces this installation has, and how to add each one.

Nothing here downloads or loads a network; each check looks for a file or an importable module.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import NamedTuple

__all__ = ["Check", "checks", "report"]


class Check(NamedTuple):
    name: str  # what the piece is for
    ok: bool
    detail: str  # what was found, or how to add it


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _torch_checks() -> list[Check]:
    import torch

    build = "CUDA" if torch.version.cuda else "CPU"
    out = [Check("PyTorch", True, f"{torch.__version__} ({build} build)")]
    if torch.cuda.is_available():
        out.append(Check("GPU", True, f"{torch.cuda.get_device_name(0)} (--device cuda)"))
    else:
        how = "a CPU build of PyTorch is installed" if build == "CPU" else "no CUDA device is visible"
        out.append(Check("GPU", False, f"none: {how}; everything runs on the CPU"))
    return out


def _metric_checks() -> list[Check]:
    from diffrestore.metrics.inception import INCEPTION_HOW_TO_GET as FID_HOW
    from diffrestore.metrics.inception import InceptionUnavailable, find_inception_weights
    from diffrestore.metrics.lpips import LPIPS_HOW_TO_GET as LPIPS_HOW
    from diffrestore.metrics.lpips import LPIPSUnavailable, find_lpips_weights

    out = []
    try:
        source, path = find_inception_weights()
        out.append(Check("FID / KID (Inception weights)", True, f"{path} ({source})"))
    except InceptionUnavailable:
        out.append(Check("FID / KID (Inception weights)", False, f"add with {FID_HOW}"))
    try:
        out.append(Check("LPIPS (AlexNet / VGG weights)", True, str(find_lpips_weights("alex"))))
    except LPIPSUnavailable:
        out.append(Check("LPIPS (AlexNet / VGG weights)", False, f"add with {LPIPS_HOW}"))
    return out


def checks() -> list[Check]:
    """Every optional piece: PyTorch build and GPU, metric weights, the web app, browser tests."""
    out = _torch_checks() + _metric_checks()
    out.append(
        Check("web app (diffrestore app)", True, "gradio installed")
        if _has_module("gradio")
        else Check("web app (diffrestore app)", False, 'add with pip install -e ".[app]"')
    )
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if _has_module("playwright") and browser:
        out.append(Check("browser tests", True, f"playwright + {browser}"))
    else:
        out.append(Check("browser tests", False, "add with pip install playwright and apt-get install chromium"))
    return out


def report() -> str:
    rows = checks()
    width = max(len(c.name) for c in rows)
    return "\n".join(f"{'ok' if c.ok else '--'}  {c.name:<{width}}  {c.detail}" for c in rows)
