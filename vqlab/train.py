"""Training and evaluation: `fit(model, train_ds, ...)` and `evaluate(model, ds)`.

Deterministic under a seed on CPU: the seed fixes torch's global RNG (dropout, re-seeded codes)
and the batch order.  Device: CUDA when present unless `device=` says otherwise.
"""
from __future__ import annotations

import time
from typing import Callable

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from ._utils import default_device, seed_everything
from .data import loader

__all__ = ["fit", "evaluate", "predict", "train_or_load", "checkpoint_path"]


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    # a model already on an accelerator stays there; a CPU model goes to CUDA when present
    return p.device if p is not None and p.device.type != "cpu" else default_device()


def _optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


@torch.no_grad()
def predict(model: nn.Module, ds: TensorDataset, batch_size: int = 1000, device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted labels (N,) int64 for every image of `ds`, in eval mode (restores the previous mode)."""
    dev = _model_device(model, device)
    was_training = model.training
    model.to(dev).eval()
    out = [model(x.to(dev)).argmax(1).cpu() for x, _ in loader(ds, batch_size)]
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, ds: TensorDataset, batch_size: int = 1000, device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of `model` on `ds`, a float in [0, 1]."""
    return (predict(model, ds, batch_size, device) == ds.tensors[1]).float().mean().item()


def fit(model: nn.Module, train_ds: TensorDataset, epochs: int = 1, lr: float = 1e-3, batch_size: int = 128,
        seed: int = 0, optimizer: str = "adam", weight_decay: float = 0.0, val_ds: TensorDataset | None = None,
        max_steps: int | None = None, device: str | torch.device | None = None, progress: bool = True,
        on_step: Callable[[nn.Module, int], None] | None = None) -> pd.DataFrame:
    """Train `model` in place with cross-entropy; return the history as a DataFrame.

    train_ds: TensorDataset(x (N, C, H, W), y (N,) int64) — see `vqlab.load_dataset`.
    epochs, lr, batch_size: the usual; the learning rate follows a cosine decay over all steps.
    seed: fixes batch order and torch's RNG, so the same seed gives identical weights on CPU.
    max_steps: stop early after this many optimizer steps (fast modes, tests).
    on_step: called as on_step(model, step) after every optimizer step (e.g. record codebook drift).
    progress: tqdm.auto bar (notebook or terminal); False turns it off.
    returns: one row per epoch: epoch, steps, loss (mean train loss), train_acc, val_acc (NaN without
        val_ds), seconds.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    seed_everything(seed)
    dev = _model_device(model, device)
    model.to(dev).train()
    opt = _optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    batches = loader(train_ds, batch_size, shuffle=True, seed=seed)
    total = epochs * len(batches) if max_steps is None else min(max_steps, epochs * len(batches))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    rows, step = [], 0
    bar = tqdm(total=total, desc="fit", unit="step", disable=not progress, leave=False)
    for epoch in range(1, epochs + 1):
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        model.train()
        for x, y in batches:
            if step >= total:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(model, step)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        val = evaluate(model, val_ds, device=dev) if val_ds is not None else float("nan")
        rows.append({"epoch": epoch, "steps": step, "loss": loss_sum / max(seen, 1),
                     "train_acc": correct / max(seen, 1), "val_acc": val, "seconds": time.perf_counter() - t0})
        if step >= total:
            break
    bar.close()
    model.eval()
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- float baselines on disk

def checkpoint_path(model_name: str, dataset: str, epochs: int, seed: int = 0) -> "Path":
    """Where the float baseline for (model, dataset, epochs, seed) lives: data/checkpoints/<...>.pt."""
    from .data import REPO_DATA_DIR

    return REPO_DATA_DIR / "checkpoints" / f"{model_name}_{dataset}_e{epochs}_s{seed}.pt"


def train_or_load(model_name: str = "lenet5", dataset: str = "fashion-mnist", epochs: int = 10, seed: int = 0,
                  lr: float = 3e-3, batch_size: int = 64, path: "str | Path | None" = None,
                  progress: bool = True) -> tuple[nn.Module, dict]:
    """A trained float baseline: loaded from `path` (default `checkpoint_path(...)`) or trained and saved there.

    Same call as `python -m vqlab train`.  Returns (model in eval mode on CPU, info dict with
    test_acc, epochs, seconds and the path).  The file is a plain state_dict plus metadata (< 2 MB
    for LeNet-5 and the small CNN).
    """
    from pathlib import Path

    from .data import dataset_info, load_dataset
    from .models import get_model

    info = dataset_info(dataset)
    path = Path(path) if path is not None else checkpoint_path(model_name, info.name, epochs, seed)
    torch.manual_seed(seed)
    model = get_model(model_name, num_classes=info.num_classes, in_channels=info.channels, input_size=info.size)
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        return model.eval(), blob["meta"]
    t0 = time.perf_counter()
    fit(model, load_dataset(info.name, "train"), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        progress=progress, device="cpu")
    meta = {"model": model_name, "dataset": info.name, "epochs": epochs, "seed": seed, "lr": lr,
            "batch_size": batch_size, "test_acc": evaluate(model, load_dataset(info.name, "test")),
            "seconds": time.perf_counter() - t0, "torch": str(torch.__version__)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model.eval(), {**meta, "path": str(path)}
