"""``diffrestore restore``: restore image files (or degrade clean ones, restore and score them).

Its checks run cheapest first: options and image headers before torch is imported (a decompression bomb,
``--samples 200000`` or ``--blur-sigma 1e6`` is refused in well under a second), then the inputs are
decoded, then the task, device and memory estimate, and only then is the prior loaded and anything written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffrestore import image_io, resources, runtime
from diffrestore.priors.catalog import DEFAULT_PRIORS
from diffrestore.cli_args import (
    DTYPE_CHOICES, DTYPE_HELP, CLIError, add_run_options, add_tile_options, check_tile_options, parse_adm_config,
)


SUMMARY = "restore degraded images (or degrade clean ones with --degrade, then restore and score)"
DESCRIPTION = (
    "Restore images. Without --degrade each IMG is the measurement y (e.g. the 64x64 low-resolution image for "
    "sr4). With --degrade each IMG is a clean image: it is degraded with the task's operator and noise, restored, "
    "and scored (PSNR/SSIM) against the clean image."
)


def add_restore(sub) -> None:
    p = sub.add_parser("restore", help=SUMMARY, description=DESCRIPTION)
    p.add_argument("images", nargs="+", metavar="IMG")
    p.add_argument("--task", required=True, help="task name (see `diffrestore tasks`)")
    p.add_argument("--method", default="ddrm", help="restoration method (default ddrm; `diffrestore methods` lists them)")
    p.add_argument(
        "--prior", default=None,
        help="model: a path (ADM .pt, LDM .ckpt, diffusers folder) or builtin:NAME (default: the built-in prior the "
        f"method needs, {DEFAULT_PRIORS['pixel']} or {DEFAULT_PRIORS['latent']})",
    )  # fmt: skip
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
    p.add_argument(
        "--preset", choices=["recommended", "paper"], default=None,
        help="recommended (default): the method options that measured best (`diffrestore methods` shows them); "
        "paper: the published methods' own settings, in fp32 unless --dtype says otherwise",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=DTYPE_HELP + " (--preset paper: fp32)")
    add_run_options(p)
    add_tile_options(p)
    p.set_defaults(func=cmd_restore)


def _restore_early_checks(args) -> list[tuple[str, int, int]]:
    """restore's cheap refusals, before torch is imported: step count, blur width, image headers against
    ``--max-pixels``, and a lower bound of the memory (neither the prior kind nor the operator is known
    yet; an SR scale given with --scale enlarges the restored image). Returns (path, height, width) of
    every input."""
    if args.max_pixels < 1:
        raise CLIError(f"--max-pixels must be positive, got {args.max_pixels}")
    resources.check_steps(args.steps)
    resources.check_device_name(args.device)
    if args.blur_sigma is not None:
        resources.check_blur_sigma(args.blur_sigma)
    samples = max(1, args.samples or 1)  # a count below 1 is refused with the method's options
    sizes = [(path, *resources.image_size(path, args.max_pixels)[::-1]) for path in args.images]
    if args.mask:
        resources.image_size(args.mask, args.max_pixels)
    if args.device is None or not str(args.device).startswith("cuda"):  # a GPU's memory is read with torch
        scale = 1 if args.degrade or args.scale is None or args.scale < 1 else args.scale
        budget = resources.memory_budget(args.max_memory)
        for path, h, w in sizes:
            resources.check_memory(h * scale, w * scale, budget, samples=samples, tile=_estimate_tile(args),
                                   what=f"{path} ({h * scale}x{w * scale} restored)")
    return sizes


def _restore_checks(args, info, overrides: dict, device, sizes: list[tuple[str, int, int]], samples: int) -> None:
    """restore's checks that need the task registry: the task and its parameters, the memory of every
    restored image with ``samples`` draws, this method's prior kind and the task's operator."""
    from diffrestore.operators.tasks import check_task, get_task_spec, measurement_factor

    check_task(args.task, **overrides)
    factor = 1 if args.degrade else measurement_factor(args.task, **overrides)
    budget = resources.memory_budget(args.max_memory, str(device))
    separable = get_task_spec(args.task).separable
    for path, h, w in sizes:
        resources.check_memory(h * factor, w * factor, budget, samples=samples, kind=info.prior, separable=separable,
                               tile=_estimate_tile(args), what=f"{path} ({h * factor}x{w * factor} restored)")


def _estimate_tile(args) -> int | None:
    """The tile the memory estimate may count on: none with --tile 0, else the one asked for or the
    automatic one (tiling turns on by itself when the whole image would not fit)."""
    return None if args.tile == 0 else (args.tile or resources.DEFAULT_TILE)


def _method_kwargs(args, info) -> dict:
    """The method options of the command line (its own flags, ``--option NAME=VALUE``, ``--preset``),
    checked against the method's options and ranges before anything is loaded."""
    from diffrestore.methods import check_frozen_graphs, check_options, method_options, preset_options

    given = {"eta": args.eta, "eta_b": args.eta_b, "start": args.start, "stop": args.stop, "samples": args.samples}
    unknown = [k for k, v in given.items() if v is not None and k not in method_options(info.name)]
    if unknown:
        raise CLIError(f"method {info.name} has no option --{unknown[0].replace('_', '-')}")
    for item in args.option:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise CLIError(f"--option {item!r} is not NAME=VALUE")
        if given.get(name.strip()) is not None:
            raise CLIError(f"option {name.strip()} is given twice")
        given[name.strip()] = value.strip()
    try:  # values out of range: refused before anything is loaded
        given = {**preset_options(info.name, args.preset), **check_options(info.name, given)}
        check_frozen_graphs([info.name], args.frozen_graphs)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return given


def cmd_restore(args) -> int:
    sizes = _restore_early_checks(args)
    # decoded before torch loads and before anything is written: a bad file costs a fraction of a second
    pictures = [(Path(p), image_io.open_rgb(p, args.max_pixels)) for p in args.images]
    mask_picture = image_io.open_rgb(args.mask, args.max_pixels) if args.mask else None

    import torch

    from diffrestore.methods import get_method
    from diffrestore.priors.loading import load_prior
    from diffrestore.restoration import prior_kind

    device = resources.resolve_device(args.device)
    info = get_method(args.method)
    if args.prior is None:
        args.prior = DEFAULT_PRIORS[info.prior]
    adm_config = parse_adm_config(args.adm_config)
    check_tile_options(args)
    method_kwargs = _method_kwargs(args, info)
    overrides = {k: v for k, v in (("sigma_y", args.sigma_y), ("blur_sigma", args.blur_sigma), ("scale", args.scale)) if v is not None}
    _restore_checks(args, info, overrides, device, sizes, samples=method_kwargs.get("samples", 1))

    images = [(p, image_io.rgb_to_tensor(img)) for p, img in pictures]
    mask = image_io.rgb_to_tensor(mask_picture) if mask_picture is not None else None
    out = Path(args.out)
    dtype_name = runtime.pick_dtype(args.dtype or ("fp32" if args.preset == "paper" else "auto"), device)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    with image_io.writing_into(out) as written:
        prior = load_prior(args.prior, device=str(device), dtype=dtype, adm_config=adm_config, frozen_graphs=args.frozen_graphs)
        kind = prior_kind(prior)
        if kind != info.prior:
            raise CLIError(f"method {info.name} needs a {info.prior} prior, but {args.prior} is a {kind} prior")
        results = restore_files(
            images, method=info.name, prior=prior, prior_spec=args.prior, task_name=args.task, overrides=overrides,
            degrade=args.degrade, mask=mask, steps=args.steps, seed=args.seed, device=str(device), out=out,
            written=written, method_kwargs=method_kwargs, progress=not args.no_progress, adm_config=adm_config,
            dtype=dtype_name, tile=args.tile, overlap=args.overlap,
        )  # fmt: skip
    for r in results:
        line = f"{r['input']}: {r['method']} {r['task']} in {r['seconds']:.1f}s"
        if "psnr" in r:
            line += f"  PSNR {r['psnr']:.2f} dB (baseline {r['baseline_psnr']:.2f})  PSNR-Y {r['psnr_y']:.2f} dB  SSIM {r['ssim']:.4f}"
        print(line)
    print(f"results in {out}/")
    return 0


def restore_files(
    images, *, method: str, prior, prior_spec: str, task_name: str, overrides: dict, degrade: bool, mask,
    steps: int | None, seed: int, device: str, out: Path, written: list, method_kwargs: dict, progress: bool = True,
    adm_config: dict | None = None, dtype: str | None = None, tile: int | None = None, overlap: int | None = None,
) -> list[dict]:
    """Restore image files one by one and write PNGs + a JSON record per image into ``out``.

    ``images`` is a list of (path, tensor (3, H, W) in [-1, 1]). Every measurement is built before the
    first restoration, so an input the run cannot take stops it before any model runs. Every file
    written is appended to ``written`` so the caller can remove them if a later image fails.
    ``adm_config`` (the prior's ``--adm-config``, if any) and ``dtype`` (the network precision's name)
    go into the records; ``tile`` / ``overlap``: see ``restoration.run_method``.
    """
    from tqdm.auto import tqdm

    from diffrestore.progress import RestorationProgress
    from diffrestore.restoration import prepare_measurement, resolve_steps, restore_and_score

    stems = [p.stem for p, _ in images]
    if len(set(stems)) != len(stems):
        raise ValueError("two inputs share a file name stem; their outputs would overwrite each other")
    steps = resolve_steps(method, steps, prior)
    inputs = []
    for path, img in images:
        m = prepare_measurement(img, image_id=path.name, task_name=task_name, overrides=overrides, prior=prior,
                                degrade=degrade, mask=mask, seed=seed, device=device)
        if m.note is not None:
            print(f"{path.name}: {m.note}", file=sys.stderr)
        inputs.append((path, m))
    records = []
    for path, m in tqdm(inputs, desc="images", unit="img", disable=not progress or len(images) == 1):
        step_bar = RestorationProgress(f"{path.name} {method}", enabled=progress)
        result = restore_and_score(m, method=method, prior=prior, steps=steps, seed=seed, image_id=path.name,
                                   options=method_kwargs, tile=tile, overlap=overlap, callback=step_bar.step,
                                   on_tiles=step_bar.tiles, baseline=True)  # fmt: skip
        step_bar.close()
        record = {
            "input": str(path), "image_id": path.name, "method": method, "task": task_name, "prior": prior_spec,
            **({"adm_config": adm_config} if adm_config is not None else {}),
            "steps": result.steps, "options": result.options, "seed": seed, "sigma_y": result.task.sigma_y,
            "overrides": dict(overrides), "size": list(result.x_hat.shape[-2:]), "crop": result.note,
            "seconds": result.seconds, "device": str(device), **result.quality(),
            **({"dtype": dtype} if dtype is not None else {}),
        }  # fmt: skip
        records.append(_write_result(out, path.stem, task_name, method, result, record, written))
    return records


def _write_result(out: Path, stem: str, task_name: str, method: str, result, record: dict, written: list) -> dict:
    """Write one restoration's PNGs (restored, spread map, with a clean image the degraded and clean ones)
    and its JSON record into ``out``; returns the record (with the spread's statistics)."""
    from diffrestore.restoration import STD_MAP_WHITE, std_map_image

    name = f"{stem}_{task_name}"
    files = {f"{name}_{method}.png": result.x_hat}
    if result.std is not None:
        files[f"{name}_{method}_std.png"] = std_map_image(result.std)
        record["sample_std"] = {**result.spread, "png_white": STD_MAP_WHITE}
    if result.x is not None:
        files[f"{name}_degraded.png"] = result.task.operator.to_image(result.y)
        files[f"{stem}_clean.png"] = result.x
    for file, tensor in files.items():
        image_io.write_image(out / file, tensor)
        written.append(out / file)
    image_io.atomic_write_json(out / f"{name}_{method}.json", record)
    written.append(out / f"{name}_{method}.json")
    return record
