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
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..data.bounded import read_zip_member
from ..data.decode import screen_image, skip_detail
from ..errors import ImageReadError, StateError, UsageError
from ..outputs import atomic_file
from ..runtime import die_with_parent, progress_bar
from .inputs import Item
from .prediction import Prediction
from .predictor import Predictor
from .sinks import TEXT_FORMATS, CsvFormat, JsonArrayFormat, ParquetSink, TextSink, require_out_format, scan_done

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- one process


@dataclass
class Summary:
    """What a ``predict`` wrote: rows in the output, rows with an error, rows kept from an earlier run."""

    rows: int  # rows in the output
    failed: int  # of them, rows with an error
    resumed: int  # rows found from an earlier run and not predicted again


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
