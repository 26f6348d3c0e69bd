"""The Python API: restore an image in one call.

    from diffrestore import restore
    restore("photo.png", task="denoise").save("restored.png")

``restore`` returns a PIL image for a path, PIL or numpy input and a tensor for a tensor input;
``run`` returns everything a restoration produced (the image, the spread of the samples, the JSON
record). Both take the CLI's settings as keywords and check them the same way, before any model is
loaded. Priors are loaded once per process and reused.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["Restoration", "restore", "run"]


@dataclass
class Restoration:
    """What one call of :func:`run` produced. Images are PIL images (tensors in [-1, 1], shape
    (1, C, H, W), when the input was a tensor)."""

    image: Any  # the restoration (the mean of the samples when samples > 1)
    std_map: Any | None  # per-pixel spread of the samples as a grey image (samples > 1), else None
    degraded: Any | None  # the measurement as an image (degrade=True), else None
    record: dict = field(default_factory=dict)  # settings used, time, scores (as restore's JSON record)


def restore(image, *, task: str, **settings) -> Any:
    """Restore ``image`` (a path, PIL image, (H, W, 3) uint8 array, or a (3, H, W) / (1, 3, H, W)
    tensor in [-1, 1]) for ``task`` (see ``diffrestore tasks``); returns the restored image in the
    input's kind (PIL, or a tensor for a tensor). ``settings`` are those of :func:`run`."""
    return run(image, task=task, **settings).image


def run(
    image,
    *,
    task: str,
    method: str = "ddrm",
    prior: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    samples: int = 1,
    degrade: bool = False,
    sigma_y: float | None = None,
    blur_sigma: float | None = None,
    scale: int | None = None,
    mask=None,
    device: str = "cpu",
    dtype: str | None = "auto",
    adm_config: dict | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    max_memory: str | None = None,
    callback: Callable | None = None,
    preset: str | None = None,
    **options,
) -> Restoration:
    """Restore one image and return a :class:`Restoration`.

    Args:
        image: the measurement (a low-resolution, blurred, noisy... photo), or with ``degrade`` a clean
            image to degrade first and score against.
        task: the degradation, e.g. ``"sr4-bicubic"`` for a real low-resolution photo, ``"denoise"``.
        method: a registered method (``diffrestore methods``).
        prior: a prior spec (ADM ``.pt`` path, diffusers folder, LDM ``.ckpt``, ``builtin:NAME``); the
            built-in default for the method's kind of prior when None.
        steps: diffusion steps (the method's default when None); seed: the run seed.
        samples: the mean of this many draws, with their per-pixel spread as ``std_map``.
        sigma_y, blur_sigma, scale, mask: task parameters (noise std in [-1, 1] units, blur std in
            pixels, SR factor, inpainting mask as a path / image, white = observed).
        device, dtype: where and in which precision the network runs ("auto": bf16 where the device
            computes it natively, else fp32, as the CLI; "fp32", "bf16", "fp16"; "paper" preset: fp32).
        adm_config: ADM hyper-parameters the checkpoint's weights do not give (the CLI's --adm-config).
        tile, overlap: run the network on overlapping tiles of this side (0: never; None: only when the
            image would not fit in memory), as the CLI's --tile / --overlap.
        max_memory: the memory a run may plan to use, e.g. "8G" (default: 80% of what is available);
            a larger estimate is refused before any model is loaded, as in the CLI.
        callback: called once per network evaluation with a ``methods.common.StepInfo``.
        preset: "paper" for the published method's own option values; None or "recommended" for the
            ones that measured better (``diffrestore methods`` shows both).
        options: any other method option by name (``eta=1.0``, ``consistency=True``...).
    """
    from diffrestore.methods import get_method
    from diffrestore.restoration import prepare_measurement, prior_kind, restore_and_score, std_map_image

    info = get_method(method)
    overrides = {k: v for k, v in (("sigma_y", sigma_y), ("blur_sigma", blur_sigma), ("scale", scale)) if v is not None}
    given = _check_settings(info, task, steps, samples, overrides, preset, options, tile, overlap)
    x, as_tensor = _to_tensor(image)
    _check_memory(info, task, x, samples, degrade, overrides, device, tile, max_memory)
    mask_t = None if mask is None else _to_tensor(mask)[0][0]
    spec = str(prior) if prior is not None else _default_prior(info.prior)
    dtype = _pick_dtype(dtype, preset, device)
    loaded = load_prior_cached(spec, device, None if dtype == "fp32" else dtype, json.dumps(adm_config, sort_keys=True) if adm_config else None)
    kind = prior_kind(loaded)
    if kind != info.prior:
        raise ValueError(f"method {info.name} needs a {info.prior} prior, but {spec} is a {kind} prior")
    image_id = _image_id(image)
    measurement = prepare_measurement(x[0], image_id=image_id, task_name=task, overrides=overrides, prior=loaded,
                                      degrade=degrade, mask=mask_t, seed=seed, device=device)
    result = restore_and_score(measurement, method=info.name, prior=loaded, steps=steps, seed=seed, image_id=image_id,
                               options=given, tile=tile, overlap=overlap, callback=callback, baseline=True)
    record = {
        "method": info.name, "task": task, "prior": spec, "steps": result.steps, "options": result.options,
        "seed": seed, "sigma_y": result.task.sigma_y, "overrides": overrides, "size": list(result.x_hat.shape[-2:]),
        "crop": result.note, "seconds": result.seconds, "device": str(device), "dtype": dtype, **result.quality(),
    }  # fmt: skip

    std = None if result.std is None else std_map_image(result.std)
    degraded = result.task.operator.to_image(result.y) if degrade else None
    return Restoration(*(_output(t, as_tensor) for t in (result.x_hat, std, degraded)), record)


def _check_settings(info, task: str, steps, samples, overrides: dict, preset, options: dict, tile, overlap) -> dict:
    """The checks of ``run`` that need no image and no model (as the CLI's): method options and preset,
    steps, task parameters, tiling. Returns the method options to pass."""
    from diffrestore import resources
    from diffrestore.methods import check_options, preset_options
    from diffrestore.operators.tasks import check_task
    from diffrestore.restoration import resolve_steps

    given = {**preset_options(info.name, preset), **check_options(info.name, {**options, "samples": samples})}
    resolve_steps(info.name, steps)  # the prior's limit is checked again once it is loaded
    check_task(task, **overrides)
    if tile is not None or overlap is not None:
        from diffrestore.priors.tiled import check_tiling, default_overlap

        if tile != 0:
            size = tile or resources.DEFAULT_TILE
            check_tiling(size, default_overlap(size) if overlap is None else overlap)
    return given


def _check_memory(info, task: str, x, samples, degrade, overrides: dict, device, tile, max_memory) -> None:
    """Refuse, before any model loads, a restoration of ``x`` whose memory estimate exceeds the budget."""
    from diffrestore import resources
    from diffrestore.operators.tasks import get_task_spec, measurement_factor

    factor = 1 if degrade else measurement_factor(task, **overrides)
    h, w = x.shape[-2] * factor, x.shape[-1] * factor
    resources.check_memory(h, w, resources.memory_budget(max_memory, str(device)), samples=samples, kind=info.prior,
                           separable=get_task_spec(task).separable,
                           tile=None if tile == 0 else (tile or resources.DEFAULT_TILE), what=f"{h}x{w} restored")


def _pick_dtype(dtype, preset, device) -> str:
    """The network precision's name: "paper" runs in fp32 unless a dtype is given, "auto" as the CLI."""
    from diffrestore.runtime import pick_dtype

    if preset == "paper" and dtype == "auto":
        dtype = "fp32"
    return pick_dtype(dtype, device)


@functools.lru_cache(maxsize=4)
def load_prior_cached(spec: str, device: str = "cpu", dtype: str | None = None, adm_config_json: str | None = None):
    """``priors.loading.load_prior``, once per (spec, device, dtype, ADM config as JSON) in a process
    (the app and repeated API calls reuse loaded networks)."""
    from diffrestore.priors.loading import load_prior

    adm_config = json.loads(adm_config_json) if adm_config_json else None
    return load_prior(spec, device=device, dtype=dtype, adm_config=adm_config)


def _default_prior(kind: str) -> str:
    from diffrestore.priors.catalog import DEFAULT_PRIORS

    return DEFAULT_PRIORS[kind]


def _image_id(image) -> str:
    """The id the measurement noise is seeded from: the file name for a path (as the CLI), else fixed."""
    return Path(image).name if isinstance(image, (str, Path)) else "image"


def _to_tensor(image):
    """(1, 3, H, W) float32 in [-1, 1], and whether the caller gave a tensor."""
    import numpy as np
    import torch
    from PIL import Image

    from diffrestore import image_io

    if isinstance(image, (str, Path)):
        return image_io.read_image(image).unsqueeze(0), False
    if isinstance(image, Image.Image):
        return image_io.uint8_to_tensor(np.asarray(image_io.pil_to_rgb(image))).unsqueeze(0), False
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return image_io.uint8_to_tensor(image).unsqueeze(0), False
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        t = t.unsqueeze(0) if t.dim() == 3 else t
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] not in (1, 3):
            raise ValueError(f"a tensor image must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError("the tensor image has non-finite values")
        return (t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t), True
    raise ValueError(f"cannot read an image from a {type(image).__name__}; give a path, PIL image, array or tensor")


def _output(t, as_tensor: bool):
    """An output image in the input's kind: a CPU tensor for a tensor input, else a PIL image."""
    if t is None:
        return None
    return t.detach().cpu() if as_tensor else _to_pil(t)


def _to_pil(t):
    from PIL import Image

    from diffrestore import image_io

    return Image.fromarray(image_io.tensor_to_uint8(t))
