"""Layer-adaptive magnitude pruning (Xu et al., ICCV 2023, "Efficient Joint Optimization of Layer-Adaptive
Weight Pruning in Deep Neural Networks"): the math, over tensors and an FP model in memory.

- `magnitude_mask`: the kept weights of one layer at a sparsity, unstructured or N:M (in each run of M
  consecutive weights of a row, the M*s smallest are pruned).
- `distortion_curves`: for every prunable Linear alone (all others intact) and every sparsity level, the
  distortion of the model's output: mean squared logit error over the calibration tokens (or KL(FP || pruned)).
  The FP inputs of every block are cached once, so a layer's variants run only the blocks from its own on;
  the logit error is computed without the vocabulary projection, as dz^T (W^T W) dz on the final hidden state
  (exact for a linear head). `local=True` measures at the output of the layer's block instead (fast, not
  comparable across blocks for the DP's sum, so a heuristic).
- `joint_distortion`: the same distortion with several layers pruned at once, to test additivity (the DP's
  assumption: the distortion of a joint pruning is about the sum of the single-layer distortions).
- Allocations of a global sparsity to layers: `uniform`, `global_magnitude` (one threshold over all layers),
  `owl` (Yin et al. 2023: blocks with more activation outliers pruned less) and `dp` (the least summed
  distortion under the kept-weight budget, compressor.allocate).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import Tensor, nn

from . import sparse
from .allocate import allocate
from .blocks import BlockIO, capture_block_inputs
from .errors import BadInput

if TYPE_CHECKING:
    from .quant import QWeight


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


def pruned(w: Tensor, sparsity: float, structure: str = "unstructured") -> "sparse.SparseWeight":
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


def keep_pruned_zero(qw: "QWeight", kept: Tensor, structure: str) -> "QWeight":
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


# ----------------------------------------------------------------------------------- distortion of the output

class OutputHead:
    """What follows the last block: the final norm (if any) and a linear head. distortion(z, z_fp) is the mean
    over tokens of ||head(z) - head(z_fp)||^2 / vocab, computed as dz^T G dz / V with G = W^T W; with no head
    (encoders) the mean squared error of the final hidden state."""

    def __init__(self, model: nn.Module):
        base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
        self.norm = next((getattr(base, n) for n in ("norm", "final_layernorm", "ln_f") if hasattr(base, n)), None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = head if isinstance(head, nn.Linear) else None
        if self.head is not None:
            w = self.head.weight.detach().float()
            self.gram = w.T @ w
            self.vocab = w.shape[0]

    @torch.no_grad()
    def final(self, h: Tensor) -> Tensor:
        return (self.norm(h) if self.norm is not None else h).float()

    def distortion(self, z: Tensor, z_fp: Tensor) -> float:
        """Summed over the tokens of this batch (divide by the token count)."""
        dz = (z - z_fp).reshape(-1, z.shape[-1])
        if self.head is None:
            return float(dz.pow(2).sum() / dz.shape[-1])
        return float(((dz @ self.gram.to(dz.device)) * dz).sum() / self.vocab)

    def kl(self, z: Tensor, z_fp: Tensor) -> float:
        """sum over tokens of KL(softmax(head(z_fp)) || softmax(head(z)))."""
        if self.head is None:
            raise BadInput("KL distortion needs a model with a language-model head; use metric: mse")
        lp = torch.log_softmax(self.head(z.to(self.head.weight.dtype)).float(), -1)
        lq = torch.log_softmax(self.head(z_fp.to(self.head.weight.dtype)).float(), -1)
        return float((lq.exp() * (lq - lp)).sum())


class BlockStreams:
    """The FP model's input of every block on the calibration windows (and the final hidden state), cached
    once: a layer's pruned variant then runs only from its own block on."""

    def __init__(self, model: nn.Module, windows: Tensor, batch_size: int, device: torch.device):
        from .models import find_blocks

        self.prefix, self.blocks = find_blocks(model)
        inputs, self.kwargs = capture_block_inputs(model, self.blocks[0], windows, batch_size, device)
        self.inputs = [inputs]
        for i, block in enumerate(self.blocks):
            inputs = BlockIO(f"{self.prefix}.{i}", inputs, self.kwargs, {}).forward(block)
            self.inputs.append(inputs)
        self.head = OutputHead(model)
        self.z_fp = [self.head.final(h) for h in self.inputs[-1]]
        self.tokens = sum(h.shape[0] * h.shape[1] for h in self.inputs[-1])

    @torch.no_grad()
    def run_from(self, start: int, stop: int | None = None) -> list[Tensor]:
        h = self.inputs[start]
        for i in range(start, len(self.blocks) if stop is None else stop):
            h = BlockIO(f"{self.prefix}.{i}", h, self.kwargs, {}).forward(self.blocks[i])
        return h

    def output_distortion(self, start: int, metric: str = "mse") -> float:
        """Mean per token of the output distortion with the blocks from `start` on as they are now."""
        h = self.run_from(start)
        f = self.head.kl if metric == "kl" else self.head.distortion
        return sum(f(self.head.final(x), z) for x, z in zip(h, self.z_fp)) / self.tokens

    def block_distortion(self, i: int) -> float:
        """Mean per token of the squared error of block i's output (its FP input, its weights as they are now)."""
        out = self.run_from(i, i + 1)
        return sum(float((o - t).pow(2).sum()) for o, t in zip(out, self.inputs[i + 1])) / self.tokens


def block_index(prefix: str, name: str) -> int:
    rest = name[len(prefix) + 1:]
    return int(rest.split(".", 1)[0])


@torch.no_grad()
def distortion_curves(streams: BlockStreams, model: nn.Module, layers: Iterable[str], levels: list[float],
                      structure: str = "unstructured", metric: str = "mse", local: bool = False,
                      on_layer: Callable[[int, int, str], None] = lambda i, n, name: None,
                      variant: Callable[[str, int], Tensor] | None = None) -> dict[str, list[float]]:
    """Distortion of each layer pruned alone at each level (level 0 included, ~0 by construction). With
    `variant(name, k)`, the layer's weight at level k is that tensor instead (any compression: EvoPress's DP
    baseline measures quantized widths this way), and level 0 is measured too."""
    layers = list(layers)
    curves: dict[str, list[float]] = {}
    for j, name in enumerate(layers):
        on_layer(j, len(layers), name)
        lin = model.get_submodule(name)
        w = lin.weight.data
        b = block_index(streams.prefix, name)
        row = []
        for k, s in enumerate(levels):
            if s == 0 and variant is None:
                row.append(0.0)
                continue
            lin.weight.data = w * magnitude_mask(w, s, structure) if variant is None else variant(name, k).to(w)
            try:
                row.append(streams.block_distortion(b) if local else streams.output_distortion(b, metric))
            finally:
                lin.weight.data = w
        curves[name] = row
    return curves


@torch.no_grad()
def joint_distortion(streams: BlockStreams, model: nn.Module, alloc: dict[str, float], structure: str = "unstructured",
                     metric: str = "mse") -> float:
    """The output distortion with every layer of `alloc` pruned at its sparsity at once."""
    saved = {}
    try:
        for name, s in alloc.items():
            lin = model.get_submodule(name)
            saved[name] = lin.weight.data
            if s > 0:
                lin.weight.data = saved[name] * magnitude_mask(saved[name], s, structure)
        start = min((block_index(streams.prefix, n) for n, s in alloc.items() if s > 0), default=len(streams.blocks))
        return streams.output_distortion(start, metric)
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


def additivity(streams: BlockStreams, model: nn.Module, curves: dict[str, list[float]], levels: list[float],
               trials: int, seed: int, structure: str = "unstructured", metric: str = "mse") -> list[dict[str, float]]:
    """`trials` random allocations (each layer a random level, drawn up to a random cap so the total ranges from
    light to heavy): the joint distortion against the sum of the single-layer ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    names = list(curves)
    for _ in range(trials):
        cap = int(torch.randint(1, len(levels), (1,), generator=g))
        picks = torch.randint(0, cap + 1, (len(names),), generator=g).tolist()
        alloc = {n: levels[k] for n, k in zip(names, picks)}
        summed = sum(curves[n][k] for n, k in zip(names, picks))
        out.append({"summed": summed, "joint": joint_distortion(streams, model, alloc, structure, metric),
                    "mean_sparsity": sum(alloc.values()) / len(alloc)})
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
