"""Command line: `python -m vqlab train ...` (float baselines) and `python -m vqlab sweep ...` (studies)."""
from __future__ import annotations

import argparse
import json
import sys


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
    t.set_defaults(func=_train)
    try:
        from .experiments import add_sweep_command  # registered once the experiments module exists
        add_sweep_command(sub)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
