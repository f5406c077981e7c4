"""Writing the artifact directory (DESIGN.md §4): output checks, the temporary sibling, parts, the commit.

The artifact is written block by block: each finished block goes to a part file in a temporary sibling
directory as soon as it is done, and `join_parts` joins the parts into model.safetensors (shards with an
index above 5 GB) by copying bytes, one tensor at a time, so no step holds the model in memory. The
temporary directory is renamed onto the output at the very end; any failure or Ctrl-C removes it and
leaves an existing output untouched.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from .. import safejson
from ..errors import BadInput, CompressorError
from ..files import safetensors_header

SHARD_BYTES = 5 * 1024**3


def check_output(out: Path, force: bool, source: Path | None = None, clean: bool = True) -> None:
    """Refuse, before any work, an output that this run must not write: `.`, `/`, the home directory or an
    ancestor of the current directory; the source model (`source`, a directory or file) or a directory holding
    it; a directory whose parent cannot be made or written; an existing output without --force, or with it
    anything but one of our artifacts (compression.json by "tool": "compressor") or an empty directory.
    Symlinks are resolved. Temporary siblings a killed run left behind (`.NAME.tmp-PID`, `.NAME.old-PID` of a
    PID no longer running) are removed first (an orphaned `.old` is put back when the output is gone), unless
    `clean` is False (a rank that does not write: on another node, rank 0's PID is not one of its own)."""
    out = Path(out)
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == Path(real.anchor) or real == Path.home().resolve() or real == cwd or real in cwd.parents:
        what = ("the current directory" if real == cwd else "the root directory" if real == Path(real.anchor)
                else "the home directory" if real == Path.home().resolve() else "an ancestor of the current directory")
        raise BadInput(f"--out {out} is {what}; give a new directory for the artifact")
    if source is not None:
        src = Path(source).resolve()
        if real == src:
            raise BadInput(f"--out {out} is the source model {source}")
        if real in src.parents:
            raise BadInput(f"--out {out} contains the source model {source}")
    _check_parent_writable(out)
    if clean:
        clean_stale(out)
    if os.path.lexists(out) and not force:
        raise BadInput(f"output {out} already exists; pass --force to replace it")
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        raise BadInput(f"output {out} exists and is not a directory" + (" (a symbolic link)" if out.is_symlink() else ""))
    if os.path.lexists(out) and not is_artifact(out) and any(out.iterdir()):
        raise BadInput(f"--out {out} is not a compressor artifact (no compression.json of ours): --force replaces "
                       "only an artifact; remove it yourself or give another --out")


def is_artifact(path: Path) -> bool:
    """Whether `path` is a directory written by compressor: its compression.json says "tool": "compressor"."""
    try:
        return json.loads((Path(path) / "compression.json").read_text()).get("tool") == "compressor"
    except (OSError, ValueError, AttributeError):
        return False


def _check_parent_writable(out: Path) -> None:
    """The nearest existing ancestor of `out` must be a directory we can create entries in (tried for real:
    permission bits do not tell for root, /proc or a read-only mount)."""
    anc = out.absolute().parent
    while not os.path.lexists(anc):
        anc = anc.parent
    if not anc.is_dir():
        raise BadInput(f"--out {out}: {anc} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=anc))
    except OSError as e:
        raise BadInput(f"--out {out}: cannot write in {anc} ({e.strerror})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `out` whose PID is not a live process (a killed run:
    SIGKILL cleans nothing up); a run in progress keeps its own. An `.old` one that is an artifact of ours holds the
    previous output of a run killed between its two renames: with the output missing it is put back, else removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out) and not p.is_symlink() and is_artifact(p):
            p.rename(out)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextmanager
def _dir_lock(d: Path) -> Iterator[None]:
    """An exclusive flock on directory `d` (nothing is written to disk): commits into one directory take turns.
    Where the file system has no flock (some network mounts) the commit goes ahead under its re-check alone."""
    fd = os.open(d, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


class ArtifactWriter:
    """Context manager: parts go to `.NAME.tmp-PID/` beside the output; `commit` renames it into place.
    `source` is the model being compressed: the output may never be it or hold it (check_output)."""

    def __init__(self, out: Path, force: bool = False, source: Path | None = None):
        self.out = Path(out)
        self.force, self.source = force, source
        check_output(self.out, force, source)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.parts: list[Path] = []
        self.committed = False

    def __enter__(self) -> "ArtifactWriter":
        shutil.rmtree(self.tmp, ignore_errors=True)
        (self.tmp / "parts").mkdir(parents=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add_part(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write a finished block's tensors now (they can then be freed)."""
        if not tensors:
            return
        path = self.tmp / "parts" / f"{len(self.parts):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        self.parts.append(path)

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, safejson.dumps(obj, indent=2, sort_keys=True) + "\n")

    def copy_in(self, src: Path) -> None:
        shutil.copyfile(src, self.tmp / src.name)

    def join_parts(self) -> list[Path]:
        files = join_safetensors(self.parts, self.tmp)
        shutil.rmtree(self.tmp / "parts")
        return files

    def files(self) -> list[Path]:
        return sorted(p for p in self.tmp.iterdir() if p.is_file())

    def commit(self) -> None:
        """Rename the finished directory onto the output, under a lock on its parent directory, after checking
        again what is there now: an output another run wrote meanwhile is refused without --force (this run's
        files are removed, the other's kept). With --force the old output is moved aside, the new one renamed
        in, then the old one deleted."""
        with _dir_lock(self.out.parent):
            if os.path.lexists(self.out) and not self.force:
                raise BadInput(f"output {self.out} was written by another run while this one worked; this run's "
                               "result was discarded (pass --force to replace it)")
            check_output(self.out, self.force, self.source)
            old = None
            if os.path.lexists(self.out):
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                self.out.rename(old)
            self.tmp.rename(self.out)
            self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def join_safetensors(parts: list[Path], out_dir: Path, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Join part files into model.safetensors (or model-0000i-of-0000n.safetensors + index), keys sorted,
    copying each tensor's bytes straight from its part: memory stays at one tensor."""
    entries = []  # (key, part, data_start, info)
    for p in parts:
        base, header = safetensors_header(p)
        for k, v in header.items():
            if k != "__metadata__":
                entries.append((k, p, base, v))
    entries.sort(key=lambda e: e[0])
    if len({e[0] for e in entries}) != len(entries):
        raise CompressorError("two parts of the artifact hold the same tensor name")
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = e[3]["data_offsets"][1] - e[3]["data_offsets"][0]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for k, _, _, v in shard:
            n = v["data_offsets"][1] - v["data_offsets"][0]
            header[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [off, off + n]}
            off += n
            weight_map[k] = name
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        handles: dict[Path, Any] = {}
        try:
            with open(out_dir / name, "wb") as f:
                f.write(len(hb).to_bytes(8, "little"))
                f.write(hb)
                for _, part, base, v in shard:
                    src = handles.setdefault(part, open(part, "rb"))
                    src.seek(base + v["data_offsets"][0])
                    remaining = v["data_offsets"][1] - v["data_offsets"][0]
                    while remaining:
                        chunk = src.read(min(remaining, 64 << 20))
                        f.write(chunk)
                        remaining -= len(chunk)
        finally:
            for h in handles.values():
                h.close()
    files = [out_dir / n for n in names]
    if len(names) > 1:
        total = sum(e[3]["data_offsets"][1] - e[3]["data_offsets"][0] for e in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(out_dir / "model.safetensors.index.json")
    return files
