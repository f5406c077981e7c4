"""Target names, as recipes and compressed-tensors configs spell them: `re:<regex>` (re.match on the full module
name), an exact module name, or a dotted suffix of one (`lm_head`, `mlp.down_proj`). A leaf: the recipe, the runner
and the artifact reader all select layers with it."""
from __future__ import annotations

import re


def matches(pattern: str, name: str) -> bool:
    """Whether target `pattern` selects module `name`."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def is_router(name: str) -> bool:
    """An MoE router or gate (`mlp.gate`, `router`, `shared_expert_gate`): left unquantized unless a recipe's
    targets name it (a router's error changes which experts run, not only their output)."""
    leaf = name.rpartition(".")[2]
    return leaf in ("gate", "router") or leaf.endswith("_gate")
