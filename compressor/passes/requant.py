"""ReQuant (Hu et al. 2025, "Identifying Sensitive Weights via Post-quantization Integral"): dense-and-sparse
quantization on top of a base quantizer (rtn, gptq, flexround, adaround). Final weight = dense integer grid +
a sparse float16 residual (stored as CSR beside the compressed-tensors tensors, DESIGN.md section 4).

1. Self-adaptive outlier selection (plan, before any block): a global budget of outliers, `outlier_fraction`
   of all target weights, split across layers by the DP (algorithms/allocate.py) to minimise the base
   quantizer's objective, measured per layer and candidate fraction on the FP model (algorithms/requant.py).
   The outliers of a layer are its largest-magnitude weights.
2. Dense-and-sparse quantization (block stage): the base pass quantizes each layer with its outliers held
   exactly (its grid is fitted without them; GPTQ spreads no error from them, the learned passes learn around
   them); the residual stores them.
3. Step-wise significant-weight detach (finish, on the whole model): in `steps` steps, score every weight by
   PQI against the current quantized model (c_i = dw_i * mean_k dF/dw_i(w + t_k dw), algorithms/pqi.py), and
   restore the `significant_fraction / steps` highest-scoring weights of the whole model to their original values
   in the residual. A step that does not lower the calibration loss F (on the PQI windows) is undone and the
   detach stops: on a FlexRound base the restores can break the block's learned compensation (measured in
   bench/results/requant*.md). `selection` swaps the score for a baseline: magnitude |w|, Fisher
   mean_s g_s^2 dw^2, random. The rank is by |c_i|, the sensitivity, not by the signed c_i: the c_i of single
   weights are large with both signs and cancel, so restoring only the largest positive ones leaves their
   negative partners unbalanced (on the demo, RTN W3, 26000 restores by signed c raised F by 4.28, by |c|
   lowered it by 0.28).

On several ranks (dist.py) the result is one process's, up to the order of float sums: the plan splits the layers'
objectives between the ranks and broadcasts them, so every rank allocates the same outliers; the block stage is the
base pass's, which runs there; the detach takes the first `pqi_samples` windows of the whole calibration set, each
rank its part of them (dist.head), and its loss and gradients are reduced over the ranks (compressor/measure.py),
so every rank scores alike, restores the same weights and keeps or undoes the same steps.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, ValidationError
from torch import Tensor, nn

from .. import dist, measure
from ..algorithms import requant as R
from ..algorithms.allocate import allocate
from ..algorithms.pqi import top_global
from ..blocks import BlockIO, Context
from ..errors import BadInput
from ..models import find_blocks
from ..quant import QWeight, resolve_group_size
from . import PASSES, FinishInput, PlanInput, QuantConfig, register_pass

BASES = ("rtn", "gptq", "flexround", "adaround")


class RequantConfig(QuantConfig):
    base: Literal["rtn", "gptq", "flexround", "adaround"] = Field("rtn", description="the dense quantizer")
    base_options: dict[str, Any] = Field(default_factory=dict, description="the base pass's own settings "
                                         "(bits, group_size, symmetric, mse and scale_dtype are this pass's)")
    outlier_fraction: float = Field(0.0045, ge=0, lt=0.5, description="r_o: outliers, of all target weights")
    significant_fraction: float = Field(0.0005, ge=0, lt=0.5, description="r_s: restored significant weights")
    steps: int = Field(2, ge=1, description="detach steps (r_s / steps weights restored per step)")
    selection: Literal["pqi", "magnitude", "fisher", "random"] = "pqi"
    intervals: int = Field(8, ge=1, description="PQI midpoints N")
    pqi_samples: int = Field(8, ge=1, description="calibration windows for the PQI gradients")
    outlier_levels: list[float] = Field(default_factory=lambda: [0.0, 0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04],
                                        description="per-layer outlier fractions the plan chooses from")

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        own = {"bits", "group_size", "symmetric", "mse", "scale_dtype"} & set(self.base_options)
        if own:
            raise ValueError(f"base_options sets {', '.join(sorted(own))}: set them on the requant pass itself")
        try:
            self.base_config()  # the base options are checked when the recipe is read
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"base_options for base {self.base!r}: {bad}") from None
        if not self.outlier_levels or min(self.outlier_levels) != 0.0:
            raise ValueError("outlier_levels must include 0.0 (a layer may get no outliers)")

    def base_config(self):
        shared = {k: getattr(self, k) for k in ("bits", "group_size", "symmetric", "mse", "scale_dtype")}
        return PASSES[self.base].config.model_validate({**shared, **self.base_options})


def plan(inp: PlanInput) -> dict[str, dict[str, Any]]:
    """Outlier counts per layer: the least summed objective with at most outlier_fraction of all weights."""
    cfg: RequantConfig = inp.spec.config  # type: ignore[assignment]
    options = _outlier_options(inp, cfg)
    names = list(options)
    if not names:
        raise BadInput("requant: the recipe's targets select no Linear layer")
    costs = [[float(c) for c in options[n][0]] for n in names]
    errors = [options[n][1] for n in names]
    total = sum(options[n][2] for n in names)
    budget = cfg.outlier_fraction * total
    picks = allocate(costs, errors, budget)
    chosen = {n: int(costs[i][j]) for i, (n, j) in enumerate(zip(names, picks))}
    got = sum(chosen.values())
    gain = sum(e[0] for e in errors) / max(sum(e[j] for e, j in zip(errors, picks)), 1e-30)
    inp.ctx.log(f"requant: {got} outliers ({got / total:.3%} of {total} weights) over {sum(1 for c in chosen.values() if c)} "
                f"of {len(names)} layers; estimated objective x{1 / gain:.3f} of no outliers")
    return {n: {"outliers": c} for n, c in chosen.items()}


def _outlier_options(inp: PlanInput, cfg: RequantConfig) -> dict[str, tuple[list[int], list[float], int]]:
    """Per target layer, in the model's order: its outlier counts, the objective at each (R.outlier_options) and
    its weight count. On several ranks the layers of each block are split between them by weight size
    (dist.owners); each rank computes its own once the block's last layer is streamed (so the ranks compute at the
    same time: the stream's per-layer all-reduce would otherwise wait for each layer's owner in turn) and, after
    the last block, every rank's results are broadcast to all, so each runs the same allocation."""
    world = dist.world()
    prefix, _ = find_blocks(inp.model)
    names: list[str] = []
    owner: dict[str, int] = {}
    mine: list[tuple[str, Tensor, Tensor]] = []  # this rank's layers of the block in memory, with their sum x^2
    out: dict[str, tuple[list[int], list[float], int]] = {}
    for name, lin, hdiag in inp.stream_fp_layers():
        if name not in owner:  # the block's first target layer: split all of them
            block = f"{prefix}.{measure.block_index(prefix, name)}"
            layers = [f"{block}.{n}" for n, m in inp.model.get_submodule(block).named_modules()
                      if isinstance(m, nn.Linear) and inp.spec.selects(f"{block}.{n}")]
            owner.update(zip(layers, dist.owners([inp.model.get_submodule(n).weight.numel() for n in layers])))
            last = layers[-1]
        names.append(name)
        if owner[name] == world.rank:
            mine.append((name, lin.weight.data, hdiag))
        if name == last:
            for n, w, h in mine:
                g = resolve_group_size(w.shape[1], cfg.group_size, n)
                counts, errs = R.outlier_options(w.float(), h, cfg.outlier_levels, cfg.bits, g, cfg.symmetric,
                                                 cfg.torch_scale_dtype, cfg.mse)
                out[n] = (counts, errs, w.numel())
            mine = []
    everyone: dict[str, tuple[list[int], list[float], int]] = {}
    for r in range(world.size):
        everyone.update(dist.broadcast(out if r == world.rank else None, r))
    return {n: everyone[n] for n in names}


def _reads(cfg: RequantConfig) -> str:
    return PASSES[cfg.base].reads(cfg.base_config())


@torch.no_grad()
def _masks(io: BlockIO) -> dict[str, Tensor]:
    return {name: R.outlier_mask(lin.weight.data, int(io.assignment.get(name, {}).get("outliers", 0)))
            for name, lin in io.layers.items()}


def finish(inp: FinishInput) -> None:
    """Step-wise significant-weight detach over the whole model (see the module docstring)."""
    cfg: RequantConfig = inp.spec.config  # type: ignore[assignment]
    if cfg.significant_fraction == 0 or not inp.results:
        return
    model, ctx = inp.model, inp.ctx
    # in the model's order, not the results' (a base pass may list them differently on each rank: GPTQ puts a
    # rank's own solves first), so that every rank breaks the ranking's ties and draws the random scores alike
    params = {n: m.weight for n, m in model.named_modules() if n in inp.results}
    w0 = {n: p.detach().clone().float() for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    per_step = int(round(cfg.significant_fraction * total / cfg.steps))
    windows = dist.head(inp.windows, cfg.pqi_samples)  # this rank's part of the first pqi_samples
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(ctx.seed)  # the calibration seed: every rank draws the same "random" scores
    fisher = None

    def delta() -> dict[str, Tensor]:
        """dw: the current quantized weights (dense + residual) minus the FP ones."""
        return {n: inp.results[n].dequantize().to(w0[n].device) - w0[n] for n in params}

    def loss_at(dw: dict[str, Tensor]) -> float:
        """The calibration loss (the F that PQI integrates, on the same windows) at w0 + dw."""
        measure.set_weights(params, w0, dw, 1.0)
        return measure.loss(model, windows)

    try:
        dw = delta()
        f_prev = loss_at(dw)
        for step in range(cfg.steps):
            held = {n: R.held_mask(inp.results[n]) for n in params}
            if cfg.selection == "pqi":  # |c_i|: ranking by signed c_i overshoots (see the module docstring)
                scores = {n: c.abs_() for n, c in measure.pqi(
                    model, params, w0, dw, windows, cfg.intervals,
                    tick=lambda msg: ctx.log(f"requant detach step {step + 1}/{cfg.steps}: {msg}")).items()}
            elif cfg.selection == "fisher":
                if fisher is None:
                    measure.set_weights(params, w0, dw, 0.0)
                    fisher = measure.gradient(model, params, windows, per_window_sq=True)
                scores = {n: fisher[n] * dw[n].float().pow(2) for n in params}
            elif cfg.selection == "magnitude":
                scores = {n: w0[n].abs() for n in params}
            else:
                scores = {n: torch.rand(w0[n].shape, generator=gen) for n in params}
            chosen = top_global({n: s.cpu() for n, s in scores.items()}, per_step, held)
            before = {n: inp.results[n].sparse for n, mask in chosen.items() if mask.any()}
            for n in before:
                inp.results[n] = R.restore(inp.results[n], w0[n].cpu(), chosen[n])
            restored = sum(int(m.sum()) for m in chosen.values())
            dw_new = delta()
            f_new = loss_at(dw_new)
            if f_new >= f_prev:  # the step would make the model worse on the data it was chosen on: undo, stop
                for n, sp in before.items():
                    inp.results[n].sparse = sp
                ctx.log(f"requant detach step {step + 1}/{cfg.steps}: restoring {restored} weights chosen by "
                        f"{cfg.selection} raises the calibration loss {f_prev:.5f} -> {f_new:.5f}; undone, detach stops")
                break
            ctx.log(f"requant detach step {step + 1}/{cfg.steps}: restored {restored} weights chosen by "
                    f"{cfg.selection}; calibration loss {f_prev:.5f} -> {f_new:.5f}")
            f_prev, dw = f_new, dw_new
    finally:
        measure.set_weights(params, w0, {n: torch.zeros_like(w) for n, w in w0.items()}, 0.0)  # the FP model again
        for p, flag in frozen:
            p.requires_grad_(flag)


@register_pass("requant", RequantConfig, plan=plan, finish=finish, reads=_reads, distributed=True)
def requant(block: nn.Module, io: BlockIO, cfg: RequantConfig, ctx: Context) -> dict[str, QWeight]:
    """ReQuant: dense-and-sparse on a base quantizer (outliers planned per layer, significant weights by PQI)."""
    out = PASSES[cfg.base].fn(block, io, cfg.base_config(), ctx, exact=_masks(io))
    for qw in out.values():
        qw.requested_group_size = cfg.group_size
    return out
