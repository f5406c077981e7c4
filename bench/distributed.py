"""Data-parallel calibration (issue 26): the demo model (SmolLM2-135M, 30 blocks) compressed by one process and by
two gloo ranks (`--workers 2`), one torch thread per rank, side by side, alternating per recipe: w4-rtn (every
block), and test-sized w4-gptq and w4-flexround (--iters steps per block) on the first --blocks blocks, on --samples windows of --seq-len tokens of the embedded corpus
(seed 0). Per run: wall time, peak RSS per rank; per pair: whether every artifact file is byte-identical, the
fraction of equal 4-bit codes, held-out perplexity of each (persuasion.txt, the first --eval-tokens tokens, windows
of 512, no BOS as the tokenizer adds none) and its relative delta.

    python bench/distributed.py [--samples 16] [--seq-len 256] [--iters 10] [--blocks 8] [--work /tmp/dist]

Results: bench/results/distributed.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=8, help="gptq and flexround compress the first this many blocks")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    blocks = "|".join(str(i) for i in range(args.blocks))
    targets = f"    targets: ['re:model\\.layers\\.({blocks})\\..*']\n"  # the first --blocks blocks

    def sized(name: str, changes: dict[str, str]) -> Path:
        text = (ROOT / "recipes" / f"{name}.yaml").read_text()
        for a, b in changes.items():
            assert a in text, (name, a)
            text = text.replace(a, b)
        p = args.work / f"{name}-{args.blocks}blocks.yaml"
        p.write_text(text)
        return p

    gptq = sized("w4-gptq", {"  - pass: gptq\n": "  - pass: gptq\n" + targets})
    fr = sized("w4-flexround", {"  - pass: flexround\n": "  - pass: flexround\n" + targets,
                                "iters: 200": f"iters: {args.iters}"})
    recipes = {"w4-rtn": "w4-rtn", f"w4-gptq ({args.blocks} blocks)": str(gptq),
               f"w4-flexround ({args.blocks} blocks, {args.iters} steps)": str(fr)}
    rows = []
    for label, recipe in recipes.items():
        row = {"recipe": label}
        for w in (1, 2):
            out = args.work / f"{label.split()[0]}-w{w}"
            s, wall = cli("model", "demo", "--recipe", recipe, "--samples", str(args.samples), "--seq-len",
                          str(args.seq_len), "--out", str(out), "--force", "--workers", str(w))
            e, _ = cli("eval", str(out), "--data", str(PERSUASION), "--max-tokens", str(args.eval_tokens))
            row[f"w{w}"] = {"wall_s": round(wall, 1), "seconds": s["seconds"],
                            "peak_rss_bytes": [r["peak_memory_bytes"] for r in s.get("ranks", [s])],
                            "perplexity": e["perplexity"], "mean_block_output_rel_mse": s["mean_block_output_rel_mse"]}
            print(label, w, json.dumps(row[f"w{w}"]), flush=True)
        a, b = args.work / f"{label.split()[0]}-w1", args.work / f"{label.split()[0]}-w2"
        row.update(identical=identical(a, b), code_agreement=round(code_agreement(a, b), 6),
                   perplexity_delta=round(row["w2"]["perplexity"] / row["w1"]["perplexity"] - 1, 6),
                   speedup=round(row["w1"]["wall_s"] / row["w2"]["wall_s"], 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    setup = {"model": "demo (SmolLM2-135M-Instruct)", "blocks": args.blocks, "iters": args.iters, "samples": args.samples, "seq_len": args.seq_len, "seed": 0,
             "calibration": "embedded corpus", "eval": f"persuasion.txt, first {args.eval_tokens} tokens, windows of 512",
             "threads_per_rank": 1, "backend": "gloo", "cpus": os.cpu_count(), "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    lines = ["# Data-parallel calibration: 1 process vs 2 gloo ranks", "",
             f"`python bench/distributed.py --samples {args.samples} --seq-len {args.seq_len} --iters {args.iters} "
             f"--blocks {args.blocks}`; "
             "setup in its docstring and distributed.json. One thread per rank, so 2 ranks use both cores and 1 "
             "process one; wall time includes each process's start-up and model load.", "",
             "| recipe | identical files | equal codes | ppl 1 rank | ppl 2 ranks | delta | wall 1 | wall 2 | speed-up "
             "| peak RSS 1 | peak RSS 2 (per rank) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    mb = lambda xs: " / ".join(f"{x / 2**20:.0f} MB" for x in xs)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['recipe']} | {'yes' if r['identical'] else 'no'} | {r['code_agreement']:.4%} | "
                     f"{r['w1']['perplexity']:.3f} | {r['w2']['perplexity']:.3f} | {r['perplexity_delta']:+.3%} | "
                     f"{r['w1']['wall_s']} s | {r['w2']['wall_s']} s | {r['speedup']}x | {mb(r['w1']['peak_rss_bytes'])} | "
                     f"{mb(r['w2']['peak_rss_bytes'])} |")
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
