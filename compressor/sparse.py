"""Pruned weights in the artifact: compressed-tensors' sparse-bitmask layout and the bitmask helpers.

A pruned, not quantized Linear weight (`SparseWeight`) is written the way compressed-tensors' `sparse-bitmask`
compressor wrote it (the releases that had one, e.g. 0.12.2: compressors/sparse_compressors/sparse_bitmask.py
and utils/helpers.py pack_bitmasks), names relative to the Linear's module path:
- `shape`       int64 [2]              the dense shape (N, K)
- `compressed`  [nnz], the weight's dtype   the kept weights, row-major
- `bitmask`     uint8 [N, ceil(K/8)]   bit j % 8 of byte j // 8 of a row (least significant bit first,
                                       numpy.packbits(bitorder="little")) is set when weight j is kept
- `row_offsets` int64 [N]              index in `compressed` where each row starts (exclusive prefix sum)
compressed-tensors derived the bitmask from `weight != 0`; we write the pruning mask itself, which is the same
unless a kept weight is exactly 0 (its value is then stored; the decompressor reads both the same way).

A pruned and quantized weight (`quant.QWeight` with a mask) uses the same bitmask bits (`weight_bitmask`) beside
its packed surviving codes; that one is our extension (quant.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .weights import CompressedWeight

SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")
SPARSE_BITMASK = "sparse-bitmask"  # compression.json `format` of a SparseWeight layer (compressed-tensors' name)


def pack_bitmask(mask: Tensor) -> Tensor:
    """(N, K) bool -> (N, ceil(K/8)) uint8: weight j of a row is bit j % 8 (LSB first) of byte j // 8."""
    n, k = mask.shape
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, -k % 8)).reshape(n, -1, 8)  # (N, B, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=mask.device)
    return (m.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bitmask(packed: Tensor, cols: int) -> Tensor:
    """Inverse of pack_bitmask: (N, B) uint8 -> (N, cols) bool."""
    n = packed.shape[0]
    bits = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    return bits.reshape(n, -1)[:, :cols].bool()


def bitmask_bits(shape: tuple[int, int]) -> int:
    """Bits the packed bitmask of an (N, K) weight takes: whole bytes per row."""
    n, k = shape
    return n * math.ceil(k / 8) * 8


def parse_structure(structure: str) -> tuple[int, int] | None:
    """None for "unstructured", else (N, M) of "N:M" (at most N kept in every run of M consecutive weights of a row)."""
    if structure == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", structure)
    if not m or not 0 < int(m[1]) <= int(m[2]):
        raise ValueError(f"sparsity_structure {structure!r}: expected 'unstructured' or N:M with 0 < N <= M (e.g. 2:4)")
    return int(m[1]), int(m[2])


def effective_structure(mask: Tensor, structure: str) -> str:
    """The structure the mask really has, to write into the artifact: "N:M" when every run of M consecutive weights
    of a row keeps at most N; a mask labelled N:M that keeps more in some run is recorded as k:M, k the most any run
    keeps (k = M, or M not dividing K: "unstructured")."""
    nm = parse_structure(structure)
    if nm is None:
        return "unstructured"
    n, m = nm
    rows, k = mask.shape
    if k % m:
        return "unstructured"
    most = int(mask.reshape(rows, k // m, m).sum(-1).max()) if mask.numel() else 0
    if most <= n:
        return structure
    return f"{most}:{m}" if most < m else "unstructured"


def validate_mask(mask: Tensor, shape: tuple[int, ...], structure: str, what: str) -> None:
    """Raise ValueError unless `mask` is a bool tensor of `shape` and `structure` a valid label."""
    if mask.dtype != torch.bool:
        raise ValueError(f"{what}: mask must be bool (True = kept), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} differs from the weight's {tuple(shape)}")
    parse_structure(structure)


@dataclass
class SparseWeight(CompressedWeight):
    """A pruned, not quantized Linear weight, stored in compressed-tensors' sparse-bitmask layout. In the block it
    stays a Linear with the pruned weight (runtime_module None)."""

    weight: Tensor  # (N, K) float, exactly 0 where pruned, in the dtype to store (the checkpoint's)
    mask: Tensor  # (N, K) bool, True = kept
    sparsity_structure: str = "unstructured"  # "unstructured", "2:4", "N:M"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError unless weight and mask agree: 2-D float weight, bool mask of its shape, 0 where pruned."""
        if self.weight.dim() != 2 or not self.weight.is_floating_point():
            raise ValueError(f"SparseWeight: weight must be a 2-D float tensor, got {self.weight.dtype} "
                             f"{tuple(self.weight.shape)}")
        validate_mask(self.mask, self.weight.shape, self.sparsity_structure, "SparseWeight")
        mask = self.mask.to(self.weight.device)
        bad = int(((self.weight != 0) & ~mask).sum())
        if bad:
            raise ValueError(f"SparseWeight: {bad} pruned weights are not 0")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def nnz(self) -> int:
        """Kept weights."""
        return int(self.mask.sum())

    @property
    def sparsity(self) -> float:
        """Fraction pruned."""
        n, k = self.shape
        return 1.0 - self.nnz / max(n * k, 1)

    def structure(self) -> str:
        """The structure written into the artifact (effective_structure of the mask and the label)."""
        return effective_structure(self.mask, self.sparsity_structure)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype)

    def storage_bits(self) -> int:
        """Bits of every tensor to_tensors writes: the kept values in the stored dtype, the bitmask (whole bytes per
        row), the int64 row offsets and the int64 shape."""
        n, k = self.shape
        return self.nnz * self.weight.element_size() * 8 + bitmask_bits((n, k)) + n * 64 + 2 * 64

    def to_tensors(self) -> dict[str, Tensor]:
        """compressed-tensors sparse-bitmask tensors, names relative to the Linear (`<layer>.shape`, ...)."""
        self.check()
        mask = self.mask.cpu()
        w = self.weight.detach().cpu()
        counts = mask.sum(-1)  # (N,) int64
        return {
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "compressed": w[mask].contiguous(),  # row-major
            "bitmask": pack_bitmask(mask),
            "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
        }

    def manifest_entry(self) -> dict[str, Any]:
        """Format SPARSE_BITMASK, no integer grid (bits, group sizes, symmetric null), the dtype the kept values are
        stored in, the shape, sparsity and structure; bits_per_weight last."""
        n, k = self.shape
        return {"format": SPARSE_BITMASK, "bits": None, "dtype": str(self.weight.dtype).removeprefix("torch."),
                "group_size": None, "requested_group_size": None, "symmetric": None, "shape": [n, k],
                "sparsity": round(self.sparsity, 6), "sparsity_structure": self.structure(),
                "bits_per_weight": round(self.storage_bits() / (n * k), 4)}

    @staticmethod
    def from_tensors(t: dict[str, Tensor], sparsity_structure: str = "unstructured") -> "SparseWeight":
        """Read the sparse-bitmask tensors of one Linear (the names without the layer prefix). Accepts the shape and
        row offsets as column vectors too (some releases wrote them [2, 1] and [N, 1])."""
        n, k = (int(x) for x in t["shape"].reshape(-1).tolist())
        mask = unpack_bitmask(t["bitmask"].reshape(n, -1), k)
        values = t["compressed"].reshape(-1)
        if int(mask.sum()) != values.numel():
            raise ValueError(f"sparse-bitmask: the bitmask keeps {int(mask.sum())} weights, "
                             f"`compressed` holds {values.numel()}")
        w = torch.zeros(n, k, dtype=values.dtype)
        w[mask] = values
        return SparseWeight(w, mask, sparsity_structure)
