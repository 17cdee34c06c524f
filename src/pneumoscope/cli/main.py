"""The ``pneumoscope`` command line: main() parses, runs the command, and turns a failure into one line and an exit status.

Exit status, the same for every command: 0 done; 1 done, but some inputs were
unreadable and skipped (they are listed); 2 the command failed (one line on
stderr says why and how to fix it), including usage errors.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .commands import EXIT_FAILED
from .parser import build_parser

logger = logging.getLogger("pneumoscope")

EXIT_BROKEN_PIPE = 141  # as a shell reports a command ended by SIGPIPE: the reader of stdout stopped reading


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from ..runtime import configure_cpu_threads, configure_logging, die_with_parent, is_launched_rank, progress_wanted, tune_cpu_allocator

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:  # one before the command and the other after it
        parser.error("-q/--quiet and -v/--verbose cannot be used together: choose one")
    args.progress = progress_wanted(quiet=args.quiet)
    if is_launched_rank():
        die_with_parent()  # a DDP rank started by this command (or by torchrun) ends with it, even after kill -9
    configure_cpu_threads()
    tune_cpu_allocator()
    configure_logging(quiet=args.quiet, verbose=args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("pneumoscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pneumoscope predict … | head`: the reader stopped reading; nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise fail flushing stdout at exit
        return EXIT_BROKEN_PIPE
    except Exception as err:
        print(f"pneumoscope: error: {error_line(err, getattr(args, 'run', None) or getattr(args, 'weights', None))}", file=sys.stderr)
        return EXIT_FAILED


def error_line(err: Exception, model_file: str | None = None) -> str:
    """One line for a failed command: where, what, and the fix. ``model_file``: the checkpoint or ONNX file the command loads.

    Expected failures (a :class:`~pneumoscope.errors.PneumoscopeError`: bad data, a bad path,
    flag or setting; a full or read-only disk; out of memory; a damaged model file) get one
    line. Anything else, a bare ValueError or RuntimeError included, is a bug, and its
    traceback is logged first.
    """
    from ..errors import PneumoscopeError
    from ..outputs import describe_os_error

    damaged = _damaged_model_file(err, model_file)
    if damaged:
        return damaged
    if isinstance(err, OSError):
        return describe_os_error(err)
    if isinstance(err, MemoryError) or _is_torch_out_of_memory(err):
        return (
            "out of memory. Fix: a smaller --batch-size or --limit; if a checkpoint was edited, check its "
            "preprocessing input_size (224 to 260 for the registered backbones)"
        )
    if isinstance(err, PneumoscopeError):
        return " ".join(str(err).split())
    logger.error("unexpected error (a bug: please report it with this traceback)", exc_info=err)
    return f"unexpected {type(err).__name__}: {' '.join(str(err).split())}"


def _is_torch_out_of_memory(err: Exception) -> bool:
    """PyTorch's out-of-memory error (a RuntimeError, not a MemoryError), without importing torch here."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, getattr(torch, "OutOfMemoryError", ()))


def _damaged_model_file(err: Exception, model_file: str | None) -> str | None:
    """Truncated or edited checkpoints and ONNX files, named, with the fix; None for other errors.

    The loaders raise whatever their libraries raise (safetensors' SafetensorError,
    PyTorch's RuntimeError from load_state_dict, ONNX Runtime's own classes); they are
    recognised here, at the command line's edge, so the library keeps its exceptions.
    """
    from safetensors import SafetensorError

    name = model_file or "the model file"
    if model_file and Path(model_file).is_dir():
        name = str(Path(model_file) / "model.safetensors")
    detail = " ".join(str(err).split())[:300]
    if isinstance(err, SafetensorError):
        return f"{name}: the checkpoint is damaged or truncated ({detail}). Fix: copy it again from where it was made, or train it again."
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err):
        return f"{name}: the checkpoint's tensors do not match its description ({detail}). Fix: use the file as `pneumoscope train` wrote it, or train again."
    if type(err).__module__.startswith("onnxruntime"):
        name = model_file if str(model_file).endswith(".onnx") else "the exported model"
        return f"{name}: ONNX Runtime cannot load it ({detail}). Fix: export it again with `pneumoscope export`."
    return None


if __name__ == "__main__":
    sys.exit(main())
