"""The architecture matrix (tests/tiny_models.py): each family compresses end to end, our loader gives the
fake-quantized reference's logits, and transformers + compressed-tensors opens the artifact with the same
logits. RTN on every family; GPTQ and FlexRound (a few steps) on the ones with another layout (fused
projections, other block names, experts). bench/architectures.py runs the full matrix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny_models
from conftest import run_cli

OURS_RTOL = 1e-5  # ours vs the reference: the same dequantized weights, another module layout (experts)


@pytest.fixture(scope="session")
def learned_recipe(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("recipes") / "w4-flexround-3.yaml"
    p.write_text("version: 1\npasses:\n  - pass: flexround\n    bits: 4\n    group_size: 128\n    symmetric: true\n"
                 "    iters: 3\n")
    return p


def _compress(src: Path, recipe: str | Path, out: Path, calib: Path) -> dict:
    """In this process (the CLI's own path is tested elsewhere; a subprocess per cell costs its imports)."""
    import compressor

    return compressor.compress(str(src), recipe, out, calib=[calib], samples=4, seq_len=32, device="cpu")


def _check_matrix_cell(src: Path, art: Path) -> None:
    res = tiny_models.check(src, art, tiny_models.prompt_ids(49152))
    assert res["ours_max_diff"] <= OURS_RTOL * res["scale"], f"{src.name}: ours vs reference max_diff={res['ours_max_diff']:.3g}"
    assert res["transformers_ok"], f"{src.name}: {res['transformers_detail']}"


@pytest.mark.parametrize("arch", list(tiny_models.ARCHS))
def test_rtn_every_architecture(arch, tiny_dir, small_calib, tmp_path):
    src = tiny_dir(arch)
    summary = _compress(src, "w4-rtn", tmp_path / "a", small_calib)
    assert summary["passes"][0]["layers"] > 0
    _check_matrix_cell(src, tmp_path / "a")


@pytest.mark.parametrize("arch", ["phi3", "gpt_neox", "qwen2_moe"])
def test_gptq_and_learned(arch, tiny_dir, small_calib, learned_recipe, tmp_path):
    src = tiny_dir(arch)
    for recipe in ("w4-gptq", learned_recipe):
        out = tmp_path / Path(str(recipe)).stem
        _compress(src, recipe, out, small_calib)
        _check_matrix_cell(src, out)


def test_moe_router_unquantized_experts_linears(tiny_dir, small_calib, tmp_path):
    """The experts are compressed one by one under the checkpoint's names; routers (mlp.gate, shared_expert_gate)
    are not, and keep their exact FP weights in the artifact."""
    from safetensors import safe_open

    src = tiny_dir("qwen2_moe")
    _compress(src, "w4-rtn", tmp_path / "a", small_calib)
    layers = json.loads((tmp_path / "a" / "compression.json").read_text())["layers"]
    experts = [n for n in layers if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3, sorted(layers)
    assert not [n for n in layers if n.endswith(("mlp.gate", "shared_expert_gate"))]
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(tmp_path / "a" / "model.safetensors", "pt") as b:
        for k in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"):
            assert torch.equal(a.get_tensor(k), b.get_tensor(k).float()), k


@pytest.fixture(scope="module")
def many_experts(tmp_path_factory):
    """One Qwen2-MoE block with 16 experts, top-2, and 4 windows of 16 tokens: some experts get few or no tokens.
    Returns a function making (block, io, FP weights, tokens) for `windows` random windows of `seq_len` tokens,
    the experts' Linears as io.layers."""
    import transformers

    from compressor.blocks import BlockIO, capture_block_inputs
    from compressor.models import Checkpoint, find_blocks, materialize, skeleton

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("moe16") / "m"
    cfg = transformers.Qwen2MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=16,
                                      num_experts_per_tok=2, moe_intermediate_size=64,
                                      shared_expert_intermediate_size=128)
    transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(path)
    def make(windows: int = 4, seq_len: int = 16):
        ids = torch.randint(0, 512, (windows, seq_len), generator=torch.Generator().manual_seed(0))
        model, ckpt = skeleton(path), Checkpoint(path)
        prefix, blocks = find_blocks(model)
        materialize(model, "", ckpt)
        inputs, kwargs = capture_block_inputs(model, blocks[0], ids, 2, torch.device("cpu"))
        layers = {f"{prefix}.0.{n}": m for n, m in blocks[0].named_modules()
                  if isinstance(m, torch.nn.Linear) and ".experts." in n}
        fp = {n: m.weight.data.clone() for n, m in layers.items()}
        return blocks[0], BlockIO(f"{prefix}.0", inputs, kwargs, layers), fp, ids.numel()

    return make


def test_moe_gptq_counts_routed_tokens_and_falls_back(many_experts):
    """Each expert's Hessian counts only the tokens routed to it (the counts add up to top_k x tokens), and the
    ones that saw fewer than min_tokens are rounded to nearest, recorded per layer, with no NaN and no zeroed
    weight."""
    from compressor.blocks import Context
    from compressor.passes import get_pass

    block, io, fp, tokens = many_experts()
    info = get_pass("gptq")
    out = info.fn(block, io, info.config(bits=4, group_size=-1, symmetric=True), Context())
    gates = {n: io.tokens_seen[n] for n in io.layers if n.endswith("gate_proj")}
    assert sum(gates.values()) == 2 * tokens, gates
    fell = [n for n, qw in out.items() if (qw.calibration or {}).get("fallback") == "rtn"]
    assert fell and len(fell) < len(out), {n: io.tokens_seen[n] for n in out}
    for n, qw in out.items():
        w = qw.dequantize()
        err = float((w - fp[n]).norm() / fp[n].norm())
        assert torch.isfinite(w).all() and err < 0.2, f"{n}: rel_err={err:.3g}"
        seen = io.tokens_seen[n]
        assert (qw.calibration or {}).get("tokens") == seen, (n, qw.calibration, seen)
        assert ((qw.calibration or {}).get("fallback") == "rtn") == (seen < 16), (n, seen)
        assert qw.manifest_entry()["calibration"]["tokens"] == seen


def test_moe_lowrank_keeps_unrouted_experts_dense(many_experts):
    """Low-rank onto the utilized subspace: an expert no token reached is kept dense (nothing measures its
    subspace), the others are factorised from their own tokens' second moments, all finite."""
    from compressor.blocks import Context
    from compressor.passes import get_pass

    block, io, fp, _ = many_experts(1, 4)  # 8 routed slots for 16 experts: at least 8 see nothing
    info = get_pass("lowrank")
    out = info.fn(block, io, info.config(method="utilized", params=0.5), Context())
    unrouted = [n for n in io.layers if io.tokens_seen[n] == 0]
    assert unrouted and not set(unrouted) & set(out), unrouted
    assert out, "no expert was factorised"
    for n, lw in out.items():
        assert torch.isfinite(lw.dequantize()).all(), n


def test_unsupported_fused_experts_exit_2(tmp_path, demo_path):
    """Experts whose 3-D tensors are not the standard gate_up/down form (gpt-oss: biases, another layout) are
    refused before any work, with the architecture named; no traceback."""
    import transformers

    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    cfg = transformers.GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2)
    transformers.GptOssForCausalLM(cfg).save_pretrained(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / f).write_bytes((demo_path / f).read_bytes())
    r = run_cli("model", str(tmp_path / "m"), "--recipe", "w4-rtn", "--out", str(tmp_path / "out"), "--samples", "2",
                "--seq-len", "16")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "GptOssForCausalLM" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
