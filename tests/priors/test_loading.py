"""load_prior: ADM checkpoints, diffusers UNet folders, LDM checkpoints, and the errors users can cause."""

from __future__ import annotations

import argparse
import json
import shutil
import warnings

import pytest
import torch
from diffusers import UNet2DModel

from diffrestore.priors.adm import adm_config, build_adm_unet
from diffrestore.priors.adm_weights import ADMGuessWarning, convert_adm_state_dict
from diffrestore.priors.base import (
    LatentSRPrior,
    PixelPrior,
    alphas_cumprod_from_betas,
    linear_betas,
    sqrt_linear_betas,
)
from diffrestore.priors.loading import PriorLoadError, load_prior
from diffrestore.priors.pixel import UNetPixelPrior


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def golden_dir(shared):
    return shared / "golden" / "ddrm"


@pytest.fixture(scope="module")
def golden_call(golden_dir):
    return torch.load(golden_dir / "ref_sr4.pt", map_location="cpu", weights_only=True)["model_calls"][5]


# --------------------------------------------------------------------------------------------------
# ADM .pt


def test_adm_checkpoint_loads(golden_dir, golden_call):
    prior = load_prior(str(golden_dir / "unet_state_dict.pt"), adm_config={"num_head_channels": 16})
    assert isinstance(prior, UNetPixelPrior) and isinstance(prior, PixelPrior)
    assert prior.multiple_of == 8 and prior.image_size == 64 and prior.learn_sigma
    assert torch.equal(prior.alphas_cumprod, alphas_cumprod_from_betas(linear_betas()))
    eps = prior.eps(golden_call["x_in"], golden_call["t"])
    assert rel(eps, golden_call["out"][:, :3]) <= 1e-5


def test_adm_head_width_guess_warns(golden_dir):
    # the tiny model's 16-channel heads are not recorded in its weights: the guess is flagged
    with pytest.warns(UserWarning, match="num_head_channels") as record:
        prior = load_prior(golden_dir / "unet_state_dict.pt")
    assert isinstance(prior, UNetPixelPrior)
    (w,) = [w for w in record if issubclass(w.category, ADMGuessWarning)]
    # what Python prints on stderr: one line naming the file, the guess and how to override it
    shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    assert shown.count("\n") == 1 and shown.endswith("\n")
    assert "unet_state_dict.pt" in shown and "guessed num_head_channels=32" in shown and "adm_config" in shown


def test_adm_checkpoint_bf16(golden_dir, golden_call):
    prior = load_prior(golden_dir / "unet_state_dict.pt", dtype="bf16", adm_config={"num_head_channels": 16})
    assert prior.dtype == torch.bfloat16
    eps = prior.eps(golden_call["x_in"], golden_call["t"])
    assert eps.dtype == torch.float32 and rel(eps, golden_call["out"][:, :3]) < 0.1


def test_adm_wrapped_and_prefixed_state_dict(tmp_path, golden_dir, golden_call):
    sd = torch.load(golden_dir / "unet_state_dict.pt", map_location="cpu", weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    prior = load_prior(path, adm_config={"num_head_channels": 16})
    assert rel(prior.eps(golden_call["x_in"], golden_call["t"]), golden_call["out"][:, :3]) <= 1e-5


# --------------------------------------------------------------------------------------------------
# diffusers folders


def _small_unet(**kw) -> UNet2DModel:
    cfg = dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    cfg.update(kw)
    torch.manual_seed(0)
    return UNet2DModel(**cfg).eval()


def test_diffusers_folder_round_trip(tmp_path):
    unet = _small_unet()
    unet.save_pretrained(tmp_path / "m")
    prior = load_prior(str(tmp_path / "m"))
    assert isinstance(prior, UNetPixelPrior)
    assert prior.multiple_of == 2 and prior.image_size == 16 and not prior.learn_sigma
    assert torch.equal(prior.alphas_cumprod, alphas_cumprod_from_betas(linear_betas()))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    with torch.inference_mode():
        want = unet(x, t).sample
    assert torch.allclose(prior.eps(x, t), want, atol=1e-6, rtol=1e-5)


def test_pipeline_folder_with_scheduler(tmp_path):
    unet = _small_unet(out_channels=6)
    unet.save_pretrained(tmp_path / "p" / "unet")
    (tmp_path / "p" / "scheduler").mkdir()
    sched = {"_class_name": "DDPMScheduler", "beta_start": 0.0015, "beta_end": 0.0155, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "prediction_type": "epsilon"}  # fmt: skip
    (tmp_path / "p" / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    prior = load_prior(tmp_path / "p")
    assert prior.learn_sigma
    assert torch.equal(prior.alphas_cumprod, alphas_cumprod_from_betas(sqrt_linear_betas(0.0015, 0.0155, 1000)))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3.0])
    with torch.inference_mode():
        want = unet(x, t).sample[:, :3]
    assert torch.allclose(prior.eps(x, t), want, atol=1e-6, rtol=1e-5)
    # v-prediction is refused
    sched["prediction_type"] = "v_prediction"
    (tmp_path / "p" / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    with pytest.raises(PriorLoadError, match="prediction_type"):
        load_prior(tmp_path / "p")


def test_converted_adm_folder_round_trip(tmp_path):
    """An ADM whose options need the post-construction patches (channel_mult 0.5, fixed head count)
    survives save_pretrained / load_prior through the ``_adm`` config record."""
    cfg = adm_config(image_size=16, num_channels=64, num_res_blocks=1, channel_mult="0.5,1",
                     attention_resolutions="8", num_heads=2, num_head_channels=-1)  # fmt: skip
    unet = build_adm_unet(cfg)
    unet.save_pretrained(tmp_path / "adm")
    prior = load_prior(tmp_path / "adm")
    assert prior.unet.time_embedding.linear_1.in_features == 64
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([700.0])
    with torch.inference_mode():
        want = unet(x, t).sample[:, :3]
    assert torch.allclose(prior.eps(x, t), want, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# errors users can cause


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(PriorLoadError) as e:
        load_prior(tmp_path / "nope.pt")
    assert "nope.pt" in _one_line(e) and "no such file" in _one_line(e)
    assert issubclass(PriorLoadError, ValueError)


def test_text_file_renamed_pt(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("this is not a checkpoint\n")
    with pytest.raises(PriorLoadError, match="not a PyTorch checkpoint") as e:
        load_prior(p)
    assert "notes.pt" in _one_line(e)


def test_pickle_with_objects_refused(tmp_path):
    p = tmp_path / "objects.pt"
    torch.save({"args": argparse.Namespace(lr=1.0)}, p)
    with pytest.raises(PriorLoadError, match="objects.pt") as e:
        load_prior(p)
    _one_line(e)


def test_wrong_keys(tmp_path):
    p = tmp_path / "random.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, p)
    with pytest.raises(PriorLoadError, match="not a guided-diffusion") as e:
        load_prior(p)
    assert "random.pt" in _one_line(e)


def test_ldm_checkpoint_as_pixel_prior(shared):
    ckpt = shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt"
    with pytest.raises(PriorLoadError, match="latent-diffusion") as e:
        load_prior(ckpt, kind="pixel")
    assert "ldm_sr_tiny.ckpt" in _one_line(e)


def test_ldm_checkpoint_goes_to_latent_loader(shared):
    prior = load_prior(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt")
    assert isinstance(prior, LatentSRPrior)


class _LightningCallback:
    """Stands for what real Lightning checkpoints pickle besides tensors; unpickling it must not run it."""

    ran: list = []

    def __init__(self, monitor: str):
        self.monitor = monitor

    def __setstate__(self, state):
        _LightningCallback.ran.append(state)
        self.__dict__.update(state)


def test_lightning_ckpt_is_routed_to_the_latent_loader_and_read_once(tmp_path, shared, monkeypatch):
    """A Lightning .ckpt pickles callbacks and hyper-parameters (weights_only=True refuses it): load_prior
    reads it once, with the tensor-only unpickler, and gives the same latent prior as the plain file."""
    ldm = shared / "golden" / "ldm"
    sd = torch.load(ldm / "ldm_sr_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "state_dict": sd,
            "callbacks": {"ModelCheckpoint": _LightningCallback("val/loss")},
            "hyper_parameters": argparse.Namespace(base_learning_rate=1e-6),
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-6}]}],
            "global_step": 7,
        },
        path,
    )
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    shutil.copy(ldm / "ldm_sr_tiny.yaml", tmp_path / "lightning.yaml")

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: loads.append(str(f)) or real_load(f, *a, **kw))
    _LightningCallback.ran.clear()
    prior = load_prior(path)
    monkeypatch.undo()
    assert _LightningCallback.ran == []
    # weights_only attempt + the tensor-only read of the pickle; the tensors themselves are memory-mapped
    assert loads == [str(path)] * 2
    assert isinstance(prior, LatentSRPrior)

    want = load_prior(ldm / "ldm_sr_tiny.ckpt")
    d = torch.load(ldm / "ldm_sr_tiny_ref.pt", weights_only=True)["unet"][1]
    with torch.no_grad():
        got = prior.eps(d["z_t"], d["t"], d["lr"])
        assert torch.equal(got, want.eps(d["z_t"], d["t"], d["lr"]))
    assert rel(got, d["eps"]) <= 1e-5
    assert torch.equal(prior.alphas_cumprod, want.alphas_cumprod)
    with pytest.raises(PriorLoadError, match="latent-diffusion"):
        load_prior(path, kind="pixel")


def test_adm_checkpoint_as_latent_prior(golden_dir):
    with pytest.raises(PriorLoadError, match="not a latent SR model"):
        load_prior(golden_dir / "unet_state_dict.pt", kind="latent", adm_config={"num_head_channels": 16})


@pytest.mark.filterwarnings("ignore:ADM head width")
def test_shape_mismatch_and_missing_key(tmp_path, golden_dir):
    sd = torch.load(golden_dir / "unet_state_dict.pt", map_location="cpu", weights_only=True)
    bad = dict(sd)
    bad["input_blocks.2.0.in_layers.2.weight"] = torch.zeros(32, 32, 1, 1)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(PriorLoadError, match=r"input_blocks\.2\.0\.in_layers\.2\.weight.*shape") as e:
        load_prior(tmp_path / "shape.pt", adm_config={"num_head_channels": 16})
    assert "shape.pt" in _one_line(e)
    bad = dict(sd)
    del bad["output_blocks.3.0.emb_layers.1.bias"]
    torch.save(bad, tmp_path / "missing.pt")
    with pytest.raises(PriorLoadError, match="missing") as e:
        load_prior(tmp_path / "missing.pt", adm_config={"num_head_channels": 16})
    # a wrong override (head width that does not divide the attention width) is a load error too
    with pytest.raises(PriorLoadError, match="unet_state_dict.pt"):
        load_prior(golden_dir / "unet_state_dict.pt", adm_config={"num_head_channels": 64})
    with pytest.raises(PriorLoadError, match="unknown ADM"):
        load_prior(golden_dir / "unet_state_dict.pt", adm_config={"num_head_channel": 16})


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PriorLoadError, match="not a model folder"):
        load_prior(tmp_path / "empty")
    unet = _small_unet(in_channels=6)
    unet.save_pretrained(tmp_path / "latent_unet")
    with pytest.raises(PriorLoadError, match="latent SR UNet"):
        load_prior(tmp_path / "latent_unet")
    # weights that do not match config.json
    _small_unet().save_pretrained(tmp_path / "mismatch")
    cfg = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    cfg["block_out_channels"] = [64, 64]
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PriorLoadError, match="mismatch") as e:
        load_prior(tmp_path / "mismatch")
    _one_line(e)
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(PriorLoadError, match="JSON"):
        load_prior(tmp_path / "badjson")


def test_unknown_builtin_and_kind():
    with pytest.raises(PriorLoadError, match="unknown builtin prior"):
        load_prior("builtin:definitely-not-a-model")
    with pytest.raises(PriorLoadError, match="unknown builtin prior"):
        load_prior("builtin:../priors")
    with pytest.raises(PriorLoadError, match="kind"):
        load_prior("whatever", kind="audio")
    with pytest.raises(PriorLoadError, match="dtype"):
        load_prior("whatever", dtype="int8")
    with pytest.raises(PriorLoadError, match="dtype"):
        load_prior("whatever", dtype=torch.int8)


def test_device_and_meta_free_loading(golden_dir):
    """Weights are assigned (no meta tensors left) and .to(device) moves the whole prior."""
    prior = load_prior(golden_dir / "unet_state_dict.pt", device="cpu", adm_config={"num_head_channels": 16})
    assert all(p.device.type == "cpu" for p in prior.parameters())
    assert prior.alphas_cumprod.device.type == "cpu"
    sd = torch.load(golden_dir / "unet_state_dict.pt", map_location="cpu", weights_only=True)
    cfg = adm_config(image_size=64, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16)
    ref = convert_adm_state_dict(sd, cfg)
    assert all(torch.equal(prior.unet.state_dict()[k], v) for k, v in ref.items())
