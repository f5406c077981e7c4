"""The pass registry and the pass contract. A pass registers itself with its config class; the runner finds it by
name only.

A pass's block stage compresses the Linear layers of one block from that block's cached inputs (DESIGN.md §2) and
returns a CompressedWeight per layer. It may also have model-level stages around the blocks (ReQuant has both):
- `plan(PlanInput) -> {layer: {setting: value}}`: runs before any block (on the FP model); the result is the
  pass's `assignment`, written into the artifact's recipe.yaml (a recipe that carries one skips the plan);
- `finish(FinishInput) -> None`: runs after every block, with all blocks' results in memory and the whole FP
  model loaded, and may change the results before anything is written.
A layer is compressed by one pass, except that a pruning pass (masks="makes") may be followed on the same
layers by a quantizer that keeps its masks (masks="keeps": rtn, gptq); the quantizer finds them in io.masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..blocks import Context, stream_fp_layers
from ..models import Checkpoint
from ..quant import SCALE_DTYPES, QWeight, resolve_group_size
from ..weights import CompressedWeight


class PassConfig(BaseModel):
    """Base of every pass config: typed, defaulted, frozen, and an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantConfig(PassConfig):
    """Settings shared by every pass that writes an integer grid."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="-1: one scale per output channel")
    symmetric: bool = False
    mse: bool = Field(False, description="search the clipping range that minimises the weight error")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def model_post_init(self, __context: Any) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {self.group_size}")

    @property
    def torch_scale_dtype(self):
        return SCALE_DTYPES[self.scale_dtype]


@dataclass
class PlanInput:
    """What a pass's plan stage gets: the model skeleton (weights on the meta device until streamed), the
    checkpoint, the calibration windows, its recipe step and the run's context."""

    model: nn.Module
    ckpt: Checkpoint
    windows: Tensor
    spec: Any  # its recipe.PassSpec (recipe.py imports this registry, so it is not imported here)
    ctx: Context

    def stream_fp_layers(self) -> Iterator[tuple[str, nn.Linear, Tensor]]:
        """The spec's target Linears of the FP model, block by block, each with the diagonal of its input second
        moment, sum over calibration tokens of x_j^2 (K,), while its block is in memory."""
        yield from stream_fp_layers(self.model, self.ckpt, self.windows, self.ctx, self.spec.selects)


@dataclass
class FinishInput:
    """What a pass's finish stage gets: the whole FP model (materialized on the device), the calibration windows,
    its recipe step (recipe.PassSpec) and context, and `results`, the QWeight of each of its layers, to update in
    place."""

    model: nn.Module
    windows: Tensor
    spec: Any
    ctx: Context
    results: dict[str, QWeight]


# What a pass's block stage reads besides the weights: "weights" (nothing else: the runner runs no forward),
# "inputs" (the block's cached inputs, io.inputs), "targets" (also io.targets, the FP model's outputs of the block:
# the runner keeps the FP model's activations beside the compressed model's)
Reads = Literal["weights", "inputs", "targets"]
# "makes": the pass prunes (its results are SparseWeight); "keeps": a quantizer that, after a pruning pass on the
# same layers, keeps the pruned weights at zero; None: neither
MaskRole = Literal["makes", "keeps"] | None


@dataclass(frozen=True)
class PassInfo:
    """A registered pass, as the runner uses it."""

    config: type[PassConfig]
    fn: Callable[..., dict[str, CompressedWeight]]  # the block stage: (block, io, config, ctx) -> {layer: weight}
    reads: Callable[[Any], Reads]  # by config (ReQuant reads what its base pass reads)
    masks: Callable[[Any], MaskRole]  # by config (EvoPress prunes or quantizes, by its level space)
    factors: bool  # True: the pass may replace a layer by two factor Linears, <layer>.a and <layer>.b, which later
    # passes of the recipe select by those names
    plan: Callable[[PlanInput], dict[str, dict[str, Any]]] | None
    finish: Callable[[FinishInput], None] | None
    outside: bool = False  # True: the block stage needs nothing but each layer's weight (no block, no forward), so
    # the runner may also give it the weight matrices outside the blocks a recipe names: the input embedding and
    # lm_head (as Linears: an embedding of V rows of width D is a D -> V Linear's weight)
    distributed: bool = False  # True: the pass runs on several ranks (dist.py), each on its shard of the windows, and
    # reduces what it sums over them, so every rank ends with the same weights; the others are refused there


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, config: type[PassConfig], *, reads: Reads | Callable[[Any], Reads] = "inputs",
                  masks: MaskRole | Callable[[Any], MaskRole] = None, factors: bool = False,
                  plan: Callable[[PlanInput], dict[str, dict[str, Any]]] | None = None,
                  finish: Callable[[FinishInput], None] | None = None, outside: bool = False,
                  distributed: bool = False):
    """Decorator: register the block stage `fn` under `name`. `reads` and `masks`: a value, or a function of the
    pass's config; `outside`, `distributed`: see PassInfo. A second registration of a name is an error."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is already registered (by {PASSES[name].fn.__module__})")
        PASSES[name] = PassInfo(config, fn, reads if callable(reads) else lambda cfg: reads,
                                masks if callable(masks) else lambda cfg: masks, factors, plan, finish, outside,
                                distributed)
        return fn

    return wrap


def layer_group_size(name: str, in_features: int, cfg: QuantConfig, ctx: Context) -> int:
    """The group size layer `name` really gets (see quant.resolve_group_size); a fallback is warned about."""
    g = resolve_group_size(in_features, cfg.group_size, name)
    if g != cfg.group_size:
        ctx.warn_once(
            f"group_size {cfg.group_size} does not divide in_features {in_features}; "
            f"layers of that width use group_size {g}",
            key=(cfg.group_size, in_features),
        )
    return g


def get_pass(name: str) -> PassInfo:
    if name not in PASSES:
        raise KeyError(name)
    return PASSES[name]


# Registration happens on import; the list of shipped passes lives here and nowhere else.
from . import adaround, evopress, flexround, gptq, lowrank, prune, requant, rtn  # noqa: E402,F401
