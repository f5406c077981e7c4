"""The weights outside the blocks (issue 25 item 4): a recipe step may name the input embedding and lm_head; a tied
pair is quantized once and read by both; the artifact loads in ours equal to the fake-quantized reference and,
where transformers can read the layout, in transformers; what cannot be done is refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import tiny_models
from conftest import run_cli


def _recipe(tmp_path: Path, name: str, steps: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text("version: 1\npasses:\n" + steps)
    return p


BLOCKS_G32 = "  - pass: rtn\n    bits: 4\n    group_size: 32\n    symmetric: false\n"


def _compress(src: Path, recipe: Path, out: Path, calib: Path) -> dict:
    import compressor

    return compressor.compress(str(src), recipe, out, calib=[calib], samples=4, seq_len=32, device="cpu")


def _keys(art: Path) -> set[str]:
    with safe_open(art / "model.safetensors", "pt") as h:
        return set(h.keys())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "bert"])
def test_embedding_quantized_one_scheme(arch, tiny_dir, small_calib, tmp_path):
    """The embedding (tied to lm_head in llama and gemma3, Gemma's scaled by sqrt(hidden); BERT's word embeddings)
    quantized with the blocks' scheme: ours equals the fake-quantized reference exactly, transformers opens it with
    the same logits, a tied lm_head is stored nowhere and shares the embedding's buffers, and the model's bits per
    weight drop below what the blocks alone give."""
    src = tiny_dir(arch)
    recipe = _recipe(tmp_path, "emb", BLOCKS_G32 + "  - pass: rtn\n    targets: "
                     "['re:.*(embed_tokens|word_embeddings)$']\n    bits: 4\n    group_size: 32\n    symmetric: false\n")
    blocks_only = _compress(src, _recipe(tmp_path, "blocks", BLOCKS_G32), tmp_path / "blocks", small_calib)
    summary = _compress(src, recipe, tmp_path / "a", small_calib)
    art = tmp_path / "a"
    layers = json.loads((art / "compression.json").read_text())["layers"]
    emb = next(n for n in layers if n.endswith(("embed_tokens", "word_embeddings")))
    assert layers[emb]["pass"] == "rtn" and layers[emb]["bits"] == 4
    keys = _keys(art)
    assert f"{emb}.weight_packed" in keys and f"{emb}.weight" not in keys
    assert summary["bits_per_weight_model"] < blocks_only["bits_per_weight_model"] - 20  # the table was fp32
    res = tiny_models.check(src, art, tiny_models.prompt_ids(49152))
    assert res["ours_max_diff"] == 0.0, res
    assert res["transformers_ok"], res["transformers_detail"]
    if arch != "bert":  # tied: quantized once, lm_head reads the embedding's buffers
        import compressor

        assert layers[emb]["tied_to"] == "lm_head"
        assert not [k for k in keys if k.startswith("lm_head.")]
        qc = json.loads((art / "config.json").read_text())["quantization_config"]
        group = next(g for g in qc["config_groups"].values() if emb in g["targets"])
        assert "lm_head" in group["targets"] and "lm_head" not in qc["ignore"]  # llm-compressor's tied layout
        model = compressor.load(art)
        assert model.lm_head.weight_packed is model.get_input_embeddings().weight_packed


def test_untied_head_and_embedding_own_grids(tiny_dir, small_calib, tmp_path):
    """An untied model (qwen2): lm_head at 8 bits per channel, the embedding at 4 bits group 32, each its own step;
    ours equals the reference exactly and each is stored under its own checkpoint key."""
    src = tiny_dir("qwen2")
    recipe = _recipe(tmp_path, "r", BLOCKS_G32
                     + "  - pass: rtn\n    targets: [lm_head]\n    bits: 8\n    group_size: -1\n    symmetric: true\n"
                     + "  - pass: rtn\n    targets: [embed_tokens]\n    bits: 4\n    group_size: 32\n    symmetric: false\n")
    _compress(src, recipe, tmp_path / "a", small_calib)
    layers = json.loads((tmp_path / "a" / "compression.json").read_text())["layers"]
    assert (layers["lm_head"]["bits"], layers["lm_head"]["group_size"]) == (8, -1)
    assert (layers["model.embed_tokens"]["bits"], layers["model.embed_tokens"]["group_size"]) == (4, 32)
    assert "tied_to" not in layers["lm_head"] and "tied_to" not in layers["model.embed_tokens"]
    keys = _keys(tmp_path / "a")
    assert {"lm_head.weight_packed", "model.embed_tokens.weight_packed"} <= keys
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & keys
    res = tiny_models.check(src, tmp_path / "a", tiny_models.prompt_ids(49152))
    assert res["ours_max_diff"] == 0.0, res


def test_quant_embedding_lookup_is_the_dequantized_table():
    """QuantEmbedding's lookup (only the rows read are dequantized) equals F.embedding of the whole dequantized
    table, symmetric and asymmetric, with a scaled word embedding's factor applied as transformers does."""
    from compressor.modules import QuantEmbedding
    from compressor.quant import quantize_rtn

    torch.manual_seed(0)
    w = torch.randn(300, 64)
    ids = torch.randint(0, 300, (3, 17))
    for sym in (True, False):
        qw = quantize_rtn(w, 4, 32, sym, torch.float16)
        emb = QuantEmbedding(300, 64, 4, 32, sym, torch.float16, embed_scale=8.0, round_scale=True)
        emb.load_state_dict({k: v for k, v in qw.to_tensors().items()})
        table = qw.dequantize(torch.float32)
        assert torch.equal(emb(ids), nn.functional.embedding(ids, table) * 8.0)


def test_refused_before_any_work(tiny_dir, small_calib, tmp_path):
    """A pass that needs calibration inputs naming lm_head, and two passes naming the two ends of a tied pair (one
    tensor), exit 2 with a message that names them; nothing is written."""
    src = tiny_dir("llama")
    gptq = _recipe(tmp_path, "g", "  - pass: gptq\n    targets: [lm_head]\n    bits: 4\n")
    r = run_cli("model", str(src), "--recipe", str(gptq), "--out", str(tmp_path / "o1"), "--calib", str(small_calib),
                "--samples", "4", "--seq-len", "32")
    assert r.returncode == 2, r.stderr
    assert "lm_head" in r.stderr and "outside the model's blocks" in r.stderr and "rtn" in r.stderr
    two = _recipe(tmp_path, "two", "  - pass: rtn\n    targets: [embed_tokens]\n    bits: 8\n"
                  "  - pass: rtn\n    targets: [lm_head]\n    bits: 4\n")
    r = run_cli("model", str(src), "--recipe", str(two), "--out", str(tmp_path / "o2"), "--calib", str(small_calib),
                "--samples", "4", "--seq-len", "32")
    assert r.returncode == 2, r.stderr
    assert "tied" in r.stderr and "two passes" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
