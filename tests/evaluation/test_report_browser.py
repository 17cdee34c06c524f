"""Open report.html and the web page in headless Chromium (Debian's) and check what they show.

Skipped where no Chromium is installed, except in CI (``CI=true``), where a
missing browser is a failure: `.ci/run` installs it.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from pneumoscope.cli.main import main

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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
            toc = page.evaluate(
                "() => Array.from(document.querySelectorAll('nav.toc a')).map(a => !!document.querySelector(a.getAttribute('href')))"
            )
            # issue 20: the summary first, and the page fits a phone: no sideways scrolling, the main blocks seen and apart
            ARTIFACTS.mkdir(exist_ok=True)
            laid_out = {}
            for width, height in ((1280, 900), (390, 844)):
                page.set_viewport_size({"width": width, "height": height})
                page.goto(Path(ev / "report.html").as_uri(), wait_until="load")
                scroll_width = page.evaluate("() => document.documentElement.scrollWidth")
                laid_out[width] = (scroll_width, _boxes_and_shot(page, width, ARTIFACTS / f"report-{width}.png", REPORT_BLOCKS))
                page.screenshot(path=str(ARTIFACTS / f"report-{width}-top.png"))
            first_block = page.evaluate("() => document.querySelector('body > :not(h1)').id")
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
    assert first_block == "summary"
    for width, (scroll_width, boxes) in laid_out.items():
        assert scroll_width <= width, f"report.html scrolls sideways at {width} px ({scroll_width} px wide)"
        _assert_seen_and_apart(boxes, width)
    phone, desktop = laid_out[390][1], laid_out[1280][1]
    assert phone["summary"]["y"] < phone["metrics table"]["y"] < phone["figures"]["y"] < phone["gallery"]["y"]
    assert desktop["summary"]["y"] < 200  # the verdict is what one sees first


ARTIFACTS = Path(__file__).parents[1] / "artifacts"  # screenshots kept for people to look at (ignored by git)
KEY_ELEMENTS = {
    "model served": "#model",
    "drop zone": "#drop",
    "notice": "#notice",
    "worklist": "#worklist",
    "verdict": "#verdict",
    "radiograph": "#base",
    "heatmap": "#stack",
    "colour bar": "#colorbar",
}
NOT_ASSESSABLE_ELEMENTS = {k: v for k, v in KEY_ELEMENTS.items() if k not in ("heatmap", "colour bar")}
REPORT_BLOCKS = {
    "summary": "#summary",
    "contents": "nav.toc",
    "metrics table": "#metrics-table",
    "figures": "#figures",
    "gallery": ".gallery",
}

# For each element: is it there, inside the page's width, and is its centre what a click there would hit
# (not covered by another element)? Its box in page coordinates, for the overlap check.
SEEN = """sels => Object.fromEntries(Object.entries(sels).map(([name, sel]) => {
  const el = document.querySelector(sel);
  if (!el) return [name, null];
  el.scrollIntoView({block: "center", inline: "nearest"});
  const r = el.getBoundingClientRect();
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return [name, {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height, right: r.right, width: innerWidth,
                 shown: getComputedStyle(el).visibility === "visible" && r.width > 0 && r.height > 0,
                 onTop: !!hit && (hit === el || el.contains(hit))}];
}))"""

# worklist cells whose content is wider than the cell (it would run into the neighbour)
SPILLED = "() => [...document.querySelectorAll('#worklist th, #worklist td')].filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.textContent)"


def _serve(app):
    """Start ``app`` on a free loopback port in a thread; returns (base URL, stop())."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


def _assert_seen_and_apart(boxes: dict, width: int) -> None:
    missing = [name for name, b in boxes.items() if b is None or not b["shown"]]
    assert not missing, f"not visible at {width} px: {missing}"
    covered = [name for name, b in boxes.items() if not b["onTop"]]
    assert not covered, f"covered by another element at {width} px: {covered}"
    outside = [name for name, b in boxes.items() if b["x"] < 0 or b["right"] > width + 0.5]
    assert not outside, f"wider than the {width} px window: {outside}"
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p, q = boxes[a], boxes[b]
            dx = min(p["x"] + p["w"], q["x"] + q["w"]) - max(p["x"], q["x"])
            dy = min(p["y"] + p["h"], q["y"] + q["h"]) - max(p["y"], q["y"])
            assert dx <= 0.5 or dy <= 0.5, f"{a} and {b} overlap at {width} px: {p} {q}"


def test_web_page_worklist_seen_at_desktop_and_phone_widths(small_real_run, tmp_path):
    """A real browser uploads real radiographs (and a blank picture and a text file) to the app of a real run, as a person would:
    the worklist sorts by probability and answers the keyboard, the blank one reads "Cannot assess: <reason>", and at
    1280 and 390 px the key elements are visible, on top and apart. The page names the model, says on its status line why
    a file was refused, shows no probability bar for an error and downloads the worklist as CSV. Screenshots: tests/artifacts/."""
    import csv
    import io

    import numpy as np
    from PIL import Image

    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.serving.app import create_app, run_name
    from tests.conftest import CHEST_XRAY

    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    xrays = [f for c in ("NORMAL", "PNEUMONIA") for f in sorted((CHEST_XRAY / "test" / c).iterdir())[:3]]
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((400, 400), 128, np.uint8)).save(blank)
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"not an image")  # gets an error row, the others still their results
    uploads = [*xrays, blank, notes]
    big = tmp_path / "big.png"
    big.write_bytes(b"")
    os.truncate(big, 36 * 2**20)  # the 36 MB upload: over the limit, refused by the page before it is sent
    ARTIFACTS.mkdir(exist_ok=True)
    predictor = Predictor.from_checkpoint(small_real_run)
    url, stop = _serve(create_app(predictor, model_name=run_name(small_real_run)))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                requests = []
                page.on("request", lambda r: requests.append(r.url))
                console = []  # a blocked inline script or style, a failed load, a script error
                page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda err: console.append(str(err)))
                page.goto(url + "/")
                page.keyboard.press("Tab")  # the first stop is the file chooser
                chooser_focused = page.evaluate("() => document.activeElement.id")
                favicon = page.evaluate("() => fetch('/favicon.ico').then(r => [r.status, r.headers.get('content-type')])")
                page.set_input_files("#file", [str(p) for p in uploads])
                _wait(page, f"() => document.querySelectorAll('#rows tr:not(.wait)').length === {len(uploads)}", 60)
                _wait(page, "() => document.getElementById('heat').naturalWidth > 0")
                status = page.inner_text("#status")
                model_named = page.inner_text("#model")
                sizes = page.evaluate("() => ['base', 'heat'].map(id => document.getElementById(id).naturalWidth)")
                first_verdict = page.inner_text("#verdict")

                page.click("#sortprob")
                down = [float(t) for t in page.locator("#rows td.num").all_inner_texts() if t != "–"]
                page.click("#sortprob")
                up = [float(t) for t in page.locator("#rows td.num").all_inner_texts() if t != "–"]

                # keyboard only: a row is chosen with Enter and the arrows
                page.focus("#rows tr:first-child .rowbtn")
                page.keyboard.press("Enter")
                first = page.inner_text("#fname")
                page.keyboard.press("ArrowDown")
                second = page.inner_text("#fname")
                focused_row = page.evaluate("() => document.activeElement.textContent")

                page.click(f".rowbtn[title='{blank.name}']")
                blank_verdict, blank_row = page.inner_text("#verdict"), page.inner_text("#rows tr.na")
                blank_verdict_class = page.get_attribute("#verdict", "class")
                _wait(page, "() => document.getElementById('base').complete")
                blank_heat, blank_note = page.is_visible("#stack") or page.is_visible("#colorbar"), page.inner_text("#camnote")
                # not assessable: no heatmap and no colour bar, the rest laid out as for any result
                not_assessable = _boxes_and_shot(page, 1280, ARTIFACTS / "web-desktop-cannot-assess.png", NOT_ASSESSABLE_ELEMENTS)
                page.click(f".rowbtn[title='{xrays[0].name}']")
                _wait(page, "() => document.getElementById('heat').complete")
                page.fill("#opacity", "70")
                page.dispatch_event("#opacity", "input")
                opacity = page.evaluate("() => getComputedStyle(document.getElementById('heat')).opacity")
                desktop = _boxes_and_shot(page, 1280, ARTIFACTS / "web-desktop.png")
                spilled = {1280: page.evaluate(SPILLED)}

                page.click(f".rowbtn[title='{notes.name}']")
                error_text, error_views = page.inner_text("#verdict"), page.is_visible("#base")
                error_meter = page.is_visible("#meter") or page.is_visible("#meterlegend")
                page.screenshot(path=str(ARTIFACTS / "web-desktop-error.png"), full_page=True)
                shown_order = page.locator("#rows .rowbtn").all_inner_texts()
                with page.expect_download() as download:
                    page.click("#csv")
                csv_text = Path(download.value.path()).read_bytes().decode()
                csv_built = page.evaluate("() => worklistCsv()")
                csv_name = download.value.suggested_filename
                page.click(f".rowbtn[title='{xrays[-1].name}']")
                _wait(page, "() => document.getElementById('heat').complete")
                page.screenshot(path=str(ARTIFACTS / "web-desktop-result.png"), full_page=True)
                page.set_viewport_size({"width": 390, "height": 844})
                phone = _boxes_and_shot(page, 390, ARTIFACTS / "web-phone.png")
                page.click(f".rowbtn[title='{blank.name}']")  # the one that cannot be assessed, on a phone
                phone_not_assessable = _boxes_and_shot(page, 390, ARTIFACTS / "web-phone-cannot-assess.png", NOT_ASSESSABLE_ELEMENTS)
                scroll_width = page.evaluate("() => document.documentElement.scrollWidth")
                spilled[390] = page.evaluate(SPILLED)
                page.click(f".rowbtn[title='{xrays[-1].name}']")
                _wait(page, "() => document.getElementById('heat').complete")
                page.screenshot(path=str(ARTIFACTS / "web-phone-result.png"), full_page=True)
                phone_verdict = page.inner_text("#verdict")

                page.set_input_files("#file", [str(big)])  # alone: nothing is sent, the row and the status line say why
                _wait(page, "() => document.querySelectorAll('#rows tr.err').length === 2")
                big_status = page.inner_text("#status")
                page.click(f".rowbtn[title='{big.name}']")
                phone_error_meter = page.is_visible("#meter") or page.is_visible("#meterlegend")
                page.screenshot(path=str(ARTIFACTS / "web-phone-error.png"), full_page=True)
                csv_after = page.evaluate("() => worklistCsv()")
            finally:
                browser.close()
    finally:
        stop()
    print(f"screenshots in {ARTIFACTS}")
    assert favicon[0] == 200 and favicon[1].startswith("image/svg+xml")
    # issue 20: the refusal's reason on the status line (it said only "1 could not be read"), no empty bar on an error
    assert status.startswith(f"{len(uploads) - 1} of {len(uploads)} analysed; 1 could not be read: {notes.name}: "), status
    assert "not a readable image" in status and status.endswith(error_text), (status, error_text)
    assert big_status == (
        f"0 of 1 analysed; 1 could not be read: {big.name} is {36 * 2**20:,} bytes; the limit is {20 * 2**20:,} bytes "
        "per request. Send a smaller file."
    ), big_status
    assert "not a readable image" in error_text and not error_views and not error_meter and not phone_error_meter
    # the model served is named: its run, backbone and threshold
    assert model_named == f"Model: {small_real_run.name} (efficientnet_lite0) · threshold {predictor.threshold:.3f}", model_named
    # the worklist as CSV: one row per file, in the order shown, with the fields a row has
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert csv_name.endswith(".csv") and csv_text == csv_built and csv_text.startswith("file,prob,label,threshold,ood_reason,error\r\n")
    assert [r["file"] for r in rows] == shown_order and len(rows) == len(uploads)
    by_name = {r["file"]: r for r in rows}
    assert by_name[notes.name]["prob"] == "" and "not a readable image" in by_name[notes.name]["error"]
    assert by_name[blank.name]["label"] == "" and "blank" in by_name[blank.name]["ood_reason"] and float(by_name[blank.name]["prob"]) >= 0
    assert all(by_name[x.name]["label"] in ("NORMAL", "PNEUMONIA") and 0 <= float(by_name[x.name]["prob"]) <= 1 for x in xrays)
    assert all(float(r["threshold"]) == pytest.approx(predictor.threshold) for r in rows)
    after = list(csv.DictReader(io.StringIO(csv_after)))
    assert len(after) == len(uploads) + 1 and "bytes; the limit is" in after[-1]["error"]
    assert sizes == [224, 224] and float(opacity) == pytest.approx(0.7)
    assert "P(pneumonia) = " in first_verdict and "threshold" in first_verdict
    assert len(down) == len(uploads) - 1 and down == sorted(down, reverse=True) and up == sorted(up)  # the error row last, "–"
    assert chooser_focused == "file"
    assert first != second and focused_row == second
    # issue 20: a flagged image gets no diagnosis, in neutral colours, and no heatmap of a decision it does not have
    assert blank_verdict.startswith("Cannot assess: ") and "blank" in blank_verdict and "NORMAL" not in blank_verdict, blank_verdict
    assert blank_verdict_class == "verdict na" and "Cannot assess" in blank_row and not blank_heat and "no decision" in blank_note
    assert "P(pneumonia) = " in phone_verdict and ("suspected" in phone_verdict or "Below threshold" in phone_verdict)
    _assert_seen_and_apart(desktop, 1280)
    _assert_seen_and_apart(phone, 390)
    _assert_seen_and_apart(not_assessable, 1280)
    _assert_seen_and_apart(phone_not_assessable, 390)
    assert spilled == {1280: [], 390: []}, f"worklist cells whose text runs into the next: {spilled}"
    assert scroll_width <= 390, f"the page scrolls sideways at 390 px ({scroll_width} px wide)"
    # beside the image and not below it at desktop width; one column on a phone
    assert abs(desktop["radiograph"]["y"] - desktop["heatmap"]["y"]) < 2 and desktop["radiograph"]["x"] < desktop["heatmap"]["x"]
    assert phone["heatmap"]["y"] > phone["radiograph"]["y"] + phone["radiograph"]["h"] - 1
    # notes.png costs no console error: its batch answers 200, with an error row for it
    assert not console, f"errors in the browser console: {console}"
    strangers = [u for u in requests if not u.startswith((url + "/", "data:"))]
    assert not strangers, f"the page asked another host: {strangers}"


def _wait(page, predicate: str, timeout_s: float = 10) -> None:
    """page.wait_for_function evaluates a string, which the page's CSP (no 'unsafe-eval') refuses; poll instead."""
    import time

    deadline = time.monotonic() + timeout_s
    while not page.evaluate(predicate):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {predicate}"
        time.sleep(0.1)


def _boxes_and_shot(page, width: int, path: Path, elements: dict = KEY_ELEMENTS) -> dict:
    boxes = page.evaluate(SEEN, elements)
    page.evaluate("() => scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    return boxes


@pytest.mark.slow
def test_web_page_of_a_three_class_run_shows_each_class_as_a_bar(tmp_path):
    """Issue 22: an N-class model's result on the page: the screening verdict names the class decided and P(not normal),
    and each class's probability is a bar, most probable first; screenshot: tests/artifacts/web-three-class.png."""
    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.serving.app import create_app
    from tests.conftest import make_three_class_tree

    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    tree = make_three_class_tree(tmp_path / "cx", n_patients=6, per_patient=1)
    run = tmp_path / "run"
    assert main(["-q", "train", str(tree), "--out", str(run), "--classes", "auto", "--pretrained", "none", "--epochs", "5"]) == 0
    uploads = sorted((tree / "test" / "COVID").glob("*.png"))[:2]
    ARTIFACTS.mkdir(exist_ok=True)
    url, stop = _serve(create_app(Predictor.from_checkpoint(run)))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                console = []
                page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
                page.goto(url + "/")
                page.set_input_files("#file", [str(p) for p in uploads])
                _wait(page, f"() => document.querySelectorAll('#rows tr:not(.wait)').length === {len(uploads)}", 60)
                page.click(".rowbtn")
                _wait(page, "() => !document.getElementById('classbars').hidden")
                bars = page.locator("#classbars .classbar").all_inner_texts()
                verdict = page.inner_text("#verdict")
                legend = page.inner_text("#meterlegend")
                boxes = page.evaluate(SEEN, {"class bars": "#classbars", "verdict": "#verdict", "meter": "#meter"})
                page.screenshot(path=str(ARTIFACTS / "web-three-class.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop()
    names = [b.split("\n")[0].strip() for b in bars]
    values = [float(b.split()[-1]) for b in bars]
    assert sorted(names) == ["COVID", "NORMAL", "PNEUMONIA"] and values == sorted(values, reverse=True)
    assert abs(sum(values) - 1) < 0.01
    assert "p(not normal)" in verdict.lower() and "p(not normal)" in legend.lower()
    _assert_seen_and_apart(boxes, 1280)
    assert not console, console
