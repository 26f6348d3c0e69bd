"""The web app in a real browser: `diffrestore app` started on a free local port, driven by headless
Chromium (Debian's package) through Playwright. Skips, saying why, where Gradio, Playwright or the
browser is missing (`.ci/run` installs all three)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = os.environ.get("DIFFRESTORE_APP_SCREENSHOT")  # where to keep the page's picture, if set

pytest.importorskip("gradio", reason='the app extra is not installed (pip install -e ".[app]")')
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "diffrestore", "app", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server)
        page.wait_for_selector("#restore-button", timeout=60_000)
        page.locator("#settings").get_by_text("method, steps, samples").click()
        yield page
        browser.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A real photo (scikit-image's bundled astronaut), 40x32: a few seconds per step on a CPU."""
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((40, 32), Image.BILINEAR).save(path)
    return path


def _set(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _upload(page, path: Path) -> None:
    """Put ``path`` in the file box, clearing the previous upload first (as a person would)."""
    clear = page.locator("#input-file button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
        page.wait_for_selector("#input-file input[type=file]", state="attached", timeout=10_000)
    page.locator("#input-file input[type=file]").set_input_files(str(path))


def _status_changes(page, before: str, timeout_ms: int = 300_000) -> str:
    """The next final message of the page (a result or an error), not the progress shown meanwhile."""
    page.wait_for_function(
        """b => { const s = document.querySelector('#status'); if (!s) return false; const t = s.innerText.trim();
                  return t !== b.trim() && (t.startsWith('restored:') || t.startsWith('diffrestore: error:')); }""",
        arg=before, timeout=timeout_ms,
    )  # fmt: skip
    return page.locator("#status").inner_text().strip()


def _shown_image(page, elem_id: str) -> np.ndarray:
    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def test_restores_a_photo_and_shows_the_uncertainty_map(page, photo, tmp_path):
    _set(page, "steps", 2)
    _set(page, "samples", 2)
    _upload(page, photo)
    page.wait_for_selector("#input-preview img", timeout=30_000)
    before = page.locator("#status").inner_text()
    page.click("#restore-button")
    status = _status_changes(page, before)
    assert status.startswith("restored: ddrm on denoise"), status
    restored = _shown_image(page, "result-image")
    assert restored.shape == (32, 40, 3)
    assert np.abs(restored.astype(int) - np.asarray(Image.open(photo)).astype(int)).mean() > 1.0
    spread = _shown_image(page, "std-image")
    assert spread.shape[:2] == (32, 40) and spread.max() > 0
    names = page.locator("#downloads").inner_text().replace("\n", "")
    for name in ("astronaut_denoise_ddrm.png", "astronaut_denoise_ddrm.json", "astronaut_denoise_ddrm_std.png"):
        assert name in names, names
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)


@pytest.mark.parametrize("kind", ["text file", "one pixel"])
def test_a_bad_upload_shows_one_line_and_the_app_keeps_serving(page, photo, tmp_path, kind):
    bad = tmp_path / ("notes.png" if kind == "text file" else "dot.png")
    if kind == "text file":
        bad.write_text("this is not an image")
    else:
        Image.new("RGB", (1, 1), (200, 10, 10)).save(bad)
    _set(page, "samples", 1)
    before = page.locator("#status").inner_text()
    _upload(page, bad)
    if kind == "one pixel":  # readable, so the error comes when it is restored
        page.wait_for_selector("#input-preview img", timeout=30_000)
        page.click("#restore-button")
    status = _status_changes(page, before)
    assert status.startswith("diffrestore: error:") and "\n" not in status, status
    # still serving: a good photo restores after the bad one
    _upload(page, photo)
    page.wait_for_selector("#input-preview img", timeout=30_000)
    page.click("#restore-button")
    assert _status_changes(page, status).startswith("restored: ddrm on denoise")
