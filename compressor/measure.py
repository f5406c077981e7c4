"""What the plans measure on a model with some weights swapped: forwards (and gradients) over calibration windows.
The math they feed is in compressor/algorithms/ (curves and additivity: prune; PQI and Taylor: pqi).

- `BlockStreams` + `OutputHead`: the FP input of every block cached once, so a layer's variant runs only the
  blocks from its own on; the distortion of the model's output (mean squared logit error, computed without the
  vocabulary projection as dz^T (W^T W) dz / V on the final hidden state, exact for a linear head; or KL), or of
  one block's output. `distortion_curves`, `joint_distortion`, `additivity` bind algorithms.prune's loops to them.
  On several ranks (compressor/dist.py) each rank caches only its own windows and every distortion is the sum over
  all ranks' windows divided by their tokens, so each rank gets one process's number (up to float order).
- `KLFitness`: EvoPress's fitness, KL(dense || compressed) of the next-token distributions on calibration windows,
  the dense side's top-k probabilities computed once (the rest of the vocabulary lumped into one bucket, so the
  value is the KL of the coarsened distributions, a lower bound of the full one). Its forwards may run in
  bfloat16 (autocast, both sides), as the paper's GPU searches do: on this project's CPU (AVX-512 BF16) that is
  2.7x the float32 speed, and the two rank a generation's offspring alike (bench/fitness_dtype.py measures it).
  With metric "perplexity" the fitness is instead the compressed model's mean next-token NLL (log-perplexity).
- `subblock_influence`: ShortGPT's block influence of every residual sub-block (EvoPress's depth space).
- `loss`, `gradient`, `pqi`, `taylor`: the calibration loss F (mean next-token NLL), its gradient with respect to
  the target weights (`params`: name -> the Linear weight Parameter, set in place; the caller keeps the original
  values `w0`), the empirical Fisher diagonal, and algorithms.pqi's estimates bound to them. On several ranks
  (dist.py) each rank passes its part of the windows (dist.head) and gets the value over all of them: F is the
  summed NLL over the ranks divided by the prediction count over the ranks, the gradient the sum of each rank's
  gradient of its NLL sum over that count (one all-reduce), the Fisher the sum with the window count over the
  ranks. A rank with no window joins the reductions with zeros, so every rank sees the same numbers.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dist
from .algorithms import pqi as PQI
from .algorithms import prune as P
from .blocks import BlockIO, Context, stream_blocks
from .errors import BadInput
from .models import find_blocks

# ------------------------------------------------------------------------------------ distortion of the output


def block_index(prefix: str, name: str) -> int:
    """The index of the block that module `name` is in (`prefix`: the blocks' ModuleList, e.g. "model.layers")."""
    return int(name[len(prefix) + 1:].split(".", 1)[0])


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
        """The final norm of the last block's output (moved to the norm's device: the cache may be on the CPU)."""
        if self.norm is None:
            return h.float()
        return self.norm(h.to(next(self.norm.parameters(), h).device)).float()

    def distortion(self, z: Tensor, z_fp: Tensor) -> float:
        """Summed over the tokens of this batch (divide by the token count). The per-token terms are added in
        float64: the sum then hardly depends on how the windows are batched or split between ranks (a plan's
        curves on 1 and 2 ranks: 3e-8 apart, relative, against 3e-7 added in float32)."""
        dz = (z - z_fp).reshape(-1, z.shape[-1])
        if self.head is None:
            return float(dz.pow(2).sum(dtype=torch.float64) / dz.shape[-1])
        return float(((dz @ self.gram.to(dz.device)) * dz).sum(dtype=torch.float64) / self.vocab)

    def kl(self, z: Tensor, z_fp: Tensor) -> float:
        """sum over tokens of KL(softmax(head(z_fp)) || softmax(head(z))) (added in float64, as `distortion`)."""
        if self.head is None:
            raise BadInput("KL distortion needs a model with a language-model head; use metric: mse")
        lp = torch.log_softmax(self.head(z.to(self.head.weight.dtype)).float(), -1)
        lq = torch.log_softmax(self.head(z_fp.to(self.head.weight.dtype)).float(), -1)
        return float((lq.exp() * (lq - lp)).sum(dtype=torch.float64))


class BlockStreams:
    """The FP model's input of every block on the calibration windows (and the final hidden state), cached
    once: a layer's variant then runs only from its own block on. On several ranks `windows` is this rank's part
    of the windows measured (dist.head); a rank may hold none and still takes part in every distortion's sum."""

    def __init__(self, model: nn.Module, windows: Tensor, batch_size: int, device: torch.device):
        """`model`: in memory on `device`; the cached inputs live there too unless they would not fit
        (blocks.cache_device: then on the CPU)."""
        self.prefix, self.blocks = find_blocks(model)
        # per block, then the final hidden state: per batch (B, T, D); no batch at all on a rank without windows
        self.inputs: list[list[Tensor]] = [[] for _ in range(len(self.blocks) + 1)]
        self.kwargs: list[dict] = []
        if len(windows):  # stream_blocks cannot capture inputs from no window
            self.inputs = []
            ctx = Context(device=device, batch_size=batch_size)
            for i, block, io in stream_blocks(model, None, windows, ctx, streams=len(self.blocks) + 1):
                if i == 0:
                    self.inputs.append(io.inputs)
                    self.kwargs = io.kwargs
                io.outputs = io.forward(block)
                self.inputs.append(io.outputs)
        self.head = OutputHead(model)
        self.z_fp = [self.head.final(h) for h in self.inputs[-1]]
        self.tokens = dist.sum_ints([sum(h.shape[0] * h.shape[1] for h in self.inputs[-1])])[0]  # over every rank

    @torch.no_grad()
    def run_from(self, start: int, stop: int | None = None) -> list[Tensor]:
        """The cached input of block `start` run through the blocks up to `stop` (default: all) as they are now."""
        h = self.inputs[start]
        for i in range(start, len(self.blocks) if stop is None else stop):
            h = BlockIO(f"{self.prefix}.{i}", h, self.kwargs, {}).forward(self.blocks[i])
        return h

    def output_distortion(self, start: int, metric: str = "mse") -> float:
        """Mean per token of the output distortion with the blocks from `start` on as they are now (over every
        rank's windows: each rank calls it at the same point)."""
        h = self.run_from(start)
        f = self.head.kl if metric == "kl" else self.head.distortion
        return dist.sum_floats([sum(f(self.head.final(x), z) for x, z in zip(h, self.z_fp))])[0] / self.tokens

    def block_distortion(self, i: int) -> float:
        """Mean per token of the squared error of block i's output (its FP input, its weights as they are now;
        over every rank's windows, as output_distortion)."""
        out = self.run_from(i, i + 1)
        local = sum(float((o - t).pow(2).sum(dtype=torch.float64)) for o, t in zip(out, self.inputs[i + 1]))
        return dist.sum_floats([local])[0] / self.tokens

    @torch.no_grad()
    def distortion(self, model: nn.Module, swapped: dict[str, Tensor], metric: str = "mse", local: bool = False) -> float:
        """The output distortion with the weights of the layers in `swapped` replaced by those tensors (put back
        after), run from the first changed block on; `local`: the block distortion of that block instead."""
        saved = {}
        try:
            for name, w in swapped.items():
                lin = model.get_submodule(name)
                saved[name] = lin.weight.data
                lin.weight.data = w
            start = min((block_index(self.prefix, n) for n in swapped), default=len(self.blocks))
            return self.block_distortion(start) if local else self.output_distortion(start, metric)
        finally:
            for name, w in saved.items():
                model.get_submodule(name).weight.data = w


@torch.no_grad()
def distortion_curves(streams: BlockStreams, model: nn.Module, layers: Iterable[str], levels: list[float],
                      structure: str = "unstructured", metric: str = "mse", local: bool = False,
                      on_layer: Callable[[int, int, str], None] = lambda i, n, name: None,
                      variant: Callable[[str, int], Tensor] | None = None) -> dict[str, list[float]]:
    """algorithms.prune.layer_curves on the model: each layer's distortion alone at each level (`local`: of its
    block's output, a fast heuristic not comparable across blocks for the DP's sum)."""
    weights = {name: model.get_submodule(name).weight.data for name in layers}
    return P.layer_curves(weights, levels, lambda name, w: streams.distortion(model, {name: w}, metric, local),
                          structure, on_layer, variant)


@torch.no_grad()
def joint_distortion(streams: BlockStreams, model: nn.Module, alloc: dict[str, float], structure: str = "unstructured",
                     metric: str = "mse") -> float:
    """The output distortion with every layer of `alloc` pruned at its sparsity at once."""
    weights = {name: model.get_submodule(name).weight.data for name in alloc}
    return streams.distortion(model, P.pruned_dense(weights, alloc, structure), metric)


def additivity(streams: BlockStreams, model: nn.Module, curves: dict[str, list[float]], levels: list[float],
               trials: int, seed: int, structure: str = "unstructured", metric: str = "mse") -> list[dict[str, float]]:
    """algorithms.prune.additivity_trials with the joint distortion measured on the model."""
    return P.additivity_trials(curves, levels, trials, seed,
                               lambda alloc: joint_distortion(streams, model, alloc, structure, metric))


# ------------------------------------------------------------------------------------------------ EvoPress


class KLFitness:
    """KL(dense || compressed) of the next-token distributions over random windows from a pool, the dense side's
    top-k log-probabilities (and the mass outside them) computed once per window.

    On several ranks (dist.py) `windows` is this rank's part of the pool (dist.head: pool window i is window i // W
    of rank i % W). A stage draws pool windows as one process does; each rank scores those it holds and the KL (or
    NLL) sums and counts are summed over the ranks, so every rank gets the one process's fitness (up to float
    order) and takes the same selection decision."""

    def __init__(self, model: nn.Module, windows: Tensor, layers: Iterable[str], variants: dict[str, list[Tensor]],
                 stage_windows: list[int], topk: int = 256, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32, metric: str = "kl"):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise BadInput(f"KL fitness dtype must be float32, bfloat16 or float16, got {dtype}")
        if metric not in ("kl", "perplexity"):
            raise BadInput(f"fitness metric must be 'kl' or 'perplexity', got {metric!r}")
        self.model, self.windows, self.device, self.dtype, self.metric = model, windows, device, dtype, metric
        self.world = dist.world()
        self.pool_size = dist.sum_ints([len(windows)])[0]  # the windows of the whole pool, over every rank
        self.layers = list(layers)
        self.variants = variants
        self.stage_windows = stage_windows
        self.topk = topk
        self.dense: list[tuple[Tensor, Tensor, Tensor]] = []  # per window: top-k ids, their log p, log of the rest
        with torch.no_grad(), self._compute():
            for w in windows if metric == "kl" else ():  # perplexity needs no dense side
                lp = self._log_probs(w)
                top, ids = lp.topk(min(topk, lp.shape[-1]), dim=-1)
                rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
                self.dense.append((ids, top, rest))
        self.calls = 0

    def _compute(self):
        """The forwards' compute type: autocast below float32. One context spans all windows of a state, so
        autocast's cast cache (weights that require grad) casts each weight once per state, not once per window
        (16 windows of 128 tokens on the demo, one thread: 7.1 s -> 5.9 s, the same logits). `set_state` swaps
        `weight.data` under the cached casts, so it must run outside the context."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _log_probs(self, w: Tensor) -> Tensor:
        """Next-token log-probabilities (T - 1, V) in float32 (inside `_compute()`)."""
        out = self.model(input_ids=w.unsqueeze(0).to(self.device), attention_mask=torch.ones(1, w.numel(), dtype=torch.long,
                                                                                             device=self.device), use_cache=False)
        return torch.log_softmax(out.logits[0, :-1].float(), -1)

    def set_state(self, state: tuple[int, ...]) -> None:
        for name, k in zip(self.layers, state):
            lin = self.model.get_submodule(name)
            lin.weight.data = self.variants[name][k].to(lin.weight.device, torch.float32)

    @torch.no_grad()
    def kl(self, state: tuple[int, ...], window_ids: list[int]) -> float:
        """The fitness of `state` on the pool windows `window_ids` (over every rank)."""
        self.set_state(state)
        total, count = 0.0, 0
        size, rank = self.world.size, self.world.rank
        with self._compute():
            for i in (i // size for i in window_ids if i % size == rank):  # the ones this rank holds
                lq = self._log_probs(self.windows[i])
                if self.metric == "perplexity":  # the mean next-token NLL: log-perplexity, ordered as perplexity
                    nll = -lq.gather(-1, self.windows[i][1:].to(lq.device).unsqueeze(-1))
                    total += float(nll.sum())
                    count += nll.numel()
                    continue
                ids, lp, rest_p = self.dense[i]
                lq_top = lq.gather(-1, ids)
                rest_q = torch.log1p(-lq_top.exp().sum(-1).clamp(max=1 - 1e-7))
                kl = (lp.exp() * (lp - lq_top)).sum(-1) + rest_p.exp() * (rest_p - rest_q)
                total += float(kl.sum())
                count += kl.numel()
        self.calls += 1
        total, count = dist.sum_floats([total, count])
        return total / max(count, 1)

    def __call__(self, state: tuple[int, ...], stage: int, rng: torch.Generator) -> float:
        n = min(self.stage_windows[stage], self.pool_size)
        ids = torch.randperm(self.pool_size, generator=rng)[:n].tolist()
        return self.kl(state, ids)


@torch.no_grad()
def subblock_influence(model: nn.Module, blocks: list[nn.Module], windows: Tensor, parts: tuple[str, ...] = ("self_attn", "mlp"),
                       device: torch.device = torch.device("cpu")) -> dict[tuple[int, str], float]:
    """ShortGPT-style block influence of every residual sub-block (Men et al. 2024): 1 - the mean cosine similarity
    between the residual stream before and after it, over the tokens of `windows` on the FP model. A sub-block
    whose output barely turns the stream is the cheapest to drop. Llama-style blocks only: h_mid = h + attn(.),
    h_out = h_mid + mlp(.), with `parts` the two children's names. Returns {(block index, part): influence}. On
    several ranks, `windows` is this rank's part; the sums and the token count are summed over the ranks."""
    sums: dict[tuple[int, str], float] = {}
    count = 0
    state: dict[int, dict[str, Tensor]] = {}
    handles = []

    def cos_sum(a: Tensor, b: Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).sum())

    for i, block in enumerate(blocks):
        def pre(_m, args, kwargs, i=i):
            state[i] = {"h": args[0] if args else kwargs["hidden_states"]}

        def attn_out(_m, _args, out, i=i):
            state[i]["a"] = out[0] if isinstance(out, (tuple, list)) else out

        def block_out(_m, _args, out, i=i):
            h, a = state[i]["h"], state[i]["a"]
            mid = h + a
            y = out[0] if isinstance(out, (tuple, list)) else out
            sums[(i, parts[0])] = sums.get((i, parts[0]), 0.0) + cos_sum(h, mid)
            sums[(i, parts[1])] = sums.get((i, parts[1]), 0.0) + cos_sum(mid, y)

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    block.get_submodule(parts[0]).register_forward_hook(attn_out),
                    block.register_forward_hook(block_out)]
    try:
        for w in windows:
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
            count += w.numel()
    finally:
        for h in handles:
            h.remove()
    keys = [(i, p) for i in range(len(blocks)) for p in parts]  # (a rank with no window has no sums of its own)
    *totals, count = dist.sum_floats([sums.get(k, 0.0) for k in keys] + [count])
    return {k: 1.0 - v / count for k, v in zip(keys, totals)}


# ---------------------------------------------------------------------------------- loss, gradient, PQI


def _nll_sum(model: nn.Module, ids: Tensor) -> Tensor:
    """Summed next-token NLL of windows (B, T): (B * (T - 1)) predictions."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


@torch.no_grad()
def set_weights(params: dict[str, nn.Parameter], w0: dict[str, Tensor], dw: dict[str, Tensor], t: float) -> None:
    """Every target weight to w0 + t dw (in place)."""
    for name, p in params.items():
        p.copy_(w0[name] + t * dw[name])


@torch.no_grad()
def loss(model: nn.Module, windows: Tensor, batch: int = 1) -> float:
    """F: the mean next-token NLL over the windows (n, T) (of every rank's windows: see the module docstring)."""
    dev = next(model.parameters()).device
    total = sum(float(_nll_sum(model, windows[i : i + batch].to(dev))) for i in range(0, len(windows), batch))
    total, count = dist.sum_floats([total, windows.shape[0] * (windows.shape[1] - 1)])
    return total / count


def gradient(model: nn.Module, params: dict[str, nn.Parameter], windows: Tensor, batch: int = 1,
             per_window_sq: bool = False) -> dict[str, Tensor]:
    """dF/dw of every target weight at its current value (float32). With per_window_sq, instead the mean over
    windows of the squared per-window gradient of that window's mean NLL (the empirical Fisher diagonal). Both over
    every rank's windows: each rank's part is scaled by the counts over the ranks and the parts are summed in one
    all-reduce of a flat buffer, which the returned tensors are views of."""
    dev = next(model.parameters()).device
    n_windows = dist.sum_ints([windows.shape[0]])[0]
    n_pred = n_windows * (windows.shape[1] - 1)
    for p in params.values():
        p.grad = None
    if per_window_sq:
        flat, acc = _flat(params)
        flat.zero_()
        for i in range(len(windows)):
            (_nll_sum(model, windows[i : i + 1].to(dev)) / (windows.shape[1] - 1)).backward()
            for name, p in params.items():
                acc[name] += p.grad.float().pow(2) / n_windows
                p.grad = None
    else:
        for i in range(0, len(windows), batch):
            (_nll_sum(model, windows[i : i + batch].to(dev)) / n_pred).backward()
        flat, acc = _flat(params)  # after the backward: the gradients move into it one by one, not held twice
        for name, p in params.items():
            if p.grad is None:  # this rank has no window: its part is zero
                acc[name].zero_()
            else:
                acc[name].copy_(p.grad)
            p.grad = None
    dist.all_reduce_sum(flat)
    return acc


def _flat(params: dict[str, nn.Parameter]) -> tuple[Tensor, dict[str, Tensor]]:
    """An uninitialised float32 buffer as long as all the target weights together, and its view per weight (in
    `params`' order). The views lie in the buffer in the order of the names, not of `params`: the all-reduce adds
    the ranks' buffers element by element, so each weight must sit at the same place on every rank, and a caller's
    dict need not list them alike there (GPTQ's results list a rank's own solves first)."""
    flat = torch.empty(sum(p.numel() for p in params.values()), dtype=torch.float32,
                       device=next(iter(params.values())).device)
    views, at = {}, 0
    for name in sorted(params):
        views[name] = flat[at : at + params[name].numel()].view(params[name].shape)
        at += params[name].numel()
    return flat, {name: views[name] for name in params}


def grad_at(model: nn.Module, params: dict[str, nn.Parameter], w0: dict[str, Tensor], dw: dict[str, Tensor],
            windows: Tensor, batch: int = 1) -> PQI.GradAt:
    """t -> dF/dw at w0 + t dw (the weights are left there)."""
    def at(t: float) -> dict[str, Tensor]:
        set_weights(params, w0, dw, t)
        return gradient(model, params, windows, batch)
    return at


def pqi(model: nn.Module, params: dict[str, nn.Parameter], w0: dict[str, Tensor], dw: dict[str, Tensor],
        windows: Tensor, intervals: int, batch: int = 1, tick: PQI.Tick | None = None) -> dict[str, Tensor]:
    """algorithms.pqi.pqi on the model: c_i per weight. Leaves the weights at w0 + dw."""
    c = PQI.pqi(grad_at(model, params, w0, dw, windows, batch), dw, intervals, tick)
    set_weights(params, w0, dw, 1.0)
    return c


def taylor(model: nn.Module, params: dict[str, nn.Parameter], w0: dict[str, Tensor], dw: dict[str, Tensor],
           windows: Tensor, batch: int = 1, eps: float = 1e-3) -> tuple[float, float]:
    """algorithms.pqi.taylor on the model: (first-order, second-order) estimates of dF. Leaves the weights at w0."""
    out = PQI.taylor(grad_at(model, params, w0, dw, windows, batch), dw, eps)
    set_weights(params, w0, dw, 0.0)
    return out
