"""Data-parallel calibration on torch.distributed (dist.py), 2 gloo ranks spawned from the tests: the reduced Hessian
equals one process's on the same windows; RTN writes the same artifact on 1 and 2 ranks, GPTQ and FlexRound nearly
the same codes; a pass that cannot run there, and a rank that dies, end the run on every rank with nothing written."""
from __future__ import annotations

import json
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


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for f in names:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_rtn_gptq_same_artifact_flexround_nearly(tiny_llama, calib, tmp_path):
    """RTN and GPTQ (its Hessians summed in float64, so their float32 value does not depend on the sharding):
    byte-identical files on 1 and 2 ranks. FlexRound (the same step windows, gradients summed over ranks: Adam's
    steps then differ by float order): nearly all codes the same, the block output error within 1%; rank 0's
    summary reports each rank's peak memory."""
    one, two = _compress(tiny_llama, "w4-rtn", tmp_path / "r1", calib, 1), _compress(tiny_llama, "w4-rtn", tmp_path / "r2", calib, 2)
    _same_files(tmp_path / "r1", tmp_path / "r2")
    assert two["world_size"] == 2 and len(two["ranks"]) == 2 and "world_size" not in one
    _compress(tiny_llama, "w4-gptq", tmp_path / "g1", calib, 1)
    _compress(tiny_llama, "w4-gptq", tmp_path / "g2", calib, 2)
    _same_files(tmp_path / "g1", tmp_path / "g2")
    recipe = tmp_path / "fr.yaml"
    recipe.write_text("version: 1\npasses:\n  - pass: flexround\n    bits: 4\n    group_size: 128\n    symmetric: true\n"
                      "    iters: 5\n")
    s1 = _compress(tiny_llama, recipe, tmp_path / "fr1", calib, 1)
    s2 = _compress(tiny_llama, recipe, tmp_path / "fr2", calib, 2)
    assert tiny_models.code_agreement(tmp_path / "fr1", tmp_path / "fr2") >= 0.999
    e1, e2 = s1["mean_block_output_rel_mse"], s2["mean_block_output_rel_mse"]
    assert abs(e2 - e1) <= 0.01 * e1, (e1, e2)


def test_evopress_selects_as_one_process(tiny_llama, calib, tmp_path):
    """An EvoPress search on 2 ranks (the GPTQ candidate's database built by both, each rank scoring the stage
    windows it holds of an odd-sized pool, the KL sums reduced) takes one process's selection decisions: the
    same best fitness every generation (to float order), the same per-layer widths, the same weights."""
    import yaml

    runs = {}
    for w in (1, 2):
        recipe = tmp_path / f"evo{w}.yaml"
        recipe.write_text("version: 1\npasses:\n  - pass: evopress\n    space: bits\n    target: 3.0\n"
                          "    levels: [2, 3, 4]\n    candidate: gptq\n    group_size: 32\n    symmetric: true\n"
                          "    generations: 3\n    offspring: 4\n    survivors: [2, 1]\n    stage_windows: [2, 4]\n"
                          f"    fitness_samples: 5\n    fitness_seq_len: 32\n    database: {tmp_path / f'db{w}'}\n")
        _compress(tiny_llama, recipe, tmp_path / f"e{w}", calib, w)
        (trace,) = (tmp_path / f"db{w}").glob("trace-*.json")
        spec = yaml.safe_load((tmp_path / f"e{w}" / "recipe.yaml").read_text())["passes"][0]
        runs[w] = ([g["fitness"] for g in json.loads(trace.read_text())["generations"]], spec["assignment"])
    (fit1, plan1), (fit2, plan2) = runs[1], runs[2]
    assert len(fit1) == 3 and fit2 == pytest.approx(fit1, rel=1e-9, abs=0)
    assert plan2 == plan1 and len({v["bits"] for v in plan1.values()}) > 1
    assert (tmp_path / "e1" / "model.safetensors").read_bytes() == (tmp_path / "e2" / "model.safetensors").read_bytes()


def test_every_shipped_recipe_runs_on_several_ranks_and_a_pass_that_cannot_is_refused(monkeypatch):
    """check_world: every shipped recipe's passes run on several processes; a pass registered without
    `distributed` (a third party's) is refused there, by name, before any work; one process takes anything."""
    from compressor import recipe as R
    from compressor import runner
    from compressor.errors import BadInput
    from compressor.passes import PASSES, PassConfig, PassInfo

    for name in R.shipped_recipes():
        runner.check_world(R.load_recipe(name), size=2)
    monkeypatch.setitem(PASSES, "solo", PassInfo(PassConfig, lambda *a: {}, lambda c: "weights", lambda c: None,
                                                 False, None, None))
    rec = R.parse_recipe({"version": 1, "passes": [{"pass": "solo"}]}, "test")
    runner.check_world(rec, size=1)
    with pytest.raises(BadInput, match="pass solo does not run on more than one process"):
        runner.check_world(rec, size=2)


def test_too_few_windows_for_the_ranks_refused_before_any_rank(tiny_llama, calib, tmp_path):
    r = run_cli("model", str(tiny_llama), "--recipe", "w4-gptq", "--out", str(tmp_path / "o"), "--calib", str(calib),
                "--samples", "1", "--seq-len", "64", "--workers", "2")
    assert r.returncode == 2 and "1 calibration windows for 2 processes" in r.stderr, r.stderr
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
