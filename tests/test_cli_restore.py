"""End-to-end `diffrestore restore` on a real photo with a random-weight tiny ADM (golden weights)."""

import json
import warnings

import numpy as np
import pytest

from diffrestore.methods import method_options
import torch
from PIL import Image

from diffrestore.cli import main
from diffrestore.image_io import read_image

REPORT_TASKS = ["sr4", "deblur", "denoise", "noisy-sr4"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory, shared):
    """A real photo, cropped to 72x64 (not square, a multiple of 8 but cropped further by sr4's needs)."""
    src = sorted((shared / "data" / "imagenet-sample-500").glob("*.JPEG"))[3]
    img = Image.open(src).convert("RGB")
    img = img.resize((img.width // 5, img.height // 5), Image.BILINEAR).crop((0, 0, 72, 64))
    path = tmp_path_factory.mktemp("in") / "photo.png"
    img.save(path)
    return path


@pytest.fixture(scope="module")
def adm(shared):
    return str(shared / "golden" / "ddrm" / "unet_state_dict.pt")


@pytest.mark.parametrize("task", REPORT_TASKS)
def test_restore_degrade_end_to_end(tmp_path, photo, adm, task, capsys):
    out = tmp_path / "out"
    rc = main(["restore", str(photo), "--task", task, "--method", "ddrm", "--prior", adm, "--steps", "5",
               "--seed", "3", "--out", str(out), "--degrade", "--no-progress"])
    assert rc == 0
    rec = json.loads((out / f"photo_{task}_ddrm.json").read_text())
    assert rec["size"] == [64, 72]
    for name in [f"photo_{task}_ddrm.png", f"photo_{task}_degraded.png", "photo_clean.png"]:
        assert (out / name).stat().st_size > 0
    assert np.isfinite([rec["psnr"], rec["ssim"], rec["baseline_psnr"]]).all()
    assert "PSNR" in capsys.readouterr().out
    # DDRM enforces the measurement on the observed spectral rows whatever the network predicts, so even
    # with random weights the raw (unclamped) output agrees with a noiseless y at least as well as the
    # baseline; clamping a random network's +-100 values to an image breaks that
    if task in ("sr4", "deblur"):
        assert rec["consistency_raw"] <= rec["baseline_consistency"], rec


def test_restore_is_reproducible(tmp_path, photo, adm):
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}"
        assert main(["restore", str(photo), "--task", "noisy-sr4", "--prior", adm, "--steps", "3", "--seed", "7",
                     "--out", str(out), "--degrade", "--no-progress"]) == 0
        outs.append(read_image(out / "photo_noisy-sr4_ddrm.png"))
    assert torch.equal(outs[0], outs[1])


def test_restore_measurement_input_sr(tmp_path, photo, adm, capsys):
    """Real use: the input is the low-resolution measurement; the output is 4x larger."""
    small = tmp_path / "small.png"
    Image.open(photo).resize((19, 16)).save(small)
    out = tmp_path / "out"
    assert main(["restore", str(small), "--task", "sr4", "--prior", adm, "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    # 19x16 would give 76x64; this ADM needs multiples of 8, so the input is cropped to 18x16 -> 72x64
    assert read_image(out / "small_sr4_ddrm.png").shape == (3, 64, 72)
    assert "centre-cropped 16x19 to 16x18" in capsys.readouterr().err


def _no_files(path):
    return not path.exists() or not any(path.rglob("*"))


@pytest.mark.parametrize(
    "case",
    ["not_image", "missing_image", "bad_checkpoint", "ldm_as_pixel", "bad_task", "tiny_image", "unwritable"],
)
def test_bad_input_one_line_error_no_output(tmp_path, photo, adm, shared, case, capsys):
    out = tmp_path / "out"
    args = dict(img=str(photo), prior=adm, task="sr4", out=str(out))
    if case == "not_image":
        bad = tmp_path / "x.png"
        bad.write_text("hello")
        args["img"] = str(bad)
    elif case == "missing_image":
        args["img"] = str(tmp_path / "nope.png")
    elif case == "bad_checkpoint":
        bad = tmp_path / "model.pt"
        torch.save({"foo.weight": torch.zeros(3)}, bad)
        args["prior"] = str(bad)
    elif case == "ldm_as_pixel":
        args["prior"] = str(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt")
    elif case == "bad_task":
        args["task"] = "sr5x"
    elif case == "tiny_image":
        tiny = tmp_path / "tiny.png"
        Image.new("RGB", (3, 3)).save(tiny)
        args["img"] = str(tiny)
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "sub"
        args["out"] = str(out)
    rc = main(["restore", args["img"], "--task", args["task"], "--prior", args["prior"], "--steps", "2",
               "--out", args["out"], "--degrade", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("diffrestore: error:"), err
    assert _no_files(out)


@pytest.fixture(scope="module")
def ldm(shared):
    return str(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt")


@pytest.mark.parametrize("method", ["srldm", "ddrm-srldm", "ddrm-ldm"])
@pytest.mark.parametrize("task", REPORT_TASKS)
def test_restore_degrade_latent_methods(tmp_path, photo, ldm, method, task):
    """Each latent method, end to end on a real photo, with the random-weight tiny LDM-SR (official layout)."""
    out = tmp_path / "out"
    assert main(["restore", str(photo), "--task", task, "--method", method, "--prior", ldm, "--steps", "3",
                 "--out", str(out), "--degrade", "--no-progress"]) == 0
    rec = json.loads((out / f"photo_{task}_{method}.json").read_text())
    assert rec["size"] == [64, 72] and np.isfinite([rec["psnr"], rec["ssim"]]).all()
    assert read_image(out / f"photo_{task}_{method}.png").shape == (3, 64, 72)
    if method == "ddrm-ldm" and task == "sr4":
        # the last step's projection makes the raw output agree with the noiseless measurement
        assert rec["consistency_raw"] < 1e-3 * max(1.0, rec["baseline_consistency"])


@pytest.mark.parametrize("method,prior", [("ddrm", "adm"), ("srldm", "ldm")])
def test_frozen_graphs_restore_the_same(tmp_path, photo, adm, ldm, method, prior, frozen_traces):
    """``--frozen-graphs`` changes the speed, not the result (float rounding only; random-weight priors, fp32);
    only with the flag is the UNet traced, once for the one input size — not a pixel UNet in fp32 on a CPU,
    where the frozen graph is slower."""
    images, traced = [], []
    for flag in ([], ["--frozen-graphs"]):
        out = tmp_path / f"out{len(flag)}"
        assert main(["restore", str(photo), "--task", "noisy-sr4", "--method", method, "--prior",
                     {"adm": adm, "ldm": ldm}[prior], "--steps", "4", "--out", str(out), "--degrade",
                     "--no-progress", "--dtype", "fp32", *flag]) == 0
        images.append(read_image(out / f"photo_noisy-sr4_{method}.png"))
        traced.append(list(frozen_traces))
    assert traced == [[], [] if prior == "adm" else [("UNetSample", 2)]]
    diff = (images[0] - images[1]).abs()
    assert diff.max() <= 2 / 255 and diff.mean() <= 1e-3


@pytest.mark.parametrize("method,prior", [("srldm", "adm"), ("ddrm", "ldm")])
def test_prior_kind_mismatch_is_one_line_error(tmp_path, photo, adm, ldm, method, prior, capsys):
    out = tmp_path / "out"
    spec = {"adm": adm, "ldm": ldm}[prior]
    assert main(["restore", str(photo), "--task", "sr4", "--method", method, "--prior", spec,
                 "--out", str(out), "--degrade", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prior" in err[0] and _no_files(out)


@pytest.mark.parametrize("method,option,value", [("srldm", "--start", "0.4"), ("ddrm-ldm", "--stop", "0.3")])
def test_latent_sampler_option_reaches_the_method(tmp_path, photo, ldm, method, option, value):
    outs = {}
    for given in (None, value):
        out = tmp_path / f"out{given}"
        argv = ["restore", str(photo), "--task", "sr4", "--method", method, "--prior", ldm, "--steps", "3",
                "--out", str(out), "--degrade", "--no-progress"]
        assert main(argv + ([option, given] if given else [])) == 0
        outs[given] = read_image(out / f"photo_sr4_{method}.png")
    assert not torch.equal(outs[None], outs[value])


def test_stop_out_of_range_is_one_line_error(tmp_path, photo, ldm, capsys):
    out = tmp_path / "bad"
    assert main(["restore", str(photo), "--task", "sr4", "--method", "ddrm-ldm", "--prior", ldm, "--steps", "3",
                 "--out", str(out), "--degrade", "--no-progress", "--stop", "0.6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stop (0.6) must be in [0, start=0.5)" in err[0] and _no_files(out)


def test_samples_reaches_ddrm_and_the_record_keeps_the_options(tmp_path, photo, adm):
    outs, records = {}, {}
    for samples in (None, 3):
        out = tmp_path / f"out{samples}"
        argv = ["restore", str(photo), "--task", "noisy-sr4", "--method", "ddrm", "--prior", adm, "--steps", "3",
                "--out", str(out), "--degrade", "--no-progress", "--eta", "0.9"]
        assert main(argv + (["--samples", str(samples)] if samples else [])) == 0
        outs[samples] = read_image(out / "photo_noisy-sr4_ddrm.png")
        records[samples] = json.loads((out / "photo_noisy-sr4_ddrm.json").read_text())
    defaults = method_options("ddrm")
    assert records[None]["options"] == {**defaults, "eta": 0.9}
    assert records[3]["options"] == {**defaults, "eta": 0.9, "samples": 3}
    assert not torch.equal(outs[3], outs[None])  # the option reached the method (its mean: tests/methods)
    assert "sample_std" not in records[None] and records[3]["sample_std"]["mean"] > 0


def test_samples_of_a_latent_method_write_the_spread_map(tmp_path, photo, ldm):
    """--samples N works for every method; the std map is grey, black where the draws agree, scaled
    so that white is STD_MAP_WHITE, and the record keeps its statistics."""
    from PIL import Image

    from diffrestore.restoration import STD_MAP_WHITE

    out = tmp_path / "out"
    assert main(["restore", str(photo), "--task", "sr4", "--method", "srldm", "--prior", ldm, "--steps", "3",
                 "--out", str(out), "--degrade", "--no-progress", "--samples", "2"]) == 0
    record = json.loads((out / "photo_sr4_srldm.json").read_text())
    stats = record["sample_std"]
    assert record["options"] == {**method_options("srldm"), "samples": 2} and stats["png_white"] == STD_MAP_WHITE
    assert 0 < stats["mean"] <= stats["max"] and -1 <= stats["error_correlation"] <= 1
    png = np.asarray(Image.open(out / "photo_sr4_srldm_std.png"))
    assert png.ndim == 2 and png.shape == tuple(record["size"])
    shown = png.astype(np.float64) / 255 * STD_MAP_WHITE  # clipped at white, so at most the true mean
    assert shown.mean() <= stats["mean"] + STD_MAP_WHITE / 255
    if stats["max"] < STD_MAP_WHITE:
        assert shown.mean() == pytest.approx(stats["mean"], abs=STD_MAP_WHITE / 255)


def test_samples_out_of_range_is_one_line_error_before_loading(tmp_path, photo, capsys):
    out = tmp_path / "bad"
    assert main(["restore", str(photo), "--task", "sr4", "--method", "ddrm", "--prior", str(tmp_path / "no-such.pt"),
                 "--out", str(out), "--degrade", "--no-progress", "--samples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method ddrm: samples must be a positive integer, got 0" in err[0] and _no_files(out)


@pytest.mark.parametrize(
    "method,option",
    [("srldm", ["--eta-b", "1"]), ("ddrm", ["--start", "0.5"]), ("srldm", ["--stop", "0.2"])],
)
def test_option_the_method_lacks_is_one_line_error(tmp_path, photo, adm, ldm, method, option, capsys):
    out = tmp_path / "out"
    spec = ldm if method == "srldm" else adm
    assert main(["restore", str(photo), "--task", "sr4", "--method", method, "--prior", spec,
                 "--out", str(out), "--degrade", "--no-progress", *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"method {method} has no option {option[0]}" in err[0] and _no_files(out)


# --------------------------------------------------------------------------------------------
# --adm-config: the ADM hyper-parameters a checkpoint does not store (the golden tiny ADM has 16-channel heads)
# --------------------------------------------------------------------------------------------

ADM_CONFIG = '{"num_head_channels": 16}'


def test_restore_with_adm_config_uses_it(tmp_path, photo, adm):
    """Given as a JSON object or as a .json file, the head width is used (no guess) and recorded; the output
    differs from the one of the guessed width, so the option reaches the network."""
    from diffrestore.priors.adm_weights import ADMGuessWarning

    cfg_file = tmp_path / "adm.json"
    cfg_file.write_text(ADM_CONFIG)
    outs = {}
    for name, value in (("string", ADM_CONFIG), ("file", str(cfg_file)), ("guessed", None)):
        out = tmp_path / name
        argv = ["restore", str(photo), "--task", "sr4", "--prior", adm, "--steps", "3", "--seed", "2", "--out", str(out),
                "--degrade", "--no-progress"] + (["--adm-config", value] if value else [])  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error" if value else "ignore", ADMGuessWarning)  # a guess would raise
            assert main(argv) == 0
        rec = json.loads((out / "photo_sr4_ddrm.json").read_text())
        assert rec.get("adm_config") == ({"num_head_channels": 16} if value else None)
        outs[name] = read_image(out / "photo_sr4_ddrm.png")
    assert torch.equal(outs["string"], outs["file"])
    assert not torch.equal(outs["string"], outs["guessed"])


@pytest.mark.parametrize(
    "value, message",
    [
        ('{"num_head_channels": }', "--adm-config: not valid JSON"),
        ("[16]", "expected a JSON object"),
        ("no_such_config.json", "neither a JSON object nor an existing .json file"),
        ('{"num_head_channel": 16}', "unknown ADM hyper-parameter(s): num_head_channel"),
    ],
)
def test_bad_adm_config_is_one_line_error_no_output(tmp_path, photo, adm, value, message, capsys):
    out = tmp_path / "out"
    rc = main(["restore", str(photo), "--task", "sr4", "--prior", adm, "--steps", "2", "--out", str(out),
               "--adm-config", value, "--degrade", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("diffrestore: error:") and message in err[0], err
    assert _no_files(out)


@pytest.mark.parametrize("command", ["evaluate", "demo"])
def test_bad_adm_config_of_evaluate_and_demo(tmp_path, photo, command, capsys):
    out = tmp_path / "out"
    data = ["--data", str(photo.parent)] if command == "evaluate" else []
    rc = main([command, *data, "--out", str(out), "--adm-config", "{bad", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("diffrestore: error: --adm-config: not valid JSON"), err
    assert not out.exists()


def test_demo_with_adm_config(tmp_path, adm, capsys):
    from diffrestore.priors.adm_weights import ADMGuessWarning

    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ADMGuessWarning)
        rc = main(["demo", "--out", str(out), "--images", "1", "--size", "32", "--methods", "ddrm", "--tasks", "denoise",
                   "--steps", "2", "--pixel-prior", adm, "--adm-config", ADM_CONFIG, "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["adm_config"] == {"num_head_channels": 16} and settings["priors"] == {"pixel": adm}


def test_methods_explains_every_option_of_every_method(capsys):
    """Under each method, one line per option: NAME=DEFAULT (the paper's value too where the
    recommended default differs) and a description in words."""
    import re

    from diffrestore.methods import METHODS, option_descriptions

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    blocks = re.split(r"\n(?=\S)", out)
    for name in METHODS:
        block = next(b for b in blocks if b.startswith(f"{name} "))
        lines = block.splitlines()[1:]
        options = method_options(name)
        assert len(lines) == len(options), block
        for line, (key, value) in zip(lines, options.items()):
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            assert line.split()[0] == f"{key}={shown}", line
            assert option_descriptions(name)[key] and line.endswith(option_descriptions(name)[key])
            assert len(option_descriptions(name)[key].split()) >= 4, (name, key)
    assert "consistency=true (paper: false)" in out and "eta=0.85 " in out and "stop=0.4 " in out
    assert out.count("=true (paper: false)") == sum(len(info.recommended) for info in METHODS.values()) == 2


def test_any_method_option_by_name_and_the_paper_preset(tmp_path, photo, ldm):
    """--option NAME=VALUE reaches options without a dedicated flag: SRLDM's consistency step (on by
    default, the recommended setting) makes its output agree with the measurement (noiseless sr4:
    ||H x - y|| near 0, before clamping); --option consistency=false and --preset paper (fp32) both
    run the paper's SRLDM, the same image bit for bit; each record keeps the values used."""
    runs = {"default": ["--dtype", "fp32"], "off": ["--dtype", "fp32", "--option", "consistency=false"],
            "paper": ["--preset", "paper"], "on": ["--dtype", "fp32", "--option", "consistency=true"]}
    records, images = {}, {}
    for key, extra in runs.items():
        out = tmp_path / key
        assert main(["restore", str(photo), "--task", "sr4", "--method", "srldm", "--prior", ldm, "--steps", "3",
                     "--out", str(out), "--degrade", "--no-progress", *extra]) == 0
        records[key] = json.loads((out / "photo_sr4_srldm.json").read_text())
        images[key] = (out / "photo_sr4_srldm.png").read_bytes()
    # records keep every option's value as used: the recommended default where none was given
    assert records["default"]["options"] == method_options("srldm") and records["default"]["steps"] == 3
    assert records["default"]["options"]["consistency"] is True and records["off"]["options"]["consistency"] is False
    assert records["paper"]["options"] == method_options("srldm", paper=True) == records["off"]["options"]
    assert records["paper"]["dtype"] == "fp32"
    assert images["paper"] == images["off"] != images["default"] == images["on"]
    assert records["default"]["consistency_raw"] < 1e-3 < records["off"]["consistency_raw"]


@pytest.mark.parametrize(
    "option,says",
    [("bogus=1", "method srldm has no option 'bogus'"), ("consistency", "is not NAME=VALUE"),
     ("consistency=maybe", "option consistency: 'maybe' is not a bool"), ("start=0.5", "option start is given twice")],
)
def test_bad_option_is_one_line_error(tmp_path, photo, ldm, option, says, capsys):
    out = tmp_path / "out"
    assert main(["restore", str(photo), "--task", "sr4", "--method", "srldm", "--prior", ldm, "--start", "0.4",
                 "--out", str(out), "--degrade", "--no-progress", "--option", option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and _no_files(out)


@pytest.mark.parametrize("method,prior,steps", [("ddrm", "adm", None), ("srldm", "ldm", None), ("ddrm", "adm", 7)])
def test_the_record_holds_the_steps_the_method_ran(tmp_path, photo, adm, ldm, method, prior, steps, monkeypatch):
    """Without --steps the record says the method's registry default, not null; either way it equals the
    step count the method was called with."""
    from diffrestore import restoration
    from diffrestore.methods import get_method

    called = []
    real = restoration.run_method

    def spy(name, *args, **kwargs):
        called.append(kwargs["steps"])
        return real(name, *args, **kwargs)

    monkeypatch.setattr(restoration, "run_method", spy)
    out = tmp_path / "out"
    extra = [] if steps is None else ["--steps", str(steps)]
    assert main(["restore", str(photo), "--task", "denoise", "--method", method, "--prior", {"adm": adm, "ldm": ldm}[prior],
                 "--out", str(out), "--no-progress", *extra]) == 0  # fmt: skip
    record = json.loads((out / f"photo_denoise_{method}.json").read_text())
    expected = get_method(method).default_steps if steps is None else steps
    assert called == [expected] and record["steps"] == expected and type(record["steps"]) is int
