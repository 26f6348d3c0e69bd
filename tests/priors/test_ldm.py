"""LDM-SR prior: the official tiny checkpoint converted in memory to diffusers must reproduce the golden
outputs of the official code (../shared/golden/ldm, see its README); loader errors are one-liners."""

import json
import shutil

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DModel, VQModel

from diffrestore.priors.base import PriorLoadError
from diffrestore.priors.latent import ldm_alphas_cumprod, load_diffusers_latent_sr
from diffrestore.priors.ldm import load_latent_sr, read_state_dict, unet_config_from_ldm, vq_config_from_ldm


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def golden(shared):
    d = shared / "golden" / "ldm"
    return {"dir": d, "ref": torch.load(d / "ldm_sr_tiny_ref.pt", weights_only=True)}


@pytest.fixture(scope="module")
def prior(golden):
    return load_latent_sr(golden["dir"] / "ldm_sr_tiny.ckpt")


@pytest.fixture(scope="module")
def ckpt_sd(golden):
    return torch.load(golden["dir"] / "ldm_sr_tiny.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def tiny_yaml(golden):
    return yaml.safe_load((golden["dir"] / "ldm_sr_tiny.yaml").read_text())


def write_ckpt(tmp_path, sd, cfg, name="m"):
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": sd, "global_step": 0}, path)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return path


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# --- numbers against the official code ----------------------------------------------------------


def test_schedule_is_the_official_buffer(golden, prior):
    ref = golden["ref"]["schedule"]["alphas_cumprod"]
    assert torch.equal(ldm_alphas_cumprod(), ref)
    assert prior.alphas_cumprod.dtype == torch.float32 and torch.equal(prior.alphas_cumprod, ref)


def test_prior_attributes(prior):
    assert (prior.downscale, prior.multiple_of, prior.latent_channels) == (4, 2, 3)
    assert sum(p.numel() for p in prior.unet.parameters()) == 703_363  # README: UNet tensors' numel
    assert sum(p.numel() for p in prior.first_stage.parameters()) == 951_230
    assert all(not t.is_meta for t in prior.state_dict().values())


@pytest.mark.parametrize("k", [0, 1, 2])
def test_unet_eps_matches_official(golden, prior, k):
    d = golden["ref"]["unet"][k]
    with torch.no_grad():
        eps = prior.eps(d["z_t"], d["t"], d["lr"])
    assert rel(eps, d["eps"]) <= 1e-5


def test_first_stage_matches_official(golden, prior):
    fs = golden["ref"]["first_stage"]
    with torch.no_grad():
        assert rel(prior.encode(fs["x"]), fs["h"]) <= 1e-5
        z_q, _, (_, _, idx) = prior.first_stage.quantize(fs["h"])
        assert torch.equal(idx.view(1, 16, 16), fs["z_q_indices"])
        assert rel(z_q, fs["z_q"]) <= 1e-5
        for z in ("h", "z_rand"):
            # both sides quantize with the straight-through z + (z_q - z); README: ~2e-5 from rounding
            assert rel(prior.decode(fs[z]), fs[f"decode_{z}_quantized"]) <= 1e-5
            assert rel(prior.decode(fs[z], quantize=False), fs[f"decode_{z}_not_quantized"]) <= 1e-5


def test_quantize_on_decode_option(golden):
    fs = golden["ref"]["first_stage"]
    p = load_latent_sr(golden["dir"] / "ldm_sr_tiny.ckpt", quantize_on_decode=False)
    with torch.no_grad():
        assert rel(p.decode(fs["h"]), fs["decode_h_not_quantized"]) <= 1e-5


def test_bf16_option_keeps_schedule_fp32(golden):
    d = golden["ref"]["unet"][1]
    p = load_latent_sr(golden["dir"] / "ldm_sr_tiny.ckpt", dtype="bf16")
    assert p.model_dtype == torch.bfloat16 and p.alphas_cumprod.dtype == torch.float32
    with torch.no_grad():
        eps = p.eps(d["z_t"], d["t"], d["lr"])
    assert eps.dtype == torch.float32 and rel(eps, d["eps"]) < 0.05
    p.half()  # casting the whole prior leaves the schedule alone
    assert p.model_dtype == torch.float16
    assert torch.equal(p.alphas_cumprod, golden["ref"]["schedule"]["alphas_cumprod"])


# --- EMA choice ---------------------------------------------------------------------------------


def _with_ema(sd, ema_from, raw_from):
    """A state dict whose UNet weights come from raw_from and whose EMA buffers from ema_from."""
    out = dict(sd)
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            name = "model_ema." + k[len("model."):].replace(".", "")
            assert name in sd  # the official checkpoint names its EMA buffers this way
            out[k] = raw_from(v)
            out[name] = ema_from(v)
    return out


def test_ema_weights_are_used_by_default(golden, ckpt_sd, tiny_yaml, tmp_path):
    d = golden["ref"]["unet"][1]
    # EMA = the real weights, raw weights spoiled: the default load must reproduce the official eps
    sd = _with_ema(ckpt_sd, ema_from=lambda v: v, raw_from=lambda v: v + 0.1)
    path = write_ckpt(tmp_path, sd, tiny_yaml)
    with torch.no_grad():
        assert rel(load_latent_sr(path).eps(d["z_t"], d["t"], d["lr"]), d["eps"]) <= 1e-5
        assert rel(load_latent_sr(path, use_ema=False).eps(d["z_t"], d["t"], d["lr"]), d["eps"]) > 1e-2
        cfg = json.loads(json.dumps(tiny_yaml))
        cfg["model"]["params"]["use_ema"] = False
        path2 = write_ckpt(tmp_path, sd, cfg, "noema")
        assert rel(load_latent_sr(path2).eps(d["z_t"], d["t"], d["lr"]), d["eps"]) > 1e-2


def test_checkpoint_without_ema_uses_raw_weights(golden, ckpt_sd, tiny_yaml, tmp_path):
    d = golden["ref"]["unet"][0]
    sd = {k: v for k, v in ckpt_sd.items() if not k.startswith("model_ema.")}
    path = write_ckpt(tmp_path, sd, tiny_yaml)
    with torch.no_grad():
        assert rel(load_latent_sr(path).eps(d["z_t"], d["t"], d["lr"]), d["eps"]) <= 1e-5
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(path, use_ema=True)
    assert "model_ema" in one_line_error(e)


# --- folders ------------------------------------------------------------------------------------


def _hub_files(golden, root, fs_name="vqvae"):
    hub = golden["dir"] / "hub_configs"
    root.mkdir(parents=True, exist_ok=True)
    index = json.loads((hub / "model_index.json").read_text())
    if fs_name != "vqvae":
        index[fs_name] = index.pop("vqvae")
        index[fs_name][1] = "AutoencoderKL"
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "scheduler").mkdir(exist_ok=True)
    shutil.copy(hub / "scheduler" / "scheduler_config.json", root / "scheduler")


def test_tiny_checkpoint_round_trips_through_a_folder(golden, prior, tmp_path):
    root = tmp_path / "tiny"
    _hub_files(golden, root)
    prior.unet.save_pretrained(root / "unet")
    prior.first_stage.save_pretrained(root / "vqvae")
    p = load_latent_sr(root)
    assert torch.equal(p.alphas_cumprod, golden["ref"]["schedule"]["alphas_cumprod"])
    d = golden["ref"]["unet"][2]
    fs = golden["ref"]["first_stage"]
    with torch.no_grad():
        assert rel(p.eps(d["z_t"], d["t"], d["lr"]), d["eps"]) <= 1e-5
        assert rel(p.decode(fs["h"]), fs["decode_h_quantized"]) <= 1e-5


def test_v_prediction_folder_returns_eps(golden, prior, tmp_path):
    """A folder whose scheduler says v_prediction: ``eps`` is sqrt(a) v + sqrt(1-a) z_t of the raw output
    (the golden eps-prior's ``eps`` is that raw output), with a computed in float64 from the LDM betas."""
    root = tmp_path / "v"
    _hub_files(golden, root)
    cfg_path = root / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    prior.unet.save_pretrained(root / "unet")
    prior.first_stage.save_pretrained(root / "vqvae")
    p = load_latent_sr(root)
    assert p.prediction_type == "v_prediction"
    d = golden["ref"]["unet"][2]
    betas = torch.linspace(0.0015**0.5, 0.0155**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)[torch.as_tensor(d["t"]).long()].view(-1, 1, 1, 1)
    with torch.no_grad():
        raw = prior.eps(d["z_t"], d["t"], d["lr"]).double()
        want = a.sqrt() * raw + (1 - a).sqrt() * d["z_t"].double()
        assert rel(p.eps(d["z_t"], d["t"], d["lr"]).double(), want) <= 1e-5
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    with pytest.raises(PriorLoadError, match="prediction_type 'sample' is not supported"):
        load_latent_sr(root)


def test_hub_configs_random_weights_load_strictly(golden, tmp_path):
    """The public LDM-SR 4x model's configs: random weights saved in the hub layout reload strictly."""
    hub = golden["dir"] / "hub_configs"
    root = tmp_path / "hub"
    _hub_files(golden, root)
    gen = torch.Generator().manual_seed(0)
    models = {}
    for name, cls in (("unet", UNet2DModel), ("vqvae", VQModel)):
        with torch.device("meta"):
            m = cls.from_config(cls.load_config(hub / name))
        m = m.to_empty(device="cpu")
        for t in m.parameters():
            t.data.normal_(0, 0.02, generator=gen)
        m.save_pretrained(root / name)
        models[name] = m
    p = load_latent_sr(root)
    for name, mine in (("unet", p.unet), ("vqvae", p.first_stage)):
        want = {k: tuple(v.shape) for k, v in models[name].state_dict().items()}
        assert {k: tuple(v.shape) for k, v in mine.state_dict().items()} == want
        assert torch.equal(mine.state_dict()["conv_in.weight" if name == "unet" else "encoder.conv_in.weight"],
                           models[name].state_dict()["conv_in.weight" if name == "unet" else "encoder.conv_in.weight"])
    n_unet = sum(t.numel() for t in p.unet.parameters())
    n_vq = sum(t.numel() for t in p.first_stage.parameters())
    # LDM paper (Rombach et al. 2022, SR table): LDM-4 SR has 169M parameters
    assert round((n_unet + n_vq) / 1e6) == 169
    assert (p.downscale, p.multiple_of, p.latent_channels) == (4, 8, 3)
    assert torch.equal(p.alphas_cumprod, ldm_alphas_cumprod())


def test_yaml_to_diffusers_configs_match_the_hub(golden, tiny_yaml):
    """Our YAML -> diffusers derivation on the official bsr_sr sizes gives the hub's configs."""
    hub = golden["dir"] / "hub_configs"
    cfg = json.loads(json.dumps(tiny_yaml))
    params = cfg["model"]["params"]
    # official bsr_sr sizes (README of the golden data: the values the tiny config shrank)
    params["unet_config"]["params"].update(
        model_channels=160, channel_mult=[1, 2, 2, 4], num_res_blocks=2, attention_resolutions=[16, 8],
        num_head_channels=32,
    )
    params["first_stage_config"]["params"]["n_embed"] = 8192
    params["first_stage_config"]["params"]["ddconfig"].update(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2)
    for ours, name in ((unet_config_from_ldm(params["unet_config"]["params"]), "unet"),
                       (vq_config_from_ldm(params["first_stage_config"]["params"]), "vqvae")):
        theirs = json.loads((hub / name / "config.json").read_text())
        for k, v in ours.items():
            assert theirs[k] == v, (name, k)


def test_autoencoder_kl_folder(tmp_path, golden):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.5)
    unet = UNet2DModel(in_channels=7, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8)
    root = tmp_path / "kl"
    _hub_files(golden, root, fs_name="vae")
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    p = load_latent_sr(root)
    assert not p.is_vq and p.latent_channels == 4 and p.downscale == 4
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = p.encode(x)
        assert torch.allclose(z, vae.encode(x).latent_dist.mean * 0.5, atol=1e-6)
        assert torch.allclose(p.decode(z), vae.decode(z / 0.5).sample, atol=1e-6)
        eps = p.eps(z, torch.tensor([10]), x[:, :, ::4, ::4])
        assert torch.allclose(eps, unet(torch.cat([z, x[:, :, ::4, ::4]], 1), 10).sample, atol=1e-6)


# --- errors -------------------------------------------------------------------------------------


def test_folder_that_is_not_a_latent_sr_model(tmp_path, golden):
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(tmp_path)
    assert "model_index.json" in one_line_error(e)

    ddpm = tmp_path / "ddpm"
    ddpm.mkdir()
    (ddpm / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    ))
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(ddpm)
    assert "not a latent SR model" in one_line_error(e)

    # right layout, but an unconditional latent UNet (3 -> 3 channels)
    root = tmp_path / "uncond"
    _hub_files(golden, root)
    UNet2DModel(in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8).save_pretrained(root / "unet")
    VQModel(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8).save_pretrained(root / "vqvae")
    with pytest.raises(PriorLoadError) as e:
        load_diffusers_latent_sr(root)
    assert "not a latent SR model" in one_line_error(e)


def test_folder_whose_weights_do_not_match_its_config(tmp_path, golden, prior):
    root = tmp_path / "bad"
    _hub_files(golden, root)
    prior.unet.save_pretrained(root / "unet")
    prior.first_stage.save_pretrained(root / "vqvae")
    cfg_path = root / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layers_per_block"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(root)
    one_line_error(e)


def test_checkpoint_keys_not_matching_yaml(tmp_path, golden, tiny_yaml):
    ckpt = tmp_path / "m.ckpt"
    ckpt.symlink_to(golden["dir"] / "ldm_sr_tiny.ckpt")
    cfg = json.loads(json.dumps(tiny_yaml))
    cfg["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(ckpt)
    assert "shape" in one_line_error(e)

    cfg = json.loads(json.dumps(tiny_yaml))
    cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["num_res_blocks"] = 2
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(ckpt, config=tmp_path / "other.yaml")
    assert "missing" in one_line_error(e)


def test_checkpoint_without_yaml_and_missing_files(tmp_path, golden):
    ckpt = tmp_path / "m.ckpt"
    ckpt.symlink_to(golden["dir"] / "ldm_sr_tiny.ckpt")
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(ckpt)
    assert "YAML" in one_line_error(e)
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(tmp_path / "nope.ckpt")
    one_line_error(e)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.yaml").write_text("model: {}")
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(tmp_path / "junk.ckpt")
    one_line_error(e)


def test_yaml_that_is_not_latent_sr(tmp_path, golden, tiny_yaml):
    ckpt = tmp_path / "m.ckpt"
    ckpt.symlink_to(golden["dir"] / "ldm_sr_tiny.ckpt")
    cfg = json.loads(json.dumps(tiny_yaml))
    cfg["model"]["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.BERTEmbedder"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PriorLoadError) as e:
        load_latent_sr(ckpt)
    assert "not a latent SR model" in one_line_error(e)


RAN = []


def _side_effect(tag):
    RAN.append(tag)
    return tag


class _Evil:
    def __reduce__(self):
        return (_side_effect, ("executed",))


def test_checkpoint_with_foreign_objects_loads_tensors_only(tmp_path, ckpt_sd):
    """Lightning checkpoints pickle more than tensors; those objects are replaced, never run."""
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": ckpt_sd, "callbacks": {"cb": _Evil()}, "global_step": 0}, path)
    RAN.clear()
    sd = read_state_dict(path)
    assert RAN == []
    assert sd.keys() == ckpt_sd.keys() and all(torch.equal(sd[k], ckpt_sd[k]) for k in sd)
