"""The compressed-weight contract: what the runner, the artifact writer and compression.json read of a compressed
Linear weight. quant.QWeight (an integer grid, maybe pruned or with a sparse residual), sparse.SparseWeight
(pruned) and lowrank.LowRankWeight (two factors) implement it; nothing else asks which of them a weight is."""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn


class CompressedWeight(Protocol):
    """One compressed Linear weight. The last two methods have defaults for a weight that stays inside its Linear."""

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight it stands for."""
        ...

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (N, K) weight a loader of the artifact computes with."""
        ...

    def storage_bits(self) -> int:
        """Bits it takes in the artifact (scales, zero points, masks and indices included)."""
        ...

    def to_tensors(self) -> dict[str, Tensor]:
        """The artifact's tensors, named relative to the layer (`weight_packed`, `bitmask`, `a.weight`, ...)."""
        ...

    def manifest_entry(self) -> dict[str, Any]:
        """compression.json's entry of the layer but its "pass" and "weight_rel_err" (the run knows those)."""
        ...

    def runtime_module(self, bias: Tensor | None) -> nn.Module | None:
        """The module the runner puts into the block in place of the Linear (its bias `bias`) while the recipe's
        later passes run, or None: the Linear stays, with the dequantized weight loaded into it."""
        return None

    def part_compressed(self, part: str) -> None:
        """A later pass compressed `part`, a Linear inside runtime_module() (a factor): from now on that pass's
        weight stores and counts it, this one no longer does."""
        raise ValueError(f"{type(self).__name__} has no runtime module, so no part {part!r} to compress")
