"""Why ReQuant's significant-weight detach is undone on a FlexRound base: restoring the top-k weights of a
finished requant artifact to their FP values, chosen three ways, and the calibration loss that results.

The artifact is one written by bench/requant.py (its flexround+rq rows: the shipped w3-requant / w2-requant,
whose guard undid the first detach step). Its effective weights (dense grid + residual) are w~ = w + dw; F is
the mean next-token NLL on the detach's own windows (the first 8 of the recipe's 128 x 512 calibration
windows of emma.txt + mansfieldpark.txt, seed 0). For k = the detach step (r_s / 2 of the quantized weights)
and k / 4, k / 16, k / 64, the k weights not already in the residual with the highest score are put back to
w, and F is measured there beside the first-order prediction -sum(score) that the score implies:

    pqi          |c_i|, c_i = dw_i * mean_t dF/dw_i(w + t dw) at N = 8 midpoints (what the detach ranks by)
    pqi-signed   c_i itself: the weights whose quantization PQI says raised F the most
    gradient     g_i(w~) dw_i: the first-order gain of restoring i alone, at the quantized point

    python bench/requant_restores.py --artifact w3-g64=PATH [--artifact w2-g64=PATH]

Each artifact's rows are cached under --work (one invocation per core, then one with all of them writes the
table: bench/results/requant_restores.{json,md}). Ran pinned to one core with one thread each.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from quality import DATA, machine, write_record  # noqa: E402

from compressor import measure as M  # noqa: E402
from compressor.algorithms.pqi import top_global  # noqa: E402
from compressor.api import load  # noqa: E402
from compressor.data import load_windows  # noqa: E402
from compressor.models import load_dense, load_tokenizer, resolve_model  # noqa: E402
from compressor.modules import QuantLinear  # noqa: E402

CALIB = [DATA / "emma.txt", DATA / "mansfieldpark.txt"]
SIGNIFICANT, STEPS, WINDOWS, INTERVALS = 0.0005, 2, 8, 8  # the shipped recipes' r_s, steps, pqi_samples, N


def measure(art: Path) -> dict:
    src = resolve_model("demo")
    model = load_dense(src)
    windows = load_windows(load_tokenizer(src.path), CALIB, 128, 512, 0)[0][:WINDOWS]
    qm = load(art)
    qw = {n: m.dequantized_weight(torch.float32) for n, m in qm.named_modules() if isinstance(m, QuantLinear)}
    del qm
    params = {n: model.get_submodule(n).weight for n in qw}
    w0 = {n: p.detach().clone() for n, p in params.items()}
    dw = {n: qw[n] - w0[n] for n in params}
    del qw
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    M.set_weights(params, w0, dw, 0.0)
    f_fp = M.loss(model, windows)
    M.set_weights(params, w0, dw, 1.0)
    f_q = M.loss(model, windows)
    t0 = time.perf_counter()
    g = M.gradient(model, params, windows)
    c = M.pqi(model, params, w0, dw, windows, INTERVALS)  # leaves the weights at w~
    seconds = time.perf_counter() - t0
    scores = {"pqi": {n: v.abs() for n, v in c.items()}, "pqi-signed": c,
              "gradient": {n: g[n] * dw[n] for n in params}}
    held = {n: dw[n] == 0 for n in params}  # the residual's positions (and any weight already exact): a no-op to restore
    step = int(round(SIGNIFICANT * sum(p.numel() for p in params.values()) / STEPS))
    rows = []
    for crit, sc in scores.items():
        for k in (step, step // 4, step // 16, step // 64):
            chosen = top_global(sc, k, held)
            predicted = -sum(float((c if crit == "pqi" else sc)[n][chosen[n]].sum()) for n in params)
            M.set_weights(params, w0, {n: dw[n].masked_fill(chosen[n], 0.0) for n in params}, 1.0)
            f = M.loss(model, windows)
            rows.append({"score": crit, "restored": k, "loss": f, "dF": f - f_q, "predicted_dF": predicted})
            print(f"{art.parent.name} {crit} k={k}: F {f:.5f} ({f - f_q:+.5f}; predicted {predicted:+.5f})", flush=True)
    return {"artifact": str(art), "loss_fp": f_fp, "loss_quantized": f_q, "pqi_sum": sum(float(v.sum()) for v in c.values()),
            "gradient_and_pqi_seconds": round(seconds, 1), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", action="append", required=True, metavar="ROW=PATH",
                    help="a flexround+rq artifact of bench/requant.py, e.g. w3-g64=WORK/sweep/w3-requant/artifact")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/compressor/bench/requant_restores")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in a.artifact:
        row, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "compression.json").is_file():
            raise SystemExit(f"--artifact {spec!r}: expected ROW=PATH to a compressed artifact (with compression.json)")
        cache = a.work / f"{row}.json"
        if not cache.is_file():
            cache.write_text(json.dumps(measure(Path(path)), indent=2))
        results[row] = json.loads(cache.read_text())
    lines = ["| row | score | restored | F after | dF measured | dF predicted by the score |", "|---|---|---|---|---|---|"]
    for row, r in results.items():
        lines += [f"| {row} | {x['score']} | {x['restored']} | {x['loss']:.5f} | {x['dF']:+.5f} | {x['predicted_dF']:+.5f} |"
                  for x in r["rows"]]
    head = "".join(f"- {row}: F(w) {r['loss_fp']:.5f}, F(w~) {r['loss_quantized']:.5f} (dF {r['loss_quantized'] - r['loss_fp']:.5f}), "
                   f"sum of PQI {r['pqi_sum']:.5f}\n" for row, r in results.items())
    md = ("# Restoring single weights of a FlexRound + ReQuant artifact\n\nSmolLM2-135M (demo); F: mean next-token NLL "
          f"on the detach's {WINDOWS} windows of 512 tokens (emma.txt + mansfieldpark.txt, seed 0); PQI at N = "
          f"{INTERVALS}. The weights already in the residual (the planned outliers) are never chosen.\n"
          "Command: `python bench/requant_restores.py --artifact w3-g64=... --artifact w2-g64=...` (the w3-requant / "
          "w2-requant artifacts of bench/requant.py)\n\n" + head + "\n" + "\n".join(lines) + "\n")
    write_record(a.out, "requant_restores", {"model": "SmolLM2-135M-Instruct (demo)", "windows": WINDOWS,
                                             "intervals": INTERVALS, "machine": machine(), "results": results}, md)


if __name__ == "__main__":
    main()
