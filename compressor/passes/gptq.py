"""GPTQ (Frantar et al. 2022): quantize column by column, spreading each column's error over the columns
not yet quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X / n.

The math is `gptq_quantize` (one weight matrix and its Hessian); the registered pass only wires it to a
block: layers that read the same input are quantized together, in execution order, and each group's
Hessian is taken with the earlier groups already quantized ("true sequential").

A layer that saw fewer than `min_tokens` calibration tokens (an MoE expert the router rarely picks; with none, its
Hessian is zero and GPTQ would zero the weight) is quantized with the identity for its Hessian: GPTQ then spreads no
error and is round-to-nearest on the same grid. compression.json records, per layer that saw less than all the
tokens, how many it saw and the fallback when it was taken.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .. import dist
from ..algorithms.gptq import gptq_quantize
from ..blocks import BlockIO, Context
from ..quant import QWeight
from . import QuantConfig, layer_group_size, register_pass


class GPTQConfig(QuantConfig):
    damp: float = Field(0.01, gt=0, description="fraction of the mean Hessian diagonal added to it")
    block_size: int = Field(128, ge=1, description="columns updated lazily together")
    act_order: bool = Field(True, description="quantize columns in order of decreasing Hessian diagonal")
    true_sequential: bool = True
    min_tokens: int = Field(16, ge=1, description="a layer that saw fewer calibration tokens (a rarely routed "
                            "MoE expert) is rounded to nearest instead (identity Hessian)")
    refit_scales: bool = Field(True, description="after GPTQ, re-solve each row's scales for the fixed codes "
                               "against the Hessian (least squares; a row keeps its scales unless its error drops)")


@register_pass("gptq", GPTQConfig, masks="keeps", distributed=True)
def gptq(block: nn.Module, io: BlockIO, cfg: GPTQConfig, ctx: Context,
         exact: dict[str, Tensor] | None = None) -> dict[str, QWeight]:
    """GPTQ with Hessians from the block's inputs, damping, act-order and group-wise scales. `exact`: per
    layer, weights a sparse residual holds exactly (ReQuant's outliers). Pruned layers (io.masks) are
    quantized on their fixed masks, the pruned weights ending at exactly 0."""
    out: dict[str, QWeight] = {}
    groups = io.sibling_groups(block) if cfg.true_sequential else [list(io.layers)]
    total = io.tokens()  # calibration tokens (over every rank)
    for names in groups:
        hessians = io.input_second_moments(block, names)  # summed over every rank's windows
        mine: dict[str, QWeight] = {}  # the layers this rank solves
        # on several ranks each layer is solved by one of them, chosen by its cost, and broadcast from there
        owner = dist.owners([io.layers[n].in_features ** 2 * (io.layers[n].in_features + io.layers[n].out_features)
                             for n in names])
        for name, rank in zip(names, owner):
            lin = io.layers[name]
            g = layer_group_size(name, lin.in_features, cfg, ctx)  # (its warning on every rank)
            h, seen, calibration = hessians[name], io.tokens_seen[name], None
            if seen < cfg.min_tokens:
                ctx.warn_once(f"gptq: layers that saw fewer than {cfg.min_tokens} calibration tokens (rarely routed "
                              "experts) are rounded to nearest; compression.json lists them", key="gptq-min-tokens")
            if rank != dist.world().rank:
                continue
            if seen < cfg.min_tokens:
                h = torch.eye(lin.in_features, device=h.device)
                calibration = {"tokens": seen, "fallback": "rtn",
                               "reason": f"{seen} calibration tokens < min_tokens {cfg.min_tokens}"}
            elif seen < total:
                calibration = {"tokens": seen}
            qw = gptq_quantize(
                lin.weight.data, h, cfg.bits, g, cfg.symmetric, cfg.torch_scale_dtype,
                damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order, mse=cfg.mse,
                refit=cfg.refit_scales, exact=None if exact is None else exact.get(name),
                kept=io.masks[name].mask if name in io.masks else None,
            )
            if name in io.masks:
                qw.sparsity_structure = io.masks[name].sparsity_structure
            qw.requested_group_size = cfg.group_size
            qw.calibration = calibration
            mine[name] = qw
        for name, rank in zip(names, owner):  # (into `out` in layer order on every rank)
            lin = io.layers[name]
            out[name] = dist.broadcast(mine.get(name), rank, lin.weight.device)
            lin.weight.data = out[name].dequantize(lin.weight.dtype)  # later groups see this layer quantized
    return out
