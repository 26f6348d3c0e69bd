"""SRLDM: restore with the 4x latent super-resolution model alone (report Sec. 3.1).

The measurement is turned into the model's low-resolution conditioning and the LDM-SR model samples a
high-resolution image with the official DDIM sampler (``methods.ddim``); the degradation model itself is
not used beyond its shapes, and ``sigma_y`` is ignored (SRLDM does not model the measurement noise),
unless the option ``consistency`` (not the report's) asks for a final data-consistency step.

Conditioning, decided from the shapes (``operator.in_shape`` = (C, H, W), and the measurement seen as an
image through ``operator.to_image(y)``; a grey measurement is repeated to RGB):

* measurement at 1/4 of the image (SR x4): it **is** the conditioning;
* measurement at the image size (deblur, denoise, ...): downscaled 4x with ``lr_filter``;
* any other size: resized to the 1/4 size with ``lr_filter`` (a stand-in; SRLDM has no better answer).

``lr_filter`` defaults to antialiased bicubic (``torch.nn.functional.interpolate(..., antialias=True)``,
which is PIL's BICUBIC kernel): LDM-SR is evaluated on, and our golden inputs are made with, bicubic 4x
downsampling, so this keeps the conditioning in the distribution the model expects. It also averages
pixel noise slightly better than ``"area"`` (a 4x4 box: residual iid noise std x0.25 vs x0.20 for
bicubic); ``"area"`` and ``"bilinear"`` are available. The conditioning is clamped to [-1, 1] like an
image (the model only ever saw LR images from 8-bit data).

Sizes: latent side = ceil(image side / 4). An image side that is not a multiple of 4 is reflect-padded
(bottom/right) before downscaling; the latent sides must also be multiples of the UNet's
``multiple_of``, so the conditioning is reflect-padded (bottom/right; replicate when the pad exceeds the
side) and the decoded image is cropped back to (H, W). Padding bottom/right keeps the LR and HR pixel
grids aligned at the top-left corner.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .common import MethodArgumentError, StepInfo, check_rho, make_randn, spectral_consistency
from .ddim import check_eta, check_range, ddim_sample, ddim_schedule

LR_FILTERS = ("bicubic", "area", "bilinear")
#: default ``rho``: the assumed error std (in [-1, 1] units) of SRLDM's output on the rows H observes,
#: which weighs it against a noisy measurement in the ``consistency`` step
SRLDM_CONSISTENCY_RHO = 0.3


def check_values(*, eta: float, start: float, lr_filter: str, rho: float, **_) -> None:
    """The option values SRLDM accepts."""
    check_eta(eta)
    check_range(start)
    _check_lr_filter(lr_filter)
    check_rho(rho)


def _check_lr_filter(lr_filter: str) -> None:
    if lr_filter not in LR_FILTERS:
        raise MethodArgumentError(f"unknown lr_filter {lr_filter!r}; use one of {', '.join(LR_FILTERS)}")


def resize(img: torch.Tensor, size: tuple[int, int], lr_filter: str = "bicubic") -> torch.Tensor:
    """Resize (B, C, h, w) to ``size``; antialiased when shrinking (``area`` is a box average)."""
    _check_lr_filter(lr_filter)
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    if lr_filter == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=lr_filter, align_corners=False, antialias=True)


def pad_bottom_right(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad (B, C, h, w) to (height, width) at the bottom/right: reflect, or replicate for large pads."""
    ph, pw = height - img.shape[-2], width - img.shape[-1]
    if ph == 0 and pw == 0:
        return img
    mode = "reflect" if ph < img.shape[-2] and pw < img.shape[-1] else "replicate"
    return F.pad(img, (0, pw, 0, ph), mode=mode)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def lr_conditioning(operator, y: torch.Tensor, factor: int = 4, lr_filter: str = "bicubic") -> torch.Tensor:
    """The (B, 3, ceil(H/f), ceil(W/f)) conditioning image in [-1, 1] for a measurement ``y``."""
    _, H, W = operator.in_shape
    img = operator.to_image(y)
    if img.ndim != 4 or img.shape[1] not in (1, 3):
        raise ValueError(f"SRLDM needs a grey or RGB measurement image, got shape {tuple(img.shape)}")
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    h, w = img.shape[-2:]
    hl, wl = -(-H // factor), -(-W // factor)
    if (h, w) == (H, W):  # full-size measurement: pad to a multiple of the factor, shrink exactly 4x
        img = pad_bottom_right(img, hl * factor, wl * factor)
    lr = resize(img, (hl, wl), lr_filter)  # a no-op for an SR x4 measurement
    return lr.clamp(-1.0, 1.0)


def upsample_conditioning(lr: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic upsampling of the conditioning back to image size: the initial estimate of ``start`` < 1."""
    return F.interpolate(lr, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def initial_latent(prior, schedule, noise: torch.Tensor, x_init: torch.Tensor | None) -> torch.Tensor:
    """The sampler's first state: pure noise, or (``x_init`` given) the encoded estimate diffused to the
    first grid point, ``sqrt(a) E(x_init) + sqrt(1 - a) n`` (SDEdit / CCDF: a coarse estimate replaces the
    noisiest steps, where a small model's eps is least reliable)."""
    if x_init is None:
        return noise
    a = float(schedule.alphas[0])
    return a**0.5 * prior.encode(x_init) + (1 - a) ** 0.5 * noise


def restore(
    prior, operator, y: torch.Tensor, *, sigma_y: float, steps: int = 100, eta: float = 1.0,
    generator: torch.Generator | None = None, randn: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None, lr_filter: str = "bicubic", start: float = 1.0,
    consistency: bool = False, rho: float = SRLDM_CONSISTENCY_RHO,
) -> torch.Tensor:
    """SRLDM restoration of ``y``; returns x_hat (B, C, H, W) in [-1, 1].

    ``start`` = 1 is the report's sampler (from pure noise at t = T). ``start`` < 1 runs the ``steps``
    over the first ``start`` of the diffusion only, starting from the bicubic upsampled conditioning
    encoded and diffused to that level (``initial_latent``).

    ``consistency`` (off in the report's SRLDM) blends the decoded output with the measurement in the
    spectral space of ``H`` (``common.spectral_consistency``, the output's error std taken as ``rho``;
    for a noiseless measurement the projection onto ``{x : Hx = y}``, whatever ``rho``). Why:
    nothing else ties SRLDM's low frequencies to the measurement, and a small autoencoder drifts in
    colour; this keeps the generated detail and replaces what ``H`` observes (the diffusion-SR
    "colour fix", done with the true operator). The output is then not clamped, like DDRM's.

    ``randn(shape)``, when given, supplies every standard-normal draw in order (x_T, then one per step);
    otherwise they come from ``generator``. ``callback(info)`` gets a ``StepInfo`` per step: ``i``,
    ``steps``, ``t``, the latents ``z_t`` (the state the UNet evaluated) and ``z0`` (its x0
    prediction), and their decodes ``x_t`` and ``x0`` cropped to (H, W), decoded only when read.

    Args:
        eta: DDIM eta, the share of fresh noise in each step (0: deterministic).
        lr_filter: how a measurement not at the model's input size is resized: bicubic, area or bilinear.
        start: fraction of the diffusion the steps cover; below 1 they start from the upsampled measurement.
        consistency: blend the decoded output with the measurement on the rows H observes.
        rho: the assumed error std of the output on the observed rows (``consistency`` only).
    """
    # SRLDM conditions on the measurement as if it were a clean LR image; sigma_y only weighs ``consistency``
    check_values(eta=eta, start=start, lr_filter=lr_filter, rho=rho)
    _, H, W = operator.in_shape
    f, m = prior.downscale, prior.multiple_of
    device = prior.alphas_cumprod.device
    randn = randn or make_randn(generator, device)

    with torch.no_grad():
        lr = lr_conditioning(operator, y.to(device=device, dtype=torch.float32), f, lr_filter)
        hl, wl = lr.shape[-2:]
        lr = pad_bottom_right(lr, _ceil_to(hl, m), _ceil_to(wl, m))
        shape = (lr.shape[0], prior.latent_channels, *lr.shape[-2:])
        schedule = ddim_schedule(prior.alphas_cumprod, steps, eta, start)
        x_init = upsample_conditioning(lr, f) if start < 1 else None
        x_T = initial_latent(prior, schedule, randn(shape).to(device=device, dtype=torch.float32), x_init)

        def decode(z):
            return prior.decode(z)[..., :H, :W]

        step_cb = None
        if callback is not None:

            def step_cb(info):
                z_t, z0 = info["x_t"], info["pred_x0"]
                callback(StepInfo(
                    i=info["i"], steps=steps, t=info["t"], z_t=z_t, z0=z0,
                    x_t=lambda: decode(z_t), x0=lambda: decode(z0),
                ))

        z0 = ddim_sample(
            lambda z, t: prior.eps(z, t, lr),
            x_T,
            schedule,
            randn=randn,
            callback=step_cb,
        )
        x = decode(z0)
        if consistency:
            return spectral_consistency(operator, x, y.to(x), sigma_y, rho)
        return x.clamp(-1.0, 1.0)
