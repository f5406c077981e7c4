"""Run llm-compressor (the peer tool) on a Hugging Face model dir, for benchmarking.

Runs in the separate peer virtualenv (see bench/peer/README.md), never in the
project's own venv:

    /work/peer-venv/bin/python bench/peer/llmcompressor_run.py --model HF_DIR \
        --calib-ids IDS.pt --method rtn|gptq --bits B --group-size G \
        [--symmetric] --out OUT_DIR [--seed 0]

IDS.pt is a torch.save'd LongTensor [n_samples, seq_len] of calibration token
windows (no BOS). They are fed verbatim to llm-compressor's ``oneshot`` (CPU).
RTN is ``QuantizationModifier``, GPTQ is ``GPTQModifier``; both weight-only int,
asymmetric unless --symmetric, strategy "channel" for G=-1 else "group".
Targets every Linear except lm_head; everything else is llm-compressor's default.

Writes the compressed-tensors (pack-quantized) checkpoint + tokenizer to OUT_DIR
and OUT_DIR/peer.json with versions, timings and the effective modifier settings.
Exit code 2: llm-compressor refused the layer-width / group-size combination.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--calib-ids", required=True, help="torch.save'd LongTensor [n, seq_len]")
    p.add_argument("--method", required=True, choices=["rtn", "gptq"])
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True, help="-1 = per output channel")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not 1 <= a.bits <= 8:
        p.error("--bits must be in 1..8")
    if a.group_size == 0 or a.group_size < -1:
        p.error("--group-size must be -1 or a positive integer")
    return a


def load_calib(path: str) -> torch.Tensor:
    ids = torch.load(path, map_location="cpu")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SystemExit(f"error: {path} must hold a 2-D LongTensor [n_samples, seq_len]")
    return ids.long()


def build_modifier(a: argparse.Namespace) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = QuantizationArgs(
        num_bits=a.bits,
        type="int",
        symmetric=a.symmetric,
        strategy="channel" if a.group_size == -1 else "group",
        group_size=None if a.group_size == -1 else a.group_size,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    cls = GPTQModifier if a.method == "gptq" else QuantizationModifier
    return cls(config_groups=groups, ignore=["lm_head"])


def effective_settings(modifier: Any) -> dict[str, Any]:
    """The modifier's settings after llm-compressor resolved its defaults."""
    from llmcompressor.core import active_session

    try:  # prefer the instance the session actually ran
        used = [m for m in active_session().lifecycle.recipe.modifiers
                if type(m) is type(modifier)]
        modifier = used[0] if used else modifier
    except Exception:
        pass
    cfg = modifier.resolved_config
    w = cfg.config_groups["group_0"].weights
    out: dict[str, Any] = {
        "modifier": type(modifier).__name__,
        "targets": sorted(modifier.resolved_targets),
        "ignore": list(cfg.ignore or []),
        "weights": json.loads(w.model_dump_json()),
        "observer": w.observer,
        "observer_kwargs": dict(w.observer_kwargs),
        "actorder": None if w.actorder is None else getattr(w.actorder, "value", w.actorder),
        "bypass_divisibility_checks": modifier.bypass_divisibility_checks,
        "pipeline": "sequential" if modifier.requires_calibration_data else "datafree",
        "batch_size": 1,  # oneshot default
    }
    for k in ("block_size", "dampening_frac", "batched_quantization"):
        if hasattr(modifier, k):
            out[k] = getattr(modifier, k)
    return out


def indivisible_layers(model: torch.nn.Module, group_size: int) -> list[str]:
    """Targeted Linear layers whose input width is not a multiple of group_size."""
    if group_size == -1:
        return []
    return [f"{name} (in_features={mod.in_features})"
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name != "lm_head"
            and mod.in_features % group_size != 0]


def is_group_size_refusal(exc: BaseException, bad_layers: list[str]) -> bool:
    text = str(exc).lower()
    named = any(s in text for s in ("group_size", "group size", "divisible"))
    return named or bool(bad_layers)  # e.g. G > width crashes in unflatten


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_calib(a.calib_ids)
    n, seq_len = int(ids.shape[0]), int(ids.shape[1])
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="auto")  # oneshot default
    modifier = build_modifier(a)
    bad_layers = indivisible_layers(model, a.group_size)

    t0 = time.perf_counter()
    try:
        model = oneshot(
            model=model,
            tokenizer=tok,
            recipe=modifier,
            dataset=ds,
            num_calibration_samples=n,
            max_seq_length=seq_len,
            shuffle_calibration_samples=False,  # deterministic order; same sample set
        )
    except (ValueError, RuntimeError) as exc:
        if is_group_size_refusal(exc, bad_layers):
            print(f"error: llm-compressor refused bits={a.bits} group_size="
                  f"{a.group_size} for this model ({len(bad_layers)} Linear layers "
                  f"have in_features % group_size != 0, e.g. {bad_layers[:2]}):\n"
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        raise
    seconds = time.perf_counter() - t0

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), save_compressed=True)
    tok.save_pretrained(str(out))

    info: dict[str, Any] = {
        "tool": "llmcompressor",
        "llmcompressor_version": md.version("llmcompressor"),
        "compressed_tensors_version": md.version("compressed-tensors"),
        "transformers_version": md.version("transformers"),
        "torch_version": torch.__version__,
        "method": a.method,
        "bits": a.bits,
        "group_size": a.group_size,
        "symmetric": a.symmetric,
        "n_samples": n,
        "seq_len": seq_len,
        "seed": a.seed,
        "calibration_used": a.method == "gptq",  # weight-only RTN is data-free
        "seconds": round(seconds, 3),
        "seconds_total": round(time.perf_counter() - T_START, 3),
        "defaults": effective_settings(modifier),
    }
    (out / "peer.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("method", "bits", "group_size", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
