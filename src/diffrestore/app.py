"""``diffrestore app``: a local web page to restore a photo (Gradio, an optional extra).

Upload an image, say what is wrong with it (or pick the exact task), choose method, prior, steps,
seed and samples; the page shows a before/after comparison, the per-pixel spread of the samples
when there are several, progress per diffusion step, and offers the result and its JSON record for
download. Errors appear in the page as the CLI's one-line messages. Models are loaded once and
cached; one job runs at a time (a CPU has no room for two).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["PROBLEMS", "RestoreJob", "build_app", "launch", "missing_gradio_message"]

#: what a person says is wrong with a photo -> (task, task parameters)
PROBLEMS: dict[str, tuple[str, dict]] = {
    "low resolution (upscale 4x)": ("upscale", {}),
    "blurry": ("deblur", {}),
    "noisy": ("denoise", {}),
    "noisy and low resolution (upscale 4x)": ("upscale-noisy", {}),
    "missing pixels (random half)": ("inpaint", {}),
    "grey (colourize)": ("colorize", {}),
}
EXACT_TASK = "(from the problem above)"

#: largest restored image the page accepts, in pixels: a 1024x1024 output takes minutes on a CPU
DEFAULT_MAX_OUTPUT_PIXELS = 1024 * 1024


def missing_gradio_message() -> str | None:
    """None when Gradio is importable, else how to install it (one line)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        return 'the web app needs Gradio: pip install -e ".[app]" (or pip install gradio)'
    return None


class RestoreJob:
    """The page's one action, apart from Gradio so it can be tested directly: check the inputs,
    restore, write the downloads. Returns (before, after, std map or None, files, message)."""

    def __init__(self, *, device: str = "cpu", dtype: str | None = None, max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS):
        self.device, self.dtype, self.max_output_pixels = device, dtype, max_output_pixels
        self.out_root = Path(tempfile.mkdtemp(prefix="diffrestore-app-"))
        self.jobs = 0

    def task_of(self, problem: str, exact_task: str) -> tuple[str, dict]:
        if exact_task and exact_task != EXACT_TASK:
            return exact_task, {}
        if problem not in PROBLEMS:
            raise ValueError(f"unknown problem {problem!r}")
        return PROBLEMS[problem]

    def check_size(self, path: str, task: str, overrides: dict) -> None:
        """Refuse an image whose restoration would exceed ``max_output_pixels`` (read from the header)."""
        from diffrestore.operators.tasks import measurement_factor
        from diffrestore.resources import image_size

        w, h = image_size(path)
        factor = measurement_factor(task, **overrides)
        if w * h * factor * factor > self.max_output_pixels:
            raise ValueError(
                f"the restored image would be {w * factor}x{h * factor}, over this page's limit of "
                f"{self.max_output_pixels:,} pixels; use a smaller image or the CLI (diffrestore restore)"
            )

    def __call__(self, path, problem, exact_task, method, prior, steps, seed, samples, progress=None):
        from diffrestore.api import run

        if not path:
            return None, None, None, None, "diffrestore: error: upload an image first"
        try:
            task, overrides = self.task_of(problem, exact_task)
            self.check_size(path, task, overrides)

            def on_step(info):
                if progress is not None:
                    progress((int(info["i"]) + 1, int(info["steps"])), desc=f"{method} step")

            result = run(
                path, task=task, method=method, prior=(prior or None), steps=int(steps), seed=int(seed),
                samples=int(samples), device=self.device, dtype=self.dtype, callback=on_step, **overrides,
            )  # fmt: skip
        except (ValueError, FileNotFoundError, PermissionError, FloatingPointError, MemoryError) as e:
            return None, None, None, None, f"diffrestore: error: {e}"
        files = self._write(path, task, method, result)
        before = _upsampled_input(path, result.image.size)
        message = f"restored: {method} on {task}, {result.record['size'][1]}x{result.record['size'][0]} in {result.record['seconds']:.1f} s"
        return (before, result.image), result.image, result.std_map, files, message

    def preview(self, path):
        """The uploaded image for the page, or a one-line error for a file that is not one."""
        from PIL import Image

        from diffrestore.image_io import read_image, tensor_to_uint8

        if not path:
            return None, ""
        try:
            return Image.fromarray(tensor_to_uint8(read_image(path))), ""
        except ValueError as e:
            return None, f"diffrestore: error: {e}"

    def _write(self, path, task, method, result) -> list[str]:
        from diffrestore.image_io import atomic_write_json

        self.jobs += 1
        folder = self.out_root / f"job{self.jobs}"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{Path(path).stem}_{task}_{method}"
        files = [folder / f"{stem}.png", folder / f"{stem}.json"]
        result.image.save(files[0])
        atomic_write_json(files[1], {"input": Path(path).name, **result.record})
        if result.std_map is not None:
            files.append(folder / f"{stem}_std.png")
            result.std_map.save(files[-1])
        return [str(f) for f in files]


def _upsampled_input(path: str, size: tuple[int, int]):
    """The input at the output's size (bicubic), so the before/after slider lines up."""
    from PIL import Image

    from diffrestore.image_io import pil_to_rgb

    with Image.open(path) as img:
        rgb = pil_to_rgb(img)
    return rgb if rgb.size == size else rgb.resize(size, Image.BICUBIC)


def build_app(job: RestoreJob):
    """The Gradio page around ``job``."""
    import gradio as gr

    from diffrestore.methods import METHODS
    from diffrestore.operators.tasks import task_names

    with gr.Blocks(title="diffrestore") as page:
        gr.Markdown("## diffrestore: restore a photo with a diffusion model\nRuns on this computer; nothing is uploaded anywhere.")
        with gr.Row():
            with gr.Column():
                # a file box, not an image box: an unreadable upload then reaches our reader and its one-line error
                image = gr.File(label="your image", file_types=["image"], type="filepath", elem_id="input-file")
                preview = gr.Image(label="input", interactive=False, elem_id="input-preview", height=160)
                problem = gr.Dropdown(list(PROBLEMS), value="noisy", label="what is wrong with it?", elem_id="problem")
                with gr.Accordion("method, steps, samples", open=False, elem_id="settings"):
                    exact = gr.Dropdown([EXACT_TASK, *task_names()], value=EXACT_TASK, label="exact task")
                    method = gr.Dropdown(list(METHODS), value="ddrm", label="method", elem_id="method")
                    prior = gr.Textbox("", label="prior (empty: the built-in default; or builtin:NAME, a checkpoint path)")
                    steps = gr.Slider(1, 100, value=20, step=1, label="steps", elem_id="steps")
                    seed = gr.Number(0, precision=0, label="seed")
                    samples = gr.Slider(1, 8, value=1, step=1, label="samples (> 1: the mean, and where they disagree)", elem_id="samples")
                go = gr.Button("Restore", variant="primary", elem_id="restore-button")
            with gr.Column():
                status = gr.Markdown("", elem_id="status")
                compare = gr.ImageSlider(label="before / after", elem_id="compare")
                result = gr.Image(label="restored", elem_id="result-image", interactive=False)
                spread = gr.Image(label="uncertainty: spread of the samples (white: std 0.1 or more)", elem_id="std-image", interactive=False)
                files = gr.File(label="download", file_count="multiple", elem_id="downloads", interactive=False)

        def restore(path, problem, exact, method, prior, steps, seed, samples, progress=gr.Progress()):
            return job(path, problem, exact, method, prior, steps, seed, samples, progress=progress)

        image.change(job.preview, [image], [preview, status])
        go.click(restore, [image, problem, exact, method, prior, steps, seed, samples], [compare, result, spread, files, status])
    return page.queue(default_concurrency_limit=1)


def launch(*, host: str = "127.0.0.1", port: int = 7860, share: bool = False, device: str = "cpu", dtype=None, max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS) -> None:
    """Serve the page until interrupted."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    job = RestoreJob(device=device, dtype=dtype, max_output_pixels=max_output_pixels)
    build_app(job).launch(server_name=host, server_port=port, share=share, show_error=True)

