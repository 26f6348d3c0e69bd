"""Tasks are data: a name mapped to an operator factory, a default noise level and a baseline.

``make_task(name, in_shape, **overrides)`` builds a ``Task`` for one image shape. Overrides:
``sigma_y`` for every task, plus the task's own parameters (``TASKS[name].params``): ``scale``
(SR tasks), ``blur_sigma`` (Gaussian deblur; a pair (std_h, std_w) for ``deblur-aniso``), ``blur_size``
(``deblur-uniform``), ``border`` and ``threshold`` (blur / bicubic), ``keep``, ``mask``, ``mask_seed``
(``inpaint``; ``mask`` may be a bool/0-1 mask or a mask image in [-1, 1], white = observed, see
``inpaint.mask_from_image``; without it a random pixel mask keeping ``keep`` of the pixels is drawn
from ``mask_seed``, the same for every image of a size). An override given as ``None`` means "use the
default"; a parameter the task does not take raises ValueError.

Baselines (what a restoration must beat), all returned clamped to [-1, 1]:

* ``"bicubic"`` (SR): ``interpolate(clamp(y, -1, 1), (H, W), mode="bicubic", align_corners=False)``;
* ``"degraded"`` (deblur, denoise, inpaint): the measurement in image form, ``operator.to_image(y)``
  (missing pixels of inpainting are 0, mid-grey);
* ``"replicate"`` (colorize): the grey measurement copied to every channel (also the pseudo-inverse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from diffrestore.resources import check_blur_sigma

from .base import DEFAULT_REL_THRESHOLD, LinearOperator
from .blur import AnisotropicGaussianBlur, GaussianBlur, UniformBlur
from .colorize import Colorization
from .denoise import Identity
from .inpaint import Inpainting, mask_from_image, random_mask
from .superres import BicubicSR, BlockAverageSR

#: each baseline in a few words, for figure titles, tables and help
BASELINE_DESCRIPTIONS = {
    "bicubic": "bicubic upscaling",
    "degraded": "the input as is",
    "replicate": "grey input in RGB",
}
BASELINES = tuple(BASELINE_DESCRIPTIONS)
#: the method name of the task-baseline row in records, tables and the demo grid
BASELINE = "baseline"


@dataclass(frozen=True)
class TaskSpec:
    """A registry entry: ``factory(in_shape, **params)`` builds the operator."""

    name: str
    factory: Callable[..., LinearOperator]
    sigma_y: float
    baseline: str
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def baseline_description(self) -> str:
        """What the task's baseline is, in a few words (``BASELINE_DESCRIPTIONS``)."""
        return BASELINE_DESCRIPTIONS[self.baseline]

    @property
    def separable(self) -> bool:
        """Whether the operator keeps dense 1-D SVD factors (memory grows with the square of each side)."""
        return "scale" in self.params or "blur_sigma" in self.params or "blur_size" in self.params


@dataclass
class Task:
    """A task instantiated for one image shape."""

    name: str
    operator: LinearOperator
    sigma_y: float
    baseline_kind: str
    params: dict

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = H x + sigma_y n with this task's noise level."""
        return self.operator.measure(x, self.sigma_y, generator)

    def baseline(self, y: torch.Tensor) -> torch.Tensor:
        """The naive reconstruction of ``x`` from ``y`` (see the module docstring), in [-1, 1]."""
        if self.baseline_kind == "bicubic":
            _, h, w = self.operator.in_shape
            up = F.interpolate(y.clamp(-1, 1), size=(h, w), mode="bicubic", align_corners=False)
        elif self.baseline_kind in ("degraded", "replicate"):
            up = self.operator.to_image(y)
        else:  # pragma: no cover - guarded by register()
            raise ValueError(f"unknown baseline kind {self.baseline_kind!r}")
        return up.clamp(-1, 1)


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {spec.baseline!r}")
    TASKS[spec.name] = spec
    return spec


def list_tasks() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered task, in registration order."""
    return [(name, spec.description) for name, spec in TASKS.items()]


def task_names() -> list[str]:
    """Registered task names, in registration order."""
    return list(TASKS)


def get_task_spec(name: str) -> TaskSpec:
    """The registry entry of task ``name``; ValueError naming the valid tasks."""
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return spec


def measurement_factor(name: str, **overrides) -> int:
    """How many image pixels one measurement pixel covers per side: the scale of an SR task, else 1."""
    spec = get_task_spec(name)
    scale = overrides.get("scale")
    scale = spec.params.get("scale", 1) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive whole number, got {scale!r}")
    return scale


def check_task(name: str, **overrides) -> None:
    """Validate a task name and its parameters without an image, on a small probe whose sides suit the
    task (a multiple of its scale, 64 or just above); a given mask is checked against each image later."""
    factor = measurement_factor(name, **overrides)
    side = factor * max(1, 64 // factor)
    make_task(name, (3, side, side), **{k: v for k, v in overrides.items() if k != "mask"})


def make_task(name: str, in_shape, **overrides) -> Task:
    """Build task ``name`` for images of ``in_shape`` (C, H, W).

    Raises ValueError for an unknown task or parameter, ImageSizeError for a size the operator
    cannot take (e.g. sides not divisible by the SR scale).
    """
    spec = get_task_spec(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    sigma_y = float(overrides.pop("sigma_y", spec.sigma_y))
    if not sigma_y >= 0:
        raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
    unknown = sorted(set(overrides) - set(spec.params))
    if unknown:
        allowed = ", ".join(["sigma_y", *spec.params]) or "sigma_y"
        raise ValueError(f"task {name!r} has no parameter {', '.join(unknown)}; it takes: {allowed}")
    params = {**spec.params, **overrides}
    operator = spec.factory(tuple(int(s) for s in in_shape), **params)
    return Task(name=name, operator=operator, sigma_y=sigma_y, baseline_kind=spec.baseline, params=params)


# --- factories ---------------------------------------------------------------------------------
def _block_sr(in_shape, scale):
    return BlockAverageSR(in_shape, scale)


def _bicubic_sr(in_shape, scale, threshold):
    return BicubicSR(in_shape, scale, threshold=threshold)


def _gaussian(in_shape, blur_sigma, border, threshold):
    check_blur_sigma(blur_sigma)
    return GaussianBlur(in_shape, blur_sigma, border=border, threshold=threshold)


def _aniso(in_shape, blur_sigma, border, threshold):
    if not isinstance(blur_sigma, (tuple, list)) or len(blur_sigma) != 2:
        raise ValueError(f"deblur-aniso needs blur_sigma as a pair (std_h, std_w), got {blur_sigma!r}")
    check_blur_sigma(blur_sigma)
    return AnisotropicGaussianBlur(in_shape, blur_sigma[0], blur_sigma[1], border=border, threshold=threshold)


def _uniform(in_shape, blur_size, border, threshold):
    return UniformBlur(in_shape, blur_size, border=border, threshold=threshold)


def _inpaint(in_shape, keep, mask, mask_seed):
    if mask is None:
        mask = random_mask(in_shape[1:], keep, generator=torch.Generator().manual_seed(int(mask_seed)))
    else:
        mask = mask_from_image(mask)
    return Inpainting(in_shape, mask)


_T = DEFAULT_REL_THRESHOLD
for _spec in (
    TaskSpec("sr4", _block_sr, 0.0, "bicubic", {"scale": 4}, "4x block-average downsampling (DDRM sr4)"),
    TaskSpec("deblur", _gaussian, 0.0, "degraded", {"blur_sigma": 1.0, "border": "zero", "threshold": _T},
             "Gaussian blur, std 1 px"),
    TaskSpec("denoise", lambda in_shape: Identity(in_shape), 0.1, "degraded", {}, "Gaussian noise, sigma_y 0.1"),
    TaskSpec("noisy-sr4", _block_sr, 0.05, "bicubic", {"scale": 4}, "4x block averaging + noise 0.05"),
    TaskSpec("sr2", _block_sr, 0.0, "bicubic", {"scale": 2}, "2x block-average downsampling"),
    TaskSpec("sr8", _block_sr, 0.0, "bicubic", {"scale": 8}, "8x block-average downsampling"),
    TaskSpec("sr4-bicubic", _bicubic_sr, 0.0, "bicubic", {"scale": 4, "threshold": _T},
             "4x antialiased bicubic downsampling"),
    TaskSpec("deblur-uniform", _uniform, 0.0, "degraded", {"blur_size": 9, "border": "zero", "threshold": _T},
             "9x9 box blur"),
    TaskSpec("deblur-aniso", _aniso, 0.0, "degraded", {"blur_sigma": (1.0, 3.0), "border": "zero", "threshold": _T},
             "anisotropic Gaussian blur, std 1 px vertically x 3 px horizontally"),
    TaskSpec("inpaint", _inpaint, 0.0, "degraded", {"keep": 0.5, "mask": None, "mask_seed": 0},
             "random pixel mask keeping 50% (fixed seed; or a given mask)"),
    TaskSpec("colorize", lambda in_shape: Colorization(in_shape), 0.0, "replicate", {}, "RGB -> channel mean"),
    # names for real photos: a camera's low-resolution image is closer to an antialiased (bicubic)
    # downsampling than to the report's 4x4 block average, which leaves a faint 4x4 pattern on them
    TaskSpec("upscale", _bicubic_sr, 0.0, "bicubic", {"scale": 4, "threshold": _T},
             "a real low-resolution photo, upscaled 4x (--scale N for another factor; as sr4-bicubic)"),
    TaskSpec("upscale-noisy", _bicubic_sr, 0.05, "bicubic", {"scale": 4, "threshold": _T},
             "a noisy low-resolution photo, upscaled 4x (noise 0.05; --sigma-y to change it)"),
):
    register(_spec)
del _spec
