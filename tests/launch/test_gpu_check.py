"""launch/gpu_check.sh: the plan and its 7-minute budget, the report's status rules, and the whole check in --quick
mode on this machine (CPU: the gpu tests skip themselves, the rest passes at tiny shapes)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bupo import gpu_check, gpu_report

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "gpu_check.sh"
ORDER = ["env", "gpu_tests", "kernel_bench", "bench_step", "e2e", "report"]


def sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_plan_fits_seven_minutes_in_the_fixed_order():
    proc = sh("--plan")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" ", 2) for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows[:-1]] == ORDER
    limits = [int(r[1]) for r in rows[:-1]]
    assert all(r[2].startswith(f"timeout -k 5 {r[1]} ") for r in rows[:-1])
    assert sum(limits) + 5 * len(limits) <= 420  # even if every part needs timeout's KILL after its TERM
    assert rows[-1] == ["total", str(sum(limits))]


def test_help_and_usage_errors():
    assert sh("--help").returncode == 0 and "--quick" in sh("--help").stdout
    for args, words in [((), "give an output folder"), (("--bogus", "x"), "unknown option --bogus"),
                        (("a", "b"), "one OUT_DIR only"), (("--wheels", "/no/such/dir", "x"), "is not a folder")]:
        proc = sh(*args)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)


def _fake_check(out: Path, runs: dict[str, str], results: dict[str, dict]) -> dict:
    (out / "parts").mkdir(parents=True)
    (out / "logs").mkdir()
    for name, run in runs.items():
        (out / "parts" / f"{name}.run").write_text(run)
        (out / "parts" / f"{name}.cmd").write_text(f"timeout -k 5 9 python -m bupo.gpu_check {name}")
        (out / "logs" / f"{name}.log").write_text("line 1\r\nprogress 10%\rprogress 100%\nlast line\n")
    for name, res in results.items():
        (out / "parts" / f"{name}.json").write_text(json.dumps({"notes": [], "facts": {}, "runs": [], **res}))
    rc = gpu_report.main([str(out), "--mode", "full", "--started", "2026-01-01T00:00:00+00:00",
                          "--command", "bash launch/gpu_check.sh x"])
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# BuPO GPU check (full)")
    assert rc == (0 if rep["ok"] else 1)
    return {p["name"]: p for p in rep["parts"]}


def test_report_status_rules(tmp_path):
    run = "rc={} seconds=1.5 limit=9 started=2026-01-01T00:00:01+00:00"
    parts = _fake_check(tmp_path, {"env": run.format(0), "gpu_tests": run.format(124), "kernel_bench": run.format(1),
                                   "bench_step": run.format(137), "e2e": run.format(1)},
                        {"env": {"status": "passed", "reason": ""}, "gpu_tests": {"status": "running"},
                         "kernel_bench": {"status": "failed", "reason": "naive fwd: skip: OutOfMemoryError"},
                         "e2e": {"status": "running"}})
    assert [p for p in parts] == ORDER
    assert parts["env"]["status"] == "passed" and parts["env"]["seconds"] == 1.5
    assert parts["gpu_tests"]["status"] == parts["bench_step"]["status"] == "timeout"
    assert parts["kernel_bench"]["status"] == "failed" and "OutOfMemoryError" in parts["kernel_bench"]["reason"]
    assert parts["e2e"]["status"] == "failed" and "before the part wrote its result" in parts["e2e"]["reason"]
    assert parts["env"]["log_tail"] == "line 1\nprogress 100%\nlast line"  # the last frame of a progress bar
    assert parts["env"]["command"] == "timeout -k 5 9 python -m bupo.gpu_check env"


def test_report_marks_parts_never_reached(tmp_path):
    parts = _fake_check(tmp_path, {"env": "rc=0 seconds=1 limit=9 started=x"}, {"env": {"status": "skipped",
                                                                                        "reason": "why"}})
    assert parts["env"]["status"] == "skipped" and parts["env"]["reason"] == "why"
    assert all(parts[n]["status"] == "not run" for n in ORDER[1:-1])


@pytest.mark.slow
def test_quick_check_runs_every_part(tmp_path):
    out = tmp_path / "check"
    proc = sh("--quick", str(out), timeout=900)
    report = json.loads((out / "report.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == ORDER
    for p in report["parts"]:
        assert p["status"] in ("passed", "skipped"), (p["name"], p["status"], p["reason"], p["log_tail"])
        assert p["status"] == "passed" or p["reason"], p["name"]  # a skip says why
        assert p["seconds"] is not None and p["timeout_s"] and p["command"].startswith("timeout -k 5 ")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"] and report["mode"] == "quick" and report["started"] and report["finished"]
    assert report["environment"]["torch"] and report["environment"]["pkg:pytest"] != "not installed"
    if not report["environment"]["cuda_available"]:
        assert parts["gpu_tests"]["status"] == "skipped" and "no CUDA" in parts["gpu_tests"]["reason"]
    gpu_tests = json.loads((out / "parts" / "gpu_tests.json").read_text())
    if importlib.util.find_spec("vllm") is None:  # said, not silently left out
        assert any("vllm is not importable" in note for note in gpu_tests["notes"]), gpu_tests["notes"]
    else:
        assert gpu_tests["facts"]["vllm_tests"].get("passed"), gpu_tests["facts"]
    rows = parts["kernel_bench"]["runs"][0]["result"]["results"]
    assert {(r["provider"], r["mode"]) for r in rows if r["status"] == "ok"} >= {("naive", "fwd"), ("naive", "fwdbwd")}
    assert parts["bench_step"]["runs"][0]["result"]["phase_one_s"] > 0
    e2e = parts["e2e"]["facts"]
    assert [s["step"] for s in e2e["steps"]] == [1, 2, 3] and e2e["first_step_of_second_process"] == 3
    assert e2e["checkpoints"] == ["step_000002", "step_000003"] and e2e["final_loads"]
    assert [r["command"].split()[-1] for r in parts["e2e"]["runs"]] == ["--trainer.total_steps=2",
                                                                        "--trainer.total_steps=3"]
    md = (out / "report.md").read_text()
    assert all(f"{name}: " in md for name in ORDER) and "bupo.bench.step" in md and "bupo.kernels.bench" in md


def test_a_command_that_runs_out_of_time_makes_the_part_a_timeout(tmp_path):
    args = argparse.Namespace(part="e2e", out=str(tmp_path), budget=4.5, quick=True)
    part = gpu_check.Part(args)
    rec = part.run(["sleep", "30"], commands_left=4)  # gets 2 x its share of the 1.5 s left: 1 s
    assert rec["timed_out"] and rec["seconds"] < 10 and gpu_check.failed_run(rec) == "`sleep` timed out after 1 s"
    assert part.finish("failed", gpu_check.failed_run(rec)) == 1
    saved = json.loads((tmp_path / "parts" / "e2e.json").read_text())
    assert saved["status"] == "timeout" and saved["runs"][0]["command"] == "sleep 30"
    assert "lines" not in saved["runs"][0]  # the whole output stays in the log


def test_junit_counts_of_a_real_pytest_run(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef boom():\n    raise RuntimeError('x')\n\ndef test_ok():\n    pass\n\n"
        "def test_fail():\n    assert 0\n\ndef test_err(boom):\n    pass\n\n@pytest.mark.skip(reason='needs CUDA')\n"
        "def test_skip():\n    pass\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={tmp_path / 'j.xml'}",
                    "test_x.py"], cwd=tmp_path, capture_output=True, timeout=120)
    counts = gpu_check.junit_counts(tmp_path / "j.xml")
    assert {k: counts[k] for k in ("passed", "failure", "error", "skipped")} == dict.fromkeys(
        ("passed", "failure", "error", "skipped"), 1)
    assert counts["skip_reasons"] == {"needs CUDA": 1}
    assert counts["failed_tests"] == ["test_x::test_fail", "test_x::test_err"]
