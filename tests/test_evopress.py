"""EvoPress (algorithms/evopress.py, measure.py, passes/evopress.py): level switches keep the budget exactly, the search
reaches the DP optimum of an additive problem, the KL fitness against a direct computation on the demo model,
the sub-block influence against known zeros, and the pass end to end in its three spaces (bits: mixed widths in
the artifact; sparsity: mixed sparsities at exactly the target; depth: dropped sub-blocks whose output is 0 in the
loaded artifact), each with a lower fitness than its start."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file, save_file

from compressor import measure
from compressor.algorithms import evopress as E
from compressor.errors import BadInput
from compressor.passes.evopress import Database, search_checkpoint

from conftest import AUSTEN, demo_model_and_windows


def _space(n_per_group=(4, 4, 2), values=(2.0, 3.0, 4.0, 5.0, 6.0)) -> E.LevelSpace:
    sizes, layers = [], []
    for g, n in enumerate(n_per_group):
        for i in range(n):
            layers.append(f"g{g}.l{i}")
            sizes.append(1000 * (g + 1))
    return E.LevelSpace(tuple(layers), tuple(sizes), values)


def test_levels_must_be_equally_spaced():
    with pytest.raises(BadInput, match="equally spaced"):
        E.LevelSpace(("a",), (1,), (2.0, 3.0, 4.0, 6.0))


def test_initial_state_hits_the_target():
    space = _space()
    assert set(E.initial_state(space, 3.0)) == {1}
    assert space.average(E.initial_state(space, 2.5)) == pytest.approx(2.5)
    with pytest.raises(BadInput, match="outside"):
        E.initial_state(space, 7)


def test_switches_keep_the_budget_exactly():
    space = _space()
    rng = torch.Generator().manual_seed(0)
    s = E.initial_state(space, 3.0)
    for _ in range(300):
        t = E.mutate(space, s, rng)
        assert space.average(t) == pytest.approx(3.0, abs=1e-12)
        assert all(0 <= k < len(space.values) for k in t)
        changed = [i for i, (a, b) in enumerate(zip(s, t)) if a != b]
        assert len(changed) <= 6 and len({space.sizes[i] for i in changed}) <= 3  # two switches may cancel
        s = t


def test_search_reaches_the_dp_optimum_of_an_additive_problem():
    """With a fitness that is a sum of per-layer errors, the DP's allocation is the exact optimum. Switches keep
    each size group's total, so the reference is the DP inside every group at the group's budget: the evolution
    reaches it (within 0.1%), at exactly the same budget; the DP over all groups at once is a bound below it."""
    space = _space((6, 6, 4))
    g = torch.Generator().manual_seed(1)
    errors = {}
    for n in space.layers:  # convex, decreasing in bits, layer-specific sensitivity
        a = 10 ** (float(torch.rand(1, generator=g)) * 3 - 1.5)  # sensitivities over three decades
        errors[n] = [a * 2.0 ** (-2 * v) for v in space.values]

    def fitness(state, stage, rng):
        return sum(errors[n][k] for n, k in zip(space.layers, state))

    opt = 0.0
    for group in space.groups:  # the optimum reachable by switches: every group keeps its own budget
        sub = E.LevelSpace(tuple(space.layers[i] for i in group), tuple(space.sizes[i] for i in group), space.values)
        opt += sum(errors[n][k] for n, k in zip(sub.layers, E.dp_levels(sub, errors, 3.0)))
    free = fitness(E.dp_levels(space, errors, 3.0), 0, None)
    assert free <= opt + 1e-12
    state, trace = E.evolve(space, fitness, E.initial_state(space, 3.0), generations=300, offspring=8,
                            survivors=[2, 1], seed=0)
    assert space.average(state) == pytest.approx(3.0, abs=1e-12)
    assert fitness(state, 0, None) <= 1.001 * opt
    assert fitness(E.initial_state(space, 3.0), 0, None) > 1.5 * opt  # the uniform start was clearly worse
    fits = [t["fitness"] for t in trace.to_json()]
    assert all(b <= a + 1e-12 for a, b in zip(fits, fits[1:]))  # deterministic fitness: the parent never worsens


def test_an_interrupted_search_goes_on_from_its_checkpoint(tmp_path):
    """A search stopped after 7 generations and started again with the same checkpoint ends where the
    uninterrupted one does: the same state and the same trace, the fitness noise (drawn from the stage's rng)
    included; the checkpoint then extends to more generations, and a different start ignores it."""
    space = _space((6, 6, 4))
    errors = {n: [(i + 1) * 2.0 ** (-2 * v) for v in space.values] for i, n in enumerate(space.layers)}

    def fitness(state, stage, rng):
        return sum(errors[n][k] for n, k in zip(space.layers, state)) + 1e-3 * float(torch.rand(1, generator=rng))

    start = E.initial_state(space, 3.0)
    run = dict(offspring=6, survivors=[2, 1], seed=3)
    full, full_trace = E.evolve(space, fitness, start, generations=20, **run)
    ck = tmp_path / "search.json"
    E.evolve(space, fitness, start, generations=7, **search_checkpoint(ck), **run)
    assert len(json.loads(ck.read_text())["trace"]) == 7
    resumed, trace = E.evolve(space, fitness, start, generations=20, **search_checkpoint(ck), **run)
    strip = lambda t: [{k: v for k, v in g.items() if k != "seconds"} for g in t.to_json()]  # noqa: E731
    assert resumed == full and strip(trace) == strip(full_trace)
    longer, _ = E.evolve(space, fitness, start, generations=25, **search_checkpoint(ck), **run)
    assert len(json.loads(ck.read_text())["trace"]) == 25
    assert longer == E.evolve(space, fitness, start, generations=25, **run)[0]
    other = tuple(reversed(start))
    _, fresh = E.evolve(space, fitness, other, generations=3, **search_checkpoint(ck), **run)
    assert [g["generation"] for g in fresh.to_json()] == [1, 2, 3]


@pytest.fixture(scope="module")
def demo_fp(demo_path):
    return demo_model_and_windows(demo_path, 3, 24)


@torch.no_grad()
def test_kl_fitness_against_the_full_vocabulary(demo_fp):
    """KL of the coarsened distributions (top-k + the rest) is 0 for the FP weights, at most the full KL (a lower
    bound: coarsening never raises KL) and close to it with k = 256."""
    from compressor.quant import quantize_rtn

    model, ids = demo_fp
    names = ["model.layers.2.mlp.down_proj", "model.layers.4.self_attn.q_proj"]
    fp = {n: model.get_submodule(n).weight.data.clone() for n in names}
    variants = {n: [quantize_rtn(w, 2, 64, False, torch.float16).dequantize().half(), w.half()] for n, w in fp.items()}
    fit = measure.KLFitness(model, ids, names, variants, [3], topk=256)
    try:
        ref_lp = [torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].float(), -1) for w in ids]
        assert fit.kl((1, 1), [0, 1, 2]) == pytest.approx(0.0, abs=2e-4)  # float16 of the FP weights
        got = fit.kl((0, 0), [0, 1, 2])
        fit.set_state((0, 0))
        full = sum(float((lp.exp() * (lp - torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].float(), -1))).sum())
                   for lp, w in zip(ref_lp, ids)) / sum(w.numel() - 1 for w in ids)
        assert 0 < got <= full * (1 + 1e-4)
        assert got >= 0.8 * full
    finally:
        for n, w in fp.items():
            model.get_submodule(n).weight.data = w


@torch.no_grad()
def test_perplexity_fitness_is_the_mean_nll(demo_fp):
    """metric "perplexity": the fitness of a state is the model's mean next-token NLL with those variants (the
    log of its perplexity), equal to a direct cross-entropy for 2-bit RTN of one layer and for its FP weights."""
    import torch.nn.functional as F

    from compressor.passes.evopress import EvoPressConfig
    from compressor.quant import quantize_rtn

    model, ids = demo_fp
    name = "model.layers.4.self_attn.q_proj"
    w = model.get_submodule(name).weight.data.clone()
    fit = measure.KLFitness(model, ids, [name], {name: [quantize_rtn(w, 2, 64, False, torch.float16).dequantize().half(),
                                                   w.half()]}, [3], metric="perplexity")
    try:
        got = []
        for k in (0, 1):
            got.append(fit.kl((k,), [0, 1, 2]))
            nll = sum(float(F.cross_entropy(model(input_ids=x[None]).logits[0, :-1].float(), x[1:], reduction="sum"))
                      for x in ids) / sum(x.numel() - 1 for x in ids)
            assert got[-1] == pytest.approx(nll, rel=1e-5), (k, got[-1], nll)
        assert abs(got[0] - got[1]) > 1e-3  # the state is applied (on 69 tokens 2-bit happens to score lower)
    finally:
        model.get_submodule(name).weight.data = w
    with pytest.raises(BadInput, match="metric"):
        measure.KLFitness(model, ids, [name], {}, [3], metric="ppl")
    assert EvoPressConfig(fitness="perplexity").fitness == "perplexity"


@torch.no_grad()
def test_kl_fitness_in_bfloat16_orders_as_float32(demo_fp):
    """The bfloat16 fitness (autocast on both sides of the KL): its noise floor (the KL of the FP weights,
    measured 9.9e-4) stays under a fifth of 4-bit RTN's KL; it orders RTN widths of ten gate_proj layers across the
    model as float32 does, within 10% of the float32 value."""
    from compressor.quant import quantize_rtn

    model, ids = demo_fp
    names = [f"model.layers.{i}.mlp.gate_proj" for i in range(0, 30, 3)]
    fp = {n: model.get_submodule(n).weight.data.clone() for n in names}
    variants = {n: [*(quantize_rtn(w, b, 64, False, torch.float16).dequantize().half() for b in (2, 3, 4)), w.half()]
                for n, w in fp.items()}
    states = [(k,) * len(names) for k in range(4)]  # all at 2, 3, 4 bits, then the FP weights
    kl = {}
    try:
        for dt in (torch.float32, torch.bfloat16):
            for n, w in fp.items():  # the dense reference is taken from the model as it is when built
                model.get_submodule(n).weight.data = w
            fit = measure.KLFitness(model, ids, names, variants, [3], dtype=dt)
            kl[dt] = [fit.kl(s, [0, 1, 2]) for s in states]
    finally:
        for n, w in fp.items():
            model.get_submodule(n).weight.data = w
    f32, b16 = kl[torch.float32], kl[torch.bfloat16]
    print(f"float32 {f32}\nbfloat16 {b16}")
    assert f32[0] > f32[1] > f32[2] > f32[3] and b16[0] > b16[1] > b16[2] > b16[3]
    assert b16[3] < 0.2 * f32[2], f"bf16 noise floor {b16[3]:.3g} (measured 0.12x) vs 4-bit {f32[2]:.3g}"
    for k in range(3):
        assert abs(b16[k] - f32[k]) <= 0.1 * f32[k], f"{k + 2} bits: bf16 {b16[k]:.4g} vs fp32 {f32[k]:.4g}"
    with pytest.raises(BadInput, match="float64"):
        measure.KLFitness(model, ids[:1], names, variants, [1], dtype=torch.float64)


def test_evopress_with_a_learned_rounding_candidate(tmp_path, demo_path):
    """candidate: flexround on the demo (the MLPs of blocks 0-1, 2..4 bits, 2.5 average, 10 steps a block): the
    database's variants reconstruct the FP block outputs, so all layers at 2 bits from FlexRound's variants give a
    lower KL than from RTN's (the same grid before learning; measured 0.19 vs 0.62); the artifact holds mixed
    widths (2.5 mixes 2 and 3 from the start) at exactly 2.5."""
    import compressor
    from compressor.data import load_windows
    from compressor.models import Checkpoint, load_tokenizer, materialize, skeleton

    targets = r"re:model\.layers\.[0-1]\.mlp\.\w+_proj$"
    calib = [AUSTEN / "northangerabbey.txt"]

    def run(candidate: str, generations: int, extra: str = "") -> tuple[Path, Path]:
        db, out, recipe = tmp_path / f"db-{candidate}", tmp_path / f"art-{candidate}", tmp_path / f"{candidate}.yaml"
        recipe.write_text(
            "version: 1\ncalibration: {samples: 4, seq_len: 48, seed: 0}\npasses:\n"
            f"  - pass: evopress\n    targets: ['{targets}']\n    candidate: {candidate}\n    levels: [2, 3, 4]\n"
            f"    target: 2.5\n    group_size: 64\n    generations: {generations}\n    offspring: 4\n{extra}"
            f"    survivors: [1]\n    stage_windows: [4]\n    fitness_samples: 4\n    fitness_seq_len: 48\n    database: '{db}'\n")
        compressor.compress("demo", str(recipe), out, calib=calib, device="cpu")
        return db, out

    flex_db, out = run("flexround", 3, "    candidate_options: {iters: 10}\n")
    rtn_db, _ = run("rtn", 0)
    meta = json.loads((out / "compression.json").read_text())
    bits = {n: v["bits"] for n, v in meta["layers"].items()}
    sizes = {n: v["shape"][0] * v["shape"][1] for n, v in meta["layers"].items()}
    assert len(bits) == 6 and len(set(bits.values())) > 1
    assert sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values()) == pytest.approx(2.5)

    model = skeleton(demo_path)
    materialize(model, "", Checkpoint(demo_path))
    model.eval()
    names = sorted(bits)
    space = E.LevelSpace(tuple(names), tuple(sizes[n] for n in names), (2.0, 3.0, 4.0))
    windows, _ = load_windows(load_tokenizer(demo_path), calib, 4, 48, 0)
    fp = {n: model.get_submodule(n).weight.data.clone() for n in names}
    kl = {}
    for name, db in (("flexround", flex_db), ("rtn", rtn_db)):
        for n in names:  # the FP weights for this fitness's dense reference
            model.get_submodule(n).weight.data = fp[n].clone()
        d = Database(db, json.loads((db / "meta.json").read_text())["key"], space)
        fit = measure.KLFitness(model, windows, names, {n: d.load_layer(n) for n in names}, [4])
        kl[name] = fit.kl((0,) * len(names), [0, 1, 2, 3])
    print(kl)
    assert kl["flexround"] < 0.5 * kl["rtn"], kl  # measured 0.191 vs 0.624


def test_evopress_pass_end_to_end(tmp_path, demo_path):
    """On the demo model (the MLPs of blocks 0-3, RTN g64 at 2..4 bits, 3.0 average): the artifact has mixed
    widths in compressed-tensors config groups, exactly 3.0 nominal bits on average over the target layers, the
    assignment in recipe.yaml, and the search's fitness ends below the uniform W3 start's on the same windows."""
    import yaml

    import compressor

    targets = r"re:model\.layers\.[0-3]\.mlp\.\w+_proj$"
    db = tmp_path / "db"
    recipe = tmp_path / "evo.yaml"
    recipe.write_text(
        "version: 1\ncalibration: {samples: 4, seq_len: 48, seed: 0}\npasses:\n"
        f"  - pass: evopress\n    targets: ['{targets}']\n    candidate: rtn\n    levels: [2, 3, 4]\n"
        "    target: 3.0\n    group_size: 64\n    generations: 6\n    offspring: 4\n"
        f"    survivors: [1]\n    stage_windows: [4]\n    fitness_samples: 4\n    fitness_seq_len: 48\n    database: '{db}'\n")
    out = tmp_path / "art"
    compressor.compress("demo", str(recipe), out, calib=[AUSTEN / "northangerabbey.txt"], device="cpu")
    meta = json.loads((out / "compression.json").read_text())
    bits = {n: v["bits"] for n, v in meta["layers"].items()}
    assert len(bits) == 12
    sizes = {n: v["shape"][0] * v["shape"][1] for n, v in meta["layers"].items()}
    assert sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values()) == pytest.approx(3.0)
    assert len(set(bits.values())) > 1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in qc["config_groups"].values()} == set(bits.values())
    plan = yaml.safe_load((out / "recipe.yaml").read_text())["passes"][0]["assignment"]
    assert {n: v["bits"] for n, v in plan.items()} == bits
    trace = json.loads(next(db.glob("trace-*.json")).read_text())
    fits = [g["fitness"] for g in trace["generations"]]
    assert all(b <= a + 1e-12 for a, b in zip(fits, fits[1:]))  # one stage on the whole pool: deterministic
    # the uniform start's fitness on the same pool, computed here from the database
    from compressor.models import Checkpoint, materialize, skeleton

    model = skeleton(demo_path)
    materialize(model, "", Checkpoint(demo_path))
    names = sorted(bits)
    space = E.LevelSpace(tuple(names), tuple(sizes[n] for n in names), (2.0, 3.0, 4.0))
    d = Database(db, json.loads((db / "meta.json").read_text())["key"], space)
    assert d.complete()
    from compressor.data import load_windows
    from compressor.models import load_tokenizer

    windows, _ = load_windows(load_tokenizer(demo_path), [AUSTEN / "northangerabbey.txt"], 4, 48, 0)
    fit = measure.KLFitness(model, windows, names, {n: d.load_layer(n) for n in names}, [4])
    start = fit.kl(E.initial_state(space, 3.0), [0, 1, 2, 3])
    final = fit.kl(tuple(space.values.index(float(bits[n])) for n in names), [0, 1, 2, 3])
    assert final == pytest.approx(fits[-1], rel=1e-4)
    assert final < 0.97 * start, (final, start)

    # an interrupted build resumes: block 2's files gone, block 3's up_proj from another database (a foreign key),
    # no meta.json. The rebuild redoes those two blocks (a block's layers are built together), keeps the other
    # blocks' files as they are, and restores the rest bit for bit.
    before = {f.name: (f.stat().st_mtime_ns, load_file(str(f))) for f in db.glob("*.safetensors")}
    for f in db.glob("model.layers.2.*.safetensors"):
        f.unlink()
    foreign = db / "model.layers.3.mlp.up_proj.safetensors"
    save_file(before[foreign.name][1], str(foreign), metadata={"key": "another"})
    (db / "meta.json").unlink()
    again = recipe.read_text().replace("generations: 6", "generations: 0")
    recipe.write_text(again)
    compressor.compress("demo", str(recipe), tmp_path / "art2", calib=[AUSTEN / "northangerabbey.txt"], device="cpu")
    assert d.complete()
    for f in db.glob("*.safetensors"):
        rebuilt = f.name.startswith(("model.layers.2.", "model.layers.3."))
        assert (f.stat().st_mtime_ns != before[f.name][0]) == rebuilt, f.name
        t = load_file(str(f))
        assert all(torch.equal(t[k], v) for k, v in before[f.name][1].items()), f.name


def test_config_checks_each_space():
    from compressor.passes.evopress import EvoPressConfig

    assert EvoPressConfig(space="sparsity", target=0.5).level_values == pytest.approx([0.1 * k for k in range(10)])
    assert EvoPressConfig(space="depth", target=0.25).level_values == [0.0, 1.0]
    for bad, match in [({"space": "depth", "target": 0.25, "levels": [0, 1]}, "no levels"),
                       ({"space": "depth", "target": 1.5}, "fraction of sub-blocks"),
                       ({"space": "sparsity", "target": 0.5, "levels": [0.5, 1.0, 1.5]}, r"\[0, 1\)"),
                       ({"space": "sparsity", "target": 0.95}, "outside the levels"),
                       ({"space": "bits", "target": 3.0, "levels": [2.5, 3.5]}, "whole bit widths"),
                       ({"space": "sparsity", "target": 0.5, "candidate_options": {"damp": 0.1}}, "space 'bits' only")]:
        with pytest.raises(ValueError, match=match):
            EvoPressConfig(**bad)


@torch.no_grad()
def test_subblock_influence_is_zero_for_a_zeroed_subblock(demo_fp):
    """1 - cos(stream before, stream after): exactly 0 for a sub-block whose output projection is 0 (the stream
    passes unchanged), positive for the intact ones, and the same as a direct computation from the model's hidden
    states for a whole block (attention then MLP: the block's in and out streams bound the two)."""
    from compressor.models import find_blocks

    model, ids = demo_fp
    _, blocks = find_blocks(model)
    o, d = model.model.layers[2].self_attn.o_proj, model.model.layers[5].mlp.down_proj
    saved = o.weight.data.clone(), d.weight.data.clone()
    try:
        o.weight.data.zero_()
        d.weight.data.zero_()
        infl = measure.subblock_influence(model, blocks, ids)
        hs = model(input_ids=ids[0][None], output_hidden_states=True).hidden_states
    finally:
        o.weight.data, d.weight.data = saved
    assert len(infl) == 2 * len(blocks)
    assert abs(infl[(2, "self_attn")]) < 1e-6 and abs(infl[(5, "mlp")]) < 1e-6
    assert all(v > 1e-5 for k, v in infl.items() if k not in {(2, "self_attn"), (5, "mlp")})
    # block 2 with its attention zeroed: the MLP's stream before is the block's input hidden state
    cos = torch.nn.functional.cosine_similarity(hs[2][0].float(), hs[3][0].float(), dim=-1).mean()
    o.weight.data.zero_()
    try:
        single = measure.subblock_influence(model, blocks, ids[:1])
    finally:
        o.weight.data = saved[0]
    assert single[(2, "mlp")] == pytest.approx(1 - float(cos), abs=1e-5)


def _evo_recipe(tmp_path, body: str) -> str:
    recipe = tmp_path / "evo.yaml"
    recipe.write_text("version: 1\ncalibration: {samples: 4, seq_len: 48, seed: 0}\npasses:\n  - pass: evopress\n" + body +
                      "    generations: 4\n    offspring: 4\n    survivors: [1]\n    stage_windows: [4]\n"
                      f"    fitness_samples: 4\n    fitness_seq_len: 48\n    database: '{tmp_path / 'db'}'\n")
    return str(recipe)


def test_evopress_sparsity_end_to_end(tmp_path):
    """The MLPs of blocks 0-3 at levels 0..0.75 (steps of 0.25), 50% overall: the artifact's layers are pruned by
    magnitude at mixed levels, exactly 50% of their weights in all, in sparse-bitmask; the search ends below the
    uniform 50% start's fitness (both on the whole pool, in the trace)."""
    import compressor

    targets = r"re:model\.layers\.[0-3]\.mlp\.\w+_proj$"
    recipe = _evo_recipe(tmp_path, f"    space: sparsity\n    targets: ['{targets}']\n    levels: [0, 0.25, 0.5, 0.75]\n"
                                   "    target: 0.5\n")
    out = tmp_path / "art"
    compressor.compress("demo", recipe, out, calib=[AUSTEN / "northangerabbey.txt"], device="cpu")
    meta = json.loads((out / "compression.json").read_text())
    layers = meta["layers"]
    assert len(layers) == 12
    sizes = {n: v["shape"][0] * v["shape"][1] for n, v in layers.items()}
    sp = {n: v["sparsity"] for n, v in layers.items()}
    assert sum(sp[n] * sizes[n] for n in sp) / sum(sizes.values()) == pytest.approx(0.5, abs=1e-6)
    assert len({round(v, 4) for v in sp.values()}) > 1
    model = compressor.load(out)
    w = model.get_submodule(next(iter(sp))).weight
    assert float((w == 0).float().mean()) == pytest.approx(sp[next(iter(sp))], abs=1e-4)
    trace = json.loads(next((tmp_path / "db").rglob("trace-*.json")).read_text())
    assert trace["final_fitness_pool"] < trace["start_fitness_pool"]


def test_evopress_depth_end_to_end(tmp_path, demo_path):
    """Drop 25% of the demo's 60 sub-blocks (15): the start is the cosine choice, the search ends at or below its
    fitness, and the loaded artifact's logits equal the FP model's with exactly the dropped sub-blocks' output
    projections set to 0 (every Linear of a dropped sub-block is stored 100% pruned)."""
    import compressor
    from compressor.models import Checkpoint, materialize, skeleton

    recipe = _evo_recipe(tmp_path, "    space: depth\n    target: 0.25\n")
    out = tmp_path / "art"
    compressor.compress("demo", recipe, out, calib=[AUSTEN / "northangerabbey.txt"], device="cpu")
    meta = json.loads((out / "compression.json").read_text())
    dropped = sorted(n for n, v in meta["layers"].items() if v.get("sparsity") == 1.0)
    units = sorted({n.rsplit(".", 1)[0] for n in dropped})
    assert len(units) == 15
    for u in units:  # every Linear of the sub-block, and none of a kept one
        kids = 4 if u.endswith("self_attn") else 3
        assert sum(n.startswith(u + ".") for n in dropped) == kids
    trace = json.loads(next((tmp_path / "db").rglob("trace-*.json")).read_text())
    assert sorted(trace["cosine_choice"]) != [] and trace["final_fitness_pool"] <= trace["start_fitness_pool"] + 1e-9
    ref = skeleton(demo_path)
    materialize(ref, "", Checkpoint(demo_path))
    stored = getattr(torch, meta["storage_dtype"])  # the kept layers, embeddings and norms as the artifact stores them
    for p in ref.parameters():
        p.data = p.data.to(stored).float()
    for u in units:
        proj = "o_proj" if u.endswith("self_attn") else "down_proj"
        ref.get_submodule(f"{u}.{proj}").weight.data.zero_()
    ids = torch.tensor([[1, 504, 3037, 314, 253, 3289, 28, 1812, 2364, 30]])
    with torch.no_grad():
        a = compressor.load(out)(input_ids=ids).logits
        b = ref(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
