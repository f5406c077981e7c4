"""Runtime modules of a loaded artifact (and of a block while the runner compresses it): QuantLinear, QuantEmbedding,
LowRankLinear."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops
from .quant import col_index_bits


class PackedWeight(nn.Module):
    """A weight matrix (out_features, in_features) stored as compressed-tensors pack-quantized buffers (its state
    dict is the artifact's layout): weight_packed, weight_scale, weight_shape and, asymmetric, weight_zero_point.
    The kernel layout is made from the buffers on first use on a device and kept (ops.KernelWeight; it shares the
    packed words when no padding is needed). QuantLinear multiplies by it, QuantEmbedding looks rows up in it."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, math.ceil(in_features * bits / 32), dtype=torch.int32))
        self.register_buffer("weight_scale", torch.zeros(out_features, groups, dtype=scale_dtype))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(math.ceil(out_features * bits / 32), groups, dtype=torch.int32))
        self._kernel: tuple[tuple, ops.KernelWeight] | None = None

    def kernel_weight(self) -> ops.KernelWeight:
        """The weight in the kernel layout, remade when the buffers moved or were replaced."""
        bufs = [b for b in (self.weight_packed, self.weight_scale, self.weight_zero_point) if b is not None]
        key = tuple((b.device, b.data_ptr(), b._version) for b in bufs)  # _version: in-place writes count
        if self._kernel is None or self._kernel[0] != key:
            self._kernel = (key, ops.KernelWeight.from_packed(
                self.weight_packed, self.weight_scale, self.weight_zero_point, (self.out_features, self.in_features),
                self.bits, self.group_size))
        return self._kernel[1]

    def share_buffers(self, other: "PackedWeight") -> None:
        """Use `other`'s buffers (the same tensors): a tied lm_head reads the quantized input embedding."""
        for name in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            if getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))

    def _grid_repr(self) -> str:
        g = "channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.weight_zero_point is None else 'asym'}"


class QuantLinear(PackedWeight):
    """A Linear with a pack-quantized weight (PackedWeight), multiplied through ops.py: on CUDA the fused
    dequant-matmul kernel (or the dequant kernel and cuBLAS for larger batches), elsewhere the reference; with a
    dense-and-sparse weight, its float16 CSR residual added."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool, scale_dtype: torch.dtype = torch.float16, sparse_nnz: int = 0):
        super().__init__(in_features, out_features, bits, group_size, symmetric, scale_dtype)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.sparse_nnz = sparse_nnz
        if sparse_nnz:  # a dense-and-sparse layer: the float16 CSR residual (quant.SparseResidual)
            col = torch.int16 if col_index_bits(in_features) == 16 else torch.int32
            self.register_buffer("weight_sparse_values", torch.zeros(sparse_nnz, dtype=torch.float16))
            self.register_buffer("weight_sparse_col", torch.zeros(sparse_nnz, dtype=col))
            self.register_buffer("weight_sparse_rowptr", torch.zeros(out_features + 1, dtype=torch.int32))
        self._sparse: tuple[tuple, tuple[Tensor, Tensor, Tensor]] | None = None

    def sparse_coo(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The residual as (rows, cols, values) on the buffers' device, or None for a plain layer."""
        if not self.sparse_nnz:
            return None
        bufs = (self.weight_sparse_values, self.weight_sparse_col, self.weight_sparse_rowptr)
        key = tuple((b.device, b.data_ptr(), b._version) for b in bufs)
        if self._sparse is None or self._sparse[0] != key:
            rowptr = self.weight_sparse_rowptr.long()
            rows = torch.repeat_interleave(torch.arange(self.out_features, device=rowptr.device), rowptr.diff())
            self._sparse = (key, (rows, self.weight_sparse_col.long(), self.weight_sparse_values))
        return self._sparse[1]

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        w = self.kernel_weight().dequantize(dtype if not self.sparse_nnz else torch.float32)
        coo = self.sparse_coo()
        if coo is not None:
            rows, cols, vals = coo
            w = w.index_put((rows, cols), vals.float(), accumulate=True).to(dtype)
        return w

    def forward(self, x: Tensor) -> Tensor:
        y = ops.linear(x, self.kernel_weight(), self.bias)
        coo = self.sparse_coo()
        return y if coo is None else ops.sparse_linear_add(y, x, *coo)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._grid_repr()}, bias={self.bias is not None}"


class QuantEmbedding(PackedWeight):
    """An embedding table of `num_embeddings` rows of width `embedding_dim`, pack-quantized as the weight of an
    embedding_dim -> num_embeddings Linear (compressed-tensors quantizes nn.Embedding so); a lookup dequantizes only
    the rows it reads (ops.embedding), as `dtype` (the model's). A scaled word embedding (Gemma's, BART's) multiplies
    its rows by `embed_scale`: `round_scale` True rounds the factor to the rows' dtype first, as the classes that
    keep it as a tensor do."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float32,
                 embed_scale: float | None = None, round_scale: bool = False):
        super().__init__(embedding_dim, num_embeddings, bits, group_size, symmetric, scale_dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype, self.embed_scale, self.round_scale = dtype, embed_scale, round_scale

    def forward(self, ids: Tensor) -> Tensor:
        rows = ops.embedding(ids, self.kernel_weight(), self.dtype)
        if self.embed_scale is None:
            return rows
        return rows * (torch.tensor(self.embed_scale).to(rows.dtype) if self.round_scale else self.embed_scale)

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", scale {self.embed_scale:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._grid_repr()}{scale}"


class LowRankLinear(nn.Module):
    """y = B (A x) + bias: the two-Linear module of a factorised layer (children `a`, d_in -> r without bias, and
    `b`, r -> d_out; the bias, when the layer had one, is this module's own, as in the original checkpoint)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, dtype=dtype, device="meta")
        self.b = nn.Linear(rank, out_features, bias=False, dtype=dtype, device="meta")
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta")) if bias else None

    @classmethod
    def of(cls, a: Tensor, b: Tensor, bias: Tensor | None) -> "LowRankLinear":
        """The module with factors A (r, d_in) and B (d_out, r) as its weights (copies) and `bias`."""
        m = cls(a.shape[1], b.shape[0], a.shape[0], bias is not None, a.dtype)
        m.a.weight = nn.Parameter(a.clone(), requires_grad=False)
        m.b.weight = nn.Parameter(b.clone(), requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: Tensor) -> Tensor:
        y = self.b(self.a(x))
        return y if self.bias is None else y + self.bias


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every QuantLinear by a plain Linear holding its dequantized weight (in place).
    Where no fused kernel runs (the CPU), dequantizing once instead of at every forward gives the same
    numbers much faster; this is what evaluation does there."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.dequantized_weight(dtype), requires_grad=False)
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.data.to(dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model
