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

import pytest

from kd_core.devtools import migrated_sqlite_uri

REPO = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KDFLOW_QUIET": "1"})


@pytest.mark.slow
def test_loss_benchmark_smoke(tmp_path):
    results = tmp_path / "losses.jsonl"
    run = run_script("benchmarks/losses.py", "--rows", "64", "--vocabs", "300", "--hidden", "16",
                     "--chunk-sizes", "32", "48", "--repeats", "1", "--results", str(results))
    assert run.returncode == 0, run.stderr
    assert "kdflow@32/naive time, memory" in run.stdout and "kdflow@48/naive time, memory" in run.stdout
    record = json.loads(results.read_text().splitlines()[-1])
    assert [(case["rows"], case["vocab"]) for case in record["results"]] == [(64, 300)]
    for case in record["results"]:
        naive = case["naive"]
        for fused in (case["kdflow@32"], case["kdflow@48"]):
            assert fused["loss"] == naive["loss"] or abs(fused["loss"] - naive["loss"]) < 1e-4 * abs(naive["loss"])
            assert fused["ms"] > 0 and naive["peak_mb"] >= 0


@pytest.mark.slow
def test_pipeline_reuse_benchmark_smoke(tmp_path):
    results = tmp_path / "reuse.jsonl"
    run = run_script("benchmarks/pipeline_reuse.py", "--results", str(results), "configs/tiny.yaml",
                     "compute.backend=local", "data.max_documents=60")
    assert run.returncode == 0, run.stderr
    record = json.loads(results.read_text().splitlines()[-1])
    assert set(record["steps"]) == {"prep", "teacher", "cache", "distill", "baseline", "eval", "register"}
    assert record["warm_seconds"] < record["cold_seconds"]


@pytest.mark.slow
def test_cache_benchmark_smoke(tmp_path):
    results = tmp_path / "cache.jsonl"
    run = run_script("benchmarks/cache.py", "configs/tiny.yaml", "compute.backend=local", f"storage.root={tmp_path / 'store'}",
                     "--rows", "32", "--shards", "2", "--train-steps", "1", "--memory-sizes", "4x64x4096", "--memory-hidden", "32",
                     "--results", str(results))
    assert run.returncode == 0, run.stderr
    assert "trainer consumes" in run.stdout and "moto S3" in run.stdout and "chunked/whole" in run.stdout
    record = json.loads(results.read_text().splitlines()[-1])
    sizes = {row["format"]: row for row in record["sizes"]}
    default = sizes["topk-8 12-bit log-probs + tail (default)"]
    assert default["bytes_per_entry"] == (9 + 12) / 8  # 300-token vocabulary: 9-bit ids
    assert sizes["topk-8 8-bit log-probs + tail"]["kl_exact_to_decoded"] > default["kl_exact_to_decoded"]
    assert record["reader_local"]["tokens"] == record["reader_s3"]["tokens"] == 2 * 32 * 32
    (memory,) = record["teacher_memory"]
    assert (memory["batch"], memory["seq_len"], memory["vocab"]) == (4, 64, 4096)
    # One batch's float32 logits are 4 MiB: held whole, with their log-softmax and the targets'
    # temporaries, about 5 of them; chunked, the logits are freed before the temporaries.
    assert memory["chunked"]["peak_tensor_mb"] < memory["whole"]["peak_tensor_mb"] and memory["whole"]["peak_tensor_mb"] >= 2 * 4


@pytest.mark.slow
def test_cache_quality_benchmark_smoke(tmp_path):
    results = tmp_path / "quality.jsonl"
    run = run_script("benchmarks/cache_quality.py", "configs/tiny.yaml", "compute.backend=local", f"storage.root={tmp_path / 'store'}",
                     "distill.train.max_steps=3", "--results", str(results))
    assert run.returncode == 0, run.stderr
    table = json.loads(results.read_text().splitlines()[-1])["results"]
    assert set(table) == {"teacher", "online, full logits", "top-8 cache", "sampled-12 cache", "sampled-12 cache, fused loss",
                          "no teacher (CE only)"}
    assert table["teacher"]["kl_to_teacher"] == 0.0
    assert table["sampled-12 cache, fused loss"]["perplexity"] == pytest.approx(table["sampled-12 cache"]["perplexity"], rel=1e-3)
    assert all(0 <= row["ece"] <= 1 and row["perplexity"] > 1 for row in table.values())


@pytest.mark.slow
def test_reward_study_benchmark_smoke(tmp_path):
    """Two variants × two seeds: every run measured on the validation pairs, with the diagnostics
    (agreement by question kind and digit, the linear probes, the loss terms over training)."""
    results = tmp_path / "study.jsonl"
    run = run_script("benchmarks/reward_study.py", "configs/reward_tiny.yaml", f"storage.root={tmp_path / 'store'}",
                     "--steps", "4", "--every", "2", "--seeds", "2", "--results", str(results), "--plot", str(tmp_path / "study.png"),
                     "--variant", "late", "student.vision.fusion=late", "--variant", "prefix", "student.vision.fusion=prefix")
    assert run.returncode == 0, run.stderr
    record = json.loads(results.read_text().splitlines()[-1])
    assert set(record["runs"]) == {"late", "prefix"} and all(len(runs) == 2 for runs in record["runs"].values())
    assert record["raw_pixel_probe"] > 0.8  # the scans are recognisable from their pixels by a linear model
    for runs in record["runs"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        for result in runs:
            assert 0 <= result["agreement"] <= 1 and 0 <= result["probe"] <= 1 and 0 <= result["train_agreement"] <= 1
            assert set(result["by_kind"]) <= {"which digit", "even/odd", "larger than k", "plus one"}
            assert set(result["by_digit"]) == {str(digit) for digit in range(10)}
            assert [point["step"] for point in result["curve"]] == [2, 4] and "pairwise" in result["curve"][0]
    assert "mean ± standard deviation over 2 seed(s)" in run.stdout and "agreement by question kind" in run.stdout
    assert (tmp_path / "study.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_gpu_check_tiny_mode_runs_every_row_on_cpu(tmp_path):
    """`gpu_check.sh --tiny`: the plain baselines and kdflow's online and cached runs through
    `train_worker` (no Ray), the table, the record, and the loss benchmark after them."""
    results = tmp_path / "gpu_check.jsonl"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny", "--results", str(results)], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable, "KDFLOW_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "× plain (same ZeRO)" in run.stdout and "kdflow@1024/naive time, memory" in run.stdout
    record = json.loads(results.read_text().splitlines()[-1])
    runs = {row["run"]: row for row in record["runs"]}
    assert list(runs) == ["plain ZeRO-2", "plain ZeRO-3", "kdflow ZeRO-3 online", "kdflow ZeRO-3 cache", "kdflow ZeRO-3 chat cache"]
    assert record["packed_attention_gap"] < 1e-4  # float32 on CPU: packed conversations do not see each other
    for row in runs.values():
        assert row["tokens_per_s"] > 0 and row["loss"] == row["loss"] and row["loss"] >= 0
    ratio = runs["kdflow ZeRO-3 online"]["tokens_per_s"] / runs["plain ZeRO-3"]["tokens_per_s"]
    assert runs["kdflow ZeRO-3 online"]["vs_plain_same_zero"] == pytest.approx(ratio)
    assert record["student_parameters"] < record["teacher_parameters"] and record["precision"] == "fp32"


@pytest.mark.slow
def test_checkpoint_cost_benchmark_smoke(tmp_path):
    results = tmp_path / "checkpoint_cost.jsonl"
    run = run_script("benchmarks/checkpoint_cost.py", "configs/tiny.yaml", "compute.backend=local", f"storage.root={tmp_path / 'store'}",
                     "--every", "none", "3", "--results", str(results))
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(results.read_text().splitlines()[-1])
    assert [(row["checkpoint_every"], row["checkpoints"]) for row in record["rows"]] == [("none", 0), ("3", 3)]
    # Checkpoints change nothing about the training: the same final loss with and without.
    assert record["rows"][0]["final_loss"] == pytest.approx(record["rows"][1]["final_loss"], rel=1e-6)


@pytest.mark.slow
def test_prep_throughput_benchmark_smoke(tmp_path):
    results = tmp_path / "prep.jsonl"
    run = run_script("benchmarks/prep_throughput.py", "--megabytes", "0.3", "--files", "5", "--results", str(results))
    assert run.returncode == 0, run.stderr
    assert "kdflow MB/s" in run.stdout and "whole-file MB/s" in run.stdout
    record = json.loads(results.read_text().splitlines()[-1])
    assert [row["case"] for row in record["results"]] == ["one huge file", "5 small files"]
    for row in record["results"]:
        assert row["documents"] > 0 and row["kdflow"]["mb_per_s"] > 0 and row["whole_file"]["peak_mb"] > 0


@pytest.mark.slow
def test_embedding_benchmark_smoke(tmp_path):
    """One arm on configs/tiny.yaml with a teacher trained here (the recipe's is all-MiniLM-L6-v2)."""
    results = tmp_path / "embedding.jsonl"
    run = run_script("benchmarks/embedding.py", "configs/tiny.yaml", "task=embedding", "compute.backend=local", f"storage.root={tmp_path / 'store'}",
                     f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}", "teacher.train.dropout=0.1", "distill.train.dropout=0.1",
                     "registry.primary_metric=student.recall_at_10", "tune.space={}", "data.seq_len=40", "distill.deepspeed.enabled=false",
                     "--arms", "mse_relational", "--results", str(results))
    assert run.returncode == 0, run.stderr
    assert "| no-teacher student (SimCSE) |" in run.stdout and "| MSE + relational" in run.stdout
    record = json.loads(results.read_text().splitlines()[-1])
    assert set(record["arms"]) == {"mse_relational", "teacher", "baseline"}
    assert 0 <= record["arms"]["mse_relational"]["recall_at_10"] <= 1 and record["arms"]["mse_relational"]["train_seconds"] > 0
