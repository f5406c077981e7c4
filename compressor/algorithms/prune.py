"""Layer-adaptive magnitude pruning (Xu et al., ICCV 2023, "Efficient Joint Optimization of Layer-Adaptive
Weight Pruning in Deep Neural Networks"): the math, over tensors.

- `magnitude_mask`: the kept weights of one layer at a sparsity, unstructured or N:M (in each run of M
  consecutive weights of a row, the M*s smallest are pruned); `pruned`: the layer as the artifact's SparseWeight
  (compressor/sparse.py is that storage format).
- Allocations of a global sparsity to layers: `uniform`, `global_magnitude` (one threshold over all layers),
  `owl` (Yin et al. 2023: blocks with more activation outliers pruned less) and `dp` (the least summed
  distortion under the kept-weight budget, algorithms.allocate).
- `layer_curves`: for every prunable Linear alone (all others intact) and every sparsity level, a distortion
  (on a model, compressor.measure's: of the model's output, mean squared logit error or KL); `additivity_trials`:
  random joint prunings against the sum of their single-layer distortions, the DP's assumption.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import sparse
from ..errors import BadInput
from ..quant import QWeight
from .allocate import allocate


def parse_structure(structure: str) -> tuple[int, int] | None:
    """None for "unstructured", else (N, M) of an "N:M" pattern (N kept of every M); a bad label is BadInput."""
    try:
        nm = sparse.parse_structure(structure)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if nm is not None and nm[0] == nm[1]:
        raise BadInput(f"sparsity structure {structure!r} prunes nothing: use N:M with N < M (e.g. 2:4)")
    return nm


def magnitude_mask(w: Tensor, sparsity: float, structure: str = "unstructured") -> Tensor:
    """The kept weights (N, K) bool of W pruned by magnitude to `sparsity`. Unstructured: the round(s*N*K)
    smallest |w| of the layer. "N:M": `sparsity` is rounded to the nearest multiple of 1/M and in each run of M
    consecutive weights of a row that many smallest are pruned (2:4 at 0.5 = two of every four)."""
    if not 0.0 <= sparsity <= 1.0:
        raise BadInput(f"sparsity must be in [0, 1], got {sparsity}")
    a = w.detach().abs().float()
    nm = parse_structure(structure)
    if nm is None:
        n_prune = round(sparsity * a.numel())
        keep = torch.ones(a.numel(), dtype=torch.bool, device=a.device)
        if n_prune:
            keep[torch.topk(a.reshape(-1), n_prune, largest=False, sorted=False).indices] = False
        return keep.reshape(a.shape)
    _, m = nm
    n_rows, k = a.shape
    if k % m:
        raise BadInput(f"N:M sparsity needs the input size {k} to be a multiple of M = {m}")
    n_prune = round(sparsity * m)
    keep = torch.ones(n_rows, k // m, m, dtype=torch.bool, device=a.device)
    if n_prune:
        idx = torch.topk(a.reshape(n_rows, k // m, m), n_prune, dim=-1, largest=False, sorted=False).indices
        keep.scatter_(-1, idx, False)
    return keep.reshape(n_rows, k)


def pruned(w: Tensor, sparsity: float, structure: str = "unstructured") -> sparse.SparseWeight:
    """W pruned by magnitude to `sparsity` (magnitude_mask) as the artifact's sparse weight; 1.0 prunes all of it
    (a dropped sub-block's layers)."""
    mask = magnitude_mask(w, sparsity, structure)
    return sparse.SparseWeight(torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)), mask, structure)


def sparsity_levels(levels: int, max_sparsity: float, structure: str = "unstructured") -> list[float]:
    """The sparsity of each level: k * max_sparsity / levels for k = 0..levels (unstructured); for N:M, the
    multiples of 1/M up to max_sparsity (0, 1/4, 2/4, 3/4 for M = 4)."""
    nm = parse_structure(structure)
    if nm is not None:
        m = nm[1]
        return [k / m for k in range(m) if k / m <= max_sparsity + 1e-9]
    if levels < 1 or not 0 < max_sparsity <= 1:
        raise BadInput(f"need levels >= 1 and 0 < max_sparsity <= 1, got {levels} and {max_sparsity}")
    return [k * max_sparsity / levels for k in range(levels + 1)]


def keep_pruned_zero(qw: QWeight, kept: Tensor, structure: str) -> QWeight:
    """A quantized weight of a pruned layer: the pruned weights' codes set to the grid's zero (the zero point, or
    0 when symmetric), so they dequantize to exactly 0, and the mask attached (the artifact's bitmask)."""
    qw.q = torch.where(kept.to(qw.q.device), qw.q, qw.zero_codes())
    qw.mask = kept.cpu()
    qw.sparsity_structure = structure
    return qw


# ---------------------------------------------------------------------------------------------- allocations

def uniform(sizes: dict[str, int], sparsity: float) -> dict[str, float]:
    return {name: sparsity for name in sizes}


def global_magnitude(weights: dict[str, Tensor], sparsity: float) -> dict[str, float]:
    """One magnitude threshold over all layers: the fraction of each layer's weights below it."""
    flat = torch.cat([w.detach().abs().float().reshape(-1) for w in weights.values()])
    n_prune = round(sparsity * flat.numel())
    if n_prune == 0:
        return {name: 0.0 for name in weights}
    thr = torch.kthvalue(flat, n_prune).values
    below = {name: int((w.detach().abs().float() < thr).sum()) for name, w in weights.items()}
    ties = {name: int((w.detach().abs().float() == thr).sum()) for name, w in weights.items()}
    left = n_prune - sum(below.values())  # weights equal to the threshold, pruned in layer order until full
    out = {}
    for name, w in weights.items():
        take = min(left, ties[name])
        left -= take
        out[name] = (below[name] + take) / w.numel()
    return out


def owl(outlier_ratio: dict[str, float], sizes: dict[str, int], sparsity: float, lam: float = 0.08) -> dict[str, float]:
    """OWL (Yin et al. 2023): each layer's sparsity in [S - lam, S + lam], lower where the outlier ratio (share
    of weights whose |W_ij| ||X_j|| exceeds M times the layer's mean; the caller groups it per block) is
    higher, shifted so that the weighted mean over all weights is S exactly."""
    names = list(sizes)
    d = torch.tensor([outlier_ratio[n] for n in names], dtype=torch.float64)
    n = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    span = float(d.max() - d.min())
    s = torch.full_like(d, sparsity) if span == 0 else sparsity + lam - 2 * lam * (d - d.min()) / span
    for _ in range(50):  # the shift that restores the mean, clamped to [0, 1]
        s = (s + sparsity - float((s * n).sum() / n.sum())).clamp(0.0, 1.0)
        if abs(float((s * n).sum() / n.sum()) - sparsity) < 1e-9:
            break
    return {name: float(v) for name, v in zip(names, s)}


def outlier_ratio(w: Tensor, x_sq: Tensor, m: float = 5.0) -> float:
    """Share of weights whose Wanda score |W_ij| sqrt(sum_t x_tj^2) exceeds m times the layer's mean score."""
    score = w.detach().abs().float() * x_sq.float().clamp_min(0).sqrt().to(w.device)[None, :]
    return float((score > m * score.mean()).float().mean())


def dp(curves: dict[str, list[float]], sizes: dict[str, int], levels: list[float], sparsity: float,
       units: int = 10000) -> dict[str, float]:
    """The level per layer with the least summed distortion whose kept weights fit (1 - S) of all; the budget
    is discretised in `units` steps (costs rounded up, so the sparsity reached is >= S)."""
    names = list(curves)
    costs = [[sizes[n] * (1 - s) for s in levels] for n in names]
    errors = [list(curves[n]) for n in names]
    budget = (1 - sparsity) * sum(sizes[n] for n in names)
    picks = allocate(costs, errors, budget, units)
    return {n: levels[j] for n, j in zip(names, picks)}


def achieved_sparsity(alloc: dict[str, float], sizes: dict[str, int], structure: str = "unstructured") -> float:
    """The overall fraction pruned by `alloc` as magnitude_mask applies it (rounding per layer / to 1/M)."""
    nm = parse_structure(structure)
    pruned = sum((round(alloc[n] * nm[1]) / nm[1] * sizes[n]) if nm else round(alloc[n] * sizes[n]) for n in alloc)
    return pruned / sum(sizes[n] for n in alloc)


def snap_to_levels(alloc: dict[str, float], sizes: dict[str, int], levels: list[float], sparsity: float) -> dict[str, float]:
    """A continuous allocation (global magnitude, OWL) moved onto a discrete level set (N:M patterns): each
    layer to its nearest level, then the layers whose rounding lost most moved one level up until the mean
    reaches S (or down while it exceeds the next level's step)."""
    lv = sorted(levels)
    out = {n: min(lv, key=lambda v: abs(v - s)) for n, s in alloc.items()}
    total = sum(sizes.values())

    def mean() -> float:
        return sum(out[n] * sizes[n] for n in out) / total

    while mean() < sparsity - 1e-9:
        cand = [n for n in out if out[n] < lv[-1]]
        if not cand:
            break
        n = max(cand, key=lambda n: alloc[n] - out[n])
        out[n] = lv[lv.index(out[n]) + 1]
    while True:
        cand = [n for n in out if out[n] > lv[0]]
        if not cand:
            break
        n = min(cand, key=lambda n: alloc[n] - out[n])
        step = out[n] - lv[lv.index(out[n]) - 1]
        if mean() - step * sizes[n] / total < sparsity - 1e-9:
            break
        out[n] = lv[lv.index(out[n]) - 1]
    return out


# ------------------------------------------------------------------------------------------ the curves' loops

def layer_curves(weights: dict[str, Tensor], levels: list[float], measure: Callable[[str, Tensor], float],
                 structure: str = "unstructured", on_layer: Callable[[int, int, str], None] = lambda i, n, name: None,
                 variant: Callable[[str, int], Tensor] | None = None) -> dict[str, list[float]]:
    """Distortion of each layer pruned alone at each level (level 0 included, 0 by construction): measure(name, w)
    is the distortion with layer `name`'s weight replaced by w (on a model: compressor.measure). With
    `variant(name, k)`, the layer's weight at level k is that tensor instead (any compression: EvoPress's DP
    baseline measures quantized widths this way), and level 0 is measured too."""
    curves: dict[str, list[float]] = {}
    for j, (name, w) in enumerate(weights.items()):
        on_layer(j, len(weights), name)
        row = []
        for k, s in enumerate(levels):
            if s == 0 and variant is None:
                row.append(0.0)
                continue
            row.append(measure(name, w * magnitude_mask(w, s, structure) if variant is None else variant(name, k).to(w)))
        curves[name] = row
    return curves


def pruned_dense(weights: dict[str, Tensor], alloc: dict[str, float], structure: str = "unstructured") -> dict[str, Tensor]:
    """Each layer of `alloc` with a sparsity above 0, pruned by magnitude to it (W * mask, dense)."""
    return {name: weights[name] * magnitude_mask(weights[name], s, structure) for name, s in alloc.items() if s > 0}


def additivity_trials(curves: dict[str, list[float]], levels: list[float], trials: int, seed: int,
                      joint: Callable[[dict[str, float]], float]) -> list[dict[str, float]]:
    """`trials` random allocations (each layer a random level, drawn up to a random cap so the total ranges from
    light to heavy): joint(alloc), the distortion with all of them pruned at once, against the sum of the
    single-layer ones (the DP's assumption is that the two are about equal)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    names = list(curves)
    for _ in range(trials):
        cap = int(torch.randint(1, len(levels), (1,), generator=g))
        picks = torch.randint(0, cap + 1, (len(names),), generator=g).tolist()
        alloc = {n: levels[k] for n, k in zip(names, picks)}
        summed = sum(curves[n][k] for n, k in zip(names, picks))
        out.append({"summed": summed, "joint": joint(alloc), "mean_sparsity": sum(alloc.values()) / len(alloc)})
    return out


def allocate_sparsity(method: str, sparsity: float, sizes: dict[str, int], *, weights: dict[str, Tensor] | None = None,
                      outlier_ratios: dict[str, float] | None = None, curves: dict[str, list[float]] | None = None,
                      levels: list[float] | None = None, structure: str = "unstructured", owl_lambda: float = 0.08,
                      units: int = 10000) -> dict[str, float]:
    """Per-layer sparsity by `method` (uniform, global, owl, dp) for the overall target `sparsity`."""
    nm = parse_structure(structure)
    if method == "uniform":
        return uniform(sizes, sparsity)
    if method == "dp":
        assert curves is not None and levels is not None
        return dp(curves, sizes, levels, sparsity, units)
    if method == "global":
        assert weights is not None
        alloc = global_magnitude(weights, sparsity)
    elif method == "owl":
        assert outlier_ratios is not None
        alloc = owl(outlier_ratios, sizes, sparsity, owl_lambda)
    else:
        raise BadInput(f"unknown allocation {method!r}: use uniform, global, owl or dp")
    if nm is not None:
        assert levels is not None
        alloc = snap_to_levels(alloc, sizes, levels, sparsity)
    return alloc
