"""The ``diffrestore`` command.

Every user-caused failure (bad file, wrong checkpoint, impossible size, unwritable folder) ends as
one line ``diffrestore: error: ...`` on stderr and exit status 2, with no output files written.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from diffrestore import image_io
from diffrestore.cli_args import (
    DTYPE_CHOICES, DTYPE_HELP, CLIError, OneLineParser, add_run_options, add_tile_options, check_tile_options,
    parse_adm_config, parse_list, parse_options, parse_steps, parse_sweep,
)  # fmt: skip
from diffrestore.errors import DISK_ERRORS, USER_ERRORS
from diffrestore.priors.catalog import DEFAULT_PRIORS

# torch is imported inside the commands: the checks that refuse a command cheaply run before it loads


def cmd_tasks(args) -> int:
    from diffrestore.operators.tasks import list_tasks

    for name, summary in list_tasks():
        print(f"{name:16s} {summary}")
    return 0


def _option_value(value) -> str:
    """An option value as it is typed on the command line (flags as true / false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def cmd_methods(args) -> int:
    from diffrestore.methods import METHODS, method_options, option_descriptions

    for info in METHODS.values():
        print(f"{info.name:12s} {info.prior:6s} {info.default_steps:4d} steps  {info.summary}")
        paper = method_options(info.name, paper=True)
        described = option_descriptions(info.name)
        for key, value in method_options(info.name).items():
            shown = f"{key}={_option_value(value)}"
            if value != paper[key]:
                shown += f" (paper: {_option_value(paper[key])})"
            print(f"{'':14s}{shown:36s} {described[key]}")
    print("\nSet an option with `restore --option NAME=VALUE` or `evaluate --options METHOD:NAME=VALUE`; "
          "`--preset paper` uses the paper's values.")
    return 0


def cmd_doctor(args) -> int:
    from diffrestore.doctor import report

    print(report())
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


#: help and description of the subcommands declared in this module
COMMAND_TEXTS = {
    "evaluate": (
        "benchmark grid (tasks x methods x steps over a folder of images): tables and figures",
        "Degrade each chosen image once per task, restore it with every method, score it, and write "
        "records, tables (the report's Tables 1-4) and figures (4, 6, 7) into --out. Resumable: rerun the same "
        "command to finish an interrupted run; name more tasks/methods/--fig7-steps to extend it. Sharded: "
        "--nproc K, or torchrun --nproc_per_node=K -m diffrestore evaluate ...",
    ),
    "report": (
        "re-render the tables and figures of an evaluation run (runs no model)",
        "Rebuild tables.md, tables.csv, results.json, fig4/fig6/fig7 (and fig7.csv) of RUN from its stored "
        "records, features, images and intermediates.",
    ),
    "demo": (
        "restore a few sample photos with the recommended methods: a comparison grid, a metrics table",
        "Restore scikit-image's bundled sample photos (astronaut, coffee, chelsea, rocket; no download) "
        "for the tasks sr4, deblur, denoise, noisy-sr4 with the methods a user should pick: ddrm, diffpir (pixel "
        "prior), ddrm-ldm and srldm with its consistency step (latent prior); --report shows the report's "
        "comparison instead, its two failing setups labelled. Writes OUT/demo_grid.png (columns titled with "
        "method, steps and options; the baseline named per task), OUT/metrics.md, OUT/metrics.csv, "
        "OUT/summary.json and the images in OUT/images/. PSNR/SSIM are computed on the saved 8-bit PNGs. Methods "
        "whose built-in prior is not trained yet are skipped with a warning (unless named with --methods).",
    ),
    "train": (
        "train a built-in prior (pixel, or latent-sr: stages autoencoder then unet)",
        "Train a prior from a folder of photos; resumable (--resume). "
        "`diffrestore train pixel --help` / `diffrestore train latent-sr --help` list the options.",
    ),
    "app": (
        "serve a web page to restore photos (needs the app extra: pip install -e \".[app]\")",
        "Start the web app on this computer: upload a photo, say what is wrong with it, compare "
        "before and after, download the result. Listens on 127.0.0.1 only unless --host says otherwise.",
    ),
}


def _run_settings(args) -> dict:
    """The options evaluate and demo share: priors, device, precision, progress and resource limits."""
    return dict(pixel_prior=args.pixel_prior, latent_prior=args.latent_prior, adm_config=parse_adm_config(args.adm_config),
                device=args.device, dtype=args.dtype, progress=not args.no_progress, max_pixels=args.max_pixels,
                max_memory=args.max_memory)  # fmt: skip


def _subparser(sub, name: str):
    help_text, description = COMMAND_TEXTS[name]
    return sub.add_parser(name, help=help_text, description=description)


# ---- evaluate / report ----


def _add_evaluate(sub) -> None:
    p = _subparser(sub, "evaluate")
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
    p.add_argument("--preset", choices=["paper", "quick"], default=None, help="paper: the report's full grid with the published methods' options, in fp32; quick: a small CPU grid "
        "with the recommended options")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the throughput measurement (records run one image per call)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=DTYPE_HELP + " (--preset paper: fp32)")
    p.add_argument("--save-images", action="store_true", help="keep every restored image (default: the first few, for Figure 4)")
    p.add_argument("--nproc", type=int, default=1, help="shard over K local processes")
    p.add_argument(
        "--skip-bad", action="store_true",
        help="leave out chosen images that cannot be used (unreadable, over --max-pixels), listed in RUN/skipped.json "
        "and the tables; without it such an image stops the command before anything is written",
    )
    add_run_options(p)
    add_tile_options(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from diffrestore.evaluation import runner
    from diffrestore.evaluation.plan import EvalSpec

    check_tile_options(args)
    spec = EvalSpec(
        **_run_settings(args),
        out=args.out,
        data=args.data,
        n=args.first if args.first is not None else args.n,
        first=True if args.first is not None else (False if args.n is not None else None),
        seed=args.seed,
        size=args.size,
        tasks=parse_list(args.tasks, "--tasks"),
        methods=parse_list(args.methods, "--methods"),
        steps=parse_steps(args.steps),
        options=parse_options(args.options),
        fig7_steps=parse_sweep(args.fig7_steps),
        fig7_task=args.fig7_task,
        frozen_graphs=args.frozen_graphs or None,
        batch_size=args.batch_size,
        save_images=args.save_images,
        nproc=args.nproc,
        preset=args.preset,
        skip_bad=args.skip_bad,
        tile=args.tile,
        overlap=args.overlap,
    )
    run = runner.evaluate(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        print((run / "tables.md").read_text(), end="")
        print(f"results in {run}/ (tables.md, tables.csv, results.json, fig4_grid.png, fig6_intermediates.png, fig7_fid_throughput.png)")
    return 0


def _add_report(sub) -> None:
    p = _subparser(sub, "report")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from diffrestore.evaluation import report, seams

    seams.load_plugins()
    run = Path(args.run)
    report.write_report(run)
    print((run / "tables.md").read_text(), end="")
    print(f"written in {run}/: tables.md, tables.csv, results.json, fig4_grid.png, fig6_intermediates.png, fig7_fid_throughput.png, fig7.csv")
    return 0


# ---- demo ----


def _add_demo(sub) -> None:
    p = _subparser(sub, "demo")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--images", type=int, default=2, help="number of sample photos, 1-4 (default 2)")
    p.add_argument("--size", type=int, default=256, help="photos are centre-cropped and resized to SIZE (default 256)")
    p.add_argument(
        "--report", action="store_true",
        help="show the report's comparison (srldm, ddrm, ddrm-srldm with the report's options, and ddrm-ldm) instead "
        "of the recommended methods, its two failing setups (srldm, ddrm-srldm) labelled as such",
    )  # fmt: skip
    p.add_argument(
        "--methods", default=None,
        help="comma-separated methods (default: ddrm,diffpir,ddrm-ldm,srldm; with --report: srldm,ddrm,ddrm-srldm,ddrm-ldm); "
        "a method of the chosen set keeps its options there, another runs with its defaults",
    )  # fmt: skip
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: sr4,deblur,denoise,noisy-sr4)")
    p.add_argument(
        "--steps", default=None,
        help="N for every method, or per method, e.g. ddrm:10,srldm:25 (default: ddrm, diffpir, ddrm-srldm 20; "
        "ddrm-ldm, srldm 50; another method its registry default)",
    )  # fmt: skip
    p.add_argument("--pixel-prior", default=None, metavar="SPEC", help=f"pixel prior for ddrm and diffpir (default {DEFAULT_PRIORS['pixel']})")
    p.add_argument("--latent-prior", default=None, metavar="SPEC", help=f"latent SR prior (default {DEFAULT_PRIORS['latent']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: torch's choice, one per core; 1 is faster on a busy machine)",
    )  # fmt: skip
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    add_run_options(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from diffrestore import demo

    spec = demo.DemoSpec(
        **_run_settings(args),
        out=Path(args.out),
        images=args.images,
        size=args.size,
        methods=parse_list(args.methods, "--methods"),
        report=args.report,
        tasks=parse_list(args.tasks, "--tasks"),
        steps=parse_steps(args.steps),
        seed=args.seed,
        frozen_graphs=args.frozen_graphs,
    )
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    import torch

    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        plan = demo.prepare(spec)  # every user error is raised here, before anything is written
        demo.warn_skipped(plan)
        with image_io.writing_into(spec.out, subdirs=("images",)) as written:
            summary = demo.execute(plan, written)
    finally:
        torch.set_num_threads(threads)
    demo.print_results(summary, spec.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="diffrestore", description="Diffusion-based image restoration and benchmarking.")
    sub = parser.add_subparsers(dest="command", required=True)
    from diffrestore.cli_restore import add_restore  # its own module: the longest command

    add_restore(sub)
    p = sub.add_parser("tasks", help="list the degradation tasks")
    p.set_defaults(func=cmd_tasks)
    p = sub.add_parser("methods", help="list the methods, the prior each needs, default steps and options")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("priors", help="list the built-in priors and the formats --prior accepts")
    p.set_defaults(func=cmd_priors)
    p = sub.add_parser("doctor", help="say which optional pieces are installed (metric weights, the app, a GPU) and how to add each")
    p.set_defaults(func=cmd_doctor)
    _add_evaluate(sub)
    _add_report(sub)
    _add_demo(sub)
    _add_train(sub)
    _add_app(sub)
    return parser


TRAINERS = {"pixel": "diffrestore.training.pixel", "latent-sr": "diffrestore.training.latent_sr"}


def _add_train(sub) -> None:
    p = _subparser(sub, "train")
    p.add_argument("kind", choices=sorted(TRAINERS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the trainer's own options")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import importlib

    return importlib.import_module(TRAINERS[args.kind]).main(args.args, parser_class=OneLineParser, prog=f"diffrestore train {args.kind}")


def _add_app(sub) -> None:
    p = _subparser(sub, "app")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--device", default="cpu", help="where the networks run (default cpu)")
    p.add_argument(
        "--max-output-pixels", type=int, default=1024 * 1024, metavar="N",
        help="refuse jobs whose restored image has more pixels than this (default 1048576 = 1024x1024)",
    )  # fmt: skip
    p.set_defaults(func=cmd_app)


def cmd_app(args) -> int:
    from diffrestore.app import launch, missing_gradio_message

    missing = missing_gradio_message()
    if missing:
        raise CLIError(missing)
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if args.max_output_pixels < 1:
        raise CLIError(f"--max-output-pixels must be positive, got {args.max_output_pixels}")
    launch(host=args.host, port=args.port, share=args.share, device=args.device, max_output_pixels=args.max_output_pixels)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch's note on refusing a pickled checkpoint says nothing a user can act on; the error line does
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    try:
        return args.func(args)
    except CLIError as e:
        msg = str(e)
    except USER_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        msg = f"{DISK_ERRORS[e.errno]}{where}; free some space or write somewhere else (--out)"
    except RuntimeError as e:  # a worker of `evaluate --nproc` that died (killed, out of memory)
        from diffrestore.evaluation.distributed import RankError

        if not isinstance(e, RankError):
            raise
        msg = f"{str(e).splitlines()[0]}; the records written so far are kept: rerun the command to resume"
    except KeyboardInterrupt:
        print("diffrestore: interrupted", file=sys.stderr)
        return 130
    print(f"diffrestore: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
