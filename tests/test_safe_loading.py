"""Nothing the package reads from a file can run code.

1. The source: no ``weights_only=False``, no bare ``pickle.load``/``loads``, no other unpickling door
   (``allow_pickle=True``, ``yaml.load``, custom ``pickle_module``), and every ``torch.load`` is
   ``weights_only=True``.
2. The files: a malicious pickle (whose ``__reduce__`` would create a marker file, once through
   ``os.system`` and once through ``shutil.copyfile``, a module torch does not block) is planted in every
   kind of file the package loads: a training checkpoint (through the ``train`` command and through the
   trainer), the latent trainer's encoded-photo cache, prior ``.pt``/``.ckpt`` files and a diffusers
   folder's ``.bin``, and the LPIPS and Inception weight files. The marker never appears, and a refusal
   is one line.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffrestore"

BANNED = {
    r"weights_only\s*=\s*False": "weights_only=False",
    r"(?<![\w.])(?:c?pickle|_pickle)\.loads?\s*\(": "a bare pickle.load/loads",
    r"allow_pickle\s*=\s*True": "allow_pickle=True",
    r"\byaml\.(?:load|unsafe_load|full_load)\s*\(": "yaml.load (use yaml.safe_load)",
    r"\bpickle_module\s*=": "a custom pickle_module for torch.load",
    r"\b(?:dill|joblib|marshal)\.loads?\s*\(": "dill/joblib/marshal loading",
}


def _sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"no sources found under {SRC}"
    return files


def test_no_unsafe_loading_in_the_source():
    found = []
    for path in _sources():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pattern, what in BANNED.items():
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def _is_torch_load(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id == "torch"


def _passes_weights_only(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def test_every_torch_load_is_weights_only():
    """``torch.load(..., weights_only=True)`` literally, or in a wrapper that forwards ``**kwargs`` and whose
    every call passes ``weights_only=True``."""
    bad, wrappers, calls = [], {}, []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call) and _is_torch_load(n)]:
                if not _passes_weights_only(call):
                    if any(k.arg is None for k in call.keywords):
                        wrappers[fn.name] = f"{path.relative_to(ROOT)}:{call.lineno}"
                    else:
                        bad.append(f"{path.relative_to(ROOT)}:{call.lineno}")
        calls += [(path, n) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    for path, call in calls:
        name = getattr(call.func, "id", getattr(call.func, "attr", None))
        if name in wrappers and not _passes_weights_only(call):
            bad.append(f"{path.relative_to(ROOT)}:{call.lineno} calls {name} ({wrappers[name]}) without weights_only=True")
    assert not bad, "torch.load without weights_only=True: " + "; ".join(bad)


def test_the_source_checks_can_fail(tmp_path):
    """The patterns above do catch what they are meant to."""
    lines = ["torch.load(p, weights_only=False)", "obj = pickle.load(f)", "pickle.loads(b)", "np.load(p, allow_pickle=True)",
             "yaml.load(text)", "torch.load(f, pickle_module=m)"]  # fmt: skip
    for line in lines:
        assert any(re.search(p, line) for p in BANNED), line
    for line in ["yaml.safe_load(text)", "_NumpyOnlyUnpickler(f).load()", "torch.load(p, weights_only=True)"]:
        assert not any(re.search(p, line) for p in BANNED), line
    call = ast.parse("torch.load(p, map_location='cpu')").body[0].value
    assert _is_torch_load(call) and not _passes_weights_only(call)


# --------------------------------------------------------------------------------------------------
# malicious files


class _System:
    """Unpickled, runs a shell command (``os`` is a module torch's weights-only reader blocks outright)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Copy:
    """Unpickled, copies a file to the marker (``shutil`` is not blocked: only an allow-list stops it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (__file__, str(self.marker)))


PAYLOADS = {"os.system": _System, "shutil.copyfile": _Copy}


@pytest.fixture(params=sorted(PAYLOADS))
def evil(request, tmp_path):
    """(payload object, marker path); the test fails if the marker exists afterwards."""
    marker = tmp_path / "MARKER-code-ran"
    yield PAYLOADS[request.param](marker), marker
    assert not marker.exists(), f"unpickling ran the {request.param} payload"


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def _pixel_checkpoint(payload) -> dict:
    """A training checkpoint as the trainer writes it, with the payload among its options."""
    return {"kind": "pixel", "model_cfg": {"block_out_channels": [8, 16]}, "model": {}, "ema": {}, "opt": {}, "rng": {},
            "step": 1, "elapsed": 0.0, "options": {"crop": 16, "hook": payload}}  # fmt: skip


def test_training_checkpoint_through_the_train_command(evil, tmp_path):
    payload, marker = evil
    (tmp_path / "run").mkdir()
    torch.save(_pixel_checkpoint(payload), tmp_path / "run" / "checkpoint.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "diffrestore", "train", "pixel", "--data", str(tmp_path), "--run", str(tmp_path / "run"),
         "--resume", "--steps", "1", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("diffrestore: error: ") and "checkpoint.pt: refused" in line


def test_training_checkpoint_through_the_trainer(evil, tmp_path):
    from diffrestore.training.checkpoints import TrainingError
    from diffrestore.training.pixel import train_pixel

    payload, marker = evil
    (tmp_path / "run").mkdir()
    torch.save(_pixel_checkpoint(payload), tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(TrainingError, match="refused") as e:
        train_pixel(tmp_path, None, tmp_path / "run", resume=True, steps=1, progress=False)
    _one_line(e)


def test_encoded_photo_cache_is_encoded_again(evil, tmp_path, monkeypatch):
    """The latent trainer's cache of encoded photos: a planted file is a cache miss, replaced."""
    from diffrestore.training import encoded_photos

    payload, marker = evil
    torch.save({"key": {}, "pixels": [payload], "latents": []}, tmp_path / "encoded_photos.pt")
    fresh = encoded_photos.EncodedPhotos([torch.zeros(3, 8, 8, dtype=torch.uint8)], [torch.zeros(3, 2, 2)])
    monkeypatch.setattr(encoded_photos.EncodedPhotos, "encode", classmethod(lambda cls, *a: fresh))
    got = encoded_photos.load_or_encode_photos(tmp_path, [None], None, "sha", (256,), "cpu", 0)
    assert got is fresh
    assert torch.load(tmp_path / "encoded_photos.pt", weights_only=True)["key"]["vae_sha256"] == "sha"


def test_prior_pt_file(evil, tmp_path, shared):
    """An ADM ``.pt``: the payload beside real weights, and as the whole file."""
    from diffrestore.priors.loading import PriorLoadError, load_prior

    payload, marker = evil
    sd = torch.load(shared / "golden" / "ddrm" / "unet_state_dict.pt", map_location="cpu", weights_only=True)
    torch.save({"state_dict": sd, "hook": payload}, tmp_path / "wrapped.pt")
    with open(tmp_path / "bare.pt", "wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(PriorLoadError, match="bare.pt") as e:
        load_prior(tmp_path / "bare.pt", adm_config={"num_head_channels": 16})
    _one_line(e)
    if isinstance(payload, _System):  # a module torch blocks: refused
        with pytest.raises(PriorLoadError, match="wrapped.pt") as e:
            load_prior(tmp_path / "wrapped.pt", adm_config={"num_head_channels": 16})
        _one_line(e)
    else:  # an inert stand-in takes the payload's place beside the weights
        assert load_prior(tmp_path / "wrapped.pt", adm_config={"num_head_channels": 16}).image_size == 64


def test_prior_lightning_ckpt(evil, tmp_path, shared):
    """An LDM ``.ckpt`` that pickles the payload as a Lightning callback: the tensors load, nothing runs
    (or, for a module torch blocks, a one-line refusal)."""
    from diffrestore.priors.base import LatentSRPrior
    from diffrestore.priors.loading import PriorLoadError, load_prior

    payload, marker = evil
    ldm = shared / "golden" / "ldm"
    sd = torch.load(ldm / "ldm_sr_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    torch.save({"state_dict": sd, "callbacks": {"ModelCheckpoint": payload}, "global_step": 3}, tmp_path / "m.ckpt")
    shutil.copy(ldm / "ldm_sr_tiny.yaml", tmp_path / "m.yaml")
    if isinstance(payload, _System):
        with pytest.raises(PriorLoadError, match="m.ckpt: refused, it pickles what could run code") as e:
            load_prior(tmp_path / "m.ckpt")
        _one_line(e)
    else:
        assert isinstance(load_prior(tmp_path / "m.ckpt"), LatentSRPrior)


def test_prior_diffusers_folder_bin(evil, tmp_path):
    from diffusers import UNet2DModel

    from diffrestore.priors.loading import PriorLoadError, load_prior

    payload, marker = evil
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)  # fmt: skip
    unet.save_pretrained(tmp_path / "m", safe_serialization=False)
    bin_path = tmp_path / "m" / "diffusion_pytorch_model.bin"
    torch.save({**unet.state_dict(), "hook": payload}, bin_path)
    with pytest.raises(PriorLoadError) as e:
        load_prior(tmp_path / "m")
    _one_line(e)


def _uncached_refusal(cached, error: type, load) -> None:
    """``load()`` raises ``error`` with a one-line message, with the loader's cache (``cached``) empty
    before and after, so neither a real nor the planted file is kept for another test."""
    cached.cache_clear()
    try:
        with pytest.raises(error) as e:
            load()
    finally:
        cached.cache_clear()
    _one_line(e)


def test_lpips_weights(evil, tmp_path, monkeypatch):
    from diffrestore.metrics import lpips

    payload, marker = evil
    path = tmp_path / "alexnet.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"AlexNet_0": {"Conv_0": {"kernel": payload}}}, f)
    monkeypatch.setattr(lpips, "find_lpips_weights", lambda net="alex": path)
    _uncached_refusal(lpips._load, lpips.LPIPSUnavailable, lambda: lpips.load_lpips("cpu"))


@pytest.mark.parametrize(
    "source",
    [
        "pytorch-fid",
        "torchscript",
    ],
)  # fmt: skip
def test_inception_weights(evil, tmp_path, monkeypatch, source):
    from diffrestore.metrics import inception

    payload, marker = evil
    path = tmp_path / f"inception-{source}.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "hook": payload}, path)
    monkeypatch.setattr(inception, "find_inception_weights", lambda: (source, path))
    _uncached_refusal(inception._load_net, inception.InceptionUnavailable, lambda: inception.load_inception("cpu"))
