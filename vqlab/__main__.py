"""Command line: `python -m vqlab train ...` (float baselines), `python -m vqlab sweep ...` (studies) and
`python -m vqlab finetune ...` (quantize a baseline, fine-tune the codebooks, save a .vqz).

Every command also runs under torchrun, e.g. `torchrun --nproc_per_node 2 -m vqlab finetune ...`: training
is data-parallel (DDP), sweeps split their grid across the ranks, and only rank 0 prints and writes.

Bad arguments (unknown model or dataset, K < 2 or larger than a layer's segments, a d that does not divide a
layer, negative epochs, a learning rate that is not a finite positive number, an output path that cannot be
written, a --baseline that is a folder, a .vqz, not a checkpoint or another model's) are found before any work and
reported as one line `error: ...` on stderr with exit status 2, as argparse does; a dataset that is missing or
damaged, or a torchrun rank that went silent (`vqlab.distributed.SilentRankError`), is reported the same way with
status 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path


def _check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {lr}")


def _check_writable(flag: str, path: Path) -> None:
    """`path` can be written: not a folder, and its nearest existing folder takes a new file (probed by creating
    and removing one: permission bits do not tell, e.g. /proc as root)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give the file to write (e.g. {path / 'model.vqz'})")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vqlab-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None


def _check_checkpoint(flag: str, path: Path, args: argparse.Namespace) -> None:
    """A float baseline checkpoint that exists must be one vqlab wrote for this model and dataset (a plain
    state_dict plus metadata); one that does not exist will be written, so its folder must take it.  Under
    torchrun only rank 0 reads the file, so only rank 0 checks what it holds."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give the checkpoint file (e.g. {path / 'model.pt'})")
    if not path.exists():
        _check_writable(flag, path)
        return
    if os.environ.get("RANK", "0") != "0":
        return
    import torch

    from .data import dataset_info
    from .models import get_model

    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89VQLAB\r\n":
        raise ValueError(f"{flag} {path} is a vqlab .vqz file (a saved, possibly quantized model), not a float "
                         f"baseline checkpoint (.pt from `python -m vqlab train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                       # noqa: BLE001  whatever torch.load refuses
        raise ValueError(f"{flag} {path} is not a checkpoint torch can read ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise ValueError(f"{flag} {path} is not a vqlab baseline checkpoint (a dict with 'state_dict' and 'meta')")
    info = dataset_info(args.dataset)
    model = get_model(args.model, num_classes=info.num_classes, in_channels=info.channels, input_size=info.size)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise ValueError(f"{flag} {path} holds another model's weights, not {args.model} for {info.name} "
                         f"({first[0].strip()[:160]})") from None


def _check_train_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    _check_lr(args.lr)
    if args.out is not None:
        _check_checkpoint("--out", Path(args.out), args)


def _check_vq_setting(args: argparse.Namespace) -> None:
    """The VQ setting fits every layer `quantize_` will quantize (all but the first conv and the last linear) of
    the model for this dataset: d divides each layer's segmented dimension, K is at most its segments."""
    import torch.nn as nn

    from .data import dataset_info
    from .methods.vq import VQConfig, weight_segments
    from .models import get_model
    from .quantize import keep_first_last

    info = dataset_info(args.dataset)
    model = get_model(args.model, num_classes=info.num_classes, in_channels=info.channels, input_size=info.size)
    config = VQConfig(k=args.k, d=args.d, seed=args.seed, codebook=args.codebook, reassign_every=args.reassign_every)
    keep = keep_first_last(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and keep(m, n)]
    try:
        for name, m in layers:
            config.check(m, name)
        if args.codebook == "shared":
            total = sum(len(weight_segments(m, args.d, segment=config.segment)) for _, m in layers)
            if args.k > total:
                raise ValueError(f"the shared codebook serves {total} segments, fewer than K={args.k}")
    except ValueError as e:
        raise ValueError(f"-k {args.k} -d {args.d}: {e}") from None


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
    from . import distributed as vdist
    from .train import train_or_load

    _, meta = train_or_load(args.model, args.dataset, epochs=args.epochs, seed=args.seed, lr=args.lr,
                            batch_size=args.batch_size, path=args.out, progress=not args.quiet)
    if vdist.is_main():                                         # torchrun: rank 0 speaks
        print(json.dumps(meta, indent=2, default=str))
    return 0


def _check_finetune_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--k", args.k, 2), ("--d", args.d, 1), ("--epochs", args.epochs, 1),
                             ("--base-epochs", args.base_epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-steps", args.max_steps, 1), ("--reassign-every", args.reassign_every, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    _check_lr(args.lr)
    out = Path(args.out)
    if not out.parent.exists():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    _check_writable("--out", out)
    if args.baseline is not None:
        _check_checkpoint("--baseline", Path(args.baseline), args)
    _check_vq_setting(args)


def _finetune(args: argparse.Namespace) -> int:
    """Baseline (trained if missing) -> quantize_ -> fit -> evaluate -> save on rank 0; one JSON summary."""
    import time

    from . import distributed as vdist
    from .data import load_dataset
    from .io import save
    from .methods.vq import VQConfig
    from .quantize import quantize_
    from .size import compressed_size
    from .train import evaluate, fit, train_or_load

    joined = vdist.init()
    main_rank = vdist.is_main()
    try:
        model, meta = train_or_load(args.model, args.dataset, epochs=args.base_epochs, seed=args.seed,
                                    path=args.baseline, progress=not args.quiet and main_rank)
        train, test = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
        quantize_(model, VQConfig(k=args.k, d=args.d, seed=args.seed, codebook=args.codebook,
                                  reassign_every=args.reassign_every), progress=False)
        acc_q = evaluate(model, test)
        t0 = time.perf_counter()
        hist = fit(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                   max_steps=args.max_steps, progress=not args.quiet)
        seconds = time.perf_counter() - t0
        acc_ft = evaluate(model, test)
        summary = {"model": args.model, "dataset": args.dataset, "k": args.k, "d": args.d,
                   "processes": vdist.world_size(), "baseline_acc": meta.get("test_acc"), "quantized_acc": acc_q,
                   "finetuned_acc": acc_ft, "steps": int(hist["steps"].iloc[-1]), "seconds": seconds,
                   "images_per_s": min(int(hist["steps"].iloc[-1]) * args.batch_size, len(train) * args.epochs) / seconds,
                   "ratio": compressed_size(model).ratio, "out": str(args.out)}
        if main_rank:
            summary["bytes"] = save(model, args.out)
            print(json.dumps(summary, indent=2, default=str))
        vdist.barrier()
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _add_finetune_command(sub) -> None:
    f = sub.add_parser("finetune", help="quantize a float baseline (VQ, K x d), fine-tune it and save a .vqz "
                                        "(data-parallel under torchrun)")
    f.add_argument("--dataset", default="fashion-mnist")
    f.add_argument("--model", default="lenet5")
    # -k/-d: under torchrun write `-d 2`; torchrun's own parser reads `--d` as an abbreviation of its
    # --duplicate-*-filters options and stops with "ambiguous option"
    f.add_argument("-k", "--k", type=int, default=16, help="codewords per codebook")
    f.add_argument("-d", "--d", type=int, default=2, help="weights per segment (index); under torchrun write -d")
    f.add_argument("--codebook", default="layer", choices=["layer", "shared"], help="one per layer, or one for all")
    f.add_argument("--reassign-every", type=int, default=0, help="re-assign segments every N steps (0 = never)")
    f.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs")
    f.add_argument("--max-steps", type=int, default=None)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch-size", type=int, default=128, help="global batch (split across torchrun ranks)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--base-epochs", type=int, default=10, help="epochs of the float baseline (trained if missing)")
    f.add_argument("--baseline", default=None, help="float baseline checkpoint (default "
                                                    "data/checkpoints/<model>_<dataset>_e<base-epochs>_s<seed>.pt)")
    f.add_argument("--out", required=True, help="the .vqz file to write (rank 0)")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_finetune, check=_check_finetune_args)


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
    _add_finetune_command(sub)
    return p


def _error(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Parse, check every argument before any work, run; returns the exit status (2 = bad arguments)."""
    args = build_parser().parse_args(argv)
    from .distributed import SilentRankError, timeout_seconds

    try:
        timeout_seconds()                                   # $VQLAB_DIST_TIMEOUT, before any work
        if hasattr(args, "model") and hasattr(args, "dataset"):
            _check_model_and_dataset(args)
        if getattr(args, "check", None) is not None:
            args.check(args)
    except (TypeError, ValueError) as err:
        return _error(" ".join(str(err).split()), 2)
    from .data import DatasetCorruptError, DatasetNotFoundError

    try:
        return args.func(args)
    except (DatasetNotFoundError, DatasetCorruptError, SilentRankError) as err:
        return _error(str(err), 1)


if __name__ == "__main__":
    sys.exit(main())
