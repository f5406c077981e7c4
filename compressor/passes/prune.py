"""Layer-adaptive magnitude pruning, allocated by dynamic programming (Xu et al., ICCV 2023) or by a baseline.

Plan (before any block, on the FP model): the per-layer sparsity for the overall target, by `allocation`:
- `dp`: distortion curves (each Linear pruned alone at levels 0..max_sparsity, the model's output distortion
  on `curve_samples` calibration windows, compressor.measure), then the least summed distortion whose kept
  weights fit the budget (algorithms/prune.py, algorithms/allocate.py);
- `uniform`: every layer at the target; `global`: one magnitude threshold over all layers; `owl`: blocks with
  more activation outliers pruned less (Yin et al. 2023), within +-owl_lambda of the target.
The assignment ({layer: {sparsity}}) goes into the artifact's recipe.yaml. Block stage: each layer pruned by
magnitude to its sparsity (unstructured or N:M). A quantizing pass after it in the same recipe (rtn, gptq)
takes the pruned layers with their masks and keeps the pruned weights at exactly zero.

On several ranks (compressor/dist.py) the dp curves are measured on the same `curve_samples` windows one process
takes, split between the ranks, each distortion summed over them (measure.BlockStreams), and OWL's outlier scores
on the reduced input moments: every rank computes one process's allocation (up to float order). The block stage
reads only the weights, so each rank prunes every layer itself, to the same masks.
"""
from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from .. import dist, measure
from ..algorithms import prune as P
from ..blocks import BlockIO, Context
from ..errors import BadInput
from ..models import find_blocks, materialize, release
from ..sparse import SparseWeight
from . import PassConfig, PlanInput, register_pass


class PruneConfig(PassConfig):
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of the target weights pruned, overall")
    structure: str = Field("unstructured", description="'unstructured' or N:M (N kept of every M inputs)")
    allocation: Literal["dp", "uniform", "global", "owl"] = "dp"
    levels: int = Field(19, ge=1, description="steps of the distortion curves from 0 to max_sparsity (unstructured)")
    max_sparsity: float = Field(0.95, gt=0, le=1, description="the highest level a layer may get")
    distortion: Literal["output", "block"] = Field("output", description="where the curves measure: the model's "
                                                   "output, or (fast, heuristic) the output of the layer's block")
    metric: Literal["mse", "kl"] = Field("mse", description="output distortion: mean squared logit error or KL")
    curve_samples: int = Field(4, ge=1, description="calibration windows for the curves")
    curve_seq_len: int | None = Field(128, ge=8, description="tokens of each of those windows (their first ones); "
                                      "None: the whole window")
    units: int = Field(10000, ge=10, description="DP budget steps (1/units of the kept-weight budget each)")
    owl_m: float = Field(5.0, gt=0, description="OWL: an outlier's score exceeds owl_m x the layer's mean")
    owl_lambda: float = Field(0.08, ge=0, lt=1, description="OWL: sparsities within target +- owl_lambda")

    def model_post_init(self, __context: Any) -> None:
        nm = P.parse_structure(self.structure)
        if nm is not None and abs(self.sparsity * nm[1] - round(self.sparsity * nm[1])) > 1e-9:
            raise ValueError(f"sparsity {self.sparsity} is not a multiple of 1/{nm[1]} ({self.structure})")
        if nm is not None and self.allocation == "uniform" and abs(self.sparsity - 1 + nm[0] / nm[1]) > 1e-9:
            raise ValueError(f"uniform {self.structure} prunes {1 - nm[0] / nm[1]:g}; set sparsity to that")


def plan(inp: PlanInput) -> dict[str, dict[str, Any]]:
    """The per-layer sparsity (see the module docstring)."""
    cfg: PruneConfig = inp.spec.config  # type: ignore[assignment]
    ctx = inp.ctx
    nm = P.parse_structure(cfg.structure)
    levels = P.sparsity_levels(cfg.levels, cfg.max_sparsity, cfg.structure)
    if nm is not None and cfg.allocation == "uniform":
        levels = [1 - nm[0] / nm[1]]
    t0 = time.perf_counter()
    if cfg.allocation == "owl":
        ratios, sizes = {}, {}
        for name, lin, x_sq in inp.stream_fp_layers():
            ratios[name] = P.outlier_ratio(lin.weight.data, x_sq, cfg.owl_m)
            sizes[name] = lin.weight.numel()
        if not sizes:
            raise BadInput("prune: the recipe's targets select no Linear layer")
        prefix_of = _block_of(inp.model)
        by_block: dict[str, list[str]] = {}  # OWL allocates per block: its layers share the block's ratio
        for name in ratios:
            by_block.setdefault(prefix_of(name), []).append(name)
        block_ratio = {b: sum(ratios[n] * sizes[n] for n in ns) / sum(sizes[n] for n in ns) for b, ns in by_block.items()}
        alloc = P.allocate_sparsity("owl", cfg.sparsity, sizes, outlier_ratios={n: block_ratio[prefix_of(n)] for n in ratios},
                                    levels=levels, structure=cfg.structure, owl_lambda=cfg.owl_lambda)
    else:
        materialize(inp.model, "", inp.ckpt, ctx.device)
        try:
            blocks_prefix = find_blocks(inp.model)[0] + "."  # found once, not per module
            layers = {n: m for n, m in inp.model.named_modules() if isinstance(m, nn.Linear) and inp.spec.selects(n)
                      and n.startswith(blocks_prefix)}
            if not layers:
                raise BadInput("prune: the recipe's targets select no Linear layer")
            sizes = {n: m.weight.numel() for n, m in layers.items()}
            curves = None
            if cfg.allocation == "dp":
                # the whole set's first curve_samples windows (on several ranks: this rank's part of them)
                curve_windows = dist.head(inp.windows, cfg.curve_samples)[:, : cfg.curve_seq_len]
                streams = measure.BlockStreams(inp.model, curve_windows, ctx.batch_size, ctx.device)
                curves = measure.distortion_curves(
                    streams, inp.model, layers, levels, cfg.structure, cfg.metric, local=cfg.distortion == "block",
                    on_layer=lambda i, n, name: ctx.log(f"prune curves {i + 1}/{n} {name}"))
                del streams
            alloc = P.allocate_sparsity(cfg.allocation, cfg.sparsity, sizes, curves=curves, levels=levels,
                                        weights={n: m.weight.data for n, m in layers.items()}, structure=cfg.structure,
                                        units=cfg.units)
        finally:
            release(inp.model, "")
    got = P.achieved_sparsity(alloc, sizes, cfg.structure)
    ctx.log(f"prune: {cfg.allocation} allocation, {got:.4f} of {sum(sizes.values())} weights pruned over "
            f"{len(alloc)} layers (per layer {min(alloc.values()):.3f}..{max(alloc.values()):.3f}) in "
            f"{time.perf_counter() - t0:.1f} s")
    return {n: {"sparsity": round(float(s), 6)} for n, s in alloc.items()}


def _block_of(model: nn.Module):
    prefix, _ = find_blocks(model)
    return lambda name: f"{prefix}.{measure.block_index(prefix, name)}"


@register_pass("prune", PruneConfig, reads="weights", plan=plan, masks="makes", distributed=True)
@torch.no_grad()
def prune(block: nn.Module, io: BlockIO, cfg: PruneConfig, ctx: Context) -> dict[str, SparseWeight]:
    """Magnitude pruning to each layer's planned sparsity (dp, uniform, global or OWL allocation)."""
    out = {}
    for name, lin in io.layers.items():
        s = float(io.assignment.get(name, {}).get("sparsity", cfg.sparsity))
        out[name] = P.pruned(lin.weight.data, s, cfg.structure)
    return out
