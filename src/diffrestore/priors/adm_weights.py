"""Guided-diffusion ("ADM") checkpoints: recognise a state dict, infer its hyper-parameters from key names
and shapes, and convert it to and from the ``UNet2DModel`` layout that ``priors.adm`` builds.

The conversion walks one module layout (``_layout``) in either direction, so the two cannot drift apart;
only the attention projections are re-packed (ADM's Conv1d ``qkv`` to ``to_q/to_k/to_v``, legacy or new
head order, see ``priors.adm``).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

import torch

from .adm import DEFAULT_CHANNEL_MULT, adm_config

__all__ = [
    "ADMGuessWarning",
    "convert_adm_state_dict",
    "convert_diffusers_to_adm_state_dict",
    "infer_adm_hparams",
    "is_adm_state_dict",
]


def _adm_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``_adm`` record of a config from :func:`adm_config`, or ADM hyper-parameters themselves."""
    if "_adm" in cfg:
        return dict(cfg["_adm"])
    if "block_out_channels" in cfg:
        raise ValueError("config has no '_adm' record: it was not made by adm_config()")
    return adm_config(**cfg)["_adm"]


# --------------------------------------------------------------------------------------------------
# state-dict conversion

_RES_MAP = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _layout(adm: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(ADM module prefix, diffusers module prefix, kind) for every module with weights.

    kind: "plain" (same parameter names and shapes), "res" (ResBlock), "attn_down"/"attn_up" (attention
    block, head count from the down / up settings).
    """
    n_levels = len(adm["channel_mult"])
    nrb = adm["num_res_blocks"]
    attn = set(adm["attention_ds"])
    updown = adm["resblock_updown"]
    out: list[tuple[str, str, str]] = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
    ]
    if adm["class_cond"]:
        out.append(("label_emb", "class_embedding", "plain"))
    out.append(("input_blocks.0.0", "conv_in", "plain"))
    k, ds = 1, 1
    for lvl in range(n_levels):
        for j in range(nrb):
            out.append((f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{j}", "res"))
            if ds in attn:
                out.append((f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{j}", "attn_down"))
            k += 1
        if lvl != n_levels - 1:
            if updown:
                out.append((f"input_blocks.{k}.0", f"down_blocks.{lvl}.downsamplers.0", "res"))
            else:
                out.append((f"input_blocks.{k}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv", "plain"))
            k += 1
            ds *= 2
    out += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn_down"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    k = 0
    for i, lvl in enumerate(reversed(range(n_levels))):
        for j in range(nrb + 1):
            out.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            sub = 1
            if ds in attn:
                out.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn_up"))
                sub = 2
            if lvl and j == nrb:
                if updown:
                    out.append((f"output_blocks.{k}.{sub}", f"up_blocks.{i}.upsamplers.0", "res"))
                else:
                    out.append((f"output_blocks.{k}.{sub}.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
                ds //= 2
            k += 1
    out += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return out


def _heads(adm: Mapping[str, Any], kind: str, channels: int) -> int:
    if adm["num_head_channels"] != -1:
        if channels % adm["num_head_channels"]:
            raise ValueError(f"num_head_channels={adm['num_head_channels']} does not divide {channels} channels")
        return channels // adm["num_head_channels"]
    return adm["num_heads"] if kind == "attn_down" else adm["num_heads_upsample"]


def _split_qkv(t: torch.Tensor, heads: int, legacy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conv1d qkv weight (3C, C[, 1]) or bias (3C,) -> q, k, v as Linear weight (C, C) / bias (C,)."""
    rest = t.shape[1:2]  # (C,) for the weight, () for the bias
    c = t.shape[0] // 3
    hc = c // heads
    w = t.reshape(3 * c, *rest)
    if legacy:  # (heads, [q,k,v], head_ch)
        w = w.reshape(heads, 3, hc, *rest)
        return tuple(w[:, i].reshape(c, *rest) for i in range(3))  # type: ignore[return-value]
    w = w.reshape(3, c, *rest)  # ([q,k,v], heads, head_ch)
    return w[0], w[1], w[2]


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    c = q.shape[0]
    rest = q.shape[1:2]
    hc = c // heads
    if legacy:
        stacked = torch.stack([t.reshape(heads, hc, *rest) for t in (q, k, v)], dim=1)  # (heads, 3, hc, ...)
    else:
        stacked = torch.stack([q, k, v], dim=0)
    out = stacked.reshape(3 * c, *rest)
    return out.unsqueeze(-1) if rest else out


def convert_adm_state_dict(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """guided-diffusion ``UNetModel`` state dict -> ``UNet2DModel`` state dict for :func:`adm_config` ``cfg``.

    ``cfg`` may also be the ADM hyper-parameters. Tensors are reused where the layout allows (no copy),
    only the attention projections are re-packed. Raises ``ValueError`` naming the first missing or
    unexpected key.
    """
    return _convert(sd, cfg, to_diffusers=True)


def convert_diffusers_to_adm_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_adm_state_dict` (works on ``meta`` tensors too)."""
    return _convert(sd, cfg, to_diffusers=False)


def _convert(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], to_diffusers: bool) -> dict[str, torch.Tensor]:
    """Both directions walk one layout, so the two conversions cannot drift apart."""
    adm = _adm_of(cfg)
    legacy = not adm["use_new_attention_order"]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(
                f"missing key {key!r} expected by the ADM layout" if to_diffusers else f"missing diffusers key {key!r}"
            )
        used.add(key)
        return sd[key]

    def rename(adm_key: str, diffusers_key: str) -> None:
        if to_diffusers:
            out[diffusers_key] = take(adm_key)
        else:
            out[adm_key] = take(diffusers_key)

    for src, dst, kind in _layout(adm):
        if kind == "plain":
            for p in ("weight",) if src == "label_emb" else ("weight", "bias"):
                rename(f"{src}.{p}", f"{dst}.{p}")
        elif kind == "res":
            for a, b in _RES_MAP.items():
                if a == "skip_connection" and (f"{src}.{a}.weight" if to_diffusers else f"{dst}.{b}.weight") not in sd:
                    continue
                for p in ("weight", "bias"):
                    rename(f"{src}.{a}.{p}", f"{dst}.{b}.{p}")
        else:
            for p in ("weight", "bias"):
                rename(f"{src}.norm.{p}", f"{dst}.group_norm.{p}")
            if to_diffusers:
                w, b = take(f"{src}.qkv.weight"), take(f"{src}.qkv.bias")
                heads = _heads(adm, kind, w.shape[1])
                for p, t in (("weight", w), ("bias", b)):
                    for name, part in zip(("to_q", "to_k", "to_v"), _split_qkv(t, heads, legacy)):
                        out[f"{dst}.{name}.{p}"] = part
                pw = take(f"{src}.proj_out.weight")
                out[f"{dst}.to_out.0.weight"] = pw.reshape(pw.shape[0], pw.shape[1])
            else:
                for p in ("weight", "bias"):
                    q, k, v = (take(f"{dst}.{n}.{p}") for n in ("to_q", "to_k", "to_v"))
                    out[f"{src}.qkv.{p}"] = _merge_qkv(q, k, v, _heads(adm, kind, q.shape[0]), legacy)
                out[f"{src}.proj_out.weight"] = take(f"{dst}.to_out.0.weight").unsqueeze(-1)
            rename(f"{src}.proj_out.bias", f"{dst}.to_out.0.bias")
    extra = [k for k in sd if k not in used]
    if extra:
        if to_diffusers:
            raise ValueError(f"unexpected key {extra[0]!r} ({len(extra)} unexpected) for the ADM layout")
        raise ValueError(f"unexpected diffusers key {extra[0]!r} ({len(extra)} unexpected)")
    return out


# --------------------------------------------------------------------------------------------------
# recognising ADM checkpoints and inferring their hyper-parameters


class ADMGuessWarning(UserWarning):
    """An ADM hyper-parameter the weights do not determine was guessed."""


def _warn_one_line(message: str) -> None:
    # warnings.warn prints the caller's source line under the message; a "<...>" file has none, so the
    # user sees one line on stderr (and linecache never opens a file to look for it)
    warnings.warn_explicit(message, ADMGuessWarning, "<diffrestore>", 0, module=__name__)


def is_adm_state_dict(sd: Mapping[str, Any]) -> bool:
    """True when the keys look like a bare guided-diffusion ``UNetModel`` state dict."""
    need = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight", "middle_block.0.in_layers.0.weight")
    return all(k in sd and isinstance(sd[k], torch.Tensor) for k in need)


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    idx = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                idx.add(int(head))
    return sorted(idx)


def infer_adm_hparams(
    sd: Mapping[str, torch.Tensor], overrides: Mapping[str, Any] | None = None, *, where: str = "the checkpoint"
) -> dict[str, Any]:
    """ADM hyper-parameters (for :func:`adm_config`) read off a state dict's key names and shapes.

    Not recoverable from weights, hence defaults unless given in ``overrides``: ``image_size`` (the size
    whose default ``channel_mult`` matches, else 256; it only names attention levels and ``sample_size``),
    ``use_new_attention_order`` (False) and ``num_head_channels`` (64 when it divides every attention
    width; otherwise the largest power of two <= 64 that does, with an ``ADMGuessWarning`` naming ``where``).
    Raises ``ValueError`` when the keys are not a consistent ADM layout.
    """
    overrides = dict(overrides or {})
    if not is_adm_state_dict(sd):
        raise ValueError("keys are not a guided-diffusion (ADM) UNet state dict")
    mc = sd["time_embed.0.weight"].shape[1]
    in_ch = sd["input_blocks.0.0.weight"].shape[1]
    out_ch = sd["out.2.weight"].shape[0]
    nrb, mult, attn_levels, updown = _block_structure(sd, mc)
    mult_t = tuple(int(m) if float(m).is_integer() else m for m in mult)
    scale_shift = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * sd[
        "input_blocks.1.0.out_layers.3.weight"
    ].shape[0]
    learn_sigma = out_ch == 2 * in_ch
    class_cond = "label_emb.weight" in sd
    num_classes = sd["label_emb.weight"].shape[0] if class_cond else 1000

    image_size = overrides.get("image_size")
    if image_size is None:
        image_size = next((s for s, m in DEFAULT_CHANNEL_MULT.items() if tuple(m) == mult_t), 256)
    attn_ds = [2**lvl for lvl, a in enumerate(attn_levels) if a]
    attn_widths = [int(mult[lvl] * mc) for lvl, a in enumerate(attn_levels) if a] + [int(mult[-1] * mc)]
    hc = 64
    if "num_head_channels" not in overrides and "num_heads" not in overrides:
        hc = _guess_head_channels(attn_widths, where)
    hp = dict(
        image_size=int(image_size),
        num_channels=int(mc),
        num_res_blocks=int(nrb),
        channel_mult=",".join(str(m) for m in mult_t),
        attention_resolutions=",".join(str(int(image_size) // d) for d in attn_ds),
        num_heads=4,
        num_head_channels=hc,
        num_heads_upsample=-1,
        learn_sigma=bool(learn_sigma),
        class_cond=bool(class_cond),
        num_classes=int(num_classes),
        resblock_updown=bool(updown) if updown is not None else True,
        use_scale_shift_norm=bool(scale_shift),
        use_new_attention_order=False,
        in_channels=int(in_ch),
        out_channels=int(out_ch // 2 if learn_sigma else out_ch),
    )
    if overrides.get("num_heads") is not None and "num_head_channels" not in overrides:
        hp["num_head_channels"] = -1
    hp.update(overrides)
    return hp


def _block_structure(sd: Mapping[str, torch.Tensor], mc: int) -> tuple[int, list[float], list[bool], bool | None]:
    """(num_res_blocks, channel multiplier per level, attention per level, resblock_updown or None when
    there is one level) read off the input / output block keys."""
    keys = list(sd)
    in_idx = _indices(keys, "input_blocks.")
    out_idx = _indices(keys, "output_blocks.")
    if in_idx != list(range(len(in_idx))) or out_idx != list(range(len(out_idx))) or not out_idx:
        raise ValueError("input/output block indices are not contiguous")

    def is_attn(prefix: str) -> bool:
        return f"{prefix}.qkv.weight" in sd

    # output blocks: [res, (attn), (upsampler)]; the first one holding an upsampler ends the top level
    ups = []
    for k in out_idx:
        for s in _indices(keys, f"output_blocks.{k}."):
            if s >= 1 and not is_attn(f"output_blocks.{k}.{s}"):
                ups.append(k)
    nrb = ups[0] if ups else len(out_idx) - 1
    if len(out_idx) % (nrb + 1):
        raise ValueError("cannot infer num_res_blocks from the output blocks")
    n_levels = len(out_idx) // (nrb + 1)
    if len(in_idx) != n_levels * (nrb + 1):
        raise ValueError("input and output block counts disagree")
    mult, attn_levels = [], []
    updown = None
    for lvl in range(n_levels):
        first = 1 + lvl * (nrb + 1)
        c = sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]
        mult.append(c / mc)
        attn_levels.append(is_attn(f"input_blocks.{first}.1"))
        if lvl != n_levels - 1:
            down = f"input_blocks.{first + nrb}.0"
            this = f"{down}.in_layers.0.weight" in sd
            if updown is None:
                updown = this
    return nrb, mult, attn_levels, updown


def _guess_head_channels(attn_widths: list[int], where: str) -> int:
    """64 when it divides every attention width; else the largest power of two <= 64 that does, with an
    ``ADMGuessWarning`` naming ``where``."""
    if not any(w % 64 for w in attn_widths):
        return 64
    hc = 64
    while hc > 1 and any(w % hc for w in attn_widths):
        hc //= 2
    _warn_one_line(
        f"ADM head width is not stored in {where}; guessed num_head_channels={hc} "
        f"(override with adm_config={{'num_head_channels': N}}, on the command line "
        f"--adm-config '{{\"num_head_channels\": N}}')"
    )
    return hc
