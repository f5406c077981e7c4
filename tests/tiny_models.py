"""The architecture matrix: tiny random models of each family users bring (2 blocks, hidden 128, built from
transformers' config classes, the demo tokenizer beside them; nothing downloaded), and the checks one
artifact of each must pass (tests/test_architectures.py and bench/architectures.py share them):

- ours: `compressor.load` of the artifact against the *fake-quantized reference*: transformers' own model of
  the source, built by transformers from the source directory (its own fused experts, its own forward), with
  every compressed weight replaced by its dequantization straight from the artifact's packed tensors;
- transformers: the artifact opened by transformers + compressed-tensors against our loader, where it can open it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

HIDDEN, INTER = 128, 256
_DENSE = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# name -> (config class, model class, config kwargs); vocab_size is the demo tokenizer's
ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DENSE, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DENSE, sliding_window=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DENSE)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DENSE, head_dim=32)),  # q/k norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DENSE, head_dim=32, sliding_window=16)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DENSE, head_dim=32, sliding_window=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DENSE, pad_token_id=0)),  # fused qkv_proj, gate_up_proj
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=HIDDEN, ffn_dim=INTER, word_embed_proj_dim=HIDDEN, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=256)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_DENSE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                       shared_expert_intermediate_size=256)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_DENSE, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128)),
    "bert": ("BertConfig", "BertModel",
             dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)),
}


def build(name: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Tiny random model `name` saved to `out` (safetensors, float32) with the tokenizer files of `tokenizer_dir`."""
    import transformers

    cfg_cls, model_cls, kw = ARCHS[name]
    torch.manual_seed(seed)
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(vocab_size=vocab, **kw)).eval()
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tokenizer_dir / f).read_bytes())
    return out


def prompt_ids(vocab: int, tokens: int = 48, seed: int = 0) -> torch.Tensor:
    """(2, tokens) random ids: longer than the sliding windows above, so those layers are exercised."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, tokens), generator=g)


def _out(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=ids)
    return (o.logits if hasattr(o, "logits") else o.last_hidden_state).float()


def fake_quantized_reference(src: Path, artifact: Path) -> torch.nn.Module:
    """transformers' FP model of `src` with every pack-quantized weight of `artifact` dequantized into it (the
    reference dequantization, quant.dequantize_packed); fused experts get their experts' rows."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    from compressor.experts import _conversions, expert_names
    from compressor.models import model_class
    from compressor.quant import dequantize_packed

    model = model_class(AutoConfig.from_pretrained(src)).from_pretrained(src, dtype=torch.float32).eval()
    layers = json.loads((artifact / "compression.json").read_text())["layers"]
    renamings = [c for c in _conversions(model) if isinstance(c, WeightRenaming)]
    names = expert_names(model)
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "")
    with safe_open(artifact / "model.safetensors", "pt") as h:
        keys = set(h.keys())
        for key in sorted(k for k in keys if k.endswith(".weight_packed")):
            base = key[: -len(".weight_packed")]
            name = apply_renamings(f"{base}.weight", renamings)[: -len(".weight")] if renamings else base  # the
            # patterns name whole keys (gpt-neox: ^embed_out\. -> lm_head.)
            entry = layers.get(name) or layers.get(f"{prefix}.{name}")
            assert entry is not None, f"{name}: no compression.json entry"
            zp = h.get_tensor(f"{base}.weight_zero_point") if f"{base}.weight_zero_point" in keys else None
            w = dequantize_packed(h.get_tensor(key), h.get_tensor(f"{base}.weight_scale"), zp, tuple(entry["shape"]),
                                  entry["bits"], entry["group_size"], torch.float32)
            spellings = (name, f"{prefix}.{name}", name.removeprefix(prefix + "."))  # with or without the base prefix
            target = next((f"{s}.weight" for s in spellings if f"{s}.weight" in params), None)
            with torch.no_grad():
                if target is not None:
                    params[target].copy_(w)
                    continue
                m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", name)
                assert m and names, f"{name}: not a parameter of {type(model).__name__}"
                experts, e, which = m.group(1), int(m.group(2)), m.group(3)
                gate_up, down = params[f"{experts}.gate_up_proj"], params[f"{experts}.down_proj"]
                inter = down.shape[2]
                if which == names[0]:
                    gate_up[e, :inter] = w
                elif which == names[1]:
                    gate_up[e, inter:] = w
                else:
                    down[e] = w
    return model


def check(src: Path, artifact: Path, ids: torch.Tensor) -> dict:
    """{ours_max_diff, ours_scale, transformers: 'loads' | reason, transformers_max_diff}: our loader against the
    fake-quantized reference, and transformers' loader against ours."""
    import compressor
    from compressor.artifact.reader import transformers_check

    ours = _out(compressor.load(artifact), ids)
    ref = _out(fake_quantized_reference(src, artifact), ids)
    out = {"ours_max_diff": float((ours - ref).abs().max()), "scale": float(ref.abs().max())}
    info = json.loads((artifact / "compression.json").read_text())
    t = transformers_check(artifact, info, ids, ours)
    out["transformers_ok"] = t["ok"]
    out["transformers_detail"] = t["detail"]
    out["transformers_max_diff"] = t.get("value")
    return out


def code_agreement(a: Path, b: Path, bits: int = 4) -> float:
    """The fraction of equal codes over every pack-quantized weight of two artifacts of one model (bits-bit)."""
    from safetensors.torch import load_file

    from compressor.quant import unpack_int32

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    same = total = 0
    for k, v in ta.items():
        if k.endswith("weight_packed"):
            cols = int(ta[k[: -len("packed")] + "shape"][1])
            qa, qb = unpack_int32(v, bits, cols), unpack_int32(tb[k], bits, cols)
            same, total = same + int((qa == qb).sum()), total + qa.numel()
    return same / total
