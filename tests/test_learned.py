"""AdaRound and FlexRound: the math against direct references on a single Linear, measured error bounds on
synthetic data, and on a real block of the demo model the learned rounding below RTN's and GPTQ's error."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compressor.passes import get_pass
from compressor.passes.adaround import AdaRoundWeight, beta_schedule, init_v, rectified_sigmoid
from compressor.passes.flexround import FlexRoundWeight
from compressor.passes.reconstruct import cosine, round_ste
from compressor.quant import dequantize, find_qparams, quantize, quantize_rtn
from compressor.blocks import BlockIO, Context

from conftest import block_error_of_pass, demo_block
from test_gptq import correlated_inputs


def test_rectified_sigmoid_and_init():
    """h(V) = clip(sigmoid(V) * 1.2 - 0.1, 0, 1) and V0 = -log(1.2 / (frac + 0.1) - 1) reproduces frac."""
    v = torch.linspace(-8, 8, 101)
    assert torch.allclose(rectified_sigmoid(v), torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1))
    frac = torch.rand(1000, dtype=torch.float64) * 0.999
    assert torch.allclose(rectified_sigmoid(init_v(frac)), frac, atol=1e-12)


@pytest.mark.parametrize("group_size,symmetric", [(-1, False), (32, False), (32, True)])
def test_adaround_init_reproduces_the_weight(group_size, symmetric):
    """At V0, floor(W/s) + h(V0) = W/s: the soft weight is W wherever W is inside the grid's range."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    scale, zero = find_qparams(w, 4, group_size, symmetric, torch.float32)
    q = AdaRoundWeight(w, scale, zero, 4, group_size)
    frac = w / q.s - torch.floor(w / q.s)
    assert torch.allclose(q.h(), frac, atol=1e-5)
    inside = (q.floor + 1 + q.z <= 7) & (q.floor + q.z >= -8)
    assert torch.allclose(q()[inside], w[inside], atol=1e-5)


def test_adaround_hard_rounding():
    """hard(): floor + 1[V >= 0] on the fixed grid; with every h saturated the soft weight equals it."""
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    scale, zero = find_qparams(w, 3, 32, False, torch.float16)
    q = AdaRoundWeight(w, scale, zero, 3, 32)
    with torch.no_grad():
        q.v.copy_(torch.randn_like(q.v) * 10)
    hard = q.hard()
    expect = torch.clamp(q.floor + (q.v >= 0).float() + q.z, -4, 3)
    assert torch.equal(hard.q, expect.to(torch.int8))
    assert torch.equal(hard.scale, scale) and torch.equal(hard.zero, zero)
    saturated = (q.h() == 0) | (q.h() == 1)
    assert torch.allclose(q()[saturated], hard.dequantize()[saturated], atol=1e-6)
    # nearest rounding is one of AdaRound's choices: V = +-inf by frac >= 0.5 gives RTN's codes
    with torch.no_grad():
        q.v.copy_(torch.where(w / q.s - q.floor >= 0.5, 50.0, -50.0))
    assert torch.equal(q.hard().q, quantize(w, scale, zero, 3, 32))


def test_regulariser_schedule():
    """Off for the first 20% of steps, then beta on a cosine from 20 down to 2."""
    iters = 1000
    betas = [beta_schedule(s, iters, 0.2, 20.0, 2.0) for s in range(iters + 1)]
    assert all(b is None for b in betas[:200]) and betas[200] == pytest.approx(20.0)
    assert betas[600] == pytest.approx(11.0) and betas[1000] == pytest.approx(2.0)
    on = [b for b in betas if b is not None]
    assert all(a >= b for a, b in zip(on, on[1:]))
    assert cosine(0, 10, 1.0, 0.0) == 1.0 and cosine(10, 10, 1.0, 0.0) == pytest.approx(0.0)
    # the regulariser is zero exactly when every h is 0 or 1, and largest at h = 0.5
    q = AdaRoundWeight(torch.randn(4, 32), *find_qparams(torch.randn(4, 32), 4, -1, False, torch.float32), 4, -1)
    with torch.no_grad():
        q.v.fill_(20.0)
    assert float(q.regularizer_sum(2.0).detach()) == 0.0
    with torch.no_grad():
        q.v.fill_(0.0)
    assert float(q.regularizer_sum(2.0).detach()) == pytest.approx(q.v.numel())


@pytest.mark.parametrize("group_size,symmetric", [(-1, False), (32, False), (16, True)])
def test_flexround_starts_at_round_to_nearest(group_size, symmetric):
    """With S2 = s3 = 1, FlexRound's codes and weight are RTN's on the initial grid."""
    torch.manual_seed(2)
    w = torch.randn(24, 64)
    scale, zero = find_qparams(w, 4, group_size, symmetric, torch.float16)
    q = FlexRoundWeight(w, scale, zero, 4, group_size, torch.float16)
    rtn = quantize(w, scale, zero, 4, group_size)
    hard = q.hard()
    assert torch.equal(hard.q, rtn) and torch.equal(hard.scale, scale)
    assert torch.allclose(q(), dequantize(rtn, scale, zero, group_size, torch.float32), atol=1e-6)


def test_flexround_division_moves_weights_and_grid():
    """A learned S2 moves a weight more than one grid step; s1 is the stored scale; gradients reach all three."""
    w = torch.tensor([[0.9, -0.5, 0.2, 0.05]])
    scale, zero = find_qparams(w, 4, -1, False, torch.float32)
    q = FlexRoundWeight(w, scale, zero, 4, -1, torch.float32)
    with torch.no_grad():
        q.log_s2[0, 2] = math.log(0.5)  # 0.2 divided by half its step: twice as many steps
    codes = q.hard().q.float() - zero.float()
    rtn = quantize(w, scale, zero, 4, -1).float() - zero.float()
    assert codes[0, 2] == torch.round(0.2 / (scale[0, 0] * 0.5)) and codes[0, 2] - rtn[0, 2] >= 2
    assert torch.equal(codes[0, [0, 1, 3]], rtn[0, [0, 1, 3]])
    q().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (q.log_s1, q.log_s2, q.log_s3))
    x = torch.tensor([0.4, 1.6], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(round_ste(x.detach()), torch.tensor([0.0, 2.0])) and torch.equal(x.grad, torch.ones(2))


class OneLinear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.lin.weight.data = w.clone()

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("method,bits,group_size,bound", [("adaround", 4, -1, 0.85), ("adaround", 3, 32, 0.85)])
def test_learned_rounding_beats_rtn_on_one_linear(method, bits, group_size, bound):
    """One Linear with correlated inputs: AdaRound's hard-rounded output error is below RTN's on the same grid
    (measured x0.77-0.79 in 300 steps). FlexRound is not held to this: on i.i.d. Gaussian weights it stays at
    RTN's error (x0.97-1.04 measured); its gains come on real blocks (test below)."""
    torch.manual_seed(3)
    x = correlated_inputs(4096, 128).reshape(16, 256, 128)
    w = torch.randn(64, 128) * 0.05
    block = OneLinear(w)
    io = BlockIO("blk", [x[i : i + 4] for i in range(0, 16, 4)], [{}] * 4, {"blk.lin": block.lin})
    io.targets = [xb @ w.T for xb in io.inputs]
    info = get_pass(method)
    cfg = info.config(bits=bits, group_size=group_size, iters=300)
    qw = info.fn(block, io, cfg, Context())["blk.lin"]
    assert torch.equal(block.lin.weight.data, w)  # the pass does not touch the block's weights
    r = quantize_rtn(w, bits, group_size, False, torch.float16, mse=True)
    err_l = (x @ (qw.dequantize() - w).T).pow(2).sum()
    err_r = (x @ (r.dequantize() - w).T).pow(2).sum()
    assert err_l < bound * err_r, f"{method} {err_l:.4g} vs rtn {err_r:.4g} (ratio {err_l / err_r:.3f})"
    if method == "adaround":  # the fixed grid is the MSE grid; only the rounding changed
        assert torch.equal(qw.scale, r.scale) and torch.equal(qw.zero, r.zero)
        assert (qw.q.int() - r.q.int()).abs().max() <= 1


def test_learned_rounding_on_a_real_block(demo_path):
    """Block 3 of SmolLM2-135M at W3 group 64, calibrated on 4 windows of 128 tokens of Emma, the passes' defaults
    but fewer steps (AdaRound 200 of 600, FlexRound 100 of 200: the suite's time): the block-output error (hard
    rounding, against the FP model's output) of FlexRound is below GPTQ's, AdaRound's well below RTN's. Measured:
    rtn 4.98e-3, gptq 5.84e-4, adaround 1.61e-3 (1.18e-3 at 600 steps), flexround 3.70e-4 (2.11e-4 at 200). (On
    this tiny calibration AdaRound does not reach GPTQ; on 8 windows of 256 tokens it does: 1.89e-3 vs 2.02e-3.)"""
    block, io = demo_block(demo_path, 3, windows=4, seq_len=128, batch=2)
    settings = {"rtn": {}, "gptq": {"mse": True}, "adaround": {"iters": 200}, "flexround": {"iters": 100}}
    errs = {name: block_error_of_pass(block, io, name, bits=3, group_size=64, symmetric=False, **extra)
            for name, extra in settings.items()}
    assert errs["flexround"] < 0.75 * errs["gptq"] < errs["rtn"], errs
    assert errs["adaround"] < 0.4 * errs["rtn"], errs
