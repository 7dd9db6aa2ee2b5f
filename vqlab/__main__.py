"""Command line: `python -m vqlab train ...` (float baselines) and `python -m vqlab sweep ...` (studies).

Bad arguments (unknown model or dataset, K < 2, d < 1, negative epochs, an output path that cannot be
used) are found before any work and reported as one line `error: ...` on stderr with exit status 2, as
argparse does; a dataset that is missing or damaged is reported the same way with status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _check_train_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.out is not None and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the checkpoint file path (e.g. {Path(args.out) / 'model.pt'})")


def _check_model_and_dataset(args: argparse.Namespace) -> None:
    """Unknown dataset or model names, or a model that cannot take the dataset's images (ValueError)."""
    from .data import dataset_info
    from .models import get_model

    info = dataset_info(args.dataset)
    try:
        get_model(args.model, num_classes=info.num_classes, in_channels=info.channels, input_size=info.size)
    except ValueError as err:
        if "unknown model" in str(err):
            raise
        raise ValueError(f"model {args.model!r} cannot take {info.name} images "
                         f"({info.channels}x{info.size}x{info.size}): {err}") from None


def _train(args: argparse.Namespace) -> int:
    from .train import train_or_load

    _, meta = train_or_load(args.model, args.dataset, epochs=args.epochs, seed=args.seed, lr=args.lr,
                            batch_size=args.batch_size, path=args.out, progress=not args.quiet)
    print(json.dumps(meta, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vqlab", description="vqlab: vector quantization of network weights")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a float baseline and save it (skipped when the file exists)")
    t.add_argument("--dataset", default="fashion-mnist")
    t.add_argument("--model", default="lenet5")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="checkpoint path (default data/checkpoints/<model>_<dataset>_e<epochs>_s<seed>.pt)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_train, check=_check_train_args)
    from .experiments import add_sweep_command

    add_sweep_command(sub)
    return p


def _error(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Parse, check every argument before any work, run; returns the exit status (2 = bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "model") and hasattr(args, "dataset"):
            _check_model_and_dataset(args)
        if getattr(args, "check", None) is not None:
            args.check(args)
    except (TypeError, ValueError) as err:
        return _error(" ".join(str(err).split()), 2)
    from .data import DatasetCorruptError, DatasetNotFoundError

    try:
        return args.func(args)
    except (DatasetNotFoundError, DatasetCorruptError) as err:
        return _error(str(err), 1)


if __name__ == "__main__":
    sys.exit(main())
