"""ReQuant's math (Hu et al. 2025, "Identifying Sensitive Weights via Post-quantization Integral"), over tensors:
the outliers a layer's sparse residual holds exactly, the objective that splits the outlier budget across layers,
and restoring chosen weights into the residual (compressor/passes/requant.py wires them to the model).

The objective of a layer with outlier mask M is the RTN error of the dense rest on its own grid weighted by the
input second moments, sum_ij E[x_j^2] (W - Q(W))_ij^2 (the diagonal of GPTQ's layer objective; outliers cost 0).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..quant import QWeight, SparseResidual, masked_zero, quantize_rtn


def outlier_mask(w: Tensor, count: int) -> Tensor:
    """The `count` largest-magnitude weights of w (N, K) as a boolean mask."""
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if count > 0:
        mask[torch.topk(w.abs().reshape(-1), min(count, w.numel())).indices] = True
    return mask.reshape(w.shape)


def objective(w: Tensor, hdiag: Tensor, mask: Tensor | None, bits: int, group_size: int, symmetric: bool,
              scale_dtype: torch.dtype, mse: bool) -> float:
    """sum_ij E[x_j^2] (W - Q(W))_ij^2 of the dense rest quantized by RTN on its own grid (outliers cost 0);
    hdiag (K,): sum over calibration tokens of x_j^2."""
    qw = quantize_rtn(w, bits, group_size, symmetric, scale_dtype, mse=mse, exact=mask)
    err = qw.dequantize_dense().to(w.device) - (w if mask is None else masked_zero(w, mask))
    return float((err.pow(2) * hdiag.unsqueeze(0)).sum())


def outlier_options(w: Tensor, hdiag: Tensor, levels: list[float], bits: int, group_size: int, symmetric: bool,
                    scale_dtype: torch.dtype, mse: bool) -> tuple[list[int], list[float]]:
    """A layer's options for the budget split: the outlier counts of the fractions `levels` (distinct, increasing)
    and the objective at each (its largest-magnitude weights held)."""
    counts = sorted({int(round(f * w.numel())) for f in levels})
    return counts, [objective(w, hdiag, outlier_mask(w, c) if c else None, bits, group_size, symmetric, scale_dtype, mse)
                    for c in counts]


def held_mask(qw: QWeight) -> Tensor:
    """Positions the residual already holds."""
    mask = torch.zeros(qw.q.numel(), dtype=torch.bool)
    if qw.sparse is not None:
        mask[qw.sparse.idx] = True
    return mask.reshape(qw.shape)


def restore(qw: QWeight, w0: Tensor, mask: Tensor) -> QWeight:
    """qw with the masked weights restored to w0 (added to its residual)."""
    held = held_mask(qw)
    target = qw.dequantize().clone()
    target[mask] = w0[mask].to(target.dtype)
    qw.sparse = SparseResidual.from_dense_mask(target, qw.dequantize_dense(), held | mask)
    return qw
