"""The CompressedWeight contract (compressor/weights.py): each weight class says its own compression.json entry and
the module the runner puts into the block, so no caller asks which class a weight is."""
import pytest
import torch

from compressor.api import layer_entry
from compressor.lowrank import LowRankWeight
from compressor.modules import LowRankLinear
from compressor.quant import QWeight, quantize_rtn
from compressor.sparse import SparseWeight


def _w(n: int = 8, k: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _pruned(qw: QWeight, mask: torch.Tensor, structure: str) -> QWeight:
    """qw with the pruned weights at the grid's zero code and the mask attached."""
    qw.q = torch.where(mask, qw.q, qw.zero_codes())
    qw.mask, qw.sparsity_structure = mask, structure
    return qw


def _weights() -> dict[str, object]:
    w = _w()
    outliers = w.abs() > 2.0
    half = torch.arange(32).repeat(8, 1) % 4 < 2  # 2:4
    a, b = _w(4, 32, 1), _w(8, 4, 2)
    factored = LowRankWeight(a, b)
    factored.part_compressed("a")
    return {
        "sym": quantize_rtn(w, 4, 16, True, torch.float16),
        "asym per channel": quantize_rtn(w, 3, -1, False, torch.float16, requested_group_size=128),
        "sparse residual": quantize_rtn(w, 4, 16, False, torch.float16, exact=outliers),
        "masked": _pruned(quantize_rtn(w * half, 4, 16, False, torch.float16), half, "2:4"),
        "sparse": SparseWeight(w * half, half, "2:4"),
        "lowrank": LowRankWeight(a, b),
        "lowrank, factor a compressed": factored,
    }


@pytest.mark.parametrize("case", list(_weights()))
def test_manifest_entry_is_the_layer_entry_without_pass_and_error(case):
    w = _weights()[case]
    want = {k: v for k, v in layer_entry(w, "p", 0.125).items() if k not in ("pass", "weight_rel_err")}
    assert list(w.manifest_entry().items()) == list(want.items())  # the same keys in the same order


def test_runtime_module_only_for_factors():
    """A quantized or pruned weight stays in its Linear; a factorised one brings the two-Linear module, whose factors
    a later pass may compress (then this weight no longer stores them)."""
    w = _weights()
    assert w["sym"].runtime_module(None) is None and w["sparse"].runtime_module(torch.zeros(8)) is None
    lw: LowRankWeight = w["lowrank"]
    bias = torch.randn(8)
    m = lw.runtime_module(bias)
    assert isinstance(m, LowRankLinear) and (m.in_features, m.out_features, m.rank) == (32, 8, 4)
    assert torch.equal(m.a.weight, lw.a) and torch.equal(m.b.weight, lw.b) and torch.equal(m.bias, bias)
    x = torch.randn(3, 32)
    assert torch.allclose(m(x), x @ lw.dequantize().T + bias, atol=1e-5)
    bits = lw.storage_bits()
    lw.part_compressed("b")
    assert set(lw.to_tensors()) == {"a.weight"} and lw.storage_bits() == bits - 8 * 4 * 32
    with pytest.raises(ValueError, match="'c'"):
        lw.part_compressed("c")
    with pytest.raises(ValueError, match="no runtime module"):
        w["sym"].part_compressed("a")
