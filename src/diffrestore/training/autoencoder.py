"""Latent-SR stage ``autoencoder``: a small diffusers ``AutoencoderKL`` (f4, 3 latent channels) trained
from scratch on L1 + MSE reconstruction of a posterior sample plus a tiny KL term (no GAN, no perceptual
loss). At export the per-channel latent statistics are folded into ``quant_conv`` / ``post_quant_conv``
(:func:`normalized_autoencoder`), so latents have zero mean and unit std with ``scaling_factor`` 1.0.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch

from ..metrics.quality import psnr
from ..priors._files import from_pretrained
from ..priors.base import PriorLoadError
from .checkpoints import TrainingError
from .data import fixed_batch, load_training_data
from .encoded_photos import EncodedPhotos, load_or_encode_photos
from .model_folder import describe_data, export_ldm_stage, file_sha256, fmt_hours, save_diffusers_fp16, write_model_json
from .networks import param_count
from .options import LoopOptions, check_architecture
from .trainer import Trainer


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


@torch.no_grad()
def validate_autoencoder(ae, x: torch.Tensor, device, chunk: int = 16) -> dict:
    """Reconstruction PSNR (dB) and L1 of ``decode(encode(x))`` (posterior mean), and each latent channel's
    mean and std, on the crops ``x``."""
    ae.eval()
    recs, zs = [], []
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].to(device)
        z = ae.encode(xb).latent_dist.mean
        recs.append(ae.decode(z).sample.float().cpu())
        zs.append(z.float().cpu())
    rec = torch.cat(recs)
    z = torch.cat(zs).transpose(0, 1).flatten(1)
    out = {"val_psnr": float(psnr(rec, x).mean()), "val_l1": float((rec.clamp(-1, 1) - x).abs().mean())}
    for c in range(z.shape[0]):
        out[f"z{c}_mean"] = float(z[c].mean())
        out[f"z{c}_std"] = float(z[c].std())
    return out


def load_frozen_vae(folder: Path, device) -> tuple[torch.nn.Module, str]:
    """The trained autoencoder of ``folder`` (fp32, eval, no gradients) and its weights' sha256."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"{folder}: no trained autoencoder (train the 'autoencoder' stage first)")
    try:
        vae = from_pretrained(AutoencoderKL, folder, torch.float32)
    except PriorLoadError as e:
        raise TrainingError(str(e)) from None
    return vae.to(device).eval().requires_grad_(False), file_sha256(weights)


def _reconstruction_numbers(val: dict) -> str:
    """The PSNR and L1 entries of a validation, for a recipe."""
    return ", ".join(f"{k} {v:.4f}" for k, v in val.items() if "psnr" in k or "l1" in k)


def _init_logvar(logvar_init, model, cfg) -> None:
    if logvar_init is not None:  # start with a nearly deterministic posterior (std e^(logvar/2))
        with torch.no_grad():
            model.quant_conv.bias[cfg["latent_channels"] :] = logvar_init


def _autoencoder_step(tr: Trainer, model, sampler, kl_weight: float, mse_weight: float):
    """The step function: L1 + ``mse_weight`` MSE of a posterior sample's reconstruction, + ``kl_weight`` KL."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dev, batch = tr.device, tr.loop.batch

    def step_fn(i: int):
        model.train()
        x = sampler.batch(batch, tr.np_rng).to(dev)
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

    return step_fn


def _normalised_ema(tr: Trainer, stats_x):
    """The EMA autoencoder with its latent statistics on ``stats_x`` folded in (as is without ``stats_x``)."""
    if stats_x is None:
        return tr.ema.model
    tr.ema.model.eval()
    m, s = latent_stats(tr.ema.model, stats_x.to(tr.device))
    return normalized_autoencoder(tr.ema.model, m, s)


def _autoencoder_recipe(tr: Trainer, step: int, elapsed: float, val: dict, n_val: int, data: str, *, crop: int,
                        mse_weight: float, kl_weight: float, logvar_init) -> dict:
    cfg = tr.model_cfg
    return {
        "class": "AutoencoderKL (f4, mid-block attention off, scaling_factor 1.0, latents normalised)",
        "architecture": f"block_out_channels {tuple(cfg['block_out_channels'])}, layers_per_block "
        f"{cfg['layers_per_block']}, latent_channels {cfg['latent_channels']}, norm groups {cfg['norm_num_groups']}",
        "parameters": f"{param_count(tr.ema.model) / 1e6:.2f} M",
        "data": data,
        "loss": f"L1 + {mse_weight:g} * MSE on a posterior sample, + {kl_weight:g} * KL (per pixel); no GAN; "
        f"posterior log-variance bias initialised to {logvar_init:g}",
        "optimiser": tr.optimiser_summary(),
        "steps": step,
        "wall time": f"{fmt_hours(elapsed)} on {tr.hardware}",
        "held-out reconstruction": _reconstruction_numbers(val)
        + f" (PSNR in dB on {n_val} held-out {crop}px crops, fp16 weights, encode = posterior mean)",
        "latent statistics after normalisation (held-out)": ", ".join(
            f"{k} {v:.3f}" for k, v in val.items() if k.startswith("z")
        ),
    }


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
    """Stage ``autoencoder``; exports the normalised EMA autoencoder (fp16) to ``out_dir/vae`` at each
    checkpoint. Loop options: :class:`LoopOptions` (here warm-up 500 and 200,000 steps by default)."""
    loop = LoopOptions.resolve(loop, loop_options, warmup=500, steps=200_000)
    tr = Trainer(run_dir, loop, "autoencoder", out_dir)
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
    model = tr.build_model(build_autoencoder, model_cfg, init=functools.partial(_init_logvar, logvar_init))
    options = tr.options(
        crop=crop, kl_weight=kl_weight, mse_weight=mse_weight, logvar_init=logvar_init, short_side=list(short_side)
    )
    tr.log_start(options, stage="autoencoder", photos=len(photos))
    step_fn = _autoencoder_step(tr, model, sampler, kl_weight, mse_weight)
    data = describe_data(len(photos), data_dir, loop.holdout_every, crop, short_side)
    n_val = val_x.shape[0] if val_x is not None else 0
    last_val: dict = {}

    def checkpoint_fn(i: int, el: float):
        ae_norm = _normalised_ema(tr, stats_x)
        val_fn = None if val_x is None else (  # what is shipped: normalised, rounded to fp16
            lambda: validate_autoencoder(copy.deepcopy(ae_norm).half().float(), val_x, tr.device)
        )
        tr.save_and_validate(i, el, "autoencoder", options, last_val, val_fn)
        if out_dir is not None:
            recipe = _autoencoder_recipe(tr, i, el, last_val, n_val, data, crop=crop, mse_weight=mse_weight,
                                         kl_weight=kl_weight, logvar_init=logvar_init)
            export_ldm_stage(Path(out_dir), "vae", ae_norm, recipe)

    return tr.train(step_fn, checkpoint_fn, desc="autoencoder", ndigits=5, val=last_val)


# ---------------------------------------------------------------------------------------------
# stage ``decoder``: fine-tune the decoder of a trained autoencoder, its encoder frozen
# ---------------------------------------------------------------------------------------------


def _decoder_finetune_model(vae_dir: str):
    """The autoencoder of ``vae_dir`` with its encoder side (encoder, quant_conv) frozen."""
    vae = load_frozen_vae(Path(vae_dir), "cpu")[0].train().requires_grad_(True)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    return vae


def _lpips_or_error(device):
    """The differentiable LPIPS-AlexNet module, or a one-line TrainingError saying how to install it."""
    from ..metrics.lpips import LPIPSUnavailable, load_lpips

    try:
        return load_lpips(str(device), "alex")
    except LPIPSUnavailable as e:
        raise TrainingError(f"--lpips-weight needs the LPIPS weights: {e}") from None


def _decoder_step(tr: Trainer, model, encoded: EncodedPhotos, crop: int, margin: int, mse_weight: float,
                  lpips_weight: float, perceptual):
    """The step function: L1 + ``mse_weight`` MSE (+ ``lpips_weight`` LPIPS) of ``decode(z)`` against the
    pixels, ``margin`` pixels on each side left out."""
    dev, batch = tr.device, tr.loop.batch

    def step_fn(i: int):
        model.train()
        x, z = (v.to(dev) for v in encoded.batch(batch, crop, tr.np_rng))
        with tr.autocast():
            recon = model.decode(z).sample.float()
        if margin:
            recon, x = (v[..., margin:-margin, margin:-margin] for v in (recon, x))
        err = recon - x
        loss = err.abs().mean() + mse_weight * err.pow(2).mean()
        if perceptual is not None:
            loss = loss + lpips_weight * perceptual(recon.clamp(-1, 1), x).mean()
        return tr.optimize(i, loss)

    return step_fn


def _export_decoder(out: Path, tr: Trainer, vae_dir, vae_sha: str, step: int, elapsed: float, val: dict,
                    n_val: int, data: str, *, crop: int, margin: int, mse_weight: float, lpips_weight: float) -> None:
    """The fine-tuned autoencoder (fp16) to ``out``, its recipe the source's with the fine-tune added."""
    save_diffusers_fp16(tr.ema.model, out)
    source = Path(vae_dir) / "recipe.json"
    recipe = json.loads(source.read_text()) if source.is_file() else {}
    perceptual = f" + {lpips_weight:g} * LPIPS-AlexNet" if lpips_weight else ""
    recipe["decoder fine-tune"] = (
        f"decoder + post_quant_conv only (encoder bit-identical to sha256 {vae_sha[:16]}..., so the latent "
        f"space is unchanged), L1 + {mse_weight:g} * MSE{perceptual} "
        f"of decode(posterior mean) inside a {margin}-px margin, "
        f"{data}, {tr.optimiser_summary()}, "
        f"{step} steps, {fmt_hours(elapsed)} on {tr.hardware}"
    )
    recipe["held-out reconstruction after the decoder fine-tune"] = _reconstruction_numbers(val) + (
        f" ({n_val} held-out {crop}px crops, fp16 weights)"
    )
    write_model_json(out / "recipe.json", recipe)


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
    """Stage ``decoder``: fine-tune the decoder (and ``post_quant_conv``) of the autoencoder in ``vae_dir``
    on L1 + MSE (+ ``lpips_weight`` x LPIPS-AlexNet) of ``decode(encode(x))``, exported to ``out_dir/vae``.

    The encoder stays bit-identical, so every UNet trained on its latent space stays valid. Photos are
    encoded once (:class:`EncodedPhotos`); the loss skips ``margin`` pixels on each side, where a latent
    crop decoded without its neighbours differs from a whole-image decode. Loop options:
    :class:`LoopOptions` (here warm-up 100 by default)."""
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
    step_fn = _decoder_step(tr, model, encoded, crop, margin, mse_weight, lpips_weight, perceptual)
    data = describe_data(len(photos), data_dir, loop.holdout_every, crop, None, encoded_sides)
    n_val = val_x.shape[0] if val_x is not None else 0
    last_val: dict = {}

    def checkpoint_fn(i: int, el: float):
        val_fn = None if val_x is None else (  # what is shipped: rounded to fp16
            lambda: validate_autoencoder(copy.deepcopy(tr.ema.model).half().float(), val_x, dev)
        )
        tr.save_and_validate(i, el, "decoder", options, last_val, val_fn, vae_sha256=vae_sha)
        if out_dir is not None:
            _export_decoder(Path(out_dir) / "vae", tr, vae_dir, vae_sha, i, el, last_val, n_val, data, crop=crop,
                            margin=margin, mse_weight=mse_weight, lpips_weight=lpips_weight)

    return tr.train(step_fn, checkpoint_fn, desc="decoder", ndigits=5, val=last_val)
