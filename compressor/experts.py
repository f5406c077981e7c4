"""Mixture-of-experts layers as Linears, and checkpoint names as transformers renames them.

transformers (5.x) builds the routed experts of an MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE and the families
that share their conversion rules) as two 3-D parameters, `experts.gate_up_proj` (E, 2I, H) and
`experts.down_proj` (E, H, I), and fuses the checkpoint's per-expert Linears (`experts.<e>.w1.weight`, ...) into
them when it loads. The passes compress Linears, and serving engines read the per-expert layout, so
`unfuse_experts` puts the per-expert Linears back in the skeleton under the checkpoint's own names:
`RoutedExperts` is a ModuleList of `ExpertMLP`s with the fused module's forward (the same tokens routed to the
same expert, the same weighting), so each expert's Linears see only the tokens routed to it and a pass's
hooks (GPTQ's Hessian) count only those. The router stays what it is (not a Linear; a router Linear is left out of default targets: targets.is_router).

`renamed_keys`: the pure renamings of transformers' conversion mapping (`.block_sparse_moe.` -> `.mlp.` for
Mixtral), so that a model name finds its checkpoint key (models.checkpoint_key). The artifact keeps the
checkpoint's names.
"""
from __future__ import annotations

import re

import torch
from accelerate import init_empty_weights
from torch import nn

from .errors import BadInput

FUSED = ("gate_up_proj", "down_proj")  # the 3-D parameters of a fused experts module


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its Linears named as in the checkpoint (w1/w3/w2, or
    gate_proj/up_proj/down_proj)."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act: nn.Module):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, inter, bias=False))
        setattr(self, up, nn.Linear(hidden, inter, bias=False))
        setattr(self, down, nn.Linear(inter, hidden, bias=False))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class RoutedExperts(nn.ModuleList):
    """The experts of one MoE block as Linears, called like transformers' fused experts module:
    forward(hidden (n, H), top_k_index (n, k), top_k_weights (n, k)) -> (n, H). An expert no token is routed to
    is not run."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)  # (m,) (m,)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _conversions(model: nn.Module) -> list:
    """transformers' weight conversions for `model` ([] where the release has none)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers 4.x: checkpoint names are model names, experts are Linears
        return []
    try:
        return list(get_model_conversion_mapping(model) or [])
    except Exception:  # a model class the mapping code does not know how to walk: no renamings
        return []


def expert_names(model: nn.Module) -> tuple[str, str, str] | None:
    """The checkpoint's names of an expert's gate, up and down Linears, read from the conversion that fuses
    them (`experts.*.w1.weight` + `experts.*.w3.weight` -> `experts.gate_up_proj`); None without one."""
    gate_up = down = None
    for c in _conversions(model):
        targets = [str(t) for t in getattr(c, "_original_target_patterns", [])]
        sources = [str(s) for s in getattr(c, "_original_source_patterns", [])]
        names = [m.group(1) for s in sources if (m := re.search(r"experts\.\*\.(\w+)\.weight$", s))]
        if any(t.endswith("experts.gate_up_proj") for t in targets) and len(names) == 2:
            gate_up = names
        elif any(t.endswith("experts.down_proj") for t in targets) and len(names) == 1:
            down = names[0]
    return (gate_up[0], gate_up[1], down) if gate_up and down else None


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` (on the meta device) by its RoutedExperts; returns how many.
    BadInput, naming the architecture, for 3-D expert parameters of another form (biases, another layout) or
    experts the checkpoint also stores fused: they cannot be compressed as Linears."""
    arch = type(model).__name__
    fused = [(n, m) for n, m in model.named_modules()
             if any(p.dim() == 3 for p in m.parameters(recurse=False))]
    if not fused:
        return 0
    names = expert_names(model)
    for name, m in fused:
        params = {k: tuple(p.shape) for k, p in m.named_parameters(recurse=False)}
        standard = (set(params) == set(FUSED) and len(params["gate_up_proj"]) == 3
                    and params["gate_up_proj"][0] == params["down_proj"][0]
                    and params["gate_up_proj"][1] == 2 * params["down_proj"][2]
                    and params["gate_up_proj"][2] == params["down_proj"][1] and hasattr(m, "act_fn"))
        if not standard:
            raise BadInput(f"{arch}: module {name} ({type(m).__name__}) holds 3-D expert parameters "
                           f"{params}, a form compressor cannot compress as Linears; not supported")
        if names is None:
            raise BadInput(f"{arch}: the experts of {name} are stored fused ({name}.gate_up_proj) and transformers "
                           "has no per-expert names for them; MoE models whose checkpoints keep experts as "
                           "per-expert Linears (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) are supported")
        e, hidden, inter = params["down_proj"]
        with init_empty_weights(include_buffers=False):
            experts = RoutedExperts([ExpertMLP(names, hidden, inter, m.act_fn) for _ in range(e)])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, experts)
    return len(fused)


def renamed_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """{model name: checkpoint key} for the checkpoint keys transformers' pure renamings change (empty when
    none do)."""
    try:
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return {}
    renamings = [c for c in _conversions(model) if isinstance(c, WeightRenaming)]
    if not renamings:
        return {}
    out = {}
    for k in keys:
        r = apply_renamings(k, renamings)
        if r != k:
            out[r] = k
    return out
