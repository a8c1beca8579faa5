"""benchmarks/gpu_check.py, the prepared GPU check, cannot rot: CI runs its dry mode (every step, tiny,
on the CuPy stand-in) and reads the summary; a step past its limit is stopped and marked so."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_the_dry_run_runs_every_step_and_logs_each(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--dry-run",
                           "--budget", "600"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    names = [s["name"] for s in gpu_check.steps(tmp_path, True, None)]
    assert names == ["env", "kernel_tests", "backend_tests", "layout", "conv_speed", "train_speed", "d2l"]
    summary = (tmp_path / "summary.md").read_text()
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["step"] for r in rows] == names
    for r in rows:
        assert f"| {r['step']} | {r['status']} |" in summary
        log = (tmp_path / r["log"]).read_text()
        assert log.startswith("$ "), r["log"]
        assert r["status"] == "ok", f"{r['step']}: {r['status']}\n{log[-3000:]}"
        assert not r["result"].startswith("no "), f"{r['step']}: {r['result']}"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dry run on the CPU stand-in" in summary
    assert "passed" in rows[1]["result"] and "passed" in rows[2]["result"]
    assert "CHWN" in rows[3]["result"] and "test top-1" in rows[6]["result"]


def test_a_step_past_its_limit_is_stopped_and_marked(tmp_path):
    step = dict(name="sleeper", env={}, parse=gpu_check.parse_pytest,
                cmd=[sys.executable, "-c", "import subprocess, sys, time; "
                     "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    row = gpu_check.run_step(step, tmp_path, limit=2)
    assert row["status"] == "time limit (2 s)" and row["seconds"] < 30
    assert row["result"].startswith("no pytest summary")
    assert (tmp_path / "sleeper.log").read_text().startswith("$ ")
    # a step that reports as it goes (the d2l run) is fine stopped at its limit, once it reported
    (tmp_path / "d2l_run").mkdir()
    (tmp_path / "d2l_run" / "history.json").write_text("stale, from an earlier run")
    step = dict(name="d2l", env={}, parse=gpu_check.parse_d2l, limit_ok=True, fresh=["d2l_run"],
                cmd=[sys.executable, "-c", "import json, os, time; os.makedirs('{0}', exist_ok=True); "
                     "json.dump([dict(epoch=1, val_top1=0.5, images_per_s=9.0)], open('{0}/history.json', 'w')); "
                     "time.sleep(60)".format(tmp_path / "d2l_run")])
    row = gpu_check.run_step(step, tmp_path, limit=3)
    assert row["status"] == "ok (stopped at its limit, 3 s)", row
    assert row["result"].startswith("1 epoch(s): test top-1 50.00% after epoch 1")
    step["cmd"] = [sys.executable, "-c", "import time; time.sleep(60)"]   # stopped before its first epoch
    row = gpu_check.run_step(step, tmp_path, limit=2)
    assert row["status"] == "time limit (2 s)" and row["result"].startswith("no result")


def test_a_failing_step_is_marked_and_the_unknown_step_named(tmp_path, capsys):
    step = dict(name="fails", env={}, parse=gpu_check.parse_env, cmd=[sys.executable, "-c", "raise SystemExit(3)"])
    assert gpu_check.run_step(step, tmp_path, limit=60)["status"] == "failed (exit 3)"
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--steps", "env,bogus"])
    assert "unknown step(s) ['bogus']" in capsys.readouterr().err
