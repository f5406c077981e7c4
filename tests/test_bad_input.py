"""Bad input that used to end in a traceback, a wrong exit code, an OOM kill or silence (issue 28): each case runs the
real `compress` in a subprocess on the tiny Llama and checks the exit code, the one-line message naming the problem,
and that nothing was left behind. Calibration requests are bounded before anything is allocated, odd text encodings
warn, and --quiet silences the libraries' progress bars too."""
from __future__ import annotations

import codecs
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_cli
from test_cli import FAST, assert_error, assert_nothing_left, compress_tiny, write_recipe


def _edited_copy(tiny_llama: Path, dest: Path, edit) -> Path:
    """A copy of the tiny Llama whose model.safetensors went through `edit(state_dict)`."""
    shutil.copytree(tiny_llama, dest)
    state = load_file(dest / "model.safetensors")
    edit(state)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


# ------------------------------------------------------------------------------------- calibration sizes

def test_huge_samples_refused_before_allocating(tmp_path, tiny_llama, small_calib):
    """--samples 1000000000 used to allocate until the OOM killer came; now it is refused from the model's hidden
    size before any window exists. Run under a 4 GiB address-space limit: the old code dies allocating."""
    out = tmp_path / "out"
    limit = 4 * 2**30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "compressor.cli", "model", str(tiny_llama), "--recipe", "w4-gptq",
                        "--out", str(out), "--calib", str(small_calib), "--samples", "1000000000", "--seq-len", "32"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=cap)
    assert_error(r, 2, "1000000000 windows", "seq_len 32", "GiB", "hidden size 64", "available")
    assert_nothing_left(out)


def test_more_windows_than_the_corpus_has_tokens(tmp_path, tiny_llama, small_calib):
    out = tmp_path / "out"
    r = run_cli("model", str(tiny_llama), "--recipe", "w4-rtn", "--out", str(out), "--calib", str(small_calib),
                "--samples", "5000", "--seq-len", "32")
    assert_error(r, 2, "small.txt", "tokens", "5000 windows")
    assert_nothing_left(out)


@pytest.mark.parametrize("cmd,samples,seq_len,needle", [
    ("utilization", "0", "32", "samples 0"),
    ("utilization", "-3", "32", "samples -3"),
    ("utilization", "2", "0", "--seq-len 0"),
    ("model", "0", "32", "samples"),
    ("model", "2", "0", "seq_len"),
])
def test_nonpositive_calibration_sizes(tmp_path, tiny_llama, small_calib, cmd, samples, seq_len, needle):
    out = tmp_path / "out"
    extra = ("--recipe", "w4-rtn", "--out", str(out)) if cmd == "model" else ()
    r = run_cli(cmd, str(tiny_llama), *extra, "--calib", str(small_calib), "--samples", samples, "--seq-len", seq_len)
    assert_error(r, 2, needle)
    assert_nothing_left(out)


def test_seq_len_beyond_the_models_positions(tmp_path, tiny_llama, small_calib):
    """Refused at compress time as eval refuses it (the tiny Llama has 256 positions)."""
    out = tmp_path / "out"
    r = run_cli("model", str(tiny_llama), "--recipe", "w4-gptq", "--out", str(out), "--calib", str(small_calib),
                "--samples", "2", "--seq-len", "512")
    assert_error(r, 2, "seq_len 512", "max_position_embeddings 256")
    assert_nothing_left(out)


# ------------------------------------------------------------------------------------- source checkpoints

def test_tensor_with_the_wrong_shape(tmp_path, tiny_llama, small_calib):
    name = "model.layers.0.mlp.up_proj.weight"
    model = _edited_copy(tiny_llama, tmp_path / "m", lambda s: s.__setitem__(name, torch.zeros(100, 64)))
    out = tmp_path / "out"
    r = compress_tiny(model, out, "--calib", str(small_calib))
    assert_error(r, 2, "model.safetensors", name, "[100, 64]", "[192, 64]")
    assert_nothing_left(out)


def test_missing_tensor(tmp_path, tiny_llama, small_calib):
    name = "model.layers.1.mlp.up_proj.weight"
    model = _edited_copy(tiny_llama, tmp_path / "m", lambda s: s.pop(name))
    out = tmp_path / "out"
    r = compress_tiny(model, out, "--calib", str(small_calib))
    assert_error(r, 2, str(model), "no tensor", name)
    assert_nothing_left(out)


# ------------------------------------------------------------------------------------- recipes

def test_recipe_not_utf8(tmp_path, tiny_llama):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b'version: 1\ndescription: "caf\xe9"\npasses:\n  - pass: rtn\n')
    out = tmp_path / "out"
    assert_error(compress_tiny(tiny_llama, out, recipe=str(recipe)), 2, "latin1.yaml", "not UTF-8")
    assert_nothing_left(out)


def test_recipe_version_2_refused(tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "v2.yaml", "version: 2\npasses:\n  - pass: rtn\n")
    out = tmp_path / "out"
    assert_error(compress_tiny(tiny_llama, out, recipe=str(recipe)), 2, "v2.yaml", "version 2", "version 1")
    assert_nothing_left(out)


@pytest.mark.parametrize("name", ["recipes", "mine.yaml"])
def test_recipe_that_is_a_directory(tmp_path, tiny_llama, name):
    (tmp_path / name).mkdir()
    out = tmp_path / "out"
    assert_error(compress_tiny(tiny_llama, out, recipe=str(tmp_path / name)), 2, name, "is a directory")
    assert_nothing_left(out)


# ------------------------------------------------------------------------------------- calibration and eval text

def test_calib_or_data_that_is_a_directory(tmp_path, tiny_llama):
    d = tmp_path / "texts"
    d.mkdir()
    out = tmp_path / "out"
    assert_error(compress_tiny(tiny_llama, out, "--calib", str(d)), 2, str(d), "is a directory")
    assert_nothing_left(out)
    assert_error(run_cli("eval", str(tiny_llama), "--data", str(d)), 2, str(d), "is a directory")


def test_binary_jsonl(tmp_path, tiny_llama):
    calib = tmp_path / "docs.jsonl"
    calib.write_bytes(b'{"text": "fine"}\n' + bytes(range(128, 256)) + b"\n")
    out = tmp_path / "out"
    assert_error(compress_tiny(tiny_llama, out, "--calib", str(calib)), 2, "docs.jsonl", "not UTF-8")
    assert_nothing_left(out)


def test_binary_calibration_text_warns(tmp_path, tiny_llama, small_calib):
    calib = tmp_path / "blob.txt"
    calib.write_bytes(small_calib.read_bytes() + bytes(range(128, 256)) * 8 + b"\x00" * 256)
    out = tmp_path / "out"
    r = compress_tiny(tiny_llama, out, "--calib", str(calib))
    assert r.returncode == 0, r.stderr[-3000:]
    warning = next(line for line in r.stderr.splitlines() if line.startswith("warning:") and "blob.txt" in line)
    assert "%" in warning and "UTF-8" in warning, warning


def test_utf16_calibration_text_is_decoded_and_warns(tmp_path, tiny_llama, small_calib):
    """A UTF-16 file with a byte-order mark gives the same calibration windows as the same text in UTF-8."""
    calib = tmp_path / "utf16.txt"
    calib.write_bytes(codecs.BOM_UTF16_LE + small_calib.read_text().encode("utf-16-le"))
    r16 = compress_tiny(tiny_llama, tmp_path / "a", "--calib", str(calib))
    r8 = compress_tiny(tiny_llama, tmp_path / "b", "--calib", str(small_calib))
    assert r16.returncode == r8.returncode == 0, r16.stderr[-3000:]
    assert any(line.startswith("warning:") and "utf16.txt" in line and "UTF-16" in line
               for line in r16.stderr.splitlines()), r16.stderr[-3000:]
    sha = [json.loads((tmp_path / d / "compression.json").read_text())["calibration"]["windows_sha256"] for d in "ab"]
    assert sha[0] == sha[1]


# ------------------------------------------------------------------------------------- --quiet

def test_quiet_silences_library_progress_bars(tmp_path, tiny_llama, small_calib):
    """Converting a pickle checkpoint goes through transformers' from_pretrained and save_pretrained, which draw
    tqdm bars on stderr ("Loading weights"); with --quiet stderr stays empty."""
    model = tmp_path / "pickled"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_llama / f, model / f)
    torch.save(load_file(tiny_llama / "model.safetensors"), model / "pytorch_model.bin")
    r = run_cli("model", str(model), "--recipe", "w4-rtn", "--out", str(tmp_path / "out"), *FAST, "--calib",
                str(small_calib), "--allow-pickle", "--quiet", "--json",
                env={"COMPRESSOR_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-3000:]
    assert json.loads(r.stdout)["artifact"] == str(tmp_path / "out")


# ------------------------------------------------------------------------------------- report

def _sweep_dir(tmp_path: Path, records: dict[str, dict]) -> Path:
    """A sweep output with these run records, each beside a minimal artifact manifest."""
    runs = tmp_path / "runs"
    for name, rec in records.items():
        (runs / name / "artifact").mkdir(parents=True)
        (runs / name / "artifact" / "compression.json").write_text(json.dumps({"layers": {}}))
        (runs / name / "record.json").write_text(json.dumps({"name": name, "artifact": f"{name}/artifact", **rec}))
    return runs


@pytest.mark.parametrize("bad,needles", [
    ({"bits_per_weight": 4.2, "quality": {"perplexity": "abc"}}, ("a/record.json", "quality.perplexity", "'abc'")),
    ({"bits_per_weight": "four", "quality": {"perplexity": 30.0}}, ("a/record.json", "bits_per_weight", "'four'")),
    ({"bits_per_weight": 4.2}, ("a/record.json", "no quality metrics")),
    ({"bits_per_weight": 4.2, "quality": {}}, ("a/record.json", "no quality metrics")),
])
def test_report_on_bad_records(tmp_path, bad, needles):
    runs = _sweep_dir(tmp_path, {"a": bad, "b": {"bits_per_weight": 8.2, "quality": {"perplexity": 12.0}}})
    out = tmp_path / "report"
    r = run_cli("report", str(runs), "--out", str(out))
    assert_error(r, 2, *needles)
    assert "mix decoders and encoders" not in r.stderr
    assert not out.exists()


def test_report_on_a_record_whose_artifact_is_gone(tmp_path):
    runs = _sweep_dir(tmp_path, {"a": {"bits_per_weight": 4.2, "quality": {"perplexity": 30.0}}})
    shutil.rmtree(runs / "a" / "artifact")
    out = tmp_path / "report"
    assert_error(run_cli("report", str(runs), "--out", str(out)), 2, "a/record.json", "no compression.json")
    assert not out.exists()
