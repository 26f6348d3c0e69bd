"""The ``diffrestore`` command.

Every user-caused failure (bad file, wrong checkpoint, impossible size, unwritable folder) ends as
one line ``diffrestore: error: ...`` on stderr and exit status 2, with no output files written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from diffrestore import io
from diffrestore.priors.catalog import DEFAULT_PRIORS

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, FloatingPointError)


class CLIError(Exception):
    """An error to report as one line."""


# --------------------------------------------------------------------------------------------
# options shared by restore, evaluate and demo
# --------------------------------------------------------------------------------------------


def _add_run_options(p) -> None:
    """``--adm-config``, ``--device``, ``--frozen-graphs`` and ``--no-progress`` (restore, evaluate, demo)."""
    p.add_argument(
        "--adm-config", default=None, metavar="JSON",
        help="hyper-parameters of an ADM checkpoint that its weights do not give (the head width), as a JSON "
        "object or a .json file, e.g. '{\"num_head_channels\": 64}'; other priors ignore it",
    )  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--frozen-graphs", action="store_true",
        help="run the networks as frozen TorchScript graphs, traced once per input size: on a CPU 10-15%% faster "
        "per call of a small latent UNet, a few %% per restoration step (bench/latent_speed.py)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true")


def parse_adm_config(text: str | None) -> dict | None:
    """``--adm-config``: a JSON object, or the path of a file holding one. Raises CLIError (one line)."""
    if text is None:
        return None
    import json

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


# --------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------


def _add_restore(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="restore degraded images (or degrade clean ones with --degrade, then restore and score)",
        description="Restore images. Without --degrade each IMG is the measurement y (e.g. the 64x64 "
        "low-resolution image for sr4). With --degrade each IMG is a clean image: it is degraded with "
        "the task's operator and noise, restored, and scored (PSNR/SSIM) against the clean image.",
    )
    p.add_argument("images", nargs="+", metavar="IMG")
    p.add_argument("--task", required=True, help="task name (see `diffrestore tasks`)")
    p.add_argument("--method", default="ddrm", help="ddrm, srldm, ddrm-srldm, ddrm-ldm")
    p.add_argument("--prior", required=True, help="model: a path (ADM .pt, LDM .ckpt, diffusers folder) or builtin:NAME")
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the method's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--degrade", action="store_true", help="inputs are clean images: degrade, restore, score")
    p.add_argument("--sigma-y", type=float, default=None, help="measurement noise std in [-1,1] units")
    p.add_argument("--blur-sigma", type=float, default=None, help="Gaussian blur std in pixels")
    p.add_argument("--scale", type=int, default=None, help="super-resolution factor")
    p.add_argument("--mask", default=None, help="inpainting mask image (white = observed)")
    p.add_argument("--eta", type=float, default=None, help="DDRM eta / DDIM eta")
    p.add_argument("--eta-b", type=float, default=None, help="DDRM eta_b")
    p.add_argument(
        "--start", type=float, default=None,
        help="latent methods: run the steps over this fraction of the diffusion, starting from the upsampled "
        "measurement instead of pure noise (srldm default 1, ddrm-ldm 0.5)",
    )
    p.add_argument(
        "--stop", type=float, default=None,
        help="ddrm-ldm: end the steps at this fraction of the diffusion and return the consistent clean estimate "
        "there (default 0.4, best in PSNR and FID with builtin:ldmsr-s; 0: a full sample)",
    )
    p.add_argument(
        "--samples", type=int, default=None, metavar="N",
        help="write the mean of N samples (an estimate of the posterior mean: higher PSNR, N times the cost) "
        "and IMG_TASK_METHOD_std.png, their per-pixel spread (white: std 0.1 in [-1, 1] units or more); "
        "the N samples run as one batch, so memory grows with N",
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE",
        help="any other option of the method (repeatable; `diffrestore methods` lists them), "
        "e.g. --option consistency=true (srldm), --option rho=0.2 (ddrm-ldm), --option strategy=b (ddrm-srldm)",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="network precision")
    _add_run_options(p)
    p.set_defaults(func=cmd_restore)


def cmd_restore(args) -> int:
    from diffrestore.methods import check_frozen_graphs, check_options, get_method, method_options
    from diffrestore.operators.tasks import make_task
    from diffrestore.pipeline import restore_file_inputs
    from diffrestore.priors.loading import load_prior

    info = get_method(args.method)
    adm_config = parse_adm_config(args.adm_config)
    method_kwargs = {"eta": args.eta, "eta_b": args.eta_b, "start": args.start, "stop": args.stop, "samples": args.samples}
    unknown = [k for k, v in method_kwargs.items() if v is not None and k not in method_options(info.name)]
    if unknown:
        raise CLIError(f"method {info.name} has no option --{unknown[0].replace('_', '-')}")
    for item in args.option:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise CLIError(f"--option {item!r} is not NAME=VALUE")
        if method_kwargs.get(name.strip()) is not None:
            raise CLIError(f"option {name.strip()} is given twice")
        method_kwargs[name.strip()] = value.strip()
    try:  # values out of range: refused before anything is loaded
        method_kwargs = check_options(info.name, method_kwargs)
        check_frozen_graphs([info.name], args.frozen_graphs)
    except ValueError as e:
        raise CLIError(str(e)) from None
    overrides = {k: v for k, v in (("sigma_y", args.sigma_y), ("blur_sigma", args.blur_sigma), ("scale", args.scale)) if v is not None}
    make_task(args.task, (3, 64, 64), **overrides)  # validates the task name and parameters early

    # Read every input before writing anything, so a bad file leaves no output behind.
    images = [(Path(p), io.read_image(p)) for p in args.images]
    mask = io.read_image(args.mask) if args.mask else None
    out = Path(args.out)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with io.writing_into(out) as written:
        prior = load_prior(args.prior, device=args.device, dtype=dtype, adm_config=adm_config, frozen_graphs=args.frozen_graphs)
        kind = "latent" if hasattr(prior, "encode") else "pixel"
        if kind != info.prior:
            raise CLIError(f"method {info.name} needs a {info.prior} prior, but {args.prior} is a {kind} prior")
        results = restore_file_inputs(
            images,
            method=info.name,
            prior=prior,
            prior_spec=args.prior,
            task_name=args.task,
            overrides=overrides,
            degrade=args.degrade,
            mask=mask,
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            out=out,
            written=written,
            method_kwargs=method_kwargs,
            progress=not args.no_progress,
            adm_config=adm_config,
        )
    for r in results:
        line = f"{r['input']}: {r['method']} {r['task']} in {r['seconds']:.1f}s"
        if "psnr" in r:
            line += f"  PSNR {r['psnr']:.2f} dB (baseline {r['baseline_psnr']:.2f})  SSIM {r['ssim']:.4f}"
        print(line)
    print(f"results in {out}/")
    return 0


def cmd_tasks(args) -> int:
    from diffrestore.operators.tasks import list_tasks

    for name, summary in list_tasks():
        print(f"{name:16s} {summary}")
    return 0


def cmd_methods(args) -> int:
    from diffrestore.methods import METHODS, method_options

    for info in METHODS.values():
        options = ", ".join(f"{k}={v}" for k, v in method_options(info.name).items())
        print(f"{info.name:12s} {info.prior:6s} {info.default_steps:4d} steps  {info.summary}")
        print(f"{'':12s} options: {options or 'none'}")
    return 0


def cmd_priors(args) -> int:
    from diffrestore.priors.catalog import BUILTIN_PREFIX, DEFAULT_PRIORS, SPEC_FORMATS, builtin_dir, list_builtin_priors

    notes: list[str] = []
    priors = list_builtin_priors(notes)
    if priors:
        print(f"built-in priors (--prior builtin:NAME; in {builtin_dir()}):")
        w = max(len(p.name) for p in priors)
        defaults = [p for p in priors if DEFAULT_PRIORS.get(p.kind) == BUILTIN_PREFIX + p.name]
        for p in priors:
            print(f"  {p.name:{w}s}  {p.kind:6s}  {p.size_mb:8.1f} MB  {p.description}{' [default]' * (p in defaults)}")
        if defaults:
            print("  [default]: what `diffrestore demo` and `evaluate --preset quick` use unless told otherwise")
    else:
        print(f"built-in priors: none installed (folder {builtin_dir()})")
    for note in notes:
        print(f"  note: {note}")
    print()
    print("--prior SPEC accepts:")
    w = max(len(spec) for spec, _ in SPEC_FORMATS)
    for spec, what in SPEC_FORMATS:
        print(f"  {spec:{w}s}  {what}")
    return 0


# --------------------------------------------------------------------------------------------
# evaluate / report
# --------------------------------------------------------------------------------------------


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="benchmark grid (tasks x methods x steps over a folder of images): tables and figures",
        description="Degrade each chosen image once per task, restore it with every method, score it, and write "
        "records, tables (the report's Tables 1-4) and figures (4, 6, 7) into --out. Resumable: rerun the same "
        "command to finish an interrupted run; name more tasks/methods/--fig7-steps to extend it. Sharded: "
        "--nproc K, or torchrun --nproc_per_node=K -m diffrestore evaluate ...",
    )
    p.add_argument("--data", default=None, help="folder of clean images (searched recursively)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (created; reused to resume)")
    subset = p.add_mutually_exclusive_group()
    subset.add_argument(
        "--n", "--num-images", dest="n", type=int, default=None,
        help="number of images, a seeded random subset (default: all); under torchrun write --num-images "
        "(torchrun's own parser takes --n for an abbreviation of its options)",
    )
    subset.add_argument("--first", type=int, default=None, metavar="N", help="the first N images in sorted path order")
    p.add_argument("--seed", type=int, default=None, help="run seed: image subset, measurement noise, samplers (default 0)")
    p.add_argument("--size", type=int, default=None, help="images are centre-cropped and resized to SIZE (default 256)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: sr4,deblur,denoise,noisy-sr4)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: srldm,ddrm,ddrm-srldm)")
    p.add_argument("--steps", default=None, help="table steps: N for every method, or per method ddrm:20,srldm:100")
    p.add_argument(
        "--options", default=None, metavar="OPTS",
        help="method options, e.g. 'ddrm:eta=1.0;ddrm-ldm:stop=0.4,eta=0' (see `diffrestore methods`); recorded in the run",
    )
    p.add_argument("--fig7-steps", default=None, metavar="SWEEP", help="Figure 7 step sweeps, e.g. 'srldm:5,10,20;ddrm:10,20'")
    p.add_argument("--fig7-task", default=None, help="task of Figures 6 and 7 (default: sr4 if evaluated, else the first task)")
    p.add_argument("--pixel-prior", default=None, metavar="SPEC", help="pixel prior for ddrm (path or builtin:NAME)")
    p.add_argument("--latent-prior", default=None, metavar="SPEC", help="latent SR prior for srldm, ddrm-srldm, ddrm-ldm")
    p.add_argument("--preset", choices=["paper", "quick"], default=None, help="paper: the report's full grid; quick: a small CPU grid")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the throughput measurement (records run one image per call)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="network precision (default fp32)")
    p.add_argument("--save-images", action="store_true", help="keep every restored image (default: the first few, for Figure 4)")
    p.add_argument("--nproc", type=int, default=1, help="shard over K local processes")
    _add_run_options(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from diffrestore.evaluation import runner

    spec = runner.EvalSpec(
        out=args.out,
        data=args.data,
        n=args.first if args.first is not None else args.n,
        first=True if args.first is not None else (False if args.n is not None else None),
        seed=args.seed,
        size=args.size,
        tasks=runner.parse_list(args.tasks, "--tasks"),
        methods=runner.parse_list(args.methods, "--methods"),
        steps=runner.parse_steps(args.steps),
        options=runner.parse_options(args.options),
        fig7_steps=runner.parse_sweep(args.fig7_steps),
        fig7_task=args.fig7_task,
        pixel_prior=args.pixel_prior,
        latent_prior=args.latent_prior,
        adm_config=parse_adm_config(args.adm_config),
        device=args.device,
        dtype=args.dtype,
        frozen_graphs=args.frozen_graphs or None,
        batch_size=args.batch_size,
        save_images=args.save_images,
        nproc=args.nproc,
        progress=not args.no_progress,
        preset=args.preset,
    )
    run = runner.evaluate(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        print((run / "tables.md").read_text(), end="")
        print(f"results in {run}/ (tables.md, tables.csv, results.json, fig4_grid.png, fig6_intermediates.png, fig7_fid_throughput.png)")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="re-render the tables and figures of an evaluation run (runs no model)",
        description="Rebuild tables.md, tables.csv, results.json, fig4/fig6/fig7 (and fig7.csv) of RUN from its stored "
        "records, features, images and intermediates.",
    )
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from diffrestore.evaluation import report, runner

    runner.load_plugins()
    run = Path(args.run)
    report.write_report(run)
    print((run / "tables.md").read_text(), end="")
    print(f"written in {run}/: tables.md, tables.csv, results.json, fig4_grid.png, fig6_intermediates.png, fig7_fid_throughput.png, fig7.csv")
    return 0


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="restore a few sample photos with every method and task: a comparison grid, a metrics table",
        description="Restore scikit-image's bundled sample photos (astronaut, coffee, chelsea, rocket; no download) "
        "for the tasks sr4, deblur, denoise, noisy-sr4 with ddrm (pixel prior) and srldm, ddrm-srldm, ddrm-ldm "
        "(latent prior), and write OUT/demo_grid.png, OUT/metrics.md, OUT/metrics.csv, OUT/summary.json and the "
        "images in OUT/images/. PSNR/SSIM are computed on the saved 8-bit PNGs. Methods whose built-in prior is "
        "not trained yet are skipped with a warning (unless named with --methods).",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--images", type=int, default=2, help="number of sample photos, 1-4 (default 2: the whole demo stays under 10 minutes on 2 CPU cores)")
    p.add_argument("--size", type=int, default=256, help="photos are centre-cropped and resized to SIZE (default 256)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: ddrm,srldm,ddrm-srldm,ddrm-ldm)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: sr4,deblur,denoise,noisy-sr4)")
    p.add_argument(
        "--steps", default=None,
        help="N for every method, or per method, e.g. ddrm:10,srldm:25 (default: ddrm 20, srldm 50, ddrm-srldm 20, ddrm-ldm 50)",
    )  # fmt: skip
    p.add_argument("--pixel-prior", default=None, metavar="SPEC", help=f"pixel prior for ddrm (default {DEFAULT_PRIORS['pixel']})")
    p.add_argument("--latent-prior", default=None, metavar="SPEC", help=f"latent SR prior (default {DEFAULT_PRIORS['latent']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: torch's choice, one per core; 1 is faster on a busy machine)",
    )  # fmt: skip
    _add_run_options(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from diffrestore import demo
    from diffrestore.evaluation.runner import parse_list, parse_steps

    spec = demo.DemoSpec(
        out=Path(args.out),
        images=args.images,
        size=args.size,
        methods=parse_list(args.methods, "--methods"),
        tasks=parse_list(args.tasks, "--tasks"),
        steps=parse_steps(args.steps),
        pixel_prior=args.pixel_prior,
        latent_prior=args.latent_prior,
        adm_config=parse_adm_config(args.adm_config),
        seed=args.seed,
        device=args.device,
        frozen_graphs=args.frozen_graphs,
        progress=not args.no_progress,
    )
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        plan = demo.prepare(spec)  # every user error is raised here, before anything is written
        demo.warn_skipped(plan)
        with io.writing_into(spec.out, subdirs=("images",)) as written:
            summary = demo.execute(plan, written)
    finally:
        torch.set_num_threads(threads)
    demo.print_results(summary, spec.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrestore", description="Diffusion-based image restoration and benchmarking.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_restore(sub)
    p = sub.add_parser("tasks", help="list the degradation tasks")
    p.set_defaults(func=cmd_tasks)
    p = sub.add_parser("methods", help="list the methods, the prior each needs, default steps and options")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("priors", help="list the built-in priors and the formats --prior accepts")
    p.set_defaults(func=cmd_priors)
    _add_evaluate(sub)
    _add_report(sub)
    _add_demo(sub)
    _add_train(sub)
    return parser


TRAINERS = {"pixel": "diffrestore.training.pixel", "latent-sr": "diffrestore.training.latent_sr"}


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a built-in prior (pixel, or latent-sr: stages autoencoder then unet)",
        description="Train a prior from a folder of photos; resumable (--resume). "
        "`diffrestore train pixel --help` / `diffrestore train latent-sr --help` list the options.",
        add_help=False,
    )
    p.add_argument("kind", choices=sorted(TRAINERS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the trainer's own options")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import importlib

    return importlib.import_module(TRAINERS[args.kind]).main(args.args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        msg = str(e)
    except USER_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    except KeyboardInterrupt:
        print("diffrestore: interrupted", file=sys.stderr)
        return 130
    print(f"diffrestore: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
