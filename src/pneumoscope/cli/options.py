"""Options several commands share (-q/-v, training, task, threshold policy), and the training settings they make."""

from __future__ import annotations

import argparse

MAX_SEED = 2**32 - 1  # NumPy's and PyTorch's generators take seeds up to here


def seed_arg(text: str) -> int:
    """A ``--seed``: a whole number from 0 to :data:`MAX_SEED` (argparse's type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 to {MAX_SEED:,} (2**32 - 1)")
    return value


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Training options. Defaults come from TrainConfig, then --config YAML, then these flags, then --set."""
    from ..data.augment import PRESETS
    from ..models.backbones import BACKBONES, PRETRAINED, UNFREEZE
    from ..training.tracking import LOGGERS

    S = argparse.SUPPRESS
    p.add_argument("--config", help="YAML file of training settings (TrainConfig field names)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set finetune.lr=3e-5 (or finetune_lr=3e-5)",
    )
    _add_task_args(p, default=S)
    p.add_argument(
        "--normal-class",
        default=S,
        help="N > 2 classes: the class the screening decision (normal vs not, with its threshold) is taken against (default NORMAL)",
    )
    p.add_argument("--backbone", choices=sorted(BACKBONES), default=S, help="default efficientnet_lite0")
    p.add_argument("--pretrained", choices=PRETRAINED, default=S, help="ImageNet weights or random initialisation")
    p.add_argument("--weights", default=S, help="local state dict (.pth/.safetensors, timm key names) for the backbone")
    p.add_argument("--epochs", type=int, default=S, help="head epochs (default 100)")
    p.add_argument("--patience", type=int, default=S, help="early stopping on val loss (default 10)")
    p.add_argument(
        "--seed", type=seed_arg, default=S, help="seed of the patient split, the head's initialisation and its batches (default 0)"
    )
    p.add_argument("--batch-size", type=int, default=S, help="head training batch size (default 64)")
    p.add_argument("--val-fraction", type=float, default=S, help="share of train patients held out for validation (default 0.1)")
    p.add_argument("--limit", type=int, default=S, help="at most N images per split (quick runs)")
    p.add_argument("--workers", dest="num_workers", type=int, default=S, help="image decoding worker processes (default 1)")
    p.add_argument("--cache-dir", default=S, help="feature and image cache (default: $PNEUMOSCOPE_CACHE or the user cache dir)")
    p.add_argument("--finetune-epochs", type=int, default=S, help="stage 2: fine-tune the backbone for up to N epochs (default 0: off)")
    p.add_argument("--unfreeze", choices=UNFREEZE, default=S, help="stage 2: the top layers (default) or the whole backbone")
    p.add_argument("--finetune-lr", type=float, default=S, help="stage 2 AdamW learning rate for the backbone (head 10x; default 1e-4)")
    a = p.add_mutually_exclusive_group()
    a.add_argument("--augment", metavar="PRESET", default=S, help=f"stage 2 augmentation: {', '.join(PRESETS)} (see BENCHMARKS.md)")
    a.add_argument("--no-augment", dest="augment", action="store_const", const="none", default=S, help="stage 2 without augmentation")
    p.add_argument("--devices", default=S, help="stage 2: devices per node (an integer, or auto)")
    p.add_argument("--num-nodes", type=int, default=S, help="stage 2: machines (default 1)")
    p.add_argument("--accelerator", default=S, help="stage 2: auto, cpu, gpu")
    p.add_argument(
        "--logger",
        choices=list(LOGGERS),
        default=S,
        help="training logs of both stages in RUN/logs: csv (default; always written), or tensorboard or mlflow beside it",
    )
    _add_policy_args(p, default=S)


def _add_task_args(p: argparse.ArgumentParser, default=None) -> None:
    """Which classes the data's folders (or file names) give."""
    from ..data.layouts import LABEL_SOURCES

    p.add_argument(
        "--classes",
        default=default,
        metavar="auto|A,B,...",
        help="the task's classes: auto (every class folder, sorted, as Keras' loader does) or names in order "
        "(default NORMAL,PNEUMONIA; other folders are ignored with a warning)",
    )
    p.add_argument(
        "--labels",
        choices=LABEL_SOURCES,
        default=default,
        help="folders (default), or pneumonia-type: NORMAL / BACTERIA / VIRUS from Kermany's file names (person12_bacteria_45.jpeg)",
    )


def _add_policy_args(p: argparse.ArgumentParser, default=None) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--target-sensitivity", type=float, default=default, help="threshold: the highest reaching this sensitivity (default: Youden's J)"
    )
    g.add_argument("--target-specificity", type=float, default=default, help="threshold: the lowest reaching this specificity")


def _policy(args) -> tuple[str, float | None]:
    if getattr(args, "target_sensitivity", None) is not None:
        return "sensitivity", args.target_sensitivity
    if getattr(args, "target_specificity", None) is not None:
        return "specificity", args.target_specificity
    return "youden", None


def _config(args):
    from ..training.config import load_train_config, setting_name

    flags = {k: v for k, v in vars(args).items() if setting_name(k) is not None}  # the flags given (the rest are suppressed)
    if "devices" in flags and str(flags["devices"]).isdigit():
        flags["devices"] = int(flags["devices"])
    policy, target = _policy(args)
    if policy != "youden":
        flags.update(threshold_policy=policy, threshold_target=target)
    return load_train_config(args.config, flags, args.set)


def _loudness(parser: argparse.ArgumentParser, default) -> None:
    """-q/-v on ``parser``. Each command takes them too (default SUPPRESS there, so one given before the command stays)."""
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only, no progress bars")
    loud.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug messages, and other libraries' INFO messages too"
    )


def _command(sub, name: str, help: str, *examples: str) -> argparse.ArgumentParser:
    """A command's parser: its help, -q/-v, and its examples (real command lines) under its --help."""
    common = argparse.ArgumentParser(add_help=False)
    _loudness(common, argparse.SUPPRESS)
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    return sub.add_parser(
        name, help=help, description=help, epilog=epilog, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter
    )
