"""The `kdflow` command line, run as a user runs it (a subprocess of the installed entry point).

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

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["validate", "prep", "cache", "distill", "eval", "register", "run", "promote", "rollback"]


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
