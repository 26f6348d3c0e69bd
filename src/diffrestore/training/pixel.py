"""Train the built-in pixel prior: an epsilon-prediction diffusers ``UNet2DModel`` on the ADM schedule.

Random crops of the training photos (:mod:`.data`), t uniform on [0, 1000) except a ``t_low_frac``
share on [0, ``t_low_max``) (restoration needs accurate denoising at low noise), MSE on eps; the EMA
weights are exported in fp16 with their schedule and a README::

    python -m diffrestore.training.pixel --data PHOTOS --out MODEL --run RUN [--resume]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..metrics.quality import psnr
from ..priors.base import adm_alphas_cumprod
from .checkpoints import TrainingError
from .data import load_training_data
from .model_folder import fmt_hours, save_diffusers_fp16, write_model_json, write_model_text
from .networks import param_count, unet2d
from .options import LoopOptions, add_loop_arguments, check_architecture, cli_main, int_list
from .trainer import Trainer

ADM_SCHEDULE = {
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def ddpm_scheduler_config() -> dict:
    """diffusers DDPMScheduler config of the ADM training schedule (read by the folder loader)."""
    import diffusers

    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": diffusers.__version__,
        **ADM_SCHEDULE,
        "clip_sample": True,
        "variance_type": "fixed_small",
    }


def build_pixel_unet(
    block_out_channels=(16, 32, 64, 128),
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 8,
    sample_size: int = 64,
):
    """A fully-convolutional (optionally: attention in the mid block only) 3 -> 3 channel UNet2DModel."""
    return unet2d(3, 3, block_out_channels, layers_per_block, attention, norm_num_groups, sample_size)


def sample_timesteps(n: int, T: int, gen: torch.Generator, low_frac: float, low_max: int) -> torch.Tensor:
    """Uniform on [0, T), except that a ``low_frac`` share is uniform on [0, low_max)."""
    t = torch.randint(0, T, (n,), generator=gen)
    if low_frac > 0:
        low = torch.randint(0, max(1, min(low_max, T)), (n,), generator=gen)
        pick = torch.rand(n, generator=gen) < low_frac
        t = torch.where(pick, low, t)
    return t


@torch.no_grad()
def validate_pixel(model, x: torch.Tensor, alphas_cumprod: torch.Tensor, device) -> dict:
    """Eps loss at fixed t (fixed noise) and one-step denoising PSNR at sigma 0.1 on held-out crops."""
    model.eval()
    gen = torch.Generator().manual_seed(777)
    x = x.to(device)
    out = {}
    for t_val in (20, 100, 250, 500, 800):
        noise = torch.randn(x.shape, generator=gen).to(device)
        a = alphas_cumprod[t_val].to(device)
        xt = a.sqrt() * x + (1 - a).sqrt() * noise
        t = torch.full((x.shape[0],), t_val, device=device)
        out[f"val_loss_t{t_val}"] = float(F.mse_loss(model(xt, t).sample.float(), noise))
    sigma = 0.1
    sig_t = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    t_star = int((sig_t - sigma).abs().argmin())
    a = alphas_cumprod[t_star].to(device)
    noise = torch.randn(x.shape, generator=gen).to(device)
    y = x + sigma * noise
    xt = a.sqrt() * y  # noise std sqrt(a) * sigma ~= sqrt(1 - a)
    t = torch.full((x.shape[0],), t_star, device=device)
    eps = model(xt, t).sample.float()
    x0 = (xt - (1 - a).sqrt() * eps) / a.sqrt()
    out["val_psnr_noisy_s0.1"] = float(psnr(y, x).mean())
    out["val_psnr_denoised_s0.1"] = float(psnr(x0, x).mean())
    return out


def _pixel_step(tr: Trainer, model, sampler, ac: torch.Tensor, t_low_frac: float, t_low_max: int):
    """The step function: noise a batch of crops at :func:`sample_timesteps`, regress the noise."""
    dev, batch = tr.device, tr.loop.batch
    ac_dev = ac.to(dev)
    T = ac.shape[0]

    def step_fn(i: int):
        model.train()
        x0 = sampler.batch(batch, tr.np_rng).to(dev)
        t = sample_timesteps(batch, T, tr.gen, t_low_frac, t_low_max)
        noise = torch.randn(x0.shape, generator=tr.gen).to(dev)
        t = t.to(dev)
        a = ac_dev[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with tr.autocast():
            pred = model(xt, t).sample
        return tr.optimize(i, F.mse_loss(pred.float(), noise))

    return step_fn


def train_pixel(
    data_dir: str | Path,
    out_dir: str | Path | None,
    run_dir: str | Path,
    *,
    crop: int = 64,
    weight_decay: float = 0.0,
    t_low_frac: float = 0.25,
    t_low_max: int = 300,
    channels: tuple[int, ...] = (16, 32, 64, 128),
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 8,
    short_side: tuple[float, float] = (192.0, 256.0),
    val_size: int = 16,
    max_photos: int | None = None,
    validate: bool = True,
    loop: LoopOptions | None = None,
    **loop_options,
) -> dict:
    """Train (or, with ``resume``, continue training) the pixel prior; returns {"step", "loss", ...}.

    The loop options (steps, batch, lr, warmup, grad_clip, ema_decay, holdout_every, ckpt_every_s, resume,
    threads, device, seed, ...) are those of :class:`LoopOptions`, as ``loop=`` and/or keywords.
    Full checkpoints go to ``run_dir/checkpoint.pt``; the EMA weights are exported in fp16 to
    ``out_dir`` (a diffusers UNet2DModel folder plus ``diffrestore.json`` and ``README.md``) at each
    checkpoint. ``out_dir=None`` skips the export.
    """
    loop = LoopOptions.resolve(loop, loop_options)
    if not (0.0 <= t_low_frac <= 1.0) or not (weight_decay >= 0.0):
        raise TrainingError(f"--t-low-frac {t_low_frac} must be in [0, 1] and --weight-decay {weight_decay} >= 0")
    tr = Trainer(run_dir, loop, "pixel", out_dir)
    dev = tr.device
    model_cfg = tr.model_config(dict(
        block_out_channels=list(channels),
        layers_per_block=layers_per_block,
        attention=attention,
        norm_num_groups=norm_num_groups,
        sample_size=crop,
    ))  # fmt: skip
    check_architecture(crop, model_cfg.get("block_out_channels", ()), model_cfg.get("norm_num_groups", 0))
    photos, sampler, val_x = load_training_data(
        data_dir, crop, short_side, loop.holdout_every, max_photos, val_size if validate else 0
    )
    model = tr.build_model(build_pixel_unet, model_cfg, weight_decay=weight_decay)
    model_cfg = tr.model_cfg

    ac = adm_alphas_cumprod(ADM_SCHEDULE["beta_start"], ADM_SCHEDULE["beta_end"], ADM_SCHEDULE["num_train_timesteps"])
    options = tr.options(
        crop=crop, weight_decay=weight_decay, t_low_frac=t_low_frac, t_low_max=t_low_max, short_side=list(short_side)
    )
    tr.log_start(options, photos=len(photos))
    step_fn = _pixel_step(tr, model, sampler, ac, t_low_frac, t_low_max)
    last_val: dict = {}

    def checkpoint_fn(i: int, el: float):
        val_fn = None if val_x is None else (lambda: validate_pixel(tr.ema.model, val_x, ac, dev))
        tr.save_and_validate(i, el, "pixel", options, last_val, val_fn)
        if out_dir is not None:
            export_pixel(tr.ema.model, out_dir, step=i, elapsed=el, options=options, model_cfg=model_cfg,
                         hardware=tr.hardware, n_photos=len(photos), val=dict(last_val), data_dir=data_dir,
                         lr_schedule=tr.lr_schedule(), precision=tr.precision_history())

    return tr.train(step_fn, checkpoint_fn, desc="pixel", val=last_val)


def export_pixel(
    model, out_dir, *, step, elapsed, options, model_cfg, hardware, n_photos, val, data_dir, lr_schedule, precision
) -> None:
    """EMA weights in fp16 (diffusers folder) + diffrestore.json (schedule) + README.md (recipe)."""
    out_dir = Path(out_dir)
    save_diffusers_fp16(model, out_dir)
    n_down = len(model_cfg["block_out_channels"]) - 1
    meta = {
        "kind": "pixel",
        "class": "UNet2DModel",
        "scheduler": {"_class_name": "DDPMScheduler", **ADM_SCHEDULE},
        "multiple_of": 2**n_down,
        "image_size": options["crop"],
        "value_range": [-1, 1],
        "dtype": "float16",
        "train_steps": step,
        "train_wall_hours": round(elapsed / 3600, 3),
        "validation": {k: round(v, 5) for k, v in val.items()},
    }
    write_model_json(out_dir / "diffrestore.json", meta)
    write_model_json(out_dir / "scheduler_config.json", ddpm_scheduler_config())
    params = param_count(model)
    val_lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(val.items())) or "| (none yet) | |"
    readme = f"""# {out_dir.name}: built-in pixel-space diffusion prior

Unconditional epsilon-prediction `diffusers.UNet2DModel` (EMA weights, fp16 safetensors), trained from
scratch by `diffrestore.training.pixel`. Images in [-1, 1], RGB, any size that is a multiple of
{2**n_down} (fully convolutional{', attention in the mid block' if model_cfg['attention'] else ', no attention'}).

* Schedule (ADM / DDPM linear): betas linear from 1e-4 to 0.02 over 1000 steps (also in `diffrestore.json`).
* Architecture: block_out_channels {tuple(model_cfg['block_out_channels'])}, layers_per_block
  {model_cfg['layers_per_block']}, norm groups {model_cfg['norm_num_groups']}, resnet_time_scale_shift
  scale_shift; {params / 1e6:.2f} M parameters.
* Data: {n_photos} photos from `{Path(data_dir).name}/` (shared training set, short side 256; every
  {options['holdout_every']}th photo in sorted order held out for validation), random {options['crop']}x{options['crop']}
  crops from the photo rescaled to a short side uniform in {options['short_side']} (bicubic, antialiased),
  random horizontal flips.
* Objective: MSE on eps; t uniform on [0, 1000) except a {options['t_low_frac']:.0%} share uniform on
  [0, {options['t_low_max']}).
* Optimiser: AdamW {lr_schedule}, weight decay
  {options['weight_decay']:g}, batch {options['batch']}, grad-norm clip {options['grad_clip']:g}; EMA decay
  {options['ema_decay']} (warm-up min(decay, (1+n)/(10+n))); seed {options['seed']}.
* Arithmetic: {precision}.
* Trained so far: {step:,} steps, {fmt_hours(elapsed)} wall time on {hardware}.

Validation on {options['crop']}px held-out crops (EMA weights; one-step denoising at sigma 0.1 in [-1,1] units):

| metric | value |
|---|---|
{val_lines}
"""
    write_model_text(out_dir / "README.md", readme)


def build_parser(parser_class=argparse.ArgumentParser, prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's command line (``parser_class`` and ``prog``: the ``diffrestore train`` command's own)."""
    p = parser_class(prog=prog or "python -m diffrestore.training.pixel", description=__doc__.splitlines()[0])
    add_loop_arguments(p, data_help="folder of training photos", out_help="model folder to export the EMA fp16 weights to")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--t-low-frac", type=float, default=0.25)
    p.add_argument("--t-low-max", type=int, default=300)
    p.add_argument("--channels", type=int_list, default=(16, 32, 64, 128), help="e.g. 16,32,64,128")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention", action="store_true", help="self-attention in the mid block")
    p.add_argument("--norm-groups", type=int, default=8)
    return p


def main(argv=None, parser_class=argparse.ArgumentParser, prog: str | None = None) -> int:
    return cli_main(build_parser(parser_class, prog), argv, lambda a, loop: train_pixel(
        a.data, a.out, a.run, crop=a.crop, weight_decay=a.weight_decay, t_low_frac=a.t_low_frac,
        t_low_max=a.t_low_max, channels=a.channels, layers_per_block=a.layers_per_block, attention=a.attention,
        norm_num_groups=a.norm_groups, **loop,
    ))


if __name__ == "__main__":
    sys.exit(main())
