"""``diffrestore priors``: the built-in priors (read from folder listings, no network loaded) and the
``--prior`` formats; plus the package's public names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffrestore.priors as priors
from diffrestore.cli import main
from diffrestore.priors import catalog

SRC = Path(__file__).resolve().parents[2] / "src"


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _model(folder: Path, n_bytes: int) -> None:
    _write(folder / "config.json", json.dumps({"_class_name": "UNet2DModel"}))
    _write(folder / "diffusion_pytorch_model.safetensors", b"\0" * n_bytes)


@pytest.fixture
def builtin(tmp_path, monkeypatch):
    root = tmp_path / "builtin"
    root.mkdir()
    monkeypatch.setattr(catalog, "builtin_dir", lambda: root)
    return root


@pytest.fixture
def populated(builtin):
    _model(builtin / "pix", 2_000_000)
    _write(builtin / "pix" / "README.md", "\n# pix: a small pixel prior\n\nmore text\n")
    sr = builtin / "sr"
    index = {"unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"]}
    _write(sr / "model_index.json", json.dumps(index))
    _model(sr / "unet", 1_000_000)
    _model(sr / "vqvae", 500_000)
    _write(sr / "diffrestore.json", json.dumps({"description": "latent x4 test prior"}))
    _write(sr / "README.md", "# sr: not this line\n")
    half = builtin / "half"  # a training run has written the autoencoder but not the UNet yet
    index = {"unet": ["diffusers", "UNet2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    _write(half / "model_index.json", json.dumps(index))
    _model(half / "vae", 1000)
    _write(half / "unet" / "config.json", "{}")
    _write(builtin / "adm" / "model.pt", b"\x80" + b"\0" * 999)
    _write(builtin / ".partial" / "config.json", "{}")
    return builtin


def test_list_builtin_priors(populated):
    notes: list[str] = []
    found = priors.list_builtin_priors(notes)
    assert [tuple(p) for p in found] == [
        ("adm", "pixel", "", 0.0),
        ("pix", "pixel", "a small pixel prior", 2.0),
        ("sr", "latent", "latent x4 test prior", 1.5),
    ]
    assert len(notes) == 1 and "'half'" in notes[0] and "unet/" in notes[0] and "\n" not in notes[0]
    with pytest.warns(UserWarning, match="'half' skipped"):
        assert len(priors.list_builtin_priors()) == 3


def test_cli_lists_builtin_priors_and_formats(populated, capsys, monkeypatch):
    monkeypatch.setattr(catalog, "DEFAULT_PRIORS", {"pixel": "builtin:pix", "latent": "builtin:other"})
    assert main(["priors"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    pix = next(ln for ln in lines if ln.split()[:1] == ["pix"])
    assert pix.split()[:4] == ["pix", "pixel", "2.0", "MB"] and pix.endswith("a small pixel prior [default]")
    sr = next(ln for ln in lines if ln.split()[:1] == ["sr"])
    assert sr.split()[:4] == ["sr", "latent", "1.5", "MB"] and sr.endswith("latent x4 test prior")
    assert any("note:" in ln and "half" in ln for ln in lines)
    assert not any(ln.split()[:1] == ["half"] for ln in lines)
    assert sum("[default]" in ln for ln in lines) == 2  # the pix line and the legend
    _assert_formats(out)
    monkeypatch.setattr(catalog, "DEFAULT_PRIORS", {"pixel": "builtin:gone", "latent": "builtin:other"})
    assert main(["priors"]) == 0
    assert "[default]" not in capsys.readouterr().out  # no marks, no legend


def test_cli_says_none_installed(builtin, capsys):
    assert main(["priors"]) == 0
    out = capsys.readouterr().out
    assert "none installed" in out and "[default]" not in out
    _assert_formats(out)
    builtin.rmdir()  # no builtin folder at all
    assert main(["priors"]) == 0
    assert "none installed" in capsys.readouterr().out


def _assert_formats(out: str) -> None:
    formats = out[out.index("--prior SPEC"):]
    for what in ("256x256_diffusion_uncond.pt", "class-conditional", ".safetensors", "UNet2DModel", ".ckpt",
                 "YAML", "CompVis/ldm-super-resolution-4x-openimages", "model_index.json", "builtin:NAME"):
        assert what in formats, what


def test_cli_priors_starts_without_diffusers():
    """Listing priors reads files only: it must not pay the seconds diffusers takes to import."""
    code = (
        "import sys; from diffrestore.cli import main; rc = main(['priors']); "
        "assert 'diffusers' not in sys.modules, 'diffusers imported'; sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-W", "ignore", "-c", code]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--prior SPEC" in r.stdout


def test_public_api():
    from diffrestore.priors import base, latent, loading, pixel

    assert priors.load_prior is loading.load_prior
    assert priors.PriorLoadError is base.PriorLoadError
    assert priors.PixelPrior is base.PixelPrior and priors.LatentSRPrior is base.LatentSRPrior
    assert priors.UNetPixelPrior is pixel.UNetPixelPrior
    assert priors.DiffusersLatentSRPrior is latent.DiffusersLatentSRPrior
    assert priors.list_builtin_priors is catalog.list_builtin_priors
    assert set(priors.__all__) <= set(dir(priors))
    with pytest.raises(AttributeError):
        priors.no_such_name  # noqa: B018
