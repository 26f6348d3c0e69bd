"""Tiled priors: run the network on overlapping tiles so that memory is bounded by the tile, not the image.

Why: a diffusion network's activations grow with the image (more than a kilobyte per pixel for the
built-in priors), while the methods' data consistency only needs
the operator's SVD parts, which act on the whole image through small 1-D factors. So only the network
is tiled; the measurement stays global and exact.

How: every network call cuts its input into tiles of ``tile`` x ``tile`` with at least ``overlap``
pixels shared between neighbours, runs them in batches of ``batch`` tiles, and blends the outputs with
raised-cosine ramps across the overlaps, normalised so the weights sum to 1 at every pixel. The grid is
shifted from one diffusion step to the next (an offset derived from the timestep, so the same seed
gives the same output), which keeps blend zones from lining up into a fixed seam over the steps.
A tile at least as large as the image is a plain network call: the tiled prior then returns exactly
what the wrapped prior returns.

``TiledPixelPrior`` wraps a ``PixelPrior`` (``eps``); ``TiledLatentSRPrior`` wraps a ``LatentSRPrior``
(``eps`` on latent tiles with the low-resolution conditioning cropped alike, ``encode`` and ``decode``
on tiles blended in the output's resolution). Everything else (schedule, sizes) is the wrapped prior's.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Sequence

import torch

from diffrestore.resources import DEFAULT_TILE

from .base import LatentSRPrior, PixelPrior

__all__ = [
    "DEFAULT_OVERLAP", "DEFAULT_TILE", "TileError", "TiledLatentSRPrior", "TiledPixelPrior",
    "activation_bytes_per_pixel", "blend_window", "estimate_peak_bytes", "plan_tiling",
    "run_tiled", "tile_starts", "tiled_prior", "tiling_budget",
]

#: default overlap in image pixels, for ``DEFAULT_TILE``-pixel tiles (docs/results/2026-12-03-tiling.md)
DEFAULT_OVERLAP = 32
#: irrational steps of the per-axis grid offsets: offsets of successive timesteps spread evenly
_GOLDEN = (0.6180339887498949, 0.7548776662466927)


class TileError(ValueError):
    """Tile or overlap values a prior cannot use (the CLI reports them in one line)."""


def default_overlap(tile: int) -> int:
    """``DEFAULT_OVERLAP``, or a quarter of a tile too small for it."""
    return min(DEFAULT_OVERLAP, tile // 4)


def check_tiling(tile: int, overlap: int) -> None:
    """A tile of at least 1 pixel and an overlap in [0, tile / 2) (each tile ramps in and out)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise TileError(f"tile must be a positive number of pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= 2 * overlap < tile:
        raise TileError(f"overlap must be at least 0 and less than half the tile ({tile}), got {overlap!r}")


# --------------------------------------------------------------------------------------------------
# the grid and its weights


def tile_starts(length: int, tile: int, stride: int, offset: int = 0) -> list[int]:
    """Start positions of tiles of ``tile`` samples covering ``[0, length)``: ``k * stride - offset``
    clamped into ``[0, length - tile]``. Consecutive starts are at most ``stride`` apart, so neighbours
    share at least ``tile - stride`` samples."""
    if tile >= length:
        return [0]
    starts: list[int] = []
    k = 0
    while not starts or starts[-1] < length - tile:
        p = min(max(k * stride - offset, 0), length - tile)
        if not starts or p > starts[-1]:
            starts.append(p)
        k += 1
    return starts


def blend_window(size: int, ramp: int, ramp_in: bool, ramp_out: bool) -> torch.Tensor:
    """(size,) float64 weights of one tile along one axis: 1 inside, a raised-cosine ramp over ``ramp``
    samples at an end that borders another tile. The ramp is sampled at sample centres, so it never
    reaches 0, and a ramp out and a ramp in over the same samples sum to exactly 1."""
    w = torch.ones(size, dtype=torch.float64)
    if ramp > 0:
        r = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp)
        if ramp_in:
            w[:ramp] *= r
        if ramp_out:
            w[size - ramp:] *= r.flip(0)
    return w


def grid_offsets(t: torch.Tensor | float | None, stride: int) -> tuple[int, int]:
    """Per-axis grid offsets in ``[0, stride)`` for timestep ``t`` (0 when ``t`` is None)."""
    if t is None or stride <= 1:
        return (0, 0)
    t0 = float(torch.as_tensor(t).reshape(-1)[0])
    return tuple(int((t0 * g) % 1.0 * stride) for g in _GOLDEN)


def _windows(length: int, tile: int, starts: Sequence[int], ramp: int, scale: int) -> dict[int, torch.Tensor]:
    """The blend window of each start, at ``scale`` times the grid's resolution."""
    return {p: blend_window(tile * scale, ramp * scale, p > 0, p + tile < length) for p in starts}


def run_tiled(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[tuple[torch.Tensor, int]],
    *,
    grid: tuple[int, int],
    tile: int,
    overlap: int,
    offsets: tuple[int, int] = (0, 0),
    out_scale: int = 1,
    batch: int = 1,
    on_tiles: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Blend ``fn`` over overlapping tiles of a ``grid`` (H, W) of cells.

    ``inputs`` are (tensor, scale) pairs, each (B, C, H * scale, W * scale); ``fn(*crops, reps)`` gets
    the crops of ``reps`` tiles stacked tile-major along the batch (``reps * B``) and returns their
    outputs at ``out_scale`` cells per grid cell. Tiles are ``tile`` cells (at most the grid), start
    every ``tile - overlap`` cells shifted by ``offsets``, and are blended with ``blend_window`` ramps of
    ``overlap`` cells, normalised to sum 1 at every output pixel.
    """
    H, W = grid
    th, tw = min(tile, H), min(tile, W)
    B = inputs[0][0].shape[0]
    tops = tile_starts(H, th, tile - overlap, offsets[0])
    lefts = tile_starts(W, tw, tile - overlap, offsets[1])
    wh, ww = _windows(H, th, tops, overlap, out_scale), _windows(W, tw, lefts, overlap, out_scale)
    positions = [(a, b) for a in tops for b in lefts]
    s = out_scale
    out = wsum = None
    for i in range(0, len(positions), batch):
        chunk = positions[i : i + batch]
        crops = [
            torch.cat([x[..., a * k : (a + th) * k, b * k : (b + tw) * k] for a, b in chunk]) for x, k in inputs
        ]
        res = fn(*crops, reps=len(chunk))
        if out is None:
            out = torch.zeros(B, res.shape[1], H * s, W * s, dtype=torch.float32, device=res.device)
            wsum = torch.zeros(H * s, W * s, dtype=torch.float32, device=res.device)
        for (a, b), r in zip(chunk, res.split(B)):
            w = torch.outer(wh[a], ww[b]).to(device=res.device, dtype=torch.float32)
            out[..., a * s : (a + th) * s, b * s : (b + tw) * s].addcmul_(r.float(), w)
            wsum[a * s : (a + th) * s, b * s : (b + tw) * s].add_(w)
        if on_tiles is not None:
            on_tiles(len(chunk))
    return out.div_(wsum).to(res.dtype)


def _repeat(t: torch.Tensor, reps: int) -> torch.Tensor:
    """Per-sample values (``t``, labels) for ``reps`` tiles stacked tile-major."""
    t = torch.as_tensor(t)
    return t if t.ndim == 0 or t.numel() == 1 else t.reshape(-1).repeat(reps)


# --------------------------------------------------------------------------------------------------
# the wrappers


class _TiledMixin:
    """Options, delegation and progress reporting shared by both tiled priors."""

    def _setup(self, prior, tile: int, overlap: int, batch: int, shift: bool, unit: int) -> None:
        check_tiling(tile, overlap)
        if batch < 1:
            raise TileError(f"tile batch must be at least 1, got {batch}")
        cell = unit * prior.multiple_of
        if tile < cell:
            raise TileError(f"tile {tile} is smaller than this prior's smallest input ({cell} pixels)")
        self.prior = prior
        self.multiple_of = prior.multiple_of
        # in the network's own cells: tiles must be multiples of its downsampling
        self.tile_cells = tile // cell * prior.multiple_of
        # rounding the tile down may leave an overlap of half of it or more: ramps must not cross
        self.overlap_cells = min(overlap // unit, (self.tile_cells - 1) // 2)
        self.tile, self.overlap, self.batch, self.shift = tile, overlap, batch, shift
        #: ``on_tiles(n)`` after every batch of ``n`` network tiles (a progress bar's hook)
        self.on_tiles: Callable[[int], None] | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("prior")
            if inner is None:
                raise
            return getattr(inner, name)

    def _whole(self, grid: tuple[int, int]) -> bool:
        """One tile covers the grid: call the wrapped prior as it is."""
        return self.tile_cells >= max(grid)

    def _report(self, n: int) -> None:
        if self.on_tiles is not None:
            self.on_tiles(n)

    def _tiled(self, fn, inputs, grid, t=None, out_scale: int = 1) -> torch.Tensor:
        offsets = grid_offsets(t if self.shift else None, self.tile_cells - self.overlap_cells)
        return run_tiled(fn, inputs, grid=grid, tile=self.tile_cells, overlap=self.overlap_cells, offsets=offsets,
                         out_scale=out_scale, batch=self.batch, on_tiles=self.on_tiles)  # fmt: skip


class TiledPixelPrior(_TiledMixin, PixelPrior):
    """A ``PixelPrior`` whose ``eps`` runs the wrapped prior on blended, shifting tiles.

    Args:
        prior: the pixel prior to wrap.
        tile, overlap: tile side and least overlap in pixels (the tile is rounded down to a multiple of
            the prior's ``multiple_of``).
        batch: tiles per network call (memory grows with it).
        shift: move the grid from step to step (off only to show what a fixed grid does).
    """

    def __init__(self, prior: PixelPrior, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, *,
                 batch: int = 1, shift: bool = True):  # fmt: skip
        super().__init__(prior.alphas_cumprod)
        self._setup(prior, tile, overlap, batch, shift, unit=1)
        self.image_size = prior.image_size

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        grid = tuple(x_t.shape[-2:])
        if self._whole(grid):
            out = self.prior.eps(x_t, t, **kwargs)
            self._report(1)
            return out

        def fn(x, reps):
            extra = {k: _repeat(v, reps) if v is not None else None for k, v in kwargs.items()}
            return self.prior.eps(x, _repeat(t, reps), **extra)

        return self._tiled(fn, [(x_t, 1)], grid, t)


class TiledLatentSRPrior(_TiledMixin, LatentSRPrior):
    """A ``LatentSRPrior`` whose UNet, encoder and decoder run on blended tiles.

    ``tile`` and ``overlap`` are in image pixels; latent tiles are ``tile / downscale`` (rounded down to
    the UNet's ``multiple_of``). ``eps`` crops the conditioning with its latent tile and shifts its grid
    with the timestep; ``encode`` and ``decode`` use a fixed grid and blend in the output's resolution.
    """

    def __init__(self, prior: LatentSRPrior, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, *,
                 batch: int = 1, shift: bool = True):  # fmt: skip
        super().__init__(prior.alphas_cumprod)
        self._setup(prior, tile, overlap, batch, shift, unit=prior.downscale)
        self.downscale, self.latent_channels = prior.downscale, prior.latent_channels
        self.prediction_type = prior.prediction_type

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        grid = tuple(z_t.shape[-2:])
        if self._whole(grid):
            out = self.prior.eps(z_t, t, lr)
            self._report(1)
            return out
        return self._tiled(lambda z, c, reps: self.prior.eps(z, _repeat(t, reps), c), [(z_t, 1), (lr, 1)], grid, t)

    def decode(self, z: torch.Tensor, **kwargs) -> torch.Tensor:
        grid = tuple(z.shape[-2:])
        if self._whole(grid):
            return self.prior.decode(z, **kwargs)
        return self._tiled(lambda c, reps: self.prior.decode(c, **kwargs), [(z, 1)], grid, out_scale=self.downscale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        f = self.downscale
        grid = (x.shape[-2] // f, x.shape[-1] // f)
        if self._whole(grid) or grid[0] * f != x.shape[-2] or grid[1] * f != x.shape[-1]:
            return self.prior.encode(x)
        return self._tiled(lambda c, reps: self.prior.encode(c), [(x, f)], grid)


def tiled_prior(prior, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, **kwargs):
    """``prior`` wrapped in the tiled prior of its kind (``TiledPixelPrior`` or ``TiledLatentSRPrior``)."""
    cls = TiledLatentSRPrior if isinstance(prior, LatentSRPrior) else TiledPixelPrior
    return cls(prior, tile, overlap, **kwargs)


# --------------------------------------------------------------------------------------------------
# memory


def _unet_sum(unet) -> float:
    """Sum over the UNet's resolution levels of channels / 4**level (activation channels per input pixel)."""
    chans = list(unet.config.block_out_channels)
    return sum(c / 4**i for i, c in enumerate(chans))


def activation_bytes_per_pixel(prior) -> float:
    """Estimated peak bytes per image pixel of one network call (the largest of UNet, encoder, decoder).

    ``K * element_size * sum_levels(channels / 4**level)``: the activations a UNet keeps alive (skip
    connections, concatenations, group-norm temporaries) are a roughly fixed multiple ``K`` of its
    channels at each level. ``K`` is calibrated on the peak memory of one float32 call of the built-in
    priors on a CPU, rounded up (docs/methods.md). Unknown networks count as 2 KB per pixel.
    """
    inner = getattr(prior, "prior", prior)
    unet = getattr(inner, "unet", None)
    if unet is None or not hasattr(unet, "config"):
        return 2048.0
    elt = next(unet.parameters()).element_size()
    if not isinstance(inner, LatentSRPrior):
        return 12.0 * elt * _unet_sum(unet)
    f = inner.downscale
    unet_px = 18.0 * elt * _unet_sum(unet) / f**2
    fs = inner.first_stage
    fs_px = 7.0 * next(fs.parameters()).element_size() * _unet_sum(fs)
    return max(unet_px, fs_px)


#: bytes per image pixel a method keeps for the whole image besides the network: its state, the
#: prediction, spectral copies and draws (DDRM holds about a dozen float32 images at once; calibration
#: in docs/methods.md)
METHOD_BYTES_PER_PIXEL = 180
_GB = 1024**3


def estimate_peak_bytes(prior, image_hw: tuple[int, int], batch: int = 1, tile: int = 0) -> int:
    """Estimated peak memory of restoring ``batch`` images of ``image_hw`` pixels: the method's
    whole-image state plus one network call on the whole image (``tile`` 0) or on one tile."""
    H, W = image_hw
    net = H * W if not tile else min(tile, H) * min(tile, W)
    return int(batch * (METHOD_BYTES_PER_PIXEL * H * W + activation_bytes_per_pixel(prior) * net))


def tiling_budget(device: torch.device | str) -> int:
    """Bytes a restoration may use: 90% of the free memory of a CUDA device, 80% of the available RAM
    (``MemAvailable``) otherwise; 8 GB when the system does not say."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(0.9 * free)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return int(0.8 * avail)
    except (OSError, StopIteration, ValueError):
        return 8 * _GB


def plan_tiling(prior, image_hw: tuple[int, int], *, batch: int = 1, device="cpu", tile: int | None = None,
                overlap: int | None = None, budget: int | None = None):  # fmt: skip
    """The prior to restore with, and a one-line note when tiling was turned on automatically.

    ``tile`` None: tile (``DEFAULT_TILE``) only when the untiled estimate exceeds the memory budget;
    0: never tile; N: tiles of N pixels. Raises ``TileError`` when even one tile does not fit.
    """
    if tile == 0:
        return prior, None
    budget = tiling_budget(device) if budget is None else int(budget)
    H, W = image_hw
    note = None
    if tile is None:
        need = estimate_peak_bytes(prior, image_hw, batch)
        if need <= budget:
            return prior, None
        tile = DEFAULT_TILE
        note = (f"{H}x{W} needs about {need / _GB:.1f} GB untiled, more than the {budget / _GB:.1f} GB available: "
                f"running the network on {tile}-pixel tiles (--tile 0 turns tiling off)")  # fmt: skip
    overlap = default_overlap(tile) if overlap is None else overlap
    check_tiling(tile, overlap)
    need = estimate_peak_bytes(prior, image_hw, batch, tile)
    if need > budget:
        raise TileError(f"{H}x{W} needs about {need / _GB:.1f} GB even with {tile}-pixel tiles, more than the "
                        f"{budget / _GB:.1f} GB available: restore a smaller image or use smaller tiles")  # fmt: skip
    per_tile = estimate_peak_bytes(prior, (tile, tile), batch) - METHOD_BYTES_PER_PIXEL * batch * tile * tile
    tile_batch = 1 if torch.device(device).type == "cpu" else max(1, min(8, (budget - need) // max(per_tile, 1)))
    return tiled_prior(prior, tile, overlap, batch=int(tile_batch)), note


_SAID: set[str] = set()


def say_once(note: str) -> None:
    """Print ``note`` on stderr, once per process (an evaluation restores many images of one size)."""
    if note not in _SAID:
        _SAID.add(note)
        print(f"diffrestore: {note}", file=sys.stderr)
