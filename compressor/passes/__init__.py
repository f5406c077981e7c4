"""The pass registry. A pass registers itself with its config class; the runner finds it by name only.

Two kinds (DESIGN.md §2): a *block* pass compresses the Linear layers of one block from that block's
cached inputs; a *planner* measures the model and returns per-layer settings for the block passes.
A block pass may also have model-level stages around its blocks (ReQuant has both):
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


@dataclass(frozen=True)
class PassInfo:
    name: str
    config: type[PassConfig]
    fn: Callable[..., Any]
    kind: Literal["block", "planner"]
    needs_data: bool  # False: the pass never looks at activations, so the runner skips all forwards
    needs_targets: bool  # True: the pass reads io.targets (the FP model's block outputs), so the runner
    # keeps the FP model's activations alongside the compressed model's
    doc: str
    plan: Callable[..., dict[str, dict[str, Any]]] | None = None
    finish: Callable[..., None] | None = None
    needs: Callable[[Any], tuple[bool, bool]] | None = None  # (needs_data, needs_targets) by config, when
    # they depend on it (ReQuant's depend on its base pass)
    masks: Literal["makes", "keeps"] | Callable[[Any], str | None] | None = None  # "makes": the pass prunes (its
    # results are SparseWeight); "keeps": a quantizer that, after a pruning pass on the same layers, keeps the
    # pruned weights at zero; a callable: the role by config (EvoPress prunes or quantizes, by its level space)
    factors: bool = False  # True: the pass may replace a layer by two factor Linears, <layer>.a and <layer>.b,
    # which later passes of the recipe select by those names

    def mask_role(self, cfg: Any) -> str | None:
        """"makes", "keeps" or None under this config."""
        return self.masks(cfg) if callable(self.masks) else self.masks

    def data_needs(self, cfg: Any) -> tuple[bool, bool]:
        """(needs_data, needs_targets) of the block stage under this config."""
        if self.needs is None:
            return self.needs_data, self.needs_targets
        data, targets = self.needs(cfg)
        return data or targets, targets


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, config: type[PassConfig], kind: Literal["block", "planner"] = "block",
                  needs_data: bool = True, needs_targets: bool = False, plan: Callable | None = None,
                  finish: Callable | None = None, needs: Callable | None = None,
                  masks: Literal["makes", "keeps"] | Callable[[Any], str | None] | None = None,
                  factors: bool = False):
    """Decorator: register `fn` under `name`. A second registration of a name is an error."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is already registered (by {PASSES[name].fn.__module__})")
        doc = (fn.__doc__ or "").strip().splitlines()
        PASSES[name] = PassInfo(name, config, fn, kind, needs_data or needs_targets, needs_targets,
                                 doc[0] if doc else "", plan, finish, needs, masks, factors)
        return fn

    return wrap


def layer_group_size(name: str, in_features: int, cfg: QuantConfig, ctx: Any) -> int:
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
