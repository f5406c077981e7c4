"""Kernel dispatch: a native kernel where one is built and usable, the pure-torch reference (quant.py)
everywhere else. Never fails on import. COMPRESSOR_KERNELS=reference|cuda|auto forces a path (tests).

No CUDA sources ship yet (kernels/ is where they go), so HAS_CUDA_KERNELS is False and `auto` takes the
reference; forcing `cuda` is an error that says so rather than a silent fallback.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import quant
from .errors import BadInput, CompressorError

HAS_CUDA_KERNELS = False
MODES = ("reference", "cuda", "auto")


def kernel_mode() -> str:
    mode = os.environ.get("COMPRESSOR_KERNELS", "auto")
    if mode not in MODES:
        raise BadInput(f"COMPRESSOR_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "cuda" and not HAS_CUDA_KERNELS:
        raise CompressorError("COMPRESSOR_KERNELS=cuda, but no CUDA dequant kernels are built in this install")
    return mode


def dequantize_packed(packed: Tensor, scale: Tensor, zero_packed: Tensor | None, shape: tuple[int, int],
                      bits: int, group_size: int, dtype: torch.dtype) -> Tensor:
    """Pack-quantized tensors -> dense (N, K) weight of `dtype`."""
    kernel_mode()
    return quant.dequantize_packed(packed, scale, zero_packed, shape, bits, group_size, dtype)
