"""compress sweep / report / verify: the flow CI jobs build on. The sweep and the gate run for real (subprocesses,
a tiny random Llama, small evaluation), and the example workflow's commands are checked against the CLI."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from test_cli import assert_error

from compressor.report import pareto

EVAL = ("--max-tokens", "256", "--eval-seq-len", "64")


def test_pareto_front_matches_brute_force():
    pts = [(4.0, 40.0), (3.0, 50.0), (4.2, 39.0), (3.3, 60.0), (2.0, 90.0), (4.0, 41.0), (5.0, 39.5)]
    front = pareto(pts, lower_is_better=True)
    brute = [i for i, (x, y) in enumerate(pts)
             if not any((x2 <= x and y2 <= y) and (x2, y2) != (x, y) for x2, y2 in pts)]
    assert sorted(front) == sorted(brute), (front, brute)
    assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)  # ordered by size
    # higher-is-better (cosine): the same with the sign flipped
    cos = [(x, -y) for x, y in pts]
    assert sorted(pareto(cos, lower_is_better=False)) == sorted(brute)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_llama, small_calib) -> Path:
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    r = run_cli("sweep", str(tiny_llama), "--recipes", "w4-rtn,w8-rtn", "--calib", str(small_calib), "--eval", str(small_calib),
                "--out", str(runs), "--samples", "2", "--seq-len", "32", *EVAL, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert [x["name"] for x in res["runs"]] == ["w4-rtn", "w8-rtn"] and not res["failed"]
    return runs


def test_sweep_records_and_resume(swept, tiny_llama, small_calib):
    base = json.loads((swept / "base" / "record.json").read_text())
    w4 = json.loads((swept / "w4-rtn" / "record.json").read_text())
    w8 = json.loads((swept / "w8-rtn" / "record.json").read_text())
    for rec in (w4, w8):
        for k in ("recipe", "bits_per_weight", "size_bytes", "quality", "compress_seconds", "peak_memory_bytes",
                  "tool_version", "seed", "inputs"):
            assert rec.get(k) is not None, f"{rec['name']}: {k} missing"
        assert rec["inputs"]["evaluation"][0]["sha256"] and rec["inputs"]["model"]["files"]
        assert rec["peak_memory_bytes"] > 100 * 2**20  # a torch process: at least 100 MiB resident
        assert (swept / rec["artifact"] / "compression.json").is_file()
    # more bits, closer to the base model; the random tiny model has a large but finite perplexity
    assert w8["quality"]["kl_to_base"] < w4["quality"]["kl_to_base"], (w8["quality"], w4["quality"])
    assert abs(w8["quality"]["perplexity"] / base["quality"]["perplexity"] - 1) < 0.01
    assert w4["bits_per_weight"] < w8["bits_per_weight"]

    # a second run with the same inputs redoes nothing
    before = {f: f.stat().st_mtime_ns for f in swept.rglob("*") if f.is_file()}
    r = run_cli("sweep", str(tiny_llama), "--recipes", "w4-rtn,w8-rtn", "--calib", str(small_calib), "--eval", str(small_calib),
                "--out", str(swept), "--samples", "2", "--seq-len", "32", *EVAL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kept (finished before)" in r.stderr
    assert {f: f.stat().st_mtime_ns for f in swept.rglob("*") if f.is_file()} == before

    # other inputs: refused with a message, nothing touched
    r = run_cli("sweep", str(tiny_llama), "--recipes", "w4-rtn", "--calib", str(small_calib), "--eval", str(small_calib),
                "--out", str(swept), "--samples", "3", "--seq-len", "32", *EVAL)
    assert_error(r, 2, "holds a finished run with other inputs", "--force")
    assert {f: f.stat().st_mtime_ns for f in swept.rglob("*") if f.is_file()} == before


def test_sweep_bad_input(tmp_path, tiny_llama, small_calib):
    out = tmp_path / "runs"
    assert_error(run_cli("sweep", str(tiny_llama), "--recipes", "w4-rtn,nope", "--eval", str(small_calib), "--out", str(out)),
                 2, "unknown recipe 'nope'")
    assert_error(run_cli("sweep", str(tiny_llama), "--recipes", "w4-rtn", "--eval", str(tmp_path / "missing.txt"),
                         "--out", str(out)), 2, "missing.txt does not exist")
    assert not out.exists()


def test_report_files_table_and_frontier(swept, tmp_path):
    out = tmp_path / "report"
    r = run_cli("report", str(swept), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    for f in ("report.md", "report.html", "quality_vs_bpw.png", "layers.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "quality_vs_bpw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| w")]
    assert [r.split("|")[1].strip() for r in rows] == ["w4-rtn", "w8-rtn"]  # sorted by bits per weight
    # the frontier by perplexity: w4 is smaller, so it is on it; w8 only if its perplexity is lower
    ppl = {n: json.loads((swept / n / "record.json").read_text())["quality"]["perplexity"] for n in ("w4-rtn", "w8-rtn")}
    expect = ["w4-rtn"] + (["w8-rtn"] if ppl["w8-rtn"] < ppl["w4-rtn"] else [])
    assert res["pareto"] == expect, (res["pareto"], ppl)
    assert [r.rstrip(" |").endswith("✓") for r in rows] == [n in expect for n in ("w4-rtn", "w8-rtn")]
    assert any(line.startswith("| base ") for line in md.splitlines())
    assert "(2 windows of 32 tokens, seed 0)" in md  # the calibration the runs drew, as the sweep set it
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html  # self-contained
    assert_error(run_cli("report", str(tmp_path / "none"), "--out", str(out)), 2, "is not a directory")


def test_ci_flow_and_workflow_flags(swept, tiny_llama, small_calib, tmp_path):
    """The example workflow's commands: every `compress` flag it uses exists; then the same three steps (sweep
    above, report, the gate both ways) on the tiny model."""
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "compress.yml").read_text())
    runs = [s["run"] for job in wf["jobs"].values() for s in job["steps"] if "run" in s]
    used = {}
    for line in "\n".join(runs).splitlines():
        line = line.strip()
        if line.startswith("compress "):
            words = shlex.split(re.sub(r"\$\{\{[^}]*\}\}", "X", line))
            used.setdefault(words[1], set()).update(w for w in words if w.startswith("--"))
    assert set(used) == {"sweep", "verify", "report"}, used
    for cmd, flags in used.items():
        helptext = run_cli(cmd, "--help", env={"COLUMNS": "200"}).stdout
        for f in flags:
            assert f in helptext, f"workflow uses `compress {cmd} {f}`, which the CLI does not have"

    art = swept / "w4-rtn" / "artifact"
    kl = json.loads((swept / "w4-rtn" / "record.json").read_text())["quality"]["kl_to_base"]
    gate = ("--data", str(small_calib), "--max-tokens", "256", "--seq-len", "64", "--base", str(tiny_llama), "--json")
    ok = run_cli("verify", str(art), "--max-kl", f"{kl * 1.5:.6g}", *gate)
    assert ok.returncode == 0, ok.stderr[-3000:]
    res = json.loads(ok.stdout)
    assert res["passed"] and abs(res["quality"]["kl_to_base"] - kl) < 1e-6 * max(1, kl)
    bad = run_cli("verify", str(art), "--max-kl", f"{kl * 0.5:.6g}", *gate)
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert json.loads(bad.stdout)["passed"] is False and "verify failed: kl_to_base" in bad.stderr

    # a changed byte fails the hash check (exit 1) without loading; a non-artifact is bad input (exit 2)
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(art, copy)
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text().replace("}", " }", 1))
    r = run_cli("verify", str(copy), "--json")
    assert r.returncode == 1 and "sha256" in r.stderr, r.stderr[-2000:]
    assert_error(run_cli("verify", str(tiny_llama)), 2, "not a compressor artifact")
