"""FlexRound (Lee et al., ICML 2023, "FlexRound: Learnable Rounding based on Element-wise Division for
Post-Training Quantization"), learned on block reconstruction (reconstruct.py).

W_hat = s1 * (clip(round(W / (s1 * S2 * s3)) + z, qmin, qmax) - z): s1 the grid scale (per group or per
output channel), S2 one divisor per weight, s3 one per output row, all learned in log space (S2 = s3 = 1 at
the start, s1 from the min/max or MSE grid), the zero point fixed from the initial grid, round() passed
straight through. Because each weight is divided by its own learned factor, a large weight can move more
than one grid step, and the grid itself (s1) moves too. The stored grid is s1 and the codes: plain
compressed-tensors, the same as round-to-nearest.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ..blocks import BlockIO, Context
from ..quant import QWeight
from . import register_pass
from .reconstruct import LearnedWeight, ReconConfig, learn_rounding, round_ste


class FlexRoundConfig(ReconConfig):
    # measured on the demo model (SmolLM2-135M, W4 per channel, blocks 0-1, 32 windows of 512): 200 steps of
    # one window at lr 1e-2 beat 100 steps of two at 3e-3 or 1e-2 and 200 of two at 3e-3, in less time; on
    # block 3 (W3 g64, 8 windows of 256 tokens) it leaves 7.6e-4 block-output error to GPTQ's 2.02e-3
    iters: int = Field(200, ge=1)
    lr: float = Field(1e-2, gt=0, description="Adam on log s1, log S2, log s3, cosine decay to 0")


class FlexRoundWeight(LearnedWeight):
    """A Linear weight quantized by element-wise division with learned s1, S2, s3."""

    def __init__(self, w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int,
                 scale_dtype: torch.dtype):
        super().__init__(w, zero, bits, group_size)
        n, k = w.shape
        self.scale_dtype = scale_dtype
        self.register_buffer("w", w.float())
        self.log_s1 = nn.Parameter(scale.float().log())  # (N, G)
        self.log_s2 = nn.Parameter(torch.zeros(n, k, device=w.device))
        self.log_s3 = nn.Parameter(torch.zeros(n, 1, device=w.device))
        self.register_buffer("zg", self._grouped(self.z)[:, :, :1].clone())  # (N, G, 1)

    def _s1(self) -> Tensor:
        """s1 as stored (rounded to the scale dtype), with the gradient of the unrounded value."""
        s1 = self.log_s1.exp()
        return s1 + (s1.to(self.scale_dtype).float() - s1).detach()

    def _grouped(self, t: Tensor) -> Tensor:
        """(N, K) -> (N, G, K/G): the per-group factors then broadcast instead of being expanded to (N, K) at
        every step (a third less time in building the weights, measured on the demo's block shapes)."""
        n, k = t.shape
        return t.view(n, self.log_s1.shape[1], k // self.log_s1.shape[1])

    def _codes(self, rounding) -> Tensor:
        """(N, G, K/G) codes: round(W / (s1 S2 s3)) + z, clamped (the division as a multiplication by exp(-log))."""
        x = self._grouped(self.w) * torch.exp(-(self.log_s1.unsqueeze(-1) + self._grouped(self.log_s2)
                                                + self.log_s3.unsqueeze(-1)))
        return torch.clamp(rounding(x) + self.zg, self.qmin, self.qmax)

    def soft(self) -> Tensor:
        return ((self._codes(round_ste) - self.zg) * self._s1().unsqueeze(-1)).reshape(self.w.shape)

    @torch.no_grad()
    def hard_grid(self) -> QWeight:
        return self._qweight(self._codes(torch.round).reshape(self.w.shape), self.log_s1.exp().to(self.scale_dtype))


@register_pass("flexround", FlexRoundConfig, reads="targets", distributed=True)
def flexround(block: nn.Module, io: BlockIO, cfg: FlexRoundConfig, ctx: Context,
              exact: dict[str, Tensor] | None = None) -> dict[str, QWeight]:
    """FlexRound: learned element-wise division before rounding, by block-output reconstruction."""
    return learn_rounding("flexround", block, io, cfg, ctx,
                          lambda w, s, z, g: FlexRoundWeight(w, s, z, cfg.bits, g, cfg.torch_scale_dtype),
                          lr_decay=True, exact=exact)
