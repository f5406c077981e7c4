"""The architecture matrix (issue 25): every family of tests/tiny_models.py (2 blocks, hidden 128, random weights,
seed 0, the demo tokenizer) through w4-rtn, w4-gptq, FlexRound (w4-flexround with 5 steps per block) and
w4-gptq with the input embedding and lm_head quantized too (rtn on the blocks' grid, 4 bits, group 128, symmetric:
one scheme, which is what transformers reads a quantized embedding in; a tied pair quantized once), each
calibrated on 4 windows of 64 tokens of the embedded corpus (seed 0). Per cell: the run's seconds, the layers
compressed, our loader's max |logit difference| to the fake-quantized reference (transformers' own model of the
source with the artifact's dequantized weights), and transformers + compressed-tensors: whether it opens the
artifact and its max |difference| to our logits, on 2 x 48 random token ids (seed 0).

    python bench/architectures.py [--archs llama,phi3] [--work /tmp/archs]

Results: bench/results/architectures.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself off the path: bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
import tiny_models  # noqa: E402

import compressor  # noqa: E402
from compressor.models import resolve_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def learned_recipe(work: Path) -> Path:
    p = work / "w4-flexround-5.yaml"
    text = (ROOT / "recipes" / "w4-flexround.yaml").read_text()
    p.write_text(text.replace("iters: 200", "iters: 5"))
    assert "iters: 5" in p.read_text()
    return p


def embedding_recipe(work: Path) -> Path:
    p = work / "w4-gptq-emb.yaml"
    p.write_text((ROOT / "recipes" / "w4-gptq.yaml").read_text() + "  - pass: rtn\n"
                 "    targets: ['re:.*(embed_tokens|embed_in|word_embeddings|lm_head)$']\n"
                 "    bits: 4\n    group_size: 128\n    symmetric: true\n")
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default=",".join(tiny_models.ARCHS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/archs"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    demo = resolve_model("demo").path
    recipes = {"w4-rtn": "w4-rtn", "w4-gptq": "w4-gptq", "flexround-5": learned_recipe(args.work),
               "w4-gptq+emb": embedding_recipe(args.work)}
    ids = tiny_models.prompt_ids(49152)
    rows = []
    for arch in args.archs.split(","):
        src = args.work / "models" / arch
        if not (src / "config.json").is_file():
            tiny_models.build(arch, src, demo)
        for label, recipe in recipes.items():
            out = args.work / "out" / f"{arch}-{label}"
            t0 = time.perf_counter()
            row = {"arch": arch, "recipe": label}
            try:
                s = compressor.compress(str(src), recipe, out, samples=4, seq_len=64, seed=0, device="cpu", force=True)
                row.update(seconds=round(time.perf_counter() - t0, 2), layers=sum(p["layers"] for p in s["passes"]),
                           bits_per_weight=s["bits_per_weight"], bits_per_weight_model=s["bits_per_weight_model"],
                           **tiny_models.check(src, out, ids))
            except Exception as e:  # a cell that fails is a result, not the end of the matrix
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "architectures.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    lines = ["# Architecture matrix", "", "`python bench/architectures.py`; models, data and checks as in its docstring.", "",
             "Tiny random models (2 blocks, hidden 128, seed 0), 4 calibration windows of 64 tokens; logits on 2 x 48 "
             "random ids. *ours*: max abs difference of `compressor.load` to the fake-quantized reference "
             "(transformers' own model with the artifact's dequantized weights); *transformers*: the artifact "
             "opened by transformers + compressed-tensors, max abs difference to ours (bound: 1% of the largest "
             "logit). *bpw model*: bits per weight over the whole model (the tiny models are mostly embedding, stored "
             "in float32 unless quantized).", "",
             "| architecture | recipe | layers | ours loads | ours vs reference | transformers loads | transformers vs ours "
             "| bpw model | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['recipe']} | - | no: {r['error'][:80]} | - | - | - | - | - |")
            continue
        t = f"{r['transformers_max_diff']:.3g}" if r["transformers_max_diff"] is not None else r["transformers_detail"][:60]
        lines.append(f"| {r['arch']} | {r['recipe']} | {r['layers']} | yes | {r['ours_max_diff']:.3g} "
                     f"(of {r['scale']:.3g}) | {'yes' if r['transformers_ok'] else 'no'} | {t} | "
                     f"{r['bits_per_weight_model']} | {r['seconds']} |")
    (RESULTS / "architectures.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
