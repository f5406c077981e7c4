"""Standard JSON only: NaN and inf (which json.dumps writes as the non-standard `NaN`, `Infinity`) become null,
and the object says which values were (`non_finite`), so a `--json` line or a manifest always parses."""
from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """`obj` with every NaN/inf float (in nested dicts, lists and tuples) replaced by None, and the dotted paths
    of those replaced ("metrics.kl_to_base", "layers.3")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [path]
    if isinstance(obj, dict):
        items = [(k, finite(v, f"{path}.{k}" if path else str(k))) for k, v in obj.items()]
        return {k: v for k, (v, _) in items}, [p for _, (_, ps) in items for p in ps]
    if isinstance(obj, (list, tuple)):
        items = [finite(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
        return [v for v, _ in items], [p for _, ps in items for p in ps]
    return obj, []


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps that never writes NaN or Infinity: such values are null, and a top-level object lists their
    paths under `non_finite`."""
    obj, paths = finite(obj)
    if paths and isinstance(obj, dict):
        obj = {**obj, "non_finite": paths}
    return json.dumps(obj, allow_nan=False, **kwargs)
