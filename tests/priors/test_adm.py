"""ADM (guided-diffusion UNetModel) on diffusers' UNet2DModel: golden model calls, real-checkpoint layout,
and an independent functional reference for the options the golden model does not use."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffrestore.priors.adm import ADM_256_COND, ADM_256_UNCOND, DEFAULT_CHANNEL_MULT, adm_config, build_adm_unet
from diffrestore.priors.adm_weights import (
    convert_adm_state_dict,
    convert_diffusers_to_adm_state_dict,
    infer_adm_hparams,
)
from diffrestore.priors.base import alphas_cumprod_from_betas, linear_betas
from diffrestore.priors.pixel import UNetPixelPrior

REFS = ("ref_deno.pt", "ref_sr4.pt", "ref_deblur_gauss.pt")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------------------
# an independent functional guided-diffusion UNetModel forward, straight on the ADM state dict


def ref_adm_forward(sd, hp, x, t, y=None):
    mc, nrb, size = hp["num_channels"], hp["num_res_blocks"], hp["image_size"]
    mult = [float(m) for m in str(hp["channel_mult"]).split(",")] if hp["channel_mult"] else DEFAULT_CHANNEL_MULT[size]
    attn_ds = {size // int(r) for r in str(hp["attention_resolutions"]).split(",") if r}
    nhc, nh = hp["num_head_channels"], hp["num_heads"]
    nhu = nh if hp.get("num_heads_upsample", -1) == -1 else hp["num_heads_upsample"]
    legacy, ss, updown = not hp["use_new_attention_order"], hp["use_scale_shift_norm"], hp["resblock_updown"]

    def w(k):
        return sd[k + ".weight"], sd.get(k + ".bias")

    def up2(h):
        return F.interpolate(h, scale_factor=2.0, mode="nearest")

    def gn(h, k):
        return F.group_norm(h, 32, *w(k), eps=1e-5)

    def res(h, k, resample=None):
        a = F.silu(gn(h, k + ".in_layers.0"))
        if resample == "down":
            a, h = F.avg_pool2d(a, 2), F.avg_pool2d(h, 2)
        elif resample == "up":
            a, h = up2(a), up2(h)
        a = F.conv2d(a, *w(k + ".in_layers.2"), padding=1)
        e = F.linear(F.silu(emb), *w(k + ".emb_layers.1"))[:, :, None, None]
        if ss:
            scale, shift = e.chunk(2, dim=1)
            a = gn(a, k + ".out_layers.0") * (1 + scale) + shift
        else:
            a = gn(a + e, k + ".out_layers.0")
        a = F.conv2d(F.silu(a), *w(k + ".out_layers.3"), padding=1)
        if k + ".skip_connection.weight" in sd:
            h = F.conv2d(h, *w(k + ".skip_connection"))
        return h + a

    def attn(h, k, up):
        b, c, hh, ww = h.shape
        heads = c // nhc if nhc != -1 else (nhu if up else nh)
        d = c // heads
        xf = h.reshape(b, c, -1)
        qkv = F.conv1d(gn(xf, k + ".norm"), *w(k + ".qkv"))
        if legacy:
            q, kk, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
        else:
            q, kk, v = (z.reshape(b * heads, d, -1) for z in qkv.chunk(3, dim=1))
        s = d**-0.25
        att = torch.softmax(torch.einsum("bct,bcs->bts", q * s, kk * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", att, v).reshape(b, c, -1)
        return (xf + F.conv1d(a, *w(k + ".proj_out"))).reshape(b, c, hh, ww)

    half = mc // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(emb, *w("time_embed.0"))), *w("time_embed.2"))
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]

    h = F.conv2d(x, *w("input_blocks.0.0"), padding=1)
    hs, k, ds = [h], 1, 1
    for lvl in range(len(mult)):
        for _ in range(nrb):
            h = res(h, f"input_blocks.{k}.0")
            if ds in attn_ds:
                h = attn(h, f"input_blocks.{k}.1", False)
            hs.append(h)
            k += 1
        if lvl != len(mult) - 1:
            if updown:
                h = res(h, f"input_blocks.{k}.0", "down")
            else:
                h = F.conv2d(h, *w(f"input_blocks.{k}.0.op"), stride=2, padding=1)
            hs.append(h)
            k, ds = k + 1, ds * 2
    h = res(attn(res(h, "middle_block.0"), "middle_block.1", False), "middle_block.2")
    k = 0
    for lvl in reversed(range(len(mult))):
        for i in range(nrb + 1):
            h = res(torch.cat([h, hs.pop()], dim=1), f"output_blocks.{k}.0")
            sub = 1
            if ds in attn_ds:
                h, sub = attn(h, f"output_blocks.{k}.1", True), 2
            if lvl and i == nrb:
                if updown:
                    h = res(h, f"output_blocks.{k}.{sub}", "up")
                else:
                    h = F.conv2d(up2(h), *w(f"output_blocks.{k}.{sub}.conv"), padding=1)
                ds //= 2
            k += 1
    return F.conv2d(F.silu(gn(h, "out.0")), *w("out.2"), padding=1)


# --------------------------------------------------------------------------------------------------
# golden: every model call the official code made


@pytest.fixture(scope="module")
def golden(shared):
    d = shared / "golden" / "ddrm"
    model_cfg = json.loads((d / "manifest.json").read_text())["model_cfg"]
    sd = torch.load(d / "unet_state_dict.pt", map_location="cpu", weights_only=True)
    cfg = adm_config(**model_cfg)
    unet = build_adm_unet(cfg, device="meta")
    unet.load_state_dict(convert_adm_state_dict(sd, cfg), strict=True, assign=True)
    refs = {name: torch.load(d / name, map_location="cpu", weights_only=True)["model_calls"] for name in REFS}
    return model_cfg, sd, unet, refs


@pytest.mark.parametrize("ref", REFS)
def test_golden_model_calls(golden, ref):
    _, _, unet, refs = golden
    calls = refs[ref]
    assert len(calls) == 20
    # all 20 calls in one batch (t: one float per element); the batch-1 form is checked below
    with torch.inference_mode():
        out = unet(torch.cat([c["x_in"] for c in calls]), torch.cat([c["t"] for c in calls])).sample
    assert out.shape == (20, 6, 64, 64)
    for i, c in enumerate(calls):
        assert c["out"].shape == (1, 6, 64, 64)
        assert rel(out[i : i + 1], c["out"]) <= 1e-5, (ref, c["t"])
    # the official form, batch 1 and t = tensor([950.])
    with torch.inference_mode():
        first = unet(calls[0]["x_in"], calls[0]["t"]).sample
    assert calls[0]["t"].dtype == torch.float32 and calls[0]["t"].tolist() == [950.0]
    assert rel(first, calls[0]["out"]) <= 1e-5


@pytest.mark.parametrize("ref", REFS)
def test_golden_eps_through_prior(golden, ref):
    _, _, unet, refs = golden
    prior = UNetPixelPrior(unet)
    calls = refs[ref]
    x = torch.cat([c["x_in"] for c in calls])
    t = torch.cat([c["t"] for c in calls])  # float tensor, one t per batch element, as the official code
    eps = prior.eps(x, t)
    assert eps.dtype == torch.float32 and eps.shape == (20, 3, 64, 64)
    for i, c in enumerate(calls):
        assert rel(eps[i : i + 1], c["out"][:, :3]) <= 1e-5, (ref, c["t"])
    # a single scalar-like t broadcasts over the batch
    e1 = prior.eps(calls[0]["x_in"], torch.tensor(950.0))
    assert rel(e1, calls[0]["out"][:, :3]) <= 1e-5


def test_prior_contract(golden):
    _, _, unet, _ = golden
    prior = UNetPixelPrior(unet)
    assert prior.multiple_of == 8  # 4 levels -> 3 downsamplings
    assert prior.image_size == 64
    assert prior.num_timesteps == 1000
    assert torch.equal(prior.alphas_cumprod, alphas_cumprod_from_betas(linear_betas()))
    assert prior.alphas_cumprod.dtype == torch.float32
    with pytest.raises(ValueError):
        prior.eps(torch.zeros(2, 3, 64, 64), torch.tensor([1.0, 2.0, 3.0]))
    # the result is an ordinary tensor (made outside inference mode)
    eps = prior.eps(torch.zeros(1, 3, 64, 64), torch.tensor([10.0]))
    assert not eps.is_inference()


def test_golden_reference_implementation_agrees(golden):
    """The functional reference used below reproduces the official network on the golden calls."""
    model_cfg, sd, _, refs = golden
    for ref in REFS:
        c = refs[ref][3]
        assert rel(ref_adm_forward(sd, model_cfg, c["x_in"], c["t"]), c["out"]) <= 1e-5


def test_golden_round_trip_and_inference(golden):
    model_cfg, sd, unet, _ = golden
    cfg = adm_config(**model_cfg)
    back = convert_diffusers_to_adm_state_dict(unet.state_dict(), cfg)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert sum(p.numel() for p in unet.parameters()) == 4_275_750
    hp = infer_adm_hparams(sd, {"num_head_channels": 16})
    assert adm_config(**hp) == cfg


def test_bf16_close(golden):
    _, sd, _, refs = golden
    model_cfg = golden[0]
    cfg = adm_config(**model_cfg)
    unet = build_adm_unet(cfg)
    unet.load_state_dict(convert_adm_state_dict(sd, cfg))
    prior = UNetPixelPrior(unet, dtype=torch.bfloat16)
    assert prior.dtype == torch.bfloat16
    calls = refs["ref_deno.pt"][::4]
    eps = prior.eps(torch.cat([c["x_in"] for c in calls]), torch.cat([c["t"] for c in calls]))
    assert eps.dtype == torch.float32
    for i, c in enumerate(calls):
        assert rel(eps[i : i + 1], c["out"][:, :3]) < 0.1


# --------------------------------------------------------------------------------------------------
# the real 256x256 checkpoints: exact keys and shapes (meta device, no memory)


def _tsv(shared):
    out = {}
    for line in (shared / "golden" / "ddrm" / "adm256_uncond_state_dict_keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


def test_adm256_uncond_layout_matches_real_checkpoint(shared):
    ref = _tsv(shared)
    assert len(ref) == 566
    unet = build_adm_unet(ADM_256_UNCOND, device="meta")
    assert sum(p.numel() for p in unet.parameters()) == 552_814_086
    back = convert_diffusers_to_adm_state_dict(unet.state_dict(), ADM_256_UNCOND)
    assert [(k, tuple(v.shape)) for k, v in back.items()] == list(ref.items())  # same keys, order, shapes
    # forward: a fake checkpoint with exactly those keys/shapes converts and loads strictly
    fake = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    unet.load_state_dict(convert_adm_state_dict(fake, ADM_256_UNCOND), strict=True, assign=True)
    # and its hyper-parameters are recovered from the keys alone
    assert adm_config(**infer_adm_hparams(fake)) == ADM_256_UNCOND
    prior = UNetPixelPrior(unet)
    assert prior.multiple_of == 32 and prior.image_size == 256 and prior.learn_sigma


def test_adm256_cond_layout(shared):
    ref = _tsv(shared)
    ref["label_emb.weight"] = (1000, 1024)
    unet = build_adm_unet(ADM_256_COND, device="meta")
    assert unet.config.num_class_embeds == 1000
    assert sum(p.numel() for p in unet.parameters()) == 552_814_086 + 1000 * 1024
    back = convert_diffusers_to_adm_state_dict(unet.state_dict(), ADM_256_COND)
    assert {k: tuple(v.shape) for k, v in back.items()} == ref
    fake = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    unet.load_state_dict(convert_adm_state_dict(fake, ADM_256_COND), strict=True, assign=True)
    assert adm_config(**infer_adm_hparams(fake)) == ADM_256_COND


def test_presets_are_the_released_hyperparameters():
    for cfg in (ADM_256_UNCOND, ADM_256_COND):
        adm = cfg["_adm"]
        assert adm["num_channels"] == 256 and adm["num_res_blocks"] == 2 and adm["num_head_channels"] == 64
        assert adm["attention_ds"] == [8, 16, 32] and adm["channel_mult"] == [1, 1, 2, 2, 4, 4]
        assert adm["learn_sigma"] and adm["resblock_updown"] and adm["use_scale_shift_norm"]
        assert cfg["resnet_time_scale_shift"] == "scale_shift" and cfg["out_channels"] == 6
    assert not ADM_256_UNCOND["_adm"]["class_cond"] and ADM_256_COND["_adm"]["class_cond"]


# --------------------------------------------------------------------------------------------------
# config details


@pytest.mark.parametrize("size", sorted(DEFAULT_CHANNEL_MULT))
def test_default_channel_mult(size):
    cfg = adm_config(image_size=size, num_channels=128, attention_resolutions="32,16,8")
    mult = DEFAULT_CHANNEL_MULT[size]
    assert cfg["block_out_channels"] == tuple(int(m * 128) for m in mult)
    assert cfg["_adm"]["attention_ds"] == sorted(size // r for r in (32, 16, 8))
    n_attn = sum(1 for lvl in range(len(mult)) if 2**lvl in cfg["_adm"]["attention_ds"])
    assert sum(t.startswith("Attn") for t in cfg["down_block_types"]) == n_attn
    unet = build_adm_unet(cfg, device="meta")  # 512: channel_mult 0.5 needs the num_channels-wide t embedding
    assert unet.time_embedding.linear_1.in_features == 128
    assert unet.time_embedding.linear_2.out_features == 512


def test_adm_config_rejects_unknown_and_bad_heads():
    with pytest.raises(ValueError, match="num_head_channel"):
        adm_config(num_head_channel=64)
    with pytest.raises(ValueError, match="does not divide"):
        adm_config(image_size=64, num_channels=32, channel_mult="1,3", attention_resolutions="32", num_head_channels=64)
    # runner-only keys (DDRM yaml, guided-diffusion flags) are accepted
    cfg = adm_config(use_fp16=True, use_checkpoint=False, var_type="fixedsmall", resamp_with_conv=True)
    assert cfg["_adm"] == ADM_256_UNCOND["_adm"]


# --------------------------------------------------------------------------------------------------
# options the golden model does not exercise, against the functional reference

EXOTIC = {
    # class-conditional, new attention order, conv resampling, additive time embedding, no learned sigma
    "cond_newattn_conv": dict(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
        num_heads=4, num_head_channels=8, learn_sigma=False, class_cond=True, num_classes=10,
        resblock_updown=False, use_scale_shift_norm=False, use_new_attention_order=True,
    ),
    # 512-style channel_mult 0.5 (t embedded with num_channels sinusoids), fixed head counts (down 2, up 4)
    "half_mult_fixed_heads": dict(
        image_size=32, num_channels=64, num_res_blocks=2, channel_mult="0.5,1,2", attention_resolutions="32,8",
        num_heads=2, num_head_channels=-1, num_heads_upsample=4, learn_sigma=True, class_cond=False,
        resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=False,
    ),
}  # fmt: skip


def _randomised(unet):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return unet


@pytest.mark.parametrize("name", sorted(EXOTIC))
def test_exotic_configs_match_reference(name):
    hp = EXOTIC[name]
    cfg = adm_config(**hp)
    unet = _randomised(build_adm_unet(cfg))
    sd = convert_diffusers_to_adm_state_dict(unet.state_dict(), cfg)
    # the ADM state dict converts back to exactly the same tensors
    again = convert_adm_state_dict(sd, cfg)
    assert set(again) == set(unet.state_dict()) and all(torch.equal(again[k], v) for k, v in unet.state_dict().items())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([999.0, 17.0])
    y = torch.tensor([3, 7]) if hp["class_cond"] else None
    with torch.inference_mode():
        ours = unet(x, t, class_labels=y).sample
    ref = ref_adm_forward(sd, hp, x, t, y)
    assert ours.shape == ref.shape == (2, 6 if hp["learn_sigma"] else 3, 32, 32)
    assert rel(ours, ref) <= 1e-5
    # hyper-parameters inferred from keys (plus what weights cannot tell) rebuild the same config
    known = {k: hp[k] for k in ("image_size", "use_new_attention_order", "num_head_channels", "num_heads")}
    if hp["num_head_channels"] == -1:
        known["num_heads_upsample"] = hp["num_heads_upsample"]
    assert adm_config(**infer_adm_hparams(sd, known)) == cfg
    # class-conditional prior needs labels
    prior = UNetPixelPrior(unet)
    if hp["class_cond"]:
        with pytest.raises(ValueError, match="class"):
            prior.eps(x, t)
        assert rel(prior.eps(x, t, class_labels=y), ref[:, :3]) <= 1e-5
        prior.class_labels = 3
        assert rel(prior.eps(x[:1], t[:1]), ref[:1, :3]) <= 1e-5
    else:
        assert rel(prior.eps(x, t), ref[:, :3]) <= 1e-5
