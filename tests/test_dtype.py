"""The storage dtype (issue 25): the tensors no pass compresses (embeddings, norms, biases, ignored layers) are written
in the source model's own dtype (models.storage_dtype: config.json's dtype, a GGUF header's file type) or --dtype's;
compressed tensors keep their own dtypes; config.json and compression.json say it; bits_per_weight_model counts every
stored byte over the source's parameters."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import compressor
from compressor.api import compress
from compressor.errors import BadInput
from compressor.models import (Checkpoint, ModelSource, demo_gguf, gguf_dtype, gguf_file_type, resolve_model,
                               storage_dtype)

from conftest import run_cli

# compressed tensors of a quantized layer, in their own dtypes whatever the storage dtype
CODES = {"weight_packed": torch.int32, "weight_scale": torch.float16, "weight_zero_point": torch.int32,
         "weight_shape": torch.int64}


def _hf_dir(tmp_path: Path, name: str, config: dict) -> ModelSource:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return ModelSource(str(d), d, "hf")


def test_storage_dtype_of_a_config(tmp_path):
    """An HF directory: config.json's `dtype` (transformers 5), else `torch_dtype`, when a float type; else bfloat16."""
    cases = {"dtype16": ({"dtype": "float16"}, "float16"), "torch32": ({"torch_dtype": "float32"}, "float32"),
             "both": ({"dtype": "float32", "torch_dtype": "float16"}, "float32"),
             "none": ({}, "bfloat16"), "int8": ({"dtype": "int8"}, "bfloat16")}
    got = {name: storage_dtype(_hf_dir(tmp_path, name, cfg)) for name, (cfg, _) in cases.items()}
    assert got == {name: want for name, (_, want) in cases.items()}


def _gguf(path: Path, file_type: int | None) -> Path:
    """A small GGUF file written by the gguf package: a string array and scalars before general.file_type, so that
    gguf_file_type has to skip them."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "longer token"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.0])
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "tiny")
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_uint64("after", 7)
    w.add_tensor("t", np.zeros(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_header_rule(tmp_path):
    """general.file_type: 0 -> float32, 1 -> float16, 32 -> bfloat16, a quantized type (7: Q8_0) or none ->
    bfloat16; read as gguf.GGUFReader reads it. The demo GGUF is Q4_1 (3): bfloat16, though its converted
    cache's config.json says float32 (it was loaded in float32)."""
    import gguf

    want = {0: "float32", 1: "float16", 32: "bfloat16", 7: "bfloat16", None: "bfloat16"}
    for ft, dtype in want.items():
        f = _gguf(tmp_path / f"m-{ft}.gguf", ft)
        assert gguf_file_type(f) == ft and gguf_dtype(f) == dtype, (ft, gguf_file_type(f))
        assert storage_dtype(ModelSource(str(f), tmp_path, "gguf")) == dtype
    demo = demo_gguf()
    field = gguf.GGUFReader(demo).fields["general.file_type"]
    assert gguf_file_type(demo) == int(field.parts[field.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q4_1
    src = resolve_model("demo")
    assert src.config["dtype"] == "float32" and storage_dtype(src) == "bfloat16"
    with pytest.raises(BadInput, match="not a GGUF file"):
        gguf_file_type(_not_gguf(tmp_path))


def _not_gguf(tmp_path: Path) -> Path:
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGML" + bytes(20))
    return f


def test_checkpoint_cast_refuses_what_the_dtype_cannot_hold(tmp_path):
    """Checkpoint.get(key, dtype): floating-point tensors cast, integer ones as they are; a value beyond float16's
    range is a BadInput naming the tensor, not an inf in the artifact."""
    save_file({"w": torch.tensor([1.0, 3.0e5]), "n": torch.arange(3), "ok": torch.tensor([0.1, -2.0])},
              str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.get("n", torch.bfloat16).dtype == torch.int64
    assert torch.equal(ckpt.get("ok", torch.float16), torch.tensor([0.1, -2.0]).half())
    assert ckpt.get("w", torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(BadInput, match=r"tensor w .* beyond the range of float16"):
        ckpt.get("w", torch.float16)


def _tensors(f: Path) -> dict[str, torch.Tensor]:
    with safe_open(f, framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def _model_bpw(art: Path, source: Path) -> float:
    """bits_per_weight_model counted independently: the bytes of every tensor in the artifact's model.safetensors
    (loaded) x 8 / the elements of the source checkpoint's tensors (all floating point here)."""
    stored = sum(t.numel() * t.element_size() for t in _tensors(art / "model.safetensors").values())
    params = sum(t.numel() for t in _tensors(source / "model.safetensors").values())
    return 8 * stored / params


def _check_artifact(art: Path, src: Path, dtype: torch.dtype, name: str) -> dict[str, torch.Tensor]:
    """Compressed tensors in their own dtypes, every other tensor the checkpoint's cast to `dtype`; config.json and
    compression.json name it; bits_per_weight_model is the count from the file. Returns the tensors."""
    tensors, ckpt = _tensors(art / "model.safetensors"), Checkpoint(src)
    compressed = 0
    for k, t in tensors.items():
        suffix = k.rpartition(".")[2]
        if suffix in CODES:
            compressed += 1
            assert t.dtype == CODES[suffix], (k, t.dtype)
        else:
            assert t.dtype == dtype and torch.equal(t, ckpt.get(k).to(dtype)), (k, t.dtype)  # the source's, cast
    assert compressed > 0
    assert json.loads((art / "config.json").read_text())["dtype"] == name
    manifest = json.loads((art / "compression.json").read_text())
    assert manifest["storage_dtype"] == name
    bpw = _model_bpw(art, src)
    assert manifest["bits_per_weight_model"] == pytest.approx(bpw, abs=1e-4), f"{manifest['bits_per_weight_model']} {bpw}"
    return tensors


def test_tiny_artifact_in_each_dtype(tmp_path, tiny_llama, small_calib):
    """The tiny Llama (config dtype float32), q_proj quantized, the other Linears ignored: auto stores float32 (the
    checkpoint as it is), --dtype bfloat16 / float16 cast every uncompressed tensor, the quantized layers' tensors
    are the same bytes in all three, and bits_per_weight (over the quantized layers) does not move while
    bits_per_weight_model falls with the storage dtype."""
    recipe = tmp_path / "q.yaml"
    recipe.write_text("version: 1\npasses:\n  - pass: rtn\n    targets: ['re:.*self_attn\\.q_proj$']\n    bits: 4\n"
                      "    group_size: 32\n")
    runs = {}
    for name in ("auto", "bfloat16", "float16"):
        out = tmp_path / name
        runs[name] = (compress(str(tiny_llama), recipe, out, calib=[small_calib], samples=2, seq_len=16,
                               device="cpu", dtype=name), out)
    want = {"auto": (torch.float32, "float32"), "bfloat16": (torch.bfloat16, "bfloat16"),
            "float16": (torch.float16, "float16")}
    tensors = {name: _check_artifact(out, tiny_llama, *want[name]) for name, (_, out) in runs.items()}
    for k, t in tensors["auto"].items():
        if k.rpartition(".")[2] in CODES:
            assert torch.equal(t, tensors["bfloat16"][k]) and torch.equal(t, tensors["float16"][k]), k
    summary = {name: s for name, (s, _) in runs.items()}
    assert summary["auto"]["storage_dtype"] == "float32"
    assert summary["auto"]["bits_per_weight"] == summary["bfloat16"]["bits_per_weight"] == \
        summary["float16"]["bits_per_weight"]
    assert summary["bfloat16"]["bits_per_weight_model"] == summary["float16"]["bits_per_weight_model"] \
        < summary["auto"]["bits_per_weight_model"] < 32
    assert summary["bfloat16"]["size_bytes"] < summary["auto"]["size_bytes"]
    for name, (s, out) in runs.items():
        assert s["size_bytes"] == sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        assert compressor.verify(out, device="cpu")["passed"], name


def test_cli_dtype_and_inspect(tmp_path, tiny_llama, small_calib):
    """`compress model --dtype`: the --json summary has storage_dtype and bits_per_weight_model; `inspect` shows
    both bits per weight; a bad --dtype exits 2 naming it, before any work."""
    out = tmp_path / "art"
    r = run_cli("model", str(tiny_llama), "--recipe", "w4-rtn", "--out", str(out), "--samples", "2", "--seq-len", "16",
                "--calib", str(small_calib), "--dtype", "bfloat16", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    obj = json.loads(r.stdout)
    assert obj["storage_dtype"] == "bfloat16" and 4 < obj["bits_per_weight"] < obj["bits_per_weight_model"] < 32
    r = run_cli("inspect", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bits_per_weight_model" in r.stderr and "storage_dtype" in r.stderr and "bfloat16" in r.stderr
    bad = run_cli("model", str(tiny_llama), "--recipe", "w4-rtn", "--out", str(tmp_path / "bad"), "--dtype", "int8")
    assert bad.returncode == 2 and "--dtype 'int8'" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def demo_q_proj(tmp_path_factory, small_calib):
    """The demo (a Q4_1 GGUF) with only block 0's q_proj RTN-quantized (data-free, fast), stored as auto
    (bfloat16, the GGUF rule) and as --dtype float32 (the behaviour before the storage dtype)."""
    d = tmp_path_factory.mktemp("demo-dtype")
    recipe = d / "q.yaml"
    recipe.write_text("version: 1\npasses:\n  - pass: rtn\n    targets: ['model.layers.0.self_attn.q_proj']\n"
                      "    bits: 4\n    group_size: 64\n    symmetric: true\n")
    return {name: (compress("demo", recipe, d / name, calib=[small_calib], samples=2, seq_len=16, device="cpu",
                            dtype=name), d / name)
            for name in ("auto", "float32")}


def test_demo_stored_in_bfloat16_loads_as_before(demo_q_proj, demo_path):
    """auto on the demo is bfloat16: the embedding and norms are the cache's values rounded to bfloat16, --dtype
    float32 writes them bit for bit as the cache has them (what every artifact had before); our loader gives the
    same logits up to that rounding, transformers (float32) ours, and by default it loads the model in bfloat16."""
    from transformers import AutoModelForCausalLM

    (auto, a_dir), (f32, f_dir) = demo_q_proj["auto"], demo_q_proj["float32"]
    assert auto["storage_dtype"] == "bfloat16" and f32["storage_dtype"] == "float32"
    t_auto = _check_artifact(a_dir, demo_path, torch.bfloat16, "bfloat16")
    t_f32 = _check_artifact(f_dir, demo_path, torch.float32, "float32")
    assert t_auto["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert auto["bits_per_weight"] == f32["bits_per_weight"]
    params = sum(t.numel() for t in _tensors(demo_path / "model.safetensors").values())
    emb = math.prod(t_f32["model.embed_tokens.weight"].shape)
    # float32 -> bfloat16 saves 2 bytes on every uncompressed number, the embedding (a third of the model) included
    saved = 8 * (sum(t.numel() * t.element_size() for t in t_f32.values())
                 - sum(t.numel() * t.element_size() for t in t_auto.values())) / params
    assert f32["bits_per_weight_model"] - auto["bits_per_weight_model"] == pytest.approx(saved, abs=2e-4)
    assert saved > 16 * emb / params
    assert f32["size_bytes"] - auto["size_bytes"] > 2 * emb

    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = compressor.load(a_dir)(input_ids=ids).logits
        lf = compressor.load(f_dir)(input_ids=ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(a_dir, dtype=torch.float32)(input_ids=ids).logits
    d_round, d_tf = (la - lf).abs().max().item(), (la - theirs).abs().max().item()
    print(f"bf16 storage vs fp32: max_diff={d_round:.3g}; transformers vs ours: max_diff={d_tf:.3g}")
    assert 0 < d_round < 0.05 * lf.abs().max().item(), f"max_diff={d_round:.3g}"
    assert d_tf < 1e-3, f"max_diff={d_tf:.3g}"
    assert AutoModelForCausalLM.from_pretrained(a_dir).dtype == torch.bfloat16
    res = compressor.verify(a_dir, device="cpu", transformers=True)
    assert res["passed"], res["checks"]
