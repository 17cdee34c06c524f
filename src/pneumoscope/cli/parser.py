"""The ``pneumoscope`` parser: global options, and one sub-parser per command with its arguments, help and examples."""

from __future__ import annotations

import argparse
import sys

from .commands import (
    EXIT_FAILED,
    cmd_adapt,
    cmd_calibrate,
    cmd_compare,
    cmd_demo,
    cmd_evaluate,
    cmd_explain,
    cmd_export,
    cmd_inspect,
    cmd_pack,
    cmd_predict,
    cmd_serve,
    cmd_shift,
    cmd_train,
)
from .options import _add_policy_args, _add_task_args, _add_train_args, _command, _loudness, seed_arg

RUN = "run folder made by `pneumoscope train` (or its model.safetensors)"
RUN_OR_ONNX = RUN[:-1] + ", or an .onnx file made by `pneumoscope export`)"
DATA = "Kaggle chest_xray folder (train/ val/ test/), folder of NORMAL/ and PNEUMONIA/, a .zip of either, or a PneumoniaMNIST .npz"
OVERWRITE = "replace --out if it exists"
CACHE_DIR = "feature cache folder (default: $PNEUMOSCOPE_CACHE or the user cache folder)"


def _lists_commands(parser: argparse.ArgumentParser):
    """For a parser given no subcommand: its help (which lists them) on stderr, and exit status 2."""

    def run(args) -> int:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: a command is required; choose one of:\n{_subcommands(parser)}", file=sys.stderr)
        return EXIT_FAILED

    return run


def _subcommands(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "\n".join(f"  {c.dest:<10} {c.help}" for c in sub._choices_actions)


def build_parser() -> argparse.ArgumentParser:
    """The ``pneumoscope`` parser: global options, then one sub-parser per command (in the order ``--help`` lists them)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="pneumoscope",
        description="Chest X-ray PNEUMONIA vs NORMAL: train, evaluate, explain, predict.",
        epilog="examples:\n  pneumoscope train ../shared/data/chest_xray --out runs/a\n  pneumoscope predict runs/a chest.jpeg\n"
        "run `pneumoscope COMMAND --help` for a command's options and examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pneumoscope {__version__}")
    _loudness(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(func=_lists_commands(parser))
    for add in (
        _add_data_parser,
        _add_train_parser,
        _add_evaluate_parser,
        _add_calibrate_parser,
        _add_shift_parser,
        _add_adapt_parser,
        _add_pack_parser,
        _add_export_parser,
        _add_serve_parser,
        _add_compare_parser,
        _add_explain_parser,
        _add_predict_parser,
        _add_demo_parser,
    ):
        add(sub)
    return parser


def _add_data_parser(sub) -> None:
    """``data`` and its sub-command ``data inspect``."""
    data_parser = _command(sub, "data", "dataset tools: data inspect", "pneumoscope data inspect ../shared/data/chest_xray")
    data = data_parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_parser.set_defaults(func=_lists_commands(data_parser))
    p = _command(
        data,
        "inspect",
        "counts, patients, leakage check, unreadable files",
        "pneumoscope data inspect ../shared/data/chest_xray",
        "pneumoscope data inspect data.zip --json > summary.json",
    )
    p.add_argument("data", metavar="DATA", help=DATA)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (every unreadable file listed)")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of train patients held out for validation, as train cuts it (default 0.1)"
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of that cut, as train's --seed (default 0)")
    _add_task_args(p)
    p.set_defaults(func=cmd_inspect)


def _add_train_parser(sub) -> None:
    """``train``: the data, the run folder, and the training options."""
    p = _command(
        sub,
        "train",
        "train a model (frozen backbone, cached features, head with early stopping)",
        "pneumoscope train ../shared/data/chest_xray --out runs/a",
        "pneumoscope train data.zip --out runs/b --backbone resnet50 --target-sensitivity 0.95",
    )
    p.add_argument("data", metavar="DATA", help=DATA)
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--resume", action="store_true", help="continue a fine-tuning run that was killed")
    p.add_argument("--seeds", type=seed_arg, nargs="+", help="train one run per seed into OUT/seed-N and report mean ± sd")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate_parser(sub) -> None:
    """``evaluate``: a run on labelled data."""
    p = _command(
        sub,
        "evaluate",
        "metrics, predictions and figures on labelled data",
        "pneumoscope evaluate runs/a ../shared/data/chest_xray --out runs/a-eval",
    )
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("data", metavar="DATA", help=DATA + " (labelled)")
    p.add_argument("--out", required=True, help="folder to write: report.html, metrics.json, predictions.csv, figures")
    p.add_argument("--split", default="test", help="split of a Kaggle root or npz (a folder of class folders is used whole)")
    p.add_argument("--limit", type=int, help="at most N images (quick runs)")
    p.add_argument("--bootstraps", type=int, default=2000, help="patient-level bootstrap resamples for AUC intervals")
    p.add_argument("--no-audit", dest="audit", action="store_false", help="skip the shortcut audit (border/centre masking, CAM mass)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over shifted and zoomed copies")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.add_argument("--cache-dir", help=CACHE_DIR)
    p.set_defaults(func=cmd_evaluate)


def _add_calibrate_parser(sub) -> None:
    """``calibrate``: temperature and threshold refitted on a labelled local sample."""
    p = _command(
        sub,
        "calibrate",
        "refit temperature and threshold on a labelled local sample; writes a new run",
        "pneumoscope calibrate runs/a site_labelled/ --out runs/a-site --target-sensitivity 0.95",
    )
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("data", metavar="DATA", help="labelled local images (folder of class folders, Kaggle root, .zip or .npz)")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--split", default="val", help="split of a Kaggle root or npz to calibrate on (a folder of class folders is used whole)")
    p.add_argument(
        "--refit-head",
        action="store_true",
        help="also refit the head on these images beside the run's training sample (temperature and threshold then cross-fitted)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.add_argument("--cache-dir", help=CACHE_DIR)
    _add_policy_args(p)
    p.set_defaults(func=cmd_calibrate)


def _site_command(sub, name: str, help: str, func, out_help: str, out_required: bool, example: str) -> argparse.ArgumentParser:
    """A command over a run and a site's unlabelled images (``shift``, ``adapt``): their shared arguments."""
    p = _command(sub, name, help, example)
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument(
        "site",
        metavar="SITE_IMAGES",
        help="folder or .zip of the site's images, searched recursively; folder names are not read as labels",
    )
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--seed", type=seed_arg, default=0, help="for the permutation test and the domain classifier's folds")
    p.add_argument("--cache-dir", help=CACHE_DIR)
    p.set_defaults(func=func)
    return p


def _add_shift_parser(sub) -> None:
    """``shift``: how a site's images differ from the training split."""
    p = _site_command(
        sub,
        "shift",
        "does a site's set of images differ from the training split? two-sample test, prevalence, verdict",
        cmd_shift,
        "also write the report as JSON",
        False,
        "pneumoscope shift runs/a site_images/ --out shift.json",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_adapt_parser(sub) -> None:
    """``adapt``: a run adapted to a site's unlabelled images."""
    from ..choices import ADAPT_METHODS

    p = _site_command(
        sub,
        "adapt",
        "adapt a run to a site's unlabelled images; writes a new run",
        cmd_adapt,
        "new run folder",
        True,
        "pneumoscope adapt runs/a site_images/ --out runs/a-adapted",
    )
    p.add_argument(
        "--method",
        default=None,
        choices=ADAPT_METHODS,
        help="center: feature means moved to the training split's; standardize: means and sds; +prior: probabilities moved "
        "to the site's estimated prevalence (default center+prior for two classes, center for more: see BENCHMARKS.md)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)


def _add_pack_parser(sub) -> None:
    """``pack``: a dataset written as one compact .zip."""
    p = _command(
        sub,
        "pack",
        "write a dataset as one compact .zip (images squashed to at most SIZE px) that train reads directly",
        "pneumoscope pack ../shared/data/chest_xray --out chest_xray.zip",
    )
    p.add_argument("data", metavar="DATA", help=DATA)
    p.add_argument("--out", required=True, help="the .zip to write")
    p.add_argument("--size", type=int, default=256, help="largest side kept (default 256); smaller images are stored byte for byte")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images (default 90)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.set_defaults(func=cmd_pack)


def _add_export_parser(sub) -> None:
    """``export``: a run as an ONNX file."""
    p = _command(
        sub,
        "export",
        "ONNX export (preprocessing, threshold, OOD guard in its metadata) with a parity check",
        "pneumoscope export runs/a --out model.onnx --check-images ../shared/data/chest_xray/val",
    )
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--check-images", nargs="*", help="images or folders for the parity check (default: 4 generated images)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.set_defaults(func=cmd_export)


def _add_serve_parser(sub) -> None:
    """``serve``: the web page and JSON API."""
    p = _command(
        sub,
        "serve",
        "web page and JSON API (POST /predict, POST /predict/batch, GET /health)",
        "pneumoscope serve runs/a",
        "pneumoscope serve model.onnx --port 8080",
    )
    p.add_argument("run", metavar="RUN_OR_ONNX", help=RUN_OR_ONNX[:-1] + "; no heatmaps with ONNX)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on, 1-65535 (default 8000)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name clients may use in the Host header besides the bound address and localhost (repeatable)",
    )
    p.set_defaults(func=cmd_serve)


def _add_compare_parser(sub) -> None:
    """``compare``: two evaluations of the same images, paired."""
    p = _command(
        sub,
        "compare",
        "paired comparison of two evaluations of the same images (DeLong, McNemar)",
        "pneumoscope compare runs/a-eval runs/b-eval --out a-vs-b.json",
    )
    p.add_argument("eval_a", metavar="EVAL_A", help="evaluation folder made by `pneumoscope evaluate` (its predictions.csv is read)")
    p.add_argument("eval_b", metavar="EVAL_B", help="another, of the same images")
    p.add_argument("--out", help="write the result as JSON")
    p.set_defaults(func=cmd_compare)


def _add_explain_parser(sub) -> None:
    """``explain``: CAM overlays and their checks."""
    from ..choices import CAM_METHOD_CLASSES

    p = _command(sub, "explain", "Grad-CAM overlays", "pneumoscope explain runs/a chest.jpeg other_xrays/ --out cams")
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--out", required=True, help="folder to write: one overlay PNG per image and explanations.json")
    p.add_argument(
        "--target",
        default="predicted",
        metavar="predicted|CLASS",
        help="class to explain: predicted (default: the class decided at the model's threshold) or one of the run's classes "
        "(normal, pneumonia, or any class of an N-class run; any case)",
    )
    p.add_argument("--method", default="gradcam", choices=list(CAM_METHOD_CLASSES), help="CAM method (default gradcam)")
    p.add_argument("--no-checks", dest="checks", action="store_false", help="skip the faithfulness, sanity and shortcut checks")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.set_defaults(func=cmd_explain)


def _add_predict_parser(sub) -> None:
    """``predict``: rows of decisions over images, folders and archives."""
    p = _command(
        sub,
        "predict",
        "probability, label, threshold and OOD flag per image",
        "pneumoscope predict runs/a chest.jpeg",
        "pneumoscope predict model.onnx xrays/ archive.zip --out rows.csv",
    )
    p.add_argument("run", metavar="RUN_OR_ONNX", help=RUN_OR_ONNX)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR_OR_ZIP", help="image files, folders (searched recursively) or .zip archives")
    p.add_argument("--from-list", metavar="FILE", help="a text file of such paths, one a line (# comments and blank lines skipped)")
    p.add_argument("--out", help="write rows here as each batch finishes: .csv, .jsonl, or .parquet (needs pyarrow); default stdout")
    p.add_argument("--format", default="csv", choices=["csv", "json"], help="format on stdout (with --out, its suffix decides)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=2, help="processes that decode images (default 2; 0: the main process)")
    p.add_argument("--resume", action="store_true", help="continue a killed run: rows already in --out are kept and not predicted again")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over shifted and zoomed copies")
    p.set_defaults(func=cmd_predict)


def _add_demo_parser(sub) -> None:
    """``demo``: train, evaluate and explain in one go."""
    p = _command(
        sub,
        "demo",
        "train -> evaluate -> explain on DATA, $PNEUMOSCOPE_DATA, or downloaded PneumoniaMNIST",
        "pneumoscope demo --data ../shared/data/chest_xray",
        "pneumoscope demo --epochs 20",
    )
    p.add_argument("--data", help=DATA + " (default: $PNEUMOSCOPE_DATA, else PneumoniaMNIST, downloaded once)")
    p.add_argument("--out", help="results folder (default runs/demo-<time>)")
    _add_train_args(p)
    p.set_defaults(func=cmd_demo)
