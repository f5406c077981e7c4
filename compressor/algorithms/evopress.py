"""EvoPress (Sieberling et al. 2024, "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary
Search"): per-layer compression levels under a global budget, found by a (1 + lambda) evolution.

- `LevelSpace`: every target layer has the same ordered levels (bits 2..6, ...), equally spaced, and layers
  are grouped by size; a *level switch* raises one layer of a group one level and lowers another of the same
  group one level, so the budget (total bits over all weights) is preserved exactly.
- `initial_state`: the uniform assignment nearest the target (a non-integer target, e.g. 2.5 bits, mixes the two
  neighbouring levels inside every size group), `mutate`: min(U{1,3}, U{1,3}) switches.
- `evolve`: each generation draws `offspring` distinct mutants of the parent, then selects in stages: each stage
  scores the survivors on a fresh random minibatch (more tokens each stage) and keeps the best few; the parent
  competes in the last stage. The fitness is any callable (state, stage, rng) -> float, lower is better (on a
  model: compressor.measure.KLFitness). With a stored checkpoint an interrupted search goes on from its last
  generation.
- `dp_levels`: the DP baseline (per-layer errors assumed additive); `lowest`: the depth space's cosine choice.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import reduce
from typing import Callable

import torch

from ..errors import BadInput
from .allocate import allocate

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
           resume: dict | None = None, on_checkpoint: Callable[[dict], None] | None = None) -> tuple[State, Trace]:
    """(1 + lambda) evolution with multi-step selection (see the module docstring). `survivors[j]`: how many of
    stage j's candidates go on (the last must be 1); stage j's fitness is fitness(state, j, rng).

    `on_checkpoint(state)`: called after every generation with the search's state (parent, trace, random state;
    JSON-ready). Given that state back as `resume`, a search from the same start and seed, at most `generations`
    in, goes on from there and ends where the uninterrupted search would (the fitness must be a function of
    state, stage and rng alone); the caller keys the stored state by everything else that the search depends on.
    More generations than the state holds extend it."""
    if not survivors or survivors[-1] != 1 or any(b > a for a, b in zip(survivors, survivors[1:])) or survivors[0] > offspring:
        raise BadInput(f"survivors per stage must decrease to 1 and start at most at offspring ({offspring}): {survivors}")
    rng = torch.Generator().manual_seed(seed)
    parent = start
    trace = Trace()
    best_fit = None
    ck = resume
    if ck is not None and ck.get("start") == list(start) and ck.get("seed") == seed and len(ck["trace"]) <= generations:
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
        if on_checkpoint is not None:
            on_checkpoint({"start": list(start), "seed": seed, "parent": list(parent), "fitness": best_fit,
                           "rng": rng.get_state().tolist(), "trace": trace.generations})
        on_generation(info)
    return parent, trace


def dp_levels(space: LevelSpace, errors: dict[str, list[float]], target: float, units: int | None = None) -> State:
    """The DP baseline: one level per layer with the least summed per-layer error whose total bits fit the
    target average (algorithms.allocate; per-layer errors assumed additive). With integer level values the
    budget step defaults to the greatest common divisor of the costs, which makes the DP exact (no rounding up
    of costs, so an allocation that uses the whole budget stays feasible)."""
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


def lowest(scores: dict, n: int) -> list:
    """The `n` keys of the lowest scores (ties by key order)."""
    return [k for k, _ in sorted(scores.items(), key=lambda kv: (kv[1], str(kv[0])))[:n]]
