"""train's work folder: where fine-tuning keeps its resumable state, claimed by one process (owner.pid), checked before a resume."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import OutputExistsError
from ..outputs import check_output_dir
from ..runtime import is_launched_rank
from .config import TrainConfig

logger = logging.getLogger(__name__)


def work_dir_for(out: str | os.PathLike) -> Path:
    """Where fine-tuning keeps its resumable state until the run is complete."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.work")


OWNER_FILE = "owner.pid"  # in the work folder: the process fine-tuning into it


def claim_output(out: str | os.PathLike, work: Path, config: TrainConfig, *, overwrite: bool, resume: bool) -> None:
    """Refuse an existing run or unfinished fine-tuning state unless told what to do with it; launched ranks touch nothing."""
    if is_launched_rank():
        return
    check_output_dir(out, overwrite)
    from ..outputs import process_alive
    from .resume import EARLIER_LOG, resume_checkpoint

    owner = work / OWNER_FILE
    recorded = owner.read_text().strip() if owner.is_file() else ""
    pid = int(recorded) if recorded.isdigit() else None
    if pid is not None and pid != os.getpid() and process_alive(pid):
        raise OutputExistsError(
            f"{work} is in use by a train that is still running (process {pid}): wait for it, or choose another --out. "
            f"If no such train runs, delete {owner}."
        )
    if config.finetune.epochs and work.exists() and not resume:
        if not resume_checkpoint(work).is_file():  # killed before stage 2's first checkpoint: only logs, which every attempt rewrites
            logger.info("%s: an earlier attempt stopped before its first fine-tuning checkpoint; nothing to resume, starting afresh", work)
            overwrite = True
        if not overwrite:
            raise OutputExistsError(
                f"{work} holds a fine-tuning run that did not finish: pass --resume to continue it, or --overwrite to start over."
            )
        shutil.rmtree(work)
    # each attempt logs afresh: a resumed one fits stage 1 again, then stage 2 from its checkpoint; stage 2's CSV log
    # (and the rows of attempts before it) is kept for a resume, which carries the epochs before the kill into its own
    if (work / "logs").is_dir():
        for entry in (work / "logs").iterdir():
            if not (resume and entry.name in ("finetune", EARLIER_LOG)):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    work.mkdir(parents=True, exist_ok=True)
    owner.write_text(str(os.getpid()))
