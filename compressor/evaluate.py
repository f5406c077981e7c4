"""Quality of a model or artifact on text.

Decoders: perplexity over non-overlapping windows of the first `max_tokens` tokens, and with a base model the
mean per-token KL(base || model) over the same positions. Encoders: mean cosine similarity of mean-pooled
embeddings to the base model's, per window. A window starts with the token the tokenizer puts in front of a text
(data.default_bos: a decoder's BOS, BERT's [CLS]) when it puts one there, unless `bos` forces it; the base model
sees the same windows. Each window predicts its tokens 2..T: with a BOS, all its text; without, all but the first.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .artifact.reader import load_model
from .data import eval_windows, pick_bos, read_texts, tokenize
from .errors import BadInput
from .models import is_causal_lm, load_tokenizer, pick_device, resolve_model
from .modules import dequantize_model


@torch.no_grad()
def log_probs(model: nn.Module, window: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Next-token log-probabilities of one window (T,): (T-1, V) float32."""
    return F.log_softmax(model(input_ids=window.unsqueeze(0).to(device)).logits[0, :-1].float(), -1)


@torch.no_grad()
def nll_and_kl(model: nn.Module, windows: torch.Tensor, base: nn.Module | list[torch.Tensor] | None,
               device: torch.device, on_window: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Mean next-token NLL (and KL(base || model)) over windows (n, T), one window at a time. `base` is a
    model, or its log-probabilities per window already computed (benchmarks compare many models to one)."""
    nll = kl = 0.0
    count = 0
    for i, w in enumerate(windows):
        logp = log_probs(model, w, device)
        target = w[1:].to(device)
        nll += float(F.nll_loss(logp, target, reduction="sum"))
        if base is not None:
            base_logp = base[i] if isinstance(base, list) else log_probs(base, w, device)
            kl += float((base_logp.exp() * (base_logp - logp)).sum())
        count += target.numel()
        if on_window:
            on_window(i)
    out: dict[str, Any] = {"perplexity": math.exp(nll / count), "nll": nll / count, "predicted_tokens": count}
    if base is not None:
        out["kl_to_base"] = kl / count
    return out


@torch.no_grad()
def embedding_similarity(model: nn.Module, base: nn.Module, windows: torch.Tensor, device: torch.device,
                         on_window: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Mean cosine similarity of mean-pooled last hidden states, model vs base, one value per window."""
    sims = []
    for i, w in enumerate(windows):
        ids = w.unsqueeze(0).to(device)
        a = model(input_ids=ids).last_hidden_state.mean(1)
        b = base(input_ids=ids).last_hidden_state.mean(1)
        sims.append(float(F.cosine_similarity(a.float(), b.float())[0]))
        if on_window:
            on_window(i)
    return {"cosine_similarity": sum(sims) / len(sims), "cosine_similarity_min": min(sims)}


def evaluate(target: str, data: list[str | Path], max_tokens: int = 16384, seq_len: int = 512,
             base: str | None = None, device: str = "auto", allow_pickle: bool = False,
             trust_remote_code: bool = False, on_window: Callable[[int, int], None] | None = None,
             verify: bool = True, bos: bool | None = None) -> dict[str, Any]:
    """Perplexity (and KL to `base`) of a decoder, or embedding similarity to `base` of an encoder. An artifact
    (target or base) is checked against its manifest before it is loaded (check_artifact) unless not `verify`.
    Windows start with a BOS when the target's tokenizer adds one (`bos` None) or when `bos` is True, never when it
    is False (data.pick_bos); the result's `bos` says which."""
    t0 = time.perf_counter()
    if not data:
        raise BadInput("evaluation needs --data FILE")
    if seq_len < 2 or max_tokens < seq_len:
        raise BadInput(f"need 2 <= seq_len <= max_tokens, got seq_len {seq_len}, max_tokens {max_tokens}")
    texts = read_texts([Path(d) for d in data])  # bad data files fail before any model is loaded
    dev = pick_device(device)
    src = resolve_model(str(target), allow_pickle, trust_remote_code)
    model = load_model(target, str(dev), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, verify=verify)
    if dev.type == "cpu":
        dequantize_model(model)  # same numbers as QuantLinear's reference path, dequantized once
    base_model = (load_model(base, str(dev), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, verify=verify)
                  if base else None)
    tokenizer = load_tokenizer(src.path, trust_remote_code)  # after load_model: an artifact's files are checked first
    tokens = tokenize(tokenizer, texts)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise BadInput(f"seq_len {seq_len} is longer than the model's max_position_embeddings {limit}")
    bos_id = pick_bos(tokenizer, bos)
    windows = eval_windows(tokens, seq_len, max_tokens, bos=bos_id)
    tick = (lambda i: on_window(i, len(windows))) if on_window else None
    if is_causal_lm(model):
        res = nll_and_kl(model, windows, base_model, dev, tick)
    else:
        if base_model is None:
            raise BadInput("an encoder is judged by embedding similarity to its base model: pass --base MODEL")
        res = embedding_similarity(model, base_model, windows, dev, tick)
    return {"target": str(target), **res, "tokens": int(windows.numel()), "windows": int(windows.shape[0]),
            "seq_len": seq_len, "bos": bos_id is not None, "base": base, "data": [str(d) for d in data],
            "seconds": round(time.perf_counter() - t0, 2)}
