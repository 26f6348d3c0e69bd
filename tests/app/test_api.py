"""The three-line Python API: ``from diffrestore import restore``; checked against the CLI's
restore of the same file (same seed, same prior: the same pixels) and for the CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffrestore.cli import main
from diffrestore.image_io import read_image

TINY_ADM_CONFIG = {"num_head_channels": 16}


@pytest.fixture(scope="module")
def photo(tmp_path_factory, shared):
    src = sorted((shared / "data" / "imagenet-sample-500").glob("*.JPEG"))[5]
    img = Image.open(src).convert("RGB").resize((48, 40), Image.BILINEAR)
    path = tmp_path_factory.mktemp("api") / "x.png"
    img.save(path)
    return path


def test_the_readme_one_liner_works_with_no_other_argument(tmp_path, photo):
    """The README's example, as a user runs it: a fresh interpreter, the built-in default prior."""
    code = f'from diffrestore import restore; restore({str(photo)!r}, task="denoise", steps=2).save({str(tmp_path / "y.png")!r})'
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    out = Image.open(tmp_path / "y.png")
    assert out.size == (48, 40) and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(Image.open(photo)))


def test_api_equals_the_cli_on_the_same_file(tmp_path, photo, shared):
    """An ADM checkpoint path as prior=; the API's pixels equal the CLI's PNG for the same settings."""
    from diffrestore import run

    adm = str(shared / "golden" / "ddrm" / "unet_state_dict.pt")
    result = run(photo, task="sr4", prior=adm, steps=3, seed=4, degrade=True, adm_config=TINY_ADM_CONFIG, eta=0.9,
                 dtype="fp32")
    out = tmp_path / "cli"
    assert main(["restore", str(photo), "--task", "sr4", "--prior", adm, "--steps", "3", "--seed", "4", "--degrade",
                 "--eta", "0.9", "--adm-config", json.dumps(TINY_ADM_CONFIG), "--dtype", "fp32", "--out", str(out),
                 "--no-progress"]) == 0
    cli_png = np.asarray(Image.open(out / "x_sr4_ddrm.png"))
    assert np.array_equal(np.asarray(result.image), cli_png)
    record = json.loads((out / "x_sr4_ddrm.json").read_text())
    for key in ("steps", "options", "psnr", "ssim", "consistency", "size"):
        assert result.record[key] == pytest.approx(record[key]), key
    assert result.record["steps"] == 3 and result.record["options"]["eta"] == 0.9


def test_tensor_in_tensor_out_and_pil_in_pil_out(photo):
    from diffrestore import restore

    x = read_image(photo)
    out_t = restore(x, task="denoise", steps=1, seed=1)
    out_p = restore(Image.open(photo), task="denoise", steps=1, seed=1)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (1, 3, 40, 48)
    assert isinstance(out_p, Image.Image)
    # the same input and seed: the PIL result is the tensor result rounded to 8 bits
    as_uint8 = ((out_t[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(as_uint8, np.asarray(out_p))


def test_samples_give_a_spread_map(photo):
    from diffrestore import run

    r = run(photo, task="denoise", steps=1, samples=2)
    assert r.std_map is not None and r.std_map.size == (48, 40) and r.record["options"]["samples"] == 2


@pytest.mark.parametrize(
    "kwargs,says",
    [
        (dict(task="bogus"), "unknown task"),
        (dict(task="denoise", method="bogus"), "unknown method"),
        (dict(task="denoise", eta=1.5), "eta must be in [0, 1]"),
        (dict(task="denoise", samples=0), "samples must be a positive integer"),
        (dict(task="denoise", steps=0), "steps must be at least 1"),
        (dict(task="denoise", bogus_option=1), "has no option 'bogus_option'"),
        (dict(task="sr4", method="srldm", prior="builtin:pixel-s"), "needs a latent prior"),
    ],
)
def test_api_refuses_what_the_cli_refuses(photo, kwargs, says):
    from diffrestore import restore

    with pytest.raises(ValueError, match=None) as e:
        restore(photo, **kwargs)
    assert says in str(e.value)


def test_unreadable_inputs_are_value_errors(tmp_path):
    from diffrestore import restore

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for image in (bad, np.zeros((4, 4), np.float32), torch.full((3, 8, 8), float("nan")), 3):
        with pytest.raises(ValueError):
            restore(image, task="denoise", steps=1)


def test_preset_paper_runs_the_published_options(photo):
    """``preset="paper"`` is the module's own defaults (DDRM without its consistency step): the same
    pixels as ``consistency=False``; the default run uses the recommended value; records say which."""
    from diffrestore import run
    from diffrestore.methods import method_options

    settings = dict(task="sr4", steps=2, seed=1, degrade=True)
    # the paper preset also runs in fp32 (the default precision is auto)
    paper, plain = run(photo, preset="paper", **settings), run(photo, consistency=False, dtype="fp32", **settings)
    default = run(photo, **settings)
    assert np.array_equal(np.asarray(paper.image), np.asarray(plain.image))
    assert not np.array_equal(np.asarray(paper.image), np.asarray(default.image))
    assert paper.record["options"] == method_options("ddrm", paper=True) and paper.record["options"]["consistency"] is False
    assert default.record["options"] == method_options("ddrm") and default.record["options"]["consistency"] is True
    # the recommended consistency step meets the noiseless measurement (before clamping)
    assert default.record["consistency_raw"] < 1e-3 < paper.record["consistency_raw"]
    with pytest.raises(ValueError, match="unknown preset"):
        run(photo, preset="fast", **settings)


def test_tiles_as_large_as_the_image_change_nothing_and_small_tiles_run(photo):
    """``tile=`` reaches the tiled prior (as the CLI's --tile): a tile covering the image is the plain
    call bit for bit; tiles smaller than the image still give the whole image."""
    from diffrestore import run

    settings = dict(task="denoise", steps=2, seed=3, dtype="fp32")
    plain, covering, small = run(photo, **settings), run(photo, tile=64, **settings), run(photo, tile=16, overlap=4, **settings)
    assert np.array_equal(np.asarray(plain.image), np.asarray(covering.image))
    assert small.image.size == plain.image.size
    assert not np.array_equal(np.asarray(plain.image), np.asarray(small.image))


@pytest.mark.parametrize(
    "kwargs,says",
    [(dict(samples=200000), "needs about"), (dict(tile=8, overlap=4), "overlap must be"), (dict(max_memory="1M"), "needs about")],
)
def test_resource_guards_refuse_before_any_model_loads(photo, monkeypatch, kwargs, says):
    """The CLI's memory estimate and tile checks guard the API too, before any prior is loaded."""
    from diffrestore import api

    def no_loading(*_a, **_k):
        raise AssertionError("a prior was loaded")

    monkeypatch.setattr(api, "load_prior_cached", no_loading)
    with pytest.raises(ValueError) as e:
        api.restore(photo, task="denoise", steps=1, **kwargs)
    assert says in str(e.value)
