"""A Linear stored as two low-rank factors: the artifact's weight, LowRankWeight (its runtime module is
modules.LowRankLinear). The factorisation is compressor/algorithms/lowrank.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .modules import LowRankLinear
from .weights import CompressedWeight

LOWRANK = "lowrank"  # compression.json `format` of a factorised layer (our extension, DESIGN.md section 4)


@dataclass
class LowRankWeight(CompressedWeight):
    """A Linear weight stored as two factors, W ~ B A: A (r, d_in) the first Linear, B (d_out, r) the second (the
    layer's bias stays under its own name and is added after B). The artifact holds `<layer>.a.weight` and
    `<layer>.b.weight` instead of `<layer>.weight`, and compressor.load builds a LowRankLinear from them; in the
    block the runner puts that module in place of the Linear, so later passes see the factors (runtime_module)."""

    a: Tensor
    b: Tensor
    compressed: set = field(default_factory=set)  # factors ("a", "b") a later pass compressed: stored as theirs

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"LowRankWeight: factors {tuple(self.a.shape)} and {tuple(self.b.shape)} do not chain")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.b.double() @ self.a.double()).to(dtype)

    def storage_bits(self) -> int:
        """Bits of the factors stored as they are (a factor a later pass compressed counts in its own entry)."""
        return sum(t.numel() * t.element_size() * 8 for k, t in (("a", self.a), ("b", self.b)) if k not in self.compressed)

    def to_tensors(self) -> dict[str, Tensor]:
        return {f"{k}.weight": t.detach().contiguous().cpu() for k, t in (("a", self.a), ("b", self.b))
                if k not in self.compressed}

    def manifest_entry(self) -> dict[str, Any]:
        """Format LOWRANK (our extension: two factors instead of the weight, DESIGN.md section 4), no integer grid,
        the factors' dtype, the rank and the shape; bits_per_weight last."""
        n, k = self.shape
        return {"format": LOWRANK, "bits": None, "dtype": str(self.a.dtype).removeprefix("torch."), "rank": self.rank,
                "group_size": None, "requested_group_size": None, "symmetric": None, "shape": [n, k],
                "bits_per_weight": round(self.storage_bits() / (n * k), 4)}

    def runtime_module(self, bias: Tensor | None) -> LowRankLinear:
        """The two-Linear module with the factors as weights: a later pass in the recipe sees them as `<layer>.a`
        and `<layer>.b` and may compress them."""
        return LowRankLinear.of(self.a, self.b, bias)

    def part_compressed(self, part: str) -> None:
        if part not in ("a", "b"):
            raise ValueError(f"LowRankWeight has the factors 'a' and 'b', not {part!r}")
        self.compressed.add(part)
