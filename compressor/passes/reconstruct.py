"""Block reconstruction (BRECQ, Li et al. 2021): learn how a block's weights are quantized by making the
quantized block reproduce the FP model's output of that block.

Inputs come from the already-compressed model (io.inputs), targets from the FP model (io.targets): the
quantized block learns to correct what the earlier blocks got wrong as well as its own error. A learned
quantizer is a module whose forward returns the weight it stands for (differentiable in its parameters)
and whose `hard()` returns the final integer grid; `reconstruct` trains any set of them on one block.
AdaRound and FlexRound differ only in their quantizer and loss schedule (adaround.py, flexround.py).

Memory: the quantizers' tensors and Adam state for one block; the cached activations stay where the
runner keeps them and each step moves one mini-batch to the device.
"""
from __future__ import annotations

import abc
import math
import zlib
from typing import Callable

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from .. import dist
from ..blocks import BlockIO, Context, hidden, rel_sq_err, slice_kwargs, to_device
from ..quant import QWeight, SparseResidual, expand_groups, find_qparams, masked_zero, qrange
from . import QuantConfig, layer_group_size


BATCH_TOKENS = 512  # tokens per training step when batch_samples is not set


class ReconConfig(QuantConfig):
    """Settings shared by the block-reconstruction passes."""

    mse: bool = Field(True, description="initial grid from the clipping search (min/max when false)")
    iters: int = Field(500, ge=1, description="optimizer steps per block")
    lr: float = Field(1e-3, gt=0)
    # Tokens per step matter more than windows: MiniLM (windows of 128) at one window a step ended below GPTQ
    # (embedding cosine 0.977 vs 0.980), at 4 and 8 windows above it (0.9854, 0.9865).
    batch_samples: int | None = Field(None, ge=1, description="calibration windows per step; default: enough "
                                      f"windows for {BATCH_TOKENS} tokens")


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` (step 0) to `end` (step `total`)."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


class LearnedWeight(nn.Module, abc.ABC):
    """Base of a learned quantizer of one Linear weight: forward() returns the weight it stands for
    (differentiable in its parameters), hard() the final integer grid. Holds the grid's fixed parts: bits,
    group size, code range, and the zero point (as stored, and expanded to the weight's shape as `z`).
    Subclasses give soft() (the learned weight) and hard_grid() (its rounding). With `hold_exact(mask)` the
    masked weights stay at their original values (a sparse residual holds them: dense-and-sparse)."""

    def __init__(self, w: Tensor, zero: Tensor | None, bits: int, group_size: int):
        super().__init__()
        n, k = w.shape
        self.bits, self.group_size = bits, group_size
        self.qmin, self.qmax = qrange(bits)
        self.zero = zero  # (N, G) int8 as stored, None when symmetric
        z = torch.zeros(n, 1, device=w.device) if zero is None else zero.float()
        self.register_buffer("z", expand_groups(z, k))
        self.exact: Tensor | None = None  # (N, K) bool
        self.w_exact: Tensor | None = None  # (N, K) the values the residual holds

    def hold_exact(self, mask: Tensor, w: Tensor) -> None:
        self.exact, self.w_exact = mask, w.float()

    @abc.abstractmethod
    def soft(self) -> Tensor:
        """The learned weight (N, K), differentiable in the quantizer's parameters."""

    @abc.abstractmethod
    def hard_grid(self) -> QWeight:
        """The final integer grid of the learned weight (its rounding)."""

    def forward(self) -> Tensor:
        w = self.soft()
        return w if self.exact is None else torch.where(self.exact, self.w_exact, w)

    @torch.no_grad()
    def hard(self) -> QWeight:
        qw = self.hard_grid()
        if self.exact is not None:
            qw.sparse = SparseResidual.from_dense_mask(self.w_exact.cpu(), qw.dequantize_dense(), self.exact.cpu())
        return qw

    def _qweight(self, q: Tensor, scale: Tensor) -> QWeight:
        """The QWeight of float codes `q` (already clamped) on `scale` and this quantizer's zero point."""
        return QWeight(q.to(torch.int8).cpu(), scale.cpu(), None if self.zero is None else self.zero.cpu(), self.bits,
                       self.group_size, self.group_size)


def learn_rounding(
    label: str,
    block: nn.Module,
    io: BlockIO,
    cfg: ReconConfig,
    ctx: Context,
    make: Callable[[Tensor, Tensor, Tensor | None, int], LearnedWeight],
    lr_decay: bool,
    regularizer_for: Callable[[dict[str, LearnedWeight]], Callable[[int], Tensor | None]] | None = None,
    exact: dict[str, Tensor] | None = None,
) -> dict[str, QWeight]:
    """A learned-rounding pass on one block: per layer the initial grid (min/max or MSE) and
    `make(w, scale, zero, group_size)` its quantizer, then `reconstruct`, a log line with the hard-rounded
    error before and after, and the final QWeights. `exact`: per layer, weights held exactly by a sparse
    residual (the grid is fitted without them; the block learns around them)."""
    quants: dict[str, LearnedWeight] = {}
    for name, lin in io.layers.items():
        g = layer_group_size(name, lin.in_features, cfg, ctx)
        w = lin.weight.data.float()
        mask = None if exact is None else exact.get(name)
        fit = w if mask is None else masked_zero(w, mask.to(w.device))
        scale, zero = find_qparams(fit, cfg.bits, g, cfg.symmetric, cfg.torch_scale_dtype, mse=cfg.mse)
        quants[name] = make(w, scale, zero, g)
        if mask is not None:
            quants[name].hold_exact(mask.to(w.device), w)
    regularizer = regularizer_for(quants) if regularizer_for is not None else None
    out, stats = reconstruct(block, io, quants, ctx, cfg.iters, cfg.lr, cfg.batch_samples, lr_decay, regularizer)
    ctx.log(f"{label} {io.prefix}: block output rel. error (hard-rounded, first batch) {stats['before']:.3g} at the "
            f"start -> {stats['after']:.3g}")
    for qw in out.values():
        qw.requested_group_size = cfg.group_size
    return out


def reconstruct(
    block: nn.Module,
    io: BlockIO,
    quantizers: dict[str, LearnedWeight],
    ctx: Context,
    iters: int,
    lr: float,
    batch_samples: int | None,
    lr_decay: bool,
    regularizer: Callable[[int], Tensor | None] | None = None,
) -> tuple[dict[str, QWeight], dict[str, float]]:
    """Train `quantizers` ({full layer name: learned quantizer of that Linear}) with Adam so that the block,
    its layers' weights replaced by the quantizers' outputs, maps io.inputs to io.targets. Loss: the
    relative squared error of the block output, sum (y - t)^2 / sum t^2 over the mini-batch, plus
    `regularizer(step)` when it returns a tensor. `lr_decay`: cosine decay of the learning rate to 0.
    The block's own parameters are not changed. Returns the hard-rounded QWeights and their relative error on
    the first cached batch before and after training ({"before", "after"}; single windows differ too much
    to compare)."""
    if io.targets is None:
        raise RuntimeError("block reconstruction needs the FP targets; register the pass with reads='targets'")
    local = {name: name[len(io.prefix) + 1 :] + ".weight" for name in quantizers}
    dtypes = {name: io.layers[name].weight.dtype for name in quantizers}
    params = [p for q in quantizers.values() for p in q.parameters()]
    # fused: one kernel over all the parameters instead of a dozen elementwise passes each (CPU and CUDA)
    opt = torch.optim.Adam(params, lr=lr, fused=all(p.device.type in ("cpu", "cuda") for p in params))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, iters, 1.0, 0.0)) if lr_decay else None
    # several ranks (dist.py) train as DDP does: every rank draws the same step windows one process would (the same
    # seeded generator over the batches of the whole calibration set) and runs those of them its shard holds; the
    # loss is the relative error over the whole step's windows (the denominator summed over ranks) and the gradients
    # are summed over ranks before every step, so every rank takes the step one process takes, up to float order
    world = dist.world()
    gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + zlib.crc32(io.prefix.encode()))
    sizes = torch.tensor([x.shape[0] for x in io.inputs], dtype=torch.float)
    if world.size > 1:  # the batches one process caches: the whole set's windows, ctx.batch_size at a time
        total = dist.sum_ints([int(sizes.sum())])[0]
        sizes = torch.tensor([min(ctx.batch_size, total - i) for i in range(0, total, ctx.batch_size)], dtype=torch.float)
    if batch_samples is None:
        batch_samples = max(1, -(-BATCH_TOKENS // io.inputs[0].shape[1]))
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    before = _hard_error(block, io, _hard(quantizers), local, dtypes, ctx.device)
    try:
        for step in range(iters):
            batch = _minibatch(io, sizes, batch_samples, gen, ctx.device, world, ctx.batch_size)
            loss = None
            if batch is not None:  # (a rank none of whose windows the step drew still joins the reductions)
                x, t, kw = batch
                weights = {local[n]: q().to(dtypes[n]) for n, q in quantizers.items()}
                y = hidden(functional_call(block, weights, (x,), kw)).float()
                den = t.float().pow(2).sum()
                loss = (y - t.float()).pow(2).sum()
            if world.size > 1:
                den = dist.all_reduce_sum(den.clone() if batch is not None else torch.zeros((), device=ctx.device))
            if loss is not None:
                loss = loss / den.clamp_min(1e-30)
            reg = None if regularizer is None else regularizer(step)
            if reg is not None:
                reg = reg / world.size  # each rank's share: the sum over ranks is the regularizer once
                loss = reg if loss is None else loss + reg
            opt.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            if world.size > 1:
                _sum_grads(params)
            opt.step()
            if sched is not None:
                sched.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    out = dist.broadcast(_hard(quantizers), 0)  # identical on every rank already; rank 0's, to be sure
    return out, {"before": before, "after": _hard_error(block, io, out, local, dtypes, ctx.device)}


def _sum_grads(params: list[Tensor]) -> None:
    """Every parameter's gradient summed over the ranks, in one collective."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def _hard(quantizers: dict[str, LearnedWeight]) -> dict[str, QWeight]:
    with torch.no_grad():
        return {n: q.hard() for n, q in quantizers.items()}


@torch.no_grad()
def _hard_error(block: nn.Module, io: BlockIO, qweights: dict[str, QWeight], local: dict[str, str],
                dtypes: dict[str, torch.dtype], device: torch.device) -> float:
    """sum (y - t)^2 / sum t^2 on the first cached batch, with the block's layers set to `qweights`."""
    weights = {local[n]: qw.dequantize(dtypes[n]).to(device) for n, qw in qweights.items()}
    kw = {k: to_device(v, device) for k, v in io.kwargs[0].items()}
    y = hidden(functional_call(block, weights, (io.inputs[0].to(device),), kw))
    return rel_sq_err([y], [io.targets[0].to(device)])  # type: ignore[index]


def _minibatch(io: BlockIO, sizes: Tensor, n: int, gen: torch.Generator, device: torch.device,
               world: dist.World = dist.World(), batch_size: int = 0):
    """`n` random windows of one cached batch (picked in proportion to its size), moved to `device`: (inputs,
    targets, kwargs). On several ranks `sizes` are the batches of the whole set (`batch_size` windows each), the
    draw is the one a single process makes, and the result is the drawn windows this rank's shard holds (global
    window i is window i // W of rank i % W), or None when it holds none of them."""
    b = int(torch.multinomial(sizes, 1, generator=gen))
    size = int(sizes[b])
    rows = torch.randperm(size, generator=gen)[: min(n, size)].sort().values
    if world.size == 1:
        x, t = io.inputs[b][rows], io.targets[b][rows]  # type: ignore[index]
        kw = slice_kwargs(io.kwargs[b], size, rows)
    else:
        ids = b * batch_size + rows
        mine = ids[ids % world.size == world.rank] // world.size  # indices into this rank's shard, ascending
        if len(mine) == 0:
            return None
        at, row = mine // batch_size, mine % batch_size  # its cached batch, and the row in it
        parts = [(int(k), row[at == k]) for k in at.unique()]
        x = torch.cat([io.inputs[k][r] for k, r in parts])
        t = torch.cat([io.targets[k][r] for k, r in parts])  # type: ignore[index]
        # the windows are full ones of one length, so every batch's keyword arguments (causal mask, positions)
        # are the same per window: the first batch's, cut to the count, serve windows from any batch
        kw = slice_kwargs(io.kwargs[0], io.inputs[0].shape[0], torch.arange(len(mine)))
    kw = {k: to_device(v, device) for k, v in kw.items()}
    return x.to(device), t.to(device), kw
