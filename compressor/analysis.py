"""Research tools over a model, beside compression: `compress sensitivity` (PQI and Taylor estimates of a
quantization's loss change, algorithms/pqi.py) and `compress utilization` (every Linear's utilized rank,
algorithms/lowrank.py), and the utilization plot."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import measure
from .algorithms import lowrank as LR
from .data import check_window_request, load_windows
from .errors import BadInput
from .models import Checkpoint, load_dense, load_tokenizer, pick_device, resolve_model, skeleton
from .blocks import Context, check_calibration, stream_fp_layers
from .runner import prepare, run_blocks


def quantize_in_memory(model: str, recipe: str | Path, calib: list[str | Path] | None, samples: int | None,
                       seq_len: int | None, seed: int | None, device: str = "auto",
                       log: Callable[[str], None] = lambda msg: None):
    """Run a recipe without writing an artifact: (ModelSource, the calibration windows, {layer: QWeight})."""
    rec, dev, src, windows, _ = prepare(model, recipe, calib, samples, seq_len, seed, device, log)
    cal = rec.calibration
    skel, ckpt = skeleton(src.path), Checkpoint(src.path)
    qweights: dict[str, Any] = {}
    run_blocks(skel, ckpt, rec, windows, Context(device=dev, seed=cal.seed, log=log),
               lambda i, prefix, res: qweights.update(res.qweights))
    return src, windows, qweights


def sensitivity(model: str = "demo", recipe: str | Path = "w3g64-rtn", calib: list[str | Path] | None = None,
                samples: int = 8, seq_len: int = 512, seed: int = 0, intervals: list[int] = (4, 8, 16),
                device: str = "auto", log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """`compress sensitivity`: how well each estimate predicts the loss change dF = F(w~) - F(w) that quantizing
    the model with `recipe` causes, F the mean next-token NLL on the calibration windows: PQI at each number of
    intervals, and the first- and second-order Taylor estimates at w (measure.py, algorithms/pqi.py)."""
    if not intervals or min(intervals) < 1:
        raise BadInput(f"--intervals must be positive integers, got {list(intervals)}")
    t0 = time.perf_counter()
    src, windows, qweights = quantize_in_memory(model, recipe, calib, samples, seq_len, seed, device, log)
    dev = pick_device(device)
    net = load_dense(src, str(dev))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    params = {n: net.get_submodule(n).weight for n in qweights}
    for p in params.values():
        p.requires_grad_(True)
    w0 = {n: p.detach().clone() for n, p in params.items()}
    dw = {n: qweights[n].dequantize().to(dev) - w0[n] for n in params}
    f0 = measure.loss(net, windows)
    measure.set_weights(params, w0, dw, 1.0)
    f1 = measure.loss(net, windows)
    measured = f1 - f0
    log(f"F(w) {f0:.5f}, F(w~) {f1:.5f}: dF {measured:.5f}")
    first, second = measure.taylor(net, params, w0, dw, windows)
    log(f"Taylor: first order {first:.4g}, second order {second:.4g}")
    rows = [{"estimate": "first-order Taylor", "predicted": first}, {"estimate": "second-order Taylor", "predicted": second}]
    per_layer: dict[str, float] = {}
    for n_int in intervals:
        c = measure.pqi(net, params, w0, dw, windows, n_int, tick=log)
        rows.append({"estimate": f"PQI N={n_int}", "predicted": sum(float(v.sum()) for v in c.values())})
        per_layer = {n: float(v.sum()) for n, v in c.items()}
        log(f"PQI N={n_int}: {rows[-1]['predicted']:.5g}")
    for r in rows:
        r["ratio_to_measured"] = r["predicted"] / measured if measured else None
    return {"model": model, "recipe": str(recipe), "loss_fp": f0, "loss_quantized": f1, "measured_dF": measured,
            "estimates": rows, "pqi_per_layer": per_layer, "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()), "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}


def utilization(model: str = "demo", calib: list[str | Path] | None = None, samples: int = 32, seq_len: int = 512,
                seed: int = 0, taus: list[float] = (0.99, 0.999), device: str = "auto",
                log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """`compress utilization`: every Linear's utilized rank (algorithms/lowrank.py) on the FP model, block by block:
    the input subspace from the calibration inputs' second moment, the output subspace from the input-projected
    layer's outputs, at each energy threshold tau; and the mean layer utilization (rank / min(d_in, d_out))."""
    check_window_request(samples, seq_len)  # before anything is loaded
    if not taus or any(not 0 < t <= 1 for t in taus):
        raise BadInput(f"--tau must be energy fractions in (0, 1], got {list(taus)}")
    t0 = time.perf_counter()
    dev = pick_device(device)
    src = resolve_model(model)
    if src.is_compressed:
        raise BadInput(f"model {model} is already compressed (compressed-tensors); give the uncompressed checkpoint")
    check_calibration(samples, seq_len, src.config, dev)
    windows, cal_info = load_windows(load_tokenizer(src.path), calib, samples, seq_len, seed)
    log(f"calibration: {cal_info['source']}: {samples} windows of {seq_len} tokens, seed {seed}")
    skel, ckpt = skeleton(src.path), Checkpoint(src.path)
    ctx = Context(device=dev, seed=seed, log=log)
    n_tok = windows.numel()
    rows = []
    # (X^T X, its mean, its eigendecomposition); siblings (q/k/v, gate/up) read one input: one eigh for them
    last: tuple[torch.Tensor, torch.Tensor, tuple] | None = None
    for name, lin, xtx in stream_fp_layers(skel, ckpt, windows, ctx, lambda n: True, full=True):
        w = lin.weight.data
        if last is None or last[0].shape != xtx.shape or not torch.equal(last[0], xtx):
            last = (xtx, xtx / n_tok, LR.top_eig(xtx / n_tok))
        row: dict[str, Any] = {"layer": name, "d_in": lin.in_features, "d_out": lin.out_features, "by_tau": {}}
        for tau in taus:
            sub = LR.utilized_subspaces(w, last[1], tau, eig=last[2])
            row["by_tau"][str(tau)] = {"k_in": sub.u_in.shape[1], "k_out": sub.u_out.shape[1], "rank": sub.rank,
                                       "utilization": round(sub.utilization(), 6),
                                       "saves_params": LR.saves_params(sub.rank, lin.in_features, lin.out_features)}
        rows.append(row)
        log(f"{name}: " + ", ".join(f"tau {t}: rank {row['by_tau'][str(t)]['rank']}/{min(lin.in_features, lin.out_features)}"
                                    for t in taus))
    if not rows:
        raise BadInput(f"model {model}: no Linear layer inside its blocks")
    mean = {str(t): round(sum(r["by_tau"][str(t)]["utilization"] for r in rows) / len(rows), 6) for t in taus}
    return {"model": model, "calibration": {k: cal_info[k] for k in ("source", "samples", "seq_len", "seed")},
            "tokens": int(n_tok), "taus": list(taus), "mean_utilization": mean, "layers": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def utilization_plot(res: dict[str, Any], path: Path) -> None:
    """Each layer's utilization (rank / min(d_in, d_out)) in model order, one line per tau, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    for t in res["taus"]:
        ys = [r["by_tau"][str(t)]["utilization"] for r in res["layers"]]
        ax.plot(range(len(ys)), ys, marker=".", lw=0.8, label=f"tau {t} (mean {res['mean_utilization'][str(t)]:.3f})")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("utilized rank / min(d_in, d_out)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Utilized rank per layer: {res['model']} ({res['tokens']} calibration tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
