"""EvoPress (algorithms/evopress.py): per-layer compression levels found by evolutionary search under a global budget,
in one of three level spaces (`space`):

- `bits`: every target Linear at a bit width of `levels` (default 2..6), `target` bits per weight on average
  (nominal widths); each layer is then quantized at its width by the `candidate` pass (rtn, gptq, flexround or
  adaround; the learned ones reconstruct the FP block's output, in the database and in the result), so the
  artifact holds mixed widths as compressed-tensors config groups with explicit targets;
- `sparsity`: every target Linear pruned by magnitude to a level of `levels` (default 0, 0.1, .., 0.9: equal
  steps, so a level switch inside a size group moves the same number of weights), `target` of all target
  weights pruned; the artifact is the pruning pass's (sparse-bitmask, or codes + bitmask after a quantizer);
- `depth`: residual sub-blocks (each block's self_attn and mlp) dropped, `target` of them (a fraction of the
  2 x blocks sub-blocks, rounded to whole ones); a dropped sub-block's Linears are written pruned to 100%, so
  its output is exactly 0 in every loader. The search starts from the ShortGPT-style choice (the sub-blocks
  whose output turns the residual stream least, by cosine), so `generations: 0` is that baseline.

Plan (before the blocks, on the FP model):
1. the database: every target layer at every level (bits: quantized by the candidate, GPTQ's Hessians from the
   FP model's own inputs; sparsity: magnitude-pruned), stored under `database` (default: the cache) and reused
   when model, space, candidate, settings, levels and calibration are the same; depth needs none (a dropped
   sub-block's output projection is set to 0);
2. the search: from the uniform assignment at `target` (depth: the cosine choice), `generations` of `offspring`
   level switches (budget kept exactly), selected in stages on fresh random windows of the calibration data,
   KL(dense || compressed) as the fitness; progress logged, the trace written beside the database.
The assignment ({layer: {bits}}, {layer: {sparsity}} or {layer: {dropped}}) goes into recipe.yaml.

On several ranks (dist.py): every rank builds the database with the candidate (its Hessians and solves reduced and
split as in one run), rank 0 writes it and the others read it back (so on several machines `database:` must be a
directory they share); the fitness pool is split between the ranks, each scores the stage windows it holds and the
KL sums are reduced, so every rank takes one process's selection decisions; rank 0 alone writes the checkpoint and
the trace.

Here: the config, the database on disk (one safetensors file per layer, built on blocks.stream_blocks), the
search's checkpoint file, the plan and the block function. The evolution is algorithms/evopress.py, the KL fitness
and the sub-block influence compressor/measure.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import dist, measure
from ..algorithms import evopress as E
from ..algorithms import prune as P
from ..blocks import BlockIO, Context, stream_blocks
from ..errors import BadInput
from ..files import cache_dir, sha256_file, write_atomic
from ..models import find_blocks, materialize, release
from ..quant import QWeight
from . import PASSES, PlanInput, QuantConfig, register_pass

DEFAULT_LEVELS = {"bits": [2, 3, 4, 5, 6], "sparsity": [round(0.1 * k, 10) for k in range(10)]}
# Llama-style residual sub-blocks: (child of the block, its output projection); dropping = that projection at 0
SUBBLOCKS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


class EvoPressConfig(QuantConfig):
    space: Literal["bits", "sparsity", "depth"] = Field("bits", description="what a level is: a bit width, a "
                                                        "sparsity, or a residual sub-block kept / dropped")
    target: float = Field(3.0, description="bits: average bits per weight (nominal widths; scales and zero points "
                          "are counted in the artifact); sparsity: fraction of target weights pruned; depth: "
                          "fraction of sub-blocks dropped")
    levels: list[float] | None = Field(None, description="bits: widths (default 2..6); sparsity: sparsities "
                                       "(default 0, 0.1, .., 0.9); equally spaced; depth: not used")
    candidate: Literal["rtn", "gptq", "flexround", "adaround"] = Field(
        "rtn", description="bits: the quantizer of every variant and of the result")
    candidate_options: dict[str, Any] = Field(default_factory=dict, description="the candidate's own settings "
                                              "(bits, group_size, symmetric, mse, scale_dtype are this pass's)")
    generations: int = Field(50, ge=0)
    offspring: int = Field(16, ge=1)
    survivors: list[int] = Field(default_factory=lambda: [4, 1], description="kept after each selection stage")
    stage_windows: list[int] = Field(default_factory=lambda: [4, 16], description="fitness windows per stage")
    fitness_samples: int = Field(32, ge=1, description="the pool of calibration windows the stages draw from")
    fitness_seq_len: int = Field(128, ge=8, description="tokens of each fitness window (their first ones)")
    topk: int = Field(256, ge=1, description="dense next-token probabilities kept per position for the KL")
    fitness: Literal["kl", "perplexity"] = Field("kl", description="kl: KL(dense || compressed) of the next-token "
                                                 "distributions; perplexity: the compressed model's log-perplexity "
                                                 "on the windows")
    fitness_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the fitness forwards' compute type (autocast; both the dense and the compressed "
        "side). bfloat16 is what GPU searches use and 2.7x faster on a CPU with AVX-512 BF16 (emulated, so slower, "
        "on one without); float32 is exact")
    database: str | None = Field(None, description="database directory (default: under the cache)")

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        if len(self.survivors) != len(self.stage_windows):
            raise ValueError("survivors and stage_windows need one entry per selection stage")
        own = {"bits", "group_size", "symmetric", "mse", "scale_dtype"} & set(self.candidate_options)
        if own:
            raise ValueError(f"candidate_options sets {', '.join(sorted(own))}: set them on the evopress pass itself")
        if self.space != "bits" and self.candidate_options:
            raise ValueError(f"candidate_options apply to space 'bits' only (space is {self.space!r})")
        if self.space == "depth":
            if self.levels is not None:
                raise ValueError("space 'depth' has no levels (a sub-block is kept or dropped)")
            if not 0 < self.target < 1:
                raise ValueError(f"space 'depth': target is the fraction of sub-blocks dropped, in (0, 1); got {self.target}")
            return
        levels = self.level_values
        E.LevelSpace(("a",), (1,), tuple(levels))  # levels checked when the recipe is read
        if not min(levels) <= self.target <= max(levels):
            raise ValueError(f"target {self.target} is outside the levels {levels}")
        if self.space == "bits" and any(b != int(b) or not 2 <= b <= 8 for b in levels):
            raise ValueError(f"space 'bits': levels must be whole bit widths 2..8, got {levels}")
        if self.space == "sparsity" and any(not 0 <= s < 1 for s in levels):
            raise ValueError(f"space 'sparsity': levels must be sparsities in [0, 1), got {levels}")

    @property
    def level_values(self) -> list[float]:
        """The levels (the space's default when not set; depth: kept 0, dropped 1)."""
        if self.space == "depth":
            return [0.0, 1.0]
        return [float(v) for v in (self.levels if self.levels is not None else DEFAULT_LEVELS[self.space])]

    def candidate_config(self, bits: int):
        shared = {k: getattr(self, k) for k in ("group_size", "symmetric", "mse", "scale_dtype")}
        return PASSES[self.candidate].config.model_validate({**shared, **self.candidate_options, "bits": bits})


# ------------------------------------------------------------------------------------------ database, checkpoint

def database_key(parts: dict) -> str:
    """16 hex digits of the sha256 of `parts` as sorted JSON: names a database, a search checkpoint, a trace."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Database:
    """Compressed variants of every layer at every level, one safetensors file per layer under `root`
    (tensor "level{k}", float16, the dequantized weight; the key in its metadata), and meta.json (the key, levels,
    layers), written last. A build that stopped part way resumes: a block whose layers' files all carry the key is
    kept (only its FP forward runs again)."""

    def __init__(self, root: Path, key: str, space: E.LevelSpace):
        self.root, self.key, self.space = Path(root), key, space

    def complete(self) -> bool:
        meta = self.root / "meta.json"
        if not meta.is_file():
            return False
        m = json.loads(meta.read_text())
        return m.get("key") == self.key and all((self.root / f"{n}.safetensors").is_file() for n in self.space.layers)

    def write_layer(self, name: str, variants: list[Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tensors = {f"level{k}": v.detach().to(torch.float16).contiguous().cpu() for k, v in enumerate(variants)}
        write_atomic(self.root / f"{name}.safetensors", lambda p: save_file(tensors, str(p), metadata={"key": self.key}))

    def has_layer(self, name: str) -> bool:
        """The layer's variants are on disk, written under this database's key (by this build or an earlier,
        interrupted one)."""
        f = self.root / f"{name}.safetensors"
        if not f.is_file():
            return False
        try:
            with safe_open(str(f), "pt") as h:
                return (h.metadata() or {}).get("key") == self.key
        except Exception:  # a truncated or foreign file: built again
            return False

    def finish(self) -> None:
        (self.root / "meta.json").write_text(json.dumps({"key": self.key, "levels": list(self.space.values),
                                                         "layers": list(self.space.layers)}, indent=1))

    def load_layer(self, name: str) -> list[Tensor]:
        t = load_file(str(self.root / f"{name}.safetensors"))
        return [t[f"level{k}"] for k in range(len(self.space.values))]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.glob("*.safetensors"))


def search_checkpoint(path: Path) -> dict[str, Any]:
    """E.evolve's resume / on_checkpoint kept in a JSON file: read when it is there, rewritten (atomically) after
    every generation. On several ranks rank 0 alone reads and writes it; the others get what it read."""
    main = dist.world().main
    resume = json.loads(path.read_text()) if main and path.is_file() else None
    return {"resume": dist.broadcast(resume, 0),
            "on_checkpoint": (lambda state: write_atomic(path, lambda p: p.write_text(json.dumps(state)))) if main else None}


def _db_root(cfg: EvoPressConfig, key: str) -> Path:
    if cfg.database:
        return Path(cfg.database)
    return cache_dir() / "evopress" / key


def _block_variants(cfg: EvoPressConfig, block: nn.Module, io: BlockIO, quiet: Context) -> dict[str, list[Tensor]]:
    """Every level's variant of each of the block's target layers (io.layers); the weights are left as they were.
    io.outputs: the FP block's outputs on io.inputs, the targets of a candidate that reconstructs them (flexround,
    adaround)."""
    if cfg.space == "sparsity":
        return {n: [P.pruned(m.weight.data, s).weight for s in cfg.level_values] for n, m in io.layers.items()}
    variants: dict[str, list[Tensor]] = {n: [] for n in io.layers}
    fp = {n: m.weight.data.clone() for n, m in io.layers.items()}
    learned = _reads(cfg) == "targets"
    for bits in cfg.level_values:
        level_io = BlockIO(io.prefix, io.inputs, io.kwargs, dict(io.layers), targets=io.outputs if learned else None)
        with torch.enable_grad() if learned else contextlib.nullcontext():  # the database is built under no_grad
            out = PASSES[cfg.candidate].fn(block, level_io, cfg.candidate_config(int(bits)), quiet)
        for n, qw in out.items():
            variants[n].append(qw.dequantize(torch.float32))
        for n, m in io.layers.items():  # the next width starts from the FP weights again
            m.weight.data = fp[n].clone()
    return variants


@torch.no_grad()
def build_database(inp: PlanInput, cfg: EvoPressConfig, db: Database) -> None:
    """Every target layer at every level, block by block on the FP model (stream_blocks: one block in memory)."""
    model, ctx = inp.model, inp.ctx
    n_blocks = len(find_blocks(model)[1])
    needs_data = _reads(cfg) != "weights"
    quiet = Context(device=ctx.device, seed=ctx.seed)
    main = dist.world().main  # on several ranks every rank computes the variants (the candidate's own reductions
    # and solves are split between them) and rank 0 writes them
    for i, block, io in stream_blocks(model, inp.ckpt, inp.windows, ctx, data=needs_data):
        io.layers = {n: m for n, m in ((f"{io.prefix}.{n}", m) for n, m in block.named_modules()) if n in db.space.layers}
        # from an interrupted build: only the FP forward is needed (rank 0's files decide, for every rank)
        kept = dist.broadcast(main and all(db.has_layer(n) for n in io.layers), 0)
        if needs_data:  # the FP block's outputs: the next block's inputs, and the targets of a reconstructing candidate
            io.outputs = io.forward(block)
        if not kept:
            for n, vs in _block_variants(cfg, block, io, quiet).items():
                if main:
                    db.write_layer(n, vs)
        ctx.log(f"evopress database: block {i + 1}/{n_blocks}" + (" (kept from an earlier build)" if kept else ""))
    if main:
        db.finish()
    dist.broadcast(None, 0)  # every rank reads the database once rank 0 has written all of it


def depth_units(model: nn.Module, select) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """The residual sub-blocks of a Llama-style decoder: their names ("<block>.self_attn", "<block>.mlp"), each
    one's output projection, and its Linears that the recipe targets (the output projection must be one)."""
    prefix, blocks = find_blocks(model)
    units, out_proj, linears = [], {}, {}
    for i, block in enumerate(blocks):
        for child, proj in SUBBLOCKS:
            unit = f"{prefix}.{i}.{child}"
            try:
                sub = block.get_submodule(child)
                lin = sub.get_submodule(proj)
            except AttributeError:
                raise BadInput(f"evopress space 'depth' needs Llama-style blocks ({', '.join(c + '.' + p for c, p in SUBBLOCKS)}); "
                               f"{prefix}.{i} has no {child}.{proj}") from None
            if getattr(lin, "bias", None) is not None:
                raise BadInput(f"evopress space 'depth': {unit}.{proj} has a bias, so zeroing its weight does not drop {unit}")
            if not select(f"{unit}.{proj}"):
                raise BadInput(f"evopress space 'depth': the targets must include {unit}.{proj} (dropping {unit} zeroes it)")
            units.append(unit)
            out_proj[unit] = f"{unit}.{proj}"
            linears[unit] = [f"{unit}.{n}" for n, m in sub.named_modules() if isinstance(m, nn.Linear) and select(f"{unit}.{n}")]
    return units, out_proj, linears


def _search(inp: PlanInput, cfg: EvoPressConfig, space: E.LevelSpace, variants: dict[str, list[Tensor]],
            start: E.State, trace_dir: Path, extra: dict, identity: dict) -> E.State:
    """The evolution on the FP model (materialized here) with the KL fitness; the trace goes to `trace_dir`.
    `identity`: what the variants come from (the model files' digests, the database key), for the checkpoint's key."""
    ctx = inp.ctx
    pool = dist.head(inp.windows, cfg.fitness_samples)[:, : cfg.fitness_seq_len]  # (this rank's part of it)
    # the search's checkpoint: keyed by what its course depends on (not `generations`: more of them extend it)
    ck_key = database_key({"spec": {k: v for k, v in inp.spec.to_yaml_dict().items() if k != "generations"},
                             **identity, "pool": database_key({"w": dist.unshard(pool).tolist()}),
                           "device": str(ctx.device)})
    trace_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = trace_dir / f"search-{ck_key}.json"
    if checkpoint.is_file():
        ctx.log(f"evopress: going on from the search checkpoint {checkpoint}")
    materialize(inp.model, "", inp.ckpt, ctx.device)
    try:
        fit = measure.KLFitness(inp.model, pool, space.layers, variants, cfg.stage_windows, cfg.topk, ctx.device,
                          getattr(torch, cfg.fitness_dtype), cfg.fitness)
        unit = {"bits": "bits", "sparsity": "sparsity", "depth": "dropped"}[cfg.space]
        label = "KL" if cfg.fitness == "kl" else "log-perplexity"
        state, trace = E.evolve(space, fit, start, cfg.generations, cfg.offspring, cfg.survivors, seed=ctx.seed,
                                on_generation=lambda g: ctx.log(f"evopress generation {g['generation']}/{cfg.generations}: "
                                                                f"{label} {g['fitness']:.5f}, {g['average']:.3f} {unit}, {g['seconds']:.0f} s"),
                                **search_checkpoint(checkpoint))
        start_fit = fit.kl(start, list(range(fit.pool_size))) if cfg.generations else None
        final_fit = fit.kl(state, list(range(fit.pool_size))) if cfg.generations else None
    finally:
        release(inp.model, "")
    if dist.world().main:
        (trace_dir / f"trace-{database_key(inp.spec.to_yaml_dict())}.json").write_text(json.dumps(
            {"space": cfg.space, "target": cfg.target, "start_average": space.average(start),
             "average": space.average(state), "start_fitness_pool": start_fit, "final_fitness_pool": final_fit,
             "generations": trace.to_json(), **extra}, indent=1))
    ctx.log(f"evopress: {space.average(state):.4f} {unit} on average over {len(space.layers)} "
            f"{'sub-blocks' if cfg.space == 'depth' else 'layers'}")
    return state


def plan(inp: PlanInput) -> dict[str, dict[str, Any]]:
    """The level of every layer (see the module docstring)."""
    cfg: EvoPressConfig = inp.spec.config  # type: ignore[assignment]
    ctx, model = inp.ctx, inp.model
    model_digests = [sha256_file(f) for f in sorted({Path(f) for f in inp.ckpt.files.values()})]
    if cfg.space == "depth":
        units, out_proj, linears = depth_units(model, inp.spec.selects)
        n_drop = round(cfg.target * len(units))
        if n_drop < 1 or n_drop >= len(units):
            raise BadInput(f"evopress space 'depth': target {cfg.target} of {len(units)} sub-blocks drops {n_drop}")
        space = E.LevelSpace(tuple(out_proj[u] for u in units), (1,) * len(units), (0.0, 1.0))
        materialize(model, "", inp.ckpt, ctx.device)
        try:
            blocks_prefix, blocks = find_blocks(model)
            infl = measure.subblock_influence(model, blocks, dist.head(inp.windows, cfg.fitness_samples)[:, : cfg.fitness_seq_len],
                                        tuple(c for c, _ in SUBBLOCKS), ctx.device)
            variants = {out_proj[u]: [model.get_submodule(out_proj[u]).weight.data.clone().cpu(),
                                      torch.zeros_like(model.get_submodule(out_proj[u]).weight.data).cpu()] for u in units}
        finally:
            release(model, "")
        by_unit = {f"{blocks_prefix}.{i}.{c}": v for (i, c), v in infl.items()}
        cosine_drop = set(E.lowest({u: by_unit[u] for u in units}, n_drop))
        start = tuple(int(u in cosine_drop) for u in units)
        ctx.log(f"evopress: dropping {n_drop} of {len(units)} sub-blocks; the cosine choice drops "
                f"{', '.join(sorted(cosine_drop, key=units.index))}")
        cache = Path(cfg.database) if cfg.database else _db_root(cfg, "depth")
        state = _search(inp, cfg, space, variants, start, cache,
                        {"influence": {u: by_unit[u] for u in units}, "cosine_choice": sorted(cosine_drop, key=units.index)},
                        {"model": model_digests, "variants": None})
        dropped = {u for u, k in zip(units, state) if k}
        return {n: {"dropped": u in dropped} for u in units for n in linears[u]}

    prefix, _ = find_blocks(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and inp.spec.selects(n)
              and n.startswith(prefix + ".")]
    if not layers:
        raise BadInput("evopress: the recipe's targets select no Linear layer")
    sizes = tuple(model.get_submodule(n).weight.numel() for n in layers)
    space = E.LevelSpace(tuple(layers), sizes, tuple(cfg.level_values))
    data = _reads(cfg) != "weights"
    key = database_key({"model": model_digests, "space": cfg.space,
                          "candidate": cfg.candidate if cfg.space == "bits" else "magnitude",
                          "options": cfg.candidate_config(int(cfg.level_values[0])).model_dump() if cfg.space == "bits" else {},
                          "levels": cfg.level_values, "layers": layers,
                          "windows": database_key({"w": dist.unshard(inp.windows).tolist()}) if data else None})
    db = Database(_db_root(cfg, key), key, space)
    if dist.broadcast(dist.world().main and db.complete(), 0):  # rank 0's database decides, for every rank
        ctx.log(f"evopress: database {db.root} (reused)")
    else:
        ctx.log(f"evopress: building the database under {db.root}")
        build_database(inp, cfg, db)
    if not db.complete():  # (only on a rank that does not see rank 0's files)
        raise BadInput(f"evopress: rank {dist.world().rank} does not see the database rank 0 wrote under {db.root}; "
                       "on several machines set `database:` to a directory every rank shares")
    variants = {n: db.load_layer(n) for n in layers}
    state = _search(inp, cfg, space, variants, E.initial_state(space, cfg.target), db.root,
                    {"database_bytes": db.size_bytes()}, {"model": model_digests, "variants": key})
    ctx.log(f"evopress: database {db.size_bytes() / 2**20:.0f} MiB")
    key_name = "bits" if cfg.space == "bits" else "sparsity"
    return {n: {key_name: int(space.values[k]) if cfg.space == "bits" else round(space.values[k], 6)}
            for n, k in zip(layers, state)}


def _reads(cfg: EvoPressConfig) -> str:
    if cfg.space != "bits":
        return "weights"  # magnitude pruning and dropping look at weights only
    return PASSES[cfg.candidate].reads(cfg.candidate_config(int(cfg.level_values[0])))


def _mask_role(cfg: EvoPressConfig) -> str | None:
    return None if cfg.space == "bits" else "makes"


@register_pass("evopress", EvoPressConfig, plan=plan, reads=_reads, masks=_mask_role, distributed=True)
def evopress(block: nn.Module, io: BlockIO, cfg: EvoPressConfig, ctx: Context) -> dict[str, Any]:
    """EvoPress: each layer at the level the evolutionary search chose (a bit width, a sparsity, or dropped)."""
    if cfg.space == "sparsity":
        return {n: P.pruned(lin.weight.data, float(io.assignment.get(n, {}).get("sparsity", cfg.target)))
                for n, lin in io.layers.items()}
    if cfg.space == "depth":  # kept sub-blocks stay as they are
        return {n: P.pruned(lin.weight.data, 1.0) for n, lin in io.layers.items() if io.assignment.get(n, {}).get("dropped")}
    by_bits: dict[int, dict[str, nn.Linear]] = {}
    for name, lin in io.layers.items():
        bits = int(io.assignment.get(name, {}).get("bits", round(cfg.target)))
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
