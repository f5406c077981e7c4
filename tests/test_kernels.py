"""The kernel path (ops.py, kernels/): the kernel layout and the reference ops against quant.py bit for bit, the
custom ops' fake implementations (opcheck, torch.compile), the unpacking header compiled for the host against the
reference, the CUDA sources compiled with nvcc (compile only, so a syntax or template error fails CI without a
GPU), and on a GPU the kernels against the reference: unpack and dequant bit for bit, the fused product within
stated tolerances."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compressor import ops, quant
from compressor.errors import BadInput, CompressorError
from compressor.modules import QuantLinear

KERNELS = ops.kernel_sources()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# (n, k, group_size): odd row counts, widths that are not multiples of 32 or 64, per channel and grouped
SHAPES = [(67, 96, 32), (33, 200, 40), (5, 77, -1), (48, 128, 16), (17, 512, 128), (3, 4096, 128)]


def random_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool, seed: int = 0):
    """Random codes over the whole range with a grid: (q, scale, zero, the disk tensors)."""
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = quant.qrange(bits)
    q = torch.randint(qmin, qmax + 1, (n, k), generator=g, dtype=torch.int8)
    groups = 1 if group_size == -1 else k // group_size
    scale = (torch.rand(n, groups, generator=g) * 0.1 + 1e-3).half()
    zero = None if symmetric else torch.randint(qmin, qmax + 1, (n, groups), generator=g, dtype=torch.int8)
    qw = quant.QWeight(q, scale, zero, bits, group_size, group_size)
    return qw, qw.to_tensors()


def kernel_weight(t: dict, bits: int, group_size: int, device="cpu") -> ops.KernelWeight:
    t = {k: v.to(device) for k, v in t.items()}
    return ops.KernelWeight.from_packed(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"),
                                        tuple(int(x) for x in t["weight_shape"]), bits, group_size)


# ------------------------------------------------------------------------------------------ reference path

@pytest.mark.parametrize("bits", range(2, 9))
def test_kernel_layout_and_reference_ops_are_exact(bits):
    """KernelWeight keeps every code: the unpack op gives the codes back, the dequant op is quant.dequantize bit for
    bit in every output dtype, the product is F.linear of that weight. Rows are padded to whole chunks and 16 bytes."""
    for i, (n, k, gs) in enumerate(SHAPES[:5]):
        for symmetric in (True, False):
            qw, t = random_weight(n, k, bits, gs, symmetric, seed=bits * 10 + i)
            kw = kernel_weight(t, bits, gs)
            assert kw.words.shape == (n, ops.row_stride_words(k, bits))
            assert kw.words.shape[1] % 4 == 0 and kw.words.shape[1] >= -(-k // 32) * bits
            assert torch.equal(kw.words[:, : t["weight_packed"].shape[1]], t["weight_packed"])
            assert not kw.words[:, t["weight_packed"].shape[1]:].any()
            assert torch.equal(ops.unpack(kw.words, k, bits), qw.q)
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                ref = quant.dequantize(qw.q, qw.scale, qw.zero, gs, dtype)
                got = kw.dequantize(dtype)
                assert got.dtype == dtype and torch.equal(got, ref), f"bits {bits} {(n, k, gs)} {dtype}"
            x = torch.randn(3, k)
            bias = torch.randn(n)
            y = ops.linear(x, kw, bias)
            assert torch.allclose(y, F.linear(x, qw.dequantize(), bias), atol=1e-5, rtol=1e-5)


def test_custom_ops_fake_implementations():
    """torch.library.opcheck: schema, fake (meta) implementation and dispatch of each op agree; and a compiled
    graph with the ops (fullgraph: no break) gives the eager result."""
    qw, t = random_weight(24, 96, 4, 32, False, seed=1)
    kw = kernel_weight(t, 4, 32)
    x = torch.randn(2, 96, dtype=torch.float16)
    bias = torch.randn(24, dtype=torch.float16)
    torch.library.opcheck(ops.unpack, (kw.words, 96, 4))
    torch.library.opcheck(ops.dequant, (kw.words, kw.scale, kw.zero, 96, 4, 32, torch.bfloat16))
    torch.library.opcheck(ops.qmatmul, (x.float(), kw.words, kw.scale, kw.zero, None, 96, 4, 32))
    torch.library.opcheck(ops.qmatmul, (x, kw.words, kw.scale, kw.zero, bias, 96, 4, 32))

    def f(x):
        return ops.linear(torch.relu(x), kw, bias.float()) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xf = torch.randn(5, 96)
    assert torch.equal(compiled(xf), f(xf))


def test_quantlinear_kernel_layout_follows_its_buffers():
    """QuantLinear keeps the kernel layout between calls and remakes it when its buffers are written in place
    (load_state_dict) or replaced."""
    qw, t = random_weight(16, 64, 4, 32, True, seed=2)
    m = QuantLinear(64, 16, 4, 32, True, bias=False)
    x = torch.randn(3, 64)
    m.load_state_dict({k: v for k, v in t.items()}, strict=False)
    first = m.kernel_weight()
    assert m.kernel_weight() is first
    assert torch.allclose(m(x), x @ qw.dequantize().T, atol=1e-5)
    qw2, t2 = random_weight(16, 64, 4, 32, True, seed=3)
    m.load_state_dict({k: v for k, v in t2.items()}, strict=False)  # copies into the same storage
    assert m.kernel_weight() is not first
    assert torch.allclose(m(x), x @ qw2.dequantize().T, atol=1e-5)


def test_kernel_mode_switch(monkeypatch):
    qw, t = random_weight(8, 32, 4, -1, True)
    kw = kernel_weight(t, 4, -1)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "bogus")
    with pytest.raises(BadInput, match="COMPRESSOR_KERNELS='bogus'"):
        kw.dequantize(torch.float32)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "cuda")  # forced, but these tensors are on the CPU: an error, no fallback
    with pytest.raises(CompressorError, match="COMPRESSOR_KERNELS=cuda, but the tensors are on cpu"):
        kw.dequantize(torch.float32)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "reference")
    assert torch.equal(kw.dequantize(torch.float32), qw.dequantize())


# ------------------------------------------------------------------------------------------ sources, no GPU

HARNESS = r"""
#include "pack.cuh"
#define CASE(B) case B: for (int c = 0; c < chunks; ++c) qk::unpack_chunk<B>(w + c * B, q + c * 32); break;
extern "C" int unpack_rows(int bits, const uint32_t* words, int64_t n, int64_t ws, int64_t k, int8_t* out) {
  const int chunks = (int)((k + 31) / 32);
  int32_t q[4096];
  if (chunks * 32 > 4096) return 1;
  for (int64_t r = 0; r < n; ++r) {
    const uint32_t* w = words + r * ws;
    switch (bits) { CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) default: return 2; }
    for (int64_t j = 0; j < k; ++j) out[r * k + j] = (int8_t)q[j];
  }
  return qk::row_stride_words(k, bits) == ws ? 0 : 3;
}
"""


@pytest.fixture(scope="module")
def host_unpack(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("harness")
    (d / "harness.cpp").write_text(HARNESS)
    lib = d / "harness.so"
    r = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{KERNELS}", str(d / "harness.cpp"), "-o",
                        str(lib)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ctypes.CDLL(str(lib)).unpack_rows


@pytest.mark.parametrize("bits", range(2, 9))
def test_kernel_unpacking_header_on_the_host(host_unpack, bits):
    """kernels/pack.cuh (the unpacking every CUDA kernel uses), compiled for the host, against the reference:
    bit for bit, every width, widths that end inside a word, and the kernel layout's row stride."""
    for i, (n, k, gs) in enumerate(SHAPES):
        qw, t = random_weight(n, k, bits, gs, True, seed=100 + bits * 10 + i)
        kw = kernel_weight(t, bits, gs)
        out = torch.empty(n, k, dtype=torch.int8)
        rc = host_unpack(bits, ctypes.c_void_p(kw.words.data_ptr()), n, kw.words.shape[1], k,
                         ctypes.c_void_p(out.data_ptr()))
        assert rc == 0, f"harness returned {rc}"
        assert torch.equal(out, qw.q), f"bits {bits} shape {(n, k)}: {(out != qw.q).sum()} codes differ"


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


def _cuda_includes(nvcc: str) -> list[str]:
    """The include flags nvcc itself uses (nvcc may be a wrapper script outside the toolkit)."""
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    return [w.strip('"') for line in out.splitlines() if "INCLUDES=" in line for w in line.split("=", 1)[1].split()
            if w.strip('"').startswith("-I")]


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
def test_cuda_sources_compile(tmp_path):
    """Every .cu file compiles with nvcc for Hopper (sm_90, the GPUs lent here) down to PTX (the C++ and CUDA
    front end, templates instantiated; ptxas, the slow register allocation, runs where a GPU builds the
    extension); bindings.cpp passes the host compiler's syntax check against the installed torch headers."""
    nvcc = _nvcc()
    jobs = {}
    for cu in sorted(KERNELS.glob("*.cu")):
        cmd = [nvcc, "-std=c++17", "-arch=sm_90", f"-I{KERNELS}", "-ptx", str(cu), "-o", str(tmp_path / f"{cu.stem}.ptx")]
        jobs[cu.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert set(jobs) >= {"dequant.cu", "qmatmul.cu"}
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=compressor_kernels", f"-I{KERNELS}",
           *_cuda_includes(nvcc), f"-I{sysconfig.get_paths()['include']}", *(f"-I{p}" for p in include_paths()),
           str(KERNELS / "bindings.cpp")]
    jobs["bindings.cpp"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = {}
    for name, p in jobs.items():
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            failed[name] = out[-4000:]
    assert not failed, "\n".join(f"--- {n}\n{o}" for n, o in failed.items())


# ------------------------------------------------------------------------------------------ on a GPU

@pytest.fixture
def on_cuda(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_KERNELS", "cuda")  # no silent fallback: the kernels must have built
    assert ops.HAS_CUDA_KERNELS, ops.build_error()


@cuda
@pytest.mark.parametrize("bits", range(2, 9))
def test_cuda_unpack_and_dequant_bit_exact(on_cuda, bits):
    for i, (n, k, gs) in enumerate(SHAPES):
        for symmetric in (True, False):
            qw, t = random_weight(n, k, bits, gs, symmetric, seed=bits * 7 + i)
            kw = kernel_weight(t, bits, gs, "cuda")
            assert torch.equal(ops.unpack(kw.words, k, bits).cpu(), qw.q), f"unpack bits {bits} {(n, k, gs)}"
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                got = kw.dequantize(dtype).cpu()
                ref = quant.dequantize(qw.q, qw.scale, qw.zero, gs, dtype)
                assert torch.equal(got, ref), f"dequant bits {bits} {(n, k, gs)} {dtype}: max diff " \
                                              f"{(got.float() - ref.float()).abs().max():.3g}"


# the fused product against float32 math on the same weights: |y - ref| <= TOL * max|ref| per output matrix
# (float32 accumulation in both; the rest is the output's rounding and the order of the sums)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_fused_product(on_cuda, bits, dtype):
    for i, (n, k, gs) in enumerate(SHAPES):
        for m in (1, 3, 16):
            qw, t = random_weight(n, k, bits, gs, symmetric=i % 2 == 0, seed=bits * 13 + i)
            kw = kernel_weight(t, bits, gs, "cuda")
            x = torch.randn(m, k, device="cuda").to(dtype)
            bias = torch.randn(n, device="cuda").to(dtype) if i % 3 == 0 else None
            y = ops.qmatmul(x, kw.words, kw.scale, kw.zero, bias, k, bits, kw.group_size)
            ref = F.linear(x.float(), qw.dequantize().cuda(), None if bias is None else bias.float())
            d = float((y.float() - ref).abs().max()) / max(float(ref.abs().max()), 1e-6)
            assert y.dtype == dtype and y.shape == (m, n)
            assert d <= TOL[dtype], f"bits {bits} {(n, k, gs)} m {m} {dtype}: max_diff/max {d:.3g}"


@cuda
def test_cuda_quantlinear_and_compile(on_cuda):
    """QuantLinear on the GPU (fused at batch <= 16, dequant + cuBLAS above) against the CPU reference, and
    torch.compile (inductor) of a module around it."""
    qw, t = random_weight(256, 512, 4, 128, False, seed=5)
    m = QuantLinear(512, 256, 4, 128, False, bias=True)
    m.load_state_dict({**t, "bias": torch.randn(256)}, strict=False)
    ref_m = QuantLinear(512, 256, 4, 128, False, bias=True)
    ref_m.load_state_dict(m.state_dict())
    m = m.cuda().half()
    for rows in (1, 16, 40):
        x = torch.randn(rows, 512)
        ref = ref_m(x)
        y = m(x.cuda().half()).float().cpu()
        assert float((y - ref).abs().max()) <= 2e-3 * float(ref.abs().max()) + 2e-3, rows
    compiled = torch.compile(m)
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    assert torch.allclose(compiled(x), m(x), atol=1e-3, rtol=1e-3)


@cuda
def test_cuda_artifact_logits_and_generate(on_cuda, demo_w4_artifact):
    """The demo W4 artifact on the GPU (float16, kernels) against the CPU reference (float32): logits close, and
    `compress generate` runs on the kernels."""
    from compressor import load

    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    cpu = load(demo_w4_artifact, "cpu")(input_ids=ids).logits
    gpu = load(demo_w4_artifact, "cuda", torch.float16)(input_ids=ids.cuda()).logits.float().cpu()
    rel = float((gpu - cpu).abs().max()) / float(cpu.abs().max())
    assert rel < 2e-2, f"max_diff/max {rel:.3g}"
    r = subprocess.run([sys.executable, "-m", "compressor.cli", "generate", str(demo_w4_artifact), "--prompt",
                        "It is a truth", "--max-new-tokens", "8", "--device", "cuda", "--json"],
                       capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads(r.stdout)
    assert res["kernels"] == "cuda" and res["new_tokens"] >= 1 and res["tokens_per_second"] > 0
