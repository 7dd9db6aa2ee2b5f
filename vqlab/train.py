"""Training and evaluation: `fit(model, train_ds, ...)` and `evaluate(model, ds)`.

Deterministic under a seed on CPU: the seed fixes torch's global RNG (dropout, re-seeded codes)
and the batch order.  Device: CUDA when present unless `device=` says otherwise.

Half precision: `fit` keeps a float32 master copy of every float16/bfloat16 trainable parameter
(e.g. codebooks from `VQConfig(codebook_dtype="float16")`).  The optimizer steps the masters (Adam's
moments and eps underflow in float16 and turn every parameter into NaN otherwise); after each step
the masters are rounded back into the model's parameters, which keep their dtype.
A non-finite loss stops `fit` with `NonFiniteLossError` before that step changes the model.

Under torchrun (`vqlab.distributed`): `fit` wraps the model in DistributedDataParallel and deals every
global batch of `batch_size` images across the ranks (batch_size / world_size each, gradients averaged),
in the same order as the single-process run with the same seed; progress bars and files belong to
rank 0; `evaluate` sums correct/total over the ranks.  Run it on every rank, or pass distributed=False.
"""
from __future__ import annotations

import math
from pathlib import Path
import time
from typing import Callable

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from . import distributed as _dist
from .utils import default_device, seed_everything
from .checks import check_int
from .data import loader

__all__ = ["fit", "evaluate", "predict", "train_or_load", "checkpoint_path", "NonFiniteLossError",
           "distillation_loss", "recalibrate_batchnorm_"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


class NonFiniteLossError(FloatingPointError):
    """`fit` met a NaN/Inf loss (or float16/bfloat16 gradient); raised before the optimizer step.

    Attributes: step (1-based optimizer step that failed), epoch, lr (learning rate at that step).
    """

    def __init__(self, message: str, *, step: int, epoch: int, lr: float):
        super().__init__(message)
        self.step, self.epoch, self.lr = step, epoch, lr


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                      temperature: float = 4.0, weight: float = 0.5) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): (1 - weight) * CE(logits, y)
    + weight * T^2 * KL(softmax(teacher_logits / T) || softmax(logits / T)).

    logits, teacher_logits: (batch, classes); y: (batch,) int64 labels; temperature T > 0; weight in [0, 1]
    (0 = plain cross-entropy, 1 = the teacher's soft targets only).  The T^2 factor keeps the soft term's
    gradient scale independent of T.  The KL term and its gradient vanish where the student's logits equal
    the teacher's (up to a constant per row), so a teacher identical to the student leaves only the
    (1 - weight)-scaled cross-entropy gradient.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0):
        raise ValueError(f"distillation weight must be in [0, 1], got {weight!r}")
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(logits.shape)}: the teacher must predict the same classes")
    ce = F.cross_entropy(logits, y)
    if weight == 0:
        return ce
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits.detach().to(logits.dtype) / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - weight) * ce + weight * t * t * kl


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


def _use_distributed(distributed: bool | None) -> bool:
    """distributed=None: join torchrun's process group when there is one; False: never; True: when possible."""
    return False if distributed is False else _dist.init()


def _run_device(model: nn.Module, device: str | torch.device | None, distributed: bool) -> torch.device:
    """`_model_device`, except that each rank of a distributed run takes its own GPU (cuda:LOCAL_RANK)."""
    if distributed and device is None and torch.cuda.is_available():
        return _dist.device()
    return _model_device(model, device)


class _ShardSampler(DistributedSampler):
    """DistributedSampler whose epoch-e permutation is the one `loader(ds, shuffle=True, seed=seed)` draws
    in its e-th epoch, so the ranks' batches together are the single-process run's batches.

    Like DistributedSampler: the permutation is padded (by repeating its start) to a multiple of the
    world size and rank r takes positions r, r + W, r + 2W, ...; `set_epoch(e)` picks the epoch.
    """

    def __iter__(self):
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):                     # the loader draws one permutation per epoch
            order = torch.randperm(n, generator=gen)
        order = order.tolist()
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return iter(order[self.rank:self.total_size:self.num_replicas])


class _RankBatches:
    """This rank's share of every global batch: batches of ceil(batch_size / W) rows by tensor indexing.

    When W divides batch_size, step s's batches over all ranks hold exactly the rows of the
    single-process loader's batch s (the last, short batch may differ by the sampler's padding).
    """

    def __init__(self, ds: TensorDataset, batch_size: int, seed: int, rank: int, world: int):
        self.tensors = ds.tensors
        self.sampler = _ShardSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.batch_size = -(-batch_size // world)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-self.sampler.num_samples // self.batch_size)

    def __iter__(self):
        idx = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for s in range(0, len(idx), self.batch_size):
            take = idx[s:s + self.batch_size]
            yield tuple(t[take] for t in self.tensors)


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


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, train_ds: TensorDataset, batches: int = 50, batch_size: int = 256,
                           seed: int = 0, device: str | torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance (in place) from `batches` random batches of
    `train_ds` (x: (N, C, H, W)), forward only: no weight changes, no gradients.

    Use it after a step that changes the weights without training, e.g. VQ4ALL's forced last round, where the
    statistics gathered under the soft candidate mixture no longer fit the hard assignments.  Only the
    BatchNorm layers run in train mode (the statistics are a plain average over the batches, momentum=None);
    every module's mode and momentum are restored.  Reproducible from `seed`.
    returns: the number of BatchNorm layers re-estimated (0: none, and nothing runs).
    """
    check_int("batches", batches, 1)
    check_int("batch_size", batch_size, 1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    if len(train_ds) == 0:
        raise ValueError("recalibrate_batchnorm_: train_ds is empty")
    dev = _model_device(model, device)
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_ds), generator=g)[:batches * batch_size]
    try:
        model.to(dev).eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for start in range(0, len(order), batch_size):
            model(train_ds.tensors[0][order[start:start + batch_size]].to(dev))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return len(norms)


def evaluate(model: nn.Module, ds: TensorDataset, batch_size: int = 1000, device: str | torch.device | None = None,
             distributed: bool | None = None) -> float:
    """Top-1 accuracy of `model` on `ds`, a float in [0, 1].

    distributed: None = under torchrun every rank scores every W-th image and the correct/total counts
    are summed over the ranks (call it on every rank; same number as one process); False = this
    process alone scores all of `ds`.
    """
    if not _use_distributed(distributed):
        return (predict(model, ds, batch_size, device) == ds.tensors[1]).float().mean().item()
    r, w = _dist.rank(), _dist.world_size()
    shard = TensorDataset(*(t[r::w] for t in ds.tensors))
    dev = _run_device(model, device, True)
    correct = int((predict(model, shard, batch_size, dev) == shard.tensors[1]).sum()) if len(shard) else 0
    counts = _dist.all_reduce_sum(torch.tensor([correct, len(shard)], dtype=torch.float64, device=dev)).cpu()
    return (counts[0].float() / counts[1].float()).item()        # rounded like the float32 mean above


def fit(model: nn.Module, train_ds: TensorDataset, epochs: int = 1, lr: float = 1e-3, batch_size: int = 128,
        seed: int = 0, optimizer: str = "adam", weight_decay: float = 0.0, val_ds: TensorDataset | None = None,
        max_steps: int | None = None, device: str | torch.device | None = None, progress: bool = True,
        on_step: Callable[[nn.Module, int], None] | None = None, distributed: bool | None = None,
        teacher: nn.Module | None = None, temperature: float = 4.0, distill_weight: float = 0.5) -> pd.DataFrame:
    """Train `model` in place with cross-entropy (or distillation from `teacher`); return the history.

    train_ds: TensorDataset(x (N, C, H, W), y (N,) int64) — see `vqlab.load_dataset`.
    epochs, lr, batch_size: the usual; the learning rate follows a cosine decay over all steps.
    seed: fixes batch order and torch's RNG, so the same seed gives identical weights on CPU.
    max_steps: stop early after this many optimizer steps (fast modes, tests).
    on_step: called as on_step(model, step) after every optimizer step (e.g. record codebook drift).
    progress: tqdm.auto bar (notebook or terminal); False turns it off.
    distributed: None = under torchrun (WORLD_SIZE > 1, or an initialised process group of > 1) train
        with DistributedDataParallel on every rank; False = this process alone.  Distributed,
        `batch_size` is the global batch (each rank takes ceil(batch_size / W) rows of it, in the
        single-process order), rank r seeds torch with seed + r (dropout masks differ per rank), the
        bar shows on rank 0 only, and every rank returns the same model and the same history (losses
        and accuracies summed over ranks).  BatchNorm statistics stay per rank, as in plain DDP.
    teacher: a trained model whose logits the student learns to match (`distillation_loss` with
        `temperature` and `distill_weight`); it runs in eval mode under no_grad on the same batches and is
        never changed.  None = plain cross-entropy.
    float16/bfloat16 parameters are trained through float32 master copies (module docstring) and keep
    their dtype.
    returns: one row per epoch: epoch, steps, loss (mean train loss), train_acc, val_acc (NaN without
        val_ds), seconds.
    raises: NonFiniteLossError (a FloatingPointError) at the first NaN/Inf loss, or NaN/Inf gradient of
        a float16/bfloat16 parameter, naming the step, epoch and lr; no optimizer step is taken with it
        (distributed: on every rank, when any rank's loss is not finite).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher is model:
            raise ValueError("teacher must be a separate model (a frozen copy), not the model being trained")
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                          temperature, distill_weight)           # checks the two numbers before any work
    distributed = _use_distributed(distributed)
    rank, world = (_dist.rank(), _dist.world_size()) if distributed else (0, 1)
    if batch_size < world:
        raise ValueError(f"batch_size is the global batch and must be >= the {world} processes, got {batch_size}")
    seed_everything(seed + rank)
    dev = _run_device(model, device, distributed)
    model.to(dev).train()
    net = model
    if distributed and _trainable(model):
        from torch.nn.parallel import DistributedDataParallel

        # broadcasts rank 0's parameters and buffers (codebooks, indices) now and its buffers every forward
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if teacher is not None:
        teacher_was_training = teacher.training
        teacher.to(dev).eval()
    masters = _MasterParams(_trainable(model))                   # after DDP's broadcast: same masters everywhere
    opt = _optimizer(optimizer, masters.params, lr, weight_decay)
    batches = _RankBatches(train_ds, batch_size, seed, rank, world) if distributed else \
        loader(train_ds, batch_size, shuffle=True, seed=seed)
    total = epochs * len(batches) if max_steps is None else min(max_steps, epochs * len(batches))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    rows, step = [], 0
    bar = tqdm(total=total, desc="fit", unit="step", disable=not (progress and rank == 0), leave=False)
    try:
        with _dist.naming_silent_ranks():        # a rank that stops answering is named
            for epoch in range(1, epochs + 1):
                t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
                model.train()
                if distributed:
                    batches.set_epoch(epoch - 1)
                for x, y in batches:
                    if step >= total:
                        break
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    logits = net(x)
                    if teacher is None:
                        loss = F.cross_entropy(logits, y)
                    else:
                        with torch.no_grad():
                            soft = teacher(x)
                        loss = distillation_loss(logits, soft, y, temperature, distill_weight)
                    loss_value = loss.item()
                    where = dict(step=step + 1, total=total, epoch=epoch, lr=opt.param_groups[0]["lr"])
                    if not _all_finite(loss_value, distributed, dev):
                        what = f"loss is {loss_value}" if not math.isfinite(loss_value) else "loss is not finite on another rank"
                        raise _non_finite(what, **where)
                    opt.zero_grad(set_to_none=True)
                    masters.zero_grad()
                    loss.backward()                                      # DDP: gradients averaged over the ranks
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
                if distributed:
                    loss_sum, correct, seen = _dist.all_reduce_sum(
                        torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=dev)).tolist()
                val = evaluate(model, val_ds, device=dev, distributed=distributed) if val_ds is not None else float("nan")
                rows.append({"epoch": epoch, "steps": step, "loss": loss_sum / max(seen, 1),
                             "train_acc": correct / max(seen, 1), "val_acc": val, "seconds": time.perf_counter() - t0})
                if step >= total:
                    break
    finally:
        bar.close()
        if teacher is not None:
            teacher.train(teacher_was_training)
    model.eval()
    return pd.DataFrame(rows)


def _all_finite(value: float, distributed: bool, dev: torch.device) -> bool:
    """math.isfinite(value) on this process; distributed: on every rank (one tiny all-reduce)."""
    ok = math.isfinite(value)
    if not distributed:
        return ok
    bad = _dist.all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=dev))
    return float(bad) == 0.0


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
    for LeNet-5 and the small CNN).  Under torchrun (call it on every rank): rank 0's file is read by
    rank 0 and broadcast; a missing one is trained with DDP on all ranks and written by rank 0.
    """
    from pathlib import Path

    from .data import dataset_info, load_dataset
    from .models import get_model

    info = dataset_info(dataset)
    path = Path(path) if path is not None else checkpoint_path(model_name, info.name, epochs, seed)
    torch.manual_seed(seed)
    model = get_model(model_name, num_classes=info.num_classes, in_channels=info.channels, input_size=info.size)
    distributed = _dist.init()
    if _dist.broadcast_object(path.exists()):                   # rank 0's file decides, and is read by rank 0
        blob = torch.load(path, map_location="cpu", weights_only=True) if _dist.is_main() else None
        blob = _dist.broadcast_object(blob)
        model.load_state_dict(blob["state_dict"])
        return model.eval(), blob["meta"]
    t0 = time.perf_counter()
    fit(model, load_dataset(info.name, "train"), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        progress=progress, device="cpu")
    meta = {"model": model_name, "dataset": info.name, "epochs": epochs, "seed": seed, "lr": lr,
            "batch_size": batch_size, "test_acc": evaluate(model, load_dataset(info.name, "test")),
            "seconds": time.perf_counter() - t0, "torch": str(torch.__version__)}
    if _dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    if distributed:
        _dist.barrier()
    return model.eval(), {**meta, "path": str(path)}
