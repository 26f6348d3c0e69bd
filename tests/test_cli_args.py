"""The command line's value parsers: --steps, --fig7-steps and --options of evaluate (and demo)."""

from __future__ import annotations

import re

import pytest

from diffrestore.cli_args import CLIError, parse_options, parse_steps, parse_sweep


def test_parse_steps_and_sweeps():
    assert parse_steps("100") == {"*": 100}
    assert parse_steps("50,ddrm:20, srldm:100") == {"*": 50, "ddrm": 20, "srldm": 100}
    assert parse_sweep("srldm:5,10,20,50,100,200;ddrm:10,20,50,100") == {
        "srldm": [5, 10, 20, 50, 100, 200],
        "ddrm": [10, 20, 50, 100],
    }
    for bad in ("x", "ddrm:0", "ddrm:"):
        with pytest.raises(CLIError):
            parse_steps(bad)
    with pytest.raises(CLIError):
        parse_sweep("ddrm")


def test_parse_options_types_values_by_the_methods_defaults():
    assert parse_options("ddrm:eta=1, eta_b=0.5; ddrm-ldm:stop=0.4;ddrm-srldm:strategy=b") == {
        "ddrm": {"eta": 1.0, "eta_b": 0.5},
        "ddrm-ldm": {"stop": 0.4},
        "ddrm-srldm": {"strategy": "b"},
    }
    assert isinstance(parse_options("ddrm:eta=1")["ddrm"]["eta"], float)
    assert parse_options("ddrm:official_zero_singular_bug=true") == {"ddrm": {"official_zero_singular_bug": True}}
    assert parse_options(None) == {} and parse_options(" ; ") == {}
    for bad, says in [
        ("ddrm", "is not METHOD:NAME=VALUE"),
        ("ddrm:eta", "is not METHOD:NAME=VALUE"),
        ("ddrm:=1", "is not METHOD:NAME=VALUE"),
        ("nope:eta=1", "unknown method 'nope'"),
        ("ddrm:stop=0.4", "method ddrm has no option 'stop' (its options: eta, eta_b, official_zero_singular_bug, consistency, rho, samples)"),
        ("srldm:stop=0.4", "method srldm has no option 'stop' (its options: eta, lr_filter, start, consistency, rho, samples)"),
        ("ddrm:steps=5", "has no option 'steps'"),  # set by --steps, not an option
        ("ddrm:eta=high", "method ddrm option eta: 'high' is not a float"),
        ("ddrm:official_zero_singular_bug=maybe", "is not a bool"),
        # values out of range, refused here (before a run folder is made) by the method's own check
        ("ddrm:eta=1.5", "method ddrm: eta must be in [0, 1], got 1.5"),
        ("ddrm:samples=0", "method ddrm: samples must be a positive integer, got 0"),
        ("ddrm:samples=2.5", "option samples: '2.5' is not a int"),
        ("srldm:start=0", "method srldm: start must be in (0, 1], got 0.0"),
        ("srldm:lr_filter=nearest", "method srldm: unknown lr_filter 'nearest'"),
        ("ddrm-ldm:stop=0.6", "method ddrm-ldm: stop (0.6) must be in [0, start=0.5)"),
        ("ddrm-ldm:rho=-1", "method ddrm-ldm: rho must be >= 0"),
        ("ddrm-ldm:eta=-0.5", "method ddrm-ldm: eta must be >= 0"),
        ("ddrm-srldm:strategy=c", "method ddrm-srldm: unknown DDRM-SRLDM strategy 'c'"),
        ("ddrm-srldm:eta_b=2", "method ddrm-srldm: eta_b must be in [0, 1], got 2.0"),
    ]:
        with pytest.raises((CLIError, ValueError), match=re.escape(says)):
            parse_options(bad)
