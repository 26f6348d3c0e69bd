"""One restoration, end to end: image -> (degrade) -> method -> restored image + record.

The CLI's ``restore`` command, the evaluation grid and the demo all run methods through
``run_method`` with seeds from ``image_seed``, so a result never depends on which entry point (or
which batch, order or process) produced it.
"""

from __future__ import annotations

import hashlib
import sys
import math
import time
from typing import NamedTuple

import torch

from diffrestore.methods import get_method
from diffrestore.operators.base import ImageSizeError


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
    kwargs = dict(sigma_y=task.sigma_y, steps=steps or info.default_steps, generator=generator, callback=callback, **extra)
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


def _measurement_factor(task_name: str, overrides: dict) -> int:
    """Spatial ratio image side / measurement side of a task (4 for sr4, 1 for deblur)."""
    from diffrestore.operators.tasks import make_task

    probe = make_task(task_name, (3, 64, 64), **overrides).operator
    return 64 // probe.measurement_shape[-1]


def prior_multiple(prior) -> int:
    """Image sides a prior can take must be multiples of this."""
    if hasattr(prior, "encode"):
        return prior.downscale * prior.multiple_of
    return prior.multiple_of


def restore_file_inputs(
    images,
    *,
    method: str,
    prior,
    prior_spec: str,
    task_name: str,
    overrides: dict,
    degrade: bool,
    mask,
    steps: int | None,
    seed: int,
    device: str,
    out,
    written: list,
    method_kwargs: dict,
    progress: bool = True,
    adm_config: dict | None = None,
    tile: int | None = None,
    overlap: int | None = None,
) -> list[dict]:
    """Restore image files one by one and write PNGs + a JSON record per image into ``out``.

    ``images`` is a list of (path, tensor (3, H, W) in [-1, 1]). Every file written is appended to
    ``written`` so a caller can remove them if a later image fails. ``adm_config`` (the prior's
    ``--adm-config``, if any) goes into the records. ``tile``/``overlap``: see ``run_method``.
    """
    from tqdm.auto import tqdm

    from diffrestore import io
    from diffrestore.evaluation.metrics import psnr, ssim
    from diffrestore.operators.tasks import make_task
    from diffrestore.progress import RestorationProgress

    stems = [p.stem for p, _ in images]
    if len(set(stems)) != len(stems):
        raise ValueError("two inputs share a file name stem; their outputs would overwrite each other")
    factor = _measurement_factor(task_name, overrides)
    multiple = lcm(factor, prior_multiple(prior))
    records = []
    bar = tqdm(images, desc="images", unit="img", disable=not progress or len(images) == 1)
    for path, img in bar:
        image_id = path.name
        note = None
        if degrade:
            x, box = crop_to_multiple(img.unsqueeze(0), multiple)
        else:
            x = None
            y_img, box = crop_to_multiple(img.unsqueeze(0), max(1, multiple // factor))
        if box is not None:
            note = f"centre-cropped {img.shape[-2]}x{img.shape[-1]} to {box[2]}x{box[3]} (sides must be multiples of {multiple if degrade else max(1, multiple // factor)})"
            print(f"{path.name}: {note}", file=sys.stderr)
        task_overrides = dict(overrides)
        if mask is not None:
            task_overrides["mask"] = mask
        if degrade:
            x = x.to(device)
            task = make_task(task_name, tuple(x.shape[1:]), **task_overrides)
            y = measure_image(task, x, seed, image_id).to(device)
        else:
            h, w = y_img.shape[-2:]
            task = make_task(task_name, (3, h * factor, w * factor), **task_overrides)
            y = y_img.to(device)
            if task.operator.measurement_shape[0] == 1 and y.shape[1] == 3:
                y = y.mean(dim=1, keepdim=True)
            if tuple(y.shape[1:]) != tuple(task.operator.measurement_shape):
                raise ValueError(f"{path}: measurement of shape {tuple(y.shape[1:])} does not fit task {task_name}")
        bar = RestorationProgress(f"{path.name} {method}", enabled=progress)
        x_hat, seconds, std = run_method(
            method, {"pixel": prior, "latent": prior}, task, y, steps=steps, seed=image_seed(seed, image_id),
            callback=bar.step, on_tiles=bar.tiles, tile=tile, overlap=overlap, **method_kwargs,
        )
        bar.close()
        raw, x_hat = x_hat, x_hat.clamp(-1, 1)
        stem = path.stem
        record = {
            "input": str(path),
            "image_id": image_id,
            "method": method,
            "task": task_name,
            "prior": prior_spec,
            **({"adm_config": adm_config} if adm_config is not None else {}),
            "steps": steps,
            "options": {k: v for k, v in method_kwargs.items() if v is not None},
            "seed": seed,
            "sigma_y": task.sigma_y,
            "overrides": {k: v for k, v in overrides.items()},
            "size": list(x_hat.shape[-2:]),
            "crop": note,
            "seconds": seconds,
            "device": str(device),
        }
        files = {f"{stem}_{task_name}_{method}.png": x_hat}
        if std is not None:
            files[f"{stem}_{task_name}_{method}_std.png"] = std_map_image(std)
            record["sample_std"] = {**spread_stats(std, x_hat, x if degrade else None), "png_white": STD_MAP_WHITE}
        if degrade:
            baseline = task.baseline(y).clamp(-1, 1)
            record.update(
                psnr=float(psnr(x_hat, x)[0]),
                ssim=float(ssim(x_hat, x)[0]),
                baseline_psnr=float(psnr(baseline, x)[0]),
                baseline_ssim=float(ssim(baseline, x)[0]),
                consistency=float((task.operator.H(x_hat) - y).norm()),
                # before clamping to [-1, 1]: what the method itself enforces, whatever the prior's quality
                consistency_raw=float((task.operator.H(raw) - y).norm()),
                baseline_consistency=float((task.operator.H(baseline) - y).norm()),
            )
            files[f"{stem}_{task_name}_degraded.png"] = task.operator.to_image(y)
            files[f"{stem}_clean.png"] = x
        for name, tensor in files.items():
            io.write_image(out / name, tensor)
            written.append(out / name)
        io.atomic_write_json(out / f"{stem}_{task_name}_{method}.json", record)
        written.append(out / f"{stem}_{task_name}_{method}.json")
        records.append(record)
    return records
