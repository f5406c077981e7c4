"""EvoPress per-layer bit widths (compressor/evopress.py): plan by evolutionary search, then quantize each layer
at its chosen width with the candidate pass.

Plan (whole FP model, before the blocks):
1. the database: every target layer quantized by `candidate` (rtn or gptq, with this pass's group size,
   symmetry, clipping) at every width of `levels`, GPTQ's Hessians from the FP model's own inputs; stored under
   `database` (default: the cache) and reused when model, candidate, settings and calibration are the same;
2. the search: from the uniform assignment at `target_avg_bits`, `generations` of `offspring` level switches
   (budget kept exactly), selected in stages on fresh random windows of the calibration data, KL(dense ||
   compressed) as the fitness; progress logged, the trace written beside the database.
The assignment {layer: {bits}} goes into recipe.yaml. Block stage: the candidate pass quantizes each layer at
its assigned width (one call per width), so the artifact holds mixed widths as compressed-tensors config
groups with explicit targets.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn

from .. import evopress as E
from ..errors import BadInput
from ..quant import QWeight
from . import PASSES, QuantConfig, register_pass

if TYPE_CHECKING:
    from ..runner import BlockIO, Context, PlanInput


class EvoPressConfig(QuantConfig):
    candidate: Literal["rtn", "gptq"] = Field("rtn", description="the quantizer of every variant and of the result")
    candidate_options: dict[str, Any] = Field(default_factory=dict, description="the candidate's own settings "
                                              "(bits, group_size, symmetric, mse, scale_dtype are this pass's)")
    levels: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6], description="bit widths, equally spaced")
    target_avg_bits: float = Field(3.0, description="average bits per weight over the target layers (levels' "
                                   "nominal widths; scales and zero points are counted in the artifact)")
    generations: int = Field(50, ge=0)
    offspring: int = Field(16, ge=1)
    survivors: list[int] = Field(default_factory=lambda: [4, 1], description="kept after each selection stage")
    stage_windows: list[int] = Field(default_factory=lambda: [4, 16], description="fitness windows per stage")
    fitness_samples: int = Field(32, ge=1, description="the pool of calibration windows the stages draw from")
    fitness_seq_len: int = Field(128, ge=8, description="tokens of each fitness window (their first ones)")
    topk: int = Field(256, ge=1, description="dense next-token probabilities kept per position for the KL")
    database: str | None = Field(None, description="database directory (default: under the cache)")

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        if len(self.survivors) != len(self.stage_windows):
            raise ValueError("survivors and stage_windows need one entry per selection stage")
        own = {"bits", "group_size", "symmetric", "mse", "scale_dtype"} & set(self.candidate_options)
        if own:
            raise ValueError(f"candidate_options sets {', '.join(sorted(own))}: set them on the evopress pass itself")
        E.LevelSpace(("a",), (1,), tuple(float(b) for b in self.levels))  # levels checked when the recipe is read
        if not min(self.levels) <= self.target_avg_bits <= max(self.levels):
            raise ValueError(f"target_avg_bits {self.target_avg_bits} is outside the levels {self.levels}")
        if any(not 2 <= b <= 8 for b in self.levels):
            raise ValueError(f"levels must be bit widths 2..8, got {self.levels}")

    def candidate_config(self, bits: int):
        shared = {k: getattr(self, k) for k in ("group_size", "symmetric", "mse", "scale_dtype")}
        return PASSES[self.candidate].config.model_validate({**shared, **self.candidate_options, "bits": bits})


def _db_root(cfg: EvoPressConfig, key: str) -> Path:
    if cfg.database:
        return Path(cfg.database)
    cache = Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))
    return cache / "evopress" / key


@torch.no_grad()
def build_database(inp: "PlanInput", cfg: EvoPressConfig, db: E.Database) -> None:
    """Every target layer at every level, block by block on the FP model (one block in memory)."""
    from ..models import find_blocks, materialize, release
    from ..runner import BlockIO, Context, _hidden_size, cache_device, capture_block_inputs

    model, ctx = inp.model, inp.ctx
    blocks_prefix, blocks = find_blocks(model)
    materialize(model, "", inp.ckpt, ctx.device, exclude=blocks_prefix)
    needs_data = PASSES[cfg.candidate].needs_data
    inputs, kwargs = [], []
    if needs_data:
        cache = cache_device(ctx, inp.windows.numel() * _hidden_size(model) * 4 * 2)
        inputs, kwargs = capture_block_inputs(model, blocks[0], inp.windows, ctx.batch_size, ctx.device, cache)
    release(model, "", exclude=blocks_prefix)
    quiet = Context(device=ctx.device, seed=ctx.seed)
    for i, block in enumerate(blocks):
        prefix = f"{blocks_prefix}.{i}"
        materialize(model, prefix, inp.ckpt, ctx.device)
        layers = {n: m for n, m in ((f"{prefix}.{n}", m) for n, m in block.named_modules()) if n in db.space.layers}
        fp = {n: m.weight.data.clone() for n, m in layers.items()}
        variants: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        for bits in cfg.levels:
            io = BlockIO(prefix, inputs, kwargs, dict(layers))
            out = PASSES[cfg.candidate].fn(block, io, cfg.candidate_config(bits), quiet)
            for n, qw in out.items():
                variants[n].append(qw.dequantize(torch.float32))
            for n, m in layers.items():  # the next width starts from the FP weights again
                m.weight.data = fp[n].clone()
        for n, vs in variants.items():
            db.write_layer(n, vs)
        if needs_data:
            inputs = BlockIO(prefix, inputs, kwargs, {}).forward(block)
        ctx.log(f"evopress database: block {i + 1}/{len(blocks)}")
        release(model, prefix)
    db.finish()


def plan(inp: "PlanInput") -> dict[str, dict[str, Any]]:
    """The bit width per layer (see the module docstring)."""
    import json

    from ..models import find_blocks, materialize, release

    cfg: EvoPressConfig = inp.spec.config  # type: ignore[assignment]
    ctx = inp.ctx
    model = inp.model
    prefix, _ = find_blocks(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and inp.spec.selects(n)
              and n.startswith(prefix + ".")]
    if not layers:
        raise BadInput("evopress: the recipe's targets select no Linear layer")
    sizes = tuple(model.get_submodule(n).weight.numel() for n in layers)
    space = E.LevelSpace(tuple(layers), sizes, tuple(float(b) for b in cfg.levels))
    from ..data import sha256_file

    files = sorted({Path(f) for f in inp.ckpt.files.values()})
    key = E.database_key({"model": [sha256_file(f) for f in files],
                          "candidate": cfg.candidate, "options": cfg.candidate_config(cfg.levels[0]).model_dump(),
                          "levels": cfg.levels, "layers": layers,
                          "windows": E.database_key({"w": inp.windows.tolist()}) if PASSES[cfg.candidate].needs_data else None})
    db = E.Database(_db_root(cfg, key), key, space)
    if db.complete():
        ctx.log(f"evopress: database {db.root} (reused)")
    else:
        ctx.log(f"evopress: building the database under {db.root}")
        build_database(inp, cfg, db)
    materialize(model, "", inp.ckpt, ctx.device)
    try:
        variants = {n: db.load_layer(n) for n in layers}
        pool = inp.windows[: cfg.fitness_samples, : cfg.fitness_seq_len]
        fit = E.KLFitness(model, pool, layers, variants, cfg.stage_windows, cfg.topk, ctx.device)
        start = E.initial_state(space, cfg.target_avg_bits)
        state, trace = E.evolve(space, fit, start, cfg.generations, cfg.offspring, cfg.survivors, seed=ctx.seed,
                                on_generation=lambda g: ctx.log(f"evopress generation {g['generation']}/{cfg.generations}: "
                                                                f"KL {g['fitness']:.5f}, {g['average']:.3f} bits, {g['seconds']:.0f} s"))
    finally:
        release(model, "")
    (db.root / f"trace-{E.database_key(inp.spec.to_yaml_dict())}.json").write_text(json.dumps(
        {"target_avg_bits": cfg.target_avg_bits, "start_average": space.average(start), "average": space.average(state),
         "generations": trace.to_json(), "database_bytes": db.size_bytes()}, indent=1))
    ctx.log(f"evopress: {space.average(state):.3f} bits on average over {len(layers)} layers; database "
            f"{db.size_bytes() / 2**20:.0f} MiB")
    return {n: {"bits": int(space.values[k])} for n, k in zip(layers, state)}


def _needs(cfg: EvoPressConfig) -> tuple[bool, bool]:
    info = PASSES[cfg.candidate]
    return info.needs_data, info.needs_targets


@register_pass("evopress", EvoPressConfig, plan=plan, needs=_needs)
def evopress(block: nn.Module, io: "BlockIO", cfg: EvoPressConfig, ctx: "Context") -> dict[str, QWeight]:
    """EvoPress: each layer quantized by the candidate pass at the width the evolutionary search chose."""
    by_bits: dict[int, dict[str, nn.Linear]] = {}
    for name, lin in io.layers.items():
        bits = int(io.assignment.get(name, {}).get("bits", round(cfg.target_avg_bits)))
        by_bits.setdefault(bits, {})[name] = lin
    out: dict[str, QWeight] = {}
    layers = io.layers
    try:
        for bits, group in sorted(by_bits.items()):
            io.layers = group
            res = PASSES[cfg.candidate].fn(block, io, cfg.candidate_config(bits), ctx)
            for qw in res.values():
                qw.requested_group_size = cfg.group_size
            out.update(res)
    finally:
        io.layers = layers
    return out
