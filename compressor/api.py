"""The public API: compress(), load(), evaluate(). The CLI is a thin layer over these."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .artifact import (ArtifactWriter, FORMAT_VERSION, MASKED_QUANT, SPARSE_BITMASK, check_output,
                       ct_layer_schemes, ct_quantization_config, ct_sparse_layers, file_hashes)
from .artifact import MANIFEST, MANIFEST_DIGEST, manifest_check, manifest_digest_line, read_manifest, verify_hashes
from .data import check_window_request, load_windows
from .files import sha256_file
from .errors import BadInput, CompressorError
from .models import (Checkpoint, ModelSource, checkpoint_key, copied_files, find_blocks, load_dense, materialize,
                     resolve_model, skeleton)
from .modules import LowRankLinear, QuantLinear
from .quant import QWeight, pack_int32, qweight_from_tensors
from .recipe import load_recipe
from .blocks import Context, check_calibration
from .runner import BlockResult, block_tensors, checkpoint_key_prefix, run_blocks
from .lowrank import LOWRANK, LowRankWeight
from .sparse import SUFFIXES as SPARSE_SUFFIXES, SparseWeight


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BadInput(f"--device {device!r}: expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a model directory; its own code runs only with `trust_remote_code`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _prepare(model: str, recipe: str | Path, calib, samples, seq_len, seed, device: str, log: Callable[[str], None],
             allow_pickle: bool = False, trust_remote_code: bool = False):
    """What a run needs before its blocks: (recipe, device, model source, calibration windows, their info);
    seeds torch with the calibration seed."""
    rec = load_recipe(recipe).with_calibration(samples=samples, seq_len=seq_len, seed=seed)
    dev = pick_device(device)
    src = resolve_model(model, allow_pickle, trust_remote_code)
    if src.is_compressed:
        raise BadInput(f"model {model} is already compressed (compressed-tensors); give the uncompressed checkpoint")
    find_blocks(skeleton(src.path, trust_remote_code))  # an unsupported kind of model is refused before any work
    check_calibration(rec.calibration.samples, rec.calibration.seq_len, src.config, dev)
    cal = rec.calibration
    windows, cal_info = load_windows(load_tokenizer(src.path, trust_remote_code), calib, cal.samples, cal.seq_len,
                                     cal.seed)
    log(f"calibration: {cal_info['source']}: {cal.samples} windows of {cal.seq_len} tokens, seed {cal.seed}")
    torch.manual_seed(cal.seed)
    return rec, dev, src, windows, cal_info


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
    log: Callable[[str], None] = lambda msg: None,
    on_block: Callable[[int, int, str, BlockResult], None] | None = None,
) -> dict[str, Any]:
    """Compress `model` with `recipe` into the artifact directory `out`; returns the run's summary."""
    t0 = time.perf_counter()
    out = Path(out)
    local = Path(model).expanduser()  # a model path: the output may not be it or hold it (before any conversion)
    check_output(out, force, local if model != "demo" and local.exists() else None)
    rec, dev, src, windows, cal_info = _prepare(model, recipe, calib, samples, seq_len, seed, device, log,
                                                allow_pickle, trust_remote_code)
    cal = rec.calibration
    skel = skeleton(src.path, trust_remote_code)
    ckpt = Checkpoint(src.path)
    blocks_prefix, blocks = find_blocks(skel)
    ctx = Context(device=dev, seed=cal.seed, log=log)
    layers: dict[str, dict] = {}
    block_errs: dict[str, float] = {}
    with ArtifactWriter(out, force, src.path) as writer:
        def done(i: int, prefix: str, res: BlockResult) -> None:
            add_block(writer, skel, ckpt, prefix, res, layers, block_errs)
            if on_block:
                on_block(i, len(blocks), prefix, res)

        rec = run_blocks(skel, ckpt, rec, windows, ctx, done)  # with the plans' assignments
        manifest = finish_artifact(writer, skel, ckpt, src, layers, rec.to_yaml(), {
            "source": source_record(model, src),
            "recipe": {"source": rec.source, "passes": [p.name for p in rec.passes]},
            "calibration": cal_info,
            "metrics": {"block_output_rel_mse": {k: round(v, 8) for k, v in block_errs.items()}},
            "warnings": ctx.warnings,
        })
        writer.commit()
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {
        "artifact": str(out),
        "bits_per_weight": manifest["bits_per_weight"],
        "size_bytes": size,
        "seconds": round(time.perf_counter() - t0, 2),
        "passes": [{"pass": p.name, "layers": sum(1 for v in layers.values() if v["pass"] == p.name),
                    "mean_weight_rel_err": _mean([v["weight_rel_err"] for v in layers.values() if v["pass"] == p.name])}
                   for p in rec.passes],
        "mean_block_output_rel_mse": _mean(list(block_errs.values())),
        "calibration": {k: cal_info[k] for k in ("source", "samples", "seq_len", "seed")},
        "warnings": ctx.warnings,
        **peak_memory(dev),
    }


def layer_entry(w: "QWeight | SparseWeight | LowRankWeight", pass_name: str, rel_err: float) -> dict[str, Any]:
    """compression.json's entry of one compressed layer. A pruned layer adds `format` ("sparse-bitmask": pruned, not
    quantized, compressed-tensors' layout; "pack-quantized+bitmask": pruned and quantized, our extension),
    `sparsity` (fraction pruned) and `sparsity_structure`; a sparse-bitmask layer has no integer grid (`bits`,
    `group_size`, `symmetric` null) and says the dtype its kept values are stored in."""
    n, k = w.shape
    if isinstance(w, LowRankWeight):  # our extension: two factors instead of the weight (DESIGN.md section 4)
        entry = {"pass": pass_name, "format": LOWRANK, "bits": None, "dtype": str(w.a.dtype).removeprefix("torch."),
                 "rank": w.rank, "group_size": None, "requested_group_size": None, "symmetric": None, "shape": [n, k],
                 "bits_per_weight": round(w.storage_bits() / (n * k), 4), "weight_rel_err": round(rel_err, 6)}
        return entry
    if isinstance(w, SparseWeight):
        entry: dict[str, Any] = {"pass": pass_name, "format": SPARSE_BITMASK, "bits": None,
                                 "dtype": str(w.weight.dtype).removeprefix("torch."), "group_size": None,
                                 "requested_group_size": None, "symmetric": None, "shape": [n, k]}
    else:
        entry = {"pass": pass_name, "bits": w.bits, "group_size": w.group_size,
                 "requested_group_size": w.requested_group_size, "symmetric": w.symmetric, "shape": [n, k]}
        if w.sparse is not None:  # our extension: a CSR float16 residual (DESIGN.md section 4)
            entry["sparse"] = {"format": "csr-float16", "nnz": w.sparse.nnz,
                               "fraction": round(w.sparse.nnz / (n * k), 6),
                               "bits_per_weight": round(w.sparse.storage_bits((n, k)) / (n * k), 4)}
        if w.mask is not None:
            entry["format"] = MASKED_QUANT
    if isinstance(w, SparseWeight) or w.mask is not None:
        entry["sparsity"] = round(w.sparsity, 6)
        entry["sparsity_structure"] = w.structure()
    entry["bits_per_weight"] = round(w.storage_bits() / (n * k), 4)
    entry["weight_rel_err"] = round(rel_err, 6)
    return entry


def add_block(writer: ArtifactWriter, skel: nn.Module, ckpt: Checkpoint, prefix: str, res: BlockResult,
              layers: dict[str, dict], block_errs: dict[str, float]) -> None:
    """A finished block into the artifact: its tensors as a part file, its layers' compression.json entries into
    `layers` and its output error into `block_errs` (what compress() does after every block)."""
    writer.add_part(block_tensors(skel, ckpt, prefix, res.qweights))
    for name, w in sorted(res.qweights.items()):
        layers[name] = layer_entry(w, res.layer_pass[name], res.layer_err[name])
    if res.out_rel_err is not None:
        block_errs[prefix] = res.out_rel_err


def finish_artifact(writer: ArtifactWriter, skel: nn.Module, ckpt: Checkpoint, src: ModelSource,
                    layers: dict[str, dict], recipe_yaml: str, info: dict[str, Any]) -> dict[str, Any]:
    """After the blocks: the tensors outside them, model.safetensors, config.json (quantization_config),
    tokenizer files, recipe.yaml and compression.json (`info`: source, recipe, calibration, metrics, warnings).
    Returns the manifest; the caller commits the writer."""
    blocks_prefix, _ = find_blocks(skel)
    blocks_key_prefix = checkpoint_key_prefix(skel, ckpt, blocks_prefix)
    writer.add_part({k: ckpt.get(k) for k in ckpt.keys() if not k.startswith(blocks_key_prefix)})
    writer.join_parts()

    linears = [n for n, m in skel.named_modules() if isinstance(m, nn.Linear)]
    config = src.config
    config["quantization_config"] = ct_quantization_config(layers, [n for n in linears if n not in layers])
    writer.write_json("config.json", config)
    for f in copied_files(src.path):  # checked again: each a regular file inside the source
        writer.copy_in(f)
    writer.write_text("recipe.yaml", recipe_yaml)
    manifest = {"format_version": FORMAT_VERSION, "tool": "compressor", "tool_version": __version__,
                "compressed_tensors_version": _ct_version(), **info, **manifest_sizes(layers)}
    files = writer.files()
    manifest["size_bytes"] = sum(f.stat().st_size for f in files)
    manifest["files"] = file_hashes(files)
    writer.write_json(MANIFEST, manifest)
    writer.write_text(MANIFEST_DIGEST, manifest_digest_line(sha256_file(writer.tmp / MANIFEST)))  # last: seals it
    return manifest


def manifest_sizes(layers: dict[str, dict]) -> dict[str, Any]:
    """The manifest's counts over the compressed layers: bits_per_weight (all they store, scales, zero points,
    residuals, bitmasks and index included, per weight), quantized_params (weights of quantized layers, pruned
    ones included), the per-layer entries and `extensions`; with pruning also sparse_params (weights of the
    sparse-bitmask layers) and sparsity (fraction pruned over all compressed layers)."""
    def size(v: dict) -> int:
        return v["shape"][0] * v["shape"][1]

    factors = {n for n in layers if layers.get(n.rpartition(".")[0], {}).get("format") == LOWRANK}
    # a quantized factor of a factorised layer: its bits count, its numbers are the layer's (counted once)
    qparams = sum(size(v) for n, v in layers.items() if v.get("format") != SPARSE_BITMASK and n not in factors)
    sparams = sum(size(v) for v in layers.values() if v.get("format") == SPARSE_BITMASK)
    qbits = sum(v["bits_per_weight"] * size(v) for v in layers.values())
    extensions = []
    if any("sparse" in v for v in layers.values()):
        extensions.append("sparse_residual")
    if any(v.get("format") == MASKED_QUANT for v in layers.values()):
        extensions.append("sparse_bitmask_quantized")
    if any(v.get("format") == LOWRANK for v in layers.values()):
        extensions.append("lowrank")
    out = {"bits_per_weight": round(qbits / max(qparams + sparams, 1), 4), "quantized_params": qparams,
           "layers": layers, "extensions": extensions}
    if any("sparsity" in v for v in layers.values()):
        pruned = sum(v.get("sparsity", 0.0) * size(v) for v in layers.values())
        out["sparse_params"] = sparams
        out["sparsity"] = round(pruned / max(qparams + sparams, 1), 6)
    return out


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak resident memory so far (and the peak CUDA allocation on a GPU), in bytes."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    if device.type == "cuda":
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def _ct_version() -> str | None:
    try:
        import compressed_tensors

        return compressed_tensors.__version__
    except ImportError:
        return None


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
         allow_pickle: bool = False, trust_remote_code: bool = False, verify: bool = True) -> nn.Module:
    """A torch model from an artifact (QuantLinear layers, dequantized through ops.py) or from any model
    reference (floating point). An artifact's files are checked against its manifest first (check_artifact)
    unless `verify` is False."""
    if verify:
        check_artifact(path)
    src = resolve_model(str(path), allow_pickle, trust_remote_code)
    dev = pick_device(device)
    if not src.is_compressed:
        return load_dense(src, str(dev), dtype)
    return load_compressed(src, dev, dtype)


def check_artifact(path: str | Path) -> None:
    """When `path` is one of our artifacts (a directory with compression.json), every check of verify_hashes, or a
    CompressorError (exit 1) naming what does not match. Other model references are left alone: they have no
    manifest to check against. Hashing costs a read of the files (see the README's verify section)."""
    p = Path(str(path)).expanduser()
    if not (p.is_dir() and ((p / MANIFEST).exists() or (p / MANIFEST).is_symlink())):
        return
    bad = verify_hashes(p, read_manifest(p))
    if bad:
        raise CompressorError(f"artifact {p} does not match its manifest: {'; '.join(bad)} "
                              "(pass --no-verify to load it anyway)")


class ExpandedCheckpoint:
    """A Checkpoint with some tensors computed on read: the dense `weight` of a sparse-bitmask layer, the
    `weight_packed` of a pruned + quantized one, so the model loads through the usual path (materialize)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.derived: dict[str, Callable[[], torch.Tensor]] = {}

    def keys(self) -> list[str]:
        return sorted({*self.ckpt.keys(), *self.derived})

    def __contains__(self, key: str) -> bool:
        return key in self.derived or key in self.ckpt

    def get(self, key: str) -> torch.Tensor:
        return self.derived[key]() if key in self.derived else self.ckpt.get(key)

    def layer(self, base: str, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The tensors `base + suffix` that exist, keyed by suffix."""
        return {s: self.ckpt.get(base + s) for s in suffixes if base + s in self.ckpt}

    def shape(self, key: str) -> list[int] | None:
        """A stored tensor's shape from its file's header (nothing loaded); None for a tensor computed on read."""
        if key in self.derived:
            return None
        from safetensors import safe_open

        with safe_open(self.ckpt.files[key], framework="pt") as h:
            return list(h.get_slice(key).get_shape())


MASKED_QWEIGHT_TENSORS = (*QWeight.MASKED_SUFFIXES, "weight_scale", "weight_zero_point", "weight_shape")


def load_compressed(src: ModelSource, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Quantized layers become QuantLinear (a pruned one with its dense codes rebuilt: the grid's zero at the pruned
    weights); sparse-bitmask layers (sparsity_config) plain Linear with the dense weight rebuilt from the bitmask."""
    model = skeleton(src.path)
    ckpt = ExpandedCheckpoint(Checkpoint(src.path))
    layers = read_manifest(src.path).get("layers", {}) if (src.path / MANIFEST).is_file() else {}
    modules = dict(model.named_modules())
    for name, v in layers.items():  # factorised layers (our extension): the two-Linear module
        if v.get("format") == LOWRANK:
            lin, rank = modules.get(name), v.get("rank")
            if not isinstance(lin, nn.Linear):
                raise BadInput(f"{src.path}: {MANIFEST} has low-rank layer {name}, which is not a Linear of the model")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise BadInput(f"{src.path}: {MANIFEST}: low-rank layer {name} has rank {rank!r}, not a positive integer")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    LowRankLinear(lin.in_features, lin.out_features, rank, lin.bias is not None))
    linears = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    qc = src.config["quantization_config"]
    schemes = ct_layer_schemes(qc, linears)
    for name in ct_sparse_layers(qc, linears):
        if name in schemes:  # quantized too: compressed-tensors compressed such a weight by quantization alone
            continue
        key = checkpoint_key(model, ckpt.ckpt, f"{name}.compressed")
        if key is None:
            raise BadInput(f"{src.path}: no sparse-bitmask tensors ({name}.compressed) for sparse layer {name}")
        base = key[: -len("compressed")]
        ckpt.derived[base + "weight"] = lambda base=base: SparseWeight.from_tensors(
            ckpt.layer(base, SPARSE_SUFFIXES)).weight
    for name, (bits, g, sym) in schemes.items():
        lin = model.get_submodule(name)
        key = checkpoint_key(model, ckpt, f"{name}.weight_scale")
        if key is None:
            raise BadInput(f"{src.path}: no weight_scale for quantized layer {name}")
        sparse_key = checkpoint_key(model, ckpt, f"{name}.weight_sparse_values")
        nnz = 0 if sparse_key is None else ckpt.get(sparse_key).numel()
        q = QuantLinear(lin.in_features, lin.out_features, bits, g, sym, lin.bias is not None, ckpt.get(key).dtype, nnz)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        mask_key = checkpoint_key(model, ckpt.ckpt, f"{name}.weight_bitmask")
        if mask_key is not None:  # pruned + quantized (our extension): the dense codes, zero code where pruned
            base = mask_key[: -len("weight_bitmask")]
            ckpt.derived[base + "weight_packed"] = lambda base=base, bits=bits, g=g: _masked_codes(
                ckpt, base, bits, g, src.path)
    for name, v in layers.items():
        if v.get("format") == LOWRANK:
            check_layer_tensors(model, ckpt, name, f"low-rank of rank {v['rank']} in {MANIFEST}", src.path)
    for name, (bits, g, sym) in schemes.items():
        check_layer_tensors(model, ckpt, name, f"{bits}-bit {'per-channel' if g == -1 else f'group {g}'} "
                            f"{'symmetric' if sym else 'asymmetric'} in config.json", src.path)
    materialize(model, "", ckpt, device, dtype)
    return model.to(device)


def check_layer_tensors(model: nn.Module, ckpt: ExpandedCheckpoint, name: str, what: str, path: Path) -> None:
    """Every tensor the module built for compressed layer `name` (QuantLinear, LowRankLinear) expects is stored, with
    the shape it expects: an edited bit width, group size, symmetry or rank is a BadInput naming the layer, the
    tensor and both shapes, before anything is loaded."""
    module = model.get_submodule(name)
    for tname, t in [*module.named_parameters(), *module.named_buffers()]:
        full = f"{name}.{tname}"
        key = checkpoint_key(model, ckpt, full)
        if key is None:
            raise BadInput(f"{path}: layer {name} ({what}) needs tensor {full}, which the checkpoint does not have")
        stored = ckpt.shape(key)
        if stored is not None and stored != list(t.shape):
            raise BadInput(f"{path}: layer {name} ({what}): {full} should have shape {list(t.shape)}, "
                           f"the checkpoint's has {stored}")


def _masked_codes(ckpt: ExpandedCheckpoint, base: str, bits: int, g: int, path: Path) -> torch.Tensor:
    """The dense `weight_packed` of a pruned + quantized layer (its kept codes put back, the grid's zero elsewhere);
    kept codes that do not fit the bit width are a BadInput."""
    try:
        return pack_int32(qweight_from_tensors(ckpt.layer(base, MASKED_QWEIGHT_TENSORS), bits, g).q, bits)
    except ValueError as e:
        raise BadInput(f"{path}: layer {base.rstrip('.')}: {e}") from None


def describe(path: str | Path) -> dict[str, Any]:
    """`compress inspect`: the manifest of an artifact, the sha256 of compression.json itself (`manifest_sha256`,
    checked against the sidecar compression.json.sha256), its files and their check (verify_hashes)."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"{path} is not a directory")
    manifest = read_manifest(path)
    digest, _ = manifest_check(path)
    bad = verify_hashes(path, manifest)
    return {**manifest, "path": str(path), "manifest_sha256": digest, "hashes_ok": not bad, "hash_mismatches": bad}


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from .evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


VERIFY_PROMPT = "It is a truth universally acknowledged"
# verify --transformers: the max abs difference of transformers' logits to ours on VERIFY_PROMPT, as a fraction of our
# largest |logit|. Dequantizing at load, compressed-tensors rounds the weights to float16 (2^-11 relative; measured on
# the demo at W4 per channel, asymmetric: max abs difference 0.015 on the prompt, 0.11 on 48 random tokens, about
# 0.4% of the largest logit); a weight left unloaded or misread moves logits by whole units.
TRANSFORMERS_RTOL = 0.01


def verify(path: str | Path, data: list[str | Path] | None = None, max_ppl: float | None = None,
           max_kl: float | None = None, min_cos: float | None = None, base: str | None = None,
           max_tokens: int = 16384, seq_len: int = 512, device: str = "auto",
           on_window: Callable[[int, int], None] | None = None, transformers: bool = False) -> dict[str, Any]:
    """`compress verify`: compression.json against the digest its writer sealed it with (row `manifest`, the
    digest printed), every file of the artifact listed there with its sha256 and nothing else in the directory
    (`sha256`), a load and a forward pass, with `transformers` the same logits from transformers' own loader, and
    with a bound the quality on `data` (default: the embedded corpus) against the base model: `base`, else the
    source recorded at compress time while it is there unchanged (recorded_base). `passed` is False when any check
    fails.

    The digests catch accidents and edits that leave them alone; whoever can write the files can also rewrite
    every digest beside them, so a CI job that must trust an artifact pins the manifest sha256 this prints."""
    from .data import DEFAULT_CORPUS
    from .models import is_causal_lm

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
                       on_window=on_window)
        result["quality"] = {k: res[k] for k in ("perplexity", "kl_to_base", "cosine_similarity", "tokens") if k in res}
        result["data"] = [str(f) for f in files]
        result["base"] = base if needs_base else None
        for metric, bound in bounds.items():
            v = res[metric]
            ok = v >= bound if metric == "cosine_similarity" else v <= bound
            rel = ((">=", "<") if metric == "cosine_similarity" else ("<=", ">"))[0 if ok else 1]
            checks.append({"check": metric, "ok": ok, "value": v, "bound": bound,
                           "detail": f"{metric} {v:.6g} {rel} {bound:g}"})
    return {**result, "passed": all(c["ok"] for c in checks)}


def transformers_check(path: Path, info: dict[str, Any], ids: torch.Tensor, ours: torch.Tensor) -> dict[str, Any]:
    """verify's `transformers` row: the artifact opened by transformers' own loader gives, on the same prompt, our
    loader's logits (encoders: last hidden states) to TRANSFORMERS_RTOL of their largest magnitude, with no weight
    left missing. compressed-tensors dequantizes at load when a layer is asymmetric (transformers cannot run those
    packed); artifacts with our extensions fail it (transformers does not know them)."""
    from transformers import AutoConfig, CompressedTensorsConfig

    from .models import is_causal_lm, model_class

    if info.get("extensions"):
        return {"check": "transformers", "ok": False,
                "detail": f"uses our extensions ({', '.join(info['extensions'])}), which transformers does not open"}
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    asym = any((g.get("weights") or {}).get("symmetric") is False for g in (qc.get("config_groups") or {}).values())
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    try:
        cls = model_class(AutoConfig.from_pretrained(path, trust_remote_code=False))
        model, loading = cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=False,
                                             output_loading_info=True, **kwargs)
    except Exception as e:  # any failure of transformers' loader is this check failing, not verify crashing
        return {"check": "transformers", "ok": False,
                "detail": f"transformers cannot load it: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    missing = sorted({*loading.get("missing_keys", []), *(k for k, *_ in loading.get("mismatched_keys", []))})
    if missing:
        return {"check": "transformers", "ok": False,
                "detail": f"transformers leaves {len(missing)} weights unloaded ({', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''})"}
    with torch.no_grad():
        o = model.to(ours.device).eval()(input_ids=ids)
    theirs = o.logits if is_causal_lm(model) else o.last_hidden_state
    diff = float((theirs.float() - ours.float()).abs().max())
    bound = TRANSFORMERS_RTOL * float(ours.float().abs().max())
    how = "dequantized at load" if asym else "packed"
    return {"check": "transformers", "ok": diff <= bound, "value": diff, "bound": bound,
            "detail": f"{how}: max abs difference to our loader {diff:.3g} {'<=' if diff <= bound else '>'} {bound:.3g} "
                      f"({TRANSFORMERS_RTOL:g} of the largest)"}


def source_files(path: Path) -> list[Path]:
    """The files a load of a model reference reads its weights from: a .gguf file itself; in a directory config.json
    and the *.safetensors files (or, without any, the pickle checkpoints)."""
    from .models import PICKLE_SUFFIXES, safetensors_files

    if path.is_file():
        return [path]
    weights = safetensors_files(path) or sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return [f for f in [path / "config.json", *weights] if f.is_file()]


def source_record(ref: str, src: ModelSource) -> dict[str, Any]:
    """compression.json's `source`: the reference as given and its kind; for a local one the absolute path it
    resolved to, and (but for `demo`, found the same anywhere) the sha256 of the files it was read from
    (source_files), so that verify compares against this model from any directory and only while it is unchanged."""
    out: dict[str, Any] = {"ref": ref, "kind": src.kind}
    if src.kind == "demo":
        return out
    where = src.path if src.kind == "hub" else Path(ref).expanduser().resolve()
    if src.kind != "hub":
        out["path"] = str(where)
    out["sha256"] = file_hashes(source_files(where))
    return out


def recorded_base(source: dict[str, Any]) -> str:
    """The base model verify compares against without --base: the artifact's source, as recorded (source_record).
    A BadInput naming it when it is not there, or not the model the artifact was made from (its files' sha256
    differ); an artifact that recorded only a relative path (written before the path was recorded) is refused, as
    the directory it was relative to is not known."""
    ref, kind = source.get("ref"), source.get("kind")
    if kind == "demo" or not ref:
        return ref or "demo"
    if kind == "hub":
        where = resolve_model(ref).path
    elif "path" in source:
        where = Path(source["path"])
    elif Path(ref).expanduser().is_absolute():
        where = Path(ref).expanduser()
    else:
        raise BadInput(f"the artifact records its source model only as {ref!r}, relative to a directory it does not "
                       "name (written before the resolved path was recorded): pass --base MODEL")
    if kind != "hub" and not where.exists():
        raise BadInput(f"the artifact's source model {where} (given as {ref!r}) is not there: pass --base MODEL")
    recorded = source.get("sha256")
    if isinstance(recorded, dict):
        now = file_hashes(source_files(where))
        changed = sorted(n for n in {*now, *recorded} if now.get(n) != recorded.get(n))
        if changed:
            raise BadInput(f"the artifact's source model {where} is not the one it was made from ({', '.join(changed)} "
                           "changed since): pass --base MODEL")
    return ref if kind == "hub" else str(where)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on a GPU (where the fused kernels run), float32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def generate(target: str, prompt: str, max_new_tokens: int = 64, device: str = "auto", dtype: str = "auto",
             ignore_eos: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
             verify: bool = True) -> dict[str, Any]:
    """`compress generate`: greedy continuation of `prompt` by a decoder (artifact or any model reference), with
    the decoding speed. On a GPU an artifact's QuantLinear layers run the CUDA kernels (batch 1: the fused
    dequant-matmul); on the CPU the weights are dequantized once (the same numbers, faster than per token). An
    artifact is checked against its manifest first (check_artifact) unless not `verify`."""
    from . import ops
    from .models import is_causal_lm
    from .modules import dequantize_model

    if not prompt:
        raise BadInput("--prompt is empty")
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    src = resolve_model(str(target), allow_pickle, trust_remote_code)
    model = load(target, str(dev), dt, allow_pickle, trust_remote_code, verify)
    if not is_causal_lm(model):
        raise BadInput(f"{target} is not a decoder (causal LM): generate needs one")
    if dev.type == "cpu":
        dequantize_model(model, dt)
    model.eval()
    tok = load_tokenizer(src.path, trust_remote_code)
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(dev)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=kwargs["pad_token_id"])  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        secs = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    kernels = None
    if src.is_compressed:
        kernels = "cuda" if dev.type == "cuda" and ops.kernel_mode() != "reference" and ops.HAS_CUDA_KERNELS else "reference"
    return {"target": str(target), "prompt": prompt, "text": tok.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel()), "seconds": round(secs, 4),
            "tokens_per_second": round(new.numel() / secs, 2), "device": str(dev), "dtype": str(dt).removeprefix("torch."),
            "kernels": kernels}


def quantize_in_memory(model: str, recipe: str | Path, calib: list[str | Path] | None, samples: int | None,
                       seq_len: int | None, seed: int | None, device: str = "auto",
                       log: Callable[[str], None] = lambda msg: None):
    """Run a recipe without writing an artifact: (ModelSource, the calibration windows, {layer: QWeight})."""
    rec, dev, src, windows, _ = _prepare(model, recipe, calib, samples, seq_len, seed, device, log)
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
    intervals, and the first- and second-order Taylor estimates at w (pqi.py)."""
    from . import measure as pqi

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
    f0 = pqi.loss(net, windows)
    pqi.set_weights(params, w0, dw, 1.0)
    f1 = pqi.loss(net, windows)
    measured = f1 - f0
    log(f"F(w) {f0:.5f}, F(w~) {f1:.5f}: dF {measured:.5f}")
    first, second = pqi.taylor(net, params, w0, dw, windows)
    log(f"Taylor: first order {first:.4g}, second order {second:.4g}")
    rows = [{"estimate": "first-order Taylor", "predicted": first}, {"estimate": "second-order Taylor", "predicted": second}]
    per_layer: dict[str, float] = {}
    for n_int in intervals:
        c = pqi.pqi(net, params, w0, dw, windows, n_int, tick=log)
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
    """`compress utilization`: every Linear's utilized rank (compressor/lowrank.py) on the FP model, block by block:
    the input subspace from the calibration inputs' second moment, the output subspace from the input-projected
    layer's outputs, at each energy threshold tau; and the mean layer utilization (rank / min(d_in, d_out))."""
    from .algorithms import lowrank as LR
    from .blocks import stream_fp_layers

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
