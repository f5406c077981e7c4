"""The `compress` command line (DESIGN.md §3b): parses, calls the API, renders with rich on stderr.
`--json` prints exactly one JSON object on stdout. Exit codes: 0 ok, 2 bad input, 1 failure."""
from __future__ import annotations

import functools
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from . import dist, safejson
from .analysis import sensitivity, utilization, utilization_plot
from .api import compress, verify
from .artifact.reader import describe
from .data import DataWarning
from .errors import BadInput, CompressorError, sigterm_as_interrupt
from .evaluate import evaluate
from .files import tmp_sibling, write_atomic, write_json_atomic
from .generate import generate
from .recipe import load_recipe, shipped_recipes
from .report import write_report
from .sweep import block_reporter, sweep

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training compression of Hugging Face checkpoints into compressed-tensors artifacts.")
err = Console(stderr=True)  # progress and logs (silenced by --quiet)
errors = Console(stderr=True)  # error messages: always shown

MODEL = typer.Argument("demo", help="HF directory, .gguf file, hub id, or 'demo'")
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda")
JSON = typer.Option(False, "--json", help="print one JSON object on stdout")
QUIET = typer.Option(False, "--quiet", "-q", help="no progress or logs on stderr (errors still print)")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="allow .bin/.pt/.pth weights (can run code)")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="allow the model's own code")
CALIB = typer.Option(None, "--calib", help="calibration text: .txt or .jsonl (text field); repeatable")
SAMPLES = typer.Option(None, "--samples", help="calibration windows (overrides the recipe)")
SEQ_LEN = typer.Option(None, "--seq-len", help="calibration tokens per window (overrides the recipe)")
SEED = typer.Option(None, "--seed", help="sampling seed (overrides the recipe)")
NO_VERIFY = typer.Option(False, "--no-verify", help="load an artifact without checking its files against "
                         "compression.json")
EVAL_TOKENS_HELP = "evaluate on the first N tokens of --data"
BOS = typer.Option(None, "--bos/--no-bos", help="start each evaluation window with the tokenizer's BOS, or not "
                   "(default: when the tokenizer puts one in front of a text)")
EVAL_SEQ_LEN_HELP = "tokens per evaluation window (non-overlapping windows; at most the model's positions)"


@contextmanager
def _guard() -> Iterator[None]:
    """Map our errors to exit codes with a one-line message; Ctrl-C leaves nothing behind (exit 1)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    warnings.showwarning = _show_warning
    try:
        yield
    except CompressorError as e:
        errors.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        errors.print("[bold red]interrupted[/]: nothing was written")
        raise typer.Exit(1) from None


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings about the user's input (DataWarning) as one `warning:` line with the logs; others as Python
    prints them."""
    if issubclass(category, DataWarning):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def _quiet(quiet: bool) -> None:
    """--quiet: no logs and no progress bars, ours or the libraries' (tqdm's, as transformers and huggingface_hub
    draw them: loading weights, converting a GGUF), in this process and in the `compress` processes it starts."""
    err.quiet = quiet
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is imported: in the child processes (sweep)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        import tqdm.std  # here torch has imported it already: its default changed instead

        tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)


@contextmanager
def _command(quiet: bool, as_json: bool) -> Iterator[Callable[[Any], bool]]:
    """The frame of every command: --quiet, then our errors as exit codes (_guard). Yields `emit(obj)`: with --json
    it prints `obj` as the one JSON object on stdout and returns True (the command renders nothing more), else False."""
    _quiet(quiet)

    def emit(obj: Any) -> bool:
        if as_json:
            sys.stdout.write(safejson.dumps(obj, default=str) + "\n")
        return as_json

    with _guard():
        yield emit


def _progress() -> Progress:
    """Bars on stderr, shown only on a terminal and without --quiet."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, disable=not err.is_terminal or err.quiet)


@contextmanager
def _window_progress() -> Iterator[Any]:
    """A progress bar over evaluation windows; yields the on_window(i, n) callback."""
    with _progress() as progress:
        task = progress.add_task("evaluating", total=None)
        yield lambda i, n: progress.update(task, completed=i + 1, total=n)


def _table(obj: dict[str, Any], table_title: str) -> None:
    """The scalar fields of a result as a two-column table on stderr."""
    t = Table(title=table_title, show_header=False)
    for k, v in obj.items():
        if not isinstance(v, (dict, list)):
            t.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    err.print(t)


@app.command("model")
def model_cmd(
    model: str = MODEL,
    recipe: str = typer.Option(..., "--recipe", help="shipped recipe name or path to a YAML recipe"),
    out: Path = typer.Option(..., "--out", help="artifact directory to write"),
    calib: Optional[list[Path]] = CALIB,
    samples: Optional[int] = SAMPLES,
    seq_len: Optional[int] = SEQ_LEN,
    seed: Optional[int] = SEED,
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="replace an existing output (only an artifact of ours)"),
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    dtype: str = typer.Option("auto", "--dtype", help="storage dtype of the tensors no pass compresses (embeddings, "
                              "norms, biases): auto (the source model's own), float32, float16, bfloat16"),
    workers: int = typer.Option(1, "--workers", help="local processes to calibrate on (gloo), each on its share of "
                                "the windows; under torchrun its ranks are the workers", min=1),
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Compress MODEL with a recipe into a compressed-tensors artifact."""
    w = dist.init(device)  # under torchrun: join its group; rank 0 alone reports
    with _command(quiet or not w.main, as_json and w.main) as emit:
        progress = _progress()
        task = None
        report = block_reporter()  # a sweep's pipe, when a sweep started this run

        def on_block(i: int, n: int, prefix: str, res: Any) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task("compressing blocks", total=n)
            progress.update(task, advance=1, description=f"{prefix}")
            if report:
                report(i + 1, n, prefix)
            if not err.is_terminal:
                mse = "" if res.out_rel_err is None else f"output rel. MSE {res.out_rel_err:.3g}, "
                err.print(f"block {i + 1}/{n} {prefix}: {mse}{res.seconds:.1f}s", highlight=False)

        with progress:
            summary = compress(model, recipe, out, calib, samples, seq_len, seed, device, force, allow_pickle,
                               trust_remote_code, dtype, log=lambda m: err.print(m, highlight=False),
                               on_block=on_block, workers=workers)
        dist.close()
        if summary is not None and not emit(summary):
            _table(summary, f"wrote {out}")


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(..., help="artifact directory or any model reference"),
    data: list[Path] = typer.Option(..., "--data", help=".txt or .jsonl; repeatable"),
    max_tokens: int = typer.Option(16384, "--max-tokens", help=EVAL_TOKENS_HELP),
    seq_len: int = typer.Option(512, "--seq-len", help=EVAL_SEQ_LEN_HELP),
    base: Optional[str] = typer.Option(None, "--base", help="base model: adds KL (decoders) / similarity (encoders)"),
    device: str = DEVICE,
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    no_verify: bool = NO_VERIFY,
    bos: Optional[bool] = BOS,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Perplexity (and KL to a base model) of TARGET on text; embedding similarity for encoders."""
    with _command(quiet, as_json) as emit:
        with _window_progress() as on_window:
            res = evaluate(target, data, max_tokens, seq_len, base, device, allow_pickle, trust_remote_code,
                           on_window=on_window, verify=not no_verify, bos=bos)
        if not emit(res):
            _table(res, f"eval {target}")


@app.command("inspect")
def inspect_cmd(path: Path = typer.Argument(..., help="artifact directory"), as_json: bool = JSON,
                quiet: bool = QUIET) -> None:
    """Show an artifact's manifest, per-layer settings and file check."""
    with _command(quiet, as_json) as emit:
        info = describe(path)
        if not emit(info):
            _table({k: v for k, v in info.items() if k not in ("files", "layers", "manifest_sha256")}, str(path))
            err.print(f"compression.json sha256 {info['manifest_sha256']}", highlight=False, soft_wrap=True)
            pruned = any("sparsity" in v for v in info["layers"].values())
            t = Table("layer", "pass", "bits", "group", "sym", "shape", *(["sparsity"] if pruned else []), "bpw",
                      "rel. err")
            for name, v in info["layers"].items():
                grid = v["bits"] is not None  # a sparse-bitmask layer (pruned, not quantized) has no integer grid
                sparsity = [_sparsity_cell(v)] if pruned else []
                t.add_row(name, v["pass"], str(v["bits"]) if grid else v.get("dtype", "-"),
                          str(v["group_size"]) if grid else "-", ("yes" if v["symmetric"] else "no") if grid else "-",
                          "x".join(map(str, v["shape"])), *sparsity, f"{v['bits_per_weight']:.3f}",
                          f"{v['weight_rel_err']:.4f}")
            err.print(t)
        if not info["hashes_ok"]:
            errors.print(f"[bold red]sha256 mismatch:[/] {escape('; '.join(info['hash_mismatches']))}", highlight=False)
            raise typer.Exit(1)


def _sparsity_cell(layer: dict) -> str:
    """A layer's fraction pruned, with its pattern when it has one ("0.500 2:4"); "-" when not pruned."""
    if "sparsity" not in layer:
        return "-"
    structure = layer.get("sparsity_structure", "unstructured")
    return f"{layer['sparsity']:.3f}" + ("" if structure == "unstructured" else f" {structure}")


@app.command("recipes")
def recipes_cmd(as_json: bool = JSON, quiet: bool = QUIET) -> None:
    """List the shipped recipes."""
    with _command(quiet, as_json) as emit:
        rows = []
        for name, path in shipped_recipes().items():
            r = load_recipe(path)
            rows.append({"name": name, "passes": [p.name for p in r.passes], "description": r.description,
                         "path": str(path)})
        if emit({"recipes": rows}):
            return
        t = Table("recipe", "passes", "description")
        for r in rows:
            t.add_row(r["name"], " -> ".join(r["passes"]), r["description"])
        err.print(t)


@app.command("sweep")
def sweep_cmd(
    model: str = MODEL,
    recipes: str = typer.Option(..., "--recipes", help="comma-separated shipped recipe names or YAML paths"),
    eval_data: list[Path] = typer.Option(..., "--eval", help="evaluation text (.txt or .jsonl); repeatable"),
    out: Path = typer.Option(..., "--out", help="sweep directory (one subdirectory per run; resumable)"),
    calib: Optional[list[Path]] = CALIB,
    samples: Optional[int] = SAMPLES,
    seq_len: Optional[int] = SEQ_LEN,
    seed: Optional[int] = SEED,
    max_tokens: int = typer.Option(16384, "--max-tokens", help="evaluation tokens"),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="evaluation window length"),
    bos: Optional[bool] = BOS,
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="redo finished runs"),
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Compress MODEL with each recipe, evaluate each, write one JSON record per run (finished runs are kept)."""
    with _command(quiet, as_json) as emit:
        names = [r.strip() for r in recipes.split(",") if r.strip()]
        with _progress() as progress:
            tasks: dict[str, Any] = {}

            def on_event(kind: str, info: dict[str, Any]) -> None:
                if kind == "start":
                    tasks["runs"] = progress.add_task("runs", total=info["runs"])
                    tasks["blocks"] = progress.add_task("", total=None, visible=False)
                elif kind == "run":
                    progress.update(tasks["runs"], description=f"{info['name']}: {info['stage']}")
                    progress.update(tasks["blocks"], visible=False, completed=0, total=None)
                    if not err.is_terminal:
                        err.print(f"{info['name']}: {info['stage']}", highlight=False)
                elif kind == "block":
                    progress.update(tasks["blocks"], visible=True, completed=info["block"], total=info["blocks"],
                                    description=f"  {info['prefix']}")
                elif kind == "done":
                    progress.advance(tasks["runs"])
                    q = info["record"]["quality"]
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in q.items() if k != "tokens")
                    err.print(f"{info['name']}: {'kept (finished before)' if info['resumed'] else 'done'}: "
                              f"{info['record']['bits_per_weight']:.3f} bits/weight, {shown}", highlight=False)
                elif kind == "failed":
                    progress.advance(tasks["runs"])
                    errors.print(f"[bold red]{escape(info['name'])} failed:[/] {escape(info['error'])}", highlight=False)

            res = sweep(model, names, eval_data, out, calib, samples, seq_len, seed, max_tokens, eval_seq_len, device,
                        force, allow_pickle, trust_remote_code, on_event, bos=bos)
        emit(res)
        if res["failed"]:
            raise typer.Exit(1)


@app.command("report")
def report_cmd(
    runs: Path = typer.Argument(..., help="a `compress sweep` output directory"),
    out: Path = typer.Option(..., "--out", help="directory for report.md, report.html and the PNG plots"),
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Accuracy-vs-size report of a sweep: a table sorted by size, plots with the Pareto frontier, per layer."""
    with _command(quiet, as_json) as emit:
        res = write_report(runs, out)
        if not emit(res):
            err.print(f"wrote {', '.join(res['files'])}; Pareto-optimal: {', '.join(res['pareto'])}", highlight=False)


@app.command("verify")
def verify_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    max_ppl: Optional[float] = typer.Option(None, "--max-ppl", help="fail when perplexity is above this"),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="fail when KL to the base model is above this"),
    min_cos: Optional[float] = typer.Option(None, "--min-cos", help="encoders: fail when embedding cosine is below"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="text for the quality bound (default: the "
                                               "embedded corpus); repeatable"),
    base: Optional[str] = typer.Option(None, "--base", help="base model for --max-kl/--min-cos (default: the "
                                       "artifact's source)"),
    max_tokens: int = typer.Option(16384, "--max-tokens", help=EVAL_TOKENS_HELP + " (for a quality bound)"),
    seq_len: int = typer.Option(512, "--seq-len", help=EVAL_SEQ_LEN_HELP),
    transformers: bool = typer.Option(False, "--transformers", help="also load it with transformers and compare "
                                      "its logits on a fixed prompt to ours"),
    bos: Optional[bool] = BOS,
    device: str = DEVICE,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Check an artifact: its manifest's sha256 (printed: pin it in CI) and every file's, load, forward pass, and
    optionally transformers loading and a quality bound (exit 1 when a check fails)."""
    with _command(quiet, as_json) as emit:
        with _window_progress() as on_window:
            res = verify(artifact, data, max_ppl, max_kl, min_cos, base, max_tokens, seq_len, device,
                         on_window=on_window, transformers=transformers, bos=bos)
        emit(res)
        t = Table("check", "result", Column("detail", overflow="fold"), title=f"verify {artifact}")
        for c in res["checks"]:
            t.add_row(c["check"], "[green]ok[/]" if c["ok"] else "[bold red]FAILED[/]", c["detail"])
        err.print(t)
        if not res["passed"]:
            errors.print(f"[bold red]verify failed:[/] {', '.join(c['check'] for c in res['checks'] if not c['ok'])}")
            raise typer.Exit(1)


@app.command("generate")
def generate_cmd(
    target: str = typer.Argument(..., help="artifact directory or any decoder model reference"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    device: str = DEVICE,
    dtype: str = typer.Option("auto", "--dtype", help="auto (float16 on a GPU, float32 on the CPU), float32, "
                              "float16 or bfloat16"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="always generate --max-new-tokens (timing)"),
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    no_verify: bool = NO_VERIFY,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Greedy text continuation of --prompt, with tokens per second: the generated text on stdout."""
    with _command(quiet, as_json) as emit:
        res = generate(target, prompt, max_new_tokens, device, dtype, ignore_eos, allow_pickle, trust_remote_code,
                       not no_verify)
        if emit(res):
            return
        sys.stdout.write(res["text"] + "\n")
        kern = f", kernels {res['kernels']}" if res["kernels"] else ""
        err.print(f"{res['new_tokens']} tokens in {res['seconds']:.2f} s: {res['tokens_per_second']:.1f} tokens/s "
                  f"({res['device']}, {res['dtype']}{kern})", highlight=False)


def _numbers(text: str, conv: Callable[[str], Any], flag: str, example: str) -> list:
    """A comma-separated option (`--tau 0.99,0.999`) as a list, or a BadInput naming the option."""
    try:
        return [conv(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"{flag} {text!r}: expected comma-separated {example}") from None


def _no_dirs(**files: Optional[Path]) -> None:
    """An output file option that names a directory, or a file whose directory is missing or cannot be written,
    is an error before the work starts (writing is tried: permission bits do not tell for root or /proc)."""
    for flag, f in files.items():
        if f is None:
            continue
        if f.is_dir():
            raise BadInput(f"--{flag} {f} is a directory")
        if not f.parent.is_dir():
            raise BadInput(f"--{flag} {f}: directory {f.parent} " + ("is not a directory" if f.parent.exists()
                                                                     else "does not exist"))
        probe = tmp_sibling(f)
        try:
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as e:
            raise BadInput(f"--{flag} {f}: cannot write in {f.parent} ({e.strerror})") from None


@app.command("sensitivity")
def sensitivity_cmd(
    model: str = MODEL,
    recipe: str = typer.Option("w3g64-rtn", "--recipe", help="the quantization whose loss change is predicted"),
    calib: Optional[list[Path]] = CALIB,
    samples: int = typer.Option(8, "--samples", help="calibration windows (the loss F and its gradients)"),
    seq_len: int = typer.Option(512, "--seq-len"),
    seed: int = typer.Option(0, "--seed"),
    intervals: str = typer.Option("4,8,16", "--intervals", help="PQI interval counts N, comma-separated"),
    device: str = DEVICE,
    out: Optional[Path] = typer.Option(None, "--out", help="also write the JSON result to this file"),
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """PQI against the measured loss change of a quantization, with first- and second-order Taylor beside it."""
    with _command(quiet, as_json) as emit:
        ns = _numbers(intervals, int, "--intervals", "integers such as 4,8,16")
        _no_dirs(out=out)
        res = sensitivity(model, recipe, calib, samples, seq_len, seed, ns, device,
                          log=lambda m: err.print(m, highlight=False))
        if out is not None:
            write_json_atomic(out, res, indent=2)
        if emit(res):
            return
        t = Table("estimate", "predicted dF", "/ measured", title=f"dF of {recipe} on {model}: measured "
                  f"{res['measured_dF']:.5g} ({res['tokens']} tokens)")
        for r in res["estimates"]:
            t.add_row(r["estimate"], f"{r['predicted']:.5g}", f"{r['ratio_to_measured']:.3f}")
        err.print(t)


@app.command("utilization")
def utilization_cmd(
    model: str = MODEL,
    calib: Optional[list[Path]] = CALIB,
    samples: int = typer.Option(32, "--samples", help="calibration windows (the layers' input second moments)"),
    seq_len: int = typer.Option(512, "--seq-len"),
    seed: int = typer.Option(0, "--seed"),
    tau: str = typer.Option("0.99,0.999", "--tau", help="energy thresholds, comma-separated"),
    device: str = DEVICE,
    out: Optional[Path] = typer.Option(None, "--out", help="also write the JSON result to this file"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the per-layer utilization plot (PNG) here"),
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Each Linear's utilized rank: the dimensions its calibration inputs and outputs really use, at each tau."""
    with _command(quiet, as_json) as emit:
        taus = _numbers(tau, float, "--tau", "fractions such as 0.99,0.999")
        _no_dirs(out=out, plot=plot)
        res = utilization(model, calib, samples, seq_len, seed, taus, device, log=lambda m: err.print(m, highlight=False))
        if plot is not None:
            write_atomic(plot, lambda p: utilization_plot(res, p))
        if out is not None:
            write_json_atomic(out, res, indent=2)
        if emit(res):
            return
        t = Table("layer", "d_in x d_out", *[f"rank @ {x}" for x in taus], title=f"Utilized rank of {model} "
                  f"({res['tokens']} tokens); mean utilization " + ", ".join(f"{res['mean_utilization'][str(x)]:.3f} @ {x}" for x in taus))
        for r in res["layers"]:
            full = min(r["d_in"], r["d_out"])
            t.add_row(r["layer"], f"{r['d_in']} x {r['d_out']}",
                      *[f"{r['by_tau'][str(x)]['rank']} ({r['by_tau'][str(x)]['rank'] / full:.0%})" for x in taus])
        err.print(t)


def main() -> None:
    sigterm_as_interrupt()
    app()


if __name__ == "__main__":
    main()
