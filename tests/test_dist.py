"""Data-parallel calibration on torch.distributed (dist.py), 2 gloo ranks spawned from the tests: the reduced Hessian
equals one process's on the same windows; RTN writes the same artifact on 1 and 2 ranks, GPTQ and FlexRound nearly
the same codes; a pass that cannot run there, and a rank that dies, end the run on every rank with nothing written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny_models
from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, demo_path) -> Path:
    return tiny_models.build("llama", tmp_path_factory.mktemp("dist") / "llama", demo_path)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """A few thousand tokens of real text (the embedded corpus's first file), so each rank has distinct windows."""
    from compressor.data import DEFAULT_CORPUS

    p = tmp_path_factory.mktemp("distcal") / "calib.txt"
    p.write_text(Path(DEFAULT_CORPUS[0]).read_text()[:40000])
    return p


def _moments(src: str, calib: str, out: str) -> None:
    """Rank body: block 0's q/k/v input second moments on this rank's shard, reduced; rank 0 saves them."""
    from compressor import dist
    from compressor.blocks import Context, stream_blocks
    from compressor.data import load_windows
    from compressor.models import Checkpoint, load_tokenizer, skeleton

    w = dist.init("cpu")
    windows, _ = load_windows(load_tokenizer(Path(src)), [calib], 8, 64, 0)
    model, ckpt = skeleton(Path(src)), Checkpoint(Path(src))
    for _, block, io in stream_blocks(model, ckpt, dist.shard(windows), Context(), last=0):
        io.layers = {f"{io.prefix}.self_attn.{n}": getattr(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")}
        h = io.input_second_moments(block, list(io.layers))
        if w.main:
            torch.save({"h": h, "tokens": dict(io.tokens_seen)}, out)
        io.outputs = []
        break
    dist.close()


def test_hessian_all_reduce_equals_one_process(tiny_llama, calib, tmp_path):
    from compressor import dist

    dist.spawn(2, _moments, (str(tiny_llama), str(calib), str(tmp_path / "two.pt")))
    _moments(str(tiny_llama), str(calib), str(tmp_path / "one.pt"))  # one process: this one
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["tokens"] == two["tokens"] and set(one["tokens"].values()) == {8 * 64}
    for name, h in one["h"].items():
        rel = float((two["h"][name] - h).norm() / h.norm())
        assert rel <= 1e-6, (name, rel)


def _compress(src: Path, recipe, out: Path, calib: Path, workers: int) -> dict:
    """In this process (2 workers: spawned from here); the CLI's --workers is tested below."""
    import compressor

    return compressor.compress(str(src), recipe, out, calib=[calib], samples=8, seq_len=64, device="cpu",
                               workers=workers)


def test_rtn_same_artifact_gptq_flexround_nearly(tiny_llama, calib, tmp_path):
    """RTN: byte-identical files on 1 and 2 ranks. GPTQ (MSE clipping and refit are discrete choices a 1e-7
    difference in a Hessian can flip) and FlexRound (gradients summed over ranks): most codes the same, the block
    output error within a few percent; rank 0's summary reports each rank's peak memory."""
    one, two = _compress(tiny_llama, "w4-rtn", tmp_path / "r1", calib, 1), _compress(tiny_llama, "w4-rtn", tmp_path / "r2", calib, 2)
    for f in sorted(p.name for p in (tmp_path / "r1").iterdir()):
        assert (tmp_path / "r1" / f).read_bytes() == (tmp_path / "r2" / f).read_bytes(), f
    assert two["world_size"] == 2 and len(two["ranks"]) == 2 and "world_size" not in one
    recipe = tmp_path / "fr.yaml"
    recipe.write_text("version: 1\npasses:\n  - pass: flexround\n    bits: 4\n    group_size: 128\n    symmetric: true\n"
                      "    iters: 5\n")
    for name, rec, agree in (("gptq", "w4-gptq", 0.9), ("fr", recipe, 0.999)):
        s1 = _compress(tiny_llama, rec, tmp_path / f"{name}1", calib, 1)
        s2 = _compress(tiny_llama, rec, tmp_path / f"{name}2", calib, 2)
        assert tiny_models.code_agreement(tmp_path / f"{name}1", tmp_path / f"{name}2") >= agree, name
        e1, e2 = s1["mean_block_output_rel_mse"], s2["mean_block_output_rel_mse"]
        assert abs(e2 - e1) <= 0.05 * e1, (name, e1, e2)


def test_single_process_pass_refused_before_any_rank(tiny_llama, calib, tmp_path):
    r = run_cli("model", str(tiny_llama), "--recipe", "prune50-dp", "--out", str(tmp_path / "o"), "--calib", str(calib),
                "--samples", "8", "--seq-len", "64", "--workers", "2")
    assert r.returncode == 2 and "does not run on more than one process" in r.stderr, r.stderr
    assert "spawning" not in r.stderr and not (tmp_path / "o").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (t / "children").read_text().split()]
    return kids


def test_a_dead_rank_ends_the_run(tiny_llama, calib, tmp_path):
    """Rank 1 killed (as the OOM killer would) once the ranks are calibrating: the run exits 1 within a bounded
    time, on every rank, and leaves no artifact and no temporary directory."""
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "compressor.cli", "model", str(tiny_llama), "--recipe", "w4-gptq",
                          "--out", str(out), "--calib", str(calib), "--samples", "8", "--seq-len", "64",
                          "--workers", "2"], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=os.environ.copy())
    try:
        for line in p.stderr:  # rank 0's log: calibration is loaded, the blocks are next
            if line.startswith("storage dtype"):
                break
        ranks = [c for c in _children(p.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(ranks) == 2, ranks
        os.kill(max(ranks), signal.SIGKILL)
        t0 = time.monotonic()
        rest = p.stderr.read()
        assert p.wait(timeout=120) == 1, rest
        assert time.monotonic() - t0 < 90
    finally:
        if p.poll() is None:
            p.kill()
    assert "a rank failed" in rest
    assert not out.exists() and not [x for x in tmp_path.iterdir() if x.name.startswith(".o.")]
