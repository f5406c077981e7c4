"""The block loop: one transformer block in memory at a time, the calibration activations handed from block to
block (the GPTQ `llama.py` pattern). The runner, the plans and the research tools all walk the model through
`stream_blocks`; this module also holds what a block's consumer works with (Context, BlockIO, the batch helpers)
and the one estimate of the activations' memory (check_calibration before a run, cache_device during it).

The skeleton lives on the meta device: each block's weights are read from the checkpoint when its turn comes and
dropped after it, so memory is one block plus the cached activations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from . import dist
from .data import check_window_request
from .errors import BadInput
from .models import Checkpoint, find_blocks, materialize, release


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


def hidden(out: Any) -> Tensor:
    """The hidden states of a block's output (blocks return a tensor or a tuple led by it)."""
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
    outputs: list[Tensor] | None = None  # per batch: the block's output on `inputs`, set by stream_blocks' caller
    # when it is done with the block: the next block's inputs
    tokens_seen: dict[str, int] = field(default_factory=dict)  # per layer: the calibration tokens that reached it
    # in the last input_second_moments (all of them, or for an MoE expert the ones routed to it)

    @torch.no_grad()
    def forward(self, block: nn.Module) -> list[Tensor]:
        return self.forward_on(block, self.inputs)

    @torch.no_grad()
    def forward_on(self, block: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
        return [hidden(run_on_block_device(block, x, kw)).to(x.device) for x, kw in zip(inputs, self.kwargs)]

    @torch.no_grad()
    def input_second_moments(self, block: nn.Module, names: list[str]) -> dict[str, Tensor]:
        """sum over calibration tokens of x x^T for the inputs of the named layers: {name: (K, K)}; how many
        tokens each saw goes to `tokens_seen` (an expert sees only the tokens routed to it; one no token reaches
        keeps a zero matrix and a count of 0, and the block is then run to its end on every batch).

        The products are summed in float64 and rounded to float32 once, at the end: the float32 result is then the
        same however the windows are batched or split between ranks (a float32 sum's rounding depends on the
        order, and GPTQ's discrete choices, its MSE clipping and scale refit, amplify a 1e-7 difference into other
        codes)."""
        dev = self.inputs[0].device
        acc = {n: torch.zeros(self.layers[n].in_features, self.layers[n].in_features, device=dev, dtype=torch.float64)
               for n in names}
        self.tokens_seen.update({n: 0 for n in names})
        pending: set[str] = set()
        done: list[tuple[Tensor, Tensor]] = []  # this batch's (input, x^T x): siblings reading one input share it

        def hook(name: str):
            def fn(_m: nn.Module, args: tuple) -> None:
                xtx = next((m for x, m in done if x is args[0]), None)
                if xtx is None:
                    x = args[0].reshape(-1, args[0].shape[-1]).double()  # (B*T, K)
                    xtx = x.T @ x
                    done.append((args[0], xtx))
                acc[name] += xtx
                self.tokens_seen[name] += args[0].numel() // args[0].shape[-1]
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
        for n in names:  # on several ranks: the sums over every rank's windows (dist.py), the same on each
            acc[n] = dist.all_reduce_sum(acc[n]).float()
        for n, seen in zip(names, dist.sum_ints([self.tokens_seen[n] for n in names])):
            self.tokens_seen[n] = seen
        return acc

    def tokens(self) -> int:
        """Calibration tokens of this block's inputs, over every rank."""
        return dist.sum_ints([sum(x.shape[0] * x.shape[1] for x in self.inputs)])[0]

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
            run_on_block_device(block, self.inputs[0][:1], slice_kwargs(self.kwargs[0], self.inputs[0].shape[0]))
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


def rel_sq_err(ys: list[Tensor], ts: list[Tensor]) -> float:
    """sum (y - t)^2 / sum t^2 over batches of block outputs (in float32), and over every rank's."""
    num = sum(float((y.float() - t.float()).pow(2).sum()) for y, t in zip(ys, ts))
    den = sum(float(t.float().pow(2).sum()) for t in ts)
    if dist.world().size > 1:
        num, den = dist.all_reduce_sum(torch.tensor([num, den], dtype=torch.float64, device=dist.collective_device())).tolist()
    return num / max(den, 1e-30)


def slice_kwargs(kw: dict[str, Any], batch: int, rows: Any = slice(0, 1)) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------ activation memory

# A run caches at most this many streams of calibration activations: the block inputs, the FP outputs, the
# compressed outputs and the FP model's stream (block reconstruction targets)
ACTIVATION_STREAMS = 4


def hidden_size(config: dict) -> int:
    """The width of the activations the blocks hand on, from a config.json dict (a multimodal model's text_config
    too); 4096 when it does not say."""
    text = config.get("text_config") or {}
    return int(config.get("hidden_size") or config.get("d_model") or text.get("hidden_size") or 4096)


def activation_bytes(tokens: int, hidden: int, streams: int) -> int:
    """Bytes of `streams` float32 copies of the activations of `tokens` calibration tokens (samples x seq_len)."""
    return tokens * hidden * 4 * streams


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


def check_calibration(samples: int, seq_len: int, config: dict, device: torch.device) -> None:
    """Refuse, before any text is read, calibration the model or this machine cannot take: windows longer than the
    model's positions, or activations (ACTIVATION_STREAMS float32 copies of samples x seq_len x hidden, plus the
    int64 token windows) larger than the memory they would live in (see cache_device)."""
    check_window_request(samples, seq_len)
    text = config.get("text_config") or {}
    limit = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise BadInput(f"seq_len {seq_len} is longer than the model's max_position_embeddings {limit}")
    hidden = hidden_size(config)
    activations = activation_bytes(samples * seq_len, hidden, ACTIVATION_STREAMS)
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


# ------------------------------------------------------------------------------------------------- the loop

def stream_blocks(model: nn.Module, ckpt: Checkpoint | None, windows: Tensor, ctx: Context, *, streams: int = 2,
                  data: bool = True, targets: bool = False, last: int | None = None,
                  ) -> Iterator[tuple[int, nn.Module, BlockIO]]:
    """Walk the model's blocks in order, yielding (index, block, io) with the block in memory on ctx.device.

    With `data`, the modules outside the blocks are materialized, the first block's inputs captured from the
    calibration windows (cached where `streams` float32 copies of them fit, cache_device) and those modules
    released again. The caller works on the block and, before it asks for the next one, sets `io.outputs` to the
    block's output on io.inputs (as the caller leaves the block): the next block's inputs. The block is released
    after that; `io` is spent (its activation lists are dropped, so only the live streams stay in memory).
    `targets`: the FP model's stream runs beside: io.targets is the FP block's output on the FP model's inputs, run
    before the caller gets the block, and the next block's FP inputs. `last`: the last block whose inputs anyone
    reads; the blocks after it get none and need no outputs. Without `data` nothing runs forward (io.inputs and
    io.kwargs are empty). `ckpt` None: the whole model is in memory already; nothing is materialized or released.
    """
    blocks_prefix, blocks = find_blocks(model)
    inputs: list[Tensor] = []
    kwargs: list[dict[str, Any]] = []
    if data:
        if ckpt is not None:
            materialize(model, "", ckpt, ctx.device, exclude=blocks_prefix)
        config = getattr(model, "config", None)
        hidden = hidden_size(config.to_dict() if config is not None else {})
        cache = cache_device(ctx, activation_bytes(windows.numel(), hidden, streams))
        inputs, kwargs = capture_block_inputs(model, blocks[0], windows, ctx.batch_size, ctx.device, cache)
        if ckpt is not None:
            release(model, "", exclude=blocks_prefix)  # embeddings are not needed any more
    fp_inputs = inputs  # the FP model's stream; the same list at block 0
    for i, block in enumerate(blocks):
        prefix = f"{blocks_prefix}.{i}"
        if ckpt is not None:
            materialize(model, prefix, ckpt, ctx.device)
        if data and last is not None and i > last:  # nobody reads these blocks' inputs
            data = targets = False
            inputs, fp_inputs = [], []
        io = BlockIO(prefix, inputs, kwargs, {})
        if targets:
            io.targets = io.forward_on(block, fp_inputs)
        yield i, block, io
        if data and io.outputs is None:
            raise RuntimeError(f"stream_blocks: the caller set no io.outputs for block {prefix}")
        inputs = io.outputs if data else []
        fp_inputs = io.targets if targets else inputs
        io.inputs, io.targets, io.outputs = [], None, None
        if ckpt is not None:
            release(model, prefix)


@torch.no_grad()
def stream_fp_layers(model: nn.Module, ckpt: Checkpoint, windows: Tensor, ctx: Context,
                     select: Callable[[str], bool], full: bool = False) -> Iterator[tuple[str, nn.Linear, Tensor]]:
    """Run the FP model block by block over the calibration windows and yield (name, Linear, sum x_j^2) for every
    selected Linear inside the blocks (`full`: the whole second moment sum x x^T, (K, K)), while its block is in
    memory."""
    for _, block, io in stream_blocks(model, ckpt, windows, ctx):
        layers = {f"{io.prefix}.{n}": m for n, m in block.named_modules()
                  if isinstance(m, nn.Linear) and select(f"{io.prefix}.{n}")}
        acc = {n: torch.zeros((m.in_features,) * (2 if full else 1), device=ctx.device, dtype=torch.float64)
               for n, m in layers.items()}  # float64 sums, float32 at the end (as input_second_moments)

        def hook(name: str):
            def fn(_m: nn.Module, args: tuple) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                acc[name] += x.T @ x if full else x.pow(2).sum(0)
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        try:
            io.outputs = io.forward(block)
        finally:
            for h in handles:
                h.remove()
        for name, lin in layers.items():
            yield name, lin, dist.all_reduce_sum(acc[name]).float()
