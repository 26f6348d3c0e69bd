"""One restoration, end to end: image -> (degrade) -> method -> restored image, scored.

``restore_and_score`` is the one per-image path of ``diffrestore restore``, the Python API, the demo
and the evaluation: methods run through ``run_method`` with seeds from ``image_seed``, and scores come
from ``metrics.quality``, so a result never depends on which entry point (or which batch, order or
process) produced it.
"""

from __future__ import annotations

import hashlib
import math
import operator
import time
from typing import NamedTuple

import torch

from diffrestore.methods import get_method
from diffrestore.operators.base import ImageSizeError
from diffrestore.operators.tasks import BASELINE  # the method name of a task's own baseline


def image_seed(run_seed: int, image_id: str) -> int:
    """Per-image seed from (run seed, image id): independent of batch, order, rank or resume point."""
    digest = hashlib.sha256(f"{int(run_seed)}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def measure_image(task, x: torch.Tensor, seed: int, image_id: str) -> torch.Tensor:
    """y = H x + sigma_y n for one clean image, drawn on the CPU from a generator seeded by
    (run seed, image id): every entry point and every method sees the same measurement."""
    g = make_generator(image_seed(seed, image_id + "#measurement"))
    return task.operator.measure(x.cpu(), task.sigma_y, generator=g)


def crop_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int] | None]:
    """Centre-crop (…, H, W) so both sides are multiples of ``multiple``.

    Returns the crop and the box (top, left, height, width) in input coordinates, or None when no
    crop was needed. Cropping (rather than resizing) keeps every kept pixel untouched, so a large
    image is restored at its own resolution by a fully-convolutional prior.
    """
    h, w = x.shape[-2:]
    nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
    if nh == 0 or nw == 0:
        raise ImageSizeError(f"image {h}x{w} is smaller than the required multiple {multiple}")
    if (nh, nw) == (h, w):
        return x, None
    top, left = (h - nh) // 2, (w - nw) // 2
    return x[..., top : top + nh, left : left + nw], (top, left, nh, nw)


def lcm(*values: int) -> int:
    out = 1
    for v in values:
        out = out * int(v) // math.gcd(out, int(v))
    return out


def resolve_steps(method: str, steps: int | None, prior=None) -> int:
    """The step count a run uses: ``steps``, or the method's default when None. ValueError (one line) for
    fewer than 1, or more than the prior's diffusion has timesteps (when the prior is given)."""
    used = get_method(method).default_steps if steps is None else steps
    try:
        used = operator.index(used)
    except TypeError:
        raise ValueError(f"steps must be a whole number, got {steps!r}") from None
    if used < 1:
        raise ValueError(f"steps must be at least 1, got {used}")
    limit = getattr(prior, "num_timesteps", None)
    if limit is not None and used > limit:
        raise ValueError(f"{used} steps for {method}: its prior's diffusion has {limit} timesteps; use at most {limit} steps")
    return used


class MethodRun(NamedTuple):
    x_hat: torch.Tensor  # the restoration (the mean of the draws when samples > 1)
    seconds: float
    std: torch.Tensor | None  # per-pixel std across the draws (samples > 1), else None


def run_method(
    method: str,
    priors: dict,
    task,
    y: torch.Tensor,
    *,
    steps: int | None,
    seed: int,
    callback=None,
    samples: int = 1,
    tile: int | None = None,
    overlap: int | None = None,
    on_tiles=None,
    **method_kwargs,
) -> MethodRun:
    """Run a registered method on a batch of measurements (``samples`` draws each, averaged).

    ``tile``/``overlap``: run the network on blended tiles of that many pixels (``priors.tiled``); None
    tiles only when the image would not fit in memory (saying so on stderr), 0 never. ``on_tiles(n)`` is
    called after every ``n`` network tiles (a progress bar's hook)."""
    from diffrestore.priors.tiled import TiledPixelPrior, TiledLatentSRPrior, plan_tiling, say_once

    info = get_method(method)
    prior = priors.get(info.prior)
    if prior is None:
        raise ValueError(f"method {method!r} needs a {info.prior} prior; pass one with --prior")
    device = y.device
    batch = y.shape[0] * (samples if type(samples) is int else 1)
    prior, note = plan_tiling(prior, task.operator.in_shape[-2:], batch=batch, device=device, tile=tile, overlap=overlap)
    if note:
        say_once(note)
    if isinstance(prior, (TiledPixelPrior, TiledLatentSRPrior)):
        prior.on_tiles = on_tiles
    generator = make_generator(seed, device)
    extra = {k: v for k, v in method_kwargs.items() if v is not None}
    kwargs = dict(sigma_y=task.sigma_y, steps=resolve_steps(method, steps, prior), generator=generator, callback=callback, **extra)
    start = time.perf_counter()
    if type(samples) is int and samples == 1:
        x_hat, std = info.restore(prior, task.operator, y, **kwargs), None
    else:
        draws = info.restore_draws(prior, task.operator, y, samples=samples, **kwargs)
        x_hat, std = draws.mean(dim=1), draws.float().std(dim=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(x_hat).all():
        raise FloatingPointError(f"{method} produced non-finite values")
    return MethodRun(x_hat, seconds, std)


#: the std (in [-1, 1] image units) that a std map shows as white; fixed, so maps compare across images
STD_MAP_WHITE = 0.1


def std_map_image(std: torch.Tensor) -> torch.Tensor:
    """The per-pixel spread of the draws (B, C, H, W) as a grey [-1, 1] image: the channel mean of the
    std, black at 0 and white at ``STD_MAP_WHITE`` and above."""
    return (std.mean(dim=1, keepdim=True) / STD_MAP_WHITE).clamp(0, 1) * 2 - 1


def spread_stats(std: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor | None = None) -> dict[str, float]:
    """Mean and max of one image's per-pixel spread, and (clean image ``x`` given) the correlation of
    its channel mean with the absolute error of ``x_hat``: how well the spread says where the errors are."""
    out = {"mean": float(std.mean()), "max": float(std.max())}
    if x is not None:
        error = (x_hat.float() - x.float()).abs().mean(dim=1).flatten()
        out["error_correlation"] = float(torch.corrcoef(torch.stack([std.float().mean(dim=1).flatten(), error]))[0, 1])
    return out


def prior_kind(prior) -> str:
    """"latent" for a ``LatentSRPrior``, "pixel" for a ``PixelPrior`` (tiled and frozen-graph priors
    subclass them); TypeError for anything else."""
    from diffrestore.priors.base import LatentSRPrior, PixelPrior

    if isinstance(prior, LatentSRPrior):
        return "latent"
    if isinstance(prior, PixelPrior):
        return "pixel"
    raise TypeError(f"{type(prior).__name__} is neither a PixelPrior nor a LatentSRPrior")


def prior_multiple(prior) -> int:
    """Image sides a prior can take must be multiples of this."""
    if prior_kind(prior) == "latent":
        return prior.downscale * prior.multiple_of
    return prior.multiple_of


class Measurement(NamedTuple):
    """One input ready to restore: the measurement ``y`` (1, ...) of ``task``, the clean image ``x``
    (when there is one to score against; else None) and what was cropped, if anything."""

    x: torch.Tensor | None
    y: torch.Tensor
    task: object
    note: str | None


def prepare_measurement(img: torch.Tensor, *, image_id: str, task_name: str, overrides: dict, prior, degrade: bool,
                        mask, seed: int, device) -> Measurement:
    """The measurement of one image (3, H, W) in [-1, 1]: the image itself, or (``degrade``) a clean
    image degraded with a draw seeded from (``seed``, ``image_id``). Sides are centre-cropped to what
    the task and prior take; with ``degrade`` they must stay big enough to score."""
    from diffrestore.metrics.quality import SSIM_WINDOW
    from diffrestore.operators.tasks import make_task, measurement_factor

    factor = measurement_factor(task_name, **overrides)
    multiple = lcm(factor, prior_multiple(prior))
    need = multiple if degrade else max(1, multiple // factor)
    task_overrides = dict(overrides, **({"mask": mask} if mask is not None else {}))
    cropped, box = crop_to_multiple(img.unsqueeze(0), need)
    note = None
    if box is not None:
        note = f"centre-cropped {img.shape[-2]}x{img.shape[-1]} to {box[2]}x{box[3]} (sides must be multiples of {need})"
    if degrade:
        if min(cropped.shape[-2:]) < SSIM_WINDOW:
            raise ImageSizeError(
                f"{image_id}: {cropped.shape[-2]}x{cropped.shape[-1]} is too small to degrade and score: "
                f"--degrade needs at least {SSIM_WINDOW}x{SSIM_WINDOW} (the SSIM window)"
            )
        x = cropped.to(device)
        task = make_task(task_name, tuple(x.shape[1:]), **task_overrides)
        return Measurement(x, measure_image(task, x, seed, image_id).to(device), task, note)
    h, w = cropped.shape[-2:]
    task = make_task(task_name, (3, h * factor, w * factor), **task_overrides)
    y = cropped.to(device)
    if task.operator.measurement_shape[0] == 1 and y.shape[1] == 3:
        y = y.mean(dim=1, keepdim=True)
    if tuple(y.shape[1:]) != tuple(task.operator.measurement_shape):
        raise ValueError(f"{image_id}: measurement of shape {tuple(y.shape[1:])} does not fit task {task_name}")
    return Measurement(None, y, task, note)


def used_options(method: str, given: dict) -> dict:
    """Every option of ``method`` with the value a run used: its default unless ``given``."""
    from diffrestore.methods import method_options

    return {**method_options(method), **{k: v for k, v in given.items() if v is not None}}


# --------------------------------------------------------------------------------------------------
# restore and score one image


#: every full-reference metric (``metrics.quality.full_reference``): PSNR, PSNR-Y, SSIM and LPIPS
FULL_REFERENCE = ("psnr", "psnr_y", "ssim", "lpips")


def score_image(x_hat: torch.Tensor, x: torch.Tensor, metrics=FULL_REFERENCE, *, quantize: bool = False) -> dict[str, float]:
    """Full-reference scores of one image (batch of 1) against the clean ``x``: every metric
    (``FULL_REFERENCE``; LPIPS becomes ``lpips_note`` when its weights are missing), or some of PSNR,
    PSNR-Y and SSIM, on the float values or (``quantize``) on the 8-bit values a saved PNG holds."""
    from diffrestore.metrics import quality

    if tuple(metrics) == FULL_REFERENCE and not quantize:
        return quality.full_reference(x_hat, x)
    fns = {"psnr": quality.psnr, "psnr_y": quality.psnr_y, "ssim": quality.ssim}
    unknown = [m for m in metrics if m not in fns]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} (alone: {', '.join(fns)}; all of {', '.join(FULL_REFERENCE)})")
    return {m: float(fns[m](x_hat, x, quantize=quantize)[0]) for m in metrics}


def consistency(operator, x_hat: torch.Tensor, y: torch.Tensor) -> float:
    """``||H x_hat - y||``: how far a restoration is from explaining its measurement."""
    return float((operator.H(x_hat) - y).norm())


class Restored(NamedTuple):
    """One restored and scored image (tensors (1, C, H, W) in [-1, 1])."""

    x_hat: torch.Tensor  # the restoration (float32), clamped to [-1, 1]
    raw: torch.Tensor  # the restoration before clamping
    std: torch.Tensor | None  # per-pixel spread of the draws (samples > 1)
    x: torch.Tensor | None  # the clean image, when scored against one
    y: torch.Tensor  # the measurement the method saw
    task: object  # the Task (operator, sigma_y, baseline)
    note: str | None  # what was cropped, if anything
    seconds: float  # the method alone
    steps: int  # the steps actually run (0 for the baseline)
    options: dict  # every option of the method with the value used ({} for the baseline)
    metrics: dict  # the full-reference scores asked for (empty without a clean image)
    consistency: float  # ||H x_hat - y||
    consistency_raw: float  # the same before clamping: what the method itself enforces
    spread: dict | None  # ``spread_stats`` of the draws (samples > 1)
    baseline: Restored | None  # the task's baseline on the same measurement, when asked for

    def quality(self) -> dict[str, float]:
        """The scores of a ``restore`` record: consistency of the restoration (clamped and raw) and of the
        baseline, and with a clean image the metrics and the baseline's PSNR / SSIM."""
        out = {"consistency": self.consistency, "consistency_raw": self.consistency_raw,
               "baseline_consistency": self.baseline.consistency, **self.metrics}  # fmt: skip
        if self.x is not None:
            out.update(baseline_psnr=self.baseline.metrics["psnr"], baseline_ssim=self.baseline.metrics["ssim"])
        return out


def restore_and_score(m: Measurement, *, method: str, prior, steps: int | None, seed: int, image_id: str,
                      options: dict | None = None, tile: int | None = None, overlap: int | None = None,
                      callback=None, on_tiles=None, metrics=FULL_REFERENCE, quantize: bool = False,
                      baseline: bool = False) -> Restored:
    """Restore one prepared measurement with ``method`` (or ``BASELINE``) and score it: the one per-image
    path of ``restore``, the Python API, the demo and the evaluation, so a number never depends on the
    entry point. Seeded from (``seed``, ``image_id``); ``steps`` None: the method's default.
    ``metrics`` / ``quantize``: see ``score_image`` (scored only when ``m.x`` is given); ``baseline``:
    also score the task's baseline (PSNR, SSIM, consistency). ``tile`` / ``overlap`` / ``on_tiles``: see
    ``run_method``; ``callback`` gets every step's ``StepInfo``."""
    if method == BASELINE:
        start = time.perf_counter()
        raw, std = m.task.baseline(m.y), None
        seconds, steps, used = time.perf_counter() - start, 0, {}
    else:
        steps = resolve_steps(method, steps, prior)
        raw, seconds, std = run_method(
            method, {"pixel": prior, "latent": prior}, m.task, m.y, steps=steps, seed=image_seed(seed, image_id),
            callback=callback, tile=tile, overlap=overlap, on_tiles=on_tiles, **(options or {}),
        )  # fmt: skip
        used = used_options(method, options or {})
    x_hat = raw.detach().float().clamp(-1, 1)
    op = m.task.operator
    scores = score_image(x_hat, m.x, metrics, quantize=quantize) if m.x is not None else {}
    spread = None if std is None else spread_stats(std.to(x_hat.device), x_hat, m.x)
    base = None
    if baseline:
        base = restore_and_score(m, method=BASELINE, prior=None, steps=0, seed=seed, image_id=image_id, metrics=("psnr", "ssim"))
    return Restored(x_hat, raw, std, m.x, m.y, m.task, m.note, seconds, steps, used, scores,
                    consistency(op, x_hat, m.y), consistency(op, raw, m.y), spread, base)  # fmt: skip
