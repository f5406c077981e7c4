"""Pruned weights in the artifact: compressed-tensors' sparse-bitmask layout (SparseWeight), the pruned + quantized
extension (QWeight with a mask), the config / manifest pieces, and a write + load round trip of a demo artifact.

The installed compressed-tensors release has no sparse compressors, so the layout is checked against hand-computed
references; `test_old_compressed_tensors_reads_and_writes_the_same` checks it against an older release's own
compressor when COMPRESSOR_CT_SPARSE names a directory holding one (e.g. the unpacked compressed-tensors 0.12.2 wheel)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor.api import add_block, finish_artifact, load
from compressor.artifact.manifest import ct_quantization_config, layer_entry, manifest_sizes
from compressor.artifact.reader import ct_layer_schemes, ct_sparse_layers
from compressor.artifact.writer import ArtifactWriter
from compressor.models import Checkpoint, find_blocks, resolve_model, skeleton
from compressor.quant import QWeight, pack_int32, qweight_from_tensors, quantize_rtn, unpack_int32
from compressor.runner import BlockResult
from compressor.sparse import SparseWeight, effective_structure, pack_bitmask, unpack_bitmask


def nbits(tensors: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> int:
    return sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if k not in skip)


def magnitude_keep(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The kept weights of W pruned by magnitude (the round(s * N * K) smallest |w| pruned)."""
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[w.abs().reshape(-1).argsort()[: round(sparsity * w.numel())]] = False
    return keep.reshape(w.shape)


# ---------------------------------------------------------------------------------------------- bitmask

def test_bitmask_bit_order_against_hand_reference():
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0],  # bits 0, 2, 3 -> 0b00001101; bit 8 -> byte 1 bit 0
                         [0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1],  # bit 7 -> 128; bits 9, 10 -> 0b110
                         [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2)
    assert packed.tolist() == [[13, 1], [128, 6], [255, 7]]
    assert torch.equal(unpack_bitmask(packed, 11), mask)


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 64, 577])
def test_bitmask_round_trip_and_numpy_little_bit_order(cols):
    np = pytest.importorskip("numpy")
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_bitmask(mask)
    assert packed.shape == (5, math.ceil(cols / 8))
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little")))
    assert torch.equal(unpack_bitmask(packed, cols), mask)


# ---------------------------------------------------------------------------------------------- SparseWeight

def test_sparse_weight_layout_against_hand_reference():
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0]], dtype=torch.float16)
    sw = SparseWeight(w, w != 0)
    t = sw.to_tensors()
    assert set(t) == {"shape", "compressed", "bitmask", "row_offsets"}
    assert t["shape"].dtype == torch.int64 and t["shape"].tolist() == [3, 10]
    assert t["compressed"].dtype == torch.float16 and t["compressed"].tolist() == [1.5, -2.0, 3.0, 4.0, 5.0]
    assert t["bitmask"].dtype == torch.uint8 and t["bitmask"].tolist() == [[0b1010, 0b10], [0, 0], [1, 1]]
    assert t["row_offsets"].dtype == torch.int64 and t["row_offsets"].tolist() == [0, 3, 3]
    # 5 fp16 values, 3 rows x 2 bytes of bitmask, 3 int64 offsets, 2 int64 shape entries
    assert sw.storage_bits() == 5 * 16 + 3 * 2 * 8 + 3 * 64 + 2 * 64 == nbits(t)
    assert sw.nnz == 5 and sw.sparsity == pytest.approx(25 / 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_weight_round_trip_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 70, generator=g).to(dtype)
    keep = magnitude_keep(w.float(), 0.5)
    keep[0, 0] = True
    w[0, 0] = -0.0  # a kept weight that is exactly (negative) zero stays a stored value
    sw = SparseWeight(torch.where(keep, w, torch.zeros((), dtype=dtype)), keep)
    t = sw.to_tensors()
    back = SparseWeight.from_tensors(t)
    assert back.weight.dtype == dtype and torch.equal(back.mask, keep)
    assert torch.equal(back.weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       sw.weight.view(torch.int16 if dtype != torch.float32 else torch.int32)), "not bit-exact"
    assert sw.storage_bits() == nbits(t)
    assert torch.equal(sw.dequantize(torch.float32), sw.weight.float())
    # column-vector shape / row offsets, as some compressed-tensors releases wrote them, read the same
    t2 = {**t, "shape": t["shape"].reshape(-1, 1), "row_offsets": t["row_offsets"].reshape(-1, 1)}
    assert torch.equal(SparseWeight.from_tensors(t2).weight, sw.weight)


def test_sparse_weight_refuses_nonzero_pruned_weights():
    w = torch.ones(4, 8)
    with pytest.raises(ValueError, match="32 pruned weights are not 0"):
        SparseWeight(w, torch.zeros(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        SparseWeight(w, torch.ones(4, 8))
    with pytest.raises(ValueError, match="sparsity_structure 'two:four'"):
        SparseWeight(w, torch.ones(4, 8, dtype=torch.bool), "two:four")


def test_effective_structure():
    m24 = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert effective_structure(m24, "2:4") == "2:4"
    assert effective_structure(m24, "unstructured") == "unstructured"
    m34 = torch.tensor([[1, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)  # 3 kept in the first run of 4
    assert effective_structure(m34, "2:4") == "3:4"
    assert effective_structure(torch.ones(1, 8, dtype=torch.bool), "2:4") == "unstructured"
    assert effective_structure(torch.ones(1, 6, dtype=torch.bool), "2:4") == "unstructured"  # 4 does not divide 6


# ---------------------------------------------------------------------------------------------- masked QWeight

def masked_rtn(w: torch.Tensor, keep: torch.Tensor, bits: int, g: int, sym: bool, structure: str = "unstructured"):
    """RTN of the pruned weight (its zeros get the grid's zero code), the mask attached."""
    qw = quantize_rtn(torch.where(keep, w, torch.zeros(())), bits, g, sym, torch.float16)
    qw.mask, qw.sparsity_structure = keep, structure
    return qw


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_masked_qweight_round_trip(bits, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 256, generator=g) * 0.05
    keep = magnitude_keep(w, 0.5)
    qw = masked_rtn(w, keep, bits, 64, sym)
    dq = qw.dequantize()
    assert torch.equal(dq[~keep], torch.zeros(int((~keep).sum()))), "pruned weights must dequantize to exactly 0"
    t = qw.to_tensors()
    assert "weight_packed" not in t  # a pack-quantized reader must fail on it, not misread the codes
    assert t["weight_bitmask"].dtype == torch.uint8 and torch.equal(t["weight_bitmask"], pack_bitmask(keep))
    nnz = int(keep.sum())
    assert t["weight_packed_kept"].dtype == torch.int32 and t["weight_packed_kept"].shape == (math.ceil(nnz * bits / 32),)
    assert torch.equal(unpack_int32(t["weight_packed_kept"].reshape(1, -1), bits, nnz)[0], qw.q[keep]), "survivors' codes"
    assert ("weight_zero_point" in t) == (not sym)
    back = qweight_from_tensors(t, bits, 64)
    assert torch.equal(back.mask, keep) and torch.equal(back.q, qw.q)
    assert torch.equal(back.dequantize(), dq)
    assert qw.storage_bits() == nbits(t, skip=("weight_shape",))  # what is written (weight_shape uncounted, as ever)


def test_masked_qweight_storage_at_half_sparsity():
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    keep = magnitude_keep(w, 0.5)
    for bits in (2, 3, 4):
        masked = masked_rtn(w, keep, bits, 64, False)
        plain = quantize_rtn(torch.where(keep, w, torch.zeros(())), bits, 64, False, torch.float16)
        # codes: 96 rows of ceil(256 b / 32) words -> ceil(12288 b / 32) words of survivors + a 1-bit-per-weight mask
        expected = 96 * math.ceil(256 * bits / 32) * 32 - (math.ceil(12288 * bits / 32) * 32 + 96 * 256)
        assert plain.storage_bits() - masked.storage_bits() == expected == 96 * 256 * (bits / 2 - 1)
        assert masked.nnz == 12288 and masked.sparsity == 0.5


def test_masked_qweight_refuses_nonzero_pruned_codes():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    keep = magnitude_keep(w, 0.5)
    qw = quantize_rtn(w, 4, 32, False, torch.float16)  # codes of the unpruned weights
    qw.mask = keep
    with pytest.raises(ValueError, match="pruned weights have a code other than the grid's zero"):
        qw.dequantize()
    with pytest.raises(ValueError, match="grid's zero"):
        qw.to_tensors()
    qw.q = torch.where(keep, qw.q, qw.zero_codes())  # asymmetric: the zero code is the group's zero point
    assert bool((qw.dequantize()[~keep] == 0).all())


def test_unmasked_qweight_unchanged():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(w, 4, 32, False, torch.float16)
    t = qw.to_tensors()
    assert set(t) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
    assert torch.equal(t["weight_packed"], pack_int32(qw.q, 4))
    # codes 16 rows x 8 words; fp16 scales 16 x 2; zero points packed down the columns: 2 words x 2 groups
    assert qw.storage_bits() == 16 * 8 * 32 + 16 * 2 * 16 + 2 * 32 * 2 and qw.nnz == 16 * 64 and qw.sparsity == 0


# ---------------------------------------------------------------------------------------------- config, manifest

def three_layers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g)
    keep = magnitude_keep(w, 0.75)
    keep24 = torch.zeros(8, 32, dtype=torch.bool)
    keep24[:, ::2] = True  # 2 of every 4
    sw = SparseWeight(torch.where(keep, w, torch.zeros(())), keep)
    mq = masked_rtn(w, keep24, 4, 16, True, "2:4")
    pq = quantize_rtn(w, 4, 16, True, torch.float16)
    return {"m.sparse": layer_entry(sw, "prune", 0.1), "m.masked": layer_entry(mq, "rtn", 0.2),
            "m.plain": layer_entry(pq, "rtn", 0.3)}, (sw, mq, pq)


def test_layer_entries():
    layers, (sw, mq, pq) = three_layers()
    s, m, p = layers["m.sparse"], layers["m.masked"], layers["m.plain"]
    assert s == {"pass": "prune", "format": "sparse-bitmask", "bits": None, "dtype": "float32", "group_size": None,
                 "requested_group_size": None, "symmetric": None, "shape": [8, 32], "sparsity": 0.75,
                 "sparsity_structure": "unstructured", "bits_per_weight": round(sw.storage_bits() / 256, 4),
                 "weight_rel_err": 0.1}
    assert sw.storage_bits() == 64 * 32 + 8 * 4 * 8 + 8 * 64 + 128
    assert m["format"] == "pack-quantized+bitmask" and m["sparsity"] == 0.5 and m["sparsity_structure"] == "2:4"
    assert m["bits_per_weight"] == round(mq.storage_bits() / 256, 4) and m["bits"] == 4
    assert "format" not in p and "sparsity" not in p and "sparsity_structure" not in p  # unpruned: as before


def test_quantization_config_with_sparse_layers():
    layers, _ = three_layers()
    qc = ct_quantization_config(layers, ["lm_head"])
    groups = qc["config_groups"]
    assert [g["targets"] for g in groups.values()] == [["m.masked", "m.plain"]]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head", "m.sparse"]
    # compressed-tensors' BitmaskConfig dump, its registry flag included (0.12.2 wrote it into config.json too)
    assert qc["sparsity_config"] == {"format": "sparse-bitmask", "targets": ["m.sparse"], "ignore": None,
                                     "global_sparsity": 0.75, "sparsity_structure": "unstructured",
                                     "registry_requires_subclass": False}
    linears = [(n, "Linear") for n in ("m.sparse", "m.masked", "m.plain", "lm_head")]
    assert set(ct_layer_schemes(qc, linears)) == {"m.masked", "m.plain"}
    assert ct_sparse_layers(qc, linears) == ["m.sparse"]
    # compressed-tensors' own ways of naming targets: class names and an ignore list
    assert ct_sparse_layers({"sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"],
                                                 "ignore": ["lm_head"]}}, linears) == ["m.sparse", "m.masked", "m.plain"]
    # only sparse layers: quant_method and sparsity_config, as compressed-tensors wrote a sparse-only model
    only = ct_quantization_config({"m.sparse": layers["m.sparse"]}, ["lm_head"])
    assert set(only) == {"quant_method", "sparsity_config"} and only["quant_method"] == "compressed-tensors"
    # mixed structures claim nothing
    s24 = {**layers["m.sparse"], "sparsity_structure": "2:4", "sparsity": 0.5}
    mixed = ct_quantization_config({"a": layers["m.sparse"], "b": s24}, [])
    assert mixed["sparsity_config"]["sparsity_structure"] == "unstructured"
    assert mixed["sparsity_config"]["global_sparsity"] == 0.625
    # no pruning: no sparsity_config, nothing else changes
    assert "sparsity_config" not in ct_quantization_config({"m.plain": layers["m.plain"]}, [])


def test_manifest_sizes():
    layers, (sw, mq, pq) = three_layers()
    m = manifest_sizes(layers)
    assert m["quantized_params"] == 512 and m["sparse_params"] == 256
    assert m["sparsity"] == round((0.75 + 0.5) * 256 / 768, 6)
    assert m["extensions"] == ["sparse_bitmask_quantized"]
    assert m["bits_per_weight"] == round(sum(v["bits_per_weight"] * 256 for v in layers.values()) / 768, 4)
    plain = manifest_sizes({"m.plain": layers["m.plain"]})
    assert set(plain) == {"bits_per_weight", "quantized_params", "layers", "extensions"} and plain["extensions"] == []


# ---------------------------------------------------------------------------------------------- demo artifact

@pytest.fixture(scope="module")
def pruned_demo(tmp_path_factory, demo_path):
    """A demo-model artifact written through compress()'s own functions, with results made by hand: block 0's
    up_proj pruned to 50% (sparse-bitmask), q_proj pruned 50% + 4-bit asymmetric RTN, k_proj plain 4-bit RTN;
    block 1's down_proj 2:4-pruned + 4-bit symmetric RTN."""
    out = tmp_path_factory.mktemp("sparse") / "demo-pruned"
    skel, ckpt = skeleton(demo_path), Checkpoint(demo_path)
    blocks_prefix, blocks = find_blocks(skel)

    def weight(name: str) -> torch.Tensor:
        return ckpt.get(f"{name}.weight")

    b0, b1 = f"{blocks_prefix}.0", f"{blocks_prefix}.1"
    results: dict[str, dict] = {b0: {}, b1: {}}
    w = weight(f"{b0}.mlp.up_proj")
    keep = magnitude_keep(w, 0.5)
    results[b0][f"{b0}.mlp.up_proj"] = ("prune", SparseWeight(torch.where(keep, w, torch.zeros(())), keep))
    w = weight(f"{b0}.self_attn.q_proj")
    results[b0][f"{b0}.self_attn.q_proj"] = ("rtn", masked_rtn(w, magnitude_keep(w, 0.5), 4, 64, False))
    results[b0][f"{b0}.self_attn.k_proj"] = ("rtn", quantize_rtn(weight(f"{b0}.self_attn.k_proj"), 4, 64, True,
                                                                 torch.float16))
    w = weight(f"{b1}.mlp.down_proj")
    top2 = w.abs().reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices
    keep24 = torch.zeros(w.shape[0], w.shape[1] // 4, 4, dtype=torch.bool).scatter_(-1, top2, True).reshape(w.shape)
    results[b1][f"{b1}.mlp.down_proj"] = ("rtn", masked_rtn(w, keep24, 4, 128, True, "2:4"))

    layers: dict[str, dict] = {}
    block_errs: dict[str, float] = {}
    with ArtifactWriter(out) as writer:
        for i in range(len(blocks)):
            prefix = f"{blocks_prefix}.{i}"
            res = results.get(prefix, {})
            add_block(writer, skel, ckpt, prefix, BlockResult(
                {n: r for n, (_, r) in res.items()}, {n: p for n, (p, _) in res.items()},
                {n: 0.0 for n in res}, None, 0.0), layers, block_errs)
        finish_artifact(writer, skel, ckpt, resolve_model(str(demo_path)), layers, "version: 1\n",
                        {"source": {"ref": str(demo_path), "kind": "dir"}, "warnings": []})
        writer.commit()
    return out, {n: r for res in results.values() for n, (_, r) in res.items()}


def test_pruned_artifact_config_and_manifest(pruned_demo, demo_path):
    art, res = pruned_demo
    manifest = json.loads((art / "compression.json").read_text())
    qc = json.loads((art / "config.json").read_text())["quantization_config"]
    up, q, k, down = "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", \
        "model.layers.1.mlp.down_proj"
    assert qc["sparsity_config"] == {"format": "sparse-bitmask", "targets": [up], "ignore": None,
                                     "global_sparsity": 0.5, "sparsity_structure": "unstructured",
                                     "registry_requires_subclass": False}
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert targets == sorted([q, k, down]) and up in qc["ignore"] and up not in targets
    layers = manifest["layers"]
    assert layers[up]["format"] == "sparse-bitmask" and layers[up]["bits"] is None and layers[up]["sparsity"] == 0.5
    assert layers[q]["format"] == "pack-quantized+bitmask" and layers[q]["sparsity"] == 0.5
    assert layers[down]["sparsity_structure"] == "2:4" and "sparsity" not in layers[k]
    assert manifest["extensions"] == ["sparse_bitmask_quantized"]
    assert manifest["quantized_params"] == 576 * 576 + 192 * 576 + 576 * 1536 and manifest["sparse_params"] == 1536 * 576
    # every layer's tensors in the file take what its storage_bits says (QWeight's int64 weight_shape aside)
    with safe_open(art / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        for name, r in res.items():
            t = {key[len(name) + 1:]: f.get_tensor(key) for key in keys if key.startswith(name + ".")}
            assert r.storage_bits() == nbits(t, skip=("weight_shape", "bias")), name
            assert "weight" not in t
            assert ("weight_packed" in t) == (isinstance(r, QWeight) and r.mask is None), name
    dense_bits = sum(r.shape[0] * r.shape[1] * 32 for r in res.values())
    assert sum(r.storage_bits() for r in res.values()) < 0.45 * dense_bits
    src = demo_path / "model.safetensors"
    saved = (dense_bits - sum(r.storage_bits() for r in res.values())) / 8
    assert (art / "model.safetensors").stat().st_size < src.stat().st_size - 0.99 * saved  # the file shrank by it


def test_pruned_artifact_loads_exactly(pruned_demo):
    from compressor.modules import QuantLinear

    art, res = pruned_demo
    model = load(art)
    for name, r in res.items():
        m = model.get_submodule(name)
        if isinstance(r, SparseWeight):
            assert type(m) is nn.Linear and torch.equal(m.weight.data, r.weight), name
        else:
            assert isinstance(m, QuantLinear), name
            assert torch.equal(m.weight_packed, pack_int32(r.q, r.bits)), f"{name}: dense codes not rebuilt exactly"
            dq = m.dequantized_weight(torch.float32)
            assert torch.equal(dq, r.dequantize()), name
            if r.mask is not None:
                assert bool((dq[~r.mask] == 0).all()), f"{name}: pruned weights not 0"
    untouched = model.get_submodule("model.layers.0.mlp.gate_proj")
    assert type(untouched) is nn.Linear
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert bool(torch.isfinite(model(input_ids=ids).logits).all())


def test_inspect_shows_sparsity(pruned_demo, monkeypatch):
    import io

    from rich.console import Console
    from typer.testing import CliRunner

    from compressor import cli
    from compressor.artifact.reader import describe

    art, _ = pruned_demo
    info = describe(art)
    assert info["hashes_ok"] and info["layers"]["model.layers.0.mlp.up_proj"]["sparsity"] == 0.5
    buf = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=buf, width=250))
    r = CliRunner().invoke(cli.app, ["inspect", str(art)])
    assert r.exit_code == 0, r.output
    lines = buf.getvalue().splitlines()
    header = next([c.strip() for c in line.split("┃")[1:-1]] for line in lines if "┃ layer" in line)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│ model.layers.")]
    table = {r[0]: dict(zip(header, r)) for r in rows}
    assert header == ["layer", "pass", "bits", "group", "sym", "shape", "sparsity", "bpw", "rel. err"]
    up, down, k = (table[f"model.layers.{n}"] for n in ("0.mlp.up_proj", "1.mlp.down_proj", "0.self_attn.k_proj"))
    assert [up[c] for c in ("pass", "bits", "group", "sym", "shape", "sparsity")] == \
        ["prune", "float32", "-", "-", "1536x576", "0.500"]
    assert down["sparsity"] == "0.500 2:4" and down["bits"] == "4" and k["sparsity"] == "-"


# ---------------------------------------------------------------------------------------------- older release

def test_old_compressed_tensors_reads_and_writes_the_same(tmp_path):
    """With COMPRESSOR_CT_SPARSE pointing at a compressed-tensors release that has the sparse-bitmask compressor
    (a directory to put on PYTHONPATH), its decompressor reads our tensors and its compressor writes the same bytes."""
    ct_dir = os.environ.get("COMPRESSOR_CT_SPARSE")
    if not ct_dir:
        pytest.skip("COMPRESSOR_CT_SPARSE is not set (a compressed-tensors release with sparse compressors)")
    g = torch.Generator().manual_seed(1)
    ours, dense = {}, {}
    for name, (n, k, dt) in {"a": (33, 70, torch.float32), "b": (16, 64, torch.bfloat16), "c": (5, 9, torch.float16)}.items():
        w = torch.randn(n, k, generator=g).to(dt)
        keep = torch.rand(n, k, generator=g) > 0.6
        sw = SparseWeight(torch.where(keep, w, torch.zeros((), dtype=dt)), keep)
        ours.update({f"model.{name}.{s}": t for s, t in sw.to_tensors().items()})
        dense[f"model.{name}.weight"] = sw.weight
    (tmp_path / "ours").mkdir()
    save_file(ours, tmp_path / "ours" / "model.safetensors")
    save_file(dense, tmp_path / "dense.safetensors")
    script = f"""
import torch
from safetensors.torch import load_file
from compressed_tensors import BitmaskConfig
from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import BitmaskCompressor
c = BitmaskCompressor(config=BitmaskConfig())
dense, ours = load_file("{tmp_path}/dense.safetensors"), load_file("{tmp_path}/ours/model.safetensors")
got = dict(c.decompress("{tmp_path}/ours"))
assert set(got) == set(dense) and all(torch.equal(got[k], dense[k]) for k in dense), "decompressed differs"
theirs = c.compress(dense)
assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) and theirs[k].dtype == ours[k].dtype
                                        for k in ours), "compressed differs"
import compressed_tensors; print(compressed_tensors.__version__)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ct_dir}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
