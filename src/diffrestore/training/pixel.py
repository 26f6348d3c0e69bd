"""Train the built-in pixel prior: an epsilon-prediction diffusers ``UNet2DModel`` on the ADM schedule.

Recipe: random ``crop`` x ``crop`` patches (photos virtually rescaled to a short side in [192, 256],
random horizontal flip), x in [-1, 1]; t drawn uniformly from [0, 1000) with an extra share
(``t_low_frac``) drawn uniformly from [0, ``t_low_max``) where restoration needs accurate denoising;
x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps; loss = MSE(eps_hat, eps). AdamW with linear warm-up,
gradient clipping, EMA of the weights (exported in fp16).

Launch / resume::

    PYTHONPATH=src nice -n 10 python -m diffrestore.training.pixel --data /work/shared/data/train \\
        --out src/diffrestore/priors/builtin/pixel-s --run train_runs/pixel-s [--resume]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..priors.base import alphas_cumprod_from_betas, linear_betas
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
from .data import CropSampler, fixed_batch, list_photos, load_photos, split_photos

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
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(int(c) for c in block_out_channels),
        layers_per_block=int(layers_per_block),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        add_attention=bool(attention),
        norm_num_groups=int(norm_num_groups),
        resnet_time_scale_shift="scale_shift",
    )


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
    out["val_psnr_noisy_s0.1"] = psnr(y, x)
    out["val_psnr_denoised_s0.1"] = psnr(x0, x)
    return out


def train_pixel(
    data_dir: str | Path,
    out_dir: str | Path | None,
    run_dir: str | Path,
    *,
    crop: int = 64,
    batch: int = 16,
    lr: float = 2e-4,
    warmup: int = 1000,
    steps: int = 300_000,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
    t_low_frac: float = 0.25,
    t_low_max: int = 300,
    channels: tuple[int, ...] = (16, 32, 64, 128),
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 8,
    short_side: tuple[float, float] = (192.0, 256.0),
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
    validate: bool = True,
) -> dict:
    """Train (or, with ``resume``, continue training) the pixel prior; returns {"step", "loss", ...}.

    Full checkpoints go to ``run_dir/checkpoint.pt``; the EMA weights are exported in fp16 to
    ``out_dir`` (a diffusers UNet2DModel folder plus ``diffrestore.json`` and ``README.md``) at each
    checkpoint. ``out_dir=None`` skips the export.
    """
    set_threads(threads)
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT_NAME
    if not resume and ckpt_path.exists():
        raise TrainingError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --run")

    files = list_photos(data_dir)
    train_files, held_files = split_photos(files, holdout_every)
    photos = load_photos(train_files, limit=max_photos)
    sampler = CropSampler(photos, crop, short_side=short_side)
    val_x = None
    if validate and held_files:
        held = load_photos(held_files, limit=max_photos)
        val_x = fixed_batch(CropSampler(held, crop, short_side=short_side), val_size)

    torch.manual_seed(seed)
    model_cfg = dict(
        block_out_channels=list(channels),
        layers_per_block=layers_per_block,
        attention=attention,
        norm_num_groups=norm_num_groups,
        sample_size=crop,
    )
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        model_cfg = state["model_cfg"]
    model = build_pixel_unet(**model_cfg).to(dev)
    ema = EMA(model, ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
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

    ac = alphas_cumprod_from_betas(
        linear_betas(ADM_SCHEDULE["beta_start"], ADM_SCHEDULE["beta_end"], ADM_SCHEDULE["num_train_timesteps"])
    )
    ac_dev = ac.to(dev)
    T = ac.shape[0]
    log = JsonlLog(run_dir / LOG_NAME)
    options = dict(
        crop=crop, batch=batch, lr=lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
        ema_decay=ema_decay, t_low_frac=t_low_frac, t_low_max=t_low_max, short_side=list(short_side),
        holdout_every=holdout_every, seed=seed, threads=threads, device=str(dev),
    )
    log.write(event="start", step=step, resume=bool(resume), options=options, model_cfg=model_cfg,
              params=param_count(model), photos=len(photos))
    hardware = hardware_string(dev, threads)
    last_val: dict = {}

    def step_fn(i: int):
        model.train()
        x0 = sampler.batch(batch, np_rng).to(dev)
        t = sample_timesteps(batch, T, gen, t_low_frac, t_low_max)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = t.to(dev)
        a = ac_dev[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cur_lr = lr_at(i, lr, warmup)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        loss = F.mse_loss(model(xt, t).sample, noise)
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
                "kind": "pixel",
                "model_cfg": model_cfg,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "rng": rng_state(np_rng, gen),
                "step": i,
                "elapsed": el,
                "options": options,
            },
        )
        if val_x is not None:
            last_val.clear()
            last_val.update(validate_pixel(ema.model, val_x, ac, dev))
            log.write(event="checkpoint", step=i, elapsed=round(el, 1), **{k: round(v, 5) for k, v in last_val.items()})
        else:
            log.write(event="checkpoint", step=i, elapsed=round(el, 1))
        if out_dir is not None:
            export_pixel(ema.model, out_dir, step=i, elapsed=el, options=options, model_cfg=model_cfg,
                         hardware=hardware, n_photos=len(photos), val=dict(last_val), data_dir=data_dir)

    result = run_loop(
        start_step=step, steps=steps, elapsed_before=elapsed, step_fn=step_fn, checkpoint_fn=checkpoint_fn,
        log=log, log_every=log_every, ckpt_every_s=ckpt_every_s, ckpt_every_steps=ckpt_every_steps,
        max_minutes=max_minutes, progress=progress, progress_interval=progress_interval, desc="pixel",
    )
    log.write(event="stop", **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()})
    result["val"] = dict(last_val)
    return result


def export_pixel(model, out_dir, *, step, elapsed, options, model_cfg, hardware, n_photos, val, data_dir) -> None:
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
    atomic_write_json(out_dir / "diffrestore.json", meta)
    atomic_write_json(out_dir / "scheduler_config.json", ddpm_scheduler_config())
    params = param_count(model)
    val_lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(val.items())) or "| (none yet) | |"
    readme = f"""# pixel-s: built-in pixel-space diffusion prior

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
* Optimiser: AdamW lr {options['lr']:g} (linear warm-up {options['warmup']} steps, then constant), weight decay
  {options['weight_decay']:g}, batch {options['batch']}, grad-norm clip {options['grad_clip']:g}; EMA decay
  {options['ema_decay']} (warm-up min(decay, (1+n)/(10+n))); seed {options['seed']}.
* Trained so far: {step} steps, {fmt_hours(elapsed)} wall time on {hardware}.

Validation on {options['crop']}px held-out crops (EMA weights; one-step denoising at sigma 0.1 in [-1,1] units):

| metric | value |
|---|---|
{val_lines}
"""
    atomic_write_text(out_dir / "README.md", readme)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffrestore.training.pixel", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder of training photos")
    p.add_argument("--out", default=None, help="model folder to export the EMA fp16 weights to")
    p.add_argument("--run", required=True, help="folder for the full checkpoint and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--steps", type=int, default=300_000, help="total steps (stop there)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    p.add_argument("--t-low-frac", type=float, default=0.25)
    p.add_argument("--t-low-max", type=int, default=300)
    p.add_argument("--channels", type=_ints, default=(16, 32, 64, 128), help="e.g. 16,32,64,128")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention", action="store_true", help="self-attention in the mid block")
    p.add_argument("--norm-groups", type=int, default=8)
    p.add_argument("--holdout-every", type=int, default=28)
    p.add_argument("--ckpt-every-s", type=float, default=300.0)
    p.add_argument("--ckpt-every-steps", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress-bar updates")
    return p


def main(argv=None) -> int:
    a = parse_with_resume_defaults(build_parser(), argv, rename={"ema_decay": "ema"})
    try:
        r = train_pixel(
            a.data, a.out, a.run, crop=a.crop, batch=a.batch, lr=a.lr, warmup=a.warmup, steps=a.steps,
            weight_decay=a.weight_decay, grad_clip=a.grad_clip, ema_decay=a.ema, t_low_frac=a.t_low_frac,
            t_low_max=a.t_low_max, channels=a.channels, layers_per_block=a.layers_per_block,
            attention=a.attention, norm_num_groups=a.norm_groups, holdout_every=a.holdout_every,
            ckpt_every_s=a.ckpt_every_s, ckpt_every_steps=a.ckpt_every_steps, log_every=a.log_every,
            max_minutes=a.max_minutes, resume=a.resume, threads=a.threads, device=a.device, seed=a.seed,
            progress=not a.no_progress, progress_interval=a.progress_interval,
        )
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in r.items()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
