"""Pixel-space priors backed by a diffusers ``UNet2DModel`` (converted ADM checkpoints or diffusers folders)."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from diffrestore.priors.base import PixelPrior, adm_alphas_cumprod
from diffrestore.priors.frozen import FrozenUNetMixin

__all__ = ["UNetPixelPrior", "num_downsamplings"]


def num_downsamplings(unet: UNet2DModel) -> int:
    """How many times the UNet halves the resolution (blocks that own a downsampler)."""
    return sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None) is not None)


class UNetPixelPrior(FrozenUNetMixin, PixelPrior):
    """``eps(x_t, t)`` from a ``UNet2DModel`` that predicts noise (learned-sigma channels are dropped).

    Args:
        unet: the network; put in eval mode, cast to ``dtype`` when given.
        alphas_cumprod: (T,) training schedule; default ``adm_alphas_cumprod()`` (linear 1e-4..0.02, 1000 steps).
        dtype: compute dtype of the network (e.g. ``torch.bfloat16``); ``eps`` always returns float32.
        class_labels: default labels for a class-conditional network (``num_class_embeds``); one int or a
            (B,) tensor. ``eps(..., class_labels=...)`` overrides it per call.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        alphas_cumprod: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        class_labels: int | torch.Tensor | None = None,
    ):
        if alphas_cumprod is None:
            alphas_cumprod = adm_alphas_cumprod()
        super().__init__(alphas_cumprod)
        if dtype is not None:
            # nn.Module.to: diffusers' ModelMixin.to warns about fp32-only modules UNet2DModel does not have
            torch.nn.Module.to(unet, dtype=dtype)
        self.unet = unet.eval().requires_grad_(False)
        cfg = unet.config
        self.in_channels = int(cfg.in_channels)
        self.eps_channels = int(cfg.in_channels)
        self.learn_sigma = int(cfg.out_channels) == 2 * self.in_channels
        self.multiple_of = 2 ** num_downsamplings(unet)
        size = cfg.sample_size
        self.image_size = int(size if isinstance(size, int) else size[0]) if size is not None else None
        self.class_conditional = unet.class_embedding is not None
        self.class_labels = class_labels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _labels(self, batch: int, device: torch.device, class_labels) -> torch.Tensor | None:
        if not self.class_conditional:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional prior")
            return None
        labels = self.class_labels if class_labels is None else class_labels
        if labels is None:
            raise ValueError("this prior is class-conditional: pass class_labels (or set prior.class_labels)")
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        return labels.expand(batch) if labels.numel() == 1 else labels

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        """Raw network output (all channels, e.g. 6 for learned sigma) as float32."""
        b = x_t.shape[0]
        dev = self.device
        t = torch.as_tensor(t, device=dev).to(torch.float32).reshape(-1)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        if t.numel() != b:
            raise ValueError(f"t has {t.numel()} entries for a batch of {b}")
        labels = self._labels(b, dev, class_labels)
        if torch.is_grad_enabled() and x_t.requires_grad:
            # a caller differentiating through the network (e.g. ΠGDM's vector-Jacobian product)
            return self.unet_sample(x_t.to(dev, self.dtype), t, labels).to(torch.float32)
        with torch.inference_mode():
            out = self.unet_sample(x_t.to(dev, self.dtype), t, labels)
        # a fresh tensor made outside inference mode, so callers may use it in autograd-recorded code
        return out.to(torch.float32, copy=True)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.model_output(x_t, t, class_labels)[:, : self.eps_channels]
