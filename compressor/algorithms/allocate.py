"""Budget allocation by dynamic programming: one option per layer, the least summed error under a total cost.

This is the multiple-choice knapsack that layer-adaptive compression reduces to when per-layer errors add up
(Xu et al. 2023 for pruning; ReQuant's outlier split): item i (a layer) takes one option j with cost c_ij
(weights kept, outliers stored, ...) and error e_ij; minimise sum_i e_ij subject to sum_i c_ij <= budget.
Costs are discretised into `units` steps of budget / units, rounded up, so the chosen allocation never
exceeds the budget; the table is (layers x units), the time linear in the number of layers.
"""
from __future__ import annotations

import math

import torch

from ..errors import BadInput


def allocate(costs: list[list[float]], errors: list[list[float]], budget: float, units: int = 2000) -> list[int]:
    """The chosen option index per item. Raises BadInput when even the cheapest options exceed the budget."""
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors must have the same non-empty option lists per item")
    if budget < 0:
        raise BadInput(f"budget must be >= 0, got {budget}")
    unit = budget / units if budget > 0 else 1.0
    cap = units if budget > 0 else 0
    inf = float("inf")
    # best[b]: least error of the items so far with discretised cost exactly b; choice[i][b]: option taken
    best = torch.full((cap + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for c_i, e_i in zip(costs, errors):
        steps = [math.ceil(c / unit - 1e-9) if c > 0 else 0 for c in c_i]
        new = torch.full_like(best, inf)
        pick = torch.full((cap + 1,), -1, dtype=torch.int64)
        for j, (s, e) in enumerate(zip(steps, e_i)):
            if s > cap:
                continue
            cand = torch.full_like(best, inf)
            cand[s:] = best[: cap + 1 - s] + e
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.tensor(j), pick)
        best = new
        choices.append(pick)
    if not torch.isfinite(best).any():
        raise BadInput(f"no allocation fits the budget {budget:g}: the cheapest options of the layers cost more")
    b = int(torch.argmin(best))
    out = []
    for i in range(len(costs) - 1, -1, -1):
        j = int(choices[i][b])
        out.append(j)
        b -= math.ceil(costs[i][j] / unit - 1e-9) if costs[i][j] > 0 else 0
    return out[::-1]
