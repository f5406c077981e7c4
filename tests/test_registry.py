"""The pass registry (compressor/passes/__init__.py): registration by decorator, and the two by-config hooks the
runner reads (what a block stage reads, its mask role)."""
import pytest

from compressor.passes import PASSES, PassConfig, get_pass, register_pass


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="'rtn' is already registered .*passes.rtn"):
        register_pass("rtn", PassConfig)(lambda block, io, cfg, ctx: {})
    assert PASSES["rtn"].config.__name__ == "RTNConfig"


@pytest.mark.parametrize("name, settings, reads, masks", [
    ("rtn", {}, "weights", "keeps"),
    ("gptq", {}, "inputs", "keeps"),
    ("flexround", {}, "targets", None),
    ("adaround", {}, "targets", None),
    ("prune", {}, "weights", "makes"),
    ("lowrank", {}, "inputs", None),
    ("lowrank", {"method": "svd", "params": 0.5}, "weights", None),
    ("requant", {"base": "rtn"}, "weights", None),
    ("requant", {"base": "gptq"}, "inputs", None),
    ("requant", {"base": "flexround"}, "targets", None),
    ("evopress", {"candidate": "gptq"}, "inputs", None),
    ("evopress", {"candidate": "adaround"}, "targets", None),
    ("evopress", {"space": "sparsity", "target": 0.5}, "weights", "makes"),
])
def test_reads_and_masks_by_config(name, settings, reads, masks):
    info = get_pass(name)
    cfg = info.config(**settings)
    assert (info.reads(cfg), info.masks(cfg)) == (reads, masks)
