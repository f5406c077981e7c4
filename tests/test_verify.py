"""The gate and the loaders cannot be fooled (issue 28): `compress verify` / `inspect` check compression.json against
the digest its writer sealed it with (compression.json.sha256) and require every file of the artifact to be listed
with its sha256 (no unlisted file, no symlink, no name outside the directory); `eval` and `generate` run the same
check before loading an artifact (`--no-verify` skips it), and an artifact edited past it is a one-line error naming
the layer and both shapes, not a traceback; `verify --max-kl` compares against the source model recorded at compress
time (absolute path, files' sha256) from any directory and refuses a missing or changed one; `verify --transformers`
compares transformers' loader to ours. Real CLI runs on the tiny Llama."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from compressor.api import verify
from compressor.artifact.reader import describe

from conftest import ROOT, run_cli
from test_cli import FAST, assert_error

EVAL = ("--max-tokens", "64", "--seq-len", "32")


def build(model: Path, out: Path, recipe: str, calib: Path, cwd: Path = ROOT) -> Path:
    r = run_in(cwd, "model", str(model), "--recipe", recipe, "--out", str(out), *FAST, "--calib", str(calib))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`compress ARGS...` started in `cwd` (this checkout's package on the path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def w4(tmp_path_factory, tiny_llama, small_calib) -> Path:
    return build(tiny_llama, tmp_path_factory.mktemp("w4") / "art", "w4-rtn", small_calib)


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory, tiny_llama, small_calib) -> Path:
    return build(tiny_llama, tmp_path_factory.mktemp("lr") / "art", "svd-params70", small_calib)


@pytest.fixture
def art(tmp_path, w4) -> Path:
    """A copy of the W4 artifact to edit."""
    return Path(shutil.copytree(w4, tmp_path / "art"))


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def edit_manifest(art: Path, edit, reseal: bool) -> None:
    """Change compression.json; with `reseal`, rewrite its sidecar too, as whoever edits it on purpose can."""
    f = art / "compression.json"
    m = json.loads(f.read_text())
    edit(m)
    f.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    if reseal:
        (art / "compression.json.sha256").write_text(f"{sha256(f)}  compression.json\n")


def flip_last_byte(f: Path) -> None:
    b = bytearray(f.read_bytes())
    b[-1] ^= 0xFF
    f.write_bytes(bytes(b))


# ---------------------------------------------------------------------------------------------- the seal

def test_artifact_is_sealed_and_verify_prints_the_digest(w4):
    """The sidecar is what `sha256sum compression.json` prints; verify and inspect print that digest (a CI job pins
    it); every file the loaders read is listed."""
    digest = sha256(w4 / "compression.json")
    assert (w4 / "compression.json.sha256").read_text() == f"{digest}  compression.json\n"
    listed = set(json.loads((w4 / "compression.json").read_text())["files"])
    assert listed == {p.name for p in w4.iterdir()} - {"compression.json", "compression.json.sha256"}
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json"} <= listed
    r = run_cli("verify", str(w4), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["passed"] and res["manifest_sha256"] == digest
    assert res["checks"][0] == {"check": "manifest", "ok": True, "detail": f"compression.json sha256 {digest}"}
    r = run_cli("inspect", str(w4), env={"COLUMNS": "200"})
    assert r.returncode == 0 and f"compression.json sha256 {digest}" in r.stderr, r.stderr[-3000:]
    assert describe(w4)["manifest_sha256"] == digest


def _drop_weights(art: Path) -> None:  # the weights left out of `files`, then changed: only the file set can tell
    edit_manifest(art, lambda m: m["files"].pop("model.safetensors"), reseal=True)
    flip_last_byte(art / "model.safetensors")


def _outside(name: str):
    def edit(art: Path) -> None:
        edit_manifest(art, lambda m: m["files"].update({name: sha256(Path("/etc/passwd"))}), reseal=True)
    return edit


def _symlinked_listed(art: Path) -> None:  # same bytes, hash matches, but read through a link out of the artifact
    outside = art.parent / "tokenizer-elsewhere.json"
    shutil.move(art / "tokenizer.json", outside)
    (art / "tokenizer.json").symlink_to(outside)


TAMPER = {
    "weights dropped from files": (_drop_weights, "sha256", "model.safetensors: a file not listed in compression.json"),
    "../ name": (_outside("../../../../etc/passwd"), "sha256", "'../../../../etc/passwd': not a file name inside"),
    "absolute name": (_outside("/etc/passwd"), "sha256", "'/etc/passwd': not a file name inside the artifact"),
    "listed file is a symlink": (_symlinked_listed, "sha256", "tokenizer.json: a symlink"),
    "unlisted symlink": (lambda a: (a / "merges.txt").symlink_to("/etc/passwd"), "sha256",
                         "merges.txt: a symlink not listed in compression.json"),
    "unlisted file": (lambda a: (a / "notes.txt").write_text("x\n"), "sha256",
                      "notes.txt: a file not listed in compression.json"),
    "listed file missing": (lambda a: (a / "recipe.yaml").unlink(), "sha256", "recipe.yaml: missing"),
    "manifest edited": (lambda a: edit_manifest(a, lambda m: m.update(bits_per_weight=1.0), reseal=False), "manifest",
                        "compression.json was changed after it was written"),
    "seal removed": (lambda a: (a / "compression.json.sha256").unlink(), "manifest",
                     "compression.json.sha256 is missing"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_artifact_fails_verify(art, case):
    """Each edit fails its row of verify (nothing loaded), the problem named; describe (inspect) reports it too."""
    tamper, row, needle = TAMPER[case]
    tamper(art)
    res = verify(art)
    failed = {c["check"]: c["detail"] for c in res["checks"] if not c["ok"]}
    assert res["passed"] is False and row in failed and needle in failed[row], res["checks"]
    assert [c["check"] for c in res["checks"]] == ["manifest", "sha256"]  # a corrupt artifact is not loaded
    info = describe(art)
    assert not info["hashes_ok"] and any(needle in m for m in info["hash_mismatches"]), info["hash_mismatches"]


def test_tampered_artifact_exit_codes(art):
    """On the command line: verify --json and inspect exit 1, the problem on stderr."""
    _drop_weights(art)
    r = run_cli("verify", str(art), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["passed"] is False, r.stderr[-3000:]
    assert "verify failed: sha256" in r.stderr
    r = run_cli("inspect", str(art), env={"COLUMNS": "400"})
    assert r.returncode == 1 and "model.safetensors: a file not listed in compression.json" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------- checked on load

def test_eval_and_generate_check_the_hashes(art, small_calib):
    """A flipped byte: eval and generate exit 1 naming the file, before loading; --no-verify loads it anyway."""
    flip_last_byte(art / "model.safetensors")
    msg = ("does not match its manifest", "model.safetensors: sha256 differs", "--no-verify")
    assert_error(run_cli("eval", str(art), "--data", str(small_calib), *EVAL), 1, *msg)
    assert_error(run_cli("generate", str(art), "--prompt", "It is", "--max-new-tokens", "2"), 1, *msg)
    r = run_cli("eval", str(art), "--data", str(small_calib), *EVAL, "--no-verify", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["perplexity"] > 1
    assert "--no-verify" in run_cli("generate", "--help", env={"COLUMNS": "200"}).stdout


def test_eval_base_artifact_is_checked(art, w4, small_calib):
    """--base an artifact: checked the same way."""
    flip_last_byte(art / "model.safetensors")
    assert_error(run_cli("eval", str(w4), "--data", str(small_calib), *EVAL, "--base", str(art)), 1,
                 f"artifact {art} does not match its manifest")


def test_config_edited_to_another_bit_width(art, small_calib):
    """config.json says 8 bits where the tensors hold 4: a hash mismatch (exit 1); with --no-verify a one-line
    error naming the layer, the tensor and both shapes (exit 2), not a traceback."""
    cfg = art / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_bits": 4', '"num_bits": 8'))
    assert_error(run_cli("eval", str(art), "--data", str(small_calib), *EVAL), 1, "config.json: sha256 differs")
    assert_error(run_cli("eval", str(art), "--data", str(small_calib), *EVAL, "--no-verify"), 2,
                 "(8-bit group 64 symmetric in config.json)", "weight_packed should have shape [64, 16]",
                 "the checkpoint's has [64, 8]")


def test_pruned_quantized_layer_edited_bit_width(tmp_path, tiny_llama, small_calib):
    """The same edit on a pruned + quantized layer (its codes rebuilt from the kept ones): a one-line error."""
    recipe = tmp_path / "prune-rtn.yaml"
    recipe.write_text("version: 1\npasses:\n  - pass: prune\n    sparsity: 0.5\n    structure: unstructured\n"
                      "    allocation: uniform\n  - pass: rtn\n    bits: 4\n    group_size: 64\n    symmetric: true\n")
    art = build(tiny_llama, tmp_path / "art", str(recipe), small_calib)
    cfg = art / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_bits": 4', '"num_bits": 8'))
    assert_error(run_cli("eval", str(art), "--data", str(small_calib), *EVAL, "--no-verify"), 2,
                 "layer model.layers.0.", "the bitmask keeps", "8-bit codes")


LOWRANK_EDITS = {
    "rank that does not match": (
        "model.layers.0.mlp.up_proj", lambda v: v.update(rank=7),
        ("layer model.layers.0.mlp.up_proj (low-rank of rank 7 in compression.json)",
         "up_proj.a.weight should have shape [7, 64]", "the checkpoint's has [")),
    "layer that does not exist": (
        "model.layers.9.mlp.up_proj", lambda v: v.update(format="lowrank", rank=4),
        ("compression.json has low-rank layer model.layers.9.mlp.up_proj, which is not a Linear of the model",)),
    "rank that is not a number": (
        "model.layers.0.mlp.up_proj", lambda v: v.update(rank="x"),
        ("low-rank layer model.layers.0.mlp.up_proj has rank 'x', not a positive integer",)),
}


@pytest.mark.parametrize("case", list(LOWRANK_EDITS))
def test_bogus_lowrank_entry(tmp_path, lowrank, small_calib, case):
    """compression.json's low-rank entries edited: exit 1 as a manifest edit; with --no-verify a one-line exit 2."""
    layer, edit, needles = LOWRANK_EDITS[case]
    art = Path(shutil.copytree(lowrank, tmp_path / "art"))
    edit_manifest(art, lambda m: edit(m["layers"].setdefault(layer, {})), reseal=False)
    if case == "rank that does not match":
        assert_error(run_cli("eval", str(art), "--data", str(small_calib), *EVAL), 1, "compression.json was changed")
    assert_error(run_cli("eval", str(art), "--data", str(small_calib), *EVAL, "--no-verify"), 2, *needles)


def test_lowrank_entry_on_a_quantized_layer(art, small_calib):
    """A quantized layer's entry turned low-rank (no factors stored): exit 2 naming the missing tensor."""
    edit_manifest(art, lambda m: m["layers"]["model.layers.0.mlp.up_proj"].update(format="lowrank", rank=4),
                  reseal=True)
    assert_error(run_cli("eval", str(art), "--data", str(small_calib), *EVAL, "--no-verify"), 2,
                 "layer model.layers.0.mlp.up_proj (low-rank of rank 4 in compression.json) needs tensor "
                 "model.layers.0.mlp.up_proj.a.weight, which the checkpoint does not have")


# ---------------------------------------------------------------------------------------------- the recorded source

@pytest.fixture
def relative_source(tmp_path, tiny_llama, small_calib):
    """An artifact of `./model` compressed in directory x; directory y holds another `./model` (other weights)."""
    x, y = tmp_path / "x", tmp_path / "y"
    shutil.copytree(tiny_llama, x / "model")
    shutil.copytree(tiny_llama, y / "model")
    w = load_file(y / "model" / "model.safetensors")
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in w.items()}, y / "model" / "model.safetensors",
              metadata={"format": "pt"})
    art = build(Path("model"), tmp_path / "art", "w8-rtn", small_calib, cwd=x)
    return art, x, y


def test_verify_compares_with_the_recorded_source_from_any_directory(relative_source, small_calib):
    """The source is recorded as given and resolved (with its files' sha256); verify --max-kl from another directory
    (holding another ./model) compares with the recorded model: the KL of `eval --base x/model`."""
    art, x, y = relative_source
    src = json.loads((art / "compression.json").read_text())["source"]
    assert src["ref"] == "model" and src["path"] == str((x / "model").resolve()) and src["kind"] == "hf"
    assert src["sha256"] == {f: sha256(x / "model" / f) for f in ("config.json", "model.safetensors")}
    gate = ("--data", str(small_calib), *EVAL, "--json")
    want = json.loads(run_cli("eval", str(art), "--base", str(x / "model"), *gate).stdout)["kl_to_base"]
    r = run_in(y, "verify", str(art), "--max-kl", "1e9", *gate)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["base"] == str((x / "model").resolve()) and res["quality"]["kl_to_base"] == pytest.approx(want)


def test_verify_refuses_a_changed_or_missing_source(relative_source, small_calib):
    """The recorded source changed or gone: exit 2 naming it, unless --base is given."""
    art, x, y = relative_source
    gate = ("--max-kl", "1e9", "--data", str(small_calib), *EVAL)
    model = (x / "model").resolve()
    shutil.copy(y / "model" / "model.safetensors", model / "model.safetensors")
    assert_error(run_cli("verify", str(art), *gate), 2, f"source model {model} is not the one it was made from",
                 "model.safetensors", "--base")
    shutil.rmtree(model)
    assert_error(run_cli("verify", str(art), *gate), 2, f"source model {model} (given as 'model') is not there",
                 "--base")
    r = run_cli("verify", str(art), *gate, "--base", str(y / "model"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["base"] == str(y / "model"), r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- --transformers, help

def test_verify_transformers_row(w4, lowrank):
    """--transformers adds a row: the symmetric artifact gives our logits through transformers; an artifact with our
    extensions fails it (exit 1)."""
    r = run_cli("verify", str(w4), "--transformers", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout)["checks"][-1]
    assert row["check"] == "transformers" and row["ok"] and row["value"] <= row["bound"], row
    assert row["detail"].startswith("packed: max abs difference to our loader")
    r = run_cli("verify", str(lowrank), "--transformers", "--json")
    assert r.returncode == 1, r.stderr[-3000:]
    row = json.loads(r.stdout)["checks"][-1]
    assert row == {"check": "transformers", "ok": False,
                   "detail": "uses our extensions (lowrank), which transformers does not open"}


@pytest.mark.parametrize("cmd", ["eval", "verify"])
def test_max_tokens_and_seq_len_have_help(cmd):
    text = run_cli(cmd, "--help", env={"COLUMNS": "200"}).stdout
    for flag, words in (("--max-tokens", "evaluate on the first N tokens"), ("--seq-len", "tokens per evaluation")):
        line = next(ln for ln in text.splitlines() if flag in ln)
        assert words in line, line
