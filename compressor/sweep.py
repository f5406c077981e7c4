"""`compress sweep`: run several recipes on one model, evaluate each, and keep one JSON record per run.

Layout of the output directory (what `compress report` reads):

    runs/base/record.json           the uncompressed model on the same evaluation data
    runs/<recipe>/artifact/         the compressed artifact
    runs/<recipe>/compress.json     the `compress model --json` summary (the artifact is finished)
    runs/<recipe>/compress.log      its log
    runs/<recipe>/record.json       recipe, bits per weight, size, quality, bos (whether the evaluation windows
                                    started with one), wall time, peak memory, versions, seed and input hashes:
                                    written last, so a run with a record is finished

Each compression and each evaluation runs in its own process: a run's peak memory is that process's own
peak, a crash in one run does not take the others with it, and the sweep resumes where it stopped (a run
with a record, or an artifact with its summary, is not redone when its inputs are the same). A record whose
inputs differ (another recipe text, model, data or setting) is never overwritten without --force.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from . import __version__
from .data import DEFAULT_CORPUS, pick_bos, read_texts
from .files import sha256_file, write_json_atomic
from .errors import BadInput, CompressorError
from .models import find_blocks, load_tokenizer, model_class, resolve_model, safetensors_files, skeleton
from .passes import get_pass
from .recipe import load_recipe
from .runner import check_targets

RECORD = "record.json"
# env of a `compress model` that a sweep starts: the fd of a pipe to the sweep, one JSON line per finished block
PROGRESS_FD = "COMPRESSOR_PROGRESS_FD"
Event = Callable[[str, dict[str, Any]], None]


def _files_info(files: list[Path]) -> list[dict[str, str]]:
    return [{"name": Path(f).name, "sha256": sha256_file(Path(f))} for f in files]


def run_name(ref: str) -> str:
    """The directory name of a recipe's run: a recipe file's stem, or the shipped name as it is. A name that is
    not one plain directory name (empty, a leading dot as in `.` or `..`, a path separator) is refused, so a run
    cannot land outside the sweep's --out."""
    p = Path(ref)
    name = p.stem if p.suffix in (".yaml", ".yml") or p.is_file() else str(ref)
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise BadInput(f"recipe {ref}: its run directory name {name!r} is not a plain name (empty, a leading dot or "
                       "a path separator); rename the recipe file")
    return name


def is_encoder(config: dict) -> bool:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    return "CausalLM" not in model_class(cfg).__name__


def block_reporter() -> Callable[[int, int, str], None] | None:
    """In a `compress model` that a sweep started: report(i, n, prefix) writes block i of n as one JSON line,
    {"block": i, "blocks": n, "prefix": prefix}, to the sweep's pipe (PROGRESS_FD). None in any other run."""
    fd = os.environ.pop(PROGRESS_FD, None)
    if fd is None:
        return None
    pipe = os.fdopen(int(fd), "w", buffering=1)  # line-buffered: each event is in the pipe when written

    def report(i: int, n: int, prefix: str) -> None:
        pipe.write(json.dumps({"block": i, "blocks": n, "prefix": prefix}) + "\n")

    return report


def _read_blocks(fd: int, pending: bytearray, on_block: Callable[[dict[str, Any]], None]) -> None:
    """Hand every complete JSON line waiting in the pipe `fd` to `on_block`, without waiting for more."""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # the child has exited
            break
        pending += chunk
    *lines, rest = pending.split(b"\n")
    pending[:] = rest
    for line in lines:
        on_block(json.loads(line))


def _child(args: list[str], log: Path, on_block: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`compress ARGS --json` in a fresh process: its JSON object; its stderr lines go to `log` as they come. With
    `on_block`, each block event the child reports (block_reporter) goes to it: the child writes an event before
    the block's log line, so the events are read after each line."""
    cmd = [sys.executable, "-m", "compressor.cli", *args, "--json"]
    env = {**os.environ, "COLUMNS": "200"}
    r = w = None
    if on_block:
        r, w = os.pipe()
        env[PROGRESS_FD] = str(w)
    pending = bytearray()
    lines = []
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              pass_fds=() if w is None else (w,)) as p, open(log, "w") as logf:
            if w is not None:
                os.close(w)  # the child holds the writing end: the pipe ends when the child does
                w = None
            try:
                for line in p.stderr:  # type: ignore[union-attr]
                    lines.append(line)
                    logf.write(line)  # as it comes: `tail -f` shows a long run's progress
                    logf.flush()
                    if r is not None:
                        _read_blocks(r, pending, on_block)
                out = p.stdout.read()  # type: ignore[union-attr]
                code = p.wait()
                if r is not None:
                    _read_blocks(r, pending, on_block)
            except BaseException:  # interrupted: the child cleans up its own half-written output, then we go
                p.terminate()
                p.wait()
                raise
    finally:
        for fd in (r, w):
            if fd is not None:
                os.close(fd)
    if code != 0:
        tail = "".join(lines[-15:]).strip()
        raise CompressorError(f"`compress {' '.join(args)}` exited {code}" + (f":\n{tail}" if tail else ""))
    return json.loads(out)


def sweep(model: str, recipes: list[str], eval_data: list[str | Path], out: str | Path,
          calib: list[str | Path] | None = None, samples: int | None = None, seq_len: int | None = None,
          seed: int | None = None, eval_tokens: int = 16384, eval_seq_len: int = 512, device: str = "auto",
          force: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
          on_event: Event = lambda kind, info: None, bos: bool | None = None) -> dict[str, Any]:
    """Compress `model` with each recipe and evaluate it on `eval_data`; returns {"out", "base", "runs", "failed",
    "bos"}. The evaluation windows start with a BOS as evaluate() picks it for `model`'s tokenizer (`bos`), the
    same for every run; `bos` in the result and in each record says whether they did.

    Events for a progress display: ("start", {runs}), ("run", {i, name, stage}), ("block", {block, blocks, prefix})
    while a recipe compresses, ("done", {i, name, record, resumed}), ("failed", {i, name, error})."""
    out = Path(out)
    if not recipes:
        raise BadInput("--recipes is empty: give at least one recipe name or path")
    recs = [load_recipe(r).with_calibration(samples=samples, seq_len=seq_len, seed=seed)
            for r in recipes]  # every recipe is checked before any work
    names = [run_name(r) for r in recipes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or "base" in names:
        raise BadInput(f"two recipes share the run name {', '.join(dupes or ['base'])}: rename a recipe file")
    resolved = dict(zip(names, recs))
    if not eval_data:
        raise BadInput("the sweep needs --eval FILE")
    read_texts([Path(f) for f in eval_data])
    if calib:
        read_texts([Path(f) for f in calib])
    if out.exists() and not out.is_dir():
        raise BadInput(f"output {out} exists and is not a directory")
    for name in ["base", *names]:  # a run directory that is a symbolic link out of --out is refused too
        if (out / name).resolve().parent != out.resolve():
            raise BadInput(f"run directory {out / name} resolves outside --out {out}")
    src = resolve_model(model, allow_pickle, trust_remote_code)
    if src.is_compressed:
        raise BadInput(f"model {model} is already compressed (compressed-tensors); give the uncompressed checkpoint")
    encoder = is_encoder(src.config)
    eval_bos = pick_bos(load_tokenizer(src.path, trust_remote_code), bos) is not None
    blocks_prefix, blocks = find_blocks(skeleton(src.path, trust_remote_code))
    for name, rec in resolved.items():  # a recipe whose targets select nothing fails now, not when its run comes
        try:
            check_targets(blocks_prefix, blocks, [(spec, get_pass(spec.name)) for spec in rec.passes])
        except BadInput as e:
            raise BadInput(f"recipe {name}: {e}") from None

    inputs = {
        "model": {"ref": model, "kind": src.kind, "files": _files_info([src.path / "config.json", *safetensors_files(src.path)])},
        "calibration": _files_info(list(calib or DEFAULT_CORPUS)),
        "evaluation": _files_info(eval_data), "eval_tokens": eval_tokens, "eval_seq_len": eval_seq_len,
    }
    if eval_bos:  # only when True: every record written before BOS windows existed evaluated without, and keeps its key
        inputs["eval_bos"] = True
    out.mkdir(parents=True, exist_ok=True)
    plan = []
    for name, rec in resolved.items():
        key = hashlib.sha256(json.dumps({"inputs": inputs, "recipe": rec.to_yaml()}, sort_keys=True).encode()).hexdigest()
        d = out / name
        if (d / RECORD).is_file() and json.loads((d / RECORD).read_text()).get("key") != key and not force:
            raise BadInput(f"{d} holds a finished run with other inputs (recipe, model, data or settings changed); "
                           "pass --force to redo it, or use another --out")
        plan.append((name, rec, key, d))
    on_event("start", {"runs": len(plan) + 1, "names": ["base", *names]})

    common = ["--device", device] + (["--allow-pickle"] if allow_pickle else []) + \
             (["--trust-remote-code"] if trust_remote_code else [])
    eval_args = [x for f in eval_data for x in ("--data", str(f))] + \
                ["--max-tokens", str(eval_tokens), "--seq-len", str(eval_seq_len),
                 "--bos" if eval_bos else "--no-bos"] + common
    base = _base_record(model, src.config, out, inputs, encoder, eval_bos, eval_args, force, on_event)

    runs, failed = [], []
    for i, (name, rec, key, d) in enumerate(plan, 1):
        if (d / RECORD).is_file() and not force:
            record = json.loads((d / RECORD).read_text())
            if record.get("key") == key:
                runs.append(record)
                on_event("done", {"i": i, "name": name, "record": record, "resumed": True})
                continue
        d.mkdir(exist_ok=True)
        try:
            record = _run(model, name, rec, key, d, inputs, calib, common, eval_args, force, i, on_event)
        except CompressorError as e:
            failed.append({"name": name, "error": str(e)})
            on_event("failed", {"i": i, "name": name, "error": str(e)})
            continue
        runs.append(record)
        on_event("done", {"i": i, "name": name, "record": record, "resumed": False})
    return {"out": str(out), "base": base, "runs": runs, "failed": failed, "bos": eval_bos}


def _base_record(model: str, config: dict, out: Path, inputs: dict, encoder: bool, bos: bool, eval_args: list[str],
                 force: bool, on_event: Event) -> dict[str, Any]:
    d = out / "base"
    key = hashlib.sha256(json.dumps({"inputs": inputs, "base": True}, sort_keys=True).encode()).hexdigest()
    if (d / RECORD).is_file() and not force:
        record = json.loads((d / RECORD).read_text())
        if record.get("key") == key:
            on_event("done", {"i": 0, "name": "base", "record": record, "resumed": True})
            return record
    d.mkdir(exist_ok=True)
    on_event("run", {"i": 0, "name": "base", "stage": "evaluating"})
    if encoder:  # the base model's embeddings against themselves: cosine 1 by definition, nothing to run
        quality: dict[str, Any] = {"cosine_similarity": 1.0}
    else:
        res = _child(["eval", model, *eval_args], d / "eval.log")
        quality = {"perplexity": res["perplexity"], "kl_to_base": 0.0, "tokens": res["tokens"]}
    record = {"name": "base", "key": key, "model": model, "kind": "encoder" if encoder else "decoder",
              "bits_per_weight": 8.0 * _dtype_bytes(config.get("dtype") or config.get("torch_dtype")), "quality": quality,
              "bos": bos,
              "tool_version": __version__, "inputs": inputs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(d / RECORD, record, indent=2, sort_keys=True)
    on_event("done", {"i": 0, "name": "base", "record": record, "resumed": False})
    return record


def _dtype_bytes(dtype: str | None) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4}.get(str(dtype), 4)


def _run(model: str, name: str, rec, key: str, d: Path, inputs: dict, calib, common: list[str],
         eval_args: list[str], force: bool, i: int, on_event: Event) -> dict[str, Any]:
    art, summary_file = d / "artifact", d / "compress.json"
    recipe_file = d / "recipe.yaml"
    recipe_text = rec.to_yaml()
    if force or not (summary_file.is_file() and art.is_dir() and recipe_file.is_file()
                     and recipe_file.read_text() == recipe_text
                     and json.loads(summary_file.read_text()).get("key") == key):
        summary_file.unlink(missing_ok=True)
        recipe_file.write_text(recipe_text)
        on_event("run", {"i": i, "name": name, "stage": "compressing"})
        args = ["model", model, "--recipe", str(recipe_file), "--out", str(art), "--force", *common]
        args += [x for f in calib or [] for x in ("--calib", str(f))]
        summary = _child(args, d / "compress.log", lambda b: on_event("block", b))
        write_json_atomic(summary_file, {**summary, "key": key}, indent=2, sort_keys=True)
    summary = json.loads(summary_file.read_text())
    on_event("run", {"i": i, "name": name, "stage": "evaluating"})
    res = _child(["eval", str(art), *eval_args, "--base", model], d / "eval.log")
    quality = {k: res[k] for k in ("perplexity", "kl_to_base", "cosine_similarity", "cosine_similarity_min", "tokens")
               if k in res}
    record = {
        "name": name, "key": key, "model": model, "recipe": yaml.safe_load(recipe_text), "passes": [p.name for p in rec.passes],
        "artifact": str(art.relative_to(d.parent)),
        "bits_per_weight": summary["bits_per_weight"], "size_bytes": summary["size_bytes"],
        "quality": quality, "bos": res["bos"],
        "compress_seconds": summary["seconds"], "eval_seconds": res.get("seconds"),
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "peak_gpu_memory_bytes": summary.get("peak_gpu_memory_bytes"),
        "seed": rec.calibration.seed, "calibration": summary.get("calibration"),
        "tool_version": __version__, "inputs": inputs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(d / RECORD, record, indent=2, sort_keys=True)
    return record
