"""More than one process: data-parallel calibration on torch.distributed (gloo on the CPU, nccl on CUDA).

A run is started by `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT in the environment: `init`)
or by `compress model --workers N`, which spawns N local ranks itself (`spawn`). Every rank runs the same blocks on
its own shard of the calibration windows (`shard`: rank r takes windows r, r + W, ...); what a pass sums over windows
is all-reduced before it is used (`all_reduce_sum`), per-layer solves are split between ranks by cost (`owners`) and
their results broadcast from the rank that solved them (`broadcast`). Rank 0 alone writes the artifact. With one
process every function here is a no-op (`head` takes the first n windows), so the single-process path is the
code that always ran.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

# A collective that waits longer than this for a rank (a rank that died, or hangs) fails on every rank instead of
# hanging: a run on several processes ends within a bounded time. Generous: a rank may be solving a large layer.
TIMEOUT_S = int(os.environ.get("COMPRESSOR_DIST_TIMEOUT", "1800"))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place: World(0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def requested() -> int:
    """The world size torchrun's environment asks for (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init(device: str = "auto") -> World:
    """Join the process group torchrun's environment describes (nothing to do with one process or when joined
    already): nccl when the run computes on CUDA, else gloo; a CUDA rank takes the GPU LOCAL_RANK names."""
    if requested() <= 1 or dist.is_initialized():
        return world()
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=TIMEOUT_S))
    return world()


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(n: int, fn: Callable[..., Any], args: tuple = ()) -> None:
    """Run fn(*args) on n local ranks (torch.multiprocessing, gloo, each rank one n-th of the CPU threads) and wait
    for them. A rank that fails ends the others (torch.multiprocessing terminates them) and raises here: the
    ProcessExitedException carries its exit code."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_rank_main, args=(n, port, fn, args), nprocs=n, join=True)


def _rank_main(rank: int, n: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    threads = max(1, (os.cpu_count() or 1) // n)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    fn(*args)


def shard(windows: Tensor, w: World | None = None) -> Tensor:
    """This rank's calibration windows: r, r + W, r + 2W, ... of all of them."""
    w = w or world()
    return windows if w.size == 1 else windows[w.rank :: w.size]


def head(windows: Tensor, n: int, w: World | None = None) -> Tensor:
    """This rank's part of the first `n` calibration windows of the whole set (`windows`: this rank's shard): the
    windows r, r + W, ... below n. Over the ranks together they are the first n windows, as one process takes them
    (a plan's curve or fitness windows); a rank may get none when n < W."""
    w = w or world()
    return windows[: len(range(w.rank, n, w.size))]


def unshard(windows: Tensor) -> Tensor:
    """Every rank's shard put back together, in the order one process has the windows (for what is keyed by the
    whole calibration set, such as a database's identity)."""
    w = world()
    if w.size == 1:
        return windows
    parts: list[Any] = [None] * w.size
    dist.all_gather_object(parts, windows.cpu())
    out = torch.empty((sum(len(p) for p in parts), *windows.shape[1:]), dtype=windows.dtype)
    for r, part in enumerate(parts):
        out[r :: w.size] = part
    return out.to(windows.device)


def all_reduce_sum(t: Tensor) -> Tensor:
    """t summed over the ranks, in place (and returned); t itself with one process."""
    if world().size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_floats(values: list[float]) -> list[float]:
    """Numbers (a loss's sum and its count, a distortion's) summed over the ranks, in float64."""
    if world().size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sum_ints(values: list[int]) -> list[int]:
    """Integers (token counts) summed over the ranks."""
    return [int(round(v)) for v in sum_floats([float(v) for v in values])]


def owners(costs: list[float], size: int | None = None) -> list[int]:
    """The rank that solves each item: longest-processing-time-first bin packing of `costs` over the ranks (each
    item to the least loaded rank so far, the largest first; ties to the lower rank, so every rank computes the
    same assignment)."""
    size = size or world().size
    load = [0.0] * size
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def broadcast(obj: Any, src: int, device: torch.device | str = "cpu") -> Any:
    """`obj` as rank `src` has it, on every rank, its tensors (inside dataclasses, dicts, lists, tuples too) on
    `device` (they travel pickled, on the CPU)."""
    if world().size == 1:
        return obj
    box = [moved(obj, torch.device("cpu")) if world().rank == src else None]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return moved(box[0], torch.device(device))


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable, no tensors needed), as a list by rank on rank 0; None elsewhere."""
    if world().size == 1:
        return [obj]
    out = [None] * world().size if world().main else None
    dist.gather_object(obj, out, dst=0)
    return out


def moved(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it on `device` (dataclass fields, dict values, list and tuple items)."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: moved(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved(v, device) for v in obj)
    return obj


def collective_device() -> torch.device:
    """Where a collective's own tensors live: the rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
