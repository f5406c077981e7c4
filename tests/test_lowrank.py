"""Low-rank projection (compressor/lowrank.py) against exact references on synthetic layers whose inputs (and
outputs) live in known subspaces."""
from __future__ import annotations

import pytest
import torch

from compressor import lowrank as L


def _data(n: int, d_in: int, k: int, seed: int = 0) -> torch.Tensor:
    """n inputs in a k-dimensional subspace of R^d_in, with a spread spectrum (scales 1 .. 1/k)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))
    z = torch.randn(n, k, generator=g, dtype=torch.float64) / torch.arange(1, k + 1, dtype=torch.float64)
    return z @ q.T


def test_energy_rank():
    e = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert L.energy_rank(e, 0.4) == 1 and L.energy_rank(e, 0.7) == 2 and L.energy_rank(e, 0.71) == 3
    assert L.energy_rank(e, 1.0) == 4 and L.energy_rank(torch.zeros(3), 0.9) == 0
    with pytest.raises(ValueError, match="tau"):
        L.energy_rank(e, 0.0)


def test_utilized_factors_keep_the_function_on_the_data():
    """Inputs in 12 of 64 dims: the utilized rank is 12, B A x = W x on the data (to 1e-9), the factors store fewer
    numbers than W; truncated SVD of W at the same rank leaves a large output error, activation-aware SVD none."""
    x = _data(400, 64, 12)
    w = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = x.T @ x / x.shape[0]
    sub = L.utilized_subspaces(w, c, tau_in=1 - 1e-12)
    assert sub.u_in.shape == (64, 12) and sub.rank == 12
    assert sub.utilization() == pytest.approx(12 / 48)
    a, b = L.utilized_factors(w, sub)
    assert a.shape == (12, 64) and b.shape == (48, 12) and L.saves_params(12, 64, 48)
    ref = x @ w.T
    assert float((x @ (b @ a).T - ref).abs().max()) < 1e-9 * float(ref.abs().max())
    assert torch.allclose(b @ a, L.project(w, sub), atol=1e-10)
    a2, b2 = L.svd_factors(w, 12)
    assert L.output_rel_err(w, b2 @ a2, c) > 0.1
    a3, b3 = L.activation_svd_factors(w, c, 12, damp=1e-12)
    assert L.output_rel_err(w, b3 @ a3, c) < 1e-8


def test_output_subspace_limits_the_rank():
    """W maps the 12-dim input subspace onto 5 output dims: U_T has 5 columns and the utilized rank is 5."""
    g = torch.Generator().manual_seed(2)
    x = _data(400, 64, 12)
    w = torch.randn(48, 5, dtype=torch.float64, generator=g) @ torch.randn(5, 64, dtype=torch.float64, generator=g)
    sub = L.utilized_subspaces(w, x.T @ x / 400, tau_in=1 - 1e-12)
    assert sub.u_in.shape[1] == 12 and sub.u_out.shape[1] == 5 and sub.rank == 5
    a, b = L.utilized_factors(w, sub)
    assert float((x @ (b @ a).T - x @ w.T).abs().max()) < 1e-9 * float((x @ w.T).abs().max())


def test_lower_rank_and_energy():
    """Below the utilized rank the factors are the core's best approximation: error decreasing in rank, 0 at r; a
    lower energy threshold keeps fewer input directions."""
    x = _data(400, 64, 20, seed=3)
    w = torch.randn(32, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    c = x.T @ x / 400
    sub = L.utilized_subspaces(w, c, tau_in=1 - 1e-12)
    errs = [L.output_rel_err(w, torch.mm(*reversed(L.utilized_factors(w, sub, r))), c) for r in (4, 8, 16, 20)]
    assert all(b < a for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-12
    assert L.utilized_subspaces(w, c, tau_in=0.9).u_in.shape[1] < 20


def test_output_rel_err_is_the_data_error():
    x = _data(300, 16, 16, seed=5)
    g = torch.Generator().manual_seed(6)
    w, w_hat = torch.randn(8, 16, dtype=torch.float64, generator=g), torch.randn(8, 16, dtype=torch.float64, generator=g)
    direct = float(((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert L.output_rel_err(w, w_hat, x.T @ x / 300) == pytest.approx(direct, rel=1e-10)
    assert L.rank_for_params(0.5, 64, 64) == 16 and not L.saves_params(32, 64, 64)
