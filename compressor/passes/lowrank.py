"""Low-rank factorisation of Linear layers (compressor/lowrank.py): onto the utilized subspace, or the baselines
(truncated SVD of W, activation-aware SVD).

Per target Linear of the block, from its calibration inputs' second moment C = X^T X / N:
- `method: utilized`: the input subspace (C's leading eigenvectors) and the output subspace of the input-projected
  layer, each at energy `tau` (or, with `params`, at the rank the budget allows), then W' = U_T U_T^T W U_S U_S^T
  as two factors (exact at the utilized rank);
- `method: svd`: truncated SVD of W; `method: asvd`: truncated SVD of W C^(1/2), mapped back (both need `params`).
`params`: the fraction of each layer's d_in x d_out numbers its factors may store (rank r = params d_in d_out /
(d_in + d_out)). A layer is factorised only where that saves numbers, r (d_in + d_out) < d_in d_out; otherwise it is
kept as it is. The artifact holds `<layer>.a.weight` (r x d_in) and `<layer>.b.weight` (d_out x r) (format
"lowrank" in compression.json, extension "lowrank"): compressor.load builds the two-Linear module; transformers
does not know the layout.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn

from .. import lowrank as L
from . import PassConfig, register_pass

if TYPE_CHECKING:
    from ..runner import BlockIO, Context


class LowRankConfig(PassConfig):
    method: Literal["utilized", "svd", "asvd"] = "utilized"
    tau: float = Field(0.99, gt=0, le=1, description="utilized: energy threshold of the input and output subspaces")
    params: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's numbers its factors may "
                                 "store (the rank); utilized without it: the rank the energy threshold gives")
    damp: float = Field(1e-6, ge=0, description="asvd: C + damp mean(diag C) I, so C^(1/2) is invertible")

    def model_post_init(self, __context: Any) -> None:
        if self.method != "utilized" and self.params is None:
            raise ValueError(f"method {self.method!r} needs params (the fraction of each layer's numbers to keep)")


def factorise(w: torch.Tensor, c: torch.Tensor | None, cfg: LowRankConfig,
              eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[L.LowRankWeight | None, int]:
    """One layer's factors (None where they would not save numbers) and the rank chosen."""
    d_out, d_in = w.shape
    r = None if cfg.params is None else L.rank_for_params(cfg.params, d_in, d_out)
    if cfg.method == "utilized":
        sub = L.utilized_subspaces(w, c, cfg.tau, eig=eig, k_in=r, k_out=r)
        r = sub.rank
        if not L.saves_params(r, d_in, d_out):
            return None, r
        a, b = L.utilized_factors(w, sub)
    elif not L.saves_params(r, d_in, d_out):
        return None, r
    elif cfg.method == "svd":
        a, b = L.svd_factors(w, r)
    else:
        a, b = L.activation_svd_factors(w, c, r, cfg.damp)
    return L.LowRankWeight(a.to(w.dtype), b.to(w.dtype)), r


def _needs(cfg: LowRankConfig) -> tuple[bool, bool]:
    return cfg.method != "svd", False


@register_pass("lowrank", LowRankConfig, needs=_needs)
@torch.no_grad()
def lowrank(block: nn.Module, io: "BlockIO", cfg: LowRankConfig, ctx: "Context") -> dict[str, L.LowRankWeight]:
    """Low-rank factors of each Linear: onto its utilized subspace, or truncated / activation-aware SVD."""
    names = list(io.layers)
    moments = {} if cfg.method == "svd" else io.input_second_moments(block, names)
    tokens = sum(x.shape[0] * x.shape[1] for x in io.inputs) if moments else 1
    out, kept = {}, []
    last = None  # siblings reading one input share its eigendecomposition
    for name in names:
        w = io.layers[name].weight.data
        c = moments[name] / tokens if moments else None
        eig = None
        if cfg.method == "utilized":
            if last is None or last[0].shape != c.shape or not torch.equal(last[0], c):
                last = (c, L.top_eig(c))
            eig = last[1]
        lw, r = factorise(w, c, cfg, eig)
        if lw is None:
            kept.append(f"{name.rsplit('.', 1)[-1]} (rank {r})")
        else:
            out[name] = lw
    if kept:
        ctx.log(f"lowrank {io.prefix}: kept dense, the rank saves nothing: {', '.join(kept)}")
    return out
