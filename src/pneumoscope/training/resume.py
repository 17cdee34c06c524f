"""The state a killed stage 2 resumes from: Lightning checkpoints written atomically and read without unpickling
arbitrary objects, where ``--resume`` finds them, and the stage-2 log kept whole across killed attempts."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..errors import StateError
from ..outputs import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, then rename: a run killed mid-write leaves the previous checkpoint whole.

    Read without unpickling arbitrary objects: anyone who can write beside ``--out`` could
    otherwise plant a pickle that runs code on ``--resume``. The state this module's
    Trainer saves holds only tensors, containers, strings and numbers (no
    hyper-parameter objects), so PyTorch's ``weights_only`` loader reads all of it;
    anything else is refused.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """The checkpoint at ``path``, loaded safely (:func:`load_resume_state`)."""
        return load_resume_state(path)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        """Write the checkpoint atomically: a temporary file beside ``path``, renamed into place."""
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)


def load_resume_state(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint loaded with ``weights_only=True`` (no arbitrary code), or a clear error."""
    import pickle

    fix = "Fix: delete the folder and train again without --resume."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise StateError(
            f"{path}: refused to load fine-tuning state: it holds objects other than tensors and plain values ({str(err).splitlines()[0]}). "
            f"It may have been planted or damaged. {fix}"
        ) from None
    except OSError:
        raise
    except Exception as err:  # a truncated or damaged file (torch's unpickler raises IndexError, EOFError, RuntimeError...)
        first = (str(err).splitlines() or [""])[0][:200]
        raise StateError(f"{path}: not a readable fine-tuning checkpoint ({type(err).__name__}: {first}). {fix}") from None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if not (isinstance(epoch, int) and epoch >= 0 and isinstance(state.get("state_dict"), dict)):
        raise StateError(f"{path}: not a fine-tuning checkpoint this tool wrote (no completed `epoch` or no `state_dict`). {fix}")
    return state


CHECKPOINTS = "checkpoints"  # in the work folder, beside logs/


def resume_checkpoint(work_dir: str | os.PathLike) -> Path:
    """The checkpoint ``--resume`` continues from: ``checkpoints/last.ckpt``, or ``last.ckpt`` in the
    work folder itself, where a run killed before the checkpoints/ layout left it."""
    work_dir = Path(work_dir)
    ckpt, earlier = work_dir / CHECKPOINTS / "last.ckpt", work_dir / "last.ckpt"
    return earlier if earlier.is_file() and not ckpt.is_file() else ckpt


EARLIER_LOG = "finetune_earlier.csv"  # in logs/: stage-2 rows of killed attempts, kept until a resumed fit is merged with them


def _log_rows(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("step", "").isdigit()]


def _union(earlier: list[dict], later: list[dict]) -> list[dict]:
    """``later``'s rows, after those of ``earlier`` for the epochs (steps) ``later`` does not have."""
    steps = {r["step"] for r in later}
    return [r for r in earlier if r["step"] not in steps] + later


def set_aside_earlier_log(logs: Path, completed: int) -> None:
    """Before a resumed fit: the stage-2 log rows of the epochs the checkpoint holds (step <= ``completed``),
    from every killed attempt so far, into ``logs/finetune_earlier.csv``; the killed attempt's own log
    folder removed (Lightning's CSV logger would truncate it). A kill at any point loses no row."""
    import shutil

    rows = [r for r in _union(_log_rows(logs / EARLIER_LOG), _log_rows(logs / "finetune" / "metrics.csv")) if int(r["step"]) <= completed]
    _write_rows(logs / EARLIER_LOG, rows)
    shutil.rmtree(logs / "finetune", ignore_errors=True)


def merge_earlier_log(logs: Path) -> None:
    """After a resumed fit: the earlier rows, then this attempt's, as the stage-2 log (which the
    history is read from); written before the earlier file is removed, so a kill in between is
    harmless (the next resume takes this attempt's rows where both have an epoch)."""
    earlier = logs / EARLIER_LOG
    if earlier.is_file():
        _write_rows(logs / "finetune" / "metrics.csv", _union(_log_rows(earlier), _log_rows(logs / "finetune" / "metrics.csv")))
        earlier.unlink()


def _write_rows(path: Path, rows: list[dict]) -> None:
    """CSV rows written atomically (columns: the union, in order of appearance)."""
    from ..outputs import write_csv

    columns = list(dict.fromkeys(["step", *(k for r in rows for k in r)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, columns, [[r.get(c, "") for c in columns] for r in rows])


def read_history(path: Path) -> list[dict]:
    """Stage 2's history from its CSV log: a row per epoch (1-based, the logged "step"; see FineTuner._log_epoch)."""
    rows: dict[int, dict] = {}
    for r in _log_rows(path):
        epoch = int(r["step"])
        row = rows.setdefault(epoch, {"epoch": epoch})
        for key in ("train_loss", "val_loss", "val_auc"):
            if r.get(f"finetune/{key}"):
                row[key] = float(r[f"finetune/{key}"])
    return [rows[e] for e in sorted(rows)]
