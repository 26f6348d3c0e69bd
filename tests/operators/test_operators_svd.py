"""Contract tests for every operator on tiny sizes, against the dense matrix built column by column."""

import pytest
import torch

from diffrestore.operators import (
    AnisotropicGaussianBlur,
    BicubicSR,
    BlockAverageSR,
    Colorization,
    GaussianBlur,
    Identity,
    ImageSizeError,
    Inpainting,
    UniformBlur,
    random_mask,
)

f64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


CASES = {
    "identity": lambda: Identity((3, 6, 6)),
    "identity-rect": lambda: Identity((2, 6, 10)),
    "block-sr2": lambda: BlockAverageSR((3, 8, 8), 2),
    "block-sr4-rect": lambda: BlockAverageSR((3, 8, 16), 4),
    "block-sr8": lambda: BlockAverageSR((1, 16, 8), 8),
    "bicubic-sr2": lambda: BicubicSR((3, 8, 8), 2),
    "bicubic-sr4-rect": lambda: BicubicSR((2, 16, 8), 4),
    "bicubic-sr3": lambda: BicubicSR((1, 12, 9), 3),
    "gauss-zero": lambda: GaussianBlur((3, 8, 8), 1.0),
    "gauss-reflect-rect": lambda: GaussianBlur((2, 6, 10), 1.0, border="reflect"),
    "gauss-strong": lambda: GaussianBlur((1, 12, 12), 2.0),
    "aniso-zero-rect": lambda: AnisotropicGaussianBlur((2, 8, 10), 1.0, 2.0),
    "aniso-reflect": lambda: AnisotropicGaussianBlur((1, 12, 12), 2.0, 0.7, border="reflect"),
    "uniform-zero-rect": lambda: UniformBlur((2, 7, 9), 5),
    "uniform-reflect": lambda: UniformBlur((2, 8, 8), 3, border="reflect"),
    "inpaint-shared": lambda: Inpainting((3, 8, 8), random_mask((8, 8), 0.5, _g(1))),
    "inpaint-per-channel-rect": lambda: Inpainting((3, 6, 10), random_mask((3, 6, 10), 0.3, _g(2))),
    "colorize": lambda: Colorization((3, 6, 6)),
    "colorize-rect": lambda: Colorization((3, 6, 10)),
}

_built = {}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    """(op, matrices) with dense H, U, V, Ht and pinv built column by column (float64)."""
    name = request.param
    if name not in _built:
        op = CASES[name]()
        D, m, ms = op.D, op.m, op.measurement_shape
        eye_x = torch.eye(D, dtype=f64).reshape(D, *op.in_shape)
        eye_y = torch.eye(m, dtype=f64).reshape(m, *ms)
        mats = {
            "H": op.dense_matrix(),
            "V": op.V(torch.eye(D, dtype=f64)).reshape(D, D).T,  # column k = V e_k
            "U": op.U(torch.eye(m, dtype=f64)).reshape(m, m).T,
            "Vt_rows": op.Vt(eye_x),  # row j = Vt(e_j) = row j of V
            "Ut_rows": op.Ut(eye_y),
            "Ht": op.Ht(eye_y).reshape(m, D).T,
            "P": op.pinv(eye_y).reshape(m, D).T,
        }
        _built[name] = (op, mats)
    return _built[name]


def _spec_norm(a):
    return torch.linalg.matrix_norm(a, ord=2).item()


def test_shapes(case):
    op, M = case
    assert M["H"].shape == (op.m, op.D)
    assert op.singulars.shape == (op.m,) and op.singulars.dtype == f64
    assert op.m <= op.D
    assert bool((op.singulars >= 0).all())


def test_U_V_orthonormal(case):
    op, M = case
    torch.testing.assert_close(M["V"].T @ M["V"], torch.eye(op.D, dtype=f64), atol=1e-12, rtol=0)
    torch.testing.assert_close(M["U"].T @ M["U"], torch.eye(op.m, dtype=f64), atol=1e-12, rtol=0)
    # Vt / Ut are the transposes of V / U
    torch.testing.assert_close(M["Vt_rows"], M["V"], atol=1e-12, rtol=0)
    torch.testing.assert_close(M["Ut_rows"], M["U"], atol=1e-12, rtol=0)


def test_dense_equals_U_S_Vt(case):
    op, M = case
    s = op.singulars
    recon = M["U"] @ torch.diag(s) @ M["V"][:, : op.m].T
    # exact except on the directions reported as 0 (true singular value <= threshold)
    assert _spec_norm(M["H"] - recon) <= op.threshold * (1 + 1e-9) + 1e-12
    # U^T H V is diagonal: [diag(s_true) | 0], with s_true == s where s > 0 and s_true <= threshold elsewhere
    core = M["U"].T @ M["H"] @ M["V"]
    diag = torch.diagonal(core[:, : op.m]).clone()
    off = core.clone()
    off[:, : op.m] -= torch.diag(diag)
    assert off.abs().max().item() < 1e-12
    kept = s > 0
    torch.testing.assert_close(diag[kept], s[kept], atol=1e-12, rtol=0)
    assert bool((diag[~kept].abs() <= op.threshold * (1 + 1e-9) + 1e-12).all())
    if op.threshold == 0:  # exact factorisation
        torch.testing.assert_close(recon, M["H"], atol=1e-12, rtol=0)


def test_adjoint(case):
    op, M = case
    torch.testing.assert_close(M["Ht"], M["H"].T, atol=1e-12, rtol=0)
    x = torch.randn(2, *op.in_shape, dtype=f64)
    y = torch.randn(2, *op.measurement_shape, dtype=f64)
    lhs = (op.H(x) * y).sum()
    rhs = (x * op.Ht(y)).sum()
    assert abs(lhs.item() - rhs.item()) < 1e-10 * (1 + abs(lhs.item()))


def test_pinv(case):
    op, M = case
    H, P = M["H"], M["P"]
    # Penrose identities of the truncated pseudo-inverse
    torch.testing.assert_close(P @ H @ P, P, atol=1e-9, rtol=1e-9)
    assert _spec_norm(H @ P @ H - H) <= op.threshold * (1 + 1e-9) + 1e-10
    torch.testing.assert_close(H @ P, (H @ P).T, atol=1e-9, rtol=0)
    torch.testing.assert_close(P @ H, (P @ H).T, atol=1e-9, rtol=0)
    # equals LAPACK's pseudo-inverse of the dense matrix with the same spectral cut-off
    ref = torch.linalg.pinv(H, atol=op.threshold, rtol=1e-10)
    torch.testing.assert_close(P, ref, atol=1e-8, rtol=1e-8)
    if op.threshold == 0:
        torch.testing.assert_close(H @ P @ H, H, atol=1e-10, rtol=0)


def test_thresholded_singulars_exactly_zero(case):
    op, _ = case
    s = op.singulars
    assert bool(((s == 0) | (s > op.threshold)).all())
    if hasattr(op, "rel_threshold"):
        assert op.threshold == pytest.approx(op.rel_threshold * s.max().item(), rel=1e-12)


def test_batched_and_float32(case):
    op, _ = case
    x = torch.rand(2, *op.in_shape, dtype=f64) * 2 - 1
    y = op.H(x) + 0.1 * torch.randn(2, *op.measurement_shape, dtype=f64)
    v = torch.randn(2, op.D, dtype=f64)
    u = torch.randn(2, op.m, dtype=f64)
    calls = {"H": (op.H, x), "Ht": (op.Ht, y), "pinv": (op.pinv, y), "Vt": (op.Vt, x), "V": (op.V, v),
             "Ut": (op.Ut, y), "U": (op.U, u)}
    for name, (fn, arg) in calls.items():
        ref = fn(arg)
        # batch elements are independent
        torch.testing.assert_close(fn(arg[1:2]), ref[1:2], atol=1e-12, rtol=0, msg=name)
        out32 = fn(arg.float())
        assert out32.dtype == torch.float32, name
        scale = ref.abs().max().item() + 1e-12
        assert (out32.double() - ref).abs().max().item() < 1e-5 * scale + 1e-6, name
    torch.testing.assert_close(op.V(op.Vt(x)), x, atol=1e-12, rtol=0)
    assert op.singulars_as(x.float()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(case):
    op, _ = case
    x = torch.rand(2, *op.in_shape, dtype=torch.float32) * 2 - 1
    y = op.H(x)
    for fn, arg in ((op.H, x), (op.Ht, y), (op.pinv, y), (op.Vt, x), (op.Ut, y)):
        out = fn(arg.cuda())
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), fn(arg), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(op.V(op.Vt(x.cuda())).cpu(), x, atol=1e-5, rtol=1e-5)


# --- size errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda: BlockAverageSR((3, 10, 8), 4),
        lambda: BlockAverageSR((3, 8, 10), 4),
        lambda: BicubicSR((3, 9, 9), 2),
        lambda: GaussianBlur((3, 8, 8), 2.0, border="reflect"),  # radius 8 >= side 8
        lambda: Inpainting((3, 8, 8), torch.ones(8, 6, dtype=torch.bool)),
        lambda: Inpainting((3, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool)),
    ],
)
def test_unfit_sizes_raise_at_construction(build):
    with pytest.raises(ImageSizeError):
        build()


def test_sr_size_error_message():
    with pytest.raises(ImageSizeError, match="divisible by 4"):
        BlockAverageSR((3, 255, 256), 4)


@pytest.mark.parametrize("name", ["identity", "block-sr2", "bicubic-sr2", "gauss-zero", "inpaint-shared", "colorize"])
def test_wrong_input_shape_raises(name):
    op = CASES[name]()
    c, h, w = op.in_shape
    for bad in ((1, c, h + 1, w), (1, c + 1, h, w), (c, h, w)):
        with pytest.raises(ImageSizeError):
            op.H(torch.zeros(bad, dtype=f64))
        with pytest.raises(ImageSizeError):
            op.Vt(torch.zeros(bad, dtype=f64))
    with pytest.raises(ImageSizeError):
        op.check_size((c, h, w + 2))
    op.check_size((c, h, w))
    op.check_size((5, c, h, w))
    with pytest.raises(ImageSizeError):
        op.Ht(torch.zeros(1, c, h + 3, w, dtype=f64))
    with pytest.raises(ValueError):
        op.V(torch.zeros(1, op.D + 1, dtype=f64))


def test_invalid_parameters():
    with pytest.raises(ValueError):
        BlockAverageSR((3, 8, 8), 2.5)
    with pytest.raises(ValueError):
        GaussianBlur((3, 8, 8), 0.0)
    with pytest.raises(ValueError):
        UniformBlur((3, 8, 8), 4)
    with pytest.raises(ValueError):
        GaussianBlur((3, 8, 8), 1.0, border="circular")
    with pytest.raises(ValueError):
        Inpainting((3, 8, 8), torch.full((8, 8), 0.5))
    with pytest.raises(ValueError):
        GaussianBlur((3, 8, 8), 1.0, threshold=-1)


def test_threshold_zeroes_weak_directions():
    """A strong blur has many true singular values below 1e-3 of the largest: they read 0, the rest
    are untouched, and threshold=0 keeps them all."""
    op = GaussianBlur((1, 16, 16), 2.0)
    exact = GaussianBlur((1, 16, 16), 2.0, threshold=0.0)
    s, s0 = op.singulars, exact.singulars
    assert op.threshold == pytest.approx(1e-3 * s0.max().item())
    small = s0 <= op.threshold
    assert 0 < int(small.sum()) < s.numel()
    assert bool((s[small] == 0).all())
    assert torch.equal(s[~small], s0[~small])
    assert bool((s0 > 0).all())
