"""Tiled priors: the grid, the blend weights, equality with the untiled path, shifting, seams on a real photo,
automatic tiling and the CLI options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffrestore.operators.tasks import make_task
from diffrestore.restoration import make_generator, measure_image, run_method
from diffrestore.priors import tiled
from diffrestore.priors.base import LatentSRPrior, PixelPrior, adm_alphas_cumprod
from diffrestore.priors.tiled import (
    TiledLatentSRPrior,
    TiledPixelPrior,
    TileError,
    grid_offsets,
    plan_tiling,
    run_tiled,
    tile_starts,
)


@pytest.fixture(scope="module")
def pixel_s():
    from diffrestore.priors.loading import load_prior

    return load_prior("builtin:pixel-s")


@pytest.fixture(scope="module")
def ldmsr_s():
    from diffrestore.priors.loading import load_prior

    return load_prior("builtin:ldmsr-s")


class PointwisePrior(PixelPrior):
    """eps depends on each pixel alone (and t): any tiling must reproduce it exactly."""

    multiple_of = 8

    def __init__(self):
        super().__init__(adm_alphas_cumprod())
        self.shapes = []

    def eps(self, x, t):
        self.shapes.append(tuple(x.shape))
        return torch.tanh(3 * x) + t.float().view(-1, 1, 1, 1) / 1000


class TileMeanPrior(PixelPrior):
    """eps is the mean of whatever tile it sees: the output shows where the tiles were."""

    def __init__(self):
        super().__init__(adm_alphas_cumprod())

    def eps(self, x, t):
        return x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x).clone()


class LocalLatentPrior(LatentSRPrior):
    """A latent SR prior whose maps are local to a 4x4 block / latent pixel (exact under aligned tiling)."""

    downscale, latent_channels, multiple_of = 4, 3, 2

    def __init__(self):
        super().__init__(adm_alphas_cumprod())

    def encode(self, x):
        return F.avg_pool2d(x, 4) * 2

    def decode(self, z):
        return torch.sin(z.repeat_interleave(4, -2).repeat_interleave(4, -1))

    def eps(self, z, t, lr):
        return 0.5 * z - lr + t.float().view(-1, 1, 1, 1) / 1000


# --------------------------------------------------------------------------------------------------
# grid and weights


@pytest.mark.parametrize("length,tile,stride", [(192, 64, 48), (100, 64, 56), (513, 128, 96), (64, 64, 48)])
def test_tile_starts_cover_the_axis_with_the_overlap_for_every_offset(length, tile, stride):
    for offset in range(stride):
        starts = tile_starts(length, tile, stride, offset)
        assert starts[0] == 0 and starts[-1] == max(length - tile, 0)
        assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


def _normalised_weights(grid, tile, overlap, offsets):
    """Each tile's share of every pixel, recovered through ``run_tiled`` with one-hot tile outputs."""
    tops = tile_starts(grid[0], min(tile, grid[0]), tile - overlap, offsets[0])
    lefts = tile_starts(grid[1], min(tile, grid[1]), tile - overlap, offsets[1])
    shares = []
    for k in range(len(tops) * len(lefts)):
        calls = []

        def fn(x, reps, k=k, calls=calls):
            calls.append(1)
            return torch.full_like(x, float(len(calls) - 1 == k))

        shares.append(run_tiled(fn, [(torch.zeros(1, 1, *grid), 1)], grid=grid, tile=tile, overlap=overlap,
                                offsets=offsets)[0, 0].double())  # fmt: skip
    return torch.stack(shares)


@pytest.mark.parametrize("offsets", [(0, 0), (17, 5), (40, 47)])
def test_blend_weights_sum_to_one_and_change_smoothly(offsets):
    overlap = 16
    w = _normalised_weights((150, 192), 64, overlap, offsets)
    assert w.min() >= 0
    torch.testing.assert_close(w.sum(0), torch.ones(150, 192, dtype=torch.float64), rtol=0, atol=1e-6)
    # one raised-cosine ramp over `overlap` pixels changes by at most pi / (2 overlap) per pixel; where
    # clamped tiles overlap more, ramps meet unevenly (measured up to 1.1x that); a hard edge jumps by 1
    step = max(float(w.diff(dim=1).abs().max()), float(w.diff(dim=2).abs().max()))
    assert step <= math.pi / overlap


def test_without_overlap_the_weights_are_hard_edges():
    w = _normalised_weights((128, 128), 64, 0, (0, 0))
    assert float(w.diff(dim=2).abs().max()) == 1.0


# --------------------------------------------------------------------------------------------------
# equality with the untiled prior


def test_tiled_eps_of_a_pointwise_prior_is_exact_for_any_grid():
    prior = PointwisePrior()
    x = torch.randn(2, 3, 72, 136)
    t = torch.tensor([999.0, 999.0])
    for tile, overlap, batch in [(32, 8, 1), (48, 16, 3), (64, 0, 2)]:
        wrapped = TiledPixelPrior(prior, tile, overlap, batch=batch)
        for step in (999.0, 517.0, 20.0):
            tt = torch.full((2,), step)
            torch.testing.assert_close(wrapped.eps(x, tt), prior.eps(x, tt), rtol=1e-6, atol=1e-6)
    prior.shapes.clear()
    TiledPixelPrior(prior, 64, 16, batch=2).eps(x, t)  # starts 0, 8 down; 0, 48, 72 across: 6 tiles
    assert prior.shapes == [(4, 3, 64, 64)] * 3  # 2 tiles x 2 images per call
    assert TiledPixelPrior(prior, 70, 8).tile_cells == 64  # rounded down to multiple_of
    assert TiledPixelPrior(prior, 70, 34).overlap_cells == 31  # and the overlap kept under half of it
    assert TiledPixelPrior(prior, 256).num_timesteps == prior.num_timesteps
    assert TiledPixelPrior(prior, 256).alphas_cumprod is not None


def test_tiled_latent_prior_crops_the_conditioning_and_blends_encode_decode_exactly():
    prior = LocalLatentPrior()
    wrapped = TiledLatentSRPrior(prior, 64, 16)  # latent tiles of 16, overlap 4
    x = torch.rand(1, 3, 96, 160) * 2 - 1
    z, lr = torch.randn(1, 3, 24, 40), torch.randn(1, 3, 24, 40)
    t = torch.tensor([700])
    torch.testing.assert_close(wrapped.encode(x), prior.encode(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wrapped.decode(z), prior.decode(z), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wrapped.eps(z, t, lr), prior.eps(z, t, lr), rtol=1e-6, atol=1e-6)
    assert (wrapped.downscale, wrapped.multiple_of, wrapped.tile_cells) == (4, 2, 16)


def test_ddrm_with_a_tile_covering_the_image_equals_the_untiled_run_bit_for_bit(pixel_s):
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    task = make_task("noisy-sr4", (3, 64, 96))
    y = measure_image(task, x, 0, "img")
    plain = run_method("ddrm", {"pixel": pixel_s}, task, y, steps=3, seed=5, tile=0).x_hat
    covered = run_method("ddrm", {"pixel": pixel_s}, task, y, steps=3, seed=5, tile=128).x_hat
    small = run_method("ddrm", {"pixel": pixel_s}, task, y, steps=3, seed=5, tile=32, overlap=8).x_hat
    assert torch.equal(plain, covered)
    assert not torch.equal(plain, small)  # the small tiles did run


@pytest.mark.parametrize("method", ["ddrm-ldm", "srldm"])
def test_latent_methods_with_a_tile_covering_the_image_equal_the_untiled_run(ldmsr_s, method):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    task = make_task("sr4", (3, 64, 64))
    y = measure_image(task, x, 0, "img")
    plain = run_method(method, {"latent": ldmsr_s}, task, y, steps=3, seed=5, tile=0).x_hat
    covered = run_method(method, {"latent": ldmsr_s}, task, y, steps=3, seed=5, tile=64).x_hat
    assert torch.equal(plain, covered)


# --------------------------------------------------------------------------------------------------
# shifting


def test_the_grid_shifts_with_the_timestep_and_is_deterministic():
    offsets = [grid_offsets(torch.tensor([float(t)]), 48) for t in range(0, 1000, 50)]
    assert len(set(offsets)) >= 18  # 20 DDRM steps: (almost) every step has its own grid
    assert all(0 <= a < 48 and 0 <= b < 48 for a, b in offsets)
    prior = TileMeanPrior()
    x = torch.randn(1, 3, 96, 96)
    shifting, fixed = TiledPixelPrior(prior, 32, 8), TiledPixelPrior(prior, 32, 8, shift=False)
    t1, t2 = torch.tensor([950.0]), torch.tensor([450.0])
    assert torch.equal(shifting.eps(x, t1), shifting.eps(x, t1))
    assert not torch.equal(shifting.eps(x, t1), shifting.eps(x, t2))
    assert torch.equal(fixed.eps(x, t1), fixed.eps(x, t2))


# --------------------------------------------------------------------------------------------------
# seams on a real photo


def _seam_ratio(img: torch.Tensor, ref: torch.Tensor, borders: list[int]) -> float:
    """Mean |gradient| across the ``borders`` (between pixel b-1 and b, rows and columns), relative to
    the untiled restoration ``ref`` at the same place, over the same ratio averaged over all lines:
    content cancels, a seam adds gradient only at its line."""

    def profiles(a):
        gx = (a[..., :, 1:] - a[..., :, :-1]).abs().mean(dim=(0, 1, 2))
        gy = (a[..., 1:, :] - a[..., :-1, :]).abs().mean(dim=(0, 1, 3))
        return gx, gy

    (gx, gy), (rx, ry) = profiles(img), profiles(ref)
    b = [k - 1 for k in borders]
    rel_x, rel_y = gx / rx, gy / ry
    return float((rel_x[b].mean() + rel_y[b].mean()) / (rel_x.mean() + rel_y.mean()))


def test_small_blended_tiles_leave_no_seam_where_a_fixed_hard_grid_does(pixel_s, shared):
    from diffrestore.evaluation.data import load_eval_image
    from diffrestore.methods import get_method

    name = "n03843555_oil_filter.JPEG"
    x = load_eval_image(shared / "data" / "imagenet-sample-500" / name, 192).unsqueeze(0)
    task = make_task("denoise", (3, 192, 192))
    y = measure_image(task, x, 0, name)

    def restore(prior):
        return get_method("ddrm").restore(prior, task.operator, y, sigma_y=task.sigma_y, steps=4,
                                          generator=make_generator(1))  # fmt: skip

    ref = restore(pixel_s)
    borders = [64, 128]  # the fixed grid's tile borders, on both axes
    blended = _seam_ratio(restore(TiledPixelPrior(pixel_s, 64, 16)), ref, borders)
    naive = _seam_ratio(restore(TiledPixelPrior(pixel_s, 64, 0, shift=False)), ref, borders)
    assert blended <= 1.1, blended
    assert naive > 1.5, naive  # measured about 4: hard tile edges show


# --------------------------------------------------------------------------------------------------
# automatic tiling, memory, CLI


def test_plan_tiling_tiles_only_what_does_not_fit_and_refuses_what_never_fits(pixel_s):
    hw = (2000, 3000)
    untiled = tiled.estimate_peak_bytes(pixel_s, hw)
    with_tiles = tiled.estimate_peak_bytes(pixel_s, hw, tile=512)
    assert with_tiles < untiled
    prior, note = plan_tiling(pixel_s, hw, budget=untiled + 1)
    assert prior is pixel_s and note is None
    prior, note = plan_tiling(pixel_s, hw, budget=untiled - 1)
    assert isinstance(prior, TiledPixelPrior) and prior.tile == tiled.DEFAULT_TILE and "tiles" in note
    assert plan_tiling(pixel_s, hw, tile=0, budget=1)[0] is pixel_s
    with pytest.raises(TileError, match="even with 512-pixel tiles"):
        plan_tiling(pixel_s, hw, budget=with_tiles - 1)
    with pytest.raises(TileError, match="overlap"):
        plan_tiling(pixel_s, hw, tile=64, overlap=32, budget=untiled)


def test_the_estimate_follows_the_measured_activations_of_pixel_s(pixel_s):
    # peak RSS of one float32 call measured at 512x512: 1.27 KB per pixel
    assert 1.0e3 <= tiled.activation_bytes_per_pixel(pixel_s) <= 2.0e3


def test_progress_bar_counts_tiles_times_steps():
    from diffrestore.progress import RestorationProgress

    bar = RestorationProgress("x", enabled=False)
    for i in range(5):
        bar.tiles(6)
        bar.tiles(3)
        bar.step({"i": i, "steps": 5})
        assert bar.bar.total == 45
    untiled = RestorationProgress("x", enabled=False)
    untiled.step({"i": 0, "steps": 20})
    assert untiled.bar.total == 20


@pytest.fixture
def photo(tmp_path, shared):
    from PIL import Image

    src = sorted((shared / "data" / "imagenet-sample-500").glob("*.JPEG"))[5]
    path = tmp_path / "photo.png"
    Image.open(src).convert("RGB").resize((96, 64)).save(path)
    return path


def _restore(photo, out, *extra):
    from diffrestore.cli import main

    return main(["restore", str(photo), "--task", "sr4", "--prior", "builtin:pixel-s", "--steps", "2", "--degrade",
                 "--out", str(out), "--no-progress", "--dtype", "fp32", *extra])  # fmt: skip


def test_cli_tile_options(tmp_path, photo, capsys):
    from diffrestore.image_io import read_image

    assert _restore(photo, tmp_path / "a", "--tile", "0") == 0
    assert _restore(photo, tmp_path / "b", "--tile", "96", "--overlap", "8") == 0
    assert _restore(photo, tmp_path / "c", "--tile", "32", "--overlap", "8") == 0
    a, b, c = (read_image(tmp_path / d / "photo_sr4_ddrm.png") for d in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    capsys.readouterr()
    assert _restore(photo, tmp_path / "d", "--tile", "32", "--overlap", "16") == 2
    err = capsys.readouterr().err
    assert err.startswith("diffrestore: error: --tile/--overlap: overlap") and err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_cli_says_when_it_tiles_by_itself(tmp_path, photo, capsys, monkeypatch):
    # a budget between the untiled and the tiled estimate of this 64x96 image
    monkeypatch.setattr(tiled, "DEFAULT_TILE", 32)
    monkeypatch.setattr(tiled, "DEFAULT_OVERLAP", 8)
    monkeypatch.setattr(tiled, "tiling_budget", lambda device: 7_000_000)
    tiled._SAID.clear()
    assert _restore(photo, tmp_path / "auto") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "tiles" in line]
    assert len(notes) == 1 and "32-pixel tiles" in notes[0] and "--tile 0" in notes[0]
    monkeypatch.setattr(tiled, "tiling_budget", lambda device: 1000)
    assert _restore(photo, tmp_path / "never") == 2
    assert "even with 32-pixel tiles" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_separable_svds_are_cached_and_shared():
    from diffrestore.operators.separable import svd_1d
    from diffrestore.operators.superres import BlockAverageSR

    a = BlockAverageSR((3, 96, 96), 4)
    b = BlockAverageSR((3, 96, 96), 4)
    assert a._f64["V_h"].data_ptr() == b._f64["V_w"].data_ptr()  # one SVD for both axes and operators
    U, s, V = svd_1d(a.matrices_1d[0])
    A = a.matrices_1d[0]
    torch.testing.assert_close(U[:, : s.numel()] @ torch.diag(s) @ V[:, : s.numel()].T, A)


def test_evaluate_records_the_tiling_of_a_run(tmp_path, shared):
    from diffrestore.evaluation.plan import EvalSpec, prepare

    data = shared / "data" / "imagenet-sample-500"
    spec = EvalSpec(out=str(tmp_path / "run"), data=str(data), n=2, tasks=["sr4"], methods=["ddrm"],
                           pixel_prior="builtin:pixel-s", tile=256, overlap=16)  # fmt: skip
    settings = prepare(spec).settings
    assert (settings["tile"], settings["overlap"]) == (256, 16)
    plain = prepare(EvalSpec(out=str(tmp_path / "plain"), data=str(data), n=2, tasks=["sr4"],
                                           methods=["ddrm"], pixel_prior="builtin:pixel-s")).settings  # fmt: skip
    assert "tile" not in plain and "overlap" not in plain
