"""``evaluate --adm-config``: passed to the pixel prior's loader, recorded in config.json, taken from it on a
rerun, and a different one on an existing run is refused (the fakes of ``test_runner_fakes``)."""

from __future__ import annotations

import json

import test_runner_fakes as fx

CFG = {"num_head_channels": 16}


def test_adm_config_reaches_the_pixel_prior_and_is_recorded(tmp_path, monkeypatch):
    data = fx.make_data(tmp_path / "data")
    run = tmp_path / "run"
    seen = []
    load = fx.fake_load_prior

    def recording_load_prior(spec, device, dtype, kind, adm_config=None):
        seen.append((kind, adm_config))
        return load(spec, device, dtype, kind)

    monkeypatch.setattr(fx, "fake_load_prior", recording_load_prior)  # what install() puts in place
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
