"""Byte-identical artifacts across a refactor: compress the demo model with five recipes (test-sized variants of
w4-rtn, w4-gptq, prune50-uniform, lowrank-util and evo-drop25) using a given checkout, and record the sha256 of
every file of each artifact, so that two checkouts (before and after a change) compare file by file.

    python bench/identical.py --repo /path/to/old/checkout --label before --work /tmp/ident
    python bench/identical.py --repo . --label after --work /tmp/ident

Each run is the checkout's real `compress model` (`python -m compressor.cli`, that checkout first on PYTHONPATH,
one torch thread, a fresh $COMPRESSOR_CACHE per label so nothing is resumed from another label's run). The recipes are written once under --work and both labels read the same files (the manifest
records the recipe's path). Results: bench/results/identical.{json,md}; the markdown puts the labels side by
side and says for every file whether its digest is the same.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's compressor (the one measured runs in its own processes)
from compressor.files import sha256_file  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CALIB = ["--samples", "16", "--seq-len", "128", "--seed", "0"]

# (case, shipped recipe, overrides of its first pass's settings that make it test-sized)
CASES = [
    ("w4-rtn", "w4-rtn", {}),
    ("w4-gptq", "w4-gptq", {}),
    ("prune50-uniform", "prune50-uniform", {}),
    ("lowrank-util", "lowrank-util", {}),
    ("evo-drop25", "evo-drop25", {"generations": 3, "offspring": 4, "survivors": [2, 1], "stage_windows": [2, 4],
                                  "fitness_samples": 4, "fitness_seq_len": 64}),
]


def write_recipes(work: Path) -> dict[str, Path]:
    """The test-sized recipes, written once (the same paths for every label)."""
    out = {}
    rdir = work / "recipes"
    rdir.mkdir(parents=True, exist_ok=True)
    for case, name, over in CASES:
        path = rdir / f"{case}.yaml"
        if not path.exists():
            rec = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
            rec["passes"][0].update(over)
            path.write_text(yaml.safe_dump(rec, sort_keys=False))
        out[case] = path
    return out


def commit_of(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=ROOT)
    ap.add_argument("--label", required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ident"))
    args = ap.parse_args()
    repo = args.repo.resolve()
    recipes = write_recipes(args.work)
    # a fresh cache per label: a search checkpoint or variant database left by another label's run would be
    # resumed instead of computed again (the demo model is converted again too, by the checkout measured)
    cache = args.work / f"cache-{args.label}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "COMPRESSOR_CACHE": str(cache)}
    rows = {}
    for case, _, _ in CASES:
        out = args.work / args.label / case
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "compressor.cli", "model", "demo", "--recipe", str(recipes[case]),
                            *CALIB, "--out", str(out), "--device", "cpu", "--json"],
                           capture_output=True, text=True, env=env, cwd=args.work)
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"{case}: compress exited {r.returncode}:\n{r.stderr[-3000:]}")
        files = {f.name: sha256_file(f) for f in sorted(out.iterdir()) if f.is_file()}
        rows[case] = {"seconds": round(secs, 1), "files": files}
        print(f"{case}: {len(files)} files, {secs:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS / "identical.json"
    data = json.loads(jpath.read_text()) if jpath.exists() else {}
    data["calibration"] = " ".join(CALIB)
    data.setdefault("labels", {})[args.label] = {"commit": commit_of(repo), "runs": rows}
    jpath.write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data)


def write_markdown(data: dict) -> None:
    labels = list(data["labels"])
    lines = ["# Byte-identical artifacts: the same inputs and seed, two checkouts", "",
             "The demo model (SmolLM2-135M) compressed by each checkout with test-sized variants of five shipped "
             f"recipes (`compress model demo --recipe R {data['calibration']} --device cpu`, embedded corpus, one "
             "torch thread), and the sha256 of every file of each artifact.",
             "", "    python bench/identical.py --repo CHECKOUT --label LABEL --work /tmp/ident", "",
             "Checkouts: " + ", ".join(f"**{k}** = {v['commit']}" for k, v in data["labels"].items()), "",
             "| case | file | " + " | ".join(f"{k}: sha256" for k in labels) + " | same |",
             "|---|---|" + "---|" * len(labels) + "---|"]
    cases = list(dict.fromkeys(c for v in data["labels"].values() for c in v["runs"]))
    same_all = True
    for case in cases:
        names = sorted({n for v in data["labels"].values() for n in v["runs"].get(case, {}).get("files", {})})
        for n in names:
            digests = [data["labels"][k]["runs"].get(case, {}).get("files", {}).get(n) for k in labels]
            same = len(set(digests)) == 1 and digests[0] is not None
            same_all &= same
            cells = " | ".join((d[:16] if d else "absent") for d in digests)
            lines.append(f"| {case} | {n} | {cells} | {'yes' if same else '**no**'} |")
    lines += ["", f"All files identical across the labels: **{'yes' if same_all else 'no'}**.", ""]
    (RESULTS / "identical.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
