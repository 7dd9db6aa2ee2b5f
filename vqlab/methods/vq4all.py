"""VQ4ALL: one universal codebook for several networks, sampled from a kernel density estimate of their
weight sub-vectors, and progressive network construction by differentiable assignments.

1. `universal_codebook(models, k, d)`: the length-d sub-vectors of the float networks' Linear/Conv2d rows are
   pooled (`pooled_subvectors`); a Gaussian kernel density estimate is fitted on them (kernel covariance
   h^2 * Sigma, Sigma the pooled covariance, h by Scott's rule n^(-1/(d+4)) unless given, scipy's
   `gaussian_kde` convention) and K codewords are sampled from it: a random pooled point plus Gaussian
   noise of that covariance.  The Codebook is frozen (never trained) and meant to be shared by every network.
2. `VQ4ALLConfig(codebook, candidates=n, alpha)` for `quantize_`: every sub-vector of a layer keeps its n nearest
   codewords as candidates and learnable logits (all zero: equal ratios 1/n); the layer's weight is the
   ratio-weighted sum of candidates, ratios = softmax(logits) (kind "vq4all").
3. `progressive_fit(model, train_ds, ...)`: trains the logits (by default nothing else) in rounds; after every
   round each sub-vector whose largest ratio exceeds alpha is fixed to that candidate (one-hot from then on);
   the last round fixes what is left at its largest ratio.  The fixed fraction never falls.
4. `finalize(model)`: every VQ4ALL layer's code becomes a plain `VQCode` holding the shared codebook object and
   the chosen indices (the layer stays where it is), so it runs on the LUT kernels and
   `compressed_size([m1, m2, m3])` counts the codebook once (`codebook_in_rom=True`: not at all).

Row layout: a layer's rows W (out, n) (Linear: weight; Conv2d: the kernel flattened per output channel,
(cin/groups, kh, kw)) are cut into n/d consecutive sub-vectors; d must divide n.

    >>> book = vq4all.universal_codebook([lenet, cnn, vit], k=256, d=4)
    >>> for m in (lenet, cnn, vit):
    ...     vqlab.quantize_(m, vq4all.VQ4ALLConfig(codebook=book, candidates=4, alpha=0.9))
    ...     vq4all.progressive_fit(m, train_ds)
    ...     vq4all.finalize(m)
    >>> vqlab.compressed_size([lenet, cnn, vit]).per_model
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .. import distributed as _dist
from ..bits import bits_for, packed_bytes
from ..checks import check_instance, check_int, check_number
from ..codebook import Codebook, HoldsCodebook
from ..codes import CodeSize, WeightCode, packed_ans_bytes, register_code, stored_bytes
from ..config import QuantConfig, register_handler
from ..dtypes import index_dtype
from ..layers import QuantizedLayer, quantized_layer
from .vq import VQCode

__all__ = ["pooled_subvectors", "kde_bandwidth", "universal_codebook", "nearest_candidates", "VQ4ALLCode",
           "VQ4ALLConfig", "vq4all_codes", "fix_assignments", "fixed_fraction", "progressive_fit", "finalize"]

MAX_CANDIDATES = 256


# ---------------------------------------------------------------- the universal codebook

def _row_length(module: nn.Module) -> int:
    return module.weight[0].numel()


def _module_list(models) -> list[nn.Module]:
    """`models` as a non-empty list of nn.Modules; TypeError naming what is not one."""
    if isinstance(models, nn.Module):
        return [models]
    if isinstance(models, (str, bytes, torch.Tensor)) or not hasattr(models, "__iter__"):
        raise TypeError(f"models must be an nn.Module or a list of them, got {type(models).__name__}")
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one nn.Module, got an empty list")
    for i, m in enumerate(models):
        check_instance(f"models[{i}]", m, nn.Module, "torch.nn.Module")
    return list(models)


def _finite_weight(m: nn.Module, label: str) -> torch.Tensor:
    """The layer's weight as float32 on the CPU; ValueError naming `label` for NaN / Inf or a meta weight."""
    w = m.weight.detach()
    if w.is_meta:
        raise ValueError(f"{label}: the weight is on the meta device (no values)")
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"{label}: the weight has {bad} non-finite value(s) (NaN/Inf); VQ4ALL needs finite weights")
    return w.float().cpu()


def pooled_subvectors(models: nn.Module | Sequence[nn.Module], d: int) -> torch.Tensor:
    """The length-d sub-vectors of every nn.Linear / nn.Conv2d weight row of `models` whose row length
    n (Linear: in_features; Conv2d: cin/groups * kh * kw) d divides (other layers are left out).

    returns (N, d) float32, layer after layer in model order.
    raises TypeError for something that is not an nn.Module (or a list of them), ValueError naming the model and
    the layer for weights with NaN / Inf or on the meta device."""
    models = _module_list(models)
    check_int("d", d, 1)
    parts = []
    for i, model in enumerate(models):
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and _row_length(m) % d == 0:
                parts.append(_finite_weight(m, f"models[{i}] layer {name!r}").reshape(-1, d))
    if not parts:
        raise ValueError(f"no nn.Linear / nn.Conv2d layer of the given models has a row length divisible by d={d}")
    return torch.cat(parts)


def kde_bandwidth(n: int, d: int, rule: str | float | None = None) -> float:
    """The KDE bandwidth factor h (kernel covariance h^2 * Sigma) for n points in d dimensions.

    rule: None or "scott": n^(-1/(d+4)); "silverman": (n (d+2) / 4)^(-1/(d+4)); a float > 0: that factor."""
    if rule is None or rule == "scott":
        return n ** (-1.0 / (d + 4))
    if rule == "silverman":
        return (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
    if isinstance(rule, (int, float)) and not isinstance(rule, bool) and rule > 0 and math.isfinite(rule):
        return float(rule)
    raise ValueError(f"bandwidth must be None, 'scott', 'silverman' or a positive float, got {rule!r}")


@torch.no_grad()
def universal_codebook(models: nn.Module | Sequence[nn.Module], k: int = 256, d: int = 4,
                       bandwidth: str | float | None = None, seed: int = 0) -> Codebook:
    """A frozen (1, k, d) Codebook sampled from a Gaussian KDE of the pooled weight sub-vectors of `models`.

    Sampling from the KDE: k pooled points drawn uniformly (with replacement) plus N(0, h^2 Sigma) noise,
    Sigma the pooled covariance (d, d), h = `kde_bandwidth(N, d, bandwidth)` (Scott's rule when None).
    The same models, k, d, bandwidth and seed give the same codebook."""
    check_int("k", k, 2)
    check_int("seed", seed, 0)
    x = pooled_subvectors(models, d).double()                          # (N, d)
    n = len(x)
    h = kde_bandwidth(n, d, bandwidth)
    sigma = torch.atleast_2d(torch.cov(x.T)) if n > 1 else torch.zeros(d, d, dtype=torch.float64)
    jitter = 1e-12 * max(float(sigma.diagonal().mean()), 1e-12)
    chol = torch.linalg.cholesky(sigma + jitter * torch.eye(d, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(n, (k,), generator=gen)
    noise = torch.randn(k, d, generator=gen, dtype=torch.float64) @ chol.T
    return Codebook.from_tensor((x[pick] + h * noise).float(), frozen=True)


def nearest_candidates(segments: torch.Tensor, codebook: torch.Tensor, n: int, chunk: int = 16384) -> torch.Tensor:
    """The ids of the n nearest codewords (Euclidean) of every segment, nearest first.

    segments: (S, d); codebook: (K, d).  returns (S, n) int64."""
    out = []
    book = codebook.float()
    for i in range(0, len(segments), chunk):
        dist = torch.cdist(segments[i:i + chunk].float(), book)           # (s, K)
        out.append(dist.topk(n, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out) if out else torch.zeros(0, n, dtype=torch.long)


# ---------------------------------------------------------------- the code

def _check_alpha(alpha) -> None:
    check_number("alpha", alpha, 0.0, 1.0, high_open=True)


@register_code
class VQ4ALLCode(HoldsCodebook, WeightCode):
    """Differentiable candidate assignments into a shared, frozen universal codebook (1, K, d).

    Per sub-vector s of row i: `cands` (rows, S, n) the n candidate codeword ids (nearest first), `logits`
    (rows, S, n) float32 parameter (ratios = softmax over the candidates), `fixed` (rows, S) uint8 0/1 and
    `choice` (rows, S) the fixed candidate slot.  rows() = sum_j ratio_j * codebook[cands_j], with one-hot ratios
    at fixed sub-vectors: (rows, S * d).  Stored while training: candidate ids at ceil(log2 K) bits, choice at
    ceil(log2 n) bits, fixed at 1 bit, the logits at float32, the codebook once; after `finalize` only indices.
    `alpha`: the ratio threshold `fix_assignments` uses by default.
    """

    kind = "vq4all"

    def __init__(self, rows: int, n: int, k: int, d: int, candidates: int, alpha: float = 0.9,
                 codebook: Codebook | None = None, *, device=None):
        super().__init__()
        check_int("rows", rows, 1)
        check_int("d", d, 1)
        check_int("k", k, 2)
        check_int("candidates", candidates, 1, min(k, MAX_CANDIDATES))
        _check_alpha(alpha)
        if n % d:
            raise ValueError(f"d={d} must divide the row length n={n}")
        if codebook is None:
            codebook = Codebook(k, d, frozen=True, device=device)
        if (codebook.codebook_groups, codebook.k, codebook.d) != (1, k, d):
            raise ValueError(f"codebook must be (1, {k}, {d}), got {tuple(codebook.weight.shape)}")
        self.codebook = codebook
        self.rows_, self.n, self.candidates, self.alpha = rows, n, candidates, float(alpha)
        s = n // d
        self.register_buffer("cands", torch.zeros(rows, s, candidates, dtype=index_dtype(k), device=device))
        self.register_buffer("choice", torch.zeros(rows, s, dtype=torch.uint8, device=device))
        self.register_buffer("fixed", torch.zeros(rows, s, dtype=torch.uint8, device=device))
        self.logits = nn.Parameter(torch.zeros(rows, s, candidates, device=device))

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, codebook: Codebook, candidates: int, alpha: float = 0.9) -> "VQ4ALLCode":
        """Candidates = the `candidates` nearest codewords of each sub-vector of `weight`'s rows; equal ratios."""
        flat = weight.detach().reshape(len(weight), -1)
        code = cls(flat.shape[0], flat.shape[1], codebook.k, codebook.d, candidates, alpha, codebook,
                   device=weight.device)
        ids = nearest_candidates(flat.reshape(-1, codebook.d), codebook.weight[0].detach(), candidates)
        code.cands.copy_(ids.reshape(code.cands.shape).to(code.cands.dtype))
        return code

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows_, self.n

    def ratios(self) -> torch.Tensor:
        """(rows, S, n) candidate ratios: softmax of the logits, one-hot where fixed (each sums to 1)."""
        r = torch.softmax(self.logits, dim=-1)
        hot = nn.functional.one_hot(self.choice.long(), self.candidates).to(r.dtype)
        return torch.where(self.fixed.bool()[..., None], hot, r)

    def rows(self) -> torch.Tensor:
        book = self.codebook.weight[0]                                   # (K, d)
        cand = book[self.cands.long()]                                   # (rows, S, n, d)
        seg = (self.ratios().to(cand.dtype)[..., None] * cand).sum(2)     # (rows, S, d)
        return seg.reshape(self.rows_, self.n)

    def chosen_indices(self) -> torch.Tensor:
        """(rows, S) int64 codeword ids: the fixed candidate, else the one of largest ratio."""
        slot = torch.where(self.fixed.bool(), self.choice.long(), self.logits.detach().argmax(-1))
        return self.cands.long().gather(-1, slot[..., None])[..., 0]

    @torch.no_grad()
    def fix(self, alpha: float | None = None, force: bool = False) -> int:
        """Fix every free sub-vector whose largest ratio exceeds `alpha` (default: self.alpha) to that
        candidate (ties: the nearer one); force=True fixes all.  returns how many were fixed now."""
        alpha = self.alpha if alpha is None else alpha
        _check_alpha(alpha)
        r = torch.softmax(self.logits.detach(), dim=-1)
        top, slot = r.max(-1)
        new = (self.fixed == 0) & ((top > alpha) | force)
        self.choice[new] = slot[new].to(self.choice.dtype)
        self.fixed[new] = 1
        return int(new.sum())

    @property
    def fixed_fraction(self) -> float:
        return float(self.fixed.float().mean())

    def size(self, seen: set[int]) -> CodeSize:
        bits = bits_for(self.k)
        book = self.codebook.weight
        shared = id(book) in seen
        seen.update(id(t) for t in (book, self.cands, self.choice, self.fixed, self.logits))
        index = (packed_bytes(self.cands.numel(), bits) + packed_bytes(self.choice.numel(), bits_for(max(self.candidates, 2)))
                 + packed_bytes(self.fixed.numel(), 1))
        return CodeSize(index_bytes=index, codebook_bytes=0 if shared else stored_bytes(book),
                        other_bytes=stored_bytes(self.logits), ans_index_bytes=packed_ans_bytes(self), k=self.k,
                        d=self.d, index_bits=bits)

    def config(self) -> dict:
        return {"rows": self.rows_, "n": self.n, "k": self.k, "d": self.d, "candidates": self.candidates,
                "alpha": self.alpha}

    @classmethod
    def from_config(cls, rows: int, n: int, k: int, d: int, candidates: int, alpha: float = 0.9) -> "VQ4ALLCode":
        return cls(rows, n, k, d, candidates, alpha)

    def packing(self) -> dict[str, int]:
        return {"cands": bits_for(self.k), "choice": bits_for(max(self.candidates, 2)), "fixed": 1}

    def validate(self) -> None:
        book = self.codebook.weight
        if tuple(book.shape) != (1, self.k, self.d) or not book.is_floating_point():
            raise ValueError(f"codebook must be a (1, K, d) float tensor, got {list(book.shape)} {book.dtype}")
        s = self.n // self.d
        for name, t, hi in (("cands", self.cands, self.k), ("choice", self.choice, self.candidates),
                            ("fixed", self.fixed, 2)):
            want = (self.rows_, s, self.candidates) if name == "cands" else (self.rows_, s)
            if tuple(t.shape) != want or t.is_floating_point():
                raise ValueError(f"{name} must be an integer tensor of shape {list(want)}, got {list(t.shape)} {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
                raise ValueError(f"{name} must lie in [0, {hi}), got range [{int(t.min())}, {int(t.max())}]")
        if tuple(self.logits.shape) != (self.rows_, s, self.candidates) or not bool(torch.isfinite(self.logits).all()):
            raise ValueError(f"logits must be finite of shape {[self.rows_, s, self.candidates]}")

    def describe(self) -> dict:
        """bits_per_weight: the finished layer's index bits, ceil(log2 K) / d."""
        return {"method": self.kind, "setting": f"K={self.k} d={self.d} candidates={self.candidates}", "K": self.k,
                "d": self.d, "bits_per_weight": bits_for(self.k) / self.d}

    def extra_repr(self) -> str:
        return (f"rows={self.rows_}, n={self.n}, K={self.k}, d={self.d}, candidates={self.candidates}, "
                f"alpha={self.alpha}")


# ---------------------------------------------------------------- config and handler

@dataclass(frozen=True)
class VQ4ALLConfig(QuantConfig):
    """VQ4ALL's differentiable assignments into a given universal codebook (see the module docstring).

    Args:
        codebook: the universal `Codebook` (groups 1), e.g. from `universal_codebook`; every layer holds
            this very object.  It should be frozen (`universal_codebook` returns it frozen).
        candidates: n nearest codewords per sub-vector, 1..min(K, 256).
        alpha: ratio threshold in [0, 1) above which `progressive_fit` fixes a sub-vector.
    Example:
        >>> quantize_(model, VQ4ALLConfig(codebook=book, candidates=4, alpha=0.9))
    """

    name: ClassVar[str] = "vq4all"
    codebook: Codebook = None
    candidates: int = 4
    alpha: float = 0.9

    def validate(self) -> None:
        check_instance("VQ4ALLConfig.codebook", self.codebook, Codebook, "vqlab.Codebook (see universal_codebook)")
        if self.codebook.codebook_groups != 1:
            raise ValueError(f"VQ4ALLConfig.codebook must have one codebook group, got "
                             f"{self.codebook.codebook_groups}")
        check_int("candidates", self.candidates, 1, min(self.codebook.k, MAX_CANDIDATES))
        _check_alpha(self.alpha)

    def check(self, module: nn.Module, name: str) -> None:
        super().check(module, name)
        _finite_weight(module, f"layer {name!r}")
        n = _row_length(module)
        if n % self.codebook.d:
            raise ValueError(f"layer {name!r}: codebook d={self.codebook.d} does not divide its row length {n} "
                             f"(Linear: in_features, Conv2d: cin/groups*kh*kw); keep it float with "
                             f"overrides={{{name!r}: None}}")


@register_handler(VQ4ALLConfig)
def _vq4all_handler(modules: list[tuple[str, nn.Module]], config: VQ4ALLConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, m in modules:
        book = config.codebook.to(m.weight.device)                     # in place: the one object stays shared
        yield name, quantized_layer(m, VQ4ALLCode.from_weight(m.weight, book, config.candidates, config.alpha))


# ---------------------------------------------------------------- progressive network construction

def vq4all_codes(model: nn.Module) -> list[VQ4ALLCode]:
    """Every VQ4ALL code of `model`, once each, in module order."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, VQ4ALLCode) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def fix_assignments(model: nn.Module, alpha: float | None = None, force: bool = False) -> int:
    """`VQ4ALLCode.fix` on every VQ4ALL code of `model`; returns how many sub-vectors were fixed now."""
    return sum(c.fix(alpha, force) for c in vq4all_codes(model))


def fixed_fraction(model: nn.Module) -> float:
    """Fixed sub-vectors / all sub-vectors of the VQ4ALL codes of `model` (1.0 when it has none)."""
    codes = vq4all_codes(model)
    total = sum(c.fixed.numel() for c in codes)
    return sum(int(c.fixed.sum()) for c in codes) / total if total else 1.0


def _mean_top_ratio(model: nn.Module) -> float:
    codes = vq4all_codes(model)
    with torch.no_grad():
        tops = [c.ratios().max(-1).values.reshape(-1) for c in codes]
    return float(torch.cat(tops).mean()) if tops else 1.0


def progressive_fit(model: nn.Module, train_ds: TensorDataset, rounds: int = 10, steps_per_round: int = 200,
                    alpha: float | None = None, lr: float = 0.05, batch_size: int = 128, seed: int = 0,
                    train_other: bool = False, val_ds: TensorDataset | None = None, device=None,
                    progress: bool = True, teacher: nn.Module | None = None) -> pd.DataFrame:
    """Progressive network construction: up to `rounds` rounds of `steps_per_round` `vqlab.fit` steps on the
    candidate logits, each followed by fixing every sub-vector whose largest ratio exceeds alpha (default:
    each code's own); the last round fixes the rest at their largest ratio, so all end fixed.

    train_other: also train the model's other trainable parameters (biases, float layers, norms); by
        default only the ratios are trained (the codebook is frozen anyway).
    teacher: a frozen float model to distil from (`vqlab.fit`'s teacher); None = labels alone, as the paper.
    returns one row per round: round, steps, loss, fixed_now, fixed_fraction, mean_top_ratio, val_acc.
    The model ends in eval mode with every sub-vector fixed; `finalize(model)` makes it plain VQ.
    """
    from ..train import evaluate, fit

    check_int("rounds", rounds, 1)
    check_int("steps_per_round", steps_per_round, 1)
    codes = vq4all_codes(model)
    if not codes:
        raise ValueError("progressive_fit: the model has no VQ4ALL layer; quantize_ it with VQ4ALLConfig first")
    logits = {id(c.logits) for c in codes}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in logits] if not train_other else []
    epochs = max(1, math.ceil(steps_per_round * batch_size / max(len(train_ds), 1)))
    rows = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for r in tqdm(range(1, rounds + 1), desc="progressive_fit", unit="round", disable=not _dist.show_progress(progress), leave=False):
            hist = fit(model, train_ds, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed + r,
                       max_steps=steps_per_round, device=device, progress=False, teacher=teacher)
            top = _mean_top_ratio(model)
            now = fix_assignments(model, alpha, force=r == rounds)
            frac = fixed_fraction(model)
            rows.append({"round": r, "steps": int(hist["steps"].iloc[-1]), "loss": float(hist["loss"].iloc[-1]),
                         "fixed_now": now, "fixed_fraction": frac, "mean_top_ratio": top,
                         "val_acc": evaluate(model, val_ds, device=device) if val_ds is not None else float("nan")})
            if frac >= 1.0:
                break
        fix_assignments(model, force=True)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    return pd.DataFrame(rows)


@torch.no_grad()
def _plain_code(code: VQ4ALLCode) -> VQCode:
    """The VQCode with the code's shared codebook and its chosen indices (rows, n / d)."""
    plain = VQCode(code.rows_, code.n, code.k, code.d, codebook=code.codebook, device=code.cands.device)
    plain.set_indices(code.chosen_indices())
    return plain.train(code.training)


def finalize(model: nn.Module, force: bool = False) -> int:
    """Replace the code of every VQ4ALL layer of `model` (in place) by a plain `VQCode` holding the same codebook
    object and the chosen codeword indices (`VQ4ALLCode.chosen_indices`); the layers stay where they are.
    force=False refuses layers with free sub-vectors (run `progressive_fit` or `fix_assignments(model,
    force=True)` first).  returns the layers changed."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, QuantizedLayer) and isinstance(m.code, VQ4ALLCode)]
    if not force:
        free = [name for name, m in targets if int(m.code.fixed.min()) == 0]
        if free:
            raise ValueError(f"finalize: layers {free[:4]} still have free sub-vectors; run progressive_fit or "
                             f"fix_assignments(model, force=True) first (or pass force=True)")
    for _, m in targets:
        m.code = _plain_code(m.code)
    return len(targets)
