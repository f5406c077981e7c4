"""The public API, orchestration only: compress() (model + recipe -> runner -> artifact writer), load(), verify()
(evaluate() is evaluate.py's). The CLI is a thin layer over these; the artifact format is artifact/'s."""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .artifact.manifest import MANIFEST, layer_entry, source_record, write_metadata
from .artifact.reader import VERIFY_PROMPT, describe, load_model, manifest_check, recorded_base, transformers_check
from . import dist, safejson
from .artifact.writer import ArtifactWriter, check_output, clean_stale
from .data import DEFAULT_CORPUS
from .errors import BadInput, CompressorError, sigterm_as_interrupt
from .evaluate import evaluate
from .models import (DTYPES, Checkpoint, ModelSource, checkpoint_key, find_blocks, is_causal_lm, load_tokenizer,
                     resolve_model, skeleton, storage_dtype)
from .blocks import Context
from .runner import (BlockResult, block_tensors, check_world, checkpoint_key_prefix, prepare, resolve_recipe,
                     run_blocks)


def compress(
    model: str = "demo",
    recipe: str | Path = "w4-gptq",
    out: str | Path = "out/demo",
    calib: list[str | Path] | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    log: Callable[[str], None] = lambda msg: None,
    on_block: Callable[[int, int, str, BlockResult], None] | None = None,
    workers: int = 1,
) -> dict[str, Any] | None:
    """Compress `model` with `recipe` into the artifact directory `out`; returns the run's summary. `dtype` is the
    storage dtype of the tensors no pass compresses (embeddings, norms, biases, ignored layers): auto (the source
    model's own, models.storage_dtype), float32, float16 or bfloat16; the passes compute in float32 regardless.

    On several ranks (torchrun, or `workers` > 1: that many local ranks spawned here, dist.py) each rank calibrates on
    its shard of the windows and rank 0 writes the artifact; its summary, with every rank's peak memory, is the
    result (None on the other ranks' return)."""
    t0 = time.perf_counter()
    out = Path(out)
    if dtype != "auto" and dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    w = dist.world()
    local = Path(model).expanduser()  # a model path: the output may not be it or hold it (before any conversion)
    check_output(out, force, local if model != "demo" and local.exists() else None, clean=w.main)
    if workers < 1:
        raise BadInput(f"--workers {workers}: expected 1 or more")
    if workers > 1 and w.size == 1:
        return _spawn_compress(workers, dict(
            model=model, recipe=recipe, out=out, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
            device=device, force=force, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype=dtype),
            log)
    rec, dev, src, windows, cal_info = prepare(model, recipe, calib, samples, seq_len, seed, device, log,
                                                allow_pickle, trust_remote_code)
    cal = rec.calibration
    skel = skeleton(src.path, trust_remote_code)
    ckpt = Checkpoint(src.path)
    ctx = Context(device=dev, seed=cal.seed, log=log)
    if not w.main:  # the same blocks on this rank's shard; rank 0 writes
        run_blocks(skel, ckpt, rec, windows, ctx, lambda i, prefix, res: None)
        dist.gather(peak_memory(dev))
        return None
    dtype = storage_dtype(src) if dtype == "auto" else dtype
    log(f"storage dtype of the tensors no pass compresses: {dtype}")
    blocks_prefix, blocks = find_blocks(skel)
    layers: dict[str, dict] = {}
    block_errs: dict[str, float] = {}
    with ArtifactWriter(out, force, src.path) as writer:
        def done(i: int, prefix: str, res: BlockResult) -> None:
            add_block(writer, skel, ckpt, prefix, res, layers, block_errs, dtype)
            if not prefix:  # the embedding / lm_head a recipe names (runner.compress_outside)
                log(f"outside the blocks: {', '.join(f'{n} ({res.layer_pass[n]})' for n in sorted(res.qweights))}")
            elif on_block:
                on_block(i, len(blocks), prefix, res)

        rec = run_blocks(skel, ckpt, rec, windows, ctx, done)  # with the plans' assignments
        manifest = finish_artifact(writer, skel, ckpt, src, layers, rec.to_yaml(), {
            "source": source_record(model, src),
            "recipe": {"source": rec.source, "passes": [p.name for p in rec.passes]},
            "calibration": cal_info,
            "metrics": {"block_output_rel_mse": {k: round(v, 8) for k, v in block_errs.items()}},
            "warnings": ctx.warnings,
        }, dtype)
        writer.commit()
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    ranks = dist.gather(peak_memory(dev))
    return {
        "artifact": str(out),
        "bits_per_weight": manifest["bits_per_weight"],
        "bits_per_weight_model": manifest["bits_per_weight_model"],
        "storage_dtype": dtype,
        "size_bytes": size,
        "seconds": round(time.perf_counter() - t0, 2),
        "passes": [{"pass": p.name, "layers": sum(1 for v in layers.values() if v["pass"] == p.name),
                    "mean_weight_rel_err": _mean([v["weight_rel_err"] for v in layers.values() if v["pass"] == p.name])}
                   for p in rec.passes],
        "mean_block_output_rel_mse": _mean(list(block_errs.values())),
        "calibration": {k: cal_info[k] for k in ("source", "samples", "seq_len", "seed", "bos")},
        "warnings": ctx.warnings,
        **ranks[0],
        **({"world_size": w.size, "ranks": ranks} if w.size > 1 else {}),
    }


def _spawn_compress(workers: int, kwargs: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """compress(**kwargs) on `workers` local ranks (dist.spawn, gloo): the recipe is checked here first, so a bad
    one exits 2 before any rank starts; rank 0's summary comes back through a file. A rank that fails ends them all:
    its exit code (2 for bad input, else 1) is the run's, and what a killed rank 0 left behind is removed."""
    check_world(resolve_recipe(kwargs["recipe"], kwargs["samples"], kwargs["seq_len"], kwargs["seed"]), workers)
    resolve_model(kwargs["model"], kwargs["allow_pickle"], kwargs["trust_remote_code"])  # a conversion, done once
    log(f"spawning {workers} ranks (gloo, {max(1, (os.cpu_count() or 1) // workers)} threads each)")
    with tempfile.TemporaryDirectory(prefix="compressor-ranks-") as tmp:
        result = Path(tmp) / "summary.json"
        try:
            dist.spawn(workers, _compress_rank, (kwargs, str(result)))
        except Exception as e:  # a rank failed: the others were ended
            clean_stale(Path(kwargs["out"]))
            code = getattr(e, "exit_code", None)
            what = f"exit code {code}" if isinstance(code, int) and code > 0 else str(e).strip().splitlines()[0]
            err = BadInput if code == 2 else CompressorError
            raise err(f"a rank failed ({what}), so every rank was stopped and nothing was written") from None
        return json.loads(result.read_text())


def _compress_rank(kwargs: dict[str, Any], result: str) -> None:
    """One spawned rank: join the group, compress, rank 0 writes its summary to `result`. Our errors exit with their
    code after printing the message (with the rank); SIGTERM (the others ending it) cleans up as Ctrl-C does."""
    sigterm_as_interrupt()
    w = dist.init(kwargs["device"])
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if w.main else (lambda m: None)
    try:
        summary = compress(**kwargs, log=log)
    except CompressorError as e:
        print(f"error (rank {w.rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    finally:
        dist.close()
    if w.main:
        Path(result).write_text(safejson.dumps(summary))


def add_block(writer: ArtifactWriter, skel: nn.Module, ckpt: Checkpoint, prefix: str, res: BlockResult,
              layers: dict[str, dict], block_errs: dict[str, float], dtype: str | None = None) -> None:
    """A finished block into the artifact: its tensors as a part file (uncompressed floating-point ones in storage
    dtype `dtype`, None: as the checkpoint has them), its layers' compression.json entries into `layers` and its
    output error into `block_errs` (what compress() does after every block)."""
    writer.add_part(block_tensors(skel, ckpt, prefix, res.qweights, DTYPES[dtype] if dtype else None))
    for name, w in sorted(res.qweights.items()):
        layers[name] = layer_entry(w, res.layer_pass[name], res.layer_err[name])
        if name in res.tied:
            layers[name]["tied_to"] = res.tied[name]
    if res.out_rel_err is not None:
        block_errs[prefix] = res.out_rel_err


def finish_artifact(writer: ArtifactWriter, skel: nn.Module, ckpt: Checkpoint, src: ModelSource,
                    layers: dict[str, dict], recipe_yaml: str, info: dict[str, Any],
                    dtype: str | None = None) -> dict[str, Any]:
    """After the blocks: the tensors outside them that no pass compressed (floating-point ones in storage dtype
    `dtype`, None: as the checkpoint has them), model.safetensors, config.json (quantization_config, dtype), tokenizer files, recipe.yaml
    and compression.json (`info`: source, recipe, calibration, metrics, warnings). Returns the manifest; the caller
    commits the writer."""
    blocks_prefix, _ = find_blocks(skel)
    blocks_key_prefix = checkpoint_key_prefix(skel, ckpt, blocks_prefix)
    cast = DTYPES[dtype] if dtype else None
    replaced = {checkpoint_key(skel, ckpt, f"{n}.weight") for n in layers}  # an embedding / lm_head compressed
    writer.add_part({k: ckpt.get(k, cast) for k in ckpt.keys() if not k.startswith(blocks_key_prefix) and k not in replaced})
    writer.join_parts()
    return write_metadata(writer, skel, src, layers, recipe_yaml, info, dtype)


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak resident memory so far (and the peak CUDA allocation on a GPU), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    if device.type == "cuda":
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
         allow_pickle: bool = False, trust_remote_code: bool = False, verify: bool = True) -> nn.Module:
    """A torch model from an artifact (QuantLinear layers, dequantized through ops.py) or from any model
    reference (floating point). An artifact's files are checked against its manifest first (check_artifact)
    unless `verify` is False."""
    return load_model(path, device, dtype, allow_pickle, trust_remote_code, verify)


def verify(path: str | Path, data: list[str | Path] | None = None, max_ppl: float | None = None,
           max_kl: float | None = None, min_cos: float | None = None, base: str | None = None,
           max_tokens: int = 16384, seq_len: int = 512, device: str = "auto",
           on_window: Callable[[int, int], None] | None = None, transformers: bool = False,
           bos: bool | None = None) -> dict[str, Any]:
    """`compress verify`: compression.json against the digest its writer sealed it with (row `manifest`, the
    digest printed), every file of the artifact listed there with its sha256 and nothing else in the directory
    (`sha256`), a load and a forward pass, with `transformers` the same logits from transformers' own loader, and
    with a bound the quality on `data` (default: the embedded corpus) against the base model: `base`, else the
    source recorded at compress time while it is there unchanged (recorded_base), on windows with a BOS as
    evaluate() picks it (`bos`; the result's `bos` says which). `passed` is False when any check fails.

    The digests catch accidents and edits that leave them alone; whoever can write the files can also rewrite
    every digest beside them, so a CI job that must trust an artifact pins the manifest sha256 this prints."""
    info = describe(path)  # BadInput when it is not an artifact
    bounds = {k: v for k, v in (("perplexity", max_ppl), ("kl_to_base", max_kl), ("cosine_similarity", min_cos))
              if v is not None}
    digest, problem = manifest_check(Path(path))
    bad_files = [b for b in info["hash_mismatches"] if b != problem]
    checks: list[dict[str, Any]] = [
        {"check": "manifest", "ok": problem is None, "detail": problem or f"{MANIFEST} sha256 {digest}"},
        {"check": "sha256", "ok": not bad_files, "detail": "; ".join(bad_files) or f"{len(info['files'])} files"}]
    result: dict[str, Any] = {"artifact": str(path), "manifest_sha256": digest, "checks": checks}
    if not info["hashes_ok"]:  # a corrupt artifact is not loaded
        return {**result, "passed": False}
    model = load(path, device, verify=False)  # just checked
    dev = next(model.parameters()).device
    ids = load_tokenizer(Path(path))(VERIFY_PROMPT, return_tensors="pt")["input_ids"].to(dev)
    with torch.no_grad():
        o = model(input_ids=ids)
    decoder = is_causal_lm(model)
    y = o.logits if decoder else o.last_hidden_state
    del model, o
    forward = {"check": "forward", "ok": bool(torch.isfinite(y).all()), "detail": f"output {tuple(y.shape)}"}
    checks.append(forward)
    if transformers:
        checks.append(transformers_check(Path(path), info, ids, y))
    if bounds and forward["ok"]:
        for metric in bounds:
            if decoder != (metric != "cosine_similarity"):
                flag = {"perplexity": "--max-ppl", "kl_to_base": "--max-kl", "cosine_similarity": "--min-cos"}[metric]
                raise BadInput(f"{flag} does not apply to {'a decoder' if decoder else 'an encoder'}")
        needs_base = "kl_to_base" in bounds or "cosine_similarity" in bounds
        if needs_base and base is None:
            base = recorded_base(info.get("source") or {})
        files = list(data) if data else list(DEFAULT_CORPUS)
        res = evaluate(str(path), files, max_tokens, seq_len, base if needs_base else None, device,
                       on_window=on_window, bos=bos)
        result["quality"] = {k: res[k] for k in ("perplexity", "kl_to_base", "cosine_similarity", "tokens") if k in res}
        result["data"] = [str(f) for f in files]
        result["base"] = base if needs_base else None
        result["bos"] = res["bos"]
        for metric, bound in bounds.items():
            v = res[metric]
            ok = v >= bound if metric == "cosine_similarity" else v <= bound
            rel = ((">=", "<") if metric == "cosine_similarity" else ("<=", ">"))[0 if ok else 1]
            checks.append({"check": metric, "ok": ok, "value": v, "bound": bound,
                           "detail": f"{metric} {v:.6g} {rel} {bound:g}"})
    return {**result, "passed": all(c["ok"] for c in checks)}
