"""The `compress` command line (DESIGN.md §3b): parses, calls the API, renders with rich on stderr.
`--json` prints exactly one JSON object on stdout. Exit codes: 0 ok, 2 bad input, 1 failure."""
from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import BadInput, CompressorError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training compression of Hugging Face checkpoints into compressed-tensors artifacts.")
err = Console(stderr=True)

DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda")
JSON = typer.Option(False, "--json", help="print one JSON object on stdout")


@contextmanager
def _guard() -> Iterator[None]:
    """Map our errors to exit codes with a one-line message; Ctrl-C leaves nothing behind (exit 1)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        yield
    except CompressorError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was written")
        raise typer.Exit(1) from None


def _emit(obj: dict[str, Any], as_json: bool, table_title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
        return
    t = Table(title=table_title, show_header=False)
    for k, v in obj.items():
        if not isinstance(v, (dict, list)):
            t.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    err.print(t)


@app.command("model")
def model_cmd(
    model: str = typer.Argument("demo", help="HF directory, .gguf file, hub id, or 'demo'"),
    recipe: str = typer.Option(..., "--recipe", help="shipped recipe name or path to a YAML recipe"),
    out: Path = typer.Option(..., "--out", help="artifact directory to write"),
    calib: Optional[list[Path]] = typer.Option(None, "--calib", help=".txt or .jsonl (text field); repeatable"),
    samples: Optional[int] = typer.Option(None, "--samples", help="calibration windows (overrides the recipe)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per window (overrides the recipe)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed (overrides the recipe)"),
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow .bin/.pt/.pth weights (can run code)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model's own code"),
    as_json: bool = JSON,
) -> None:
    """Compress MODEL with a recipe into a compressed-tensors artifact."""
    from .api import compress

    with _guard():
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, disable=not err.is_terminal)
        task = None

        def on_block(i: int, n: int, prefix: str, res: Any) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task("compressing blocks", total=n)
            progress.update(task, advance=1, description=f"{prefix}")
            if not err.is_terminal:
                mse = "" if res.out_rel_err is None else f"output rel. MSE {res.out_rel_err:.3g}, "
                err.print(f"block {i + 1}/{n} {prefix}: {mse}{res.seconds:.1f}s", highlight=False)

        with progress:
            summary = compress(model, recipe, out, calib, samples, seq_len, seed, device, force, allow_pickle,
                               trust_remote_code, log=lambda m: err.print(m, highlight=False), on_block=on_block)
        _emit(summary, as_json, f"wrote {out}")


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(..., help="artifact directory or any model reference"),
    data: list[Path] = typer.Option(..., "--data", help=".txt or .jsonl; repeatable"),
    max_tokens: int = typer.Option(16384, "--max-tokens"),
    seq_len: int = typer.Option(512, "--seq-len"),
    base: Optional[str] = typer.Option(None, "--base", help="base model: adds KL (decoders) / similarity (encoders)"),
    device: str = DEVICE,
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    as_json: bool = JSON,
) -> None:
    """Perplexity (and KL to a base model) of TARGET on text; embedding similarity for encoders."""
    from .evaluate import evaluate

    with _guard():
        with Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), console=err,
                      disable=not err.is_terminal) as progress:
            task = progress.add_task("eval", total=None)
            res = evaluate(target, data, max_tokens, seq_len, base, device, allow_pickle, trust_remote_code,
                           on_window=lambda i, n: progress.update(task, completed=i + 1, total=n))
        _emit(res, as_json, f"eval {target}")


@app.command("inspect")
def inspect_cmd(path: Path = typer.Argument(..., help="artifact directory"), as_json: bool = JSON) -> None:
    """Show an artifact's manifest, per-layer settings and file check."""
    from .api import describe

    with _guard():
        info = describe(path)
        if as_json:
            sys.stdout.write(json.dumps(info) + "\n")
        else:
            _emit({k: v for k, v in info.items() if k not in ("files", "layers")}, False, str(path))
            t = Table("layer", "pass", "bits", "group", "sym", "shape", "bpw", "rel. err")
            for name, v in info["layers"].items():
                t.add_row(name, v["pass"], str(v["bits"]), str(v["group_size"]), "yes" if v["symmetric"] else "no",
                          "x".join(map(str, v["shape"])), f"{v['bits_per_weight']:.3f}", f"{v['weight_rel_err']:.4f}")
            err.print(t)
        if not info["hashes_ok"]:
            err.print(f"[bold red]sha256 mismatch:[/] {', '.join(info['hash_mismatches'])}")
            raise typer.Exit(1)


@app.command("recipes")
def recipes_cmd(as_json: bool = JSON) -> None:
    """List the shipped recipes."""
    from .recipe import load_recipe, shipped_recipes

    with _guard():
        rows = []
        for name, path in shipped_recipes().items():
            r = load_recipe(path)
            rows.append({"name": name, "passes": [p.name for p in r.passes], "description": r.description,
                         "path": str(path)})
        if as_json:
            sys.stdout.write(json.dumps({"recipes": rows}) + "\n")
            return
        t = Table("recipe", "passes", "description")
        for r in rows:
            t.add_row(r["name"], " -> ".join(r["passes"]), r["description"])
        err.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
