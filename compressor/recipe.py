"""Recipes: a YAML list of passes, validated strictly; found by shipped name or by path.

```yaml
version: 1
calibration: {samples: 128, seq_len: 512, seed: 0}
passes:
  - pass: gptq
    targets: ["re:.*(self_attn|mlp)\\.\\w+_proj$"]   # default: every Linear inside the blocks
    ignore: [lm_head]
    bits: 4
```
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadInput
from .passes import PASSES, PassConfig
from .targets import is_router, matches


RECIPE_VERSION = 1  # the recipe format this compressor reads and writes


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = 0


class PassSpec(BaseModel):
    """One step of a recipe: the pass, which Linear layers it touches, and its typed config."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    name: str
    targets: list[str] = Field(default_factory=list)  # empty: every Linear inside the blocks but MoE routers
    ignore: list[str] = Field(default_factory=list)
    config: PassConfig
    assignment: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-layer settings a plan chose

    def selects(self, layer: str) -> bool:
        if any(matches(p, layer) for p in self.ignore):
            return False
        if not self.targets:
            return not is_router(layer)
        return any(matches(p, layer) for p in self.targets)

    def selects_outside(self, names: tuple[str, ...]) -> bool:
        """Whether this step compresses a weight outside the blocks known by `names` (models.OutsideLayer: the
        input embedding, lm_head, or a tied pair by both names): only when its targets name it (the default
        targets are the blocks' Linears) and its ignore list names neither."""
        return (bool(self.targets) and any(matches(p, n) for p in self.targets for n in names)
                and not any(matches(p, n) for p in self.ignore for n in names))

    def to_yaml_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pass": self.name}
        if self.targets:
            d["targets"] = list(self.targets)
        if self.ignore:
            d["ignore"] = list(self.ignore)
        d.update(self.config.model_dump())
        if self.assignment:
            d["assignment"] = {k: dict(v) for k, v in sorted(self.assignment.items())}
        return d


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Literal[1] = RECIPE_VERSION
    description: str = ""
    calibration: Calibration = Calibration()
    passes: list[PassSpec]
    source: str = ""  # where it was read from (not part of the YAML)

    def to_yaml(self) -> str:
        d: dict[str, Any] = {"version": self.version}
        if self.description:
            d["description"] = self.description
        d["calibration"] = self.calibration.model_dump()
        d["passes"] = [p.to_yaml_dict() for p in self.passes]
        return yaml.safe_dump(d, sort_keys=False)

    def with_calibration(self, **changes: Any) -> "Recipe":
        """The same recipe with calibration fields overridden (None values are ignored)."""
        upd = {k: v for k, v in changes.items() if v is not None}
        try:
            cal = Calibration.model_validate({**self.calibration.model_dump(), **upd})
        except ValidationError as e:
            raise BadInput(f"calibration: {_format_errors(e)}") from None
        return self.model_copy(update={"calibration": cal})


def _format_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def parse_recipe(data: Any, source: str) -> Recipe:
    """Validate a recipe dict; every error names the file, the pass and the key."""
    if not isinstance(data, dict):
        raise BadInput(f"{source}: a recipe is a mapping with a 'passes' list, got {type(data).__name__}")
    data = dict(data)
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION or isinstance(version, bool):
        raise BadInput(f"{source}: recipe version {version!r} is not supported; this compressor reads version "
                       f"{RECIPE_VERSION}")
    raw_passes = data.pop("passes", None)
    if not isinstance(raw_passes, list) or not raw_passes:
        raise BadInput(f"{source}: 'passes' must be a non-empty list")
    specs = []
    for i, raw in enumerate(raw_passes):
        if not isinstance(raw, dict) or "pass" not in raw:
            raise BadInput(f"{source}: passes[{i}] must be a mapping with a 'pass' key")
        raw = dict(raw)
        name = raw.pop("pass")
        if name not in PASSES:
            raise BadInput(f"{source}: passes[{i}]: unknown pass {name!r}; known: {', '.join(sorted(PASSES))}")
        targets, ignore = raw.pop("targets", []), raw.pop("ignore", [])
        assignment = raw.pop("assignment", {})
        if not isinstance(assignment, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                       for k, v in assignment.items()):
            raise BadInput(f"{source}: passes[{i}] ({name}): 'assignment' must map layer names to settings")
        if assignment and PASSES[name].plan is None:
            raise BadInput(f"{source}: passes[{i}] ({name}): this pass takes no 'assignment'")
        for key, val in (("targets", targets), ("ignore", ignore)):
            if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
                raise BadInput(f"{source}: passes[{i}] ({name}): {key!r} must be a list of strings")
            for pat in val:
                if pat.startswith("re:"):
                    try:
                        re.compile(pat[3:])
                    except re.error as e:
                        raise BadInput(f"{source}: passes[{i}] ({name}): bad regex {pat!r}: {e}") from None
        try:
            cfg = PASSES[name].config.model_validate(raw)
        except ValidationError as e:
            raise BadInput(f"{source}: passes[{i}] ({name}): {_format_errors(e)}") from None
        specs.append(PassSpec(name=name, targets=targets, ignore=ignore, config=cfg, assignment=assignment))
    try:
        return Recipe.model_validate({**data, "passes": specs, "source": source})
    except ValidationError as e:
        raise BadInput(f"{source}: {_format_errors(e)}") from None


def shipped_dir() -> Path:
    return Path(str(resources.files("compressor.recipes")))


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(shipped_dir().glob("*.yaml"))}


def load_recipe(ref: str | Path) -> Recipe:
    """A shipped recipe by name (`w4-gptq`) or a YAML file by path."""
    path = Path(ref)
    if not path.is_file():
        shipped = shipped_recipes()
        if str(ref) not in shipped:
            if path.is_dir():
                raise BadInput(f"recipe {ref} is a directory, not a YAML recipe file")
            if path.suffix in (".yaml", ".yml") or "/" in str(ref):
                raise BadInput(f"recipe file {ref} does not exist")
            raise BadInput(f"unknown recipe {str(ref)!r}; shipped recipes: {', '.join(shipped)}")
        path = shipped[str(ref)]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise BadInput(f"recipe file {path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(data, str(path))
