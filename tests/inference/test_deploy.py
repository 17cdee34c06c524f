"""One inference path: OOD guard, batch vs single, ONNX export and parity, the web app API."""

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from pneumoscope.cli.main import main
from pneumoscope.inference.predictor import Predictor
from tests.conftest import PROB_ATOL
from tests.dicom_util import write_dicom


@pytest.fixture(scope="module")
def run(small_real_run):
    return small_real_run


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_checkpoint(run)


def _test_images(n_per_class=10):
    from tests.conftest import CHEST_XRAY

    return [f for c in ("NORMAL", "PNEUMONIA") for f in sorted((CHEST_XRAY / "test" / c).iterdir())[:n_per_class]]


def test_batch_and_single_image_predictions_agree(predictor):
    images = [predictor.read(p) for p in _test_images(4)]
    batch, dist_b = predictor.run(images, batch_size=8)
    single = [predictor.run([im]) for im in images]
    np.testing.assert_allclose(batch, [s[0][0] for s in single], atol=1e-5)
    np.testing.assert_allclose(dist_b, [s[1][0] for s in single], rtol=1e-4)


def test_ood_guard_flags_photos_noise_and_blank_but_not_radiographs(predictor):
    rng = np.random.default_rng(0)
    gray = lambda rgb: rgb.astype(np.float32).mean(axis=2) / 255  # noqa: E731
    strangers = {
        "cat": gray(skdata.chelsea()),
        "coffee": gray(skdata.coffee()),
        "astronaut": gray(skdata.astronaut()),
        "noise": rng.uniform(size=(256, 256)).astype(np.float32),
        "blank": np.zeros((256, 256), np.float32),
        "white": np.ones((256, 256), np.float32),
    }
    preds = predictor.predict_images(list(strangers.values()), list(strangers))
    assert all(p.ood for p in preds), [(p.path, p.ood_distance) for p in preds]
    # not assessable: no diagnosis, and the reason in words (issue 20: a portrait read "Suspected", a cat "NORMAL")
    assert all(p.label is None and not p.assessable and p.ood_reason and p.prob is not None for p in preds), preds
    assert any("out-of-distribution score" in p.ood_reason for p in preds)  # the guard's own reason, not only the screen's
    xrays = predictor.predict_inputs(_test_images(10))
    assert sum(p.ood for p in xrays) <= 1  # the guard's cut-off is the 99th percentile on validation
    assert all((p.label is None) == bool(p.ood) for p in xrays)


def test_prediction_carries_the_ood_flag_in_cli_output(run, tmp_path, capsys):
    path = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()).save(path)
    assert main(["-q", "predict", str(run), str(path), "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["ood"] is True and row["ood_distance"] > 0 and row["label"] is None and "cut-off" in row["ood_reason"]


def test_dicom_predicts_like_the_same_picture(predictor, tmp_path):
    src = _test_images(1)[0]
    image = predictor.read(src)
    stored = np.rint(image * 4095)
    dcm = write_dicom(tmp_path / "x.dcm", stored, window=(2047.5, 4096))  # the full 12-bit range, no stretch
    a, b = predictor.predict_inputs([src, dcm])
    assert abs(a.prob - b.prob) < 0.02


@pytest.mark.slow
def test_onnx_export_matches_pytorch(run, tmp_path, capsys, predictor):
    out = tmp_path / "model.onnx"
    images = [str(p) for p in _test_images(3)]
    assert main(["-q", "export", str(run), "--out", str(out), "--check-images", *images]) == 0
    assert "max |delta prob|" in capsys.readouterr().out
    onnx_pred = Predictor.from_onnx(out)
    assert onnx_pred.threshold == predictor.threshold and onnx_pred.preprocessing == predictor.preprocessing
    decoded = [predictor.read(p) for p in _test_images(5)]
    pa, da = predictor.run(decoded)
    pb, db = onnx_pred.run(decoded)
    assert np.max(np.abs(pa - pb)) <= 1e-4
    np.testing.assert_allclose(da, db, rtol=1e-3)
    # the CLI predicts from the .onnx as well
    assert main(["-q", "predict", str(out), images[0], "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert abs(row["prob"] - float(pa[0])) <= 1e-4
    # an existing file is not replaced silently
    assert main(["-q", "export", str(run), "--out", str(out)]) == 2
    # the file names no folder of the machine that made it (the exporter's stack traces did: /home/USER/...)
    import pneumoscope

    assert str(Path(pneumoscope.__file__).parent).encode() not in out.read_bytes()


# --------------------------------------------------------------------------- web app


@pytest.fixture(scope="module")
def client(predictor):
    from fastapi.testclient import TestClient

    from pneumoscope.serving.app import create_app

    return TestClient(create_app(predictor, max_upload_bytes=300_000), base_url="http://127.0.0.1")


def test_health_and_openapi(client):
    health = client.get("/health").json()
    assert (
        health["status"] == "ok" and health["ood_guard"] is True and health["model"] == "efficientnet_lite0"
    )  # no name given: the backbone
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    # FastAPI's /docs and /redoc load their scripts from a CDN (blank offline): not served
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_page_is_served_without_any_cdn(client):
    html = client.get("/").text
    assert "not a medical device" in html and 'id="opacity"' in html
    assert "http://" not in html and "https://" not in html
    icon = client.get("/favicon.ico")  # browsers ask for it unasked; the page names /favicon.svg
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert client.get("/favicon.svg").content == icon.content and b"<svg" in icon.content


def test_predict_endpoint_returns_probability_flag_and_heatmap(client, predictor):
    path = _test_images(1)[0]
    res = client.post("/predict?heatmap=true", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert res.status_code == 200, res.text
    body = res.json()
    expected = predictor.predict_inputs([path])[0]
    assert abs(body["prob"] - expected.prob) <= PROB_ATOL and body["label"] == expected.label
    assert body["threshold"] == predictor.threshold and body["ood"] is False
    heat = Image.open(io.BytesIO(__import__("base64").b64decode(body["heatmap_png"])))
    assert heat.size == (224, 224)


def test_predict_accepts_dicom(client, predictor, tmp_path):
    image = predictor.read(_test_images(1)[0])
    dcm = write_dicom(tmp_path / "a.dcm", np.rint(image * 4095))
    res = client.post("/predict", files={"file": ("a.dcm", dcm.read_bytes(), "application/dicom")})
    assert res.status_code == 200 and res.json()["label"] in ("NORMAL", "PNEUMONIA")


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:2000]


@pytest.mark.parametrize(
    "payload,name,status",
    [
        (b"x" * 400_000, "big.png", 413),
        (b"this is not an image", "notes.png", 415),
        (b"", "empty.jpeg", 422),
        (_truncated_jpeg(), "cut.jpeg", 422),
    ],
)
def test_bad_uploads_get_clear_errors(client, payload, name, status):
    res = client.post("/predict", files={"file": (name, payload, "application/octet-stream")})
    assert res.status_code == status, res.text
    assert name in res.json()["detail"] or status == 413


@pytest.mark.parametrize(
    "kind,reason,status",
    [
        ("unsupported", "a format no decoder here reads", 415),
        ("damaged", "not a readable image, in words only", 422),  # the status follows the kind, not the message text
    ],
)
def test_an_unreadable_upload_gets_the_status_of_its_error_kind(client, predictor, monkeypatch, kind, reason, status):
    from pneumoscope.errors import ImageReadError

    def read(name, data=None, **kw):
        raise ImageReadError(name, reason, "Fix it.", kind=kind)

    monkeypatch.setattr(predictor, "read", read)
    res = client.post("/predict", files={"file": ("x.png", b"whatever", "application/octet-stream")})
    assert res.status_code == status and res.json()["detail"] == f"x.png: {reason}. Fix it."


def test_concurrent_requests_are_served_safely(client):
    from concurrent.futures import ThreadPoolExecutor

    paths = _test_images(4)
    expected = {p.name: client.post("/predict", files={"file": (p.name, p.read_bytes())}).json()["prob"] for p in paths}

    def one(p):
        return p.name, client.post("/predict", files={"file": (p.name, p.read_bytes())}).json()["prob"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, paths * 3))
    assert all(abs(prob - expected[name]) <= PROB_ATOL for name, prob in results)


def test_heatmap_only_when_asked_and_the_page_asks(client):
    path = _test_images(1)[0]
    plain = client.post("/predict", files={"file": (path.name, path.read_bytes())}).json()
    assert "heatmap_png" not in plain and plain["image_png"]
    assert "/predict/batch?heatmap=true" in client.get("/app.js").text


def test_batch_endpoint_answers_each_file_in_order(client, predictor):
    paths = _test_images(2)[:3]
    files = [("files", (p.name, p.read_bytes())) for p in paths[:2]] + [("files", ("notes.png", b"not an image"))]
    files.append(("files", (paths[2].name, paths[2].read_bytes())))
    res = client.post("/predict/batch", files=files)
    assert res.status_code == 200, res.text
    results = res.json()["results"]
    assert [r["path"] for r in results] == [paths[0].name, paths[1].name, "notes.png", paths[2].name]
    expected = predictor.predict_inputs(paths[:3])
    assert all(abs(r["prob"] - e.prob) < 1e-5 for r, e in zip([results[0], results[1], results[3]], expected, strict=True))
    assert results[2]["prob"] is None and results[2]["status"] == 415 and "not a readable image" in results[2]["error"]
    too_many = [("files", (f"{i}.png", b"x")) for i in range(17)]
    assert client.post("/predict/batch", files=too_many).status_code == 413


def test_uploads_are_forward_passed_together(predictor):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from pneumoscope.serving.app import create_app

    app = create_app(predictor, batch_wait_s=0.3)
    paths = _test_images(4)
    with TestClient(app, base_url="http://127.0.0.1") as client, ThreadPoolExecutor(8) as pool:
        probs = list(pool.map(lambda p: client.post("/predict", files={"file": (p.name, p.read_bytes())}).json()["prob"], paths))
    assert max(app.state.batcher.batches) > 1, app.state.batcher.batches
    np.testing.assert_allclose(probs, [p.prob for p in predictor.predict_inputs(paths)], atol=1e-5)


def test_full_queue_answers_503_with_retry_after(predictor, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from pneumoscope.serving.app import create_app

    entered, release = threading.Semaphore(0), threading.Event()
    read = predictor.read

    def slow_read(name, data=None):
        entered.release()
        release.wait(30)
        return read(name, data)

    monkeypatch.setattr(predictor, "read", slow_read)
    client = TestClient(create_app(predictor, max_pending=2, decode_workers=2), base_url="http://127.0.0.1")
    path = _test_images(1)[0]
    post = lambda: client.post("/predict", files={"file": (path.name, path.read_bytes())})  # noqa: E731
    with ThreadPoolExecutor(2) as pool:
        admitted = [pool.submit(post) for _ in range(2)]
        try:
            assert entered.acquire(timeout=30) and entered.acquire(timeout=30)  # both are decoding
            busy = post()
        finally:
            release.set()
        assert [f.result().status_code for f in admitted] == [200, 200]
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
    assert post().status_code == 200  # the slots come back


def _tempfile_spy(monkeypatch, tmp_path):
    """Point the temporary folder at an empty one and record every temporary file made."""
    import tempfile

    made = []
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "SpooledTemporaryFile"):
        original = getattr(tempfile, name)
        monkeypatch.setattr(tempfile, name, lambda *a, _f=original, _n=name, **k: made.append(_n) or _f(*a, **k))
    return folder, made


def test_uploads_stay_in_memory_and_the_cap_holds_while_streaming(predictor, monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    from pneumoscope.serving.app import create_app

    folder, made = _tempfile_spy(monkeypatch, tmp_path)
    client = TestClient(create_app(predictor, max_upload_bytes=3_000_000), base_url="http://127.0.0.1")
    image = predictor.read(_test_images(1)[0])
    big = np.rint(np.asarray(Image.fromarray(image).resize((1100, 1100))) * 4095)
    dcm = write_dicom(tmp_path / "big.dcm", big).read_bytes()  # 2.4 MB: Starlette's form parser would spool it to disk
    assert len(dcm) > 2_000_000
    ok = client.post("/predict", files={"file": ("big.dcm", dcm, "application/dicom")})
    assert ok.status_code == 200, ok.text

    boundary = "pneumoscope-test"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="huge.png"\r\n\r\n'.encode()

    def chunks():  # no Content-Length: chunked transfer encoding
        yield head
        for _ in range(80):
            yield b"\0" * 65536  # 5 MB in all
        yield f"\r\n--{boundary}--\r\n".encode()

    res = client.post("/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert res.status_code == 413 and "3,000,000" in res.json()["detail"]
    assert made == [] and list(folder.iterdir()) == []


def test_only_the_bound_names_are_answered(client):
    assert client.get("/health", headers={"host": "attacker.example"}).status_code == 421
    assert client.get("/health", headers={"host": "attacker.example:8000"}).status_code == 421
    assert "DNS rebinding" in client.get("/", headers={"host": "127.0.0.1.attacker.example"}).json()["detail"]
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host


def test_security_headers(client):
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in page.text and "<style>" not in page.text  # inline code would need 'unsafe-inline'
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/app.js").headers["content-type"].startswith("text/javascript")
    path = _test_images(1)[0]
    res = client.post("/predict", files={"file": (path.name, path.read_bytes())})
    assert res.headers["cache-control"] == "no-store" and res.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", ["notes.png", "notes.dcm", "notes"])
def test_error_answers_do_not_echo_the_upload(client, name):
    secret = b"PATIENT^SECRET<script>alert(1)</script>"
    for payload in (secret * 20, b"\0" * 128 + b"DICM" + secret * 20, _truncated_jpeg() + secret):
        res = client.post("/predict", files={"file": (name, payload)})
        assert res.status_code in (415, 422) and b"SECRET" not in res.content and b"<script>" not in res.content, res.text
    res = client.post("/predict", content=secret, headers={"content-type": "text/plain"})
    assert res.status_code == 415 and b"SECRET" not in res.content and "multipart/form-data" in res.json()["detail"]


def test_test_time_augmentation(predictor):
    from pneumoscope.inference.tta import tta_views

    view = predictor.preprocessing_view(predictor.read(_test_images(1)[0]))
    views = tta_views(view)
    assert len(views) == 5 and all(v.shape == view.shape for v in views)
    assert np.array_equal(views[0], view) and not np.array_equal(views[1], view)
    images = [predictor.read(p) for p in _test_images(3)]
    plain, tta = predictor.predict_proba(images), predictor.predict_proba(images, tta=True)
    assert tta.shape == plain.shape and np.all((tta >= 0) & (tta <= 1)) and not np.allclose(tta, plain)
    assert np.corrcoef(plain, tta)[0, 1] > 0.5


@pytest.mark.slow
def test_evaluate_with_tta(run, tmp_path):
    from tests.conftest import CHEST_XRAY

    ev = tmp_path / "ev"
    assert (
        main(["-q", "evaluate", str(run), str(CHEST_XRAY), "--out", str(ev), "--limit", "20", "--tta", "--no-audit", "--bootstraps", "50"])
        == 0
    )
    assert json.loads((ev / "metrics.json").read_text())["n"] == 20


def test_one_decision_rule_a_probability_at_the_threshold_is_pneumonia(predictor):
    t = predictor.threshold
    assert predictor.decide([t - 1e-9, t, t + 1e-9]).tolist() == [0, 1, 1]
    assert [predictor.label_of(p) for p in (t - 1e-9, t)] == ["NORMAL", "PNEUMONIA"]


@pytest.mark.parametrize("shape", [(1, 1), (512, 512), (8, 300)])
def test_blank_tiny_and_elongated_images_are_flagged_before_the_feature_guard(predictor, shape):
    pred = predictor.predict_images([np.full(shape, 0.5, np.float32)], ["grey"])[0]
    assert pred.ood is True and pred.ood_reason and pred.label is None
    assert predictor.predict_images([predictor.read(_test_images(1)[0])], ["xray"])[0].ood_reason == ""


def test_a_nan_probability_never_becomes_a_label(predictor, monkeypatch):
    monkeypatch.setattr(predictor.backend, "run", lambda x: (np.full(len(x), np.nan), np.zeros(len(x))))
    pred = predictor.predict_images([predictor.read(_test_images(1)[0])], ["x"])[0]
    assert pred.prob is None and pred.label is None and "not a finite number" in pred.error
    with pytest.raises(ValueError, match="non-finite"):
        predictor.decide([0.2, float("nan")])


def test_a_dicom_that_would_decode_to_nan_gets_an_error_row_and_valid_json(run, tmp_path, capsys):
    from pydicom import dcmread

    bad = write_dicom(tmp_path / "w0.dcm", np.arange(4096).reshape(64, 64), window=(2000, 0))
    ds = dcmread(bad)
    ds.VOILUTFunction = "LINEAR_EXACT"
    ds.save_as(bad)
    good = _test_images(1)[0]
    assert main(["predict", str(run), str(bad), str(good), "--format", "json"]) == 1
    rows = json.loads(capsys.readouterr().out)  # strict JSON: no NaN
    assert rows[0]["prob"] is None and rows[0]["label"] is None and "WindowWidth" in rows[0]["error"]
    assert rows[1]["label"] in ("NORMAL", "PNEUMONIA") and 0 <= rows[1]["prob"] <= 1


def test_pixel_budget_lets_images_decode_together_only_while_they_fit():
    import threading
    import time

    from pneumoscope.serving.batching import PixelBudget

    budget, order = PixelBudget(100), []

    def take(n, tag):
        with budget.take(n):
            order.append((tag, budget.used))
            time.sleep(0.05)

    with budget.take(60):
        waiting = threading.Thread(target=take, args=(60, "second"))
        fits = threading.Thread(target=take, args=(40, "fits"))
        waiting.start(), fits.start()
        fits.join(5)
        time.sleep(0.1)
        assert order == [("fits", 100)]  # 60 + 40 fit together; another 60 does not
    waiting.join(5)
    take(500, "alone")  # larger than the whole budget: runs when nothing else does
    assert order[1:] == [("second", 60), ("alone", 500)] and budget.used == 0


def test_the_page_colour_bar_is_the_heatmap_colour_map():
    import re
    from importlib import resources

    import matplotlib

    from pneumoscope.plots import CAM_CMAP

    css = resources.files("pneumoscope.serving").joinpath("static/app.css").read_text()
    stops = re.findall(r"#([0-9a-f]{6}) (\d+(?:\.\d+)?)%", re.search(r"\.colorbar\{[^}]*\}", css).group(0))
    assert len(stops) >= 5
    cmap = matplotlib.colormaps[CAM_CMAP]
    for hexcode, pct in stops:
        want = np.round(np.array(cmap(float(pct) / 100)[:3]) * 255)
        got = np.array([int(hexcode[i : i + 2], 16) for i in (0, 2, 4)])
        assert np.abs(want - got).max() <= 12, (hexcode, pct, want)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--port", "80000"], "--port must be a TCP port from 1 to 65535, got 80000. Fix: "),
        (["--port", "0"], "--port must be a TCP port from 1 to 65535, got 0"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid': not an address, nor a name this machine can resolve"),
        (["--host", "192.0.2.1"], "192.0.2.1:8000: cannot listen there: not an address of this machine. Fix: --host 127.0.0.1"),
    ],
    ids=["port-80000", "port-0", "unresolvable-host", "foreign-address"],
)
def test_serve_refuses_a_bad_port_or_host_in_one_line_before_loading_the_model(flags, expected, tmp_path, capsys):
    """Issue 20: `--port 80000` printed a 73-line traceback. The address is checked first: the run here does not even exist."""
    assert main(["serve", str(tmp_path / "no-run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pneumoscope: error: {expected}") and err.count("\n") == 1 and "Traceback" not in err, err


def test_serve_on_a_port_in_use_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    """Issue 20: it exited 3 after uvicorn's `[Errno 98]`."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", str(tmp_path / "no-run"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"pneumoscope: error: 127.0.0.1:{port}: cannot listen there: the port is in use (another server, or a `pneumoscope "
        "serve` still running). Fix: stop it, or choose another --port\n"
    )


def test_serve_answers_on_the_socket_it_bound_and_names_the_model(run):
    """The command end to end: it binds, loads the run and serves; /health names the run it serves."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumoscope", "-q", "serve", str(run), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, health = time.monotonic() + 120, None
        while health is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    health = json.loads(answer.read())
            except OSError:
                time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
    assert health is not None, out
    assert health["model"] == run.name and health["backbone"] == "efficientnet_lite0" and 0 < health["threshold"] < 1


# --------------------------------------------------------------------------- time bounds (issue 23 item 6)


@pytest.fixture
def live(predictor):
    """Serve an app made by ``live(**create_app_kwargs)`` on a free port in a thread, as `pneumoscope serve` does."""
    import threading

    from pneumoscope.serving.app import create_app
    from pneumoscope.serving.guards import bind_socket, uvicorn_server

    servers = []

    def start(header_timeout_s=10.0, **kwargs):
        port = _free_port()
        sock = bind_socket("127.0.0.1", port)
        server = uvicorn_server(create_app(predictor, **kwargs), "127.0.0.1", port, header_timeout_s=header_timeout_s, log_level="warning")
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread, sock))
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        return port

    yield start
    for server, thread, sock in servers:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


def _post_image(port, heatmap=False):
    import urllib.error
    import urllib.request

    path = _test_images(1)[0]
    boundary = "pneumoscopetest"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict?heatmap={str(heatmap).lower()}",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _slow_sender(port, headers_only=False):
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if not headers_only:
        head += "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        head += '--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'  # then the file, slowly
    sock.sendall(head.encode())
    return sock


def _rest_of_response(sock, answer: bytes) -> bytes:
    """Read until the answer's content-length is in, or the server closes (10 s at most)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
    wanted = int(length.group(1)) if length else None
    more, deadline = b"", time.monotonic() + 10
    sock.settimeout(1.0)
    while (wanted is None or len(body) + len(more) < wanted) and time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        more += chunk
    return more


def test_a_slow_body_is_cut_off_with_408_and_frees_its_slot(live):
    """Issue 23 item 6: one byte every few seconds held a slot for as long as the sender liked; with every slot held
    the server answered 503 to everyone else."""
    port = live(max_pending=1, body_grace_s=1.0, min_body_rate=1000)
    sock = _slow_sender(port)
    try:
        started, answer = time.monotonic(), b""
        sock.settimeout(0.4)
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 20:
            try:
                sock.sendall(b"-")  # one byte every 0.4 s: far below 1000 bytes/s
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # the server may close as it answers
                break
        elapsed = time.monotonic() - started
        answer += _rest_of_response(sock, answer)  # the headers and the body may come in separate packets
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"too slowly" in answer and elapsed < 10
    finally:
        sock.close()
    assert _post_image(port)[0] == 200  # the one slot is free again


def test_headers_that_never_finish_are_cut_off(live):
    port = live(header_timeout_s=1.0)
    sock = _slow_sender(port, headers_only=True)
    started = time.monotonic()
    try:
        assert sock.recv(4096) == b""  # closed by the server, not by this test's 30 s socket timeout
    finally:
        sock.close()
    assert time.monotonic() - started < 10
    assert _post_image(port)[0] == 200


def test_heatmaps_past_the_budget_are_skipped_with_a_reason_not_queued(predictor):
    """Issue 23 item 6: 32 batch requests x 16 heatmaps kept the server busy for 102 s and everyone else got 503."""
    from fastapi.testclient import TestClient

    from pneumoscope.serving.app import create_app

    paths = _test_images(2)
    files = [("files", (p.name, p.read_bytes())) for p in paths]
    client = TestClient(create_app(predictor, max_heatmaps=1, batch_wait_s=0.5), base_url="http://127.0.0.1")
    results = client.post("/predict/batch?heatmap=true", files=files).json()["results"]
    assert all(0 <= r["prob"] <= 1 for r in results)
    assessed = [r for r in results if r["label"] is not None]
    made = [r for r in assessed if "heatmap_png" in r]
    skipped = [r for r in assessed if "heatmap_error" in r]
    assert len(made) >= 1 and len(made) + len(skipped) == len(assessed), [sorted(r) for r in results]
    assert len(assessed) < 2 or skipped, "four decisions and a budget of one heatmap: some must be skipped"
    assert all("busy" in r["heatmap_error"] and "heatmap_png" not in r for r in skipped)
    single = client.post("/predict?heatmap=true", files={"file": (paths[0].name, paths[0].read_bytes())}).json()
    assert single["label"] is None or "heatmap_png" in single  # the budget comes back
