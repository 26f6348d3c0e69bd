"""Helpers shared by the restoration methods: timestep schedules, alpha-bar lookups and the
injectable Gaussian source every method draws its noise from.

Randomness. Methods never call ``torch.randn`` directly; they call a ``randn(shape) -> Tensor``
callable. The default (:func:`make_randn`) draws from the caller's ``torch.Generator`` on the
generator's device and moves the result to the working device, so a run is reproducible from one
seed whatever device the model runs on. Tests pass a :class:`ReplayRandn` instead to feed the exact
draws recorded from a reference implementation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

#: ``randn(shape) -> Tensor``: a Gaussian source (values N(0, 1), any device/dtype; callers cast)
RandnFn = Callable[[tuple[int, ...]], torch.Tensor]


class StepInfo(dict):
    """What every method passes to ``callback`` once per network evaluation.

    Keys: ``i`` (step index from 0), ``steps`` (number of steps), ``t`` (timestep), ``x_t`` (the state
    the network evaluated, as a pixel image) and ``x0`` (its clean-image prediction, pixel image), plus
    method-specific extras (e.g. latents ``z_t``/``z0``). Values given as zero-argument callables — a
    latent decode — are computed on first access (``info["x_t"]``), so a progress bar that reads only
    ``i`` costs nothing.
    """

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if callable(value):
            value = value()
            self[key] = value
        return value


#: ``callback(info: StepInfo)``: called once per network evaluation
StepCallback = Callable[[StepInfo], None]


class MethodArgumentError(ValueError):
    """An argument a user passed to a restoration method is out of range or has the wrong shape."""


def check_samples(samples) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise MethodArgumentError(f"samples must be a positive integer, got {samples!r}")


def draws_of_samples(run: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, samples: int) -> torch.Tensor:
    """``samples`` independent restorations of each measurement in ``y``, drawn as one batch of
    ``B * samples`` (``run`` maps a batch of measurements to one restoration each); (B, samples, ...)."""
    check_samples(samples)
    return run(y.repeat_interleave(samples, dim=0)).unflatten(0, (y.shape[0], samples))


def check_latent_image_size(prior, operator, method: str) -> None:
    """Methods that encode full images need sides that are multiples of the autoencoder's factor
    times the latent UNet's downsampling (no padding: the operator fixes the image size)."""
    from ..operators.base import ImageSizeError

    _, H, W = operator.in_shape
    need = prior.downscale * prior.multiple_of
    if H % need or W % need:
        raise ImageSizeError(f"{method} needs image sides that are multiples of {need}, got {H}x{W}")


def check_measurement(operator, y: torch.Tensor, sigma_y: float) -> None:
    """``y`` must be a batch of the operator's measurements and ``sigma_y`` a noise std (>= 0)."""
    meas_shape = tuple(operator.measurement_shape)
    if y.dim() < 1 or tuple(y.shape[1:]) != meas_shape:
        raise MethodArgumentError(f"y must have shape (B, {meas_shape}), got {tuple(y.shape)}")
    if not float(sigma_y) >= 0.0:
        raise MethodArgumentError(f"sigma_y must be >= 0, got {sigma_y}")


def check_rho(rho: float) -> None:
    """``rho``, an assumed error std for ``spectral_consistency``, must be >= 0."""
    if not rho >= 0.0:
        raise MethodArgumentError(f"rho must be >= 0, got {rho}")


def spectral_consistency(operator, x0: torch.Tensor, y: torch.Tensor, sigma_y: float, tau: float) -> torch.Tensor:
    """Blend ``x0`` with the measurement ``y = H x + sigma_y n`` on the observed spectral rows of
    ``H = U S V^T``: ``v_i <- v_i + w_i (ybar_i - v_i)`` with ``v = V^T x0``, ``ybar_i = (U^T y)_i / s_i``
    and ``w_i = tau^2 / (tau^2 + sigma_y^2 / s_i^2)`` (the posterior mean of row i when ``x0``'s error
    there has std ``tau``); unobserved rows keep ``x0``'s values. For ``sigma_y = 0`` this is the
    projection onto ``{x : Hx = y}``, ``A^+ y + (I - A^+ A) x0``. (DDRM-LDM's step 3.)"""
    B = x0.shape[0]
    s = operator.singulars.to(x0)
    observed = s > 0
    v = operator.Vt(x0).reshape(B, -1)
    m = s.shape[0]
    ybar = operator.Ut(y).reshape(B, m) / torch.where(observed, s, torch.ones_like(s))
    if sigma_y > 0:
        w = tau**2 / (tau**2 + sigma_y**2 / torch.where(observed, s, torch.ones_like(s)) ** 2)
    else:
        w = torch.ones_like(s)
    w = torch.where(observed, w, torch.zeros_like(w))
    v = torch.cat([v[:, :m] + w * (ybar - v[:, :m]), v[:, m:]], dim=1)
    return operator.V(v).reshape(x0.shape)


def uniform_skip_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The DDIM/DDRM "uniform" skip sequence ``0, s, 2s, ... < num_timesteps`` with
    ``s = num_timesteps // steps`` (ascending; samplers walk it in reverse).

    Exactly the official ``range(0, num_timesteps, num_timesteps // steps)``: when ``steps`` does
    not divide ``num_timesteps`` it holds ``ceil(num_timesteps / s)`` entries, i.e. slightly more
    than ``steps`` (e.g. 31 for 30 steps out of 1000)."""
    steps = int(steps)
    if steps < 1 or steps > num_timesteps:
        raise MethodArgumentError(f"steps must be in [1, {num_timesteps}], got {steps}")
    return list(range(0, num_timesteps, num_timesteps // steps))


def previous_timesteps(seq: Sequence[int]) -> list[int]:
    """For an ascending ``seq``, the timestep each one steps to: ``[-1] + seq[:-1]``."""
    return [-1] + list(seq[:-1])


def alpha_bar(alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    """``alpha_bar(t)`` as a float32 0-dim CPU tensor, with ``alpha_bar(-1) = 1`` (the official DDIM /
    DDRM ``compute_alpha``: cumprod of ``1 - beta`` with a 1.0 prepended, indexed at ``t + 1``)."""
    if t < 0:
        return torch.ones((), dtype=torch.float32)
    return alphas_cumprod.detach()[int(t)].to("cpu", torch.float32).clone()


def make_randn(
    generator: torch.Generator | None, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> RandnFn:
    """The default Gaussian source: ``torch.randn`` from ``generator`` (on the generator's own device;
    the global RNG of ``device`` when None), moved to ``device``/``dtype``."""
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        z = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
        return z.to(device=device, dtype=dtype)

    return randn


class ReplayRandn:
    """A ``randn`` that returns recorded draws in order, checking each requested shape.

    ``draws`` is a sequence of tensors or of ``(name, tensor)`` pairs. After the run,
    ``remaining`` says how many were not consumed."""

    def __init__(self, draws: Sequence[torch.Tensor | tuple[str, torch.Tensor]]):
        self._draws = [d[1] if isinstance(d, (tuple, list)) else d for d in draws]
        self._i = 0
        self.shapes: list[tuple[int, ...]] = []

    @property
    def remaining(self) -> int:
        return len(self._draws) - self._i

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        self.shapes.append(shape)
        if self._i >= len(self._draws):
            raise RuntimeError(f"replay exhausted: draw #{self._i} of shape {shape} requested")
        z = self._draws[self._i]
        if tuple(z.shape) != shape:
            raise RuntimeError(f"replay draw #{self._i}: recorded shape {tuple(z.shape)}, requested {shape}")
        self._i += 1
        return z


def check_svd_operator(operator, method: str) -> None:
    """Refuse an operator that lacks the SVD parts (``singulars``, ``Vt``, ``V``, ``Ut``) a spectral
    method works through, with a one-line MethodArgumentError instead of a NotImplementedError deep
    inside the sampler."""
    from ..operators.base import LinearOperator

    missing = [
        name for name in ("Vt", "V", "Ut")
        if not callable(getattr(operator, name, None)) or getattr(type(operator), name, None) is getattr(LinearOperator, name)
    ]  # fmt: skip
    try:
        operator.singulars
    except (NotImplementedError, AttributeError):
        missing.insert(0, "singulars")
    if missing:
        raise MethodArgumentError(
            f"{method} needs an operator with SVD parts; {type(operator).__name__} lacks {', '.join(missing)}"
        )


def sampler_setup(operator, y: torch.Tensor, generator: torch.Generator | None, randn: RandnFn | None):
    """What a pixel sampler works with: ``(device, dtype, image batch shape, draw)`` with y's device,
    y's floating dtype (float32 otherwise), ``(B, *operator.in_shape)`` and ``draw(shape)``, a Gaussian
    from ``randn`` (default: ``make_randn(generator, ...)``) on that device and dtype."""
    device = y.device
    dtype = y.dtype if y.is_floating_point() else torch.float32
    if randn is None:
        randn = make_randn(generator, device, dtype)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return randn(shape).to(device=device, dtype=dtype)

    return device, dtype, (y.shape[0], *operator.in_shape), draw
