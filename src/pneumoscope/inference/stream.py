"""Streaming prediction over archives: decode in worker processes, write each batch as it finishes.

``pneumoscope predict`` over 100,000 radiographs must not hold 100,000 decoded images
(about 28 GB) nor lose everything to a crash at the last one. Here the inputs are a list
of :class:`Item` (a few strings each); DataLoader worker processes decode and
preprocess them through :meth:`Predictor.read` and :meth:`Predictor.preprocess`; the
main process runs each batch through :meth:`Predictor.predict_batch` and appends its
rows to the output, flushed. Memory is the batches in flight, whatever the count.

Rows are written in input order, so an output killed half-way is a prefix of the whole
one: ``resume`` skips the rows already there (matched on path, repeats counted) and
drops a last row cut short by the kill. Under ``torchrun`` each rank predicts every
WORLD_SIZE-th item into its own shard and rank 0 merges the shards, in input order,
into the output (written atomically).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..data.bounded import read_zip_member
from ..data.decode import is_image_path, screen_image, skip_detail
from ..errors import ImageReadError, StateError, UsageError
from ..outputs import atomic_file, naming_path
from ..runtime import die_with_parent, progress_bar
from .predictor import Prediction, Predictor, expand_inputs

logger = logging.getLogger(__name__)


class Item(NamedTuple):
    """One input of ``predict``: the row's name, the file to open, the zip member, or why it cannot be predicted."""

    name: str  # the row's path: a file, or ARCHIVE.zip::MEMBER
    source: str  # the file to open (the archive, for a member)
    member: str | None = None  # the zip member, else None
    error: str = ""  # why it cannot be predicted, known before decoding (a missing path), else ""


# --------------------------------------------------------------------------- inputs


def read_list(path: str | os.PathLike) -> list[str]:
    """The paths in a ``--from-list`` file: one a line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(
            f"--from-list {path}: cannot be read as a UTF-8 text file ({err}). Fix: give a text file with one image, "
            "folder or .zip path a line"
        ) from err
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def expand_items(inputs: list[str | os.PathLike]) -> list[Item]:
    """Files, folders (searched recursively) and ``.zip`` archives -> one :class:`Item` per image.

    The order is that of ``inputs`` (a folder's or archive's images sorted), then the
    inputs that cannot be used, each with its reason and fix, as :func:`expand_inputs` gives them.
    """
    files, problems = [], []
    for p in inputs:
        if str(p).lower().endswith(".zip") and Path(p).is_file():
            members, why = _zip_members(Path(p))
            files.extend(Item(f"{p}::{m}", str(p), m) for m in members)
            if why:
                logger.warning("%s: %s", p, why)
                problems.append(Item(str(p), str(p), None, why))
            continue
        found, bad = expand_inputs([p])
        files.extend(Item(str(f), str(f)) for f in found)
        problems.extend(Item(path, path, None, why) for path, why in bad)
    return files + problems


def _zip_members(path: Path) -> tuple[list[str], str]:
    """The image members of an archive, sorted, and why there are none ("" when there are some)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
    except (OSError, zipfile.BadZipFile) as err:
        return [], f"not a readable zip archive ({err}). Fix: copy it again, or unpack it and give the folder"
    keep = sorted(n for n in names if "__MACOSX" not in n.split("/") and is_image_path(n))
    return keep, "" if keep else "archive holds no image files. Fix: give a .zip of images"


# --------------------------------------------------------------------------- decoding in workers, one forward per batch


class _Decoded(TorchDataset):
    """Item i -> (i, preprocessed (C, S, S) or, with TTA, the decoded image, screen_image reason, error)."""

    def __init__(self, items: list[Item], predictor: Predictor, tta: bool):
        self.items, self.predictor, self.tta = items, predictor, tta
        self._zips: dict[str, zipfile.ZipFile] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _read_member(self, item: Item) -> bytes:
        zf = self._zips.get(item.source)
        if zf is None:  # opened in the worker process that reads it: a ZipFile does not survive a fork
            zf = self._zips[item.source] = zipfile.ZipFile(item.source)
        return read_zip_member(zf, item.member, item.name)

    def __getitem__(self, i: int):
        item = self.items[i]
        if item.error:
            return i, None, "", item.error
        try:
            data = None if item.member is None else self._read_member(item)
        except (OSError, zipfile.BadZipFile) as err:  # the archive itself cannot be opened
            return i, None, "", f"cannot be read from the archive ({err}). Fix: copy the archive again"
        except ImageReadError as err:  # a member over io's bounds (a zip bomb), or damaged
            return i, None, "", skip_detail(err)
        try:
            image = self.predictor.read(item.name if item.member else item.source, data)
        except ImageReadError as err:
            return i, None, "", skip_detail(err)
        if self.tta:
            return i, image, "", ""
        return i, self.predictor.preprocess(image).numpy()[0], screen_image(image), ""


def _as_list(batch):
    return batch


def predict_stream(
    predictor: Predictor, items: list[Item], *, batch_size: int = 32, workers: int = 2, tta: bool = False
) -> Iterator[list[Prediction]]:
    """One list of :class:`Prediction` per batch of ``items``, in order; an unreadable item gets its error row.

    ``workers`` processes decode (0: this process). Each batch is one forward pass
    (:meth:`Predictor.predict_batch`), or with ``tta`` :meth:`Predictor.predict_images`
    over the batch's decoded images.
    """
    if batch_size < 1 or workers < 0:
        raise UsageError(
            f"batch size must be >= 1 and workers >= 0, got --batch-size {batch_size}, --workers {workers}. Fix: e.g. --batch-size 32 --workers 2"
        )
    loader = DataLoader(
        _Decoded(items, predictor.without_backend(), tta),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_as_list,
        worker_init_fn=die_with_parent,
    )
    for batch in loader:
        rows: dict[int, Prediction] = {}
        good = [(i, x, why) for i, x, why, err in batch if not err]
        if good:
            names = [items[i].name for i, _, _ in good]
            if tta:
                preds = predictor.predict_images([x for _, x, _ in good], names, batch_size=batch_size, tta=True)
            else:
                preds = predictor.predict_batch(np.stack([x for _, x, _ in good]), names, [why for _, _, why in good])  # (B, C, S, S)
            rows.update(zip((i for i, _, _ in good), preds, strict=True))
        for i, _, _, err in batch:
            if err:
                if not items[i].error:  # a decoding failure; the others were reported when the inputs were expanded
                    logger.warning("%s: %s", items[i].name, err)
                rows[i] = Prediction(items[i].name, None, None, predictor.threshold, error=err)
        yield [rows[i] for i, *_ in batch]


# --------------------------------------------------------------------------- output formats


class Record(NamedTuple):
    """A row already in an output, as ``--resume`` reads it back."""

    end: int  # byte offset just after it
    raw: bytes  # as written
    path: str
    failed: bool
    threshold: float | None  # the operating point it was decided at: which model wrote it


class CsvFormat:
    """CSV rows of ``fields`` (a model's :attr:`Predictor.fields`: predict's columns, and a probability per class for
    an N-class model); probabilities with 6 decimals."""

    name = "csv"

    def __init__(self, fields: tuple[str, ...] = Prediction.FIELDS):
        self.fields = tuple(fields)

    def head(self) -> str:
        """The header line."""
        return ",".join(self.fields) + "\r\n"

    def encode(self, rows: list[dict]) -> str:
        """Rows as CSV lines (probabilities with 6 decimals)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields)
        probs = [f for f in self.fields if f == "prob" or f.startswith("prob_")]
        writer.writerows({**r, **{f: "" if r.get(f) is None else f"{r[f]:.6f}" for f in probs}} for r in rows)
        return buf.getvalue()

    def tail(self) -> str:
        """Nothing: a CSV needs no ending."""
        return ""

    def records(self, fh) -> Iterator[Record]:
        """Whole rows after the header; stops at a row cut short (no final newline, or an open quote)."""
        lines: list[bytes] = []
        end = 0

        def complete_lines():
            nonlocal end
            for line in fh:
                if not line.endswith(b"\n"):
                    return
                lines.append(line)
                end += len(line)
                yield line.decode("utf-8")

        reader = csv.reader(complete_lines())  # reads one line at a time: `end` is where the row it returns ends
        try:
            header = next(reader, None)
            if header is not None and tuple(header) != self.fields:
                raise UsageError(
                    f"{getattr(fh, 'name', 'the output')}: its columns are {header}, not those of `pneumoscope predict` "
                    f"({', '.join(self.fields)}). Fix: give another --out, or --overwrite to replace it"
                )
            lines.clear()
            error, threshold = self.fields.index("error"), self.fields.index("threshold")
            for row in reader:
                if len(row) != len(self.fields):
                    return
                yield Record(end, b"".join(lines), row[0], bool(row[error]), _number(row[threshold]))
                lines.clear()
        except (csv.Error, UnicodeDecodeError):
            return


class JsonlFormat:
    """One JSON object a line, with the keys ``fields`` (see :class:`CsvFormat`)."""

    name = "jsonl"

    def __init__(self, fields: tuple[str, ...] = Prediction.FIELDS):
        self.fields = tuple(fields)

    def head(self) -> str:
        """Nothing: JSON Lines need no header."""
        return ""

    def encode(self, rows: list[dict]) -> str:
        # every key of fields, in order (an unreadable image of an N-class model has no class probabilities: null);
        # a NaN is never written as if it were a number
        """Rows as JSON lines (NaN refused)."""
        return "".join(json.dumps({f: r.get(f) for f in self.fields}, allow_nan=False) + "\n" for r in rows)

    def tail(self) -> str:
        """Nothing: JSON Lines need no ending."""
        return ""

    def records(self, fh) -> Iterator[Record]:
        """The whole rows of an output; stops at a row cut short (no final newline) or not one of predict's."""
        end = 0
        for line in fh:
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                row = None
            if not isinstance(row, dict) or set(row) != set(self.fields):  # a record of predict's, not anyone's with a path
                return
            end += len(line)
            yield Record(end, line, str(row["path"]), bool(row.get("error")), _number(row.get("threshold")))


class JsonArrayFormat(JsonlFormat):
    """A JSON list on stdout (``--format json``), written row by row."""

    name = "json"

    def __init__(self, fields: tuple[str, ...] = Prediction.FIELDS):
        super().__init__(fields)
        self.first = True

    def head(self) -> str:
        """The list's opening bracket."""
        return "["

    def encode(self, rows: list[dict]) -> str:
        """Rows as list items, comma-separated across batches."""
        rows = [{f: r.get(f) for f in self.fields} for r in rows]
        out = "".join(("\n  " if self.first and k == 0 else ",\n  ") + json.dumps(r, allow_nan=False) for k, r in enumerate(rows))
        self.first = self.first and not rows
        return out

    def tail(self) -> str:
        """The list's closing bracket."""
        return "\n]\n"


TEXT_FORMATS = {".csv": CsvFormat, ".jsonl": JsonlFormat}
OUT_SUFFIXES = (*TEXT_FORMATS, ".parquet")


class ParquetSink:
    """Each batch a row group (pyarrow's ParquetWriter); a killed file has no footer, hence no ``resume``."""

    def __init__(self, path: Path, fields: tuple[str, ...] = Prediction.FIELDS):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        kinds = {"path": pa.string(), "label": pa.string(), "ood": pa.bool_(), "ood_reason": pa.string(), "error": pa.string()}
        self.schema = pa.schema([(f, kinds.get(f, pa.float64())) for f in fields])  # the rest: probabilities, threshold, distance
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, rows: list[dict]) -> None:
        """Append rows as a row group."""
        self.writer.write_table(self.pa.Table.from_pylist(rows, schema=self.schema))

    def close(self) -> None:
        """Close the file (its footer written)."""
        self.writer.close()


class TextSink:
    """Rows as text to ``fh``; ``path``: the file it writes, named in an error (a full disk's says no name of its own)."""

    def __init__(self, fh, fmt, *, new: bool, path: Path | None = None):
        self.fh, self.fmt, self.path = fh, fmt, path
        if new:
            self._put(fmt.head())

    def _put(self, text: str) -> None:
        if text:
            try:
                self.fh.write(text)
                self.fh.flush()  # a kill loses at most the batch being predicted
            except OSError as err:
                if self.path is None or err.filename is not None:
                    raise
                raise naming_path(err, self.path) from err

    def write(self, rows: list[dict]) -> None:
        """Append rows in the sink's format."""
        self._put(self.fmt.encode(rows))

    def close(self) -> None:
        """Write the format's ending."""
        self._put(self.fmt.tail())


def require_out_format(out: Path, *, resume: bool = False, suffix: str | None = None) -> str:
    """The output's format (its suffix, unless ``suffix`` is given), or an error if this module cannot write (or resume) it."""
    suffix = suffix or out.suffix.lower()
    if suffix not in OUT_SUFFIXES:
        raise UsageError(f"--out {out}: the suffix {suffix or 'none'!r} names no format. Fix: end it in {', '.join(OUT_SUFFIXES)}")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as err:
            raise UsageError(
                f"--out {out}: writing Parquet needs pyarrow, which is not installed. Fix: `pip install pyarrow`, or write .csv or .jsonl"
            ) from err
        if resume:
            raise UsageError(
                f"--out {out}: a Parquet file killed half-way cannot be read, so it cannot be resumed. Fix: write .csv or .jsonl for a resumable run"
            )
    return suffix


# --------------------------------------------------------------------------- one process


@dataclass
class Summary:
    """What a ``predict`` wrote: rows in the output, rows with an error, rows kept from an earlier run."""

    rows: int  # rows in the output
    failed: int  # of them, rows with an error
    resumed: int  # rows found from an earlier run and not predicted again


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def scan_done(out: Path, fmt, threshold: float | None = None) -> tuple[collections.Counter, int, int, int]:
    """The rows of an earlier, possibly killed, run: (paths with their counts, rows, failed rows, where the whole rows end).

    Only a file this command wrote is resumed: its header (CSV), then rows of predict's columns decided at
    ``threshold`` (the model's: the same run), then at most one row cut short by a kill (no final newline). Anything
    else (a user's own records, a CSV without the header, rows of another model) raises :class:`UsageError` and the
    file is left as it is."""
    done: collections.Counter = collections.Counter()
    rows = failed = 0
    head = fmt.head().encode()

    def foreign(why: str) -> UsageError:
        return UsageError(
            f"--out {out}: {why}, so it is not an output of this `pneumoscope predict` run and is not resumed (nothing in it "
            "was changed). Fix: give another --out, or --overwrite to replace it"
        )

    with open(out, "rb") as fh:
        start = fh.read(len(head))
        if start != head:
            if head.startswith(start) and not fh.read(1):  # empty, or killed while writing the header: start again
                return done, 0, 0, 0
            first = (start + fh.readline()).splitlines()[0][:80] if start else b""
            raise foreign(
                f"its first line is {first.decode('utf-8', 'replace')!r}, not the header of predict's CSV (its columns are "
                f"{', '.join(fmt.fields)})"
            )
        fh.seek(0)
        end = len(head)
        for rec in fmt.records(fh):
            if threshold is not None and (rec.threshold is None or abs(rec.threshold - threshold) > 1e-9):
                raise foreign(f"its row for {rec.path} was decided at threshold {rec.threshold}, this model's is {threshold:.6g}")
            done[rec.path] += 1
            rows, failed, end = rows + 1, failed + rec.failed, rec.end
        fh.seek(end)
        while chunk := fh.read(1 << 20):
            if b"\n" in chunk:  # more than one last line cut short: not a row of predict's
                raise foreign(f"what follows its first {rows} rows is not a row of predict's")
    return done, rows, failed, end


def predict_to(
    predictor: Predictor,
    items: list[Item],
    out: str | os.PathLike | None = None,
    *,
    stdout_format: str = "csv",
    batch_size: int = 32,
    workers: int = 2,
    tta: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    stdout=None,
    suffix: str | None = None,
) -> Summary:
    """Predict ``items`` and write each batch's rows as it finishes: to ``out`` (.csv, .jsonl or .parquet) or to ``stdout``.

    ``resume``: rows already in ``out`` are kept and their items skipped (matched on
    path; an item listed twice is skipped as often as its path is there); a last row cut
    short by a kill is dropped first. Without ``resume`` or ``overwrite`` an existing
    ``out`` is an error. ``suffix``: the format, when ``out``'s own suffix is not it (a shard).
    """
    import sys

    todo, resumed, failed = items, 0, 0
    files = contextlib.ExitStack()
    if out is None and resume:
        raise UsageError("--resume continues the rows written to --out, and there is no --out. Fix: add --out FILE.csv (or .jsonl)")
    if out is None:
        fmt = JsonArrayFormat(predictor.fields) if stdout_format == "json" else CsvFormat(predictor.fields)
        sink = TextSink(stdout or sys.stdout, fmt, new=True)
    else:
        out = Path(out)
        suffix = require_out_format(out, resume=resume, suffix=suffix)
        exists = out.exists()
        if exists and not (resume or overwrite):
            raise UsageError(f"--out {out} exists. Fix: --resume to continue it, --overwrite to replace it, or another --out")
        if suffix == ".parquet":
            sink = ParquetSink(out, predictor.fields)
        else:
            fmt = TEXT_FORMATS[suffix](predictor.fields)
            if exists and resume:
                done, resumed, failed, end = scan_done(out, fmt, predictor.threshold)
                os.truncate(out, end)  # drop a row cut short by the kill
                todo = [it for it in items if not _take(done, it.name)]
                logger.info("%s: %d rows from an earlier run kept, %d inputs to predict", out, resumed, len(todo))
            fh = files.enter_context(open(out, "a" if exists and resume else "w", encoding="utf-8", newline=""))  # noqa: SIM115 (closed by `files`)
            sink = TextSink(fh, fmt, new=not (exists and resume) or os.path.getsize(out) == 0, path=out)
    rows = resumed
    with files:
        with progress_bar(total=len(todo), desc="predict", unit="img", enabled=progress) as bar:
            for preds in predict_stream(predictor, todo, batch_size=batch_size, workers=workers, tta=tta):
                sink.write([p.to_dict() for p in preds])
                rows += len(preds)
                failed += sum(bool(p.error) for p in preds)
                bar.update(len(preds))
        sink.close()
    return Summary(rows, failed, resumed)


def _take(done: collections.Counter, name: str) -> bool:
    if done[name] > 0:
        done[name] -= 1
        return True
    return False


# --------------------------------------------------------------------------- torchrun: one shard per rank, merged by rank 0


def distributed_world() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun (``RANK`` and ``WORLD_SIZE`` set), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def shard_path(out: Path, rank: int) -> Path:
    """The partial output of ``rank`` beside ``out``."""
    return out.with_name(f"{out.name}.rank-{rank}.partial")


def predict_distributed(
    predictor: Predictor, items: list[Item], out: str | os.PathLike | None, *, resume: bool = False, overwrite: bool = False, **kw
) -> Summary:
    """This rank's share of ``items`` into its shard; after a barrier rank 0 merges the shards into
    ``out`` in the single-process order. Every rank returns the merged summary.

    The share is every WORLD_SIZE-th batch of ``batch_size`` items, from the rank's own:
    each batch is then the one the single-process run forms, and its rows are the same
    to the last digit (a network's output for an image moves in the 7th digit with the
    other images in its batch).

    ``resume`` continues each rank's shard. The process group (gloo) is created here and destroyed on return.
    """
    import torch.distributed as dist

    rank, world = distributed_world()
    if out is None:
        raise UsageError(
            f"under torchrun (WORLD_SIZE={world}) each rank writes a shard beside the output, so predict needs --out. Fix: add --out FILE.csv or FILE.jsonl"
        )
    out = Path(out)
    if out.suffix.lower() not in TEXT_FORMATS:
        raise UsageError(
            f"--out {out}: under torchrun the output is merged from shards, in {', '.join(TEXT_FORMATS)} only. Fix: write .csv or .jsonl"
        )
    if out.exists() and not overwrite:
        raise UsageError(
            f"--out {out} exists. Fix: --overwrite to replace it, or another --out (--resume continues a run's shards, not a finished output)"
        )
    dist.init_process_group("gloo")
    try:
        size = kw.get("batch_size", 32)
        mine = [it for start in range(rank * size, len(items), world * size) for it in items[start : start + size]]
        kw["progress"] = kw.get("progress") and rank == 0
        predict_to(predictor, mine, shard_path(out, rank), resume=resume, overwrite=True, suffix=out.suffix.lower(), **kw)
        dist.barrier()
        summary = [merge_shards(out, world, len(items), size, predictor.fields) if rank == 0 else None]
        dist.broadcast_object_list(summary, src=0)  # every rank exits with the same status: torchrun stops the others when one fails early
        return summary[0]
    finally:
        dist.destroy_process_group()


def merge_shards(out: Path, world: int, expected: int, batch_size: int, fields: tuple[str, ...] = Prediction.FIELDS) -> Summary:
    """Interleave the shards (batch b of the inputs is in shard b % world) into ``out``, atomically; then remove them."""
    fmt = TEXT_FORMATS[out.suffix.lower()](fields)
    shards = [shard_path(out, r) for r in range(world)]
    rows = failed = 0
    with atomic_file(out) as tmp, open(tmp, "wb") as dst, contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(s, "rb")) for s in shards]
        dst.write(fmt.head().encode())
        readers = [fmt.records(h) for h in handles]
        for k in range(expected):
            r = k // batch_size % world  # the rank that predicted item k
            rec = next(readers[r], None)
            if rec is None:
                raise StateError(
                    f"{shards[r]}: ends early, short of its share of the {expected} inputs "
                    "(a rank stopped early). Fix: run the same command again with --resume"
                )
            dst.write(rec.raw)
            rows, failed = rows + 1, failed + rec.failed
        extra = [str(s) for s, r in zip(shards, readers, strict=True) if next(r, None) is not None]
        if extra:
            raise StateError(
                f"{', '.join(extra)}: more rows than this run's {expected} inputs (left by a run over other inputs?). "
                "Fix: run again with --overwrite and without --resume"
            )
    for s in shards:
        s.unlink()
    return Summary(rows, failed, 0)
