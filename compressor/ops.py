"""Kernel dispatch: the CUDA kernels of kernels/ where they are built and usable, the pure-torch reference
(quant.py) everywhere else. Never fails on import.

- The kernels are built once, on first use, when CUDA is there (torch.utils.cpp_extension, cached under
  $COMPRESSOR_CACHE/torch_extensions and keyed on the sources). `cuda_kernels()` returns the built module or
  None (`build_error()` says why); `HAS_CUDA_KERNELS` (read lazily: reading it builds) says whether they built.
- COMPRESSOR_KERNELS=reference|cuda|auto forces a path: `reference` everywhere; `cuda` the kernels, and an
  error when a tensor is not on CUDA or the kernels did not build; `auto` (default) the kernels for CUDA
  tensors when they built, the reference otherwise.
- Three torch custom ops with fake implementations, so torch.compile traces through them:
  compressor::unpack, compressor::dequant, compressor::qmatmul. They take the kernel layout (KernelWeight),
  made from the on-disk compressed-tensors tensors at load time; the disk layout stays plain.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quant
from .errors import BadInput, CompressorError
from .files import cache_dir

MODES = ("reference", "cuda", "auto")
MAX_FUSED_BATCH = 16  # rows of x the fused kernel takes (kernels/launch.h kMaxFusedBatch)
FUSED_BITS = (2, 3, 4, 8)
SOURCES = ("bindings.cpp", "dequant.cu", "qmatmul.cu")
HEADERS = ("launch.h", "pack.cuh", "device.cuh")

_build: dict[str, Any] = {}


def kernel_mode() -> str:
    mode = os.environ.get("COMPRESSOR_KERNELS", "auto")
    if mode not in MODES:
        raise BadInput(f"COMPRESSOR_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def kernel_sources() -> Path:
    """The folder of the CUDA sources: compressor/kernels in an installed wheel (package data), kernels/ beside the
    package in a checkout. Found by path, not imported: kernels/ has no __init__.py, so that a checkout on sys.path
    (`python -m` from its root) does not shadow the `kernels` package transformers imports."""
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "kernels"):
        if (d / SOURCES[0]).is_file():
            return d
    raise CompressorError(f"the CUDA kernel sources are not installed (looked in {here / 'kernels'} and "
                          f"{here.parent / 'kernels'})")


def cuda_kernels() -> Any | None:
    """The built CUDA extension, or None where there is no CUDA or the build failed (built once per process)."""
    if "ext" in _build:
        return _build["ext"]
    ext = None
    if not torch.cuda.is_available() or torch.version.cuda is None:
        _build["error"] = "CUDA is not available"
    else:
        try:
            ext = _load_extension()
        except Exception as e:  # a missing compiler or a build error: the reference path still works
            _build["error"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"compressor: the CUDA kernels did not build, using the reference path ({_build['error'][:500]})",
                          stacklevel=2)
    _build["ext"] = ext
    return ext


def build_error() -> str | None:
    return _build.get("error")


def _load_extension() -> Any:
    from torch.utils.cpp_extension import load

    src = kernel_sources()
    digest = hashlib.sha256(b"".join((src / f).read_bytes() for f in (*SOURCES, *HEADERS))).hexdigest()[:12]
    build_dir = cache_dir() / "torch_extensions" / f"compressor_kernels_{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=f"compressor_kernels_{digest}", sources=[str(src / f) for f in SOURCES],
                extra_include_paths=[str(src)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math"],
                build_directory=str(build_dir), verbose=False)


def __getattr__(name: str) -> Any:
    if name == "HAS_CUDA_KERNELS":
        return cuda_kernels() is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _use_cuda(t: Tensor) -> bool:
    """Whether this call runs the CUDA kernel (see COMPRESSOR_KERNELS above)."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if t.device.type != "cuda":
        if mode == "cuda":
            raise CompressorError(f"COMPRESSOR_KERNELS=cuda, but the tensors are on {t.device}")
        return False
    if cuda_kernels() is None:
        if mode == "cuda":
            raise CompressorError(f"COMPRESSOR_KERNELS=cuda, but the CUDA kernels are not available: {build_error()}")
        return False
    return True


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


# ------------------------------------------------------------------------------------------- kernel layout

def row_stride_words(k: int, bits: int) -> int:
    """Words per row in the kernel layout: whole 32-code chunks, rounded up to a multiple of 4 (kernels/pack.cuh)."""
    return -(-(-(-k // 32) * bits) // 4) * 4


@dataclass
class KernelWeight:
    """A quantized weight in the kernel layout: rows of packed codes padded with zero words (whole chunks, a
    multiple of 16 bytes), scales as float32, zero points unpacked to int8. Made once per layer and device."""

    words: Tensor  # (N, ws) int32
    scale: Tensor  # (N, G) float32
    zero: Tensor | None  # (N, G) int8, None when symmetric
    k: int
    bits: int
    group_size: int  # the effective group: k when per channel

    @property
    def n(self) -> int:
        return self.words.shape[0]

    @classmethod
    def from_packed(cls, packed: Tensor, scale: Tensor, zero_packed: Tensor | None, shape: tuple[int, int],
                    bits: int, group_size: int) -> "KernelWeight":
        """From the compressed-tensors tensors (weight_packed, weight_scale, weight_zero_point, weight_shape)."""
        n, k = shape
        ws = row_stride_words(k, bits)
        words = packed if packed.shape[1] == ws else F.pad(packed, (0, ws - packed.shape[1]))  # no copy when it fits
        zero = None if zero_packed is None else quant.unpack_int32(zero_packed.t(), bits, n).t().contiguous()
        return cls(words.contiguous(), scale.float().contiguous(), zero, k, bits, k if group_size == -1 else group_size)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequant(self.words, self.scale, self.zero, self.k, self.bits, self.group_size, dtype)


# ------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("compressor::unpack", mutates_args=())
def unpack(words: Tensor, k: int, bits: int) -> Tensor:
    """Signed int8 codes (N, k) of kernel-layout words (N, ws)."""
    if _use_cuda(words):
        with torch.cuda.device(words.device):
            return cuda_kernels().unpack(words, k, bits, _stream(words))
    return quant.unpack_int32(words, bits, k)


@unpack.register_fake
def _(words: Tensor, k: int, bits: int) -> Tensor:
    return words.new_empty((words.shape[0], k), dtype=torch.int8)


@torch.library.custom_op("compressor::dequant", mutates_args=())
def dequant(words: Tensor, scale: Tensor, zero: Tensor | None, k: int, bits: int, group_size: int,
            dtype: torch.dtype) -> Tensor:
    """(q - z) * s as `dtype`, (N, k): bit-identical on both paths (float32 arithmetic, one rounding)."""
    if _use_cuda(words):
        with torch.cuda.device(words.device):
            return cuda_kernels().dequant(words, scale, zero, k, bits, group_size, dtype, _stream(words))
    return quant.dequantize(quant.unpack_int32(words, bits, k), scale, zero, group_size, dtype)


@dequant.register_fake
def _(words: Tensor, scale: Tensor, zero: Tensor | None, k: int, bits: int, group_size: int,
      dtype: torch.dtype) -> Tensor:
    return words.new_empty((words.shape[0], k), dtype=dtype)


def fused_applies(x: Tensor, bits: int) -> bool:
    """The fused kernel's domain: 1..16 rows of float16 / bfloat16 activations, 2, 3, 4 or 8 bits."""
    return 1 <= x.shape[0] <= MAX_FUSED_BATCH and x.dtype in (torch.float16, torch.bfloat16) and bits in FUSED_BITS


@torch.library.custom_op("compressor::qmatmul", mutates_args=())
def qmatmul(x: Tensor, words: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None, k: int, bits: int,
            group_size: int) -> Tensor:
    """x (M, k) @ W^T (+ bias) -> (M, N) in x's dtype. On CUDA: the fused kernel (W read once, dequantized in
    registers, float32 accumulation) where it applies, else the dequant kernel then cuBLAS; elsewhere the
    reference, dequantize then F.linear."""
    if _use_cuda(words) and fused_applies(x, bits):
        with torch.cuda.device(words.device):
            return cuda_kernels().qmatmul(x.contiguous(), words, scale, zero, bias, k, bits, group_size, _stream(words))
    return F.linear(x, dequant(words, scale, zero, k, bits, group_size, x.dtype), bias)


@qmatmul.register_fake
def _(x: Tensor, words: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None, k: int, bits: int,
      group_size: int) -> Tensor:
    return x.new_empty((x.shape[0], words.shape[0]))


# ------------------------------------------------------------------------------------------- entry points

def linear(x: Tensor, w: KernelWeight, bias: Tensor | None) -> Tensor:
    """F.linear(x, W, bias) for a quantized W: x (..., k) -> (..., N)."""
    lead = x.shape[:-1]
    b = None if bias is None else bias.to(x.dtype)
    y = qmatmul(x.reshape(-1, w.k), w.words, w.scale, w.zero, b, w.k, w.bits, w.group_size)
    return y.reshape(*lead, w.n)


def embedding(ids: Tensor, w: KernelWeight, dtype: torch.dtype) -> Tensor:
    """F.embedding(ids, W) for a quantized table W (V rows of width k): only the rows `ids` reads are dequantized,
    ids (...) -> (..., k) of `dtype`."""
    flat = ids.reshape(-1)
    zero = None if w.zero is None else w.zero[flat]
    rows = dequant(w.words[flat], w.scale[flat], zero, w.k, w.bits, w.group_size, dtype)
    return rows.reshape(*ids.shape, w.k)


def sparse_linear_add(y: Tensor, x: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """y (..., N) + x (..., K) @ S^T for a sparse S given as (rows, cols, values): a gather of the inputs the
    residual touches and a scatter-add into the outputs, without densifying S."""
    return y.index_add(-1, rows, x[..., cols] * values.to(x.dtype))


def dequantize_packed(packed: Tensor, scale: Tensor, zero_packed: Tensor | None, shape: tuple[int, int],
                      bits: int, group_size: int, dtype: torch.dtype) -> Tensor:
    """Pack-quantized tensors -> dense (N, K) weight of `dtype`."""
    return KernelWeight.from_packed(packed, scale, zero_packed, shape, bits, group_size).dequantize(dtype)
