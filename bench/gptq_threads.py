"""GPTQ's column loop on one thread vs torch's default thread count, quiet and with a competing process.

The loop is thousands of small ops; with the cores shared, OpenMP's spin-waits make it crawl. gptq.py runs
it under `_one_thread()`. This times `gptq_quantize` on a 576x1536 layer (SmolLM2's down_proj shape,
synthetic correlated inputs, 4096 tokens, W4 group 64 asymmetric, act-order, MSE clipping) both ways,
alternating, best of --repeats, (1) alone and (2) while a second process runs 2-thread matmuls.
Writes bench/results/gptq_threads.{json,md}.

    python bench/gptq_threads.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compressor.algorithms.gptq as gptq  # noqa: E402


def load(stop) -> None:
    torch.set_num_threads(2)
    a = torch.randn(1024, 1024)
    while not stop.is_set():
        a @ a


def problem():
    g = torch.Generator().manual_seed(0)
    k = 1536
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(4096, k, generator=g) @ mix) * torch.logspace(0, 1.5, k)
    return torch.randn(576, k, generator=g) * 0.05, x.T @ x


def time_once(w, h, one_thread: bool) -> tuple[float, torch.Tensor]:
    orig = gptq._one_thread
    if not one_thread:
        gptq._one_thread = contextlib.nullcontext
    try:
        t0 = time.perf_counter()
        q = gptq.gptq_quantize(w, h, 4, 64, False, torch.float16, act_order=True, mse=True)
        return time.perf_counter() - t0, q.q
    finally:
        gptq._one_thread = orig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    w, h = problem()
    rows = []
    for loaded in (False, True):
        stop = mp.Event()
        proc = mp.Process(target=load, args=(stop,)) if loaded else None
        if proc:
            proc.start()
            time.sleep(1)
        best = {True: float("inf"), False: float("inf")}
        codes = {}
        for _ in range(a.repeats):
            for one in (True, False):
                t, codes[one] = time_once(w, h, one)
                best[one] = min(best[one], t)
        if proc:
            stop.set()
            proc.join()
        assert torch.equal(codes[True], codes[False]), "thread count changed the codes"
        rows.append({"competing_process": loaded, "one_thread_s": round(best[True], 3),
                     "default_threads_s": round(best[False], 3), "speedup": round(best[False] / best[True], 2)})
        print(rows[-1], flush=True)
    rec = {"layer": "576x1536, W4 g64 asym, act-order, mse", "tokens": 4096, "repeats": a.repeats,
           "torch_threads": torch.get_num_threads(), "nproc": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gptq_threads.json").write_text(json.dumps(rec, indent=2) + "\n")
    md = ["# GPTQ column loop: one thread vs default threads", "",
          f"{rec['layer']}, {rec['tokens']} synthetic tokens; best of {a.repeats}, alternating; torch threads "
          f"{rec['torch_threads']} on {rec['nproc']} CPUs. Codes identical both ways (asserted).",
          "Command: `python bench/gptq_threads.py`", "",
          "| competing process | one thread (s) | default threads (s) | default / one |", "|---|---:|---:|---:|"]
    md += [f"| {'yes' if r['competing_process'] else 'no'} | {r['one_thread_s']:.2f} | {r['default_threads_s']:.2f} | "
           f"{r['speedup']:.2f} |" for r in rows]
    (a.out / "gptq_threads.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
