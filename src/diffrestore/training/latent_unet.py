"""Latent-SR stage ``unet``: a UNet2DModel on ``cat([z_t, lr], 1)`` in the latent space of a frozen,
exported autoencoder (z = posterior mean), LDM schedule, uniform t, MSE on eps (or v).

The conditioning ``lr`` is the 4x4 block average of the photo (the sr4 operator the methods invert),
with Gaussian noise of a random level added to a share of the samples so the prior also serves noisy
inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..metrics.quality import psnr
from ..priors.base import PREDICTION_TYPES, eps_from_v, ldm_alphas_cumprod
from .autoencoder import load_frozen_vae
from .checkpoints import TrainingError
from .data import block_downsample, load_training_data
from .encoded_photos import load_or_encode_photos
from .model_folder import describe_data, export_ldm_stage, fmt_hours
from .networks import param_count, unet2d
from .options import LoopOptions, check_architecture
from .trainer import Trainer


def build_latent_unet(
    block_out_channels=(64, 128, 128),
    layers_per_block: int = 2,
    latent_channels: int = 3,
    attention: bool = False,
    norm_num_groups: int = 32,
    sample_size: int = 32,
):
    """(latent + RGB low-res) -> latent eps UNet2DModel, fully convolutional unless ``attention``."""
    c = int(latent_channels)
    return unet2d(c + 3, c, block_out_channels, layers_per_block, attention, norm_num_groups, sample_size)


def target_of(prediction: str, z0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The regression target: ``noise`` (epsilon) or ``v = sqrt(a) noise - sqrt(1 - a) z0`` (v_prediction)."""
    if prediction == "epsilon":
        return noise
    return a.sqrt() * noise - (1 - a).sqrt() * z0


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
def validate_latent_unet(unet, vae, x: torch.Tensor, ac: torch.Tensor, device, prediction: str = "epsilon") -> dict:
    """Eps loss at fixed t (fixed noise), the decoded one-step x0 estimate's PSNR from t=250, and the
    bicubic upsampling's PSNR, on held-out crops."""
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
        if prediction == "v_prediction":
            eps = eps_from_v(eps, zt, a)
        out[f"val_loss_t{t_val}"] = float(F.mse_loss(eps, noise))
        if t_val == 250:  # one-step x0 estimate from t=250, decoded
            z0 = (zt - (1 - a).sqrt() * eps) / a.sqrt()
            out["val_psnr_x0_t250"] = float(psnr(vae.decode(z0).sample, x).mean())
    bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    out["val_psnr_bicubic"] = float(psnr(bicubic, x).mean())
    return out


def _latent_unet_step(tr: Trainer, model, vae, sampler, encoded, ac: torch.Tensor, crop: int, lr_noise_frac: float,
                      lr_noise_max: float, prediction: str):
    """The step function: noise the latent of a crop at a uniform t, regress ``target_of(prediction)``."""
    dev, batch = tr.device, tr.loop.batch
    ac_dev = ac.to(dev)
    T = ac.shape[0]

    def step_fn(i: int):
        model.train()
        if encoded is not None:
            x, z = (v.to(dev) for v in encoded.batch(batch, crop, tr.np_rng))
        else:
            x = sampler.batch(batch, tr.np_rng).to(dev)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean
        lr_img = make_lr(x, tr.gen, lr_noise_frac, lr_noise_max)
        t = torch.randint(0, T, (batch,), generator=tr.gen)
        noise = torch.randn(z.shape, generator=tr.gen).to(dev)
        t = t.to(dev)
        a = ac_dev[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        with tr.autocast():
            out = model(torch.cat([zt, lr_img], 1), t).sample
        return tr.optimize(i, F.mse_loss(out.float(), target_of(prediction, z, noise, a)))

    return step_fn


def _latent_unet_recipe(tr: Trainer, step: int, elapsed: float, val: dict, vae_sha: str, data: str, *,
                        lr_noise_frac: float, lr_noise_max: float, prediction: str) -> dict:
    cfg = tr.model_cfg
    eps = prediction == "epsilon"
    return {
        "class": f"UNet2DModel, {'eps' if eps else 'v'} prediction, input cat([z_t, lr], 1) (latent first), "
        + ("mid-block attention" if cfg["attention"] else "no attention"),
        "architecture": f"block_out_channels {tuple(cfg['block_out_channels'])}, layers_per_block "
        f"{cfg['layers_per_block']}, norm groups {cfg['norm_num_groups']}, scale_shift",
        "parameters": f"{param_count(tr.ema.model) / 1e6:.2f} M",
        "autoencoder": f"vae/ frozen (sha256 {vae_sha[:16]}...), z = posterior mean",
        "data": data,
        "conditioning": f"lr = 4x4 block average of x (sr4), + N(0, s^2) noise, s ~ U[0, {lr_noise_max:g}], "
        f"for {lr_noise_frac:.0%} of samples",
        "objective": f"MSE on {'eps' if eps else 'v = sqrt(a) eps - sqrt(1-a) z0'}, "
        "t uniform on [0, 1000), LDM schedule (sqrt-linear 0.0015..0.0155)",
        "optimiser": tr.optimiser_summary(),
        "steps": step,
        "wall time": f"{fmt_hours(elapsed)} on {tr.hardware}",
        "held-out validation": ", ".join(f"{k} {v:.4f}" for k, v in val.items()),
    }


def _frozen_vae_of_run(tr: Trainer, vae_dir, out_dir):
    """(autoencoder folder, the frozen autoencoder, its sha256); refused if a resumed run's changed."""
    if vae_dir is None:
        if out_dir is None:
            raise TrainingError("give vae_dir (or out_dir holding vae/)")
        vae_dir = Path(out_dir) / "vae"
    vae, vae_sha = load_frozen_vae(Path(vae_dir), tr.device)
    if tr.resumed is not None and tr.resumed.get("vae_sha256") not in (None, vae_sha):
        raise TrainingError(f"{vae_dir}: the autoencoder changed since this UNet run started (sha256 differs)")
    return vae_dir, vae, vae_sha


def train_latent_unet(
    data_dir,
    out_dir,
    run_dir,
    *,
    vae_dir=None,
    crop: int = 128,
    lr_noise_frac: float = 0.5,
    lr_noise_max: float = 0.1,
    channels=(64, 128, 128),
    layers_per_block: int = 2,
    attention: bool = False,
    norm_num_groups: int = 32,
    short_side=(192.0, 256.0),
    encoded_sides=None,
    prediction: str = "epsilon",
    val_size: int = 16,
    max_photos: int | None = None,
    loop: LoopOptions | None = None,
    **loop_options,
) -> dict:
    """Stage ``unet``. Reads the frozen autoencoder from ``vae_dir`` (default ``out_dir/vae``); exports the
    EMA UNet (fp16) to ``out_dir/unet`` at each checkpoint. Loop options: :class:`LoopOptions`.

    ``encoded_sides`` (e.g. ``(256, 192)``): train on crops of whole photos encoded once at these short
    sides (:class:`EncodedPhotos`) instead of encoding random rescaled crops at every step.
    ``prediction``: "epsilon" or "v_prediction" (the network's target; written to the scheduler config).
    """
    loop = LoopOptions.resolve(loop, loop_options)
    if prediction not in PREDICTION_TYPES:
        raise TrainingError(f"prediction must be {' or '.join(PREDICTION_TYPES)}, got {prediction!r}")
    if encoded_sides is not None and min(encoded_sides) < crop:
        raise TrainingError(f"encoded short sides {list(encoded_sides)} must be >= the crop {crop}")
    tr = Trainer(run_dir, loop, "latent_unet", out_dir)
    dev = tr.device
    vae_dir, vae, vae_sha = _frozen_vae_of_run(tr, vae_dir, out_dir)
    model_cfg = tr.model_config(dict(
        block_out_channels=list(channels), layers_per_block=layers_per_block,
        latent_channels=int(vae.config.latent_channels), attention=attention, norm_num_groups=norm_num_groups,
        sample_size=crop // 4,
    ))  # fmt: skip
    check_architecture(crop, model_cfg.get("block_out_channels", ()), model_cfg.get("norm_num_groups", 0), scale=4)
    photos, sampler, val_x = load_training_data(data_dir, crop, short_side, loop.holdout_every, max_photos, val_size)
    encoded = None
    if encoded_sides is not None:
        encoded = load_or_encode_photos(tr.run_dir, photos, vae, vae_sha, encoded_sides, dev, loop.seed)
    model = tr.build_model(build_latent_unet, model_cfg)
    ac = ldm_alphas_cumprod()
    options = tr.options(
        crop=crop, lr_noise_frac=lr_noise_frac, lr_noise_max=lr_noise_max, short_side=list(short_side),
        encoded_sides=None if encoded_sides is None else [int(v) for v in encoded_sides], prediction=prediction,
    )
    options["vae_sha256"] = vae_sha
    tr.log_start(options, stage="unet", photos=len(photos))
    step_fn = _latent_unet_step(tr, model, vae, sampler, encoded, ac, crop, lr_noise_frac, lr_noise_max, prediction)
    data = describe_data(len(photos), data_dir, loop.holdout_every, crop, short_side, encoded_sides)
    last_val: dict = {}

    def checkpoint_fn(i: int, el: float):
        val_fn = None if val_x is None else (
            lambda: validate_latent_unet(tr.ema.model, vae, val_x, ac, dev, prediction)
        )
        tr.save_and_validate(i, el, "latent_unet", options, last_val, val_fn, vae_sha256=vae_sha)
        if out_dir is not None:
            recipe = _latent_unet_recipe(tr, i, el, last_val, vae_sha, data, lr_noise_frac=lr_noise_frac,
                                         lr_noise_max=lr_noise_max, prediction=prediction)
            export_ldm_stage(Path(out_dir), "unet", tr.ema.model, recipe, prediction, vae=(Path(vae_dir), vae_sha))

    return tr.train(step_fn, checkpoint_fn, desc="latent-unet", ndigits=5, val=last_val)
