"""Small file primitives every layer uses, with no heavy imports: the cache directory, a file's sha256, and the one
atomic write (a temporary sibling renamed over the target, so a reader never sees half a file)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from . import safejson


def cache_dir() -> Path:
    """$COMPRESSOR_CACHE, default ~/.cache/compressor: converted models, built kernels, EvoPress databases."""
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tmp_sibling(path: Path) -> Path:
    """This process's temporary file beside `path`, with the same suffix (plotting and safetensors go by it)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it over `path`: no half-written output, and on an
    error the old file (if any) is left as it was."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any, **dumps: Any) -> None:
    """Standard JSON (safejson: no NaN) written atomically, with a trailing newline."""
    write_atomic(path, lambda p: p.write_text(safejson.dumps(obj, **dumps) + "\n"))


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """A safetensors file's header, read without its data: (bytes before the first tensor's data, the header
    object: tensor name -> {dtype, shape, data_offsets}, and `__metadata__`)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))
