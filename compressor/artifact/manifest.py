"""The artifact's contents (DESIGN.md §4): compression.json's names, per-layer entries and sizes, the
compressed-tensors `quantization_config` written into config.json, and the record of the source model.
What the writer writes besides the tensors (`write_metadata`) is decided here; reading it back is reader.py's."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__
from ..files import safetensors_header, sha256_file
from ..lowrank import LOWRANK
from ..models import PICKLE_SUFFIXES, ModelSource, copied_files, safetensors_files
from ..quant import MASKED_QUANT
from ..sparse import SPARSE_BITMASK
from ..weights import CompressedWeight
from .writer import ArtifactWriter

FORMAT_VERSION = 1
MANIFEST = "compression.json"
MANIFEST_DIGEST = "compression.json.sha256"  # sidecar: the manifest's own sha256, in `sha256sum` format, written last


def file_hashes(files: list[Path]) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(files)}


def manifest_digest_line(digest: str) -> str:
    """The sidecar's text: `sha256sum -c compression.json.sha256` checks it in the artifact directory."""
    return f"{digest}  {MANIFEST}\n"


def layer_entry(w: CompressedWeight, pass_name: str, rel_err: float) -> dict[str, Any]:
    """compression.json's entry of one compressed layer: the pass, what the weight says of itself (its format,
    grid, shape, sparsity, rank, bits_per_weight: CompressedWeight.manifest_entry) and its weight error."""
    return {"pass": pass_name, **w.manifest_entry(), "weight_rel_err": round(rel_err, 6)}


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


def tensor_bytes(files: list[Path]) -> dict[str, tuple[str, int, int]]:
    """Every tensor of safetensors `files`, from their headers (no data read): name -> (dtype as safetensors names
    it, number of elements, bytes)."""
    out = {}
    for f in files:
        for k, v in safetensors_header(f)[1].items():
            if k != "__metadata__":
                out[k] = (v["dtype"], math.prod(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
    return out


def model_bits_per_weight(artifact_files: list[Path], source_files: list[Path]) -> float:
    """compression.json's `bits_per_weight_model`: 8 x the bytes of every tensor the artifact's safetensors files
    hold (codes, scales, zero points, weight_shape, our extensions' tensors, and the tensors no pass compressed in
    the storage dtype: embeddings, norms, biases, ignored layers) / the number of parameters of the source model
    (the elements of its checkpoint's floating-point tensors: a tied output embedding, stored once, counts once).
    Integer tensors of the source (BERT's position_ids), copied as they are, count in neither; file headers are not
    tensors (`size_bytes`, the size on disk, counts them). `bits_per_weight` is the same over the compressed layers
    alone; an uncompressed float32 model has 32.0 here."""
    source = tensor_bytes(source_files)
    copied_ints = {k for k, (dt, _, _) in source.items() if not dt.startswith(("F", "BF"))}
    params = sum(n for k, (_, n, _) in source.items() if k not in copied_ints)
    stored = sum(b for k, (_, _, b) in tensor_bytes(artifact_files).items() if k not in copied_ints)
    return round(8 * stored / max(params, 1), 4)


def write_metadata(writer: ArtifactWriter, skel: nn.Module, src: ModelSource, layers: dict[str, dict],
                   recipe_yaml: str, info: dict[str, Any], dtype: str | None = None) -> dict[str, Any]:
    """After the tensors: config.json (quantization_config; `dtype`, the storage dtype of the tensors no pass
    compressed, when given: transformers loads the artifact in it by default), tokenizer files, recipe.yaml and
    compression.json (`info`: source, recipe, calibration, metrics, warnings; storage_dtype, bits_per_weight_model),
    sealed by its sidecar. Returns the manifest."""
    linears = [n for n, m in skel.named_modules() if isinstance(m, nn.Linear)]
    config = src.config
    config.setdefault("architectures", [type(skel).__name__])  # a GGUF conversion writes none; vLLM picks its
    # model class by it
    tied = {v["tied_to"] for v in layers.values() if "tied_to" in v}  # a tied lm_head reads a quantized embedding
    config["quantization_config"] = ct_quantization_config(layers, [n for n in linears if n not in layers and n not in tied])
    if dtype is not None:
        config["dtype"] = dtype  # what transformers' from_pretrained(dtype="auto"), its default, loads it in
        if "torch_dtype" in config:  # the name before transformers 4.56 (5.x reads `dtype` first)
            config["torch_dtype"] = dtype
    writer.write_json("config.json", config)
    for f in copied_files(src.path):  # checked again: each a regular file inside the source
        writer.copy_in(f)
    writer.write_text("recipe.yaml", recipe_yaml)
    manifest = {"format_version": FORMAT_VERSION, "tool": "compressor", "tool_version": __version__,
                "compressed_tensors_version": _ct_version(), **info, **manifest_sizes(layers)}
    files = writer.files()
    manifest["bits_per_weight_model"] = model_bits_per_weight([f for f in files if f.suffix == ".safetensors"],
                                                              safetensors_files(src.path))
    if dtype is not None:
        manifest["storage_dtype"] = dtype
    manifest["size_bytes"] = sum(f.stat().st_size for f in files)
    manifest["files"] = file_hashes(files)
    writer.write_json(MANIFEST, manifest)
    writer.write_text(MANIFEST_DIGEST, manifest_digest_line(sha256_file(writer.tmp / MANIFEST)))  # last: seals it
    return manifest


def _ct_version() -> str | None:
    try:
        import compressed_tensors

        return compressed_tensors.__version__
    except ImportError:
        return None


def ct_quantization_config(layers: dict[str, dict], unquantized_linears: list[str]) -> dict:
    """compressed-tensors `quantization_config`: one config group per (bits, group size, symmetry), each
    with explicit module-name targets, so mixed settings per layer load in transformers and vLLM. A quantized input
    embedding's tied lm_head (`tied_to` in its entry) is a target of the same group, with no tensors of its own: the
    layout llm-compressor writes for a tied pair quantized alike (one table, tie_word_embeddings kept).

    Layers pruned but not quantized (`format` "sparse-bitmask" in `layers`) are in no config group; they go into
    a `sparsity_config` (compressed-tensors' BitmaskConfig, as releases with a sparse-bitmask compressor wrote it:
    format, explicit targets, ignore null, global_sparsity = the fraction pruned over those layers, and
    sparsity_structure). Like compressed-tensors' own configs, `ignore` lists every Linear that is not
    quantized, these included: it only concerns quantization. Without any quantized layer, the config is what
    compressed-tensors wrote for a sparse-only model: quant_method and sparsity_config alone."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    sparse = {n: v for n, v in layers.items() if v.get("format") == SPARSE_BITMASK}
    factored = [n for n, v in layers.items() if v.get("format") == "lowrank"]  # our extension: outside both configs
    quantized = {n: v for n, v in layers.items() if n not in sparse and n not in factored}
    groups: dict[tuple, list[str]] = {}
    for name, info in sorted(quantized.items()):
        names = groups.setdefault((info["bits"], info["group_size"], info["symmetric"]), [])
        names += [name, info["tied_to"]] if "tied_to" in info else [name]
    config_groups = {}
    for i, ((bits, g, sym), names) in enumerate(sorted(groups.items())):
        strategy = dict(strategy="channel") if g == -1 else dict(strategy="group", group_size=g)
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, **strategy)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args, format="pack-quantized")
    if config_groups:
        qc = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                                ignore=sorted([*unquantized_linears, *sparse, *factored]))
        out = qc.model_dump(mode="json")
    else:
        out = {"quant_method": "compressed-tensors"}
    if sparse:
        out["sparsity_config"] = ct_sparsity_config(sparse)
    return out


def ct_sparsity_config(sparse: dict[str, dict]) -> dict:
    """The `sparsity_config` of the sparse-bitmask layers (compression.json entries with shape, sparsity and
    sparsity_structure): one structure when all share it, else "unstructured" (no claim)."""
    from compressed_tensors.config import BitmaskConfig

    total = sum(v["shape"][0] * v["shape"][1] for v in sparse.values())
    pruned = sum(v["sparsity"] * v["shape"][0] * v["shape"][1] for v in sparse.values())
    structures = {v["sparsity_structure"] for v in sparse.values()}
    cfg = BitmaskConfig(targets=sorted(sparse), global_sparsity=round(pruned / max(total, 1), 6),
                        sparsity_structure=structures.pop() if len(structures) == 1 else "unstructured")
    return cfg.model_dump(mode="json")


def source_files(path: Path) -> list[Path]:
    """The files a load of a model reference reads its weights from: a .gguf file itself; in a directory config.json
    and the *.safetensors files (or, without any, the pickle checkpoints)."""
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
