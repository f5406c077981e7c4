"""Memory benchmark: peak RSS of `compress model` on the demo model and on a 4x deeper synthetic copy.

What it measures
    The runner is meant to stream: the skeleton lives on the meta device, each block's weights are read
    from safetensors when its turn comes, and each finished block is written out at once. Memory should
    then be one block plus the calibration activations, whatever the depth. This script checks that:

    1. It builds, once, a synthetic model with the demo's config.json but `num_hidden_layers` x4 (SmolLM2-135M:
       30 -> 120 blocks), random weights (seeded normal, std 0.02; norm weights = 1; tied embeddings as in the
       demo, so no lm_head.weight), written shard by shard (10 blocks per safetensors file, plus
       model.safetensors.index.json) so the whole model is never in memory, and the demo's tokenizer files.
       Default place: $COMPRESSOR_CACHE/bench/smol-4x-layers (reused when it is already there).
    2. It runs, for each model, in a fresh process:
           python -m compressor.cli model MODEL --recipe w4-gptq --out TMP --samples 16 --seq-len 256 --json --force
       and takes that process's peak RSS from `os.wait4` (the kernel's ru_maxrss of that one child, which
       counts anonymous memory and file pages mapped into it, e.g. mmapped safetensors), its wall time and its
       JSON summary. While it runs, /proc/PID/status is sampled (RssAnon / RssFile) at every "block i/n" line
       the CLI prints and every 0.2 s, to show where the memory is (anonymous vs. file-backed) and whether it
       grows with depth.
    3. It writes bench/results/memory.json and bench/results/memory.md and exits 1 if
       peak(deep) / peak(shallow) >= 1.3 (the target of the issue).

How to run
    . .venv/bin/activate && export COMPRESSOR_CACHE=/work/cache
    python bench/memory.py                      # defaults: w4-gptq, 16 samples x 256 tokens, 4x layers
    python bench/memory.py --samples 32 --seq-len 512 --recipe w4-rtn --factor 4 --device cpu
The deep run takes about 4x the time of the shallow one (several minutes on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET_RATIO = 1.3
SYNTH_VERSION = 1  # bump when the way the synthetic model is built changes (forces a rebuild)
BLOCK_RE = re.compile(r"^(?P<pre>.*?\blayers)\.(?P<i>\d+)\.(?P<rest>.+)$")
LINE_RE = re.compile(r"^block (\d+)/(\d+) ")


# ----------------------------------------------------------------------------------------------------------
# The synthetic deep model
# ----------------------------------------------------------------------------------------------------------

def _source_layout(src: Path) -> tuple[str, dict[str, tuple[list[int], str]], dict[str, tuple[list[int], str]], int]:
    """From the source checkpoint's headers only (no tensor data): the blocks' key prefix, the per-block
    tensors {suffix: (shape, dtype)}, the other tensors {key: (shape, dtype)} and the number of blocks."""
    from safetensors import safe_open

    block_t: dict[str, tuple[list[int], str]] = {}
    other: dict[str, tuple[list[int], str]] = {}
    prefixes, ids = set(), set()
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                info = (list(sl.get_shape()), sl.get_dtype())
                m = BLOCK_RE.match(k)
                if m:
                    prefixes.add(m["pre"])
                    ids.add(int(m["i"]))
                    block_t.setdefault(m["rest"], info)
                else:
                    other[k] = info
    if len(prefixes) != 1 or not block_t:
        raise SystemExit(f"cannot find the blocks in {src} (block prefixes found: {sorted(prefixes)})")
    return prefixes.pop(), block_t, other, len(ids)


def _is_norm(key: str) -> bool:
    return "norm" in key.rsplit(".", 1)[0].rsplit(".", 1)[-1]


def _random_tensor(shape: list[int], key: str, gen, std: float, dtype):
    import torch

    if _is_norm(key) and key.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    if key.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def build_deep_model(src: Path, dest: Path, factor: int, seed: int = 0, std: float = 0.02,
                     blocks_per_shard: int = 10) -> dict:
    """Write the synthetic model into `dest` (atomically: a temp sibling renamed at the end) unless an
    identical one is already there. Peak memory: one shard (blocks_per_shard blocks, or the embeddings)."""
    import torch
    from safetensors.torch import save_file

    src_cfg = json.loads((src / "config.json").read_text())
    n_src = int(src_cfg["num_hidden_layers"])
    spec = {"version": SYNTH_VERSION, "source": str(src), "source_layers": n_src, "factor": factor, "seed": seed,
            "std": std, "blocks_per_shard": blocks_per_shard}
    marker = dest / "bench_synthetic.json"
    if marker.is_file() and (dest / "config.json").is_file():
        if json.loads(marker.read_text()).get("spec") == spec:
            return json.loads(marker.read_text())
        print(f"[memory] {dest} was built with other settings: rebuilding", file=sys.stderr)

    prefix, block_t, other, n_found = _source_layout(src)
    if n_found != n_src:
        raise SystemExit(f"{src}: config says {n_src} layers, checkpoint has {n_found}")
    n = n_src * factor
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        groups = [list(range(i, min(i + blocks_per_shard, n))) for i in range(0, n, blocks_per_shard)]
        n_shards = 1 + len(groups)  # shard 1: everything outside the blocks (embeddings, final norm)
        names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
        weight_map: dict[str, str] = {}
        total_bytes = 0
        params = 0
        for si, name in enumerate(names):
            if si == 0:
                keys = {k: v for k, v in sorted(other.items())}
            else:
                keys = {f"{prefix}.{b}.{rest}": v for b in groups[si - 1] for rest, v in sorted(block_t.items())}
            shard = {}
            for k, (shape, dt) in keys.items():
                shard[k] = _random_tensor(shape, k, gen, std, dtypes[dt])
                weight_map[k] = name
                total_bytes += shard[k].numel() * shard[k].element_size()
                params += shard[k].numel()
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            del shard
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        cfg = dict(src_cfg, num_hidden_layers=n)
        if "layer_types" in cfg and isinstance(cfg["layer_types"], list):  # per-layer lists must match the depth
            cfg["layer_types"] = (cfg["layer_types"] * factor)[:n]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for f in src.iterdir():  # tokenizer, chat template, generation config
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copyfile(f, tmp / f.name)
        info = {"spec": spec, "layers": n, "params": params, "bytes": total_bytes, "shards": n_shards,
                "build_seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "bench_synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def count_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                n = 1
                for d in h.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


# ----------------------------------------------------------------------------------------------------------
# Measuring one run
# ----------------------------------------------------------------------------------------------------------

def _proc_rss(pid: int) -> dict[str, int] | None:
    """VmRSS / RssAnon / RssFile / RssShmem of a live process, KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(val.split()[0])
    return out or None


def measure(cmd: list[str], env: dict[str, str], label: str) -> dict:
    """Run `cmd` as a child, return its peak RSS (os.wait4 ru_maxrss), wall time, stdout JSON and an
    RSS trace (one sample per finished block, from the CLI's "block i/n" lines on a non-terminal stderr)."""
    with tempfile.TemporaryFile("w+") as out_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        blocks: list[dict] = []
        peak = {"RssAnon": 0, "RssFile": 0}
        tail: list[str] = []
        stop = threading.Event()

        def read_stderr() -> None:
            for line in proc.stderr:  # type: ignore[union-attr]
                tail.append(line.rstrip())
                del tail[:-40]
                m = LINE_RE.match(line)
                if m:
                    r = _proc_rss(proc.pid)
                    if r:
                        blocks.append({"block": int(m[1]), "t": round(time.perf_counter() - t0, 2),
                                       "rss_mib": round(r.get("VmRSS", 0) / 1024, 1),
                                       "anon_mib": round(r.get("RssAnon", 0) / 1024, 1),
                                       "file_mib": round(r.get("RssFile", 0) / 1024, 1)})
                        n = int(m[2])
                        if int(m[1]) in (1, n) or int(m[1]) % max(1, n // 6) == 0:
                            print(f"[memory] {label}: block {m[1]}/{n}  RSS {blocks[-1]['rss_mib']:.0f} MiB "
                                  f"(anon {blocks[-1]['anon_mib']:.0f}, file {blocks[-1]['file_mib']:.0f})  "
                                  f"{blocks[-1]['t']:.0f}s", file=sys.stderr, flush=True)

        def poll() -> None:
            while not stop.wait(0.2):
                r = _proc_rss(proc.pid)
                if r:
                    for k in peak:
                        peak[k] = max(peak[k], r.get(k, 0))

        threads = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=poll, daemon=True)]
        for t in threads:
            t.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        stop.set()
        for t in threads:
            t.join(timeout=5)
        out_f.seek(0)
        stdout = out_f.read()
    if proc.returncode != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"[memory] {label}: the CLI exited with {proc.returncode}: {' '.join(cmd)}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "peak_rss_anon_mib_sampled": round(peak["RssAnon"] / 1024, 1),
        "peak_rss_file_mib_sampled": round(peak["RssFile"] / 1024, 1),
        "wall_seconds": round(wall, 2),
        "user_seconds": round(usage.ru_utime, 1),
        "rss_growth_mib_per_block": growth_per_block(blocks),
        "cli_json": summary,
        "rss_per_block": blocks,
    }


def growth_per_block(trace: list[dict]) -> dict[str, float] | None:
    """Least-squares slope of RSS (total, anon, file) over the finished blocks, MiB per block. A streaming
    runner should show ~0 here; a slope near one block's bytes means something keeps every block."""
    if len(trace) < 3:
        return None
    xs = [p["block"] for p in trace]
    mx = sum(xs) / len(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    out = {}
    for key in ("rss_mib", "anon_mib", "file_mib"):
        ys = [p[key] for p in trace]
        my = sum(ys) / len(ys)
        out[key.replace("_mib", "")] = round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx, 2)
    return out


# ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="the shallow model (any reference; default: demo)")
    ap.add_argument("--recipe", default="w4-gptq")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--factor", type=int, default=4, help="layer multiplier of the synthetic model")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    ap.add_argument("--device", default=None, help="passed on as --device (default: the CLI's own, auto)")
    ap.add_argument("--deep-dir", type=Path, default=None,
                    help="where the synthetic model is built (default $COMPRESSOR_CACHE/bench/smol-{factor}x-layers)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for memory.json / memory.md")
    ap.add_argument("--target", type=float, default=TARGET_RATIO, help="fail when deep/shallow peak RSS >= this")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch

    from compressor.files import cache_dir
    from compressor.models import resolve_model

    shallow = resolve_model(args.model)
    deep_dir = args.deep_dir or cache_dir() / "bench" / f"smol-{args.factor}x-layers"
    print(f"[memory] synthetic model: {deep_dir}", file=sys.stderr, flush=True)
    synth = build_deep_model(shallow.path, deep_dir, args.factor, args.seed)
    print(f"[memory] synthetic model ready: {synth['layers']} layers, {synth['params'] / 1e6:.1f}M params",
          file=sys.stderr, flush=True)

    env = dict(os.environ)
    env.pop("COLUMNS", None)
    runs = []
    for label, ref, layers in (("shallow", args.model, shallow.config["num_hidden_layers"]),
                               ("deep", str(deep_dir), synth["layers"])):
        with tempfile.TemporaryDirectory(prefix=f"bench-memory-{label}-") as tmp:
            cmd = [sys.executable, "-m", "compressor.cli", "model", ref, "--recipe", args.recipe,
                   "--out", str(Path(tmp) / "artifact"), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                   "--json", "--force"] + (["--device", args.device] if args.device else [])
            print(f"[memory] {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            res = measure(cmd, env, label)
        path = shallow.path if label == "shallow" else deep_dir
        runs.append({"label": label, "model": ref, "path": str(path), "layers": layers,
                     "params": count_params(path), "command": " ".join(cmd), **res})
        print(f"[memory] {label}: peak RSS {res['peak_rss_mib']:.0f} MiB, {res['wall_seconds']:.0f}s",
              file=sys.stderr, flush=True)

    s, d = runs
    ratio = d["peak_rss_mib"] / s["peak_rss_mib"]
    passed = ratio < args.target
    script_cmd = "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "benchmark": "memory: peak RSS of compress model, shallow vs. deep",
        "target_ratio": args.target,
        "ratio_deep_over_shallow": round(ratio, 3),
        "pass": passed,
        "settings": {"recipe": args.recipe, "samples": args.samples, "seq_len": args.seq_len, "factor": args.factor,
                     "seed": args.seed, "device": args.device or "auto"},
        "runs": runs,
        "synthetic_model": synth,
        "script_command": script_cmd.strip(),
        "machine": {"nproc": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "cuda": torch.cuda.is_available(),
                    "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "memory.md").write_text(render_md(result))
    print(render_md(result))
    return 0 if passed else 1


def _growth(run: dict) -> str:
    g = run.get("rss_growth_mib_per_block")
    return "n/a" if not g else f"{g['anon']:.1f} / {g['file']:.1f}"


def render_md(r: dict) -> str:
    rows = ["| model | layers | params | peak RSS (MiB) | sampled peak anon / file (MiB) | RSS growth per block, "
            "anon / file (MiB) | wall (s) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for run in r["runs"]:
        rows.append(f"| {run['label']}: `{run['model']}` | {run['layers']} | {run['params'] / 1e6:.1f}M | "
                    f"{run['peak_rss_mib']:.0f} | {run['peak_rss_anon_mib_sampled']:.0f} / "
                    f"{run['peak_rss_file_mib_sampled']:.0f} | {_growth(run)} | {run['wall_seconds']:.0f} |")
    verdict = "PASS" if r["pass"] else "FAIL"
    m = r["machine"]
    return "\n".join([
        "# Memory: peak RSS, shallow vs. 4x deeper model",
        "",
        *rows,
        "",
        f"Ratio deep/shallow: **{r['ratio_deep_over_shallow']:.3f}** (target < {r['target_ratio']}): **{verdict}**",
        "",
        "Peak RSS is the child's `ru_maxrss` from `os.wait4` (anonymous + file-backed pages such as mmapped "
        "safetensors); anon/file columns are the maxima of /proc/PID/status samples every 0.2 s; growth is the "
        "least-squares slope of RSS over the CLI's per-block lines (a streaming runner should show ~0).",
        "",
        f"Machine: {m['nproc']} CPUs, {m['mem_total_gib']} GiB, torch {m['torch']}, Python {m['python']}, "
        f"CUDA {'yes' if m['cuda'] else 'no'}. {r['date']}.",
        "",
        "Benchmark command:",
        "",
        f"    {r['script_command']}",
        "",
        "Measured commands:",
        "",
        *[f"    {run['command']}" for run in r["runs"]],
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
