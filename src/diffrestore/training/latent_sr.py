"""Train the built-in latent super-resolution prior (LDM-SR style), in two stages.

Stage ``autoencoder``: a small diffusers ``AutoencoderKL`` with downsampling factor 4 (3 levels) and 3
latent channels, trained on random crops with L1 + MSE reconstruction (on a posterior sample) plus a
tiny KL term (weight 1e-6 relative to the per-pixel reconstruction, as in LDM); no GAN, no perceptual
loss. At export the per-channel latent statistics (posterior mean over fixed training crops) are
folded exactly into ``quant_conv`` / ``post_quant_conv``, so ``encode`` (posterior mean) gives latents of
zero mean and unit std per channel with ``scaling_factor`` 1.0 and ``decode`` is unchanged.

Stage ``unet``: the exported (fp16, normalised) autoencoder is frozen; x -> z = encode(x) (posterior
mean); lr = 4x4 block average of x (DDRM's sr4 operator), with Gaussian noise of std uniform in
[0, ``lr_noise_max``] added for a ``lr_noise_frac`` share of samples; eps-prediction UNet2DModel on
``cat([z_t, lr], 1)`` (latent first), LDM schedule (betas linear in sqrt from 0.0015 to 0.0155,
1000 steps), uniform t, MSE on eps.

Launch / resume::

    PYTHONPATH=src nice -n 10 python -m diffrestore.training.latent_sr autoencoder --data /work/shared/data/train \\
        --out src/diffrestore/priors/builtin/ldmsr-s --run train_runs/ldmsr-s-ae [--resume]
    PYTHONPATH=src nice -n 10 python -m diffrestore.training.latent_sr unet --data /work/shared/data/train \\
        --out src/diffrestore/priors/builtin/ldmsr-s --run train_runs/ldmsr-s-unet [--resume]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_write_bytes
from ..priors.base import alphas_cumprod_from_betas
from .common import (
    CHECKPOINT_NAME,
    EMA,
    LOG_NAME,
    JsonlLog,
    TrainingError,
    atomic_write_json,
    atomic_write_text,
    fmt_hours,
    hardware_string,
    load_checkpoint,
    lr_at,
    parse_with_resume_defaults,
    param_count,
    psnr,
    resolve_device,
    rng_state,
    run_loop,
    save_checkpoint,
    save_diffusers_fp16,
    set_rng_state,
    set_threads,
)
from .data import CropSampler, block_downsample, fixed_batch, list_photos, load_photos, split_photos

LDM_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0015,
    "beta_end": 0.0155,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def ldm_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.0015**0.5, 0.0155**0.5, 1000, dtype=torch.float64) ** 2
    return alphas_cumprod_from_betas(betas)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def build_autoencoder(
    block_out_channels=(32, 64, 128),
    layers_per_block: int = 1,
    latent_channels: int = 3,
    norm_num_groups: int = 16,
    sample_size: int = 64,
):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(int(c) for c in block_out_channels),
        layers_per_block=int(layers_per_block),
        latent_channels=int(latent_channels),
        norm_num_groups=int(norm_num_groups),
        sample_size=int(sample_size),
        scaling_factor=1.0,
        force_upcast=False,
        mid_block_add_attention=False,
    )


def build_latent_unet(
    block_out_channels=(64, 128, 128),
    layers_per_block: int = 2,
    latent_channels: int = 3,
    attention: bool = False,
    norm_num_groups: int = 32,
    sample_size: int = 32,
):
    """(latent + RGB low-res) -> latent eps UNet2DModel, fully convolutional unless ``attention``."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=int(sample_size),
        in_channels=int(latent_channels) + 3,
        out_channels=int(latent_channels),
        block_out_channels=tuple(int(c) for c in block_out_channels),
        layers_per_block=int(layers_per_block),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        add_attention=bool(attention),
        norm_num_groups=int(norm_num_groups),
        resnet_time_scale_shift="scale_shift",
    )


@torch.no_grad()
def latent_stats(ae, x: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the posterior mean over the crops ``x``."""
    zs = [ae.encode(x[i : i + chunk]).latent_dist.mean.float() for i in range(0, x.shape[0], chunk)]
    z = torch.cat(zs).transpose(0, 1).flatten(1)
    return z.mean(1), z.std(1)


@torch.no_grad()
def normalized_autoencoder(ae, mean: torch.Tensor, std: torch.Tensor):
    """A copy of ``ae`` whose posterior mean is (z - mean) / std per channel and whose decoder accepts that
    normalised latent, with the same reconstructions (exact up to float rounding)."""
    ae = copy.deepcopy(ae).float()
    c = mean.numel()
    m = mean.float().to(ae.quant_conv.weight.device)
    s = std.float().clamp_min(1e-6).to(ae.quant_conv.weight.device)
    qc = ae.quant_conv  # 1x1 conv, 2c -> 2c: [mean; logvar]
    qc.weight[:c] /= s.view(c, 1, 1, 1)
    qc.bias[:c] = (qc.bias[:c] - m) / s
    qc.bias[c:] -= 2 * torch.log(s)
    pq = ae.post_quant_conv  # 1x1 conv, c -> c, on z = s * z' + m
    pq.bias += (pq.weight[:, :, 0, 0] @ m)
    pq.weight *= s.view(1, c, 1, 1)
    return ae


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# shared setup
# ---------------------------------------------------------------------------------------------


def _setup(data_dir, crop, short_side, holdout_every, max_photos, val_size):
    files = list_photos(data_dir)
    train_files, held_files = split_photos(files, holdout_every)
    photos = load_photos(train_files, limit=max_photos)
    sampler = CropSampler(photos, crop, short_side=short_side)
    val_x = None
    if held_files and val_size > 0:
        held = load_photos(held_files, limit=max_photos)
        val_x = fixed_batch(CropSampler(held, crop, short_side=short_side), val_size)
    return photos, sampler, val_x


def _write_folder_meta(out_dir: Path) -> None:
    """model_index.json and scheduler/scheduler_config.json of the hub layout."""
    import diffusers

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out_dir / "model_index.json",
        {
            "_class_name": "LDMSuperResolutionPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    (out_dir / "scheduler").mkdir(exist_ok=True)
    atomic_write_json(
        out_dir / "scheduler" / "scheduler_config.json",
        {**LDM_SCHEDULER, "_diffusers_version": diffusers.__version__},
    )


def _write_readme(out_dir: Path) -> None:
    """README.md from the recipe records of the two stages (``vae/recipe.json``, ``unet/recipe.json``)."""
    parts = [
        "# ldmsr-s: built-in latent super-resolution prior (x4)\n",
        "LDM-SR style model in the diffusers hub layout, trained from scratch by",
        "`diffrestore.training.latent_sr`: `vae/` (AutoencoderKL, f4, 3 latent channels), `unet/`",
        "(UNet2DModel on `cat([z_t, lr], 1)`: latent first, then the RGB low-resolution image in [-1, 1] at",
        "latent resolution), `scheduler/` (DDIM config of the LDM schedule: betas linear in sqrt from",
        "0.0015 to 0.0155, 1000 steps). Weights are EMA weights in fp16 safetensors.\n",
        "**Latent scale**: `encode` = posterior mean, already normalised to zero mean / unit std per",
        "channel (the statistics are folded into `quant_conv` / `post_quant_conv`), `scaling_factor` = 1.0:",
        "use the latent as is, no extra scale factor.\n",
    ]
    for stage in ("vae", "unet"):
        rp = out_dir / stage / "recipe.json"
        if rp.is_file():
            r = json.loads(rp.read_text())
            parts.append(f"## {stage}\n")
            for k, v in r.items():
                parts.append(f"* {k}: {v}")
            parts.append("")
        else:
            parts.append(f"## {stage}\n\n(not trained yet)\n")
    atomic_write_text(out_dir / "README.md", "\n".join(parts) + "\n")


def _fmt(v):
    if isinstance(v, float):
        return round(v, 5)
    return v


# ---------------------------------------------------------------------------------------------
# stage 1: autoencoder
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def validate_autoencoder(ae, x: torch.Tensor, device, chunk: int = 16) -> dict:
    ae.eval()
    recs, zs = [], []
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].to(device)
        z = ae.encode(xb).latent_dist.mean
        recs.append(ae.decode(z).sample.float().cpu())
        zs.append(z.float().cpu())
    rec = torch.cat(recs)
    z = torch.cat(zs).transpose(0, 1).flatten(1)
    out = {"val_psnr": psnr(rec, x), "val_l1": float((rec.clamp(-1, 1) - x).abs().mean())}
    for c in range(z.shape[0]):
        out[f"z{c}_mean"] = float(z[c].mean())
        out[f"z{c}_std"] = float(z[c].std())
    return out


def train_autoencoder(
    data_dir,
    out_dir,
    run_dir,
    *,
    crop: int = 64,
    batch: int = 16,
    lr: float = 2e-4,
    warmup: int = 500,
    steps: int = 200_000,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
    kl_weight: float = 1e-6,
    mse_weight: float = 1.0,
    logvar_init: float = -6.0,
    channels=(32, 64, 128),
    layers_per_block: int = 1,
    latent_channels: int = 3,
    norm_num_groups: int = 16,
    short_side=(192.0, 256.0),
    holdout_every: int = 28,
    val_size: int = 32,
    stats_size: int = 128,
    max_photos: int | None = None,
    ckpt_every_s: float = 300.0,
    ckpt_every_steps: int = 0,
    log_every: int = 50,
    max_minutes: float | None = None,
    resume: bool = False,
    threads: int = 1,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    progress_interval: float = 10.0,
) -> dict:
    """Stage 1. Exports the normalised EMA autoencoder (fp16) to ``out_dir/vae`` at each checkpoint."""
    set_threads(threads)
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT_NAME
    if not resume and ckpt_path.exists():
        raise TrainingError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --run")
    if out_dir is not None and (Path(out_dir) / "unet" / "config.json").is_file():
        raise TrainingError(
            f"{out_dir}: a latent UNet was trained on this folder's vae/; exporting a new autoencoder would "
            "invalidate it (export to another --out, then retrain the unet stage on it)"
        )
    photos, sampler, val_x = _setup(data_dir, crop, short_side, holdout_every, max_photos, val_size)
    stats_x = fixed_batch(sampler, stats_size, seed=4242) if stats_size else None

    torch.manual_seed(seed)
    model_cfg = dict(
        block_out_channels=list(channels), layers_per_block=layers_per_block, latent_channels=latent_channels,
        norm_num_groups=norm_num_groups, sample_size=crop,
    )
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        model_cfg = state["model_cfg"]
    model = build_autoencoder(**model_cfg).to(dev)
    if logvar_init is not None:  # start with a nearly deterministic posterior (std e^(logvar/2))
        with torch.no_grad():
            model.quant_conv.bias[model_cfg["latent_channels"] :] = logvar_init
    ema = EMA(model, ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    np_rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        set_rng_state(np_rng, gen, state["rng"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        del state
    ema.model.to(dev)
    log = JsonlLog(run_dir / LOG_NAME)
    options = dict(
        crop=crop, batch=batch, lr=lr, warmup=warmup, grad_clip=grad_clip, ema_decay=ema_decay,
        kl_weight=kl_weight, mse_weight=mse_weight, logvar_init=logvar_init, short_side=list(short_side),
        holdout_every=holdout_every,
        seed=seed, threads=threads, device=str(dev),
    )
    log.write(event="start", stage="autoencoder", step=step, resume=bool(resume), options=options,
              model_cfg=model_cfg, params=param_count(model), photos=len(photos))
    hardware = hardware_string(dev, threads)
    last_val: dict = {}

    def step_fn(i: int):
        model.train()
        x = sampler.batch(batch, np_rng).to(dev)
        cur_lr = lr_at(i, lr, warmup)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        post = model.encode(x).latent_dist
        noise = torch.randn(post.mean.shape, generator=gen).to(dev)
        z = post.mean + post.std * noise
        rec = model.decode(z).sample
        err = rec - x
        rec_loss = err.abs().mean() + mse_weight * err.pow(2).mean()
        kl = post.kl().mean() / x[0].numel()  # per-pixel, like LDM's summed losses
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema.update(model)
        return float(loss.detach()), cur_lr

    def checkpoint_fn(i: int, el: float):
        save_checkpoint(
            ckpt_path,
            {
                "kind": "autoencoder", "model_cfg": model_cfg, "model": model.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "rng": rng_state(np_rng, gen), "step": i, "elapsed": el, "options": options,
            },
        )
        ae_norm = ema.model
        if stats_x is not None:
            ema.model.eval()
            m, s = latent_stats(ema.model, stats_x.to(dev))
            ae_norm = normalized_autoencoder(ema.model, m, s)
        last_val.clear()
        if val_x is not None:  # validate what is shipped: normalised, rounded to fp16
            last_val.update(validate_autoencoder(copy.deepcopy(ae_norm).half().float(), val_x, dev))
        log.write(event="checkpoint", step=i, elapsed=round(el, 1), **{k: _fmt(v) for k, v in last_val.items()})
        if out_dir is not None:
            out = Path(out_dir)
            _write_folder_meta(out)
            save_diffusers_fp16(ae_norm, out / "vae")
            recipe = {
                "class": "AutoencoderKL (f4, mid-block attention off, scaling_factor 1.0, latents normalised)",
                "architecture": f"block_out_channels {tuple(model_cfg['block_out_channels'])}, layers_per_block "
                f"{model_cfg['layers_per_block']}, latent_channels {model_cfg['latent_channels']}, "
                f"norm groups {model_cfg['norm_num_groups']}",
                "parameters": f"{param_count(ema.model) / 1e6:.2f} M",
                "data": f"{len(photos)} photos of {Path(data_dir).name}/ (every {holdout_every}th held out), random "
                f"{crop}x{crop} crops of the photo rescaled to a short side uniform in {list(short_side)}, h-flips",
                "loss": f"L1 + {mse_weight:g} * MSE on a posterior sample, + {kl_weight:g} * KL (per pixel); no GAN; "
                f"posterior log-variance bias initialised to {logvar_init:g}",
                "optimiser": f"AdamW lr {lr:g} (warm-up {warmup}), batch {batch}, clip {grad_clip:g}, EMA {ema_decay}",
                "steps": i,
                "wall time": f"{fmt_hours(el)} on {hardware}",
                "held-out reconstruction": ", ".join(f"{k} {v:.4f}" for k, v in last_val.items() if "psnr" in k or "l1" in k)
                + f" (PSNR in dB on {val_x.shape[0] if val_x is not None else 0} held-out {crop}px crops, fp16 weights, "
                "encode = posterior mean)",
                "latent statistics after normalisation (held-out)": ", ".join(
                    f"{k} {v:.3f}" for k, v in last_val.items() if k.startswith("z")
                ),
            }
            atomic_write_json(out / "vae" / "recipe.json", recipe)
            _write_readme(out)

    result = run_loop(
        start_step=step, steps=steps, elapsed_before=elapsed, step_fn=step_fn, checkpoint_fn=checkpoint_fn,
        log=log, log_every=log_every, ckpt_every_s=ckpt_every_s, ckpt_every_steps=ckpt_every_steps,
        max_minutes=max_minutes, progress=progress, progress_interval=progress_interval, desc="autoencoder",
    )
    log.write(event="stop", **{k: _fmt(v) for k, v in result.items()})
    result["val"] = dict(last_val)
    return result


# ---------------------------------------------------------------------------------------------
# stage 2: latent UNet
# ---------------------------------------------------------------------------------------------


def load_frozen_vae(folder: Path, device) -> tuple[torch.nn.Module, str]:
    from diffusers import AutoencoderKL

    folder = Path(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"{folder}: no trained autoencoder (train the 'autoencoder' stage first)")
    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    return vae.to(device).eval().requires_grad_(False), _file_sha256(weights)


def _sync_vae(src: Path, dst: Path, sha: str) -> None:
    """Make ``dst`` (the shipped ``vae/``) hold the autoencoder the UNet is trained on (file by file,
    atomically), when the UNet was trained from a separate ``--vae`` folder."""
    weights = "diffusion_pytorch_model.safetensors"
    if src.resolve() == dst.resolve():
        return
    if (dst / weights).is_file() and _file_sha256(dst / weights) == sha:
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "recipe.json", weights):
        if (src / name).is_file():
            atomic_write_bytes(dst / name, (src / name).read_bytes())
            os.chmod(dst / name, 0o644)


def make_lr(x: torch.Tensor, gen: torch.Generator, noise_frac: float, noise_max: float) -> torch.Tensor:
    """4x4 block average, plus N(0, s^2) noise with s ~ U[0, noise_max] for a ``noise_frac`` share."""
    lr = block_downsample(x, 4)
    if noise_frac > 0 and noise_max > 0:
        n = x.shape[0]
        s = torch.rand(n, generator=gen) * noise_max
        s = torch.where(torch.rand(n, generator=gen) < noise_frac, s, torch.zeros_like(s))
        lr = lr + s.view(n, 1, 1, 1).to(lr.device) * torch.randn(lr.shape, generator=gen).to(lr.device)
    return lr


@torch.no_grad()
def validate_latent_unet(unet, vae, x: torch.Tensor, ac: torch.Tensor, device) -> dict:
    unet.eval()
    gen = torch.Generator().manual_seed(777)
    x = x.to(device)
    z = vae.encode(x).latent_dist.mean
    lr = block_downsample(x, 4)
    out = {}
    for t_val in (50, 250, 500, 800):
        noise = torch.randn(z.shape, generator=gen).to(device)
        a = ac[t_val].to(device)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        t = torch.full((z.shape[0],), t_val, device=device)
        eps = unet(torch.cat([zt, lr], 1), t).sample
        out[f"val_loss_t{t_val}"] = float(F.mse_loss(eps, noise))
        if t_val == 250:  # one-step x0 estimate from t=250, decoded
            z0 = (zt - (1 - a).sqrt() * eps) / a.sqrt()
            out["val_psnr_x0_t250"] = psnr(vae.decode(z0).sample, x)
    out["val_psnr_bicubic"] = psnr(F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False), x)
    return out


def train_latent_unet(
    data_dir,
    out_dir,
    run_dir,
    *,
    vae_dir=None,
    crop: int = 128,
    batch: int = 16,
    lr: float = 2e-4,
    warmup: int = 1000,
    steps: int = 300_000,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
    lr_noise_frac: float = 0.5,
    lr_noise_max: float = 0.1,
    channels=(64, 128, 128),
    layers_per_block: int = 2,
    attention: bool = False,
    norm_num_groups: int = 32,
    short_side=(192.0, 256.0),
    holdout_every: int = 28,
    val_size: int = 16,
    max_photos: int | None = None,
    ckpt_every_s: float = 300.0,
    ckpt_every_steps: int = 0,
    log_every: int = 50,
    max_minutes: float | None = None,
    resume: bool = False,
    threads: int = 1,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    progress_interval: float = 10.0,
) -> dict:
    """Stage 2. Reads the frozen autoencoder from ``vae_dir`` (default ``out_dir/vae``); exports the EMA
    UNet (fp16) to ``out_dir/unet`` at each checkpoint."""
    set_threads(threads)
    dev = resolve_device(device)
    if crop % 4:
        raise TrainingError(f"crop must be a multiple of 4, got {crop}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT_NAME
    if not resume and ckpt_path.exists():
        raise TrainingError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --run")
    if vae_dir is None:
        if out_dir is None:
            raise TrainingError("give vae_dir (or out_dir holding vae/)")
        vae_dir = Path(out_dir) / "vae"
    state = load_checkpoint(ckpt_path) if resume else None
    vae, vae_sha = load_frozen_vae(Path(vae_dir), dev)
    if state is not None and state.get("vae_sha256") not in (None, vae_sha):
        raise TrainingError(f"{vae_dir}: the autoencoder changed since this UNet run started (sha256 differs)")
    latent_channels = int(vae.config.latent_channels)
    photos, sampler, val_x = _setup(data_dir, crop, short_side, holdout_every, max_photos, val_size)

    torch.manual_seed(seed)
    model_cfg = dict(
        block_out_channels=list(channels), layers_per_block=layers_per_block, latent_channels=latent_channels,
        attention=attention, norm_num_groups=norm_num_groups, sample_size=crop // 4,
    )
    if state is not None:
        model_cfg = state["model_cfg"]
    model = build_latent_unet(**model_cfg).to(dev)
    ema = EMA(model, ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    np_rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        set_rng_state(np_rng, gen, state["rng"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        del state
    ema.model.to(dev)
    ac = ldm_alphas_cumprod()
    ac_dev = ac.to(dev)
    T = ac.shape[0]
    log = JsonlLog(run_dir / LOG_NAME)
    options = dict(
        crop=crop, batch=batch, lr=lr, warmup=warmup, grad_clip=grad_clip, ema_decay=ema_decay,
        lr_noise_frac=lr_noise_frac, lr_noise_max=lr_noise_max, short_side=list(short_side),
        holdout_every=holdout_every, seed=seed, threads=threads, device=str(dev), vae_sha256=vae_sha,
    )
    log.write(event="start", stage="unet", step=step, resume=bool(resume), options=options, model_cfg=model_cfg,
              params=param_count(model), photos=len(photos))
    hardware = hardware_string(dev, threads)
    last_val: dict = {}

    def step_fn(i: int):
        model.train()
        x = sampler.batch(batch, np_rng).to(dev)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        lr_img = make_lr(x, gen, lr_noise_frac, lr_noise_max)
        t = torch.randint(0, T, (batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen).to(dev)
        t = t.to(dev)
        a = ac_dev[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        cur_lr = lr_at(i, lr, warmup)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        loss = F.mse_loss(model(torch.cat([zt, lr_img], 1), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema.update(model)
        return float(loss.detach()), cur_lr

    def checkpoint_fn(i: int, el: float):
        save_checkpoint(
            ckpt_path,
            {
                "kind": "latent_unet", "model_cfg": model_cfg, "model": model.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "rng": rng_state(np_rng, gen), "step": i, "elapsed": el,
                "options": options, "vae_sha256": vae_sha,
            },
        )
        last_val.clear()
        if val_x is not None:
            last_val.update(validate_latent_unet(ema.model, vae, val_x, ac, dev))
        log.write(event="checkpoint", step=i, elapsed=round(el, 1), **{k: _fmt(v) for k, v in last_val.items()})
        if out_dir is not None:
            out = Path(out_dir)
            _write_folder_meta(out)
            save_diffusers_fp16(ema.model, out / "unet")
            _sync_vae(Path(vae_dir), out / "vae", vae_sha)
            recipe = {
                "class": "UNet2DModel, eps prediction, input cat([z_t, lr], 1) (latent first), "
                + ("mid-block attention" if model_cfg["attention"] else "no attention"),
                "architecture": f"block_out_channels {tuple(model_cfg['block_out_channels'])}, layers_per_block "
                f"{model_cfg['layers_per_block']}, norm groups {model_cfg['norm_num_groups']}, scale_shift",
                "parameters": f"{param_count(ema.model) / 1e6:.2f} M",
                "autoencoder": f"vae/ frozen (sha256 {vae_sha[:16]}...), z = posterior mean",
                "data": f"{len(photos)} photos of {Path(data_dir).name}/ (every {holdout_every}th held out), random "
                f"{crop}x{crop} crops of the photo rescaled to a short side uniform in {list(short_side)}, h-flips",
                "conditioning": f"lr = 4x4 block average of x (sr4), + N(0, s^2) noise, s ~ U[0, {lr_noise_max:g}], "
                f"for {lr_noise_frac:.0%} of samples",
                "objective": "MSE on eps, t uniform on [0, 1000), LDM schedule (sqrt-linear 0.0015..0.0155)",
                "optimiser": f"AdamW lr {lr:g} (warm-up {warmup}), batch {batch}, clip {grad_clip:g}, EMA {ema_decay}",
                "steps": i,
                "wall time": f"{fmt_hours(el)} on {hardware}",
                "held-out validation": ", ".join(f"{k} {v:.4f}" for k, v in last_val.items()),
            }
            atomic_write_json(out / "unet" / "recipe.json", recipe)
            _write_readme(out)

    result = run_loop(
        start_step=step, steps=steps, elapsed_before=elapsed, step_fn=step_fn, checkpoint_fn=checkpoint_fn,
        log=log, log_every=log_every, ckpt_every_s=ckpt_every_s, ckpt_every_steps=ckpt_every_steps,
        max_minutes=max_minutes, progress=progress, progress_interval=progress_interval, desc="latent-unet",
    )
    log.write(event="stop", **{k: _fmt(v) for k, v in result.items()})
    result["val"] = dict(last_val)
    return result


def train_latent_sr(stage: str, data_dir, out_dir, run_dir, **kw) -> dict:
    """``stage`` is 'autoencoder' or 'unet'."""
    if stage == "autoencoder":
        return train_autoencoder(data_dir, out_dir, run_dir, **kw)
    if stage == "unet":
        return train_latent_unet(data_dir, out_dir, run_dir, **kw)
    raise TrainingError(f"unknown stage {stage!r} (use autoencoder or unet)")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffrestore.training.latent_sr", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["autoencoder", "unet"])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=None, help="model folder (hub layout) to export vae/ or unet/ into")
    p.add_argument("--run", required=True, help="folder for the full checkpoint and log.jsonl")
    p.add_argument("--vae", default=None, help="(unet) autoencoder folder; default OUT/vae")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--crop", type=int, default=None, help="default 64 (autoencoder), 128 (unet)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=300_000)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--channels", type=_ints, default=None)
    p.add_argument("--layers-per-block", type=int, default=None)
    p.add_argument("--norm-groups", type=int, default=None)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="(autoencoder)")
    p.add_argument("--mse-weight", type=float, default=1.0, help="(autoencoder)")
    p.add_argument("--logvar-init", type=float, default=-6.0, help="(autoencoder) initial posterior log-variance")
    p.add_argument("--lr-noise-frac", type=float, default=0.5, help="(unet)")
    p.add_argument("--lr-noise-max", type=float, default=0.1, help="(unet)")
    p.add_argument("--attention", action="store_true", help="(unet) mid-block attention")
    p.add_argument("--holdout-every", type=int, default=28)
    p.add_argument("--ckpt-every-s", type=float, default=300.0)
    p.add_argument("--ckpt-every-steps", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--progress-interval", type=float, default=10.0)
    return p


def main(argv=None) -> int:
    a = parse_with_resume_defaults(build_parser(), argv, rename={"ema_decay": "ema"})
    kw = dict(
        batch=a.batch, lr=a.lr, steps=a.steps, grad_clip=a.grad_clip, ema_decay=a.ema,
        holdout_every=a.holdout_every, ckpt_every_s=a.ckpt_every_s, ckpt_every_steps=a.ckpt_every_steps,
        log_every=a.log_every, max_minutes=a.max_minutes, resume=a.resume, threads=a.threads, device=a.device,
        seed=a.seed, progress=not a.no_progress, progress_interval=a.progress_interval,
    )
    for name, val in (("crop", a.crop), ("warmup", a.warmup), ("channels", a.channels),
                      ("layers_per_block", a.layers_per_block), ("norm_num_groups", a.norm_groups)):
        if val is not None:
            kw[name] = val
    if a.stage == "autoencoder":
        kw.update(kl_weight=a.kl_weight, mse_weight=a.mse_weight, logvar_init=a.logvar_init)
    else:
        kw.update(lr_noise_frac=a.lr_noise_frac, lr_noise_max=a.lr_noise_max, attention=a.attention, vae_dir=a.vae)
    try:
        r = train_latent_sr(a.stage, a.data, a.out, a.run, **kw)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
