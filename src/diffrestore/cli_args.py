"""Pieces every ``diffrestore`` command line shares: the parser, common options and value parsers.

Nothing here imports torch, so ``--help`` and the cheap refusals stay fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffrestore import resources
from diffrestore.errors import UserError


class CLIError(UserError):
    """An error to report as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors (a bad number, a missing option) are one ``diffrestore: error:`` line,
    like every other user error, pointing at the command's --help instead of printing the usage."""

    def error(self, message: str):
        self.exit(2, f"diffrestore: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------------------------
# options shared by restore, evaluate and demo
# --------------------------------------------------------------------------------------------

DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]
DTYPE_HELP = ("network precision (default auto: bf16 on a GPU or on a CPU with native bf16, where it is faster "
              "at no measured quality cost, else fp32; fp16 on a CPU is much slower)")


def add_run_options(p) -> None:
    """``--adm-config``, ``--device``, ``--frozen-graphs``, ``--no-progress`` and the resource limits
    ``--max-pixels`` / ``--max-memory`` (restore, evaluate, demo)."""
    p.add_argument(
        "--adm-config", default=None, metavar="JSON",
        help="hyper-parameters of an ADM checkpoint that its weights do not give (the head width), as a JSON "
        "object or a .json file, e.g. '{\"num_head_channels\": 64}'; other priors ignore it",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument(
        "--max-pixels", type=int, default=resources.DEFAULT_MAX_PIXELS, metavar="N",
        help=f"refuse images of more than N pixels, read from the file header before decoding (default "
        f"{resources.DEFAULT_MAX_PIXELS:,}: a guard against decompression bombs)",
    )
    p.add_argument(
        "--max-memory", default=None, metavar="SIZE",
        help="memory a run may plan to use, e.g. 8G (default: 80%% of what the device has available); a run whose "
        "estimate exceeds it is refused before any work",
    )
    p.add_argument(
        "--frozen-graphs", action="store_true",
        help="run the latent UNets (and pixel UNets in bf16/fp16) as frozen TorchScript graphs, traced once per "
        "input size: faster on a CPU (a pixel UNet in fp32 stays eager, where freezing does not pay; see "
        "docs/evaluation.md)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true")


def add_tile_options(p) -> None:
    """``--tile`` and ``--overlap`` (restore, evaluate)."""
    p.add_argument(
        "--tile", type=int, default=None, metavar="N",
        help="run the network on overlapping N-pixel tiles, blended, the grid shifting every step (memory bounded by "
        "the tile; data consistency stays on the whole image); default: tiles of 512 only when the image would not "
        "fit in memory; 0: never tile",
    )  # fmt: skip
    p.add_argument("--overlap", type=int, default=None, metavar="M", help="least overlap of neighbouring tiles in pixels (default 32, at most a quarter of the tile)")


def check_tile_options(args) -> None:
    """``--tile``/``--overlap`` values, refused before anything is loaded. Raises CLIError."""
    from diffrestore.priors.tiled import DEFAULT_TILE, check_tiling, default_overlap

    if args.tile is not None and args.tile < 0:
        raise CLIError(f"--tile must be 0 (off) or a number of pixels, got {args.tile}")
    if args.tile != 0:
        tile = args.tile or DEFAULT_TILE
        try:
            check_tiling(tile, default_overlap(tile) if args.overlap is None else args.overlap)
        except ValueError as e:
            raise CLIError(f"--tile/--overlap: {e}") from None


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------


def parse_adm_config(text: str | None) -> dict | None:
    """``--adm-config``: a JSON object, or the path of a file holding one. Raises CLIError (one line)."""
    if text is None:
        return None
    source = "--adm-config"
    if not text.lstrip().startswith(("{", "[")):  # not written as JSON: a file
        path = Path(text).expanduser()
        source = f"--adm-config {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CLIError(f"{source}: neither a JSON object nor an existing .json file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"{source}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CLIError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CLIError(f"{source}: expected a JSON object such as {{\"num_head_channels\": 64}}, got {type(value).__name__}")
    return value


def parse_list(text: str | None, what: str) -> list[str] | None:
    """A comma-separated list without blanks or repeats (None when the option was not given)."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise CLIError(f"{what} is empty")
    return list(dict.fromkeys(items))


def _positive_int(text: str, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise CLIError(f"{what}: {text!r} is not a whole number") from None
    if v < 1:
        raise CLIError(f"{what}: step counts must be at least 1, got {v}")
    return v


def parse_steps(text: str | None) -> dict[str, int]:
    """``"100"`` (every method), ``"ddrm:20,srldm:100"`` or both (``"50,ddrm:20"``)."""
    out: dict[str, int] = {}
    for item in parse_list(text, "--steps") or []:
        method, sep, value = item.rpartition(":")
        out[method.strip() if sep else "*"] = _positive_int(value.strip(), "--steps")
    return out


def parse_sweep(text: str | None) -> dict[str, list[int]]:
    """``"srldm:5,10,20;ddrm:10,20"`` -> {method: sorted step counts}."""
    out: dict[str, list[int]] = {}
    if text is None:
        return out
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        method, sep, values = part.partition(":")
        if not sep or not method.strip():
            raise CLIError(f"--fig7-steps: {part!r} is not METHOD:S1,S2,...")
        steps = {_positive_int(v.strip(), "--fig7-steps") for v in values.split(",") if v.strip()}
        if not steps:
            raise CLIError(f"--fig7-steps: no step counts for {method.strip()}")
        out[method.strip()] = sorted(set(out.get(method.strip(), [])) | steps)
    return out


def parse_options(text: str | None) -> dict[str, dict]:
    """``"ddrm:eta=1.0;ddrm-ldm:stop=0.4,eta=0"`` -> {method: {option: value}} (validated and typed
    against the method's options)."""
    from diffrestore.methods import check_options, get_method

    out: dict[str, dict] = {}
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        method, sep, items = part.partition(":")
        method = method.strip()
        pairs = [item.partition("=") for item in items.split(",") if item.strip()]
        if not sep or not method or not pairs or any(not eq or not k.strip() for k, eq, _ in pairs):
            raise CLIError(f"--options: {part!r} is not METHOD:NAME=VALUE,...")
        get_method(method)
        try:
            out.setdefault(method, {}).update(check_options(method, {k.strip(): v.strip() for k, _, v in pairs}))
        except ValueError as e:
            raise CLIError(f"--options: {e}") from None
    return out
