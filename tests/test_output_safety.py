"""Issue 28, the output side: no run deletes or silently replaces what the user did not ask it to. `--force`
replaces only one of our artifacts (never the source model, a directory holding it, `.`, `/`, `~` or an
ancestor of the current directory); a run that commits second does not replace the first; stale temporary
siblings of killed runs are cleaned; unwritable outputs and bad sizes are exit 2 before any work; a sweep
stays inside its --out and checks every recipe's targets first. Real CLI runs (tiny_llama) and the real
ArtifactWriter."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from test_cli import FAST, assert_error, assert_nothing_left, compress_tiny, leftovers, snapshot, write_recipe

from compressor.artifact.writer import ArtifactWriter
from compressor.errors import BadInput


@pytest.fixture
def model_copy(tmp_path, tiny_llama) -> Path:
    """A copy of tiny_llama the test may lose (if a bug deletes it)."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "m"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llama, small_calib) -> Path:
    """A finished artifact of tiny_llama (copied by the tests that replace one)."""
    out = tmp_path_factory.mktemp("art") / "a"
    r = compress_tiny(tiny_llama, out, "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def dead_pid() -> int:
    """The PID of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------- --force

def test_force_never_replaces_the_source_model(tmp_path, model_copy, small_calib):
    before = snapshot(model_copy)
    r = compress_tiny(model_copy, model_copy, "--force", "--calib", str(small_calib))
    assert_error(r, 2, f"--out {model_copy} is the source model")
    assert snapshot(model_copy) == before and leftovers(model_copy) == []
    link = tmp_path / "link"  # the same directory through a symbolic link
    link.symlink_to(model_copy)
    assert_error(compress_tiny(model_copy, link, "--force"), 2, f"--out {link} is the source model")
    assert snapshot(model_copy) == before and link.is_symlink()


def test_force_never_replaces_a_directory_holding_the_model(tmp_path, tiny_llama, small_calib):
    proj = tmp_path / "proj"
    shutil.copytree(tiny_llama, proj / "model")
    (proj / "notes").mkdir()
    (proj / "notes" / "todo.txt").write_text("precious\n")
    before = snapshot(proj)
    r = compress_tiny(proj / "model", proj, "--force", "--calib", str(small_calib))
    assert_error(r, 2, f"--out {proj} contains the source model")
    assert snapshot(proj) == before and leftovers(proj) == []


def test_force_refuses_a_directory_that_is_not_an_artifact(tmp_path, tiny_llama, small_calib):
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "keep.txt").write_text("precious\n")
    (other / "compression.json").write_text('{"tool": "something else"}')  # not ours
    before = snapshot(other)
    r = compress_tiny(tiny_llama, other, "--force", "--calib", str(small_calib))
    assert_error(r, 2, f"--out {other} is not a compressor artifact", "--force replaces only an artifact")
    assert snapshot(other) == before and leftovers(other) == []


def test_force_replaces_an_artifact_and_an_empty_directory(tmp_path, tiny_llama, artifact, small_calib):
    out = Path(shutil.copytree(artifact, tmp_path / "a"))
    (out / "recipe.yaml").write_text("old\n")
    r = compress_tiny(tiny_llama, out, "--force", "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "recipe.yaml").read_text() != "old\n" and leftovers(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    r = compress_tiny(tiny_llama, empty, "--force", "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (empty / "compression.json").is_file() and leftovers(empty) == []


@pytest.mark.parametrize("out, what", [(".", "the current directory"), ("..", "an ancestor of the current directory"),
                                       ("/", "the root directory"), ("~", "the home directory")])
def test_force_never_replaces_cwd_root_home_or_ancestors(tmp_path, tiny_llama, out, what):
    """`run_cli` runs in the checkout: `.` is the checkout, `..` its parent; HOME is set to a scratch directory."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("precious\n")
    before = snapshot(ROOT / "compressor")
    arg = str(home) if out == "~" else out
    r = run_cli("model", str(tiny_llama), "--recipe", "w4-rtn", "--out", arg, *FAST, "--force", env={"HOME": str(home)})
    assert_error(r, 2, f"--out {arg} is {what}")
    assert snapshot(ROOT / "compressor") == before and (home / "keep.txt").read_text() == "precious\n"


# ---------------------------------------------------------------------------------------------- two runs, one output

def test_a_run_that_commits_second_does_not_replace_the_first(tmp_path, tiny_llama, small_calib):
    """Run A (the real writer, in this process) starts; run B (a real CLI run) writes the output before A commits:
    A's commit is refused, B's artifact stays, nothing of A is left."""
    out = tmp_path / "out"
    with pytest.raises(BadInput, match="written by another run"):
        with ArtifactWriter(out) as a:
            a.write_text("recipe.yaml", "run A\n")
            r = compress_tiny(tiny_llama, out, "--calib", str(small_calib))
            assert r.returncode == 0, r.stderr[-3000:]
            winner = snapshot(out)
            a.commit()
    assert snapshot(out) == winner and leftovers(out) == []


def test_a_forced_run_that_commits_second_replaces_atomically(tmp_path, tiny_llama, small_calib):
    """With --force the second commit replaces the first's artifact (move aside, rename in, delete the old), but
    still not a directory that is not an artifact."""
    out = tmp_path / "out"
    with ArtifactWriter(out, force=True) as a:
        a.write_text("compression.json", json.dumps({"tool": "compressor", "run": "A"}))
        r = compress_tiny(tiny_llama, out, "--calib", str(small_calib))
        assert r.returncode == 0, r.stderr[-3000:]
        a.commit()
    assert json.loads((out / "compression.json").read_text())["run"] == "A"
    assert not (out / "model.safetensors").exists() and leftovers(out) == []  # B's artifact is gone as a whole

    other = tmp_path / "other"
    with pytest.raises(BadInput, match="not a compressor artifact"):
        with ArtifactWriter(other, force=True) as a:
            other.mkdir()
            (other / "keep.txt").write_text("precious\n")
            a.commit()
    assert snapshot(other) == {"keep.txt": b"precious\n"} and leftovers(other) == []


def test_two_concurrent_runs_one_wins(tmp_path, tiny_llama, small_calib):
    """Two real runs to one output at once: one exits 0, the other 2 naming the output; the winner is intact."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "compressor.cli", "model", str(tiny_llama), "--recipe", "w4-rtn", "--out", str(out),
           *FAST, "--calib", str(small_calib), "--json"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    results = [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(c, e[-1500:]) for c, _, e in results]
    loser = next(r for r in results if r[0] == 2)
    assert str(out) in loser[2] and "Traceback" not in loser[2]
    winner = json.loads(next(r for r in results if r[0] == 0)[1])
    assert winner["artifact"] == str(out) and (out / "compression.json").is_file() and leftovers(out) == []


# ---------------------------------------------------------------------------------------------- killed runs

def test_stale_siblings_of_dead_runs_are_cleaned(tmp_path, tiny_llama, artifact, small_calib):
    out = Path(shutil.copytree(artifact, tmp_path / "out"))
    dead = dead_pid()
    for kind in ("tmp", "old"):
        (tmp_path / f".out.{kind}-{dead}" / "parts").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getpid()}"  # a run in progress (this process is alive): kept
    live.mkdir()
    r = compress_tiny(tiny_llama, out, "--force", "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-3000:]
    assert leftovers(out) == [live.name]


def test_orphaned_old_output_is_put_back(tmp_path, tiny_llama, artifact):
    """A run killed between moving the old output aside and renaming the new one in: the next run finds the
    previous artifact back in place (and, without --force, refuses to replace it)."""
    out = tmp_path / "out"
    old = Path(shutil.copytree(artifact, tmp_path / f".out.old-{dead_pid()}"))
    before = snapshot(old)
    assert_error(compress_tiny(tiny_llama, out), 2, f"output {out} already exists")
    assert snapshot(out) == before and leftovers(out) == []


def test_orphaned_old_that_is_no_artifact_is_removed(tmp_path, tiny_llama, small_calib):
    """A dead run's `.out.old-PID` that is not one of our artifacts is not put back as the output: it is removed and
    the run writes its artifact."""
    out = tmp_path / "out"
    (tmp_path / f".out.old-{dead_pid()}").mkdir()
    r = compress_tiny(tiny_llama, out, "--calib", str(small_calib))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "compression.json").is_file() and leftovers(out) == []


# ---------------------------------------------------------------------------------------------- unwritable outputs

def test_out_under_proc_or_a_file_is_refused_before_work(tmp_path, tiny_llama):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, needle in ((Path("/proc/nodir/art"), "cannot write in /proc"), (afile / "art", f"{afile} is not a directory")):
        assert_error(compress_tiny(tiny_llama, out), 2, f"--out {out}", needle)
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_out_under_a_read_only_parent_is_refused(tmp_path, tiny_llama):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_error(compress_tiny(tiny_llama, ro / "art"), 2, f"--out {ro / 'art'}", f"cannot write in {ro}")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("cmd, flag, name", [("utilization", "--out", "u.json"), ("utilization", "--plot", "p.png"),
                                             ("sensitivity", "--out", "s.json")])
def test_result_file_in_a_missing_directory_is_refused_before_work(tmp_path, tiny_llama, cmd, flag, name):
    target = tmp_path / "nodir" / name
    r = run_cli(cmd, str(tiny_llama), *FAST, flag, str(target), "--calib", str(tmp_path / "never-read.txt"))
    assert_error(r, 2, f"{flag} {target}", "does not exist")  # before the calibration file is even looked at
    assert not (tmp_path / "nodir").exists()


# ---------------------------------------------------------------------------------------------- sweep

def sweep_cli(model: Path, recipes: str, out: Path, calib: Path) -> subprocess.CompletedProcess:
    return run_cli("sweep", str(model), "--recipes", recipes, "--calib", str(calib), "--eval", str(calib),
                   "--out", str(out), *FAST, "--max-tokens", "64", "--eval-seq-len", "32")


@pytest.mark.parametrize("fname", ["...yaml", "..yaml", ".hidden.yaml"])
def test_sweep_run_names_stay_inside_out(tmp_path, tiny_llama, small_calib, fname):
    """`...yaml` has the stem `..`: its run went to --out's parent."""
    recipe = write_recipe(tmp_path / fname, (ROOT / "recipes" / "w4-rtn.yaml").read_text())
    out = tmp_path / "sw" / "runs"
    out.parent.mkdir()
    assert_error(sweep_cli(tiny_llama, str(recipe), out, small_calib), 2, f"recipe {recipe}", "not a plain name")
    assert list(out.parent.iterdir()) == []


def test_sweep_run_directory_linking_outside_is_refused(tmp_path, tiny_llama, small_calib):
    out, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "w4-rtn").symlink_to(elsewhere)
    assert_error(sweep_cli(tiny_llama, "w4-rtn", out, small_calib), 2, f"run directory {out / 'w4-rtn'}",
                 "outside --out")
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["w4-rtn"]


def test_sweep_checks_every_recipes_targets_before_any_run(tmp_path, tiny_llama, small_calib):
    bad = write_recipe(tmp_path / "bad.yaml", "version: 1\npasses:\n  - pass: rtn\n    bits: 4\n"
                       "    targets: ['re:nothing\\.here']\n")
    out = tmp_path / "runs"
    r = sweep_cli(tiny_llama, f"w4-rtn,{bad}", out, small_calib)
    assert_error(r, 2, "recipe bad", "pass 1 (rtn)", "select no Linear")
    assert_nothing_left(out)
