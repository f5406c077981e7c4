"""Post-quantization integral (PQI, Hu et al. 2025, "Identifying Sensitive Weights via Post-quantization
Integral") and the sensitivity estimates it is compared with, over a gradient callable.

For weights w, their quantized values w~ = w + dw and a calibration loss F, the gradient theorem gives
dF = F(w~) - F(w) = integral over t in [0, 1] of grad F(w + t dw) . dw dt. PQI discretises t into N intervals at
their midpoints t_k = (k + 1/2) / N:
    c_i = dw_i * mean_k dF/dw_i (w + t_k dw),   sum_i c_i ~ dF,   |c_i| = weight i's sensitivity.
Beside it, the local estimates: first order g(w) . dw, second order + dw^T H dw / 2 (the Hessian-vector product by a
central difference of gradients). `grad_at(t)` is dF/dw of every target weight at w + t dw (float32; on a model:
compressor.measure, which also has the loss and the Fisher score).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Tick = Callable[[str], None]
GradAt = Callable[[float], dict[str, Tensor]]  # t -> {name: dF/dw at w + t dw}


def pqi(grad_at: GradAt, dw: dict[str, Tensor], intervals: int, tick: Tick | None = None) -> dict[str, Tensor]:
    """c_i = dw_i * mean over the N midpoints t_k of dF/dw_i(w0 + t_k dw)."""
    mean = {name: torch.zeros_like(d, dtype=torch.float32) for name, d in dw.items()}
    for k in range(intervals):
        t = (k + 0.5) / intervals
        for name, g in grad_at(t).items():
            mean[name] += g / intervals
        if tick:
            tick(f"PQI t={t:.3f} ({k + 1}/{intervals})")
    return {name: mean[name].mul_(dw[name].float()) for name in dw}  # in place: one copy of the weights less


def taylor(grad_at: GradAt, dw: dict[str, Tensor], eps: float = 1e-3) -> tuple[float, float]:
    """(first-order, second-order) Taylor estimates of dF at w0: g . dw and g . dw + dw^T H dw / 2, with
    H dw ~ (g(w0 + eps dw) - g(w0 - eps dw)) / (2 eps)."""
    g = grad_at(0.0)
    first = sum(float((g[n] * dw[n].float()).sum()) for n in dw)
    gp = grad_at(eps)
    gm = grad_at(-eps)
    quad = sum(float(((gp[n] - gm[n]) / (2 * eps) * dw[n].float()).sum()) for n in dw)
    return first, first + quad / 2


def top_global(scores: dict[str, Tensor], count: int, exclude: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Boolean masks of the `count` highest scores over all layers together (excluded positions never chosen)."""
    names = list(scores)
    flat = torch.empty(sum(scores[n].numel() for n in names), dtype=torch.float32)
    i = 0
    for n in names:
        part = flat[i : i + scores[n].numel()]
        part.copy_(scores[n].reshape(-1))
        if exclude is not None and n in exclude:
            part.masked_fill_(exclude[n].reshape(-1), float("-inf"))
        i += scores[n].numel()
    count = min(count, int(torch.isfinite(flat).sum()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if count > 0:
        chosen[torch.topk(flat, count).indices] = True
    out, i = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = chosen[i : i + k].reshape(scores[n].shape)
        i += k
    return out
