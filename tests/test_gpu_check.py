"""experiments/gpu_check.py, the script a lent GPU runs in one call, run here on the CPU at 32 px."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~6 minutes: two teachers, six distillations, four benches, three resume runs
def test_the_gpu_script_runs_every_cell_and_writes_its_tables(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/gpu_check.py"), "--out", str(out), "--cpu",
                           "--image-size", "32", "--iterations", "1", "--syn-steps", "2", "--num-train", "40",
                           "--budget", "10", "--teacher-epochs", "1", "--numerics", "fp32", "bf16", "fp32-fwd"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert [(r["method"], r["numerics"]) for r in results["distill"]] == [
        ("repblend", "fp32"), ("repblend", "bf16"), ("repblend", "fp32-fwd"), ("lors", "fp32"), ("lors", "bf16"),
        ("lors", "fp32-fwd")]
    assert [(r["method"], r["numerics"]) for r in results["bench"]] == [  # no bench cell for forward mode
        ("repblend", "fp32"), ("repblend", "bf16"), ("lors", "fp32"), ("lors", "bf16")]
    for r in results["distill"]:
        assert r["sec_per_iter"] > 0 and r["peak_allocated_mb"] > 0 and r["iterations"] == 1
        assert r["hardware"]["precision"] == ("bf16-mixed" if r["numerics"] == "bf16" else "32-true")
    for r in results["bench"]:
        assert r["speedup"] > 0
        if r["numerics"] == "fp32":
            assert r["grad_max_rel_diff"] < 1e-5  # the two paths agree in fp32
    assert results["resume"]["bit_identical"]
    table = (out / "gpu_check.md").read_text()
    for heading in ("### `mmdd distill` end to end", "### `mmdd bench`", "### Resume"):
        assert heading in table
