"""The runner: capture the first block's inputs, then per block run the recipe's passes and hand the
compressed block's outputs on as the next block's inputs (the GPTQ `llama.py` pattern).

Memory is one block plus the calibration activations: the skeleton lives on the meta device, each block's
weights are read from the safetensors files when its turn comes, written to the artifact as soon as it is
done, and dropped. The runner knows passes only through the registry.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .data import check_window_request
from .errors import BadInput
from .models import Checkpoint, checkpoint_key, find_blocks, materialize, release
from .passes import PassInfo, get_pass
from .lowrank import LowRankLinear, LowRankWeight
from .quant import QWeight
from .recipe import PassSpec, Recipe

# The block-output error reported per block (the FP block against the compressed one, on the same compressed
# inputs) is measured on the first this many calibration windows: it is a diagnostic, and on every window it
# cost a whole extra forward of the block (a tenth of a FlexRound block's time at 128 windows).
DIAGNOSTIC_WINDOWS = 16

@dataclass
class Context:
    """What a pass may use besides its block: device, seed, and the run's reporting hooks."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    batch_size: int = 8
    log: Callable[[str], None] = lambda msg: None
    warnings: list[str] = field(default_factory=list)
    _warned: set = field(default_factory=set)

    def warn_once(self, msg: str, key: Any = None) -> None:
        key = msg if key is None else key
        if key not in self._warned:
            self._warned.add(key)
            self.warnings.append(msg)
            self.log(f"[yellow]warning:[/] {msg}")


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockIO:
    """One block's calibration data: its inputs from the already-compressed earlier blocks, the extra
    keyword arguments of its forward (masks, rotary embeddings), and the Linear layers to compress."""

    prefix: str  # module name of the block, e.g. "model.layers.3"
    inputs: list[Tensor]  # per batch (B, T, D)
    kwargs: list[dict[str, Any]]  # per batch
    layers: dict[str, nn.Linear]  # full module name -> Linear, the recipe's targets in this block
    targets: list[Tensor] | None = None  # per batch: the FP model's output of this block (FP inputs, FP
    # weights); kept only when a pass reconstructs the block output (adaround, flexround)
    assignment: dict[str, dict[str, Any]] = field(default_factory=dict)  # per layer: what the pass's plan chose
    masks: dict[str, Any] = field(default_factory=dict)  # per layer pruned by an earlier pass of the recipe: its
    # SparseWeight (.mask: the kept weights, .sparsity_structure), for a quantizer that keeps them at zero; the
    # layer's weight is then its FP weight again (the quantizer applies the mask)

    @torch.no_grad()
    def forward(self, block: nn.Module) -> list[Tensor]:
        return self.forward_on(block, self.inputs)

    @torch.no_grad()
    def forward_on(self, block: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
        return [_hidden(run_on_block_device(block, x, kw)).to(x.device) for x, kw in zip(inputs, self.kwargs)]

    @torch.no_grad()
    def input_second_moments(self, block: nn.Module, names: list[str]) -> dict[str, Tensor]:
        """sum over calibration tokens of x x^T for the inputs of the named layers: {name: (K, K)}."""
        dev = self.inputs[0].device
        acc = {n: torch.zeros(self.layers[n].in_features, self.layers[n].in_features, device=dev) for n in names}
        pending: set[str] = set()
        done: list[tuple[Tensor, Tensor]] = []  # this batch's (input, x^T x): siblings reading one input share it

        def hook(name: str):
            def fn(_m: nn.Module, args: tuple) -> None:
                xtx = next((m for x, m in done if x is args[0]), None)
                if xtx is None:
                    x = args[0].reshape(-1, args[0].shape[-1]).float()  # (B*T, K)
                    xtx = x.T @ x
                    done.append((args[0], xtx))
                acc[name] += xtx
                pending.discard(name)
                if not pending:
                    raise _Stop  # the rest of the block is not needed for these layers
            return fn

        handles = [self.layers[n].register_forward_pre_hook(hook(n)) for n in names]
        try:
            for x, kw in zip(self.inputs, self.kwargs):
                pending.update(names)
                done.clear()
                try:
                    run_on_block_device(block, x, kw)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return acc

    @torch.no_grad()
    def sibling_groups(self, block: nn.Module) -> list[list[str]]:
        """The target layers grouped by the input they read (q/k/v, gate/up, ...), in execution order."""
        seen: list[tuple[Tensor, list[str]]] = []

        def hook(name: str):
            def fn(_m: nn.Module, args: tuple) -> None:
                for x, names in seen:
                    if x is args[0]:
                        names.append(name)
                        return
                seen.append((args[0], [name]))
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.layers.items()]
        try:
            run_on_block_device(block, self.inputs[0][:1], _slice_kwargs(self.kwargs[0], self.inputs[0].shape[0]))
        finally:
            for h in handles:
                h.remove()
        groups = [names for _, names in seen]
        missing = [n for n in self.layers if not any(n in g for g in groups)]
        return groups + ([missing] if missing else [])


def to_device(v: Any, device: torch.device) -> Any:
    """A tensor, or a tuple of tensors (rotary embeddings), moved to `device`; anything else as it is."""
    if isinstance(v, Tensor):
        return v.to(device)
    if isinstance(v, tuple) and all(isinstance(t, Tensor) for t in v):
        return tuple(t.to(device) for t in v)
    return v


def run_on_block_device(block: nn.Module, x: Tensor, kw: dict[str, Any]) -> Any:
    """block(x, **kw) with the batch moved to the block's device (the cache may live on the CPU)."""
    dev = next(block.parameters()).device
    return block(x.to(dev), **{k: to_device(v, dev) for k, v in kw.items()})


def _first_windows(batches: list[Tensor], n: int) -> list[Tensor]:
    """The leading cached batches that hold at least `n` windows (all of them when there are fewer)."""
    out, count = [], 0
    for x in batches:
        if count >= n:
            break
        out.append(x)
        count += x.shape[0]
    return out


def rel_sq_err(ys: list[Tensor], ts: list[Tensor]) -> float:
    """sum (y - t)^2 / sum t^2 over batches of block outputs (in float32)."""
    num = sum(float((y.float() - t.float()).pow(2).sum()) for y, t in zip(ys, ts))
    den = sum(float(t.float().pow(2).sum()) for t in ts)
    return num / max(den, 1e-30)


def _slice_kwargs(kw: dict[str, Any], batch: int, rows: Any = slice(0, 1)) -> dict[str, Any]:
    """Keyword arguments for some samples of a batch (`rows`: a slice or index tensor; default the first):
    tensors with a batch dimension are cut, broadcast ones (batch 1) and the rest pass through."""

    def cut(t: Tensor) -> Tensor:
        return t[rows] if t.dim() > 0 and t.shape[0] == batch and batch > 1 else t

    out = {}
    for k, v in kw.items():
        if isinstance(v, Tensor):
            out[k] = cut(v)
        elif isinstance(v, tuple) and all(isinstance(t, Tensor) for t in v):
            out[k] = tuple(cut(t) for t in v)
        else:
            out[k] = v
    return out


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: Tensor, batch_size: int,
                         device: torch.device, cache_device: torch.device | None = None,
                         ) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Run the model up to the first block on each batch of windows and keep what enters that block
    (on `cache_device`, default `device`)."""
    inputs: list[Tensor] = []
    kwargs: list[dict[str, Any]] = []
    keep = device if cache_device is None else cache_device

    def catch(_m: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
        inputs.append((args[0] if args else kw.pop("hidden_states")).to(keep))
        kwargs.append({k: to_device(v, keep) for k, v in kw.items()
                       if k not in ("past_key_values", "past_key_value", "use_cache")})
        raise _Stop

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i : i + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


@dataclass
class BlockResult:
    qweights: dict[str, QWeight]
    layer_pass: dict[str, str]
    layer_err: dict[str, float]  # ||W_q - W|| / ||W|| per layer
    out_rel_err: float | None  # ||y_q - y_fp||^2 / ||y_fp||^2 of the block output on the compressed inputs
    # (None when no pass of the recipe needs calibration data: then nothing is run forward)
    seconds: float


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "d_model", 0) or 4096)


def cache_device(ctx: Context, nbytes: int) -> torch.device:
    """Where the calibration activations live: on the compute device when they take at most half of its free
    memory, else on the CPU (each batch then goes to the device when a block runs it)."""
    if ctx.device.type != "cuda":
        return ctx.device
    free, _ = torch.cuda.mem_get_info(ctx.device)
    if nbytes <= free // 2:
        return ctx.device
    ctx.log(f"calibration activations ({nbytes / 2**30:.1f} GiB) stay on the CPU; {free / 2**30:.1f} GiB free on "
            f"{ctx.device}")
    return torch.device("cpu")


# run_blocks caches at most this many streams of calibration activations: the block inputs, the FP outputs, the
# compressed outputs and the FP model's stream (block reconstruction targets)
ACTIVATION_STREAMS = 4


def check_calibration(samples: int, seq_len: int, config: dict, device: torch.device) -> None:
    """Refuse, before any text is read, calibration the model or this machine cannot take: windows longer than the
    model's positions, or activations (ACTIVATION_STREAMS float32 copies of samples x seq_len x hidden, plus the
    int64 token windows) larger than the memory they would live in (see cache_device)."""
    check_window_request(samples, seq_len)
    text = config.get("text_config") or {}
    limit = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise BadInput(f"seq_len {seq_len} is longer than the model's max_position_embeddings {limit}")
    hidden = int(config.get("hidden_size") or config.get("d_model") or text.get("hidden_size") or 4096)
    activations = samples * seq_len * hidden * 4 * ACTIVATION_STREAMS
    need = samples * seq_len * 8
    if device.type != "cuda" or activations > torch.cuda.mem_get_info(device)[0] // 2:
        need += activations  # they stay in host memory
    avail = host_memory_available()
    if need > avail:
        raise BadInput(f"calibration of {samples} windows of seq_len {seq_len} needs about {need / 2**30:.1f} GiB "
                       f"for its activations (hidden size {hidden}), more than the {avail / 2**30:.1f} GiB of memory "
                       f"available: lower samples or seq_len")


def host_memory_available() -> int:
    """Bytes of host memory this process can still take: /proc/meminfo's MemAvailable (else the physical memory),
    bounded by the cgroup's limit when it has one (a container's OOM killer acts on that)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return avail
    return min(avail, int(limit) - used) if limit.isdigit() else avail


@dataclass
class PlanInput:
    """What a pass's plan stage gets: the model skeleton (weights on the meta device until streamed), the
    checkpoint, the calibration windows, its spec and the run's context."""

    model: nn.Module
    ckpt: Checkpoint
    windows: Tensor
    spec: PassSpec
    ctx: Context

    def stream_fp_layers(self) -> Iterator[tuple[str, nn.Linear, Tensor]]:
        """The spec's target Linears of the FP model, block by block, each with the diagonal of its input second
        moment, sum over calibration tokens of x_j^2 (K,), while its block is in memory."""
        yield from stream_fp_layers(self.model, self.ckpt, self.windows, self.ctx, self.spec.selects)


@dataclass
class FinishInput:
    """What a pass's finish stage gets: the whole FP model (materialized on the device), the calibration windows,
    its spec and context, and `results`, the QWeight of each of its layers, to update in place."""

    model: nn.Module
    windows: Tensor
    spec: PassSpec
    ctx: Context
    results: dict[str, QWeight]


@torch.no_grad()
def stream_fp_layers(model: nn.Module, ckpt: Checkpoint, windows: Tensor, ctx: Context,
                     select: Callable[[str], bool], full: bool = False) -> Iterator[tuple[str, nn.Linear, Tensor]]:
    """Run the FP model block by block over the calibration windows and yield (name, Linear, sum x_j^2) for every
    selected Linear inside the blocks (`full`: the whole second moment sum x x^T, (K, K)); memory is one block plus
    the activations."""
    blocks_prefix, blocks = find_blocks(model)
    materialize(model, "", ckpt, ctx.device, exclude=blocks_prefix)
    cache = cache_device(ctx, windows.numel() * _hidden_size(model) * 4 * 2)
    inputs, kwargs = capture_block_inputs(model, blocks[0], windows, ctx.batch_size, ctx.device, cache)
    release(model, "", exclude=blocks_prefix)
    for i, block in enumerate(blocks):
        prefix = f"{blocks_prefix}.{i}"
        materialize(model, prefix, ckpt, ctx.device)
        layers = {f"{prefix}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear) and select(f"{prefix}.{n}")}
        acc = {n: torch.zeros((m.in_features,) * (2 if full else 1), device=ctx.device) for n, m in layers.items()}

        def hook(name: str):
            def fn(_m: nn.Module, args: tuple) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                acc[name] += x.T @ x if full else x.pow(2).sum(0)
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        try:
            io = BlockIO(prefix, inputs, kwargs, layers)
            inputs = io.forward(block)
        finally:
            for h in handles:
                h.remove()
        for name, lin in layers.items():
            yield name, lin, acc[name]
        release(model, prefix)


def check_targets(blocks_prefix: str, blocks: nn.ModuleList, specs: list[tuple[PassSpec, PassInfo]]) -> int:
    """A pass whose targets select no Linear inside the blocks is an error before anything runs (a mistyped
    regex would otherwise write an artifact with nothing compressed). After a factorising pass, the factors
    `<layer>.a` / `<layer>.b` of the layers it selects are names later passes may select too. Returns the index
    of the last block any pass selects a layer in: the blocks after it need no forward."""
    names = [(i, f"{blocks_prefix}.{i}.{n}") for i, b in enumerate(blocks) for n, m in b.named_modules()
             if isinstance(m, nn.Linear)]
    last = 0
    for k, (spec, info) in enumerate(specs):
        chosen = [(i, n) for i, n in names if spec.selects(n)]
        if not chosen:
            sel = f"targets {list(spec.targets)}" + (f" minus ignore {list(spec.ignore)}" if spec.ignore else "")
            raise BadInput(f"pass {k + 1} ({spec.name}): its {sel} select no Linear inside the model's blocks "
                           f"(names look like {names[0][1]!r})")
        last = max(last, chosen[-1][0])
        if info.factors:
            names += [(i, f"{n}.{f}") for i, n in chosen for f in "ab"]
    return last


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
    it has run, and only then handed to on_block_done. Returns the recipe with the plans' assignments."""
    blocks_prefix, blocks = find_blocks(model)
    specs = [(spec, get_pass(spec.name)) for spec in recipe.passes]
    for spec, info in specs:
        if info.kind != "block":
            raise BadInput(f"pass {spec.name!r} is a planner; this runner applies block passes only")
    last_block = check_targets(blocks_prefix, blocks, specs)
    for i, (spec, info) in enumerate(specs):
        if info.plan is not None and not spec.assignment:
            ctx.log(f"{spec.name}: planning")
            assignment = info.plan(PlanInput(model, ckpt, windows, spec, ctx))
            specs[i] = (spec.model_copy(update={"assignment": assignment}), info)
    recipe = recipe.model_copy(update={"passes": [spec for spec, _ in specs]})
    needs = [info.data_needs(spec.config) for spec, info in specs]
    needs_data = any(d for d, _ in needs)
    needs_targets = any(t for _, t in needs)
    finishing = any(info.finish is not None for _, info in specs)
    kept: list[tuple[int, str, BlockResult]] = []
    if needs_data:
        materialize(model, "", ckpt, ctx.device, exclude=blocks_prefix)
        streams = 4 if needs_targets else 3  # inputs, FP outputs, compressed outputs (+ the FP model's stream)
        cache = cache_device(ctx, windows.numel() * _hidden_size(model) * 4 * streams)
        inputs, kwargs = capture_block_inputs(model, blocks[0], windows, ctx.batch_size, ctx.device, cache)
        release(model, "", exclude=blocks_prefix)  # embeddings are not needed any more
    else:
        inputs, kwargs = [], []  # data-free passes (RTN): no forward at all
    fp_inputs = inputs  # the FP model's stream (block reconstruction targets); the same list at block 0
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        prefix = f"{blocks_prefix}.{i}"
        materialize(model, prefix, ckpt, ctx.device)
        if i > last_block and needs_data:  # nothing selected from here on: no pass reads these blocks' inputs
            needs_data = needs_targets = False
            inputs, fp_inputs = [], []
        io = BlockIO(prefix, inputs, kwargs, {})
        if needs_targets and fp_inputs is inputs:  # block 0: the FP block's output is the target too
            fp_out = io.forward(block)
        else:  # only the block-output error reads it: the first DIAGNOSTIC_WINDOWS windows are enough
            fp_out = io.forward_on(block, _first_windows(inputs, DIAGNOSTIC_WINDOWS)) if needs_data else []
        if needs_targets:  # the FP block on the FP model's inputs: the target, and the next FP input
            io.targets = fp_out if fp_inputs is inputs else io.forward_on(block, fp_inputs)
        qweights: dict[str, QWeight] = {}
        layer_pass: dict[str, str] = {}
        layer_role: dict[str, str | None] = {}  # per layer: the mask role of the pass that compressed it
        layer_err: dict[str, float] = {}
        fp_w: dict[str, Tensor] = {}  # each layer's FP weight, for its error after the last pass on it
        swapped: list[tuple[nn.Module, str, nn.Module]] = []  # layers factorised in this block: put back after it
        for spec, info in specs:
            layers = {f"{prefix}.{n}": m for n, m in block.named_modules()
                      if isinstance(m, nn.Linear) and spec.selects(f"{prefix}.{n}")}
            masks = {}
            for name in layers:
                if name not in layer_pass:
                    continue
                if layer_role[name] == "makes" and info.mask_role(spec.config) == "keeps":
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
                owner = qweights.get(name.rpartition(".")[0])
                if isinstance(owner, LowRankWeight):  # a factor of a layer factorised earlier, compressed now
                    owner.compressed.add(name.rpartition(".")[2])
                if isinstance(qw, LowRankWeight):  # the block gets the two-Linear module: later passes see factors
                    lin = layers[name]
                    holder_name, _, child = name[len(prefix) + 1:].rpartition(".")
                    holder = block.get_submodule(holder_name) if holder_name else block
                    module = LowRankLinear.of(qw, lin.bias)
                    setattr(holder, child, module)
                    swapped.append((holder, child, lin))
                    fp_w[f"{name}.a"], fp_w[f"{name}.b"] = module.a.weight.data.clone(), module.b.weight.data.clone()
                    qweights[name] = qw
                    layer_pass[name] = spec.name
                    layer_role[name] = info.mask_role(spec.config)
                    layer_err[name] = float((qw.dequantize(fp_w[name].dtype) - fp_w[name]).norm()
                                            / fp_w[name].norm().clamp_min(1e-30))
                    continue
                layers[name].weight.data = qw.dequantize(layers[name].weight.dtype)  # hand on what the loader sees
                qweights[name] = qw
                layer_pass[name] = spec.name
                layer_role[name] = info.mask_role(spec.config)
                layer_err[name] = float((layers[name].weight.data - fp_w[name]).norm() / fp_w[name].norm().clamp_min(1e-30))
        out_err = None
        if needs_data:
            q_out = io.forward(block)
            out_err = rel_sq_err(q_out[: len(fp_out)], fp_out)
            inputs = q_out
            if needs_targets:
                fp_inputs = io.targets
            del fp_out
        for holder, child, lin in swapped:  # the skeleton keeps its own structure for the artifact and later stages
            setattr(holder, child, lin)
        res = BlockResult(qweights, layer_pass, layer_err, out_err, time.perf_counter() - t0)
        if finishing:
            kept.append((i, prefix, res))
        else:
            on_block_done(i, prefix, res)
        release(model, prefix)
    if finishing:
        _finish(model, ckpt, windows, ctx, specs, kept)
        for i, prefix, res in kept:
            on_block_done(i, prefix, res)
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


def block_tensors(model: nn.Module, ckpt: Checkpoint, prefix: str, qweights: dict[str, QWeight]) -> dict[str, Tensor]:
    """The artifact tensors of one block: checkpoint tensors unchanged, quantized weights packed."""
    out: dict[str, Tensor] = {}
    quant_keys = {}
    for name, qw in qweights.items():
        key = checkpoint_key(model, ckpt, f"{name}.weight")
        if key is None:  # a factor of a factorised layer (`<layer>.a`): named after that layer's checkpoint key
            parent, _, child = name.rpartition(".")
            pkey = checkpoint_key(model, ckpt, f"{parent}.weight")
            assert pkey is not None and isinstance(qweights.get(parent), LowRankWeight), name
            key = f"{pkey[: -len('weight')]}{child}.weight"
        quant_keys[key] = qw
        for suffix, t in qw.to_tensors().items():
            out[key[: -len("weight")] + suffix] = t
    ck_prefix = checkpoint_key_prefix(model, ckpt, prefix)
    for key in ckpt.keys():
        if key.startswith(ck_prefix) and key not in quant_keys:
            out[key] = ckpt.get(key)
    return out


def checkpoint_key_prefix(model: nn.Module, ckpt: Checkpoint, module_name: str) -> str:
    """The checkpoint-side spelling of a module name prefix (base-model prefix added or removed)."""
    for name, _ in model.get_submodule(module_name).named_parameters():
        key = checkpoint_key(model, ckpt, f"{module_name}.{name}")
        if key is not None:
            return key[: -len(name)]
    return module_name + "."
