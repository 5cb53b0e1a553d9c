"""The benchmark scripts run end to end in a small smoke configuration and record their results.

Timings here mean nothing (tiny sizes); what is checked is that each script runs, prints its
side-by-side table and appends a well-formed record. Run: .venv/bin/python -m pytest tests/test_benchmarks.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KDFLOW_QUIET": "1"})


def test_loss_benchmark_smoke(tmp_path):
    results = tmp_path / "losses.jsonl"
    run = run_script("benchmarks/losses.py", "--rows", "64", "128", "--vocabs", "300", "--hidden", "16",
                     "--chunk-size", "32", "--repeats", "1", "--results", str(results))
    assert run.returncode == 0, run.stderr
    assert "kdflow/naive memory" in run.stdout
    record = json.loads(results.read_text().splitlines()[-1])
    assert [case["rows"] for case in record["results"]] == [64, 128]
    for case in record["results"]:
        naive, fused = case["naive"], case["kdflow"]
        assert fused["loss"] == naive["loss"] or abs(fused["loss"] - naive["loss"]) < 1e-4 * abs(naive["loss"])
        assert fused["ms"] > 0 and naive["peak_mb"] >= 0


def test_pipeline_reuse_benchmark_smoke(tmp_path):
    results = tmp_path / "reuse.jsonl"
    run = run_script("benchmarks/pipeline_reuse.py", "--results", str(results), "configs/tiny.yaml",
                     "compute.backend=local", "data.max_documents=60")
    assert run.returncode == 0, run.stderr
    record = json.loads(results.read_text().splitlines()[-1])
    assert set(record["steps"]) == {"prep", "teacher", "cache", "distill", "baseline", "eval", "register"}
    assert record["warm_seconds"] < record["cold_seconds"]
