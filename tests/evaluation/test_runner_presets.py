"""evaluate and the method defaults: a run pins every option whose recommended default differs from
the paper's in its config.json (the paper's value with ``--preset paper``), so its numbers never
depend on which defaults apply; a run recorded without such an option ran the paper's value."""

from __future__ import annotations

import dataclasses
import json

import pytest

import test_runner_fakes as fx
from diffrestore.cli_args import parse_options
from diffrestore.errors import EvalError
from diffrestore.evaluation.plan import EvalSpec, prepare


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fx.make_data(tmp_path_factory.mktemp("data"))


def _grid(data, tmp_path, **spec):
    base = dict(out=str(tmp_path / "run"), data=str(data), n=2, tasks=["sr4"], methods=["ddrm", "srldm", "ddrm-ldm"],
                pixel_prior="builtin:pixel-s", latent_prior="builtin:ldmsr-s", fig7_steps={"srldm": [2]})
    return prepare(EvalSpec(**{**base, **spec})).grid


def test_the_grid_records_the_recommended_or_the_paper_options(data, tmp_path):
    assert _grid(data, tmp_path)["options"] == {"ddrm": {"consistency": True}, "srldm": {"consistency": True}}
    assert _grid(data, tmp_path, preset="paper")["options"] == {"ddrm": {"consistency": False}, "srldm": {"consistency": False}}
    # an option given on the command line wins over the preset's, the others stay pinned
    given = parse_options("ddrm:eta=1.0;srldm:consistency=true;ddrm-ldm:stop=0")
    assert _grid(data, tmp_path, preset="paper", options=given)["options"] == {
        "ddrm": {"consistency": False, "eta": 1.0}, "srldm": {"consistency": True}, "ddrm-ldm": {"stop": 0.0},
    }  # fmt: skip


def _old_run(data, tmp_path, options: dict | None):
    """A run folder as made before the recommended defaults: its config.json lists only the options given."""
    plan = prepare(EvalSpec(out=str(tmp_path / "old"), data=str(data), n=2, tasks=["sr4"], methods=["ddrm"],
                                          pixel_prior="builtin:pixel-s", fig7_steps={"ddrm": [2]}))  # fmt: skip
    config = json.loads(json.dumps(plan.config))
    config["grid"].pop("options", None)
    if options:
        config["grid"]["options"] = options
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "old")


def test_a_run_recorded_before_the_recommended_defaults_keeps_the_paper_values(data, tmp_path):
    out = _old_run(data, tmp_path, {"ddrm": {"eta": 1.0}})
    assert prepare(EvalSpec(out=out)).grid["options"] == {"ddrm": {"consistency": False, "eta": 1.0}}
    # the same options again are no change; another consistency is refused
    same = EvalSpec(out=out, options=parse_options("ddrm:eta=1.0"))
    assert prepare(same).grid["options"] == {"ddrm": {"consistency": False, "eta": 1.0}}
    with pytest.raises(EvalError, match=r"options of ddrm \{'eta': 1.0\} -> \{'consistency': True\}"):
        prepare(EvalSpec(out=out, options=parse_options("ddrm:consistency=true")))


def test_a_new_run_resumed_keeps_its_recorded_defaults(data, tmp_path):
    out = _old_run(data, tmp_path, {"ddrm": {"consistency": True}})
    assert prepare(EvalSpec(out=out)).grid["options"] == {"ddrm": {"consistency": True}}


def test_paper_preset_runs_the_module_defaults_bit_for_bit(data, tmp_path, monkeypatch):
    """With a method whose recommended option differs from its module default, the records of
    ``--preset paper`` equal those of the option set to the module's value explicitly, and the
    default run's equal those of the recommended value set explicitly; the two differ."""
    argv = ["--preset", "paper", "--n", str(fx.N_IMAGES)]  # the grid below overrides the preset's size, steps...
    install = fx.install

    def install_recommending(mp):  # fake-pix with a recommended noise of 0 (its module default is 1)
        install(mp)
        info = fx.methods.METHODS["fake-pix"]
        mp.setitem(fx.methods.METHODS, "fake-pix", dataclasses.replace(info, recommended={"noise": 0.0}))

    monkeypatch.setattr(fx, "install", install_recommending)
    runs = {
        "paper": argv,
        "explicit-paper": ["--options", "fake-pix:noise=1.0"],
        "default": [],
        "explicit-recommended": ["--options", "fake-pix:noise=0"],
    }
    found = {}
    for name, extra in runs.items():
        run = tmp_path / name
        rc, _, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run, *extra))
        assert rc == 0, err
        found[name] = [{k: v for k, v in r.items() if k != "options"} for r in fx.records(run)]
        noise = json.loads((run / "config.json").read_text())["grid"]["options"]["fake-pix"]["noise"]
        assert noise == (1.0 if "paper" in name else 0.0)
    assert found["paper"] == found["explicit-paper"]
    assert found["default"] == found["explicit-recommended"]
    assert found["paper"] != found["default"]


def test_a_method_added_to_an_old_run_takes_the_recommended_options(data, tmp_path):
    out = _old_run(data, tmp_path, None)
    spec = EvalSpec(out=out, methods=["srldm"], latent_prior="builtin:ldmsr-s")
    assert prepare(spec).grid["options"] == {"ddrm": {"consistency": False}, "srldm": {"consistency": True}}
