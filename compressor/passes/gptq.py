"""GPTQ (Frantar et al. 2022): quantize column by column, spreading each column's error over the columns
not yet quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X / n.

The math is `gptq_quantize` (one weight matrix and its Hessian); the registered pass only wires it to a
block: layers that read the same input are quantized together, in execution order, and each group's
Hessian is taken with the earlier groups already quantized ("true sequential").
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from pydantic import Field
from torch import Tensor, nn

from ..blocks import BlockIO, Context
from ..quant import QWeight, SparseResidual, expand_groups, find_qparams, masked_zero, qrange, refit_scales
from . import QuantConfig, layer_group_size, register_pass


class GPTQConfig(QuantConfig):
    damp: float = Field(0.01, gt=0, description="fraction of the mean Hessian diagonal added to it")
    block_size: int = Field(128, ge=1, description="columns updated lazily together")
    act_order: bool = Field(True, description="quantize columns in order of decreasing Hessian diagonal")
    true_sequential: bool = True
    refit_scales: bool = Field(True, description="after GPTQ, re-solve each row's scales for the fixed codes "
                               "against the Hessian (least squares; a row keeps its scales unless its error drops)")


@torch.no_grad()
def gptq_quantize(
    w: Tensor,  # (N, K)
    h: Tensor,  # (K, K): sum of x x^T over calibration tokens (any positive scale)
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    mse: bool = False,
    refit: bool = True,
    exact: Tensor | None = None,  # (N, K) bool
    kept: Tensor | None = None,  # (N, K) bool: a pruned layer's kept weights; the others end at exactly 0
) -> QWeight:
    """Quantize W against Hessian H. Groups stay in natural column order so the grid is plain
    compressed-tensors (no g_idx): without act_order each group's grid is found when GPTQ reaches it
    (from the already-updated weights); with act_order the grids are fixed first from W ("static groups").

    `exact`: weights held exactly by a sparse residual (dense-and-sparse, as in SpQR): the grids are fitted
    without them, their quantization error is zero (nothing to spread), and the residual holds the value each
    had when GPTQ reached it (its original value plus the updates from earlier columns).

    `kept`: a pruned layer (SparseGPT's joint sparsify-and-quantize with a fixed mask): the grids are fitted on
    the kept weights, a pruned weight takes the zero code when GPTQ reaches it and its whole value (with the
    updates it received) is spread over the later columns like any quantization error."""
    if exact is not None and kept is not None:
        raise ValueError("exact (dense-and-sparse) and kept (pruned) cannot be combined")
    w = w.float().clone()
    n, k = w.shape
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    w0, h0 = w, h  # the problem in natural column order, for the scale refit (the permuted copies below
    # are new tensors, so these stay as they are)
    g = k if group_size == -1 else group_size

    pruned = None if kept is None else ~kept.to(w.device)
    static = act_order or group_size == -1
    if static:
        fit = w if exact is None and pruned is None else masked_zero(w, exact if pruned is None else pruned)
        scale, zero = find_qparams(fit, bits, group_size, symmetric, scale_dtype, mse=mse)  # (N, G)
    else:
        scale = torch.empty(n, k // g, dtype=scale_dtype)
        zero = None if symmetric else torch.empty(n, k // g, dtype=torch.int8)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    ex = None if exact is None else exact[:, perm]
    pr = None if pruned is None else pruned[:, perm]
    held = None if exact is None else torch.zeros(n, k)  # the exact weights' values when GPTQ reached them
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    if not static:
        block_size = max(g, block_size // g * g)  # a group never straddles two lazy blocks
    q = torch.zeros(n, k, dtype=torch.int8)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _one_thread():
            _quantize_columns(w1, err1, hinv1, q[:, i1:i2], perm[i1:i2], g, static, scale, zero, bits,
                              symmetric, scale_dtype, mse, None if ex is None else ex[:, i1:i2],
                              None if held is None else held[:, i1:i2], None if pr is None else pr[:, i1:i2])
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    q = q[:, inv]
    held = None if held is None else held[:, inv]
    if refit:
        if exact is None:
            scale = refit_scales(w0, h0, q, scale, zero, group_size)
        else:  # the exact weights end at `held` whatever the scales: their error w0 - held is a constant
            z = torch.zeros_like(q) if zero is None else expand_groups(zero, k)
            scale = refit_scales(torch.where(exact, w0 - held, w0), h0, torch.where(exact, z, q), scale, zero,
                                 group_size)
    qw = QWeight(q, scale, zero, bits, group_size, group_size)
    if kept is not None:
        qw.mask = kept.cpu()
    if exact is not None:
        qw.sparse = SparseResidual.from_dense_mask(held, qw.dequantize_dense(), exact)
    return qw


@contextmanager
def _one_thread():
    """The column loop is thousands of ops on a few hundred numbers: extra threads only add synchronisation,
    and when other processes share the cores that costs ~50x (measured: 13 s vs 0.26 s a layer). Elementwise
    results do not depend on the thread count, so the codes are the same."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _quantize_columns(w1: Tensor, err1: Tensor, hinv1: Tensor, q1: Tensor, cols: Tensor, g: int, static: bool,
                      scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                      mse: bool, exact1: Tensor | None = None, held1: Tensor | None = None,
                      pruned1: Tensor | None = None) -> None:
    """One lazy block of GPTQ, in place: quantize its columns in turn (codes into q1, scaled errors into err1),
    each column's error spread over the block's later columns. Weights marked in exact1 are recorded in held1
    as they are and spread no error; weights marked in pruned1 take the zero code (dequantize to 0)."""
    qmin, qmax = qrange(bits)
    for i in range(w1.shape[1]):
        col = int(cols[i])
        gi = col // g
        if not static and col % g == 0:
            skip = exact1 if pruned1 is None else pruned1
            fit = w1[:, i : i + g] if skip is None else masked_zero(w1[:, i : i + g], skip[:, i : i + g])
            s, z = find_qparams(fit, bits, g, symmetric, scale_dtype, mse=mse)
            scale[:, gi] = s[:, 0]
            if zero is not None:
                zero[:, gi] = z[:, 0]
        s = scale[:, gi].float()
        z = 0.0 if zero is None else zero[:, gi].float()
        qi = torch.clamp(torch.round(w1[:, i] / s) + z, qmin, qmax)
        if pruned1 is not None:
            qi = torch.where(pruned1[:, i], torch.zeros_like(qi) + z, qi)
        q1[:, i] = qi.to(torch.int8)
        e = (w1[:, i] - (qi - z) * s) / hinv1[i, i]
        if exact1 is not None:
            held1[:, i] = w1[:, i]
            e = torch.where(exact1[:, i], torch.zeros_like(e), e)
        w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
        err1[:, i] = e


@register_pass("gptq", GPTQConfig, masks="keeps")
def gptq(block: nn.Module, io: BlockIO, cfg: GPTQConfig, ctx: Context,
         exact: dict[str, Tensor] | None = None) -> dict[str, QWeight]:
    """GPTQ with Hessians from the block's inputs, damping, act-order and group-wise scales. `exact`: per
    layer, weights a sparse residual holds exactly (ReQuant's outliers). Pruned layers (io.masks) are
    quantized on their fixed masks, the pruned weights ending at exactly 0."""
    out: dict[str, QWeight] = {}
    groups = io.sibling_groups(block) if cfg.true_sequential else [list(io.layers)]
    for names in groups:
        hessians = io.input_second_moments(block, names)
        for name in names:
            lin = io.layers[name]
            g = layer_group_size(name, lin.in_features, cfg, ctx)
            qw = gptq_quantize(
                lin.weight.data, hessians[name], cfg.bits, g, cfg.symmetric, cfg.torch_scale_dtype,
                damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order, mse=cfg.mse,
                refit=cfg.refit_scales, exact=None if exact is None else exact.get(name),
                kept=io.masks[name].mask if name in io.masks else None,
            )
            if name in io.masks:
                qw.sparsity_structure = io.masks[name].sparsity_structure
            qw.requested_group_size = cfg.group_size
            out[name] = qw
            lin.weight.data = qw.dequantize(lin.weight.dtype)  # later groups see this layer quantized
    return out
