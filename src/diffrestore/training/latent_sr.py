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

Stage ``decoder`` (optional): fine-tune the decoder of a trained autoencoder with its encoder frozen, so
every UNet trained on its latent space stays valid (:func:`train_decoder`).

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

from ..image_io import atomic_path, atomic_write_bytes
from ..priors._files import from_pretrained
from ..priors.base import PREDICTION_TYPES, PriorLoadError, alphas_cumprod_from_betas, eps_from_v
from .common import (
    LoopOptions,
    Trainer,
    TrainingError,
    add_loop_arguments,
    atomic_write_json,
    atomic_write_text,
    check_architecture,
    cli_main,
    fmt_hours,
    int_list,
    param_count,
    psnr,
    save_diffusers_fp16,
    unet2d,
)
from .data import block_downsample, fixed_batch, load_training_data

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
    c = int(latent_channels)
    return unet2d(c + 3, c, block_out_channels, layers_per_block, attention, norm_num_groups, sample_size)


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


def _write_folder_meta(out_dir: Path, prediction: str = "epsilon") -> None:
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
        {**LDM_SCHEDULER, "prediction_type": prediction, "_diffusers_version": diffusers.__version__},
    )


def _write_readme(out_dir: Path) -> None:
    """README.md from the recipe records of the two stages (``vae/recipe.json``, ``unet/recipe.json``)."""
    parts = [
        f"# {out_dir.name}: built-in latent super-resolution prior (x4)\n",
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
    kl_weight: float = 1e-6,
    mse_weight: float = 1.0,
    logvar_init: float = -6.0,
    channels=(32, 64, 128),
    layers_per_block: int = 1,
    latent_channels: int = 3,
    norm_num_groups: int = 16,
    short_side=(192.0, 256.0),
    val_size: int = 32,
    stats_size: int = 128,
    max_photos: int | None = None,
    loop: LoopOptions | None = None,
    **loop_options,
) -> dict:
    """Stage 1. Exports the normalised EMA autoencoder (fp16) to ``out_dir/vae`` at each checkpoint.

    Loop options: :class:`LoopOptions` (here warmup 500 and steps 200,000 by default)."""
    loop = LoopOptions.resolve(loop, loop_options, warmup=500, steps=200_000)
    tr = Trainer(run_dir, loop, "autoencoder", out_dir)
    dev = tr.device
    if out_dir is not None and (Path(out_dir) / "unet" / "config.json").is_file():
        raise TrainingError(
            f"{out_dir}: a latent UNet was trained on this folder's vae/; exporting a new autoencoder would "
            "invalidate it (export to another --out, then retrain the unet stage on it)"
        )
    model_cfg = tr.model_config(dict(
        block_out_channels=list(channels), layers_per_block=layers_per_block, latent_channels=latent_channels,
        norm_num_groups=norm_num_groups, sample_size=crop,
    ))  # fmt: skip
    check_architecture(crop, model_cfg.get("block_out_channels", ()), model_cfg.get("norm_num_groups", 0))
    photos, sampler, val_x = load_training_data(data_dir, crop, short_side, loop.holdout_every, max_photos, val_size)
    stats_x = fixed_batch(sampler, stats_size, seed=4242) if stats_size else None

    def init_logvar(model, cfg):
        if logvar_init is not None:  # start with a nearly deterministic posterior (std e^(logvar/2))
            with torch.no_grad():
                model.quant_conv.bias[cfg["latent_channels"] :] = logvar_init

    model = tr.build_model(build_autoencoder, model_cfg, init=init_logvar)
    model_cfg = tr.model_cfg
    options = tr.options(
        crop=crop, kl_weight=kl_weight, mse_weight=mse_weight, logvar_init=logvar_init, short_side=list(short_side)
    )
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    tr.log_start(options, stage="autoencoder", photos=len(photos))
    last_val: dict = {}

    def step_fn(i: int):
        model.train()
        x = sampler.batch(loop.batch, tr.np_rng).to(dev)
        with tr.autocast():
            moments = model.encode(x).latent_dist.parameters
        post = DiagonalGaussianDistribution(moments.float())  # the KL term in fp32
        noise = torch.randn(post.mean.shape, generator=tr.gen).to(dev)
        z = post.mean + post.std * noise
        with tr.autocast():
            rec = model.decode(z).sample
        err = rec.float() - x
        rec_loss = err.abs().mean() + mse_weight * err.pow(2).mean()
        kl = post.kl().mean() / x[0].numel()  # per-pixel, like LDM's summed losses
        return tr.optimize(i, rec_loss + kl_weight * kl)

    def checkpoint_fn(i: int, el: float):
        tr.save(i, el, "autoencoder", options)
        ae_norm = tr.ema.model
        if stats_x is not None:
            tr.ema.model.eval()
            m, s = latent_stats(tr.ema.model, stats_x.to(dev))
            ae_norm = normalized_autoencoder(tr.ema.model, m, s)
        last_val.clear()
        if val_x is not None:  # validate what is shipped: normalised, rounded to fp16
            last_val.update(validate_autoencoder(copy.deepcopy(ae_norm).half().float(), val_x, dev))
        tr.log.write(event="checkpoint", step=i, elapsed=round(el, 1), **{k: _fmt(v) for k, v in last_val.items()})
        if out_dir is not None:
            out = Path(out_dir)
            _write_folder_meta(out)
            save_diffusers_fp16(ae_norm, out / "vae")
            recipe = {
                "class": "AutoencoderKL (f4, mid-block attention off, scaling_factor 1.0, latents normalised)",
                "architecture": f"block_out_channels {tuple(model_cfg['block_out_channels'])}, layers_per_block "
                f"{model_cfg['layers_per_block']}, latent_channels {model_cfg['latent_channels']}, "
                f"norm groups {model_cfg['norm_num_groups']}",
                "parameters": f"{param_count(tr.ema.model) / 1e6:.2f} M",
                "data": _recipe_data(len(photos), data_dir, loop, crop, short_side),
                "loss": f"L1 + {mse_weight:g} * MSE on a posterior sample, + {kl_weight:g} * KL (per pixel); no GAN; "
                f"posterior log-variance bias initialised to {logvar_init:g}",
                "optimiser": _recipe_optimiser(tr),
                "steps": i,
                "wall time": f"{fmt_hours(el)} on {tr.hardware}",
                "held-out reconstruction": ", ".join(f"{k} {v:.4f}" for k, v in last_val.items() if "psnr" in k or "l1" in k)
                + f" (PSNR in dB on {val_x.shape[0] if val_x is not None else 0} held-out {crop}px crops, fp16 weights, "
                "encode = posterior mean)",
                "latent statistics after normalisation (held-out)": ", ".join(
                    f"{k} {v:.3f}" for k, v in last_val.items() if k.startswith("z")
                ),
            }
            atomic_write_json(out / "vae" / "recipe.json", recipe)
            _write_readme(out)

    result = tr.train(step_fn, checkpoint_fn, desc="autoencoder", ndigits=5)
    result["val"] = dict(last_val)
    return result


def _decoder_finetune_model(vae_dir: str):
    """The autoencoder of ``vae_dir`` with its encoder side (encoder, quant_conv) frozen."""
    vae = load_frozen_vae(Path(vae_dir), "cpu")[0].train().requires_grad_(True)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    return vae


def _lpips_or_error(device):
    """The differentiable LPIPS-AlexNet module, or a one-line TrainingError saying how to install it."""
    from diffrestore.metrics.lpips import LPIPSUnavailable, load_lpips

    try:
        return load_lpips(str(device), "alex")
    except LPIPSUnavailable as e:
        raise TrainingError(f"--lpips-weight needs the LPIPS weights: {e}") from None


def train_decoder(
    data_dir,
    out_dir,
    run_dir,
    *,
    vae_dir,
    crop: int = 96,
    margin: int = 16,
    mse_weight: float = 1.0,
    lpips_weight: float = 0.0,
    encoded_sides=(256, 192),
    val_size: int = 32,
    max_photos: int | None = None,
    loop: LoopOptions | None = None,
    **loop_options,
) -> dict:
    """Stage ``decoder``: fine-tune the decoder (and ``post_quant_conv``) of a trained autoencoder with its
    encoder frozen, on L1 + MSE (+ ``lpips_weight`` x LPIPS-AlexNet, for sharper texture than a pixel loss
    asks for) of ``decode(encode(x))`` (posterior mean, the latent every method decodes).

    Why: the encoder defines the latent space a UNet was trained in; keeping it bit-identical keeps every
    UNet trained on it valid, while a better decoder lifts what every latent method can reach. The photos
    are encoded once, whole (:class:`EncodedPhotos`), so a step costs the decoder only. The loss skips a
    ``margin`` of pixels on each side: a latent crop decoded without its neighbours is wrong near its
    edges in a way a whole-image decode never is, and fitting those edges costs the interior (measured
    with the loss on the whole crop: whole-image reconstruction 25.49 -> 25.17 dB on 20 evaluation photos
    after 983 steps, while the crop loss fell 0.151 -> 0.114).
    Loop options: :class:`LoopOptions` (here warm-up 100, lr 1e-4 by default)."""
    loop = LoopOptions.resolve(loop, loop_options, warmup=100)
    if crop % 4 or crop <= 2 * margin:
        raise TrainingError(f"crop must be a multiple of 4 larger than 2 x margin, got crop {crop}, margin {margin}")
    if lpips_weight < 0:
        raise TrainingError(f"--lpips-weight must be >= 0, got {lpips_weight}")
    tr = Trainer(run_dir, loop, "decoder", out_dir)
    dev = tr.device
    perceptual = _lpips_or_error(dev) if lpips_weight > 0 else None
    frozen, vae_sha = load_frozen_vae(Path(vae_dir), dev)
    photos, _, val_x = load_training_data(data_dir, crop, (192.0, 256.0), loop.holdout_every, max_photos, val_size)
    encoded = load_or_encode_photos(tr.run_dir, photos, frozen, vae_sha, encoded_sides, dev, loop.seed)
    del frozen
    model = tr.build_model(_decoder_finetune_model, {"vae_dir": str(vae_dir)})
    options = tr.options(crop=crop, margin=margin, mse_weight=mse_weight, lpips_weight=lpips_weight,
                         encoded_sides=[int(v) for v in encoded_sides])  # fmt: skip
    options["vae_sha256"] = vae_sha
    tr.log_start(options, stage="decoder", photos=len(photos))
    last_val: dict = {}

    def step_fn(i: int):
        model.train()
        x, z = (v.to(dev) for v in encoded.batch(loop.batch, crop, tr.np_rng))
        with tr.autocast():
            recon = model.decode(z).sample.float()
        if margin:
            recon, x = (v[..., margin:-margin, margin:-margin] for v in (recon, x))
        err = recon - x
        loss = err.abs().mean() + mse_weight * err.pow(2).mean()
        if perceptual is not None:
            loss = loss + lpips_weight * perceptual(recon.clamp(-1, 1), x).mean()
        return tr.optimize(i, loss)

    def checkpoint_fn(i: int, el: float):
        tr.save(i, el, "decoder", options, vae_sha256=vae_sha)
        last_val.clear()
        if val_x is not None:  # validate what is shipped: rounded to fp16
            last_val.update(validate_autoencoder(copy.deepcopy(tr.ema.model).half().float(), val_x, dev))
        tr.log.write(event="checkpoint", step=i, elapsed=round(el, 1), **{k: _fmt(v) for k, v in last_val.items()})
        if out_dir is not None:
            out = Path(out_dir) / "vae"
            save_diffusers_fp16(tr.ema.model, out)
            recipe = json.loads((Path(vae_dir) / "recipe.json").read_text()) if (Path(vae_dir) / "recipe.json").is_file() else {}
            recipe["decoder fine-tune"] = (
                f"decoder + post_quant_conv only (encoder bit-identical to sha256 {vae_sha[:16]}..., so the latent "
                f"space is unchanged), L1 + {mse_weight:g} * MSE{f' + {lpips_weight:g} * LPIPS-AlexNet' if lpips_weight else ''} "
                f"of decode(posterior mean) inside a {margin}-px margin, "
                f"{_recipe_data(len(photos), data_dir, loop, crop, None, encoded_sides)}, {_recipe_optimiser(tr)}, "
                f"{i} steps, {fmt_hours(el)} on {tr.hardware}"
            )
            recipe["held-out reconstruction after the decoder fine-tune"] = ", ".join(
                f"{k} {v:.4f}" for k, v in last_val.items() if "psnr" in k or "l1" in k
            ) + f" ({val_x.shape[0] if val_x is not None else 0} held-out {crop}px crops, fp16 weights)"
            atomic_write_json(out / "recipe.json", recipe)

    result = tr.train(step_fn, checkpoint_fn, desc="decoder", ndigits=5)
    result["val"] = dict(last_val)
    return result


def _recipe_data(n_photos: int, data_dir, loop: LoopOptions, crop: int, short_side, encoded_sides=None) -> str:
    photos = f"{n_photos} photos of {Path(data_dir).name}/ (every {loop.holdout_every}th held out)"
    if encoded_sides is not None:
        return (f"{photos}, encoded whole once at short sides {list(encoded_sides)} (random h-flip), random "
                f"{crop}x{crop} crops aligned to the latent grid")
    return f"{photos}, random {crop}x{crop} crops of the photo rescaled to a short side uniform in {list(short_side)}, h-flips"


def _recipe_optimiser(tr: Trainer) -> str:
    loop = tr.loop
    return (f"AdamW {tr.lr_schedule()}, batch {loop.batch}, clip {loop.grad_clip:g}, EMA {loop.ema_decay}; "
            f"{tr.precision_history()}")


# ---------------------------------------------------------------------------------------------
# stage 2: latent UNet
# ---------------------------------------------------------------------------------------------


def load_frozen_vae(folder: Path, device) -> tuple[torch.nn.Module, str]:
    from diffusers import AutoencoderKL

    folder = Path(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"{folder}: no trained autoencoder (train the 'autoencoder' stage first)")
    try:
        vae = from_pretrained(AutoencoderKL, folder, torch.float32)
    except PriorLoadError as e:
        raise TrainingError(str(e)) from None
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


class EncodedPhotos:
    """The training photos encoded once, whole, at a few fixed short sides; batches are aligned crops.

    Why: encoding every batch's crops costs about three times the training step of a small UNet, and a
    crop of a whole-photo latent is what the UNet meets at inference (images are encoded whole), border
    effects included. Each photo is resized (bicubic, antialiased) to each short side in ``sides`` (the
    long side rounded to a multiple of 4), flipped horizontally with probability 1/2 (once, at encoding),
    and its posterior mean kept in fp16 next to the uint8 pixels. A batch takes random crops at latent
    positions, so the pixel crop is exactly the one the latent crop encodes.
    """

    def __init__(self, pixels: list[torch.Tensor], latents: list[torch.Tensor]):
        self.pixels, self.latents = pixels, latents

    @classmethod
    @torch.no_grad()
    def encode(cls, photos, vae, sides, device, seed: int) -> "EncodedPhotos":
        from PIL import Image
        from tqdm import tqdm

        rng = np.random.default_rng(seed)
        pixels, latents = [], []
        for img in tqdm(photos, desc="encoding photos", mininterval=30):
            w, h = img.size
            for side in sides:
                scale = side / min(w, h)
                size = (max(4, round(w * scale / 4) * 4), max(4, round(h * scale / 4) * 4))
                a = torch.from_numpy(np.array(img.resize(size, Image.Resampling.BICUBIC))).permute(2, 0, 1)
                if rng.random() < 0.5:
                    a = a.flip(2)
                x = a[None].float().div(127.5).sub(1.0).to(device)
                latents.append(vae.encode(x).latent_dist.mean[0].half().cpu())
                pixels.append(a.contiguous())
        return cls(pixels, latents)

    def batch(self, n: int, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (n, 3, crop, crop) float in [-1, 1], latents (n, c, crop/4, crop/4) float)."""
        c4 = crop // 4
        xs, zs = [], []
        for _ in range(n):
            k = int(rng.integers(len(self.latents)))
            z = self.latents[k]
            i = int(rng.integers(z.shape[1] - c4 + 1))
            j = int(rng.integers(z.shape[2] - c4 + 1))
            zs.append(z[:, i : i + c4, j : j + c4].float())
            xs.append(self.pixels[k][:, 4 * i : 4 * i + crop, 4 * j : 4 * j + crop].float())
        return torch.stack(xs).div(127.5).sub(1.0), torch.stack(zs)


def load_or_encode_photos(run_dir: Path, photos, vae, vae_sha: str, sides, device, seed: int) -> EncodedPhotos:
    """:meth:`EncodedPhotos.encode`, cached in ``run_dir/encoded_photos.pt`` (reused when the autoencoder,
    the sides, the photo count and the seed are the same)."""
    key = {"vae_sha256": vae_sha, "sides": [int(v) for v in sides], "photos": len(photos), "seed": int(seed)}
    path = Path(run_dir) / "encoded_photos.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged or foreign cache is encoded again and replaced
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            return EncodedPhotos(cached["pixels"], cached["latents"])
    enc = EncodedPhotos.encode(photos, vae, sides, device, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"key": key, "pixels": enc.pixels, "latents": enc.latents}, tmp)
    return enc


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
    """Stage 2. Reads the frozen autoencoder from ``vae_dir`` (default ``out_dir/vae``); exports the EMA
    UNet (fp16) to ``out_dir/unet`` at each checkpoint. Loop options: :class:`LoopOptions`.

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
    if vae_dir is None:
        if out_dir is None:
            raise TrainingError("give vae_dir (or out_dir holding vae/)")
        vae_dir = Path(out_dir) / "vae"
    vae, vae_sha = load_frozen_vae(Path(vae_dir), dev)
    if tr.resumed is not None and tr.resumed.get("vae_sha256") not in (None, vae_sha):
        raise TrainingError(f"{vae_dir}: the autoencoder changed since this UNet run started (sha256 differs)")
    latent_channels = int(vae.config.latent_channels)
    model_cfg = tr.model_config(dict(
        block_out_channels=list(channels), layers_per_block=layers_per_block, latent_channels=latent_channels,
        attention=attention, norm_num_groups=norm_num_groups, sample_size=crop // 4,
    ))  # fmt: skip
    check_architecture(crop, model_cfg.get("block_out_channels", ()), model_cfg.get("norm_num_groups", 0), scale=4)
    photos, sampler, val_x = load_training_data(data_dir, crop, short_side, loop.holdout_every, max_photos, val_size)
    encoded = None
    if encoded_sides is not None:
        encoded = load_or_encode_photos(tr.run_dir, photos, vae, vae_sha, encoded_sides, dev, loop.seed)

    model = tr.build_model(build_latent_unet, model_cfg)
    model_cfg = tr.model_cfg
    ac = ldm_alphas_cumprod()
    ac_dev = ac.to(dev)
    T = ac.shape[0]
    options = tr.options(
        crop=crop, lr_noise_frac=lr_noise_frac, lr_noise_max=lr_noise_max, short_side=list(short_side),
        encoded_sides=None if encoded_sides is None else [int(v) for v in encoded_sides], prediction=prediction,
    )
    options["vae_sha256"] = vae_sha
    tr.log_start(options, stage="unet", photos=len(photos))
    last_val: dict = {}

    def step_fn(i: int):
        model.train()
        if encoded is not None:
            x, z = (v.to(dev) for v in encoded.batch(loop.batch, crop, tr.np_rng))
        else:
            x = sampler.batch(loop.batch, tr.np_rng).to(dev)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean
        lr_img = make_lr(x, tr.gen, lr_noise_frac, lr_noise_max)
        t = torch.randint(0, T, (loop.batch,), generator=tr.gen)
        noise = torch.randn(z.shape, generator=tr.gen).to(dev)
        t = t.to(dev)
        a = ac_dev[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        with tr.autocast():
            out = model(torch.cat([zt, lr_img], 1), t).sample
        return tr.optimize(i, F.mse_loss(out.float(), target_of(prediction, z, noise, a)))

    def checkpoint_fn(i: int, el: float):
        tr.save(i, el, "latent_unet", options, vae_sha256=vae_sha)
        last_val.clear()
        if val_x is not None:
            last_val.update(validate_latent_unet(tr.ema.model, vae, val_x, ac, dev, prediction))
        tr.log.write(event="checkpoint", step=i, elapsed=round(el, 1), **{k: _fmt(v) for k, v in last_val.items()})
        if out_dir is not None:
            out = Path(out_dir)
            _write_folder_meta(out, prediction)
            save_diffusers_fp16(tr.ema.model, out / "unet")
            _sync_vae(Path(vae_dir), out / "vae", vae_sha)
            recipe = {
                "class": f"UNet2DModel, {'eps' if prediction == 'epsilon' else 'v'} prediction, input cat([z_t, lr], 1) "
                "(latent first), "
                + ("mid-block attention" if model_cfg["attention"] else "no attention"),
                "architecture": f"block_out_channels {tuple(model_cfg['block_out_channels'])}, layers_per_block "
                f"{model_cfg['layers_per_block']}, norm groups {model_cfg['norm_num_groups']}, scale_shift",
                "parameters": f"{param_count(tr.ema.model) / 1e6:.2f} M",
                "autoencoder": f"vae/ frozen (sha256 {vae_sha[:16]}...), z = posterior mean",
                "data": _recipe_data(len(photos), data_dir, loop, crop, short_side, encoded_sides),
                "conditioning": f"lr = 4x4 block average of x (sr4), + N(0, s^2) noise, s ~ U[0, {lr_noise_max:g}], "
                f"for {lr_noise_frac:.0%} of samples",
                "objective": f"MSE on {'eps' if prediction == 'epsilon' else 'v = sqrt(a) eps - sqrt(1-a) z0'}, "
                "t uniform on [0, 1000), LDM schedule (sqrt-linear 0.0015..0.0155)",
                "optimiser": _recipe_optimiser(tr),
                "steps": i,
                "wall time": f"{fmt_hours(el)} on {tr.hardware}",
                "held-out validation": ", ".join(f"{k} {v:.4f}" for k, v in last_val.items()),
            }
            atomic_write_json(out / "unet" / "recipe.json", recipe)
            _write_readme(out)

    result = tr.train(step_fn, checkpoint_fn, desc="latent-unet", ndigits=5)
    result["val"] = dict(last_val)
    return result


def train_latent_sr(stage: str, data_dir, out_dir, run_dir, **kw) -> dict:
    """``stage`` is 'autoencoder', 'unet' or 'decoder' (fine-tune of a trained autoencoder's decoder)."""
    if stage == "autoencoder":
        return train_autoencoder(data_dir, out_dir, run_dir, **kw)
    if stage == "unet":
        return train_latent_unet(data_dir, out_dir, run_dir, **kw)
    if stage == "decoder":
        return train_decoder(data_dir, out_dir, run_dir, **kw)
    raise TrainingError(f"unknown stage {stage!r} (use autoencoder, unet or decoder)")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser(parser_class=argparse.ArgumentParser, prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's command line (``parser_class`` and ``prog``: the ``diffrestore train`` command's own)."""
    p = parser_class(prog=prog or "python -m diffrestore.training.latent_sr", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["autoencoder", "unet", "decoder"])
    add_loop_arguments(
        p, out_help="model folder (hub layout) to export vae/ or unet/ into", warmup=None,
        warmup_help="default 500 (autoencoder), 1000 (unet)",
    )
    p.add_argument("--vae", default=None, help="(unet, decoder) autoencoder folder; default OUT/vae (unet)")
    p.add_argument("--crop", type=int, default=None, help="default 64 (autoencoder), 128 (unet)")
    p.add_argument("--channels", type=int_list, default=None)
    p.add_argument("--layers-per-block", type=int, default=None)
    p.add_argument("--norm-groups", type=int, default=None)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="(autoencoder)")
    p.add_argument("--mse-weight", type=float, default=1.0, help="(autoencoder)")
    p.add_argument("--logvar-init", type=float, default=-6.0, help="(autoencoder) initial posterior log-variance")
    p.add_argument("--lr-noise-frac", type=float, default=0.5, help="(unet)")
    p.add_argument("--lr-noise-max", type=float, default=0.1, help="(unet)")
    p.add_argument("--attention", action="store_true", help="(unet) mid-block attention")
    p.add_argument("--encoded-sides", type=int_list, default=None,
                   help="(unet) encode the photos whole once at these short sides (e.g. 256,192) and crop latents")
    p.add_argument("--prediction", choices=PREDICTION_TYPES, default="epsilon", help="(unet) target")
    p.add_argument("--margin", type=int, default=16, help="(decoder) pixels on each crop side left out of the loss")
    p.add_argument("--lpips-weight", type=float, default=0.0, help="(decoder) weight of an LPIPS-AlexNet loss term")
    return p


def _train_from_args(a, kw: dict) -> dict:
    for name, val in (("crop", a.crop), ("channels", a.channels), ("layers_per_block", a.layers_per_block),
                      ("norm_num_groups", a.norm_groups)):
        if val is not None:
            kw[name] = val
    if a.stage == "autoencoder":
        kw.update(kl_weight=a.kl_weight, mse_weight=a.mse_weight, logvar_init=a.logvar_init)
    elif a.stage == "decoder":
        if a.vae is None:
            raise TrainingError("the decoder stage needs --vae (the trained autoencoder folder)")
        flags = {"channels": "--channels", "layers_per_block": "--layers-per-block", "norm_num_groups": "--norm-groups"}
        given = [flag for name, flag in flags.items() if name in kw]
        if given:
            raise TrainingError(f"the decoder stage keeps the autoencoder's architecture: drop {', '.join(given)}")
        kw.update(vae_dir=a.vae, mse_weight=a.mse_weight, margin=a.margin, lpips_weight=a.lpips_weight)
        if a.encoded_sides is not None:
            kw["encoded_sides"] = a.encoded_sides
    else:
        kw.update(lr_noise_frac=a.lr_noise_frac, lr_noise_max=a.lr_noise_max, attention=a.attention, vae_dir=a.vae,
                  encoded_sides=a.encoded_sides, prediction=a.prediction)
    return train_latent_sr(a.stage, a.data, a.out, a.run, **kw)


def main(argv=None, parser_class=argparse.ArgumentParser, prog: str | None = None) -> int:
    return cli_main(build_parser(parser_class, prog), argv, _train_from_args)


if __name__ == "__main__":
    sys.exit(main())
