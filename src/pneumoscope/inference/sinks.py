"""predict's output formats (CSV, JSON Lines, a JSON list, Parquet), their sinks, and an earlier run's rows read back for --resume."""

from __future__ import annotations

import collections
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ..errors import UsageError
from ..outputs import naming_path
from .prediction import Prediction


class Record(NamedTuple):
    """A row already in an output, as ``--resume`` reads it back."""

    end: int  # byte offset just after it
    raw: bytes  # as written
    path: str
    failed: bool
    threshold: float | None  # the operating point it was decided at: which model wrote it


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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
