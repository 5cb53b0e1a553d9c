"""The `kdflow` command line: as a user runs it (a subprocess of the installed entry point), and
in-process through `kd_core.cli.main` for the gate exits (--fail-on-gates, promote --force) on a
real tiny job (compute.backend=local: no Ray) registered to MLflow on SQLite.

Run: .venv/bin/python -m pytest tests/test_cli.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kd_core.devtools import migrated_sqlite_uri

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["validate", "prep", "cache", "distill", "eval", "register", "run", "seeds", "promote", "rollback", "export"]


def kdflow(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    executable = shutil.which("kdflow", path=str(Path(sys.executable).parent)) or "kdflow"
    return subprocess.run([executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KDFLOW_QUIET": "1"})


def test_top_level_help_lists_every_command():
    result = kdflow("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = kdflow(command, "--help")
    assert result.returncode == 0
    assert "CONFIG" in result.stdout and "KEY=VALUE" in result.stdout


def test_validate_accepts_the_demo_config():
    result = kdflow("validate", "configs/demo.yaml")
    assert result.returncode == 0, result.stderr
    assert "configs/demo.yaml: valid" in result.stdout


def test_validate_reports_field_and_value_and_exits_2():
    result = kdflow("validate", "configs/demo.yaml", "distill.loss.temperature=-1")
    assert result.returncode == 2
    assert "distill.loss.temperature: must be > 0, got -1" in result.stderr


def test_overrides_may_follow_the_flags_and_anything_else_is_refused():
    result = kdflow("validate", "configs/demo.yaml", "--check-inputs", "distill.loss.temperature=-1")
    assert result.returncode == 2 and "distill.loss.temperature: must be > 0, got -1" in result.stderr
    result = kdflow("validate", "configs/demo.yaml", "--check-inputs", "--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr


def test_stage_commands_validate_before_any_work(tmp_path):
    store = tmp_path / "store"
    result = kdflow("run", "configs/tiny.yaml", f"storage.root={store}", "teacher.train.max_steps=0")
    assert result.returncode == 2
    assert "teacher.train.max_steps: must be > 0, got 0" in result.stderr
    assert not store.exists()  # nothing was started


def test_bad_input_data_is_a_named_error_with_exit_2(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"body": "no text field here"}) + "\n")
    result = kdflow(
        "prep", "configs/tiny.yaml", f"storage.root={tmp_path / 'store'}", "data.source=files",
        f"data.files=[{tmp_path / 'data.jsonl'}]",
    )
    assert result.returncode == 2
    assert "data.jsonl:1: expected a JSON object with a 'text' field (data.text_field)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_prep_prints_summary_and_reuses_on_second_call(tmp_path):
    lines = [json.dumps({"text": f"line {i} of a small corpus about students and teachers " * 4}) for i in range(30)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    args = ("prep", "configs/tiny.yaml", f"storage.root={tmp_path / 'store'}", "data.source=files",
            f"data.files=[{tmp_path / 'data.jsonl'}]")
    first = kdflow(*args)
    assert first.returncode == 0, first.stderr
    assert "prep" in first.stdout and "ran" in first.stdout
    second = kdflow(*args)
    assert second.returncode == 0 and "reused" in second.stdout
    forced = kdflow(*args, "--force", "prep")
    assert forced.returncode == 0 and "ran" in forced.stdout


@pytest.mark.slow
def test_fail_on_gates_exits_3_after_the_summary_and_promote_asks_for_force(tmp_path, capsys):
    from mlflow import MlflowClient

    from kd_core.cli import main
    from kd_core.registry import alias_version

    storage = [f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}"]
    job = [str(REPO / "configs" / "tiny.yaml"), *storage, "compute.backend=local"]
    failing = 'eval.gates=["student.perplexity < 1", "agreement_top1 >= 0"]'
    assert main(["run", *job, failing]) == 0  # without the flag a failed gate is reported, not an error
    assert "FAIL" in capsys.readouterr().out
    for command in ("eval", "register", "run"):
        assert main([command, *job, failing, "--fail-on-gates"]) == 3, command
        printed = capsys.readouterr()
        assert "quality gates" in printed.out and "FAIL" in printed.out  # the summary comes first
        assert "gates failed: student.perplexity < 1 (" in printed.err and "agreement_top1" not in printed.err
    assert main(["eval", *job, 'eval.gates=["student.perplexity > 1"]', "--fail-on-gates"]) == 0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_name = "kdflow-tiny-student"
    assert alias_version(client, model_name, "champion") is None  # version 1 failed its gates
    assert main(["promote", job[0], "1", *storage]) == 2
    refused = capsys.readouterr().err
    assert "version 1 failed its gates: student.perplexity < 1 (" in refused and "--force" in refused
    assert alias_version(client, model_name, "champion") is None
    assert main(["promote", job[0], "1", *storage, "--force"]) == 0
    assert alias_version(client, model_name, "champion") == "1"

    # A student that diverges (learning rate 1e30) stops at the distill step with one line, exit
    # 1: nothing reaches eval or the registry.
    assert main(["run", *job, "distill.train.learning_rate=1e30"]) == 1
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and "training diverged at step 5" in printed.err
    assert "the last finite loss was" in printed.err and "distill.train.max_nonfinite_steps = 3" in printed.err
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1


@pytest.mark.slow
def test_seeds_trains_each_seed_on_one_cache_and_summarises_the_held_out_metrics(tmp_path, capsys):
    """`kdflow seeds`: prep, teacher and cache once; a student and a baseline per seed (their own
    keys, their own weights); the summary's values are each seed's eval metrics, and its mean
    and spread are theirs. A second call reuses every step."""
    from kd_core.cli import main

    storage = [f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}"]
    job = [str(REPO / "configs" / "tiny.yaml"), *storage, "compute.backend=local", "distill.train.seed=5"]
    assert main(["seeds", *job, "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "over 2 training seeds (5, 6)" in printed and "distill (seed 5)" in printed and "eval (seed 6)" in printed
    assert "the student beat the baseline on perplexity on" in printed and "of 2 seeds" in printed
    store = tmp_path / "store"
    assert len(list((store / "prep").iterdir())) == 1 and len(list((store / "cache").iterdir())) == 1
    assert len(list((store / "distill").iterdir())) == 2 and len(list((store / "baseline").iterdir())) == 2
    evals = sorted((store / "eval").iterdir())
    assert len(evals) == 2
    (summary_file,) = (store / "seeds").iterdir()
    summary = json.loads(summary_file.read_text())
    assert summary["seeds"] == [5, 6] and summary["split"] == "test"
    by_key = {folder.name: json.loads((folder / "manifest.json").read_text())["metrics"] for folder in evals}
    per_seed = [by_key[key] for key in summary["eval_keys"]]
    perplexity = summary["models"]["student"]["perplexity"]
    assert perplexity["values"] == [metrics["student"]["perplexity"] for metrics in per_seed]
    assert perplexity["values"][0] != perplexity["values"][1]  # two seeds, two students
    assert perplexity["mean"] == pytest.approx(sum(perplexity["values"]) / 2)
    assert perplexity["std"] == pytest.approx(abs(perplexity["values"][0] - perplexity["values"][1]) / 2 ** 0.5)
    assert set(summary["models"]) == {"teacher", "student", "baseline"}
    assert summary["models"]["teacher"]["perplexity"]["std"] == 0  # one teacher for every seed

    made = {path: path.stat().st_mtime_ns for path in store.glob("*/*/manifest.json")}
    assert main(["seeds", *job, "--seeds", "2"]) == 0
    assert {path: path.stat().st_mtime_ns for path in store.glob("*/*/manifest.json")} == made
    assert main(["seeds", *job, "--seeds", "0"]) == 2


@pytest.mark.slow
def test_export_copies_the_teachers_folder_once_and_it_loads_as_the_teacher_it_was(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    destination = tmp_path / "exported" / "teacher"
    args = ("export", "configs/tiny.yaml", f"storage.root={tmp_path / 'store'}", "compute.backend=local", "--step", "teacher", "--to", str(destination))
    first = kdflow(*args)
    assert first.returncode == 0, first.stderr
    provenance = json.loads((destination / "kdflow-export.json").read_text())
    assert provenance["step"] == "teacher" and f"({provenance['key']})" in first.stdout
    trained = load_file(tmp_path / "store" / "teacher" / provenance["key"] / "model" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(destination)
    assert all(model.state_dict()[name].equal(tensor) for name, tensor in trained.items())
    again = kdflow(*args)
    assert again.returncode == 2 and "exists and is not empty; remove it or export to another folder" in again.stderr
    assert not [p for p in destination.parent.iterdir() if p.name.startswith(".kdflow-export-")]
