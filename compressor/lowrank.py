"""A Linear stored as two low-rank factors: the artifact's weight (LowRankWeight) and its runtime module
(LowRankLinear). The factorisation is compressor/algorithms/lowrank.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

LOWRANK = "lowrank"  # compression.json `format` of a factorised layer (our extension, DESIGN.md section 4)


@dataclass
class LowRankWeight:
    """A Linear weight stored as two factors, W ~ B A: A (r, d_in) the first Linear, B (d_out, r) the second (the
    layer's bias stays under its own name and is added after B). Duck-types what the runner and the writer use of
    quant.QWeight (shape, dequantize, storage_bits, to_tensors); the artifact holds `<layer>.a.weight` and
    `<layer>.b.weight` instead of `<layer>.weight`, and compressor.load builds a LowRankLinear from them."""

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


class LowRankLinear(torch.nn.Module):
    """y = B (A x) + bias: the two-Linear module of a factorised layer (children `a`, d_in -> r without bias, and
    `b`, r -> d_out; the bias, when the layer had one, is this module's own, as in the original checkpoint)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = torch.nn.Linear(in_features, rank, bias=False, dtype=dtype, device="meta")
        self.b = torch.nn.Linear(rank, out_features, bias=False, dtype=dtype, device="meta")
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta")) if bias else None

    @classmethod
    def of(cls, w: LowRankWeight, bias: Tensor | None) -> "LowRankLinear":
        """The module of `w` with its factors as weights (the runner puts it in the block, so a later pass in the
        recipe sees the factors as two Linears, `<layer>.a` and `<layer>.b`, and can quantize them)."""
        d_out, d_in = w.shape
        m = cls(d_in, d_out, w.rank, bias is not None, w.a.dtype)
        m.a.weight = torch.nn.Parameter(w.a.clone(), requires_grad=False)
        m.b.weight = torch.nn.Parameter(w.b.clone(), requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: Tensor) -> Tensor:
        y = self.b(self.a(x))
        return y if self.bias is None else y + self.bias
