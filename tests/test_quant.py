"""Quantization primitives: packing is bit-identical to compressed-tensors, and every width we write
round-trips through the installed compressed-tensors release's own decompressor."""
from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from compressor.errors import BadInput
from compressor.quant import (dequantize_packed, find_qparams, pack_int32, qrange, quantize_rtn,
                              resolve_group_size, unpack_int32)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [1, 7, 31, 32, 33, 100, 576, 1536])
def test_pack_matches_compressed_tensors(bits, cols):
    lo, hi = qrange(bits)
    q = torch.randint(lo, hi + 1, (5, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(bits * cols))
    ours = pack_int32(q, bits)
    theirs = pack_to_int32(q, bits)
    assert torch.equal(ours, theirs), f"bits={bits} cols={cols}: packed words differ"
    assert torch.equal(unpack_int32(ours, bits, cols), q)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size([5, cols])), q)
    assert torch.equal(pack_int32(q.t(), bits).t(), pack_to_int32(q, bits, packed_dim=0))  # zero-point layout


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size,symmetric", [(-1, True), (-1, False), (32, True), (64, False), (128, False)])
def test_round_trip_through_compressed_tensors_decompressor(bits, group_size, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(96, 256) * 0.05
    qw = quantize_rtn(w, bits, group_size, symmetric, torch.float16)
    tensors = qw.to_tensors()
    strategy = dict(strategy="channel") if group_size == -1 else dict(strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], format="pack-quantized",
                                weights=QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, **strategy))
    theirs = PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]
    ours = dequantize_packed(tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point"),
                             (96, 256), bits, group_size, torch.float32)
    assert torch.equal(ours, qw.dequantize()), "packed path differs from the in-memory QWeight"
    d = (ours.to(theirs.dtype).float() - theirs.float()).abs().max().item()
    assert d == 0.0, f"bits={bits} g={group_size} sym={symmetric}: max_diff={d:.3g} vs compressed-tensors"


def test_resolve_group_size_fallback_and_error():
    assert resolve_group_size(576, 128) == 64  # SmolLM2's hidden size
    assert resolve_group_size(1536, 128) == 128
    assert resolve_group_size(576, -1) == -1
    assert resolve_group_size(80, 64) == 16
    with pytest.raises(BadInput, match=r"group_size 128 does not divide in_features 72 of layer x\.proj"):
        resolve_group_size(72, 128, "x.proj")


def test_rtn_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    for sym in (True, False):
        qw = quantize_rtn(w, 4, 32, sym, torch.float32)
        err = (qw.dequantize() - w).abs().reshape(64, 4, 32).amax(-1)
        step = qw.scale.float()
        # symmetric: the top of the range clips by half a step at most, so allow one full step there
        bound = step * (1.0 if sym else 0.5) + 1e-6
        assert bool((err <= bound).all()), f"sym={sym}: max err/step = {(err / step).max():.3f}"


def test_mse_clipping_lowers_weight_error():
    torch.manual_seed(0)
    w = torch.randn(256, 512) ** 3  # heavy tails: clipping helps
    for bits in (3, 4):
        e_minmax = (quantize_rtn(w, bits, 64, False, torch.float16).dequantize() - w).pow(2).sum()
        e_mse = (quantize_rtn(w, bits, 64, False, torch.float16, mse=True).dequantize() - w).pow(2).sum()
        assert e_mse < 0.98 * e_minmax, f"bits={bits}: mse {e_mse:.4g} vs minmax {e_minmax:.4g}"


def test_storage_bits_counts_scales_and_zeros():
    w = torch.randn(64, 128)
    qw = quantize_rtn(w, 4, 64, False, torch.float16)
    # codes 4 bits, fp16 scale per 64 weights (0.25 bit), 4-bit zero per 64 weights (1/16 bit)
    assert qw.storage_bits() / w.numel() == pytest.approx(4 + 16 / 64 + 4 / 64)
    s, z = find_qparams(w, 4, 64, True, torch.float16)
    assert z is None and s.shape == (64, 2)
