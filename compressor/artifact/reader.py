"""Reading an artifact back (DESIGN.md §4): its manifest and the check of every file against it (verify_hashes),
the torch model from it (load_model: QuantLinear, LowRankLinear and sparse-bitmask layers rebuilt), `inspect`'s
description, the base model it records, and verify's row for transformers' own loader."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from ..errors import BadInput, CompressorError
from ..files import sha256_file
from ..lowrank import LOWRANK
from ..models import (Checkpoint, ModelSource, checkpoint_key, embedding_scale, is_causal_lm, load_dense, materialize,
                      model_class, pick_device, read_json_object, resolve_model, skeleton, tied_output_weight)
from ..modules import LowRankLinear, QuantEmbedding, QuantLinear
from ..quant import QWeight, pack_int32, qweight_from_tensors
from ..targets import matches
from ..sparse import SUFFIXES as SPARSE_SUFFIXES, SparseWeight
from ..sparse import SPARSE_BITMASK
from .manifest import MANIFEST, MANIFEST_DIGEST, file_hashes, source_files


def read_manifest(path: Path) -> dict:
    """compression.json of an artifact (BadInput if it is missing, unreadable or not a manifest's shape)."""
    f = Path(path) / MANIFEST
    if f.is_symlink() or not f.is_file():
        raise BadInput(f"{path} is not a compressor artifact (no {MANIFEST}" + (" file: it is a symlink)" if f.is_symlink() else ")"))
    manifest = read_json_object(f)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BadInput(f"{f}: `files` is not a mapping of file names to sha256 digests")
    layers = manifest.get("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise BadInput(f"{f}: `layers` is not a mapping of layer names to entries")
    return manifest


def manifest_check(path: Path) -> tuple[str, str | None]:
    """(sha256 of compression.json, the problem or None): the digest must equal the one in the sidecar
    compression.json.sha256. An artifact without the sidecar (written before it existed, or with it removed)
    is refused: its manifest cannot be told from an edited one."""
    path = Path(path)
    digest = sha256_file(path / MANIFEST)
    side = path / MANIFEST_DIGEST
    if side.is_symlink() or not side.is_file():
        return digest, (f"{MANIFEST_DIGEST} is missing, so {MANIFEST} cannot be checked (an artifact written before "
                        "compressor recorded it: compress it again)" if not side.is_symlink()
                        else f"{MANIFEST_DIGEST} is a symlink, not a file of the artifact")
    recorded = side.read_bytes().split(maxsplit=1)[:1]
    if recorded != [digest.encode()]:
        return digest, f"{MANIFEST} was changed after it was written (its sha256 {digest} is not the one in {MANIFEST_DIGEST})"
    return digest, None


def bad_file_name(name: str) -> bool:
    """A `files` entry that is not a plain file name inside the artifact directory."""
    return (not name or ".." in name or "/" in name or "\\" in name or "\0" in name or os.sep in name
            or Path(name).is_absolute())


def verify_hashes(path: Path, manifest: dict) -> list[str]:
    """The artifact's problems, one line each ([] when it is intact): the manifest's own digest (manifest_check);
    every name in `files` a plain name, a regular file of the directory (no symlink) with that sha256; every entry of
    the directory listed (all the loaders read is then hashed), compression.json and its sidecar aside; config.json
    listed. A missing or extra file, a symlink, a name reaching outside: each is a mismatch."""
    path = Path(path)
    _, problem = manifest_check(path)
    bad = [problem] if problem else []
    files = manifest.get("files", {})
    for name, digest in sorted(files.items()):
        f = path / name
        if bad_file_name(name):  # with no separator and no symlink, nothing outside the directory is read
            bad.append(f"{name!r}: not a file name inside the artifact")
        elif f.is_symlink():
            bad.append(f"{name}: a symlink (the files of an artifact are regular files)")
        elif not f.exists():
            bad.append(f"{name}: missing")
        elif not f.is_file():
            bad.append(f"{name}: not a regular file")
        elif sha256_file(f) != digest:
            bad.append(f"{name}: sha256 differs")
    for f in sorted(path.iterdir()):
        if f.name in (MANIFEST, MANIFEST_DIGEST) or f.name in files:
            continue
        kind = "symlink" if f.is_symlink() else "file" if f.is_file() else "directory" if f.is_dir() else "entry"
        bad.append(f"{f.name}: a {kind} not listed in {MANIFEST}")
    if "config.json" not in files:
        bad.append(f"config.json: not listed in {MANIFEST}")
    return bad


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


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
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
        with safe_open(self.ckpt.files[key], framework="pt") as h:
            return list(h.get_slice(key).get_shape())


MASKED_QWEIGHT_TENSORS = (*QWeight.MASKED_SUFFIXES, "weight_scale", "weight_zero_point", "weight_shape")


def load_compressed(src: ModelSource, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Quantized layers become QuantLinear (a pruned one with its dense codes rebuilt: the grid's zero at the pruned
    weights), a quantized embedding QuantEmbedding (an lm_head tied to it a QuantLinear reading its buffers);
    sparse-bitmask layers (sparsity_config) plain Linear with the dense weight rebuilt from the bitmask."""
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
    linears = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    qc = src.config["quantization_config"]
    schemes = ct_layer_schemes(qc, linears)
    tied = tied_output_weight(model)  # an lm_head stored nowhere, tied to the input embedding: a target only as
    head = tied.removesuffix(".weight") if tied else None  # the quantized embedding it reads (handled below)
    if head and any(checkpoint_key(model, ckpt, f"{head}.{t}") for t in ("weight", "weight_packed")):
        head = None  # stored: a layer of its own
    if head:
        schemes.pop(head, None)
    for name in ct_sparse_layers(qc, linears):
        if name in schemes:  # quantized too: compressed-tensors compressed such a weight by quantization alone
            continue
        key = checkpoint_key(model, ckpt.ckpt, f"{name}.compressed")
        if key is None:
            raise BadInput(f"{src.path}: no sparse-bitmask tensors ({name}.compressed) for sparse layer {name}")
        base = key[: -len("compressed")]
        ckpt.derived[base + "weight"] = lambda base=base: SparseWeight.from_tensors(
            ckpt.layer(base, SPARSE_SUFFIXES)).weight
    tied_head = tied_emb = None  # the lm_head tied to a quantized input embedding reads the embedding's buffers
    for name, (bits, g, sym) in schemes.items():
        lin = model.get_submodule(name)
        key = checkpoint_key(model, ckpt, f"{name}.weight_scale")
        if key is None:
            raise BadInput(f"{src.path}: no weight_scale for quantized layer {name}")
        if isinstance(lin, nn.Embedding):
            scale, rounded = embedding_scale(lin)
            q = QuantEmbedding(lin.num_embeddings, lin.embedding_dim, bits, g, sym, ckpt.get(key).dtype, dtype, scale,
                               rounded)
            if head and lin is model.get_input_embeddings():
                tied_emb, tied_head = q, QuantLinear(lin.embedding_dim, lin.num_embeddings, bits, g, sym,
                                                     model.get_submodule(head).bias is not None, q.weight_scale.dtype)
        else:
            sparse_key = checkpoint_key(model, ckpt, f"{name}.weight_sparse_values")
            nnz = 0 if sparse_key is None else ckpt.get(sparse_key).numel()
            q = QuantLinear(lin.in_features, lin.out_features, bits, g, sym, lin.bias is not None, ckpt.get(key).dtype,
                            nnz)
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
    if tied_head is not None:  # before the load: a tied lm_head's own weight is not stored
        parent, _, child = head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, tied_head)
    materialize(model, "", ckpt, device, dtype)
    model = model.to(device)
    if tied_head is not None:
        tied_head.share_buffers(tied_emb)  # after the move: one copy on the device
    return model


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


def _hit(target: str, name: str, cls: str) -> bool:
    """Whether a compressed-tensors target names a Linear: its class name, its module name or a `re:` regex."""
    return target == cls or target == name or (target.startswith("re:") and matches(target, name))


def ct_sparse_layers(qc: dict, linears: list[tuple[str, str]]) -> list[str]:
    """The Linears (name, class name) a `sparsity_config` in sparse-bitmask format names (exact name, `re:` regex
    or class name, less its ignore list); [] without one. Other sparse formats are refused."""
    sc = qc.get("sparsity_config")
    if not sc or sc.get("format") == "dense":
        return []
    if sc.get("format") != SPARSE_BITMASK:
        raise BadInput(f"sparsity_config format {sc.get('format')!r}: only sparse-bitmask is supported")
    targets = sc.get("targets") or ["Linear"]  # compressed-tensors: no targets means every layer
    ignore = sc.get("ignore") or []
    return [name for name, cls in linears
            if any(_hit(t, name, cls) for t in targets) and not any(_hit(t, name, cls) for t in ignore)]


def ct_layer_schemes(qc: dict, linears: list[tuple[str, str]]) -> dict[str, tuple[int, int, bool]]:
    """Which Linear (name, class name) gets which (bits, group_size, symmetric) under a compressed-tensors
    quantization_config. Only integer weight-only pack-quantized groups are understood."""
    out = {}
    fmt = qc.get("format")
    for name, cls in linears:
        if any(_hit(t, name, cls) or matches(t, name) for t in qc.get("ignore") or []):
            continue
        for gname, group in (qc.get("config_groups") or {}).items():
            if not any(_hit(t, name, cls) for t in group.get("targets", [])):
                continue
            w = group.get("weights") or {}
            if (group.get("format") or fmt) != "pack-quantized" or w.get("type") != "int" or group.get("input_activations"):
                raise BadInput(f"config group {gname}: only int weight-only pack-quantized layers are supported")
            g = -1 if w.get("strategy") == "channel" else int(w["group_size"])
            out[name] = (int(w["num_bits"]), g, bool(w.get("symmetric", True)))
            break
    return out


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


VERIFY_PROMPT = "It is a truth universally acknowledged"  # verify's forward pass
# verify --transformers: the max abs difference of transformers' logits to ours on VERIFY_PROMPT, as a fraction of our
# largest |logit|. Dequantizing at load, compressed-tensors rounds the weights to float16 (2^-11 relative; measured on
# the demo at W4 per channel, asymmetric: max abs difference 0.015 on the prompt, 0.11 on 48 random tokens, about
# 0.4% of the largest logit); a weight left unloaded or misread moves logits by whole units.
TRANSFORMERS_RTOL = 0.01


def transformers_check(path: Path, info: dict[str, Any], ids: torch.Tensor, ours: torch.Tensor) -> dict[str, Any]:
    """verify's `transformers` row: the artifact opened by transformers' own loader gives, on the same prompt, our
    loader's logits (encoders: last hidden states) to TRANSFORMERS_RTOL of their largest magnitude, with no weight
    left missing. compressed-tensors dequantizes at load when a layer is asymmetric (transformers cannot run those
    packed) or an embedding is quantized (transformers 5.25's packed load initialises an nn.Embedding's `weight`,
    which a packed one no longer has); artifacts with our extensions fail it (transformers does not know them)."""
    from transformers import AutoConfig, CompressedTensorsConfig

    if info.get("extensions"):
        return {"check": "transformers", "ok": False,
                "detail": f"uses our extensions ({', '.join(info['extensions'])}), which transformers does not open"}
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    asym = any((g.get("weights") or {}).get("symmetric") is False for g in (qc.get("config_groups") or {}).values())
    modules = dict(skeleton(path).named_modules())
    emb = any(isinstance(modules.get(n), nn.Embedding) for n in info.get("layers") or {})
    dequantize = asym or emb
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    groups = len(qc.get("config_groups") or {})
    mixed = ("" if not dequantize or groups < 2 else
             "; transformers 5 dequantizes every dense layer with one config group's scheme (integrations/"
             f"compressed_tensors.get_dense_scheme), and this artifact has {groups}: it opens there only when all "
             "its quantized layers share one scheme")
    try:
        cls = model_class(AutoConfig.from_pretrained(path, trust_remote_code=False))
        model, loading = cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=False,
                                             output_loading_info=True, **kwargs)
    except Exception as e:  # any failure of transformers' loader is this check failing, not verify crashing
        return {"check": "transformers", "ok": False,
                "detail": f"transformers cannot load it: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                          + mixed}
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
    how = "dequantized at load" if dequantize else "packed"
    detail = (f"{how}: max abs difference to our loader {diff:.3g} {'<=' if diff <= bound else '>'} {bound:.3g} "
              f"({TRANSFORMERS_RTOL:g} of the largest)")
    if diff > bound:
        detail += mixed
    return {"check": "transformers", "ok": diff <= bound, "value": diff, "bound": bound, "detail": detail}
