"""Streaming predict (issue 13): rows written per batch, flat memory, resume after kill -9, torchrun shards merged."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.cli.main import main
from pneumoscope.inference.inputs import Item, expand_items
from pneumoscope.inference.prediction import Prediction
from pneumoscope.inference.predictor import Predictor
from pneumoscope.inference.stream import predict_stream, predict_to
from tests.conftest import PROB_ATOL, process_tree, survivors

REPO = Path(__file__).resolve().parents[2]


def _pngs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(paths[-1])
    return paths


def _csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _cli(*args: str, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_streamed_rows_equal_predict_inputs_in_order_with_errors(tiny_run, tmp_path):
    good = _pngs(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "002.png").write_bytes(b"\x89PNG broken")
    predictor = Predictor.load(tiny_run)
    expected = predictor.predict_inputs(good)
    items = expand_items([str(tmp_path / "imgs"), str(tmp_path / "missing.png")])
    assert [it.name for it in items] == [*map(str, good), str(tmp_path / "missing.png")]
    got = [p for batch in predict_stream(predictor, items, batch_size=2, workers=2) for p in batch]
    assert [p.path for p in got] == [it.name for it in items]
    for e, g in zip(expected, got[:-1], strict=True):
        assert (e.label, e.error, e.ood, e.ood_reason) == (g.label, g.error, g.ood, g.ood_reason)
        assert e.prob == pytest.approx(g.prob, abs=PROB_ATOL) if e.prob is not None else g.prob is None
    assert "no such file or folder" in got[-1].error and got[2].error and got[2].prob is None


def test_a_batch_is_yielded_before_the_next_ones_are_decoded(tiny_run, tmp_path, monkeypatch):
    """Memory stays flat: the first rows come out after one batch is read, not after all inputs."""
    items = [Item(str(p), str(p)) for p in _pngs(tmp_path, 12)]
    predictor = Predictor.load(tiny_run)
    reads = []
    real = Predictor.read
    monkeypatch.setattr(Predictor, "read", lambda self, path, data=None: reads.append(path) or real(self, path, data))
    stream = predict_stream(predictor, items, batch_size=3, workers=0)
    assert len(next(stream)) == 3 and len(reads) == 3
    assert sum(len(b) for b in stream) == 9 and len(reads) == 12


def test_zip_members_and_a_list_file_are_inputs(tiny_run, tmp_path, capsys):
    pngs = _pngs(tmp_path / "imgs", 3)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for p in pngs[:2]:
            zf.write(p, f"sub/{p.name}")
        zf.writestr("notes.txt", "not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# archive, then a file\n{tmp_path / 'a.zip'}\n\n{pngs[2]}\n")
    assert main(["-q", "predict", str(tiny_run), "--from-list", str(listing), "--workers", "1"]) == 0
    rows = _csv(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [f"{tmp_path / 'a.zip'}::sub/000.png", f"{tmp_path / 'a.zip'}::sub/001.png", str(pngs[2])]
    by_file = {r["path"]: r for r in _csv(_stdout_of(tiny_run, pngs, capsys))}
    assert rows[0]["prob"] == by_file[str(pngs[0])]["prob"] and rows[2]["prob"] == by_file[str(pngs[2])]["prob"]


def _stdout_of(run, paths, capsys) -> str:
    main(["-q", "predict", str(run), *map(str, paths)])
    return capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_drops_a_cut_last_row_and_equals_an_uninterrupted_run(suffix, tiny_run, tmp_path):
    paths = _pngs(tmp_path / "imgs", 7)
    listing = [*map(str, paths), str(paths[1])]  # a path listed twice is predicted twice, also after a resume
    whole = tmp_path / f"whole{suffix}"
    predictor = Predictor.load(tiny_run)
    summary = predict_to(predictor, expand_items(listing), whole, batch_size=2, workers=0)
    assert (summary.rows, summary.failed) == (8, 0)
    data = whole.read_bytes()
    lines = data.splitlines(keepends=True)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(b"".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:9])  # killed in the middle of a row
    resumed = predict_to(predictor, expand_items(listing), cut, batch_size=2, workers=0, resume=True)
    assert resumed.rows == 8 and 0 < resumed.resumed < 8
    assert cut.read_bytes() == data


def test_an_existing_out_needs_resume_or_overwrite_and_parquet_needs_pyarrow(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "rows.csv"
    out.write_text("earlier work\n")
    items = expand_items([str(p) for p in _pngs(tmp_path / "imgs", 1)])
    predictor = Predictor.load(tiny_run)
    with pytest.raises(ValueError, match="exists. Fix: --resume"):
        predict_to(predictor, items, out)
    with pytest.raises(ValueError, match="columns are"):
        predict_to(predictor, items, out, resume=True)
    assert predict_to(predictor, items, out, overwrite=True).rows == 1
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="needs pyarrow.*pip install pyarrow"):
        predict_to(predictor, items, tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match="suffix '.txt' names no format"):
        predict_to(predictor, items, tmp_path / "rows.txt")


def test_tta_per_batch_equals_predict_inputs_tta(tiny_run, tmp_path):
    paths = _pngs(tmp_path, 3)
    predictor = Predictor.load(tiny_run)
    expected = [p.prob for p in predictor.predict_inputs(paths, tta=True)]
    got = [p.prob for b in predict_stream(predictor, expand_items(paths), batch_size=2, workers=1, tta=True) for p in b]
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.slow
def test_kill_9_at_half_then_resume_equals_an_uninterrupted_run(tiny_run, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in _pngs(tmp_path / "imgs", 6)) * 8)  # 48 rows
    args = ["-m", "pneumoscope", "-q", "predict", str(tiny_run), "--from-list", str(listing), "--batch-size", "4", "--workers", "1"]
    whole, killed = tmp_path / "whole.csv", tmp_path / "killed.csv"
    proc = _cli(*args, "--out", str(killed))
    deadline = time.monotonic() + 120
    while (not killed.exists() or killed.read_text().count("\n") < 25) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    started = process_tree(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert started, "the decoding worker was not running when predict was killed"
    assert survivors(started) == [], "a process predict started outlived its kill -9"
    kept = killed.read_text().count("\n") - 1
    assert 0 < kept < 48, f"the kill came too late to test anything ({kept} rows written)"
    assert _cli(*args, "--out", str(killed), "--resume").wait() == 0
    assert _cli(*args, "--out", str(whole)).wait() == 0
    assert killed.read_text() == whole.read_text()


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_output_row_for_row(tiny_run, tmp_path):
    folder = tmp_path / "imgs"
    _pngs(folder, 9)
    (folder / "004.png").write_bytes(b"")  # an unreadable one among them
    common = ["predict", str(tiny_run), str(folder), str(tmp_path / "missing"), "--batch-size", "2", "--workers", "0"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # torchrun's default per rank; the last digits of a float32 forward move with the thread count
    single = _cli("-m", "pneumoscope", "-q", *common, "--out", str(tmp_path / "single.csv"), env_extra=one_thread)
    assert single.wait() == 1, single.stderr.read()
    dist = _cli(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "pneumoscope",
        "-q",
        *common,
        "--out",
        str(tmp_path / "dist.csv"),
        env_extra=one_thread,
    )
    assert dist.wait() != 0  # every rank exits 1, as the single process does: one input was unreadable
    rows = (tmp_path / "dist.csv").read_text()
    assert rows == (tmp_path / "single.csv").read_text(), dist.stderr.read()
    assert len(_csv(rows)) == 10 and not list(tmp_path.glob("dist.csv.*"))  # shards merged and removed


def test_json_on_stdout_is_one_list_and_unreadable_rows_keep_the_fields(tiny_run, tmp_path, capsys):
    paths = _pngs(tmp_path, 2)
    assert (
        main(["-q", "predict", str(tiny_run), *map(str, paths), str(tmp_path / "nope.png"), "--format", "json", "--batch-size", "1"]) == 1
    )
    rows = json.loads(capsys.readouterr().out)
    assert [tuple(r) for r in rows] == [Prediction.FIELDS] * 3 and rows[2]["prob"] is None and rows[0]["label"]


def test_predict_skips_a_zip_bomb_member_with_the_reason_and_predicts_the_rest(tiny_run, tmp_path, monkeypatch, capsys):
    import pneumoscope.data.bounded

    monkeypatch.setattr(pneumoscope.data.bounded, "MAX_MEMBER_BYTES", 1 << 20)  # 5 MB of zeros is then a bomb, made in a moment
    pngs = _pngs(tmp_path / "imgs", 3)
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in pngs:
            zf.write(p, p.name)
        with zf.open("zbomb.png", "w") as fh:
            fh.write(bytes(5 << 20))
    assert main(["-q", "predict", str(tiny_run), str(archive), "--workers", "0"]) == 1
    rows = {r["path"]: r for r in _csv(capsys.readouterr().out)}
    bomb = rows.pop(f"{archive}::zbomb.png")
    assert not bomb["prob"] and "over the limit of 1,048,576 (possible zip bomb)" in bomb["error"]
    assert sorted(rows) == [f"{archive}::{p.name}" for p in pngs] and all(r["label"] in ("NORMAL", "PNEUMONIA") for r in rows.values())


@pytest.mark.parametrize(
    "content",
    [
        b'{"path": "a.png", "note": "my own record"}\n{"path": "b.png", "note": "another"}\n',  # a user's JSONL with a path field
        b"hello,world",  # a CSV without header or newline (was padded with NUL bytes)
        b"path,prob\nx.png,0.5\n",  # another tool's CSV
    ],
    ids=["users-jsonl", "no-header", "other-csv"],
)
def test_resume_refuses_a_file_it_did_not_write_and_changes_nothing(content, tiny_run, tmp_path):
    suffix = ".jsonl" if content.startswith(b"{") else ".csv"
    out = tmp_path / f"mine{suffix}"
    out.write_bytes(content)
    with pytest.raises(ValueError, match="not an output of this `pneumoscope predict` run"):
        predict_to(Predictor.load(tiny_run), expand_items(_pngs(tmp_path / "imgs", 2)), out, workers=0, resume=True)
    assert out.read_bytes() == content


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_refuses_rows_another_model_decided(suffix, tiny_run, tmp_path):
    """Rows of predict's own columns, but decided at another threshold: another run's, not to be continued by this one."""
    import dataclasses

    paths = _pngs(tmp_path / "imgs", 3)
    predictor = Predictor.load(tiny_run)
    out = tmp_path / f"rows{suffix}"
    predict_to(predictor, expand_items(paths[:2]), out, workers=0)
    before = out.read_bytes()
    other = Predictor(predictor.backend, dataclasses.replace(predictor.description, threshold=0.25))
    with pytest.raises(ValueError, match="decided at threshold 0.5, this model's is 0.25"):
        predict_to(other, expand_items(paths), out, workers=0, resume=True)
    assert out.read_bytes() == before
    assert predict_to(predictor, expand_items(paths), out, workers=0, resume=True).resumed == 2  # its own model continues it


def test_a_full_disk_while_predicting_names_the_output_file(tmp_path):
    """Issue 23 item 11: `predict` on a full disk said "No space left on device" and not which file."""
    import errno

    from pneumoscope.cli.main import error_line
    from pneumoscope.inference.sinks import CsvFormat, TextSink

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    out = tmp_path / "preds.csv"
    with pytest.raises(OSError) as err:
        TextSink(Full(), CsvFormat(), new=True, path=out)
    line = error_line(err.value)
    assert str(out) in line and "no space left" in line and "Fix:" in line


def _shards(out: Path, world: int, n: int, batch_size: int) -> list[str]:
    """Shards as the ranks of `predict` under torchrun write them; the rows in the single-process order."""
    from pneumoscope.inference.sinks import CsvFormat
    from pneumoscope.inference.stream import shard_path

    fmt, rows = CsvFormat(), [{"path": f"{k}.png", "prob": k / n, "label": "NORMAL", "threshold": 0.5} for k in range(n)]
    encoded = [fmt.encode([r]) for r in rows]
    for rank in range(world):
        mine = [e for k, e in enumerate(encoded) if k // batch_size % world == rank]
        shard_path(out, rank).write_bytes((fmt.head() + "".join(mine)).encode())
    return encoded


def test_merged_shards_are_written_by_the_one_atomic_writer(tmp_path, monkeypatch):
    """Issue 21: the merge staged under `.NAME.XXXX.tmp`, a name no later run recognised as a killed write's."""
    from pneumoscope import outputs
    from pneumoscope.errors import StateError
    from pneumoscope.inference.sinks import CsvFormat
    from pneumoscope.inference.stream import merge_shards, shard_path

    out = tmp_path / "preds.csv"
    encoded = _shards(out, 2, 7, 2)
    seen, replace = [], os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda src, dst: seen.append(Path(src).name) or replace(src, dst))
    old = os.umask(0o027)
    try:
        summary = merge_shards(out, 2, 7, 2)
    finally:
        os.umask(old)
    assert summary.rows == 7 and out.read_bytes() == (CsvFormat().head() + "".join(encoded)).encode()
    assert len(seen) == 1 and seen[0].startswith(outputs.partial_name(out)) and out.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["preds.csv"]  # shards removed
    _shards(out, 2, 5, 2)  # short of the 7 inputs
    with pytest.raises(StateError, match="ends early"):
        merge_shards(out, 2, 7, 2)
    assert sorted(os.listdir(tmp_path)) == sorted(["preds.csv", shard_path(out, 0).name, shard_path(out, 1).name])
