"""Training and evaluation: `fit(model, train_ds, ...)` and `evaluate(model, ds)`.

Deterministic under a seed on CPU: the seed fixes torch's global RNG (dropout, re-seeded codes)
and the batch order.  Device: CUDA when present unless `device=` says otherwise.

Half precision: `fit` keeps a float32 master copy of every float16/bfloat16 trainable parameter
(e.g. codebooks from `VQConfig(codebook_dtype="float16")`).  The optimizer steps the masters (Adam's
moments and eps underflow in float16 and turn every parameter into NaN otherwise); after each step
the masters are rounded back into the model's parameters, which keep their dtype.
A non-finite loss stops `fit` with `NonFiniteLossError` before that step changes the model.
"""
from __future__ import annotations

import math
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

__all__ = ["fit", "evaluate", "predict", "train_or_load", "checkpoint_path", "NonFiniteLossError"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


class NonFiniteLossError(FloatingPointError):
    """`fit` met a NaN/Inf loss (or float16/bfloat16 gradient); raised before the optimizer step.

    Attributes: step (1-based optimizer step that failed), epoch, lr (learning rate at that step).
    """

    def __init__(self, message: str, *, step: int, epoch: int, lr: float):
        super().__init__(message)
        self.step, self.epoch, self.lr = step, epoch, lr


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


class _MasterParams:
    """float32 master copies of the float16/bfloat16 trainable parameters for the optimizer.

    `params` is what the optimizer steps: the float32/float64 parameters themselves and one float32
    master per low-precision parameter.  `to_masters()` casts the model's gradients onto the masters;
    `to_model()` copies the stepped masters back (rounded to each parameter's dtype).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self.pairs: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        self.params: list[torch.Tensor] = []
        for name, p in named:
            if p.dtype in LOW_PRECISION:
                master = p.detach().float().requires_grad_(True)   # a new float32 tensor
                self.pairs.append((name, p, master))
                self.params.append(master)
            else:
                self.params.append(p)

    def zero_grad(self) -> None:
        for _, p, master in self.pairs:
            p.grad = master.grad = None

    def to_masters(self) -> str | None:
        """Cast gradients onto the masters; return the name of the first one that is not finite (else None)."""
        checks = []
        for name, p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
            if master.grad is not None:
                checks.append((name, torch.isfinite(master.grad).all()))
        if not checks or bool(torch.stack([ok for _, ok in checks]).all()):  # one device sync
            return None
        return next(name for name, ok in checks if not ok)

    @torch.no_grad()
    def to_model(self) -> None:
        for _, p, master in self.pairs:
            p.copy_(master)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _non_finite(what: str, *, step: int, total: int, epoch: int, lr: float) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"fit: {what} at step {step} of {total} (epoch {epoch}, lr={lr:g}); stopped before the optimizer "
        f"step, so the parameters are those after step {step - 1}.  Lower lr, check the inputs for "
        f"NaN/Inf, or use float32 parameters", step=step, epoch=epoch, lr=lr)


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
    float16/bfloat16 parameters are trained through float32 master copies (module docstring) and keep
    their dtype.
    returns: one row per epoch: epoch, steps, loss (mean train loss), train_acc, val_acc (NaN without
        val_ds), seconds.
    raises: NonFiniteLossError (a FloatingPointError) at the first NaN/Inf loss, or NaN/Inf gradient of
        a float16/bfloat16 parameter, naming the step, epoch and lr; no optimizer step is taken with it.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    seed_everything(seed)
    dev = _model_device(model, device)
    model.to(dev).train()
    masters = _MasterParams(_trainable(model))
    opt = _optimizer(optimizer, masters.params, lr, weight_decay)
    batches = loader(train_ds, batch_size, shuffle=True, seed=seed)
    total = epochs * len(batches) if max_steps is None else min(max_steps, epochs * len(batches))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    rows, step = [], 0
    bar = tqdm(total=total, desc="fit", unit="step", disable=not progress, leave=False)
    try:
        for epoch in range(1, epochs + 1):
            t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            model.train()
            for x, y in batches:
                if step >= total:
                    break
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss_value = loss.item()
                where = dict(step=step + 1, total=total, epoch=epoch, lr=opt.param_groups[0]["lr"])
                if not math.isfinite(loss_value):
                    raise _non_finite(f"loss is {loss_value}", **where)
                opt.zero_grad(set_to_none=True)
                masters.zero_grad()
                loss.backward()
                bad = masters.to_masters()
                if bad is not None:
                    raise _non_finite(f"gradient of {bad!r} is not finite (float16/bfloat16 overflow?)", **where)
                opt.step()
                masters.to_model()
                sched.step()
                step += 1
                if on_step is not None:
                    on_step(model, step)
                loss_sum += loss_value * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}")
            val = evaluate(model, val_ds, device=dev) if val_ds is not None else float("nan")
            rows.append({"epoch": epoch, "steps": step, "loss": loss_sum / max(seen, 1),
                         "train_acc": correct / max(seen, 1), "val_acc": val, "seconds": time.perf_counter() - t0})
            if step >= total:
                break
    finally:
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
