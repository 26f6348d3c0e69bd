"""``evaluate --adm-config`` and ``--frozen-graphs``: passed to the prior loader, recorded in config.json, taken
from it on a rerun, and a different one on an existing run is refused (the fakes of ``test_runner_fakes``)."""

from __future__ import annotations

import json

import test_runner_fakes as fx

CFG = {"num_head_channels": 16}


def recording_loads(monkeypatch, option: str) -> list:
    """Make the fake loader record (kind, the value of ``option`` it was given) for each prior it loads."""
    seen = []
    load = fx.fake_load_prior

    def recording_load_prior(spec, device, dtype, kind, **options):
        seen.append((kind, options.get(option)))
        return load(spec, device, dtype, kind)

    monkeypatch.setattr(fx, "fake_load_prior", recording_load_prior)  # what install() puts in place
    return seen


def test_adm_config_reaches_the_pixel_prior_and_is_recorded(tmp_path, monkeypatch):
    data = fx.make_data(tmp_path / "data")
    run = tmp_path / "run"
    seen = recording_loads(monkeypatch, "adm_config")
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run, "--adm-config", json.dumps(CFG)))
    assert rc == 0, err
    assert sorted(seen) == [("latent", None), ("pixel", CFG)]
    assert json.loads((run / "config.json").read_text())["settings"]["adm_config"] == CFG

    before = (run / "records.jsonl").read_bytes()
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run))  # not given: the recorded one
    assert rc == 0, err
    assert (run / "records.jsonl").read_bytes() == before

    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run, "--adm-config", '{"num_head_channels": 32}'))
    assert rc == 2 and err.count("\n") == 1
    assert "was made with different settings: adm config {'num_head_channels': 16} -> {'num_head_channels': 32}" in err


def test_frozen_graphs_reach_both_priors_and_are_recorded(tmp_path, monkeypatch):
    data = fx.make_data(tmp_path / "data")
    run = tmp_path / "run"
    seen = recording_loads(monkeypatch, "frozen_graphs")
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run, "--frozen-graphs"))
    assert rc == 0, err
    assert sorted(seen) == [("latent", True), ("pixel", True)]
    assert json.loads((run / "config.json").read_text())["settings"]["frozen_graphs"] is True
    lines = [json.loads(line) for line in (run / "throughput.jsonl").read_text().splitlines()]
    assert lines and all(line["frozen_graphs"] is True for line in lines)

    before = (run / "records.jsonl").read_bytes()
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run))  # not given: as recorded
    assert rc == 0, err
    assert (run / "records.jsonl").read_bytes() == before

    other = tmp_path / "plain"
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, other))
    assert rc == 0, err
    assert "frozen_graphs" not in json.loads((other / "config.json").read_text())["settings"]
