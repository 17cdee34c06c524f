"""Open report.html in headless Chromium (Debian's) and check that it renders.

Skipped where no Chromium is installed, except in CI (``CI=true``), where a
missing browser is a failure: `.ci/run` installs it.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from pneumoscope.cli import main

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip


def _chromium() -> str:
    path = os.environ.get("PNEUMOSCOPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (apt-get install chromium)")
        pytest.skip("no Chromium installed")
    pytest.importorskip("playwright")
    return path


def test_report_renders_in_chromium(kaggle_tree, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    run, ev = tmp_path / "run", tmp_path / "ev"
    assert main(["-q", "train", str(kaggle_tree), "--out", str(run), "--epochs", "3", "--pretrained", "none", "--val-fraction", "0.3"]) == 0
    assert main(["-q", "evaluate", str(run), str(kaggle_tree), "--out", str(ev), "--bootstraps", "50"]) == 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            failed = []
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(Path(ev / "report.html").as_uri(), wait_until="load")
            images = page.evaluate("() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 900})
            first = page.locator(".gallery .zoom img").first
            small = first.bounding_box()
            first.click()
            big = first.bounding_box()
            page.screenshot(path=str(tmp_path / "report_zoomed.png"))
            first.click()
            closed = first.bounding_box()
            toc = page.evaluate("() => Array.from(document.querySelectorAll('nav.toc a')).map(a => !!document.querySelector(a.getAttribute('href')))")
        finally:
            browser.close()
    assert len(images) >= 5, images
    broken = [alt for alt, complete, w, h in images if not complete or w == 0 or h == 0]
    assert not broken, f"images that did not load: {broken}"
    assert not failed
    assert len(text) > 1000 and "Model card" in text
    m = json.loads((ev / "metrics.json").read_text())
    assert f"{m['threshold']:.4f}" in text
    assert big["width"] > 1.8 * small["width"], (small, big)  # a gallery figure opens near full window on click
    assert closed["width"] == small["width"]  # and closes on a second click
    assert len(toc) >= 6 and all(toc)  # every contents entry points at a section


def test_web_app_in_chromium_shows_result_and_heatmap(tmp_path):
    """A real browser uploads a real radiograph to `pneumoscope serve` and sees the result."""
    import socket
    import threading
    import time

    import uvicorn

    from pneumoscope.predict import Predictor
    from pneumoscope.serve import create_app
    from tests.conftest import CHEST_XRAY

    chromium = _chromium()
    if not (CHEST_XRAY / "MANIFEST.csv").is_file():
        pytest.skip("real data not available")
    from playwright.sync_api import sync_playwright

    run = tmp_path / "run"
    assert main(["-q", "train", str(CHEST_XRAY), "--out", str(run), "--limit", "40", "--epochs", "5"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Predictor.from_checkpoint(run)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        xray = sorted((CHEST_XRAY / "test" / "PNEUMONIA").iterdir())[0]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                assert "not a medical device" in page.inner_text("body")
                page.set_input_files("#file", str(xray))
                page.wait_for_selector("#result", state="visible", timeout=30_000)
                verdict = page.inner_text("#verdict")
                prob = float(page.inner_text("#prob"))
                page.wait_for_function("document.getElementById('heat').naturalWidth > 0", timeout=10_000)
                sizes = page.evaluate("() => ['base', 'heat'].map(id => document.getElementById(id).naturalWidth)")
                page.fill("#opacity", "80")
                page.dispatch_event("#opacity", "input")
                opacity = page.evaluate("() => getComputedStyle(document.getElementById('heat')).opacity")
                page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert verdict and 0.0 <= prob <= 1.0
    assert sizes == [224, 224]
    assert float(opacity) == pytest.approx(0.8)
