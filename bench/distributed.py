"""Data-parallel calibration (issue 26): the demo model (SmolLM2-135M, 30 blocks) compressed by one process and by
two gloo ranks (`--workers 2`), one torch thread per rank, side by side, alternating per recipe, on --samples windows
of --seq-len tokens of the embedded corpus (seed 0): w4-rtn (every block); test-sized w4-gptq and w4-flexround
(--iters steps per block) on the first --blocks blocks; evo-w3avg (RTN candidate, --generations generations of 4
offspring); prune50-dp (curves of 10 levels); lowrank-util; w3-requant on an RTN base. Per run: wall time, peak RSS
per rank; per pair: whether every artifact file is byte-identical, the fraction of equal 4-bit codes (or, for mixed
or unquantized artifacts, of equal stored numbers), held-out perplexity of each (persuasion.txt, the first
--eval-tokens tokens, windows of 512, no BOS as the tokenizer adds none) and its relative delta.

Then the projection to W devices: one in-process run of the GPTQ recipe (1 thread) timed in parts, the per-window work
(block forwards, Hessian products: split 1/W), the per-layer solves (each sibling group's solves bin-packed over W
ranks as dist.owners does: the group's makespan), and the rest (set-up, model load, planning, writing: paid once);
its W = 2 prediction is set beside the measured 2-rank speed-up.

    python bench/distributed.py [--samples 16] [--seq-len 256] [--iters 10] [--blocks 8] [--generations 5]
                                [--only w4-gptq,evo-w3avg] [--work /tmp/dist]

Results: bench/results/distributed.{json,md} (with --only, the rows of the other recipes are kept from the file).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself off the path: bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
from tiny_models import code_agreement  # noqa: E402
RESULTS = ROOT / "bench" / "results"
PERSUASION = ROOT.parent / "shared" / "data" / "austen" / "persuasion.txt"


def cli(*args: str) -> tuple[dict, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank (--workers gives each rank cores // 2 = 1)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "compressor.cli", *args, "--json"], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"compress {' '.join(args)}: exit {r.returncode}: {r.stderr[-2000:]}")
    return json.loads(r.stdout), wall


def identical(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def stored_agreement(a: Path, b: Path) -> float:
    """The fraction of equal stored numbers over every tensor of two artifacts' model.safetensors (packed codes
    count per int32 word, so this is the stricter measure for them)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    same = total = 0
    for k, v in ta.items():
        w = tb.get(k)
        same += int((v == w).sum()) if w is not None and w.shape == v.shape else 0
        total += v.numel()
    return same / total


def sized_recipe(work: Path, name: str, changes: dict[str, str], tag: str) -> Path:
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    for a, b in changes.items():
        assert a in text, (name, a)
        text = text.replace(a, b)
    p = work / f"{name}-{tag}.yaml"
    p.write_text(text)
    return p


def recipes(args) -> dict[str, tuple[str, bool]]:
    """label -> (recipe name or path, whether its codes are uniform 4-bit ones)."""
    blocks = "|".join(str(i) for i in range(args.blocks))
    targets = f"    targets: ['re:model\\.layers\\.({blocks})\\..*']\n"  # the first --blocks blocks
    w = args.work
    gptq = sized_recipe(w, "w4-gptq", {"  - pass: gptq\n": "  - pass: gptq\n" + targets}, f"{args.blocks}blocks")
    fr = sized_recipe(w, "w4-flexround", {"  - pass: flexround\n": "  - pass: flexround\n" + targets,
                                          "iters: 200": f"iters: {args.iters}"}, f"{args.blocks}blocks")
    evo = sized_recipe(w, "evo-w3avg", {"generations: 50": f"generations: {args.generations}",
                                        "offspring: 16": "offspring: 4", "survivors: [4, 1]": "survivors: [2, 1]",
                                        "stage_windows: [4, 16]": "stage_windows: [2, 8]",
                                        "fitness_samples: 32": "fitness_samples: 8",
                                        # its own database: the 2-rank run builds one too, not reuses the first's
                                        "fitness_dtype: bfloat16": "fitness_dtype: float32\n    database: DB"},
                       f"{args.generations}gen")
    prune = sized_recipe(w, "prune50-dp", {"levels: 19": "levels: 10"}, "10levels")
    requant = sized_recipe(w, "w3-requant", {"base: flexround": "base: rtn",
                                             "    base_options: {iters: 200, lr: 1.0e-2}\n": "",
                                             "pqi_samples: 8": "pqi_samples: 4", "intervals: 8": "intervals: 4"},
                           "rtn")
    return {"w4-rtn": ("w4-rtn", True), f"w4-gptq ({args.blocks} blocks)": (str(gptq), True),
            f"w4-flexround ({args.blocks} blocks, {args.iters} steps)": (str(fr), True),
            f"evo-w3avg (rtn, {args.generations} generations)": (str(evo), False),
            "prune50-dp (10 levels)": (str(prune), False), "lowrank-util": ("lowrank-util", False),
            "w3-requant (rtn base, pqi 4x4)": (str(requant), False)}


def pair(args, label: str, recipe: str, four_bit: bool) -> dict:
    row = {"recipe": label}
    key = label.split()[0]
    for w in (1, 2):
        out = args.work / f"{key}-w{w}"
        rec = recipe
        if recipe.endswith(".yaml") and "database: DB" in Path(recipe).read_text():
            db = args.work / f"{key}-db{w}"
            shutil.rmtree(db, ignore_errors=True)
            rec = str(args.work / f"{key}-w{w}.yaml")
            Path(rec).write_text(Path(recipe).read_text().replace("database: DB", f"database: {db}"))
        s, wall = cli("model", "demo", "--recipe", rec, "--samples", str(args.samples), "--seq-len",
                      str(args.seq_len), "--out", str(out), "--force", "--workers", str(w))
        e, _ = cli("eval", str(out), "--data", str(PERSUASION), "--max-tokens", str(args.eval_tokens))
        row[f"w{w}"] = {"wall_s": round(wall, 1), "seconds": s["seconds"],
                        "peak_rss_bytes": [r["peak_memory_bytes"] for r in s.get("ranks", [s])],
                        "perplexity": e["perplexity"], "mean_block_output_rel_mse": s.get("mean_block_output_rel_mse")}
        print(label, w, json.dumps(row[f"w{w}"]), flush=True)
    a, b = args.work / f"{key}-w1", args.work / f"{key}-w2"
    row.update(identical=identical(a, b),
               agreement=round(code_agreement(a, b) if four_bit else stored_agreement(a, b), 6),
               agreement_of="4-bit codes" if four_bit else "stored numbers",
               perplexity_delta=round(row["w2"]["perplexity"] / row["w1"]["perplexity"] - 1, 6),
               speedup=round(row["w1"]["wall_s"] / row["w2"]["wall_s"], 3))
    print(json.dumps(row), flush=True)
    return row


def lpt_makespan(costs: list[float], w: int) -> float:
    """The longest rank's load when `costs` are bin-packed over w ranks as dist.owners does."""
    from compressor.dist import owners

    load = [0.0] * w
    for c, r in zip(costs, owners(costs, w)):
        load[r] += c
    return max(load)


def profile_gptq(args, recipe: str, samples: int) -> dict:
    """One in-process run of the GPTQ recipe on one thread on `samples` windows, timed in parts (see the module
    docstring)."""
    import torch

    import compressor
    from compressor import api, blocks
    from compressor.passes import gptq as G

    torch.set_num_threads(1)
    groups: list[list[float]] = []
    spans = {"moments": 0.0, "run_blocks": 0.0}

    def timed(fn, key=None, group=False):
        def wrapper(*a, **k):
            if group:
                groups.append([])
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                if key is None:
                    groups[-1].append(dt)
                else:
                    spans[key] += dt
        return wrapper

    saved = (G.gptq_quantize, blocks.BlockIO.input_second_moments, api.run_blocks)
    G.gptq_quantize = timed(G.gptq_quantize)
    blocks.BlockIO.input_second_moments = timed(blocks.BlockIO.input_second_moments, "moments", group=True)
    api.run_blocks = timed(api.run_blocks, "run_blocks")  # (the name api calls)
    try:
        t0 = time.perf_counter()
        compressor.compress("demo", recipe, args.work / "profile", samples=samples, seq_len=args.seq_len,
                            device="cpu", force=True)
        total = time.perf_counter() - t0
    finally:
        G.gptq_quantize, blocks.BlockIO.input_second_moments, api.run_blocks = saved
    solve = sum(sum(g) for g in groups)
    window = spans["run_blocks"] - solve
    fixed = total - spans["run_blocks"]
    proj = {}
    for w in (1, 2, 4, 8):
        t = fixed + window / w + sum(lpt_makespan(g, w) for g in groups)
        proj[w] = {"seconds": round(t, 2), "speedup": round((fixed + window + solve) / t, 3)}
    return {"samples": samples, "seq_len": args.seq_len, "total_s": round(total, 2), "fixed_s": round(fixed, 2), "per_window_s": round(window, 2),
            "hessian_s": round(spans["moments"], 2), "per_layer_solve_s": round(solve, 2),
            "groups": len(groups), "largest_group_solve_s": round(max(max(g) for g in groups), 3),
            "projection": proj}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=8, help="gptq and flexround compress the first this many blocks")
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--only", default="", help="comma-separated recipe names (the label's first word)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    only = {x for x in args.only.split(",") if x}
    old = json.loads((RESULTS / "distributed.json").read_text()) if only and (RESULTS / "distributed.json").is_file() else {}
    kept = {r["recipe"]: r for r in old.get("rows", [])}
    rows = []
    for label, (recipe, four_bit) in recipes(args).items():
        if only and label.split()[0] not in only:
            if label in kept:
                rows.append(kept[label])
            continue
        rows.append(pair(args, label, recipe, four_bit))
    profile = old.get("gptq_profile")
    if not only or "w4-gptq" in only:
        blocks = "|".join(str(i) for i in range(args.blocks))
        flat = sized_recipe(args.work, "w4-gptq", {"  - pass: gptq\n": "  - pass: gptq\n    targets: "
                                                   f"['re:model\\.layers\\.({blocks})\\..*']\n"
                                                   "    true_sequential: false\n"}, f"{args.blocks}blocks-flat")
        seq = recipes(args)[f"w4-gptq ({args.blocks} blocks)"][0]
        profile = {f"{kind}, {n} windows": profile_gptq(args, rec, n) for n in (args.samples, 4 * args.samples)
                   for kind, rec in (("true_sequential", seq), ("one group per block", str(flat)))}
        print(json.dumps(profile), flush=True)
    setup = {"model": "demo (SmolLM2-135M-Instruct)", "blocks": args.blocks, "iters": args.iters,
             "generations": args.generations, "samples": args.samples, "seq_len": args.seq_len, "seed": 0,
             "calibration": "embedded corpus", "eval": f"persuasion.txt, first {args.eval_tokens} tokens, windows of 512",
             "threads_per_rank": 1, "backend": "gloo", "cpus": os.cpu_count(), "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps({"setup": setup, "rows": rows, "gptq_profile": profile},
                                                         indent=1) + "\n")
    lines = ["# Data-parallel calibration: 1 process vs 2 gloo ranks", "",
             f"`python bench/distributed.py --samples {args.samples} --seq-len {args.seq_len} --iters {args.iters} "
             f"--blocks {args.blocks} --generations {args.generations}`; "
             "setup in its docstring and distributed.json. One thread per rank, so 2 ranks use both cores and 1 "
             "process one; wall time includes each process's start-up and model load.", "",
             "| recipe | identical files | equal | ppl 1 rank | ppl 2 ranks | delta | wall 1 | wall 2 | speed-up "
             "| peak RSS 1 | peak RSS 2 (per rank) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    mb = lambda xs: " / ".join(f"{x / 2**20:.0f} MB" for x in xs)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['recipe']} | {'yes' if r['identical'] else 'no'} | {r['agreement']:.4%} of "
                     f"{r['agreement_of']} | {r['w1']['perplexity']:.3f} | {r['w2']['perplexity']:.3f} | "
                     f"{r['perplexity_delta']:+.3%} | {r['w1']['wall_s']} s | {r['w2']['wall_s']} s | {r['speedup']}x | "
                     f"{mb(r['w1']['peak_rss_bytes'])} | {mb(r['w2']['peak_rss_bytes'])} |")
    for kind, p in (profile or {}).items():
        what = ("true_sequential (the default: q/k/v, o, gate/up, down solved in turn, each group's Hessians taken "
                "after the earlier groups are quantized)" if kind.startswith("true_sequential") else
                "true_sequential: false (one Hessian pass per block, its 7 solves together, as llm-compressor does)")
        lines += ["", f"## GPTQ ({args.blocks} blocks, {p['samples']} x {p['seq_len']} tokens), {what}, on W devices "
                  "from its parts", "",
                  f"One process, one thread, in-process: {p['total_s']} s = {p['fixed_s']} s set-up, load, planning "
                  f"and writing (once) + {p['per_window_s']} s per-window work (block forwards and Hessian products, "
                  f"{p['hessian_s']} s of them; split 1/W) + {p['per_layer_solve_s']} s of per-layer solves in "
                  f"{p['groups']} groups (each group's solves bin-packed over the ranks; the largest single "
                  f"solve {p['largest_group_solve_s']} s).", "",
                  "| W | predicted s | predicted speed-up |", "|---|---|---|"]
        lines += [f"| {w} | {v['seconds']} | {v['speedup']}x |" for w, v in p["projection"].items()]
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
