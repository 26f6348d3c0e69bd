"""DiffPIR on our operators: the SVD data step against a dense solve, the sampler's bookkeeping
(callback, draws, options, seeds), and its CLI errors."""

from __future__ import annotations

import pytest
import torch

from diffrestore.cli import main
from diffrestore.methods import check_options, diffpir, get_method
from diffrestore.methods.common import MethodArgumentError
from diffrestore.operators import tasks

from test_ddrm import LinearPrior, RecordingRandn

SHAPE = (3, 8, 8)
# threshold 0: the dense matrix is the operator itself (with the default 1e-3 cut-off, the step treats
# the cut directions as unobserved, as every method does)
DENSE_TASKS = {"sr4": {}, "deblur": {"threshold": 0.0}, "denoise": {}, "inpaint": {},
               "sr4-bicubic": {"threshold": 0.0}, "colorize": {}}


def _image(seed=1, batch=1):
    return torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("name", sorted(DENSE_TASKS))
@pytest.mark.parametrize("rho", [1e-4, 0.05, 3.0])
def test_svd_data_step_is_the_dense_proximal_solution(name, rho):
    """x = (H^T H + rho I)^-1 (H^T y + rho x0), solved densely in float64."""
    op = tasks.make_task(name, SHAPE, **DENSE_TASKS[name]).operator
    y = op.H(_image(1)) + 0.1 * torch.randn(1, *op.measurement_shape, dtype=torch.float64)
    x0 = _image(2)
    H = op.dense_matrix()
    want = torch.linalg.solve(H.T @ H + rho * torch.eye(op.D, dtype=torch.float64),
                              H.T @ y.reshape(-1) + rho * x0.reshape(-1))
    got = diffpir.svd_data_step(op, y)(x0, rho)
    assert got.shape == x0.shape
    torch.testing.assert_close(got.reshape(-1), want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", ["sr4", "deblur", "inpaint"])
def test_rho_zero_is_the_projection_onto_the_measurement(name):
    """rho = 0: Hx = y on the observed directions, x0 kept on the null space (pinv y + (I - P) x0)."""
    op = tasks.make_task(name, SHAPE).operator
    y = op.H(_image(1))
    x0 = _image(2)
    got = diffpir.svd_data_step(op, y)(x0, 0.0)
    want = op.pinv(y) + x0 - op.pinv(op.H(x0))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def _run(task="noisy-sr4", steps=5, seed=0, batch=1, **kw):
    t = tasks.make_task(task, SHAPE)
    y = t.measure(_image(1, batch).float(), generator=torch.Generator().manual_seed(5))
    prior = LinearPrior()
    kw.setdefault("generator", torch.Generator().manual_seed(seed))
    out = diffpir.restore(prior, t.operator, y, sigma_y=t.sigma_y, steps=steps, **kw)
    return out, prior, t, y


def test_callback_once_per_network_call_and_draws():
    infos, rec = [], RecordingRandn(seed=3)
    out, prior, t, y = _run(steps=6, randn=rec, callback=lambda i: infos.append(dict(i)), generator=None)
    assert len(prior.ts) == len(infos) == 6
    assert [i["i"] for i in infos] == list(range(6)) and all(i["steps"] == 6 for i in infos)
    assert [i["t"] for i in infos] == prior.ts == diffpir.timesteps(6)
    # one initial image, then one fresh-noise image per step but the last
    assert len(rec.draws) == 6 and all(d.shape == (1, *SHAPE) for d in rec.draws)
    # default output: the last prediction after the data step
    assert torch.equal(out, infos[-1]["x0_data"])
    assert all(float(i["x0"].abs().max()) <= 1 for i in infos)  # x0 clamped as official


def test_official_output_is_the_last_state_and_zeta_zero_draws_once():
    infos, rec = [], RecordingRandn(seed=3)
    out, *_ = _run(steps=4, zeta=0.0, official_output=True, randn=rec, callback=lambda i: infos.append(dict(i)),
                   generator=None)
    assert len(rec.draws) == 1 and len(infos) == 4
    assert infos[-1]["x0_data"] is None and torch.equal(out, infos[-1]["x_t"])


def test_noiseless_output_meets_the_measurement_with_lambda_zero():
    out, prior, t, y = _run(task="sr4", lambda_=0.0)
    torch.testing.assert_close(t.operator.H(out), y, rtol=0, atol=1e-5)


def test_same_seed_same_output_and_x_T_replaces_the_first_draw():
    a, *_ = _run(seed=7)
    b, *_ = _run(seed=7)
    c, *_ = _run(seed=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    rec = RecordingRandn(seed=9)
    d, *_ = _run(randn=rec, generator=None)
    replay = iter(rec.draws[1:])
    e, *_ = _run(randn=lambda shape: next(replay), x_T=rec.draws[0], generator=None)
    assert torch.equal(d, e)


def test_samples_through_the_registry():
    t = tasks.make_task("noisy-sr4", SHAPE)
    y = t.measure(_image(1, 2).float(), generator=torch.Generator().manual_seed(5))
    info = get_method("diffpir")
    kw = dict(sigma_y=t.sigma_y, steps=4)
    rows = info.sampler(LinearPrior(), t.operator, y.repeat_interleave(3, dim=0),
                        generator=torch.Generator().manual_seed(4), **kw).reshape(2, 3, *SHAPE)
    mean = info.restore(LinearPrior(), t.operator, y, samples=3, generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(mean, rows.mean(dim=1), atol=1e-6, rtol=0)
    assert not torch.allclose(rows[:, 0], rows[:, 1])


@pytest.mark.parametrize(
    "options,says",
    [({"lambda_": -1.0}, "lambda_ must be"), ({"zeta": 1.5}, "zeta must be in [0, 1]"),
     ({"skip_type": "log"}, "skip_type must be one of"), ({"init": "zero"}, "init must be one of"),
     ({"t_start": -3}, "t_start must be")],
)
def test_out_of_range_options(options, says):
    with pytest.raises(ValueError, match=f"method diffpir: {says}".replace("[", r"\[").replace("]", r"\]")):
        check_options("diffpir", options)
    with pytest.raises(MethodArgumentError, match=says.replace("[", r"\[").replace("]", r"\]")):
        _run(**options)


def test_schedule_limits():
    assert diffpir.timesteps(1) == [999] and diffpir.timesteps(3, t_start=500) == [500, 146, 0]
    assert diffpir.timesteps(4, skip_type="uniform") == [999, 666, 333, 0]
    for bad in (dict(steps=0), dict(steps=900), dict(steps=5, t_start=2)):
        with pytest.raises(MethodArgumentError):
            diffpir.timesteps(**bad)
    with pytest.raises(MethodArgumentError, match="t_start must be below"):
        _run(t_start=1000)
    out, prior, *_ = _run(steps=3, t_start=400)
    assert prior.ts == [400, 117, 0] and torch.isfinite(out).all()


def test_cli_negative_lambda_is_one_line_error(tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.new("RGB", (16, 16), (120, 30, 200)).save(photo)
    out = tmp_path / "out"
    assert main(["restore", str(photo), "--task", "sr4", "--method", "diffpir", "--prior", str(tmp_path / "none.pt"),
                 "--out", str(out), "--degrade", "--no-progress", "--option", "lambda_=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffrestore: error: ") and "lambda_ must be" in err[0]
    assert not out.exists() or not any(out.iterdir())
