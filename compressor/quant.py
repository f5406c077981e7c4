"""Affine integer quantization primitives and the reference pack/unpack (pure torch).

Conventions (the compressed-tensors ones, so that what we write is what its decompressor reads):
- integers are signed: q in [-2^(b-1), 2^(b-1) - 1]; dequant is (q - zero) * scale;
- symmetric: zero = 0, scale = absmax / ((2^b - 1) / 2);
- asymmetric: the range [min(w, 0), max(w, 0)] maps onto the integer range, zero = round(qmin - min / scale);
- scales have shape [N, K / g] (per-channel: [N, 1]); zero points the same, int8;
- packing is dense: element j of a row starts at bit j * b of the row's int32 words (little end first),
  values stored unsigned (q + 2^(b-1)); zero points are packed along dim 0 (down the columns).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import BadInput
from .sparse import bitmask_bits, effective_structure, pack_bitmask, unpack_bitmask, validate_mask
from .weights import CompressedWeight

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MASKED_QUANT = "pack-quantized+bitmask"  # compression.json `format` of a pruned + quantized layer (our extension)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a b-bit code."""
    if not 2 <= bits <= 8:
        raise BadInput(f"bits must be between 2 and 8, got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def resolve_group_size(in_features: int, group_size: int, layer: str = "") -> int:
    """The group size a layer really gets: the requested one when it divides in_features, otherwise the
    largest power of two >= 16 that does (the caller warns); -1 (per channel) passes through."""
    if group_size == -1:
        return -1
    if group_size <= 0:
        raise BadInput(f"group_size must be -1 (per channel) or positive, got {group_size}")
    if in_features % group_size == 0:
        return group_size
    g = 1 << (min(group_size, in_features).bit_length() - 1)
    while g >= 16 and in_features % g:
        g //= 2
    if g < 16:
        raise BadInput(
            f"group_size {group_size} does not divide in_features {in_features} of layer {layer or '?'}, "
            f"and no power-of-two group size >= 16 does either"
        )
    return g


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """[N, K] -> [N, K/g, g] (per channel: [N, 1, K])."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    return w.reshape(n, k // g, g)


def qparams_minmax(
    wmin: Tensor, wmax: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Scale (rounded to scale_dtype) and int8 zero point from per-group ranges; zero is None if symmetric."""
    qmin, qmax = qrange(bits)
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    tiny = torch.finfo(torch.float16).tiny
    if symmetric:
        scale = torch.maximum(wmax, -wmin) / ((qmax - qmin) / 2)
        scale = scale.clamp_min(tiny).to(scale_dtype)
        return scale, None
    scale = ((wmax - wmin) / (qmax - qmin)).clamp_min(tiny).to(scale_dtype)
    zero = torch.round(qmin - wmin / scale.float()).clamp(qmin, qmax).to(torch.int8)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    """W [N, K] float -> int8 codes [N, K] with the given (already rounded) scale [N, G] and zero [N, G]."""
    qmin, qmax = qrange(bits)
    wg = _grouped(w.float(), group_size)  # (N, G, g)
    s = scale.float().unsqueeze(-1)
    z = 0.0 if zero is None else zero.float().unsqueeze(-1)
    q = torch.clamp(torch.round(wg / s) + z, qmin, qmax)
    return q.reshape(w.shape).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, dtype: torch.dtype) -> Tensor:
    """int8 codes [N, K] -> weights [N, K]: (q - zero) * scale, computed in float32, then cast."""
    qg = _grouped(q, group_size).float()  # (N, G, g)
    if zero is not None:
        qg = qg - zero.float().unsqueeze(-1)
    return (qg * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)


def find_qparams(
    w: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    mse: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[Tensor, Tensor | None]:
    """Per-group scale/zero of W [N, K]: min/max, or with mse=True the shrink of the range (1, 0.99, ...,
    1 - max_shrink) that minimises sum |Q(w) - w|^norm per group (the GPTQ reference's clipping search)."""
    wg = _grouped(w.float(), group_size)  # (N, G, g)
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    scale, zero = qparams_minmax(wmin, wmax, bits, symmetric, scale_dtype)
    if not mse:
        return scale, zero
    best = _group_err(wg, scale, zero, bits, norm)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = qparams_minmax(p * wmin, p * wmax, bits, symmetric, scale_dtype)
        err = _group_err(wg, s, z, bits, norm)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


def _group_err(wg: Tensor, scale: Tensor, zero: Tensor | None, bits: int, norm: float) -> Tensor:
    qmin, qmax = qrange(bits)
    s = scale.float().unsqueeze(-1)
    z = 0.0 if zero is None else zero.float().unsqueeze(-1)
    dq = (torch.clamp(torch.round(wg / s) + z, qmin, qmax) - z) * s
    return (dq - wg).abs().pow(norm).sum(-1)  # (N, G)


def refit_scales(
    w: Tensor, h: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int
) -> Tensor:
    """With the integer codes fixed, the scales that minimise each row's output error
    (w - w_hat) H (w - w_hat)^T, w_hat = s_g (q - z) on each group g: a G x G least-squares system per row.
    A row keeps its old scales unless the new ones, rounded to the scale dtype, are positive and lower
    its error, so the layer's error never goes up."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    ng = k // g
    w, h = w.double(), h.double()
    u = _grouped(q.double(), group_size)  # (N, G, g)
    if zero is not None:
        u = u - zero.double().unsqueeze(-1)
    # a[n, g1, g2] = u_g1 H u_g2^T; b[n, g1] = u_g1 H w^T
    hu = torch.einsum("kgj,ngj->nkg", h.reshape(k, ng, g), u)  # (N, K, G)
    a = torch.einsum("ngi,ngih->ngh", u, hu.reshape(n, ng, g, ng))
    b = (u * _grouped(w @ h, group_size)).sum(-1)  # (N, G)
    ridge = 1e-9 * a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    a = a + ridge[:, None, None] * torch.eye(ng, dtype=a.dtype)
    new = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1).to(scale.dtype)  # (N, G), rounded like storage

    def row_err(s: Tensor) -> Tensor:
        d = w - (u * s.double().unsqueeze(-1)).reshape(n, k)
        return ((d @ h) * d).sum(-1)

    ok = torch.isfinite(new.float()).all(-1) & (new.float() > 0).all(-1)
    better = ok & (row_err(torch.where(ok[:, None], new, scale)) < row_err(scale))
    return torch.where(better[:, None], new, scale)


@dataclass
class SparseResidual:
    """A sparse float16 correction added to a dense quantized weight (ReQuant's outliers and restored weights):
    W = dequant(q) + S. Held as sorted flat indices (row * K + col) and values; stored as CSR (column indices
    int16 when K fits, else int32, and int32 row pointers), which is what storage_bits counts."""

    idx: Tensor  # (nnz,) int64, sorted, unique
    values: Tensor  # (nnz,) float16

    SUFFIXES = ("weight_sparse_values", "weight_sparse_col", "weight_sparse_rowptr")

    @property
    def nnz(self) -> int:
        return int(self.idx.numel())

    @staticmethod
    def from_dense_mask(target: Tensor, dense: Tensor, mask: Tensor) -> "SparseResidual":
        """The residual that makes dense + S equal `target` where `mask` is set (values rounded to float16)."""
        idx = mask.reshape(-1).nonzero().squeeze(1)
        vals = (target.float().reshape(-1)[idx] - dense.float().reshape(-1)[idx]).half()
        return SparseResidual(idx, vals)

    def add_to(self, w: Tensor) -> Tensor:
        """w (N, K) + S, as a new tensor of w's dtype."""
        out = w.clone().reshape(-1)
        out.index_add_(0, self.idx.to(w.device), self.values.to(w.device, w.dtype))
        return out.reshape(w.shape)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        n, k = shape
        return self.nnz * (16 + col_index_bits(k)) + (n + 1) * 32

    def to_tensors(self, shape: tuple[int, int]) -> dict[str, Tensor]:
        n, k = shape
        rows, cols = self.idx // k, self.idx % k
        rowptr = torch.zeros(n + 1, dtype=torch.int64)
        rowptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        return {"weight_sparse_values": self.values.half().contiguous(),
                "weight_sparse_col": cols.to(torch.int16 if col_index_bits(k) == 16 else torch.int32),
                "weight_sparse_rowptr": rowptr.to(torch.int32)}

    @staticmethod
    def from_tensors(t: dict[str, Tensor], k: int) -> "SparseResidual":
        rowptr = t["weight_sparse_rowptr"].long()
        rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr.diff())
        return SparseResidual(rows * k + t["weight_sparse_col"].long(), t["weight_sparse_values"].half())


def col_index_bits(k: int) -> int:
    """Bits of a stored column index: int16 up to 32767 columns, else int32."""
    return 16 if k <= 32767 else 32


@dataclass
class QWeight(CompressedWeight):
    """A quantized Linear weight: int8 codes plus grid, and optionally a sparse float16 residual (dense-and-
    sparse). group_size is the effective one (-1: per channel). In the block it stays a Linear with the
    dequantized weight (runtime_module None).

    Pruned and quantized (`mask` set, True = kept): the codes of the pruned weights must be the grid's zero (the
    zero point, or 0 when symmetric), so they dequantize to exactly 0 (checked whenever the weight is read or
    written). The artifact then holds only the survivors' codes (our extension, DESIGN.md section 4):
    `weight_bitmask` (uint8 [N, ceil(K/8)], sparse.pack_bitmask's bit order, the one of compressed-tensors'
    sparse-bitmask) and `weight_packed_kept` (int32 [ceil(nnz*bits/32)]: the kept codes in row-major order, packed
    like one row of weight_packed), beside the usual weight_scale / weight_zero_point / weight_shape. There is no
    `weight_packed`, so a pack-quantized reader fails on the missing tensor instead of misreading codes."""

    q: Tensor  # (N, K) int8
    scale: Tensor  # (N, G)
    zero: Tensor | None  # (N, G) int8, None when symmetric
    bits: int
    group_size: int
    requested_group_size: int
    sparse: SparseResidual | None = None
    mask: Tensor | None = None  # (N, K) bool, True = kept; None: not pruned
    sparsity_structure: str = "unstructured"  # "unstructured", "2:4", "N:M" (a pruned weight's pattern)
    calibration: dict[str, Any] | None = None  # when the quantizer saw less than all the calibration data (an MoE
    # expert): {"tokens": n} and, when a rule replaced the method, {"fallback": ..., "reason": ...}

    MASKED_SUFFIXES = ("weight_bitmask", "weight_packed_kept")

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def nnz(self) -> int:
        """Kept weights (all of them when not pruned)."""
        return self.q.numel() if self.mask is None else int(self.mask.sum())

    @property
    def sparsity(self) -> float:
        """Fraction pruned (0 when not pruned)."""
        return 1.0 - self.nnz / max(self.q.numel(), 1)

    def zero_codes(self) -> Tensor:
        """(N, K) int8: the code that dequantizes to exactly 0 at each weight (the group's zero point, or 0)."""
        if self.zero is None:
            return torch.zeros_like(self.q)
        return expand_groups(self.zero.to(self.q.device), self.shape[1]).to(self.q.dtype)

    def check_mask(self) -> None:
        """With a mask: raise ValueError unless every pruned weight has the zero code (and no sparse residual entry)."""
        if self.mask is None:
            return
        validate_mask(self.mask, self.q.shape, self.sparsity_structure, "QWeight")
        pruned = ~self.mask.to(self.q.device)
        bad = int((pruned & (self.q != self.zero_codes())).sum())
        if bad:
            raise ValueError(f"QWeight: {bad} pruned weights have a code other than the grid's zero "
                             f"({'0' if self.zero is None else 'the zero point'}), so they would not dequantize to 0")
        if self.sparse is not None and self.sparse.nnz:
            hit = int(pruned.reshape(-1)[self.sparse.idx.to(self.q.device)].sum())
            if hit:
                raise ValueError(f"QWeight: {hit} sparse residual entries sit on pruned weights")

    def structure(self) -> str:
        """The pruned weight's structure as written into the artifact (sparse.effective_structure)."""
        return "unstructured" if self.mask is None else effective_structure(self.mask, self.sparsity_structure)

    def dequantize_dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The integer grid's weight alone (without the sparse residual)."""
        self.check_mask()
        return dequantize(self.q, self.scale, self.zero, self.group_size, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = self.dequantize_dense(torch.float32 if self.sparse is not None else dtype)
        return w if self.sparse is None else self.sparse.add_to(w).to(dtype)

    def storage_bits(self) -> int:
        """Bits this weight takes on disk: packed codes (with a mask: the survivors' codes and the bitmask), scales,
        packed zero points, the sparse residual. The int64 weight_shape is not counted."""
        n, k = self.shape
        if self.mask is None:
            bits = n * math.ceil(k * self.bits / 32) * 32
        else:
            bits = math.ceil(self.nnz * self.bits / 32) * 32 + bitmask_bits((n, k))
        bits += self.scale.numel() * self.scale.element_size() * 8
        if self.zero is not None:
            bits += math.ceil(n * self.bits / 32) * 32 * self.zero.shape[1]
        if self.sparse is not None:
            bits += self.sparse.storage_bits(self.shape)
        return bits

    def to_tensors(self) -> dict[str, Tensor]:
        """The compressed-tensors pack-quantized tensors of this weight (names relative to the Linear), and the
        sparse residual's CSR tensors (our extension, DESIGN.md section 4) when there is one. With a mask, the codes
        are written as weight_bitmask + weight_packed_kept instead of weight_packed (see the class)."""
        if self.mask is None:
            out = {"weight_packed": pack_int32(self.q, self.bits)}
        else:
            self.check_mask()
            mask = self.mask.cpu()
            kept = self.q.cpu()[mask].reshape(1, -1)  # (1, nnz), row-major
            out = {"weight_bitmask": pack_bitmask(mask), "weight_packed_kept": pack_int32(kept, self.bits).reshape(-1)}
        out["weight_scale"] = self.scale.contiguous()
        out["weight_shape"] = torch.tensor(self.shape, dtype=torch.int64)
        if self.zero is not None:
            out["weight_zero_point"] = pack_int32(self.zero.t(), self.bits).t().contiguous()
        if self.sparse is not None:
            out.update(self.sparse.to_tensors(self.shape))
        return out

    def manifest_entry(self) -> dict[str, Any]:
        """The grid (bits, group sizes, symmetric), the shape, the sparse residual (csr-float16, our extension) when
        there is one, and when pruned the format MASKED_QUANT, sparsity and structure; bits_per_weight last."""
        n, k = self.shape
        entry: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size,
                                 "requested_group_size": self.requested_group_size, "symmetric": self.symmetric,
                                 "shape": [n, k]}
        if self.sparse is not None:  # our extension: a CSR float16 residual (DESIGN.md section 4)
            entry["sparse"] = {"format": "csr-float16", "nnz": self.sparse.nnz,
                               "fraction": round(self.sparse.nnz / (n * k), 6),
                               "bits_per_weight": round(self.sparse.storage_bits((n, k)) / (n * k), 4)}
        if self.mask is not None:
            entry["format"] = MASKED_QUANT
            entry["sparsity"] = round(self.sparsity, 6)
            entry["sparsity_structure"] = self.structure()
        if self.calibration is not None:
            entry["calibration"] = dict(self.calibration)
        entry["bits_per_weight"] = round(self.storage_bits() / (n * k), 4)
        return entry


def quantize_rtn(
    w: Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype, mse: bool = False,
    requested_group_size: int | None = None, exact: Tensor | None = None,
) -> QWeight:
    """Round-to-nearest on the (optionally MSE-clipped) min/max grid. `exact` (N, K) bool: weights held exactly
    by a sparse residual (dense-and-sparse); the grid is fitted without them (they count as 0, which every
    grid holds) and their codes are 0's."""
    dense = w if exact is None else masked_zero(w, exact)
    scale, zero = find_qparams(dense, bits, group_size, symmetric, scale_dtype, mse=mse)
    q = quantize(dense, scale, zero, bits, group_size)
    qw = QWeight(q, scale, zero, bits, group_size, group_size if requested_group_size is None else requested_group_size)
    if exact is not None:
        qw.sparse = SparseResidual.from_dense_mask(w, qw.dequantize_dense(), exact)
    return qw


def expand_groups(t: Tensor, k: int) -> Tensor:
    """(N, G) per-group values -> (N, K), each repeated over its group's columns."""
    return t.repeat_interleave(k // t.shape[1], dim=1)


def masked_zero(w: Tensor, mask: Tensor) -> Tensor:
    """w with the masked entries set to 0 (a new tensor)."""
    return torch.where(mask, torch.zeros((), dtype=w.dtype, device=w.device), w)


def pack_int32(q: Tensor, bits: int) -> Tensor:
    """int8 codes (R, C) in the signed b-bit range -> int32 words (R, ceil(C*b/32)), dense along dim 1."""
    r, c = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)  # unsigned codes
    words = math.ceil(c * bits / 32)
    start = torch.arange(c, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    out = torch.zeros(r, words + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand(r, c), (u << off) & 0xFFFFFFFF)
    spill = off + bits > 32  # high bits that cross into the next word
    if spill.any():
        out.scatter_add_(1, (word[spill] + 1).expand(r, -1), u[:, spill] >> (32 - off[spill]))
    out = out[:, :words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of pack_int32: int32 words (R, W) -> int8 codes (R, cols).
    32 codes fill exactly `bits` words, so the words are viewed as (R, W/bits, bits) and code j of every
    32-group is cut from the same word(s) at the same offset (a small index on the last dim, no gather)."""
    r, w = packed.shape
    pad = -w % bits
    words = torch.nn.functional.pad(packed, (0, pad)) if pad else packed
    words = words.reshape(r, -1, bits)  # (R, G, bits): G groups of 32 codes
    start = torch.arange(32, device=packed.device) * bits
    word, off = start // 32, (start % 32).to(torch.int32)
    lo = torch.clamp(32 - off, max=bits)  # bits of code j in its first word; the rest open the next word
    u = (words[:, :, word] >> off) & ((1 << lo) - 1)  # (R, G, 32); the mask drops shifted-in sign bits
    if bits & (bits - 1):  # widths that do not divide 32 have codes that straddle two words
        nxt = torch.clamp(word + 1, max=bits - 1)
        u = u | ((words[:, :, nxt] & ((1 << (bits - lo)) - 1)) << lo)
    u = u.reshape(r, -1)[:, :cols]
    return (u - (1 << (bits - 1))).to(torch.int8)


def qweight_from_tensors(t: dict[str, Tensor], bits: int, group_size: int) -> QWeight:
    """Read the pack-quantized tensors of one Linear (and its sparse residual) back into a QWeight
    (group_size -1 for per channel). A pruned one (weight_bitmask + weight_packed_kept) gets its mask back and
    the grid's zero code at the pruned weights."""
    n, k = (int(x) for x in t["weight_shape"].tolist())
    scale = t["weight_scale"]
    zero = None
    if "weight_zero_point" in t:
        zero = unpack_int32(t["weight_zero_point"].t(), bits, n).t().contiguous()
    sparse = SparseResidual.from_tensors(t, k) if "weight_sparse_values" in t else None
    if "weight_bitmask" not in t:
        return QWeight(unpack_int32(t["weight_packed"], bits, k), scale, zero, bits, group_size, group_size, sparse)
    mask = unpack_bitmask(t["weight_bitmask"], k)
    nnz = int(mask.sum())
    packed = t["weight_packed_kept"].reshape(1, -1)
    if packed.shape[1] != math.ceil(nnz * bits / 32):
        raise ValueError(f"weight_packed_kept has {packed.shape[1]} words, the bitmask keeps {nnz} {bits}-bit codes")
    qw = QWeight(torch.zeros(n, k, dtype=torch.int8), scale, zero, bits, group_size, group_size, sparse, mask)
    q = qw.zero_codes()
    q[mask] = unpack_int32(packed, bits, nnz).reshape(-1)
    qw.q = q
    return qw


def dequantize_packed(packed: Tensor, scale: Tensor, zero_packed: Tensor | None, shape: tuple[int, int], bits: int,
                      group_size: int, dtype: torch.dtype) -> Tensor:
    """Reference dequantization straight from the pack-quantized tensors: (N, K) weights of `dtype`."""
    n, k = shape
    q = unpack_int32(packed, bits, k)
    zero = None if zero_packed is None else unpack_int32(zero_packed.t(), bits, n).t()
    return dequantize(q, scale, zero, group_size, dtype)
