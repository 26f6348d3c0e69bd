"""Latent super-resolution prior on diffusers models (LDM-SR, "SRLDM").

``DiffusersLatentSRPrior`` wraps a ``UNet2DModel`` that takes ``cat([z_t, lr], 1)`` (latent channels
followed by the RGB low-resolution image, unscaled, in [-1, 1]) and a first stage:

* ``VQModel`` (LDM-SR): ``encode`` returns the **pre-quantization** latent ``h = quant_conv(encoder(x))``
  (this is LDM's ``get_first_stage_encoding(encode_first_stage(x))`` with ``scale_factor`` 1);
  ``decode`` quantizes first by default, like LDM's ``decode_first_stage`` (``quantize_on_decode``);
* ``AutoencoderKL`` (a ``vae/`` folder, e.g. our own trained priors): ``encode`` returns the posterior
  mean times ``latent_scale`` (default: the VAE's ``scaling_factor``, the diffusers convention);
  ``decode`` divides by it. The VQ path ignores ``scaling_factor`` (the hub VQ config gets a 0.18215
  default that ``LDMSuperResolutionPipeline`` never applies), so its ``latent_scale`` defaults to 1.

``alphas_cumprod`` is LDM's buffer: betas and their cumulative product in float64, stored as float32
(``ldm_alphas_cumprod``); it is bit-identical to the official ``model.alphas_cumprod``.

A folder in the hub layout (``model_index.json``, ``unet/``, ``vqvae/`` or ``vae/``, optional
``scheduler/``) loads with ``load_diffusers_latent_sr`` and never touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DModel, VQModel

from ._files import from_pretrained, read_json, resolve_dtype
from .base import PREDICTION_TYPES, LatentSRPrior, PriorLoadError, ldm_alphas_cumprod, scheduler_alphas_cumprod
from .catalog import require_weights
from .frozen import FrozenUNetMixin

__all__ = ["DiffusersLatentSRPrior", "check_latent_sr", "latent_channels_of", "ldm_alphas_cumprod",
           "load_diffusers_latent_sr"]


def latent_channels_of(first_stage) -> int:
    """Channels of the diffusion latent: the VQ codebook dimension (``vq_embed_dim``, default
    ``latent_channels``) for a VQModel, ``latent_channels`` for an AutoencoderKL."""
    cfg = first_stage.config
    if isinstance(first_stage, VQModel) and cfg.get("vq_embed_dim") is not None:
        return int(cfg.vq_embed_dim)
    return int(cfg.latent_channels)


def check_latent_sr(unet, first_stage, where: str = "model") -> None:
    """Raise PriorLoadError unless (unet, first_stage) form a latent SR model: the UNet takes the latent
    channels plus an image, and predicts latent channels."""
    if not isinstance(unet, UNet2DModel):
        raise PriorLoadError(f"{where}: not a latent SR model (UNet is {type(unet).__name__}, need UNet2DModel)")
    if not isinstance(first_stage, (VQModel, AutoencoderKL)):
        raise PriorLoadError(
            f"{where}: not a latent SR model (first stage is {type(first_stage).__name__}, need VQModel or AutoencoderKL)"
        )
    c = latent_channels_of(first_stage)
    img = first_stage.config.in_channels
    cin, cout = unet.config.in_channels, unet.config.out_channels
    if cin != c + img or cout != c:
        raise PriorLoadError(
            f"{where}: not a latent SR model (UNet maps {cin} -> {cout} channels; a latent SR UNet maps "
            f"latent {c} + image {img} = {c + img} -> {c})"
        )


class DiffusersLatentSRPrior(FrozenUNetMixin, LatentSRPrior):
    """LDM-style latent SR prior: ``eps(z_t, t, lr) = unet(cat([z_t, lr], 1), t)``.

    ``dtype`` (fp16/bf16) casts the two networks only; inputs are cast to it and every output comes back
    in the input's dtype, and ``alphas_cumprod`` stays float32 even after ``.to(dtype)``.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        first_stage: VQModel | AutoencoderKL,
        alphas_cumprod: torch.Tensor | None = None,
        *,
        quantize_on_decode: bool = True,
        latent_scale: float | None = None,
        dtype: torch.dtype | str | None = None,
        prediction_type: str = "epsilon",
    ):
        check_latent_sr(unet, first_stage)
        super().__init__(ldm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
        if prediction_type not in PREDICTION_TYPES:
            need = " or ".join(PREDICTION_TYPES)
            raise PriorLoadError(f"prediction_type {prediction_type!r} is not supported (need {need})")
        self.prediction_type = prediction_type
        self.unet = unet.eval()
        self.first_stage = first_stage.eval()
        self.is_vq = isinstance(first_stage, VQModel)
        self.latent_channels = latent_channels_of(first_stage)
        self.downscale = 2 ** (len(first_stage.config.block_out_channels) - 1)
        self.multiple_of = 2 ** (len(unet.config.block_out_channels) - 1)
        self.quantize_on_decode = quantize_on_decode
        if latent_scale is None:
            latent_scale = 1.0 if self.is_vq else float(first_stage.config.scaling_factor)
        self.latent_scale = float(latent_scale)
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            # plain Module.to: diffusers' override warns about fp32-only modules these models do not have
            torch.nn.Module.to(self.unet, dtype=dtype)
            torch.nn.Module.to(self.first_stage, dtype=dtype)

    @property
    def model_dtype(self) -> torch.dtype:
        return self.unet.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x_in = x.to(self.first_stage.dtype)
        if self.is_vq:
            z = self.first_stage.encode(x_in).latents
        else:
            z = self.first_stage.encode(x_in).latent_dist.mean
        if self.latent_scale != 1.0:
            z = z * self.latent_scale
        return z.to(x.dtype)

    def decode(self, z: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """Latent -> image in about [-1, 1] (not clamped). ``quantize`` (VQ only) defaults to
        ``quantize_on_decode``."""
        z_in = z.to(self.first_stage.dtype)
        if self.latent_scale != 1.0:
            z_in = z_in / self.latent_scale
        if self.is_vq:
            q = self.quantize_on_decode if quantize is None else quantize
            x = self.first_stage.decode(z_in, force_not_quantize=not q).sample
        else:
            x = self.first_stage.decode(z_in).sample
        return x.to(z.dtype)

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=z_t.device)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(z_t.shape[0])
        inp = torch.cat([z_t, lr.to(z_t.dtype)], dim=1).to(self.unet.dtype)
        return self.eps_from_output(self.unet_sample(inp, t), z_t, t).to(z_t.dtype)


# ---------------------------------------------------------------------------------------------
# diffusers folder (hub layout)
# ---------------------------------------------------------------------------------------------


def _schedule_from_folder(folder: Path) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod, prediction_type) from ``scheduler/scheduler_config.json``; the LDM schedule and
    epsilon when there is none."""
    cfg_path = folder / "scheduler_config.json"
    if not cfg_path.is_file():
        return ldm_alphas_cumprod(), "epsilon"
    cfg = read_json(cfg_path)
    return scheduler_alphas_cumprod(cfg, str(cfg_path), PREDICTION_TYPES), cfg.get("prediction_type", "epsilon")


def load_diffusers_latent_sr(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    quantize_on_decode: bool = True,
) -> DiffusersLatentSRPrior:
    """Load a latent SR model folder in the hub layout, offline (``local_files_only``)."""
    root = Path(path)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise PriorLoadError(f"{root}: not a diffusers model folder (no model_index.json)")
    index = read_json(index_path)
    fs_name = "vqvae" if "vqvae" in index else "vae" if "vae" in index else None
    if "unet" not in index or fs_name is None:
        parts = ", ".join(k for k in index if not k.startswith("_")) or "nothing"
        raise PriorLoadError(
            f"{root}: not a latent SR model folder (model_index.json lists {parts}; need unet and vqvae or vae)"
        )
    classes = {}
    for name, allowed in (("unet", (UNet2DModel,)), (fs_name, (VQModel, AutoencoderKL))):
        entry = index[name]
        cls_name = entry[-1] if isinstance(entry, (list, tuple)) and entry else entry
        match = [c for c in allowed if c.__name__ == cls_name]
        if not match:
            need = " or ".join(c.__name__ for c in allowed)
            raise PriorLoadError(f"{root}: not a latent SR model folder ({name} is {cls_name!r}, need {need})")
        classes[name] = match[0]
    dtype = resolve_dtype(dtype)
    for name in ("unet", fs_name):
        require_weights(root / name)
    unet = from_pretrained(UNet2DModel, root / "unet", dtype)
    first_stage = from_pretrained(classes[fs_name], root / fs_name, dtype)
    check_latent_sr(unet, first_stage, where=str(root))
    alphas_cumprod, prediction_type = _schedule_from_folder(root / "scheduler")
    return DiffusersLatentSRPrior(
        unet, first_stage, alphas_cumprod, quantize_on_decode=quantize_on_decode, prediction_type=prediction_type
    )
