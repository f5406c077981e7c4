"""GPTQ (Frantar et al. 2022): quantize column by column, spreading each column's error over the columns not yet
quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X / n. One weight matrix and its Hessian
(compressor/passes/gptq.py wires it to a block), with a sparse residual (dense-and-sparse) or a fixed pruning mask.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from ..quant import QWeight, SparseResidual, expand_groups, find_qparams, masked_zero, qrange, refit_scales


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
