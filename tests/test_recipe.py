from __future__ import annotations

import pytest

from compressor.errors import BadInput
from compressor.recipe import load_recipe, parse_recipe, shipped_recipes
from compressor.targets import matches


def test_shipped_recipes_parse_and_round_trip():
    import yaml

    names = set(shipped_recipes())
    assert {"w4-rtn", "w8-rtn", "w4-gptq", "w3-gptq", "w4-adaround", "w4-flexround", "w3-flexround", "w2-flexround",
            "lowrank-util", "lowrank-params70", "svd-params70", "prune50-dp", "prune50-uniform", "prune24-dp",
            "prune50-dp-w4", "evo-w3avg", "evo-sparse50", "evo-drop25"} <= names
    for name in names:
        r = load_recipe(name)
        again = parse_recipe(yaml.safe_load(r.to_yaml()), "again")
        assert again.passes == r.passes and again.calibration == r.calibration
    w3 = load_recipe("w3-gptq").passes[0].config
    assert (w3.bits, w3.group_size, w3.symmetric) == (3, 128, False)
    evo = {n: load_recipe(n).passes[0].config for n in ("evo-w3avg", "evo-sparse50", "evo-drop25")}
    assert [(c.space, c.target) for c in evo.values()] == [("bits", 3.0), ("sparsity", 0.5), ("depth", 0.25)]
    assert all(c.fitness_dtype == "bfloat16" and c.generations == 50 for c in evo.values())


def test_errors_name_key_and_file():
    with pytest.raises(BadInput, match=r"x\.yaml: passes\[0\] \(gptq\): unknown key 'bitz'"):
        parse_recipe({"passes": [{"pass": "gptq", "bitz": 4}]}, "x.yaml")
    with pytest.raises(BadInput, match=r"x\.yaml: passes\[0\] \(rtn\): bits: .*got 'four'"):
        parse_recipe({"passes": [{"pass": "rtn", "bits": "four"}]}, "x.yaml")
    with pytest.raises(BadInput, match=r"unknown pass 'gptqq'; known: .*gptq"):
        parse_recipe({"passes": [{"pass": "gptqq"}]}, "x.yaml")
    with pytest.raises(BadInput, match="bits"):
        parse_recipe({"passes": [{"pass": "rtn", "bits": 9}]}, "x.yaml")
    with pytest.raises(BadInput, match=r"unknown recipe 'nope'; shipped recipes: .*w4-gptq"):
        load_recipe("nope")


def test_targets_and_ignore():
    r = parse_recipe({"passes": [{"pass": "rtn", "targets": [r"re:.*mlp\.\w+_proj$"], "ignore": ["down_proj"]}]}, "t")
    spec = r.passes[0]
    assert spec.selects("model.layers.0.mlp.up_proj")
    assert not spec.selects("model.layers.0.mlp.down_proj")
    assert not spec.selects("model.layers.0.self_attn.q_proj")
    assert matches("lm_head", "lm_head") and not matches("lm_head", "xlm_head")
