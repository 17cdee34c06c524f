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
        finally:
            browser.close()
    assert len(images) >= 5, images
    broken = [alt for alt, complete, w, h in images if not complete or w == 0 or h == 0]
    assert not broken, f"images that did not load: {broken}"
    assert not failed
    assert len(text) > 1000 and "Model card" in text
    m = json.loads((ev / "metrics.json").read_text())
    assert f"{m['threshold']:.4f}" in text
