"""`compress report`: accuracy-vs-size tables and plots from a sweep's records (sweep.py).

Writes report.md (a table sorted by bits per weight, the Pareto-optimal runs marked), quality_vs_bpw.png
(quality against bits per weight, the Pareto frontier drawn, the base model as a line), layers.png (per layer:
the bits, sparsity or rank each run chose, and the per-block output error or a measured sensitivity) and
report.html, one self-contained file with the table and both plots embedded.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from .errors import BadInput
from .sweep import RECORD


def load_records(runs: Path) -> tuple[dict | None, list[dict]]:
    """(base record or None, the compressed runs' records) of a sweep directory."""
    runs = Path(runs)
    if not runs.is_dir():
        raise BadInput(f"{runs} is not a directory (give the --out of `compress sweep`)")
    base, records = None, []
    for f in sorted(runs.glob(f"*/{RECORD}")):
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise BadInput(f"{f} is not valid JSON: {e}") from None
        check_record(rec, f)
        if rec.get("name") == "base":
            base = rec
        else:
            if not (runs / str(rec.get("artifact")) / "compression.json").is_file():
                raise BadInput(f"{f}: its artifact {runs / str(rec.get('artifact'))} has no compression.json")
            rec["_dir"] = str(f.parent)
            records.append(rec)
    if not records:
        raise BadInput(f"{runs} holds no finished runs (no */{RECORD}); run `compress sweep` first")
    return base, records


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_record(rec: Any, f: Path) -> None:
    """A record the report can use: a JSON object with a finite `bits_per_weight` and a non-empty `quality` of
    finite numbers (null allowed: shown as blank), else a BadInput naming the record and the field."""
    if not isinstance(rec, dict):
        raise BadInput(f"{f} is not a run record (a JSON object), got {type(rec).__name__}")
    if not _is_number(rec.get("bits_per_weight")):
        raise BadInput(f"{f}: bits_per_weight is {rec.get('bits_per_weight')!r}, not a number")
    quality = rec.get("quality")
    if not isinstance(quality, dict) or not quality:
        raise BadInput(f"{f} has no quality metrics (no 'quality' numbers): a run that did not finish evaluating?")
    for k, v in quality.items():
        if v is not None and not _is_number(v):
            raise BadInput(f"{f}: quality.{k} is {v!r}, not a number")


def metric_of(records: list[dict]) -> tuple[str, bool]:
    """The quality number to plot and whether lower is better: perplexity (decoders) or cosine (encoders)."""
    metrics = (("perplexity", True), ("cosine_similarity", False))
    for metric, lower in metrics:
        if all(_is_number(r["quality"].get(metric)) for r in records):
            return metric, lower
    for r in records:
        if not any(_is_number(r["quality"].get(m)) for m, _ in metrics):
            raise BadInput(f"{Path(r['_dir']) / RECORD} has neither perplexity nor cosine_similarity in its quality "
                           f"metrics ({', '.join(r['quality'])})")
    raise BadInput("the runs mix decoders and encoders (perplexity and cosine similarity): report them apart")


def pareto(points: list[tuple[float, float]], lower_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both size (smaller) and quality: the frontier, by size."""
    sign = 1 if lower_is_better else -1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], float("inf")
    for i in order:
        q = sign * points[i][1]
        if q < best:
            front.append(i)
            best = q
    return front


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table_rows(base: dict | None, records: list[dict], front: set[str]) -> list[list[str]]:
    rows = []
    for r in sorted(records, key=lambda r: (r["bits_per_weight"], r["name"])):
        q = r["quality"]
        rows.append([r["name"], " → ".join(r.get("passes", [])), f"{r['bits_per_weight']:.3f}",
                     _fmt(r.get("size_bytes") and r["size_bytes"] / 2**20, ".1f"), _fmt(q.get("perplexity"), ".3f"),
                     _fmt(q.get("kl_to_base"), ".4f"), _fmt(q.get("cosine_similarity"), ".5f"),
                     _fmt(r.get("compress_seconds"), ".0f"),
                     _fmt(r.get("peak_memory_bytes") and r["peak_memory_bytes"] / 2**30, ".2f"),
                     "✓" if r["name"] in front else ""])
    if base:
        q = base["quality"]
        rows.append(["base", "", f"{base['bits_per_weight']:.0f}", "", _fmt(q.get("perplexity"), ".3f"),
                     _fmt(q.get("kl_to_base"), ".4f"), _fmt(q.get("cosine_similarity"), ".5f"), "", "", ""])
    return rows


HEADER = ["run", "passes", "bits/weight", "size MiB", "perplexity", "KL to base", "embedding cos", "compress s",
          "peak mem GiB", "Pareto"]


def plot_quality(base: dict | None, records: list[dict], metric: str, lower: bool, front_idx: list[int], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    xs = [r["bits_per_weight"] for r in records]
    ys = [r["quality"][metric] for r in records]
    on = set(front_idx)
    ax.scatter([x for i, x in enumerate(xs) if i not in on], [y for i, y in enumerate(ys) if i not in on],
               color="0.6", label="dominated", zorder=2)
    ax.scatter([xs[i] for i in front_idx], [ys[i] for i in front_idx], color="C3", label="Pareto-optimal", zorder=3)
    ax.step([xs[i] for i in front_idx], [ys[i] for i in front_idx], where="post", color="C3", lw=1.2, zorder=1)
    for r, x, y in zip(records, xs, ys):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if base and _is_number(base["quality"].get(metric)):
        ax.axhline(base["quality"][metric], color="C0", ls="--", lw=1,
                   label=f"base ({base['bits_per_weight']:.0f}-bit): {base['quality'][metric]:.4g}")
    ax.set_xlabel("bits per weight (scales and zero points counted)")
    ax.set_ylabel(metric.replace("_", " ") + (" (lower is better)" if lower else " (higher is better)"))
    if lower and max(ys) / max(min(ys), 1e-9) > 4:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{Path(str(records[0].get('model', ''))).name}: quality vs size")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def layer_table(record: dict) -> tuple[list[str], dict[str, list], dict[str, float]]:
    """Per-layer settings of a run's artifact (layer names, {"bits"/"sparsity"/"rank"/"sensitivity": values}) and
    its per-block output error, from the artifact's compression.json."""
    manifest = json.loads((Path(record["_dir"]).parent / record["artifact"] / "compression.json").read_text())
    layers = manifest.get("layers", {})
    names = list(layers)
    cols: dict[str, list] = {}
    for key in ("bits", "sparsity", "rank", "sensitivity"):
        vals = [layers[n].get(key) for n in names]
        if any(v is not None for v in vals) and (key == "bits" or any(vals)):
            cols[key] = vals
    return names, cols, manifest.get("metrics", {}).get("block_output_rel_mse", {})


def plot_layers(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [(r["name"], *layer_table(r)) for r in sorted(records, key=lambda r: r["bits_per_weight"])]
    keys = [k for k in ("bits", "sparsity", "rank", "sensitivity") if any(k in t[2] for t in tables)]
    panels = keys + (["block error"] if any(t[3] for t in tables) else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), dpi=110, squeeze=False)
    for ax, key in zip(axes[:, 0], panels):
        for j, (name, names, cols, blocks) in enumerate(tables):
            if key == "block error":
                if blocks:
                    ax.plot(range(len(blocks)), list(blocks.values()), marker=".", lw=1, label=name, color=f"C{j % 10}")
            elif key in cols:
                ax.step(range(len(names)), [v if v is not None else float("nan") for v in cols[key]], where="mid",
                        lw=1, label=name, color=f"C{j % 10}")
        if key == "block error":
            ax.set_yscale("log")
            ax.set_xlabel("block")
            ax.set_ylabel("block output\nrel. MSE")
        else:
            ax.set_xlabel("layer (in model order)")
            ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=min(4, len(tables)), loc="best")
    axes[0, 0].set_title("per layer: what each run chose, and the error each block left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(runs: str | Path, out: str | Path) -> dict[str, Any]:
    """report.md, report.html, quality_vs_bpw.png and layers.png in `out` from the sweep in `runs`."""
    base, records = load_records(Path(runs))
    metric, lower = metric_of(records)
    points = [(r["bits_per_weight"], r["quality"][metric]) for r in records]
    front_idx = pareto(points, lower)
    front = {records[i]["name"] for i in front_idx}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    plot_quality(base, records, metric, lower, front_idx, out / "quality_vs_bpw.png")
    plot_layers(records, out / "layers.png")
    rows = table_rows(base, records, front)
    r0 = records[0]
    ev = ", ".join(f["name"] for f in r0.get("inputs", {}).get("evaluation", []))
    cal = ", ".join(f["name"] for f in r0.get("inputs", {}).get("calibration", []))
    cals = {(c["samples"], c.get("seq_len"), c.get("seed")) for r in records  # runs that drew calibration data
            if isinstance(c := r.get("calibration"), dict) and c.get("samples")}
    if len(cals) == 1:
        n, L, seed = next(iter(cals))
        cal += f" ({n} windows of {L} tokens, seed {seed})"
    elif len(cals) > 1:
        cal += " (windows, length and seed differ between runs: see each record)"
    intro = (f"Model `{r0.get('model')}`; calibration {cal}; evaluation {ev}, the first "
             f"{r0.get('inputs', {}).get('eval_tokens')} tokens in windows of {r0.get('inputs', {}).get('eval_seq_len')}. "
             f"Sorted by bits per weight; ✓ marks the Pareto frontier (no other run is both smaller and better on "
             f"{metric.replace('_', ' ')}). Tool version {r0.get('tool_version')}.")
    md = ["# Accuracy vs size", "", intro, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "![quality vs bits per weight](quality_vs_bpw.png)", "", "![per layer](layers.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(intro, rows, out))
    return {"out": str(out), "runs": len(records), "metric": metric, "pareto": sorted(front),
            "files": [str(out / f) for f in ("report.md", "report.html", "quality_vs_bpw.png", "layers.png")]}


def _html(intro: str, rows: list[list[str]], out: Path) -> str:
    def img(name: str) -> str:
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
             "img{max-width:100%;margin-top:1em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compressor report</title><style>{style}</style>"
            f"</head><body><h1>Accuracy vs size</h1><p>{html.escape(intro)}</p><table><tr>{head}</tr>{body}</table>"
            f"{img('quality_vs_bpw.png')}{img('layers.png')}</body></html>\n")
