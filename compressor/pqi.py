"""Post-quantization integral (PQI, Hu et al. 2025, "Identifying Sensitive Weights via Post-quantization
Integral") and the sensitivity estimates it is compared with.

For weights w, their quantized values w~ = w + dw and a calibration loss F (mean next-token NLL over
calibration windows), the gradient theorem gives dF = F(w~) - F(w) = integral over t in [0, 1] of
grad F(w + t dw) . dw dt. PQI discretises t into N intervals at their midpoints t_k = (k + 1/2) / N:
    c_i = dw_i * mean_k dF/dw_i (w + t_k dw),   sum_i c_i ~ dF,   |c_i| = weight i's sensitivity.
Beside it, the local estimates: first order g(w) . dw, second order + dw^T H dw / 2 (the Hessian-vector
product by a central difference of gradients), and the Fisher score mean_s g_s^2 dw^2 (per-window gradients).

Every function takes the model with its target weights as parameters (`params`: name -> the Linear weight
Parameter) and sets them in place; the caller keeps the original values (`w0`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tick = Callable[[str], None]


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
    """F: the mean next-token NLL over the windows (n, T)."""
    dev = next(model.parameters()).device
    total = sum(float(_nll_sum(model, windows[i : i + batch].to(dev))) for i in range(0, len(windows), batch))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def gradient(model: nn.Module, params: dict[str, nn.Parameter], windows: Tensor, batch: int = 1,
             per_window_sq: bool = False) -> dict[str, Tensor]:
    """dF/dw of every target weight at its current value (float32). With per_window_sq, instead the mean over
    windows of the squared per-window gradient of that window's mean NLL (the empirical Fisher diagonal)."""
    dev = next(model.parameters()).device
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()} if per_window_sq else {}
    for p in params.values():
        p.grad = None
    step = 1 if per_window_sq else batch
    for i in range(0, len(windows), step):
        ids = windows[i : i + step].to(dev)
        if per_window_sq:
            (_nll_sum(model, ids) / (ids.shape[1] - 1)).backward()
            for name, p in params.items():
                acc[name] += p.grad.float().pow(2) / len(windows)
                p.grad = None
        else:
            (_nll_sum(model, ids) / n_pred).backward()
    if not per_window_sq:
        for name, p in params.items():
            acc[name] = p.grad.float()
            p.grad = None
    return acc


def pqi(model: nn.Module, params: dict[str, nn.Parameter], w0: dict[str, Tensor], dw: dict[str, Tensor],
        windows: Tensor, intervals: int, batch: int = 1, tick: Tick | None = None) -> dict[str, Tensor]:
    """c_i = dw_i * mean over the N midpoints t_k of dF/dw_i(w0 + t_k dw). Leaves the weights at w0 + dw."""
    mean = {name: torch.zeros_like(d, dtype=torch.float32) for name, d in dw.items()}
    for k in range(intervals):
        t = (k + 0.5) / intervals
        set_weights(params, w0, dw, t)
        for name, g in gradient(model, params, windows, batch).items():
            mean[name] += g / intervals
        if tick:
            tick(f"PQI t={t:.3f} ({k + 1}/{intervals})")
    set_weights(params, w0, dw, 1.0)
    return {name: mean[name].mul_(dw[name].float()) for name in dw}  # in place: one copy of the weights less


def taylor(model: nn.Module, params: dict[str, nn.Parameter], w0: dict[str, Tensor], dw: dict[str, Tensor],
           windows: Tensor, batch: int = 1, eps: float = 1e-3) -> tuple[float, float]:
    """(first-order, second-order) Taylor estimates of dF at w0: g . dw and g . dw + dw^T H dw / 2, with
    H dw ~ (g(w0 + eps dw) - g(w0 - eps dw)) / (2 eps). Leaves the weights at w0."""
    set_weights(params, w0, dw, 0.0)
    g = gradient(model, params, windows, batch)
    first = sum(float((g[n] * dw[n].float()).sum()) for n in dw)
    set_weights(params, w0, dw, eps)
    gp = gradient(model, params, windows, batch)
    set_weights(params, w0, dw, -eps)
    gm = gradient(model, params, windows, batch)
    set_weights(params, w0, dw, 0.0)
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
