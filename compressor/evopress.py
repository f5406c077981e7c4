"""EvoPress (Sieberling et al. 2024, "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary
Search"): per-layer compression levels under a global budget, found by a (1 + lambda) evolution.

- `LevelSpace`: every target layer has the same ordered levels (bits 2..6, ...), equally spaced, and layers
  are grouped by size; a *level switch* raises one layer of a group one level and lowers another of the same
  group one level, so the budget (total bits over all weights) is preserved exactly.
- `initial_state`: the uniform assignment nearest the target (a non-integer target, e.g. 2.5 bits, mixes the two
  neighbouring levels inside every size group), `mutate`: min(U{1,3}, U{1,3}) switches.
- `evolve`: each generation draws `offspring` distinct mutants of the parent, then selects in stages: each stage
  scores the survivors on a fresh random minibatch (more tokens each stage) and keeps the best few; the parent
  competes in the last stage. The fitness is any callable (state, stage, rng) -> float, lower is better. With a
  checkpoint file an interrupted search goes on from its last generation.
- `Database`: every layer's compressed variant at every level (dequantized, float16), on disk under one
  directory (one safetensors file per layer), built block by block and reused across searches when the model,
  candidate pass, settings and calibration are the same.
- `KLFitness`: KL(dense || compressed) of the next-token distributions on calibration windows, the dense
  side's top-k probabilities computed once (the rest of the vocabulary lumped into one bucket, so the value is
  the KL of the coarsened distributions, a lower bound of the full one). Its forwards may run in bfloat16
  (autocast, both sides), as the paper's GPU searches do: on this project's CPU (AVX-512 BF16) that is 2.7x the
  float32 speed, and the two rank a generation's offspring alike (bench/fitness_dtype.py measures it). With
  metric "perplexity" the fitness is instead the compressed model's mean next-token NLL (log-perplexity).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import BadInput
from .files import write_atomic

State = tuple[int, ...]


@dataclass(frozen=True)
class LevelSpace:
    layers: tuple[str, ...]
    sizes: tuple[int, ...]  # weights per layer
    values: tuple[float, ...]  # the level values (bits, ...), increasing, equally spaced

    def __post_init__(self) -> None:
        v = self.values
        if len(v) < 2 or any(b <= a for a, b in zip(v, v[1:])):
            raise BadInput(f"levels must be at least two increasing values, got {list(v)}")
        step = v[1] - v[0]
        if any(abs((b - a) - step) > 1e-9 for a, b in zip(v, v[1:])):
            raise BadInput(f"levels must be equally spaced (a level switch then keeps the budget exactly), got {list(v)}")

    @property
    def groups(self) -> list[list[int]]:
        """Layer indices by size: a switch stays inside one group."""
        by: dict[int, list[int]] = {}
        for i, n in enumerate(self.sizes):
            by.setdefault(n, []).append(i)
        return list(by.values())

    def average(self, state: State) -> float:
        """The weighted mean level value (average bits per weight)."""
        return sum(self.values[k] * n for k, n in zip(state, self.sizes)) / sum(self.sizes)


def initial_state(space: LevelSpace, target: float) -> State:
    """Every size group at the target: its layers at the two levels around it, in the proportion that gives the
    target (rounded to whole layers; exact when the group's size allows it)."""
    v = space.values
    if not v[0] <= target <= v[-1]:
        raise BadInput(f"target {target} is outside the levels {v[0]}..{v[-1]}")
    lo = max(i for i, x in enumerate(v) if x <= target + 1e-12)
    state = [lo] * len(space.layers)
    if v[lo] < target - 1e-12:
        frac = (target - v[lo]) / (v[lo + 1] - v[lo])
        for group in space.groups:
            for i in group[: round(frac * len(group))]:
                state[i] = lo + 1
    return tuple(state)


def mutate(space: LevelSpace, state: State, rng: torch.Generator) -> State:
    """min(U{1,3}, U{1,3}) level switches, each within one size group (one layer up a level, another down)."""
    n_switch = min(int(torch.randint(1, 4, (1,), generator=rng)), int(torch.randint(1, 4, (1,), generator=rng)))
    s = list(state)
    top = len(space.values) - 1
    groups = [g for g in space.groups if len(g) > 1]
    if not groups:
        raise BadInput("no two target layers have the same size: a level switch cannot keep the budget")
    for _ in range(n_switch):
        for _try in range(100):
            g = groups[int(torch.randint(len(groups), (1,), generator=rng))]
            ups = [i for i in g if s[i] < top]
            downs = [i for i in g if s[i] > 0]
            if not ups or not downs:
                continue
            up = ups[int(torch.randint(len(ups), (1,), generator=rng))]
            downs = [i for i in downs if i != up]
            if not downs:
                continue
            down = downs[int(torch.randint(len(downs), (1,), generator=rng))]
            s[up] += 1
            s[down] -= 1
            break
    return tuple(s)


def draw_offspring(space: LevelSpace, parent: State, n: int, rng: torch.Generator) -> list[State]:
    """Up to `n` distinct mutants of `parent`, none equal to it (duplicates rejected; at most 50 n draws)."""
    kids: list[State] = []
    for _ in range(50 * n):
        if len(kids) == n:
            break
        k = mutate(space, parent, rng)
        if k != parent and k not in kids:
            kids.append(k)
    return kids


@dataclass
class Trace:
    generations: list[dict] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return self.generations


def evolve(space: LevelSpace, fitness: Callable[[State, int, torch.Generator], float], start: State,
           generations: int, offspring: int, survivors: list[int], seed: int = 0,
           on_generation: Callable[[dict], None] = lambda info: None,
           checkpoint: Path | None = None) -> tuple[State, Trace]:
    """(1 + lambda) evolution with multi-step selection (see the module docstring). `survivors[j]`: how many of
    stage j's candidates go on (the last must be 1); stage j's fitness is fitness(state, j, rng).

    `checkpoint`: a JSON file written after every generation (parent, trace, random state). A search that finds
    one from the same start and seed, at most `generations` in, goes on from there and ends where the
    uninterrupted search would (the fitness must be a function of state, stage and rng alone); the caller keys
    the file by everything else that the search depends on. More generations than the file holds extend it."""
    if not survivors or survivors[-1] != 1 or any(b > a for a, b in zip(survivors, survivors[1:])) or survivors[0] > offspring:
        raise BadInput(f"survivors per stage must decrease to 1 and start at most at offspring ({offspring}): {survivors}")
    rng = torch.Generator().manual_seed(seed)
    parent = start
    trace = Trace()
    best_fit = None
    if checkpoint is not None and checkpoint.is_file():
        ck = json.loads(checkpoint.read_text())
        if ck.get("start") == list(start) and ck.get("seed") == seed and len(ck["trace"]) <= generations:
            parent, best_fit, trace.generations = tuple(ck["parent"]), ck["fitness"], ck["trace"]
            rng.set_state(torch.tensor(ck["rng"], dtype=torch.uint8))
    t0 = time.perf_counter() - (trace.generations[-1]["seconds"] if trace.generations else 0.0)
    for gen in range(len(trace.generations), generations):
        cands = draw_offspring(space, parent, offspring, rng)
        for j, keep in enumerate(survivors):
            last = j == len(survivors) - 1
            pool = cands + ([parent] if last else [])
            stage_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))  # one fresh minibatch per stage
            scores = [fitness(c, j, torch.Generator().manual_seed(stage_seed)) for c in pool]
            order = sorted(range(len(pool)), key=lambda i: scores[i])
            if last:
                parent, best_fit = pool[order[0]], scores[order[0]]
            else:
                cands = [pool[i] for i in order[:keep]]
        info = {"generation": gen + 1, "fitness": best_fit, "average": space.average(parent),
                "seconds": round(time.perf_counter() - t0, 2)}
        trace.generations.append(info)
        if checkpoint is not None:
            state = {"start": list(start), "seed": seed, "parent": list(parent), "fitness": best_fit,
                     "rng": rng.get_state().tolist(), "trace": trace.generations}
            write_atomic(checkpoint, lambda p: p.write_text(json.dumps(state)))
        on_generation(info)
    return parent, trace


# ------------------------------------------------------------------------------------------------- database

def database_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Database:
    """Compressed variants of every layer at every level, one safetensors file per layer under `root`
    (tensor "level{k}", float16, the dequantized weight; the key in its metadata), and meta.json (the key, levels,
    layers), written last. A build that stopped part way resumes: a block whose layers' files all carry the key is
    kept (only its FP forward runs again)."""

    def __init__(self, root: Path, key: str, space: LevelSpace):
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


# ------------------------------------------------------------------------------------------------- fitness

class KLFitness:
    """KL(dense || compressed) of the next-token distributions over random windows from a pool, the dense side's
    top-k log-probabilities (and the mass outside them) computed once per window."""

    def __init__(self, model: nn.Module, windows: Tensor, layers: Iterable[str], variants: dict[str, list[Tensor]],
                 stage_windows: list[int], topk: int = 256, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32, metric: str = "kl"):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise BadInput(f"KL fitness dtype must be float32, bfloat16 or float16, got {dtype}")
        if metric not in ("kl", "perplexity"):
            raise BadInput(f"fitness metric must be 'kl' or 'perplexity', got {metric!r}")
        self.model, self.windows, self.device, self.dtype, self.metric = model, windows, device, dtype, metric
        self.layers = list(layers)
        self.variants = variants
        self.stage_windows = stage_windows
        self.topk = topk
        self.dense: list[tuple[Tensor, Tensor, Tensor]] = []  # per window: top-k ids, their log p, log of the rest
        with torch.no_grad(), self._compute():
            for w in windows if metric == "kl" else ():  # perplexity needs no dense side
                lp = self._log_probs(w)
                top, ids = lp.topk(min(topk, lp.shape[-1]), dim=-1)
                rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
                self.dense.append((ids, top, rest))
        self.calls = 0

    def _compute(self):
        """The forwards' compute type: autocast below float32. One context spans all windows of a state, so
        autocast's cast cache (weights that require grad) casts each weight once per state, not once per window
        (16 windows of 128 tokens on the demo, one thread: 7.1 s -> 5.9 s, the same logits). `set_state` swaps
        `weight.data` under the cached casts, so it must run outside the context."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _log_probs(self, w: Tensor) -> Tensor:
        """Next-token log-probabilities (T - 1, V) in float32 (inside `_compute()`)."""
        out = self.model(input_ids=w.unsqueeze(0).to(self.device), attention_mask=torch.ones(1, w.numel(), dtype=torch.long,
                                                                                             device=self.device), use_cache=False)
        return torch.log_softmax(out.logits[0, :-1].float(), -1)

    def set_state(self, state: State) -> None:
        for name, k in zip(self.layers, state):
            lin = self.model.get_submodule(name)
            lin.weight.data = self.variants[name][k].to(lin.weight.device, torch.float32)

    @torch.no_grad()
    def kl(self, state: State, window_ids: list[int]) -> float:
        self.set_state(state)
        total, count = 0.0, 0
        with self._compute():
            for i in window_ids:
                lq = self._log_probs(self.windows[i])
                if self.metric == "perplexity":  # the mean next-token NLL: log-perplexity, ordered as perplexity
                    nll = -lq.gather(-1, self.windows[i][1:].to(lq.device).unsqueeze(-1))
                    total += float(nll.sum())
                    count += nll.numel()
                    continue
                ids, lp, rest_p = self.dense[i]
                lq_top = lq.gather(-1, ids)
                rest_q = torch.log1p(-lq_top.exp().sum(-1).clamp(max=1 - 1e-7))
                kl = (lp.exp() * (lp - lq_top)).sum(-1) + rest_p.exp() * (rest_p - rest_q)
                total += float(kl.sum())
                count += kl.numel()
        self.calls += 1
        return total / max(count, 1)

    def __call__(self, state: State, stage: int, rng: torch.Generator) -> float:
        n = min(self.stage_windows[stage], len(self.windows))
        ids = torch.randperm(len(self.windows), generator=rng)[:n].tolist()
        return self.kl(state, ids)


def dp_levels(space: LevelSpace, errors: dict[str, list[float]], target: float, units: int | None = None) -> State:
    """The DP baseline: one level per layer with the least summed per-layer error whose total bits fit the
    target average (compressor.allocate; per-layer errors assumed additive). With integer level values the
    budget step defaults to the greatest common divisor of the costs, which makes the DP exact (no rounding up
    of costs, so an allocation that uses the whole budget stays feasible)."""
    from functools import reduce

    from .allocate import allocate

    costs = [[v * n for v in space.values] for n in space.sizes]
    errs = [errors[name] for name in space.layers]
    budget = target * sum(space.sizes)
    if units is None:
        units = 10000
        if all(float(c).is_integer() for row in costs for c in row) and float(budget).is_integer():
            step = reduce(math.gcd, [int(c) for row in costs for c in row if c] + [int(budget)])
            if budget / step <= 200000:
                units = int(budget // step)
    return tuple(allocate(costs, errs, budget, units))


# ------------------------------------------------------------------------------------------------- depth

@torch.no_grad()
def subblock_influence(model: nn.Module, blocks: list[nn.Module], windows: Tensor, parts: tuple[str, ...] = ("self_attn", "mlp"),
                       device: torch.device = torch.device("cpu")) -> dict[tuple[int, str], float]:
    """ShortGPT-style block influence of every residual sub-block (Men et al. 2024): 1 - the mean cosine similarity
    between the residual stream before and after it, over the tokens of `windows` on the FP model. A sub-block
    whose output barely turns the stream is the cheapest to drop. Llama-style blocks only: h_mid = h + attn(.),
    h_out = h_mid + mlp(.), with `parts` the two children's names. Returns {(block index, part): influence}."""
    sums: dict[tuple[int, str], float] = {}
    count = 0
    state: dict[int, dict[str, Tensor]] = {}
    handles = []

    def cos_sum(a: Tensor, b: Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).sum())

    for i, block in enumerate(blocks):
        def pre(_m, args, kwargs, i=i):
            state[i] = {"h": args[0] if args else kwargs["hidden_states"]}

        def attn_out(_m, _args, out, i=i):
            state[i]["a"] = out[0] if isinstance(out, (tuple, list)) else out

        def block_out(_m, _args, out, i=i):
            h, a = state[i]["h"], state[i]["a"]
            mid = h + a
            y = out[0] if isinstance(out, (tuple, list)) else out
            sums[(i, parts[0])] = sums.get((i, parts[0]), 0.0) + cos_sum(h, mid)
            sums[(i, parts[1])] = sums.get((i, parts[1]), 0.0) + cos_sum(mid, y)

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    block.get_submodule(parts[0]).register_forward_hook(attn_out),
                    block.register_forward_hook(block_out)]
    try:
        for w in windows:
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
            count += w.numel()
    finally:
        for h in handles:
            h.remove()
    return {k: 1.0 - v / count for k, v in sums.items()}


def lowest(scores: dict, n: int) -> list:
    """The `n` keys of the lowest scores (ties by key order)."""
    return [k for k, _ in sorted(scores.items(), key=lambda kv: (kv[1], str(kv[0])))[:n]]
