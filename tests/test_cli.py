"""The CLI contract (DESIGN.md §3b) on bad input: each case runs the real `compress` in a subprocess and checks
the exit code (2 bad input, 1 failure/interrupt), a clear message naming the problem, no traceback, and that
nothing was left behind (no output directory, no hidden `.NAME.tmp-*` sibling; an existing output untouched).
Plus the positive `--json` contracts of `compress recipes` and `compress model`."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli

FAST = ("--samples", "2", "--seq-len", "32")
SHIPPED = ("w4-rtn", "w8-rtn", "w4-gptq", "w3-gptq")


# ---------------------------------------------------------------------------------------------- helpers

def _squash(s: str) -> str:
    """Whitespace removed: a message compared this way does not depend on where the console wrapped it."""
    return re.sub(r"\s+", "", s)


def assert_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """Exit `code`, an `error:` message on stderr holding every needle, no traceback, nothing on stdout."""
    assert r.returncode == code, f"exit {r.returncode}, expected {code}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "error:" in r.stderr, r.stderr[-3000:]
    msg = r.stderr[r.stderr.index("error:"):]
    for n in needles:
        assert _squash(n) in _squash(msg), f"{n!r} not in the message:\n{msg}"
    assert r.stdout.strip() == "", f"stdout should be empty on error, got {r.stdout[:500]!r}"


def leftovers(out: Path) -> list[str]:
    """Hidden temporary siblings of an output directory (`.NAME.tmp-PID`, `.NAME.old-PID`)."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert leftovers(out) == [], f"left behind: {leftovers(out)}"


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def compress_tiny(model: Path, out: Path, *extra: str, recipe: str = "w4-rtn") -> subprocess.CompletedProcess:
    return run_cli("model", str(model), "--recipe", recipe, "--out", str(out), *FAST, *extra)


@pytest.fixture(scope="module")
def odd_width_llama(tmp_path_factory, tiny_llama) -> Path:
    """A 1-block Llama of hidden 72 (= 8*9): no power of two >= 16 divides it, so group 128 has no fallback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("odd-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=72, intermediate_size=192, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_llama / f).is_file():
            shutil.copyfile(tiny_llama / f, path / f)
    return path


# ---------------------------------------------------------------------------------------------- model input

def test_missing_model_path(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    r = run_cli("model", str(missing), "--recipe", "w4-rtn", "--out", str(out))
    assert_error(r, 2, str(missing), "does not exist")
    assert_nothing_left(out)


def test_directory_without_config(tmp_path):
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "README.md").write_text("hello\n")
    out = tmp_path / "out"
    r = run_cli("model", str(model), "--recipe", "w4-rtn", "--out", str(out))
    assert_error(r, 2, str(model), "config.json")
    assert_nothing_left(out)


def test_truncated_safetensors(tmp_path, tiny_llama):
    model = tmp_path / "truncated"
    shutil.copytree(tiny_llama, model)
    st = model / "model.safetensors"
    size = st.stat().st_size
    with open(st, "r+b") as f:
        f.truncate(size - 1000)
    out = tmp_path / "out"
    r = compress_tiny(model, out)
    assert_error(r, 2, "model.safetensors", "truncated")
    assert_nothing_left(out)


def test_pickle_checkpoint_needs_allow_pickle(tmp_path, tiny_llama):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copyfile(tiny_llama / "config.json", model / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, model / "pytorch_model.bin")
    out = tmp_path / "out"
    r = compress_tiny(model, out)
    assert_error(r, 2, "pytorch_model.bin", "--allow-pickle")
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------- recipes

def test_unknown_recipe_lists_shipped(tmp_path, tiny_llama):
    out = tmp_path / "out"
    r = compress_tiny(tiny_llama, out, recipe="w5-magic")
    assert_error(r, 2, "w5-magic", "shipped recipes", *SHIPPED)
    assert_nothing_left(out)


@pytest.mark.parametrize("fname,text,expect", [
    ("typo.yaml", "version: 1\npasses:\n  - pass: rtn\n    bits: 4\n    group_sise: 64\n", ("unknown key", "group_sise")),
    ("top.yaml", "version: 1\ncalibraton: {samples: 2}\npasses:\n  - pass: rtn\n", ("unknown key", "calibraton")),
    ("words.yaml", "version: 1\npasses:\n  - pass: rtn\n    bits: four\n", ("bits", "four")),
], ids=["unknown-key", "unknown-top-level-key", "wrong-type"])
def test_bad_recipe_names_key_and_file(tmp_path, tiny_llama, fname, text, expect):
    recipe = write_recipe(tmp_path / fname, text)
    out = tmp_path / "out"
    r = compress_tiny(tiny_llama, out, recipe=str(recipe))
    assert_error(r, 2, fname, *expect)
    assert_nothing_left(out)


def test_group_size_without_usable_divisor(tmp_path, odd_width_llama):
    out = tmp_path / "out"
    r = compress_tiny(odd_width_llama, out, recipe="w4-rtn")  # group 128 on in_features 72
    assert_error(r, 2, "group_size 128", "in_features 72", "model.layers.0.")
    assert_nothing_left(out)  # the writer had started: its .out.tmp-PID must be gone


# ---------------------------------------------------------------------------------------------- output

def test_existing_output_is_refused_then_replaced_with_force(tmp_path, tiny_llama, small_calib):
    out = tmp_path / "out"
    out.mkdir()
    (out / "compression.json").write_text('{"tool": "compressor"}')  # one of ours: --force may replace it
    (out / "keep.txt").write_text("precious\n")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(bytes(range(256)))
    before = snapshot(out)

    r = compress_tiny(tiny_llama, out)
    assert_error(r, 2, str(out), "already exists", "--force")
    assert snapshot(out) == before
    assert leftovers(out) == []

    r = compress_tiny(tiny_llama, out, "--force", "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (out / "keep.txt").exists() and not (out / "sub").exists()
    assert (out / "compression.json").is_file() and (out / "model.safetensors").is_file()
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------- calibration

def test_empty_calibration_file(tmp_path, tiny_llama):
    calib = tmp_path / "empty.txt"
    calib.write_text("")
    out = tmp_path / "out"
    r = compress_tiny(tiny_llama, out, "--calib", str(calib))
    assert_error(r, 2, "empty.txt", "empty")
    assert_nothing_left(out)


def test_calibration_shorter_than_one_window(tmp_path, tiny_llama):
    calib = tmp_path / "short.txt"
    calib.write_text(" ".join(["word"] * 20) + "\n")
    out = tmp_path / "out"
    r = run_cli("model", str(tiny_llama), "--recipe", "w4-rtn", "--out", str(out), "--calib", str(calib),
                "--samples", "2", "--seq-len", "128")
    assert_error(r, 2, "short.txt", "seq_len 128")
    assert_nothing_left(out)


def test_jsonl_line_without_text_field(tmp_path, tiny_llama):
    calib = tmp_path / "docs.jsonl"
    calib.write_text(json.dumps({"text": "a fine first line"}) + "\n" + json.dumps({"body": "no text here"}) + "\n")
    out = tmp_path / "out"
    r = compress_tiny(tiny_llama, out, "--calib", str(calib))
    assert_error(r, 2, "docs.jsonl:2", "'text'")
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------- interrupt

def _read_lines(stream, q: "queue.Queue[str | None]") -> None:
    for line in stream:
        q.put(line)
    q.put(None)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_mid_run_leaves_nothing(tmp_path, demo_path, small_calib, sig):
    """Ctrl-C, or a cancelled CI job's SIGTERM, mid-run: exit 1 and nothing left behind."""
    out = tmp_path / "X"
    proc = subprocess.Popen(
        [sys.executable, "-m", "compressor.cli", "model", "demo", "--recipe", "w4-gptq", "--out", str(out), *FAST,
         "--calib", str(small_calib)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ),
        # a suite started in the background (`pytest &`, nohup) ignores SIGINT, and the child would inherit
        # that (Python keeps an ignored SIGINT ignored): give the child the default, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    q: "queue.Queue[str | None]" = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stderr, q), daemon=True)
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while True:
            line = q.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                pytest.fail("the run ended before its first block was reported:\n" + "".join(seen)[-3000:])
            seen.append(line)
            if line.startswith("block 1/"):
                break
        # the temporary sibling exists while the run is going: the check below is not vacuous
        assert leftovers(out), "no .X.tmp-* directory while the run was in progress"
        proc.send_signal(sig)
        proc.wait(timeout=120)  # not communicate(): it would race the reader thread for stderr
        stdout = proc.stdout.read()
    except queue.Empty:
        pytest.fail("no 'block 1/' line on stderr in time:\n" + "".join(seen)[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    while True:
        try:
            line = q.get_nowait()
        except queue.Empty:
            break
        if line is not None:
            seen.append(line)
    stderr = "".join(seen)
    assert proc.returncode == 1, f"exit {proc.returncode}\n{stderr[-3000:]}"
    assert "interrupted" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not any(l.startswith("block 30/") for l in seen), "the run finished before the interrupt"
    assert stdout.strip() == ""
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------- eval, inspect

def test_eval_missing_data_file(tmp_path, tiny_llama):
    missing = tmp_path / "nope.txt"
    r = run_cli("eval", str(tiny_llama), "--data", str(missing), "--seq-len", "32", "--max-tokens", "64")
    assert_error(r, 2, "nope.txt", "does not exist")


def test_inspect_not_an_artifact(tmp_path, tiny_llama):
    before = snapshot(tiny_llama)
    r = run_cli("inspect", str(tiny_llama))
    assert_error(r, 2, str(tiny_llama), "not a compressor artifact", "compression.json")
    assert snapshot(tiny_llama) == before


# ---------------------------------------------------------------------------------------------- message form

def test_error_message_is_a_single_line(tmp_path):
    """A long path must not be wrapped onto several lines (scripts grep for the message)."""
    model = tmp_path / ("a-model-directory-with-a-rather-long-name-" * 2)
    model.mkdir()
    out = tmp_path / "out"
    r = run_cli("model", str(model), "--recipe", "w4-rtn", "--out", str(out), env={"COLUMNS": "80"})
    assert_error(r, 2, "config.json")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    err_lines = [l for l in lines if l.startswith("error:")]
    assert len(err_lines) == 1 and str(model) in err_lines[0] and "config.json" in err_lines[0], r.stderr
    assert_nothing_left(out)


def test_error_message_keeps_brackets(tmp_path, tiny_llama):
    """A message quoting user text with [...] (a regex) must show it verbatim, not eat it as console markup."""
    recipe = write_recipe(tmp_path / "re.yaml", 'version: 1\npasses:\n  - pass: rtn\n    targets: ["re:[ab]+(x"]\n')
    out = tmp_path / "out"
    r = compress_tiny(tiny_llama, out, recipe=str(recipe))
    assert_error(r, 2, "re.yaml", "bad regex", "re:[ab]+(x")
    assert_nothing_left(out)


def test_targets_that_select_nothing_fail_before_the_run(tmp_path, tiny_llama):
    """A regex that matches no layer (here YAML single quotes keep a doubled backslash, so the regex wants a
    literal backslash) is an error naming the pass and its targets, not an artifact with nothing compressed."""
    recipe = write_recipe(tmp_path / "re.yaml", "version: 1\npasses:\n  - pass: rtn\n    bits: 4\n"
                          "    targets: ['re:model\\\\.layers\\\\..*']\n")
    out = tmp_path / "out"
    r = compress_tiny(tiny_llama, out, recipe=str(recipe))
    assert_error(r, 2, "pass 1 (rtn)", "select no Linear", "model.layers.0.")
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------- --json contracts

def test_recipes_json():
    r = run_cli("recipes", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    names = [x["name"] for x in obj["recipes"]]
    assert set(SHIPPED) <= set(names), names
    for x in obj["recipes"]:
        assert x["passes"] and x["description"]


def test_model_json(tmp_path, tiny_llama, small_calib):
    out = tmp_path / "art"
    r = run_cli("model", str(tiny_llama), "--recipe", "w4-gptq", "--out", str(out), *FAST, "--calib", str(small_calib),
                "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be one JSON object only, got:\n{r.stdout}"
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    assert {"artifact", "bits_per_weight", "size_bytes", "seconds", "passes"} <= set(obj), sorted(obj)
    assert Path(obj["artifact"]) == out
    assert 4 <= obj["bits_per_weight"] < 5
    assert obj["size_bytes"] == sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    assert obj["seconds"] > 0
    assert [p["pass"] for p in obj["passes"]] == ["gptq"] and obj["passes"][0]["layers"] == 14
    assert (out / "compression.json").is_file()
    assert leftovers(out) == []


def test_quiet_keeps_stderr_clean_but_errors(tmp_path, tiny_llama, small_calib):
    """--quiet: no logs or tables on stderr (the same run without it prints them), the JSON on stdout as
    before; an error still prints and exits 2."""
    args = ("model", str(tiny_llama), "--recipe", "w4-gptq", *FAST, "--calib", str(small_calib), "--json")
    loud = run_cli(*args, "--out", str(tmp_path / "a"))
    quiet = run_cli(*args, "--out", str(tmp_path / "b"), "--quiet")
    assert loud.returncode == quiet.returncode == 0, quiet.stderr[-3000:]
    assert "group_size" in loud.stderr and quiet.stderr == "", quiet.stderr
    assert json.loads(quiet.stdout)["bits_per_weight"] == json.loads(loud.stdout)["bits_per_weight"]
    r = run_cli("inspect", str(tmp_path / "b"), "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert_error(run_cli(*args, "--out", str(tmp_path / "b"), "--quiet"), 2, "exists")


def test_generate(demo_w4_artifact):
    """`compress generate`: text out, tokens/s; an artifact runs its QuantLinear layers (the reference on the CPU);
    --ignore-eos gives exactly --max-new-tokens; bad input exits 2."""
    r = run_cli("generate", str(demo_w4_artifact), "--prompt", "It is a truth universally", "--max-new-tokens", "6",
                "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["new_tokens"] == 6 and res["text"].strip() and res["tokens_per_second"] > 0
    assert res["kernels"] == "reference" and res["device"] == "cpu" and res["dtype"] == "float32"
    r = run_cli("generate", str(demo_w4_artifact), "--prompt", "It is a truth universally", "--max-new-tokens", "6")
    assert r.returncode == 0 and r.stdout.strip() == res["text"].strip() and "tokens/s" in r.stderr, r.stderr[-2000:]
    assert_error(run_cli("generate", str(demo_w4_artifact), "--prompt", ""), 2, "--prompt is empty")
    assert_error(run_cli("generate", str(demo_w4_artifact), "--prompt", "x", "--dtype", "int3"), 2, "--dtype 'int3'")
