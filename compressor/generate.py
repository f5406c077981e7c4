"""`compress generate`: greedy continuation of a prompt by a decoder, artifact or any model reference, timed."""
from __future__ import annotations

import time
from typing import Any

import torch

from . import ops
from .artifact.reader import load_model
from .errors import BadInput
from .models import is_causal_lm, load_tokenizer, pick_device, pick_dtype, resolve_model
from .modules import dequantize_model


def generate(target: str, prompt: str, max_new_tokens: int = 64, device: str = "auto", dtype: str = "auto",
             ignore_eos: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
             verify: bool = True) -> dict[str, Any]:
    """`compress generate`: greedy continuation of `prompt` by a decoder (artifact or any model reference), with
    the decoding speed. On a GPU an artifact's QuantLinear layers run the CUDA kernels (batch 1: the fused
    dequant-matmul); on the CPU the weights are dequantized once (the same numbers, faster than per token). An
    artifact is checked against its manifest first (check_artifact) unless not `verify`."""
    if not prompt:
        raise BadInput("--prompt is empty")
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    src = resolve_model(str(target), allow_pickle, trust_remote_code)
    model = load_model(target, str(dev), dt, allow_pickle, trust_remote_code, verify)
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
