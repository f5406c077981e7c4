"""Low-rank factorisation of Linear layers (compressor/algorithms/lowrank.py): onto the utilized subspace, or the baselines
(truncated SVD of W, activation-aware SVD).

Per target Linear of the block, from its calibration inputs' second moment C = X^T X / N:
- `method: utilized`: the input subspace (C's leading eigenvectors) and the output subspace of the input-projected
  layer, each at energy `tau` (or, with `params`, at the rank the budget allows), then W' = U_T U_T^T W U_S U_S^T
  as two factors (exact at the utilized rank);
- `method: svd`: truncated SVD of W; `method: asvd`: truncated SVD of W C^(1/2), mapped back (both need `params`).
`params`: the fraction of each layer's d_in x d_out numbers its factors may store (rank r = params d_in d_out /
(d_in + d_out)); with `allocation: dp`, the fraction over all target layers, each layer's own fraction (one of
`levels`, 1.0 = dense) chosen by the pruning DP's machinery: output-distortion curves of each layer factorised
alone, then the least summed distortion under the budget (the plan; the fractions go into recipe.yaml). A layer is factorised only where that saves numbers, r (d_in + d_out) < d_in d_out; otherwise it is
kept as it is. The artifact holds `<layer>.a.weight` (r x d_in) and `<layer>.b.weight` (d_out x r) (format
"lowrank" in compression.json, extension "lowrank"): compressor.load builds the two-Linear module; transformers
does not know the layout.

On several ranks (compressor/dist.py) the input moments are summed over every rank's windows, the dp curves are
measured on the windows one process takes, split between the ranks (measure.BlockStreams), and each block's
factorisations are split between the ranks by cost (the layers sharing one input moment, and so one
eigendecomposition, together), each broadcast from the rank that solved it: every rank ends with one process's
factors (up to float order).
"""
from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from .. import dist, measure
from ..algorithms import lowrank as L
from ..algorithms.allocate import allocate
from ..blocks import BlockIO, Context, stream_fp_layers
from ..errors import BadInput
from ..lowrank import LowRankWeight
from ..models import materialize, release
from . import PassConfig, PlanInput, register_pass


class LowRankConfig(PassConfig):
    method: Literal["utilized", "svd", "asvd"] = "utilized"
    tau: float = Field(0.99, gt=0, le=1, description="utilized: energy threshold of the input and output subspaces")
    params: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's numbers its factors may "
                                 "store (the rank); utilized without it: the rank the energy threshold gives")
    damp: float = Field(1e-6, ge=0, description="asvd: C + damp mean(diag C) I, so C^(1/2) is invertible")
    allocation: Literal["uniform", "dp"] = Field("uniform", description="with params: every layer at params "
                                                 "(uniform), or per-layer fractions with params overall (dp)")
    levels: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                                description="dp: the fractions of its numbers a layer may keep (1.0: kept dense)")
    curve_samples: int = Field(1, ge=1, description="dp: calibration windows of the output-distortion curves")
    curve_seq_len: int = Field(128, ge=8, description="dp: tokens of each (their first ones)")
    units: int = Field(10000, ge=10, description="dp: budget steps")

    def model_post_init(self, __context: Any) -> None:
        if self.method != "utilized" and self.params is None:
            raise ValueError(f"method {self.method!r} needs params (the fraction of each layer's numbers to keep)")
        if self.allocation == "dp" and self.params is None:
            raise ValueError("allocation dp needs params (the fraction of all the target layers' numbers to keep)")
        if any(not 0 < f <= 1 for f in self.levels):
            raise ValueError(f"levels must be fractions in (0, 1], got {self.levels}")


def factorise(w: torch.Tensor, c: torch.Tensor | None, cfg: LowRankConfig,
              eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[LowRankWeight | None, int]:
    """One layer's factors under `cfg` (None where they would not save numbers) and the rank chosen."""
    ab, r = L.factorise(w, c, cfg.method, cfg.tau, cfg.params, cfg.damp, eig)
    return (None if ab is None else LowRankWeight(*ab)), r


def plan(inp: PlanInput) -> dict[str, dict[str, Any]]:
    """allocation dp: each target Linear factorised alone at each level, the model's output distortion on
    `curve_samples` windows (the pruning DP's curves, compressor.measure), then the least summed distortion whose
    stored numbers fit `params` of the total (algorithms.allocate). The result: {layer: {params: fraction}}."""
    cfg: LowRankConfig = inp.spec.config  # type: ignore[assignment]
    if cfg.allocation != "dp":
        return {}
    ctx = inp.ctx
    t0 = time.perf_counter()
    tokens = dist.sum_ints([inp.windows.numel()])[0]  # over every rank, as the moments are summed
    moments, shapes = {}, {}
    for name, lin, xtx in stream_fp_layers(inp.model, inp.ckpt, inp.windows, ctx, inp.spec.selects,
                                           full=cfg.method != "svd"):
        moments[name] = (xtx / tokens).cpu() if cfg.method != "svd" else None
        shapes[name] = (lin.out_features, lin.in_features)
    if not shapes:
        raise BadInput("lowrank: the recipe's targets select no Linear layer")
    layers = list(shapes)
    materialize(inp.model, "", inp.ckpt, ctx.device)
    try:
        # the whole set's first curve_samples windows (on several ranks: this rank's part of them)
        streams = measure.BlockStreams(inp.model, dist.head(inp.windows, cfg.curve_samples)[:, : cfg.curve_seq_len],
                                       ctx.batch_size, ctx.device)
        cache: dict[str, Any] = {}

        def variant(name: str, k: int):
            w = cache["w"] if cache.get("name") == name else inp.model.get_submodule(name).weight.data.clone()
            if cache.get("name") != name:
                cache.update(name=name, w=w, eig=None if moments[name] is None or cfg.method != "utilized"
                             else L.top_eig(moments[name].to(w.device)))
            f = cfg.levels[k]
            if f >= 1:
                return w
            lw, _ = factorise(w, None if moments[name] is None else moments[name].to(w.device),
                              cfg.model_copy(update={"params": f}), cache["eig"])
            return w if lw is None else lw.dequantize(w.dtype)

        curves = measure.distortion_curves(streams, inp.model, layers, cfg.levels, variant=variant,
                                     on_layer=lambda i, n, name: ctx.log(f"lowrank curves {i + 1}/{n} {name}"))
    finally:
        release(inp.model, "")
    costs = [[L.level_cost(f, shapes[n][1], shapes[n][0]) for f in cfg.levels] for n in layers]
    total = sum(o * i for o, i in shapes.values())
    pick = allocate(costs, [curves[n] for n in layers], cfg.params * total, cfg.units)
    kept = sum(c[k] for c, k in zip(costs, pick)) / total
    ctx.log(f"lowrank: dp allocation, {kept:.4f} of {total} numbers kept over {len(layers)} layers "
            f"in {time.perf_counter() - t0:.1f} s")
    return {n: {"params": cfg.levels[k]} for n, k in zip(layers, pick)}


def _reads(cfg: LowRankConfig) -> str:
    return "weights" if cfg.method == "svd" else "inputs"


@register_pass("lowrank", LowRankConfig, reads=_reads, plan=plan, factors=True, distributed=True)
@torch.no_grad()
def lowrank(block: nn.Module, io: BlockIO, cfg: LowRankConfig, ctx: Context) -> dict[str, LowRankWeight]:
    """Low-rank factors of each Linear: onto its utilized subspace, or truncated / activation-aware SVD."""
    names = list(io.layers)
    moments = {} if cfg.method == "svd" else io.input_second_moments(block, names)  # + io.tokens_seen, all ranks'
    groups: list[list[tuple[str, torch.Tensor | None, LowRankConfig]]] = []  # (layer, its C, its config)
    no_data: set[str] = set()
    for name in names:
        f = io.assignment.get(name, {}).get("params", cfg.params)
        if f is not None and f >= 1:
            continue  # the allocation keeps it dense
        if moments and io.tokens_seen[name] == 0:  # an MoE expert no calibration token reached:
            no_data.add(name)  # nothing measures its subspace
            continue
        c = moments[name] / io.tokens_seen[name] if moments else None  # per token it saw
        job = (name, c, cfg if f == cfg.params else cfg.model_copy(update={"params": f}))
        prev = groups[-1][-1][1] if groups else None
        # siblings reading one input (the same C, in a row) share its eigendecomposition, so they go to one rank
        if cfg.method == "utilized" and prev is not None and prev.shape == c.shape and torch.equal(prev, c):
            groups[-1].append(job)
        else:
            groups.append([job])

    def cost(group: list[tuple[str, torch.Tensor | None, LowRankConfig]]) -> float:
        """A group's work: the eigendecomposition of its C (utilized: once; asvd: once per layer) and each SVD."""
        d_in = io.layers[group[0][0]].in_features
        eig = 0 if cfg.method == "svd" else d_in ** 3 * (1 if cfg.method == "utilized" else len(group))
        return eig + sum(io.layers[n].out_features * d_in * min(d_in, io.layers[n].out_features) for n, _, _ in group)

    solved: dict[str, tuple[LowRankWeight | None, int]] = {}
    owner = dist.owners([cost(g) for g in groups])  # on several ranks each group is solved by one of them
    for group, rank in zip(groups, owner):
        if rank != dist.world().rank:
            continue
        eig = L.top_eig(group[0][1]) if cfg.method == "utilized" else None
        for name, c, layer_cfg in group:
            solved[name] = factorise(io.layers[name].weight.data, c, layer_cfg, eig)
    device = next(iter(io.layers.values())).weight.device
    for rank in sorted(set(owner)):  # each rank's factors (and the ranks that saved nothing) to every rank
        theirs = [n for g, r in zip(groups, owner) if r == rank for n, _, _ in g]
        solved.update(dist.broadcast({n: solved.get(n) for n in theirs}, rank, device))
    out, kept = {}, []
    for name in names:
        if name in no_data:
            kept.append(f"{name.rsplit('.', 1)[-1]} (no calibration tokens)")
        elif name in solved:
            lw, r = solved[name]
            if lw is None:
                kept.append(f"{name.rsplit('.', 1)[-1]} (rank {r})")
            else:
                out[name] = lw
    if kept:
        ctx.log(f"lowrank {io.prefix}: kept dense (the rank saves nothing, or no data): {', '.join(kept)}")
    return out
