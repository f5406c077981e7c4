"""GPTQ (Frantar et al. 2022): quantize column by column, spreading each column's error over the columns
not yet quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X / n.

The math is `gptq_quantize` (one weight matrix and its Hessian); the registered pass only wires it to a
block: layers that read the same input are quantized together, in execution order, and each group's
Hessian is taken with the earlier groups already quantized ("true sequential").
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import Tensor, nn

from ..quant import QWeight, find_qparams, qrange, refit_scales
from . import QuantConfig, layer_group_size, register_pass

if TYPE_CHECKING:
    from ..runner import BlockIO, Context


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
) -> QWeight:
    """Quantize W against Hessian H. Groups stay in natural column order so the grid is plain
    compressed-tensors (no g_idx): without act_order each group's grid is found when GPTQ reaches it
    (from the already-updated weights); with act_order the grids are fixed first from W ("static groups")."""
    w = w.float().clone()
    n, k = w.shape
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    w0, h0 = w, h  # the problem in natural column order, for the scale refit (the permuted copies below
    # are new tensors, so these stay as they are)
    g = k if group_size == -1 else group_size

    static = act_order or group_size == -1
    if static:
        scale, zero = find_qparams(w, bits, group_size, symmetric, scale_dtype, mse=mse)  # (N, G)
    else:
        scale = torch.empty(n, k // g, dtype=scale_dtype)
        zero = None if symmetric else torch.empty(n, k // g, dtype=torch.int8)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
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
                              symmetric, scale_dtype, mse)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    if refit:
        scale = refit_scales(w0, h0, q, scale, zero, group_size)
    return QWeight(q, scale, zero, bits, group_size, group_size)


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
                      mse: bool) -> None:
    """One lazy block of GPTQ, in place: quantize its columns in turn (codes into q1, scaled errors into err1),
    each column's error spread over the block's later columns."""
    qmin, qmax = qrange(bits)
    for i in range(w1.shape[1]):
        col = int(cols[i])
        gi = col // g
        if not static and col % g == 0:
            s, z = find_qparams(w1[:, i : i + g], bits, g, symmetric, scale_dtype, mse=mse)
            scale[:, gi] = s[:, 0]
            if zero is not None:
                zero[:, gi] = z[:, 0]
        s = scale[:, gi].float()
        z = 0.0 if zero is None else zero[:, gi].float()
        qi = torch.clamp(torch.round(w1[:, i] / s) + z, qmin, qmax)
        q1[:, i] = qi.to(torch.int8)
        e = (w1[:, i] - (qi - z) * s) / hinv1[i, i]
        w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
        err1[:, i] = e


@register_pass("gptq", GPTQConfig)
def gptq(block: nn.Module, io: "BlockIO", cfg: GPTQConfig, ctx: "Context") -> dict[str, QWeight]:
    """GPTQ with Hessians from the block's inputs, damping, act-order and group-wise scales."""
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
                refit=cfg.refit_scales,
            )
            qw.requested_group_size = cfg.group_size
            out[name] = qw
            lin.weight.data = qw.dequantize(lin.weight.dtype)  # later groups see this layer quantized
    return out
