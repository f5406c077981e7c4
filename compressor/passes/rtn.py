"""Round-to-nearest: every weight to the nearest point of its group's min/max (or MSE-clipped) grid."""
from __future__ import annotations

from torch import Tensor, nn

from ..algorithms.prune import keep_pruned_zero
from ..blocks import BlockIO, Context
from ..quant import QWeight, quantize_rtn
from . import QuantConfig, layer_group_size, register_pass


class RTNConfig(QuantConfig):
    pass


@register_pass("rtn", RTNConfig, reads="weights", masks="keeps", outside=True,
              distributed=True)
def rtn(block: nn.Module, io: BlockIO, cfg: RTNConfig, ctx: Context,
        exact: dict[str, Tensor] | None = None) -> dict[str, QWeight]:
    """Round-to-nearest, no calibration data needed (the baseline). `exact`: per layer, weights a sparse
    residual holds exactly (ReQuant's outliers). Pruned layers (io.masks): the grid is fitted on the kept
    weights with the pruned ones at 0, which every grid holds (its range always includes 0)."""
    out = {}
    for name, lin in io.layers.items():
        g = layer_group_size(name, lin.in_features, cfg, ctx)
        pruned = io.masks.get(name)  # after a pruning pass: the grid fitted on the kept weights, the rest at 0
        w = lin.weight.data if pruned is None else lin.weight.data * pruned.mask.to(lin.weight.device)
        out[name] = quantize_rtn(
            w, cfg.bits, g, cfg.symmetric, cfg.torch_scale_dtype, mse=cfg.mse,
            requested_group_size=cfg.group_size, exact=None if exact is None else exact.get(name),
        )
        if pruned is not None:
            out[name] = keep_pruned_zero(out[name], pruned.mask, pruned.sparsity_structure)
    return out
