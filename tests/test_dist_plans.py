"""prune and lowrank on 2 gloo ranks spawned from the tests (compressor/dist.py) against one process, on a tiny
Llama and real text: the plans measure their distortion curves on the windows one process takes, split between the
ranks, so the dp allocations are one process's; prune's masks come from the weights alone, and lowrank's
factorisations are split between the ranks and broadcast, so both artifacts hold one process's tensors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny_models
from test_dist import _compress


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, demo_path) -> Path:
    return tiny_models.build("llama", tmp_path_factory.mktemp("distplans") / "llama", demo_path)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """Real text (the embedded corpus's first file), so each rank has distinct windows."""
    from compressor.data import DEFAULT_CORPUS

    p = tmp_path_factory.mktemp("distplanscal") / "calib.txt"
    p.write_text(Path(DEFAULT_CORPUS[0]).read_text()[:40000])
    return p


def _recipe(tmp_path: Path, name: str, body: str) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text("version: 1\npasses:\n" + body)
    return f


def _assignment(art: Path) -> dict:
    return yaml.safe_load((art / "recipe.yaml").read_text())["passes"][0].get("assignment")


def _both(tiny_llama: Path, recipe: Path, calib: Path, tmp_path: Path) -> tuple[dict, dict, Path, Path]:
    """The recipe on 1 process and on 2 ranks (8 windows of 64 tokens): both summaries and artifacts."""
    one, two = tmp_path / f"{recipe.stem}1", tmp_path / f"{recipe.stem}2"
    return _compress(tiny_llama, recipe, one, calib, 1), _compress(tiny_llama, recipe, two, calib, 2), one, two


def test_prune_dp_allocation_and_masks_equal_one_process(tiny_llama, calib, tmp_path):
    """dp at 50% over 9 levels, the curves on 3 windows of 48 tokens (2 on rank 0, 1 on rank 1): the same
    per-layer sparsities (to 1e-6) in recipe.yaml as one process, and an artifact with the same tensors (bitmasks,
    kept values) as one process's."""
    recipe = _recipe(tmp_path, "prune", "  - pass: prune\n    sparsity: 0.5\n    allocation: dp\n    levels: 9\n"
                     "    curve_samples: 3\n    curve_seq_len: 48\n")
    _, s2, one, two = _both(tiny_llama, recipe, calib, tmp_path)
    assert s2["world_size"] == 2
    a1, a2 = _assignment(one), _assignment(two)
    assert a1.keys() == a2.keys() and len(a1) == 14
    assert len({v["sparsity"] for v in a1.values()}) > 1  # the DP chose, not a uniform split
    assert all(abs(a1[n]["sparsity"] - a2[n]["sparsity"]) <= 1e-6 for n in a1), (a1, a2)
    t1, t2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert t1.keys() == t2.keys() and any(k.endswith(".bitmask") for k in t1)
    assert all(torch.equal(t1[k], t2[k]) for k in t1), [k for k in t1 if not torch.equal(t1[k], t2[k])]


@pytest.mark.parametrize("body", [
    "    tau: 0.9\n",  # the utilized subspaces at their energy rank
    "    params: 0.5\n    allocation: dp\n    curve_samples: 1\n    curve_seq_len: 32\n",  # rank 1: no curve window
], ids=["utilized", "dp"])
def test_lowrank_factors_equal_one_process(tiny_llama, calib, tmp_path, body):
    """Utilized subspaces at tau 0.9, and dp at half the numbers (curves on one window, which rank 1 does not hold):
    the same assignment, the same layers factorised at the same ranks, every factor within 1e-5 (relative, in
    norm) of one process's, and the mean block output error within 1%."""
    recipe = _recipe(tmp_path, "lowrank", "  - pass: lowrank\n    method: utilized\n" + body)
    s1, s2, one, two = _both(tiny_llama, recipe, calib, tmp_path)
    a1, a2 = _assignment(one), _assignment(two)
    assert a1 == a2, {n: (a1[n], a2[n]) for n in a1 if a1[n] != a2[n]}
    t1, t2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    factors = [k for k in t1 if k.endswith((".a.weight", ".b.weight"))]
    assert t1.keys() == t2.keys() and factors and all(t1[k].shape == t2[k].shape for k in factors)
    worst = max(float((t2[k] - t1[k]).norm() / t1[k].norm()) for k in factors)
    assert worst <= 1e-5, worst
    e1, e2 = s1["mean_block_output_rel_mse"], s2["mean_block_output_rel_mse"]
    assert abs(e2 - e1) <= 0.01 * e1, (e1, e2)
