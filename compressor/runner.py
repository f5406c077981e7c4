"""The runner: run a recipe's passes over the model's blocks (blocks.stream_blocks), the compressed block's outputs
handed on as the next block's inputs; the target checks before, the plans and finish stages around the blocks,
and the artifact tensors of a finished block; `prepare`, what a run needs before its blocks. The runner knows
passes only through the registry.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from . import dist
from .blocks import BlockIO, Context, check_calibration, rel_sq_err, stream_blocks
from .data import load_windows
from .errors import BadInput
from .models import (Checkpoint, OutsideLayer, checkpoint_key, embedding_scale, find_blocks, load_tokenizer,
                     materialize, outside_layers, pick_device, release, resolve_model, skeleton)
from .passes import PASSES, FinishInput, PassInfo, PlanInput, get_pass
from .recipe import PassSpec, Recipe, load_recipe
from .weights import CompressedWeight

# The block-output error reported per block (the FP block against the compressed one, on the same compressed
# inputs) is measured on the first this many calibration windows: it is a diagnostic, and on every window it
# cost a whole extra forward of the block (a tenth of a FlexRound block's time at 128 windows).
DIAGNOSTIC_WINDOWS = 16


def prepare(model: str, recipe: str | Path, calib, samples, seq_len, seed, device: str, log: Callable[[str], None],
             allow_pickle: bool = False, trust_remote_code: bool = False):
    """What a run needs before its blocks: (recipe, device, model source, calibration windows, their info);
    seeds torch with the calibration seed."""
    rec = resolve_recipe(recipe, samples, seq_len, seed)
    dev = pick_device(device)
    src = resolve_model(model, allow_pickle, trust_remote_code)
    if src.is_compressed:
        raise BadInput(f"model {model} is already compressed (compressed-tensors); give the uncompressed checkpoint")
    find_blocks(skeleton(src.path, trust_remote_code))  # an unsupported kind of model is refused before any work
    check_calibration(rec.calibration.samples, rec.calibration.seq_len, src.config, dev)
    cal = rec.calibration
    check_world(rec)
    windows, cal_info = load_windows(load_tokenizer(src.path, trust_remote_code), calib, cal.samples, cal.seq_len,
                                     cal.seed)
    log(f"calibration: {cal_info['source']}: {cal.samples} windows of {cal.seq_len} tokens, seed {cal.seed}")
    torch.manual_seed(cal.seed)
    return rec, dev, src, dist.shard(windows), cal_info


def resolve_recipe(recipe: str | Path, samples, seq_len, seed) -> Recipe:
    """The recipe by shipped name or path, its calibration fields overridden by the ones given (None: kept)."""
    return load_recipe(recipe).with_calibration(samples=samples, seq_len=seq_len, seed=seed)


def check_world(rec: Recipe, size: int | None = None) -> None:
    """On more than one rank (`size`, default this process's world), every pass of the recipe must run there
    (PassInfo.distributed) and every rank needs a calibration window: a BadInput on every rank before any work."""
    size = size or dist.world().size
    if size == 1:
        return
    single = sorted({spec.name for spec in rec.passes if not get_pass(spec.name).distributed})
    if single:
        able = ", ".join(sorted(n for n, p in PASSES.items() if p.distributed))
        raise BadInput(f"pass {', '.join(single)} does not run on more than one process yet (those that do: {able}); "
                       "run it with one process")
    if rec.calibration.samples < size:
        raise BadInput(f"{rec.calibration.samples} calibration windows for {size} processes: each needs one at least")


def _first_windows(batches: list[Tensor], n: int) -> list[Tensor]:
    """The leading cached batches that hold at least `n` windows (all of them when there are fewer)."""
    out, count = [], 0
    for x in batches:
        if count >= n:
            break
        out.append(x)
        count += x.shape[0]
    return out


@dataclass
class BlockResult:
    qweights: dict[str, CompressedWeight]
    layer_pass: dict[str, str]
    layer_err: dict[str, float]  # ||W_q - W|| / ||W|| per layer
    out_rel_err: float | None  # ||y_q - y_fp||^2 / ||y_fp||^2 of the block output on the compressed inputs
    # (None when no pass of the recipe needs calibration data: then nothing is run forward)
    seconds: float
    tied: dict[str, str] = field(default_factory=dict)  # a compressed input embedding -> the lm_head tied to it


def picked_outside(spec: PassSpec, outside: list[OutsideLayer]) -> list[OutsideLayer]:
    return [o for o in outside if spec.selects_outside(o.names)]


def check_targets(blocks_prefix: str, blocks: nn.ModuleList, specs: list[tuple[PassSpec, PassInfo]],
                  outside: list[OutsideLayer] = ()) -> int:
    """A pass whose targets select no Linear inside the blocks, nor a weight outside them (`outside`: the input
    embedding, lm_head), is an error before anything runs (a mistyped regex would otherwise write an artifact with
    nothing compressed); so is a weight outside the blocks selected by a pass that needs more than the weight
    (PassInfo.outside), by two passes, or that is an embedding a quantized table would not serve (embedding_scale).
    After a factorising pass, the factors `<layer>.a` / `<layer>.b` of the layers it selects are names later passes
    may select too. Returns the index of the last block any pass selects a layer in: the blocks after it need no
    forward."""
    names = [(i, f"{blocks_prefix}.{i}.{n}") for i, b in enumerate(blocks) for n, m in b.named_modules()
             if isinstance(m, nn.Linear)]
    last = 0
    taken: dict[str, str] = {}  # outside weight -> the pass that compresses it
    for k, (spec, info) in enumerate(specs):
        chosen = [(i, n) for i, n in names if spec.selects(n)]
        picked = picked_outside(spec, outside)
        for o in picked:
            what = " and ".join(o.names) + (" (tied: one tensor)" if len(o.names) > 1 else "")
            if not info.outside:
                able = ", ".join(sorted(n for n, p in PASSES.items() if p.outside))
                raise BadInput(f"pass {k + 1} ({spec.name}): its targets select {what}, outside the model's blocks, "
                               f"which only {able} compress (from the weight alone); give it a step of its own")
            if o.name in taken:
                raise BadInput(f"{what} is selected by two passes ({taken[o.name]} and {spec.name}); narrow their "
                               "targets")
            taken[o.name] = spec.name
            if isinstance(o.module, nn.Embedding):
                embedding_scale(o.module)
        if not chosen and not picked:
            sel = f"targets {list(spec.targets)}" + (f" minus ignore {list(spec.ignore)}" if spec.ignore else "")
            raise BadInput(f"pass {k + 1} ({spec.name}): its {sel} select no Linear inside the model's blocks "
                           f"(names look like {names[0][1]!r})")
        if chosen:
            last = max(last, chosen[-1][0])
        if info.factors:
            names += [(i, f"{n}.{f}") for i, n in chosen for f in "ab"]
    return last


def compress_outside(model: nn.Module, ckpt: Checkpoint, specs: list[tuple[PassSpec, PassInfo]],
                     outside: list[OutsideLayer], ctx: Context) -> BlockResult | None:
    """The weights outside the blocks the recipe names (the input embedding, lm_head), each compressed by its pass
    from the weight alone: an embedding of V rows of width D is given to it as the weight of a D -> V Linear (the
    layout compressed-tensors quantizes nn.Embedding in). None when the recipe names none."""
    t0 = time.perf_counter()
    res = BlockResult({}, {}, {}, None, 0.0)
    for spec, info in specs:
        picked = picked_outside(spec, outside)
        if not picked:
            continue
        layers = {}
        for o in picked:
            materialize(model, o.name, ckpt, ctx.device)
            if isinstance(o.module, nn.Embedding):
                lin = nn.Linear(o.module.embedding_dim, o.module.num_embeddings, bias=False, device="meta")
                lin.weight = o.module.weight
            else:
                lin = o.module
            layers[o.name] = lin
            if len(o.names) > 1:
                res.tied[o.name] = o.names[1]
                ctx.log(f"{o.names[1]} is tied to {o.name}: {spec.name} quantizes their one tensor, which both read")
        io = BlockIO("", [], [], layers)
        for name, qw in info.fn(model, io, spec.config, ctx).items():
            w = layers[name].weight.data
            res.qweights[name] = qw
            res.layer_pass[name] = spec.name
            res.layer_err[name] = float((qw.dequantize(w.dtype) - w).norm() / w.norm().clamp_min(1e-30))
        for o in picked:
            release(model, o.name)
    res.seconds = time.perf_counter() - t0
    return res if res.qweights else None


def run_blocks(
    model: nn.Module,
    ckpt: Checkpoint,
    recipe: Recipe,
    windows: Tensor,
    ctx: Context,
    on_block_done: Callable[[int, str, BlockResult], None],
) -> Recipe:
    """Compress the model block by block; `on_block_done(i, prefix, result)` is called while the block's
    quantized weights are still in memory (the artifact writer reads them there), then it is dropped.
    Passes with a plan stage are planned first; with a finish stage, every block's results are kept until
    it has run, and only then handed to on_block_done. The weights outside the blocks the recipe names come last,
    as on_block_done(len(blocks), "", result) (compress_outside). Returns the recipe with the plans' assignments."""
    blocks_prefix, blocks = find_blocks(model)
    specs = [(spec, get_pass(spec.name)) for spec in recipe.passes]
    outside = outside_layers(model, ckpt)
    last_block = check_targets(blocks_prefix, blocks, specs, outside)
    for i, (spec, info) in enumerate(specs):
        if info.plan is not None and not spec.assignment:
            ctx.log(f"{spec.name}: planning")
            assignment = info.plan(PlanInput(model, ckpt, windows, spec, ctx))
            specs[i] = (spec.model_copy(update={"assignment": assignment}), info)
    recipe = recipe.model_copy(update={"passes": [spec for spec, _ in specs]})
    reads = {info.reads(spec.config) for spec, info in specs}
    needs_data = bool(reads - {"weights"})
    needs_targets = "targets" in reads
    finishing = any(info.finish is not None for _, info in specs)
    kept: list[tuple[int, str, BlockResult]] = []
    # inputs, FP outputs, compressed outputs (+ the FP model's stream); data-free passes (RTN): no forward at all
    blocks_stream = stream_blocks(model, ckpt, windows, ctx, streams=4 if needs_targets else 3, data=needs_data,
                                  targets=needs_targets, last=last_block)
    t0 = time.perf_counter()
    for i, block, io in blocks_stream:
        prefix = io.prefix
        if io.targets is not None and i == 0:  # block 0: the FP block's output is the target too
            fp_out = io.targets
        else:  # only the block-output error reads it: the first DIAGNOSTIC_WINDOWS windows are enough
            fp_out = io.forward_on(block, _first_windows(io.inputs, DIAGNOSTIC_WINDOWS))
        qweights: dict[str, CompressedWeight] = {}
        layer_pass: dict[str, str] = {}
        layer_role: dict[str, str | None] = {}  # per layer: the mask role of the pass that compressed it
        layer_err: dict[str, float] = {}
        fp_w: dict[str, Tensor] = {}  # each layer's FP weight, for its error after the last pass on it
        swapped: list[tuple[nn.Module, str, nn.Module]] = []  # layers whose weight brought its own module (a
        # factorised one): put back after the block
        parts: dict[str, tuple[CompressedWeight, str]] = {}  # a Linear inside such a module -> (its weight, name)
        for spec, info in specs:
            layers = {f"{prefix}.{n}": m for n, m in block.named_modules()
                      if isinstance(m, nn.Linear) and spec.selects(f"{prefix}.{n}")}
            masks = {}
            for name in layers:
                if name not in layer_pass:
                    continue
                if layer_role[name] == "makes" and info.masks(spec.config) == "keeps":
                    masks[name] = qweights[name]  # pruned, now quantized: the quantizer keeps the zeros
                elif layer_role[name] == "makes":
                    raise BadInput(f"layer {name} is pruned by {layer_pass[name]}, and {spec.name} cannot keep "
                                   "pruned weights at zero; quantize pruned layers with rtn or gptq")
                else:
                    raise BadInput(f"layer {name} is selected by two passes ({layer_pass[name]} and {spec.name}); "
                                   "narrow their targets")
            if not layers:
                continue
            io.layers = layers
            io.assignment = spec.assignment
            io.masks = masks
            for n, m in layers.items():
                fp_w.setdefault(n, m.weight.data.clone())
            for n in masks:  # the quantizer starts from the FP weight and the mask (GPTQ then compensates the
                layers[n].weight.data = fp_w[n].clone()  # pruning error too, as SparseGPT does)
            result = info.fn(block, io, spec.config, ctx)
            for name, qw in result.items():
                if name in parts:  # a part of an earlier weight's module (a factor), compressed now
                    owner, part = parts[name]
                    owner.part_compressed(part)
                lin = layers[name]
                w = qw.dequantize(lin.weight.dtype)  # what the loader sees
                module = qw.runtime_module(lin.bias)
                if module is None:
                    lin.weight.data = w  # hand it on
                else:  # the block gets the weight's module: later passes see the Linears inside it
                    holder_name, _, child = name[len(prefix) + 1:].rpartition(".")
                    holder = block.get_submodule(holder_name) if holder_name else block
                    setattr(holder, child, module)
                    swapped.append((holder, child, lin))
                    for n, m in module.named_children():
                        if isinstance(m, nn.Linear):
                            fp_w[f"{name}.{n}"] = m.weight.data.clone()
                            parts[f"{name}.{n}"] = (qw, n)
                qweights[name] = qw
                layer_pass[name] = spec.name
                layer_role[name] = info.masks(spec.config)
                layer_err[name] = float((w - fp_w[name]).norm() / fp_w[name].norm().clamp_min(1e-30))
        out_err = None
        if io.inputs:  # the recipe reads calibration data, and a later block still needs it
            io.outputs = io.forward(block)
            out_err = rel_sq_err(io.outputs[: len(fp_out)], fp_out)
        del fp_out
        for holder, child, lin in swapped:  # the skeleton keeps its own structure for the artifact and later stages
            setattr(holder, child, lin)
        res = BlockResult(qweights, layer_pass, layer_err, out_err, time.perf_counter() - t0)
        if finishing:
            kept.append((i, prefix, res))
        else:
            on_block_done(i, prefix, res)
        t0 = time.perf_counter()  # the next block's time starts with its loading
    if finishing:
        _finish(model, ckpt, windows, ctx, specs, kept)
        for i, prefix, res in kept:
            on_block_done(i, prefix, res)
    head = compress_outside(model, ckpt, specs, outside, ctx)
    if head is not None:
        on_block_done(len(blocks), "", head)
    return recipe


def _finish(model: nn.Module, ckpt: Checkpoint, windows: Tensor, ctx: Context, specs: list, kept: list) -> None:
    """Run the finish stages on the whole FP model, then refresh each changed layer's weight error."""
    materialize(model, "", ckpt, ctx.device)
    try:
        for spec, info in specs:
            if info.finish is None:
                continue
            results = {n: qw for _, _, res in kept for n, qw in res.qweights.items() if res.layer_pass[n] == spec.name}
            info.finish(FinishInput(model, windows, spec, ctx, results))
            for _, _, res in kept:
                for n in res.qweights:
                    if n in results:
                        res.qweights[n] = results[n]
                        w = model.get_submodule(n).weight.data.float()
                        res.layer_err[n] = float((results[n].dequantize().to(w.device) - w).norm() / w.norm().clamp_min(1e-30))
    finally:
        release(model, "")


def block_tensors(model: nn.Module, ckpt: Checkpoint, prefix: str, qweights: dict[str, CompressedWeight],
                  dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The artifact tensors of one block: compressed weights as their tensors (in their own dtypes), the other
    checkpoint tensors unchanged but for floating-point ones cast to the storage dtype `dtype` (None: as stored).
    `prefix` "" (the weights outside the blocks, compress_outside): their compressed tensors alone."""
    out: dict[str, Tensor] = {}
    quant_keys = set()
    for name, qw in qweights.items():
        key = compressed_key(model, ckpt, name, qweights)
        quant_keys.add(key)
        for suffix, t in qw.to_tensors().items():
            out[key[: -len("weight")] + suffix] = t
    if not prefix:
        return out
    ck_prefix = checkpoint_key_prefix(model, ckpt, prefix)
    for key in ckpt.keys():
        if key.startswith(ck_prefix) and key not in quant_keys:
            out[key] = ckpt.get(key, dtype)
    return out


def compressed_key(model: nn.Module, ckpt: Checkpoint, name: str, qweights: dict[str, CompressedWeight]) -> str:
    """The checkpoint key of compressed layer `name`'s weight, which its compressed tensors replace; a factor of a
    factorised layer (`<layer>.a`, not in the checkpoint) is named after that layer's key."""
    key = checkpoint_key(model, ckpt, f"{name}.weight")
    if key is None:
        parent, _, child = name.rpartition(".")
        pkey = checkpoint_key(model, ckpt, f"{parent}.weight")
        assert pkey is not None and parent in qweights, name
        key = f"{pkey[: -len('weight')]}{child}.weight"
    return key


def checkpoint_key_prefix(model: nn.Module, ckpt: Checkpoint, module_name: str) -> str:
    """The checkpoint-side spelling of a module name prefix (base-model prefix added or removed)."""
    for name, _ in model.get_submodule(module_name).named_parameters():
        key = checkpoint_key(model, ckpt, f"{module_name}.{name}")
        if key is not None:
            return key[: -len(name)]
    return module_name + "."
