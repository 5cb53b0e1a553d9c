"""Quality gates: parsed without running code, evaluated over the eval metrics with their numbers.

Run: .venv/bin/python -m pytest tests/test_gates.py
"""

from __future__ import annotations

import pytest

from kd_core.config import ConfigError
from kd_core.job import load_config
from kd_core.gates import Gate, GateError, evaluate_gates

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
METRICS = {
    "teacher": {"perplexity": 100.0, "agreement_top1": 1.0},
    "student": {"perplexity": 125.0, "agreement_top1": 0.6, "kl_to_teacher": 0.2},
    "baseline": {"perplexity": 150.0, "kl_to_teacher": 0.5},
}


def test_gates_compare_arithmetic_over_metrics_and_report_both_sides():
    results = evaluate_gates(
        [
            "student.perplexity <= 1.3 * teacher.perplexity",
            "student.perplexity <= 1.2 * teacher.perplexity",
            "agreement_top1 >= 0.55",
            "student.kl_to_teacher < baseline.kl_to_teacher - 0.1",
            "-student.perplexity > -(baseline.perplexity) / 1",
        ],
        METRICS,
    )
    assert [r["passed"] for r in results] == [True, False, True, True, True]
    assert (results[0]["left"], results[0]["right"]) == (125.0, pytest.approx(130.0))
    assert (results[1]["left"], results[1]["right"]) == (125.0, pytest.approx(120.0))
    assert results[2]["left"] == 0.6 and results[3]["right"] == pytest.approx(0.4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('echo pwned') == 0", "not allowed"),
        ("student.perplexity.real < 3", "not allowed"),
        ("student.perplexity < teacher['perplexity']", "not allowed"),
        ("student.perplexity", "one comparison"),
        ("1 < student.perplexity < 3", "one comparison"),
        ("student.perplexity in [1, 2]", "must be one of"),
        ("student.perplexty < 3", "unknown metric 'perplexty'"),
        ("critic.perplexity < 3", "unknown model 'critic'"),
        ("student.perplexity <", "not a comparison"),
        ("lambda: 1 < 2", "one comparison"),
        ("(lambda: 1)() < 2", "not allowed"),
    ],
)
def test_anything_but_numbers_names_and_arithmetic_is_refused(text, message):
    with pytest.raises(GateError, match=message):
        Gate.parse(text)


def test_a_metric_that_was_not_measured_is_a_clear_error():
    with pytest.raises(GateError, match="baseline.agreement_top1 was not measured"):
        evaluate_gates(["baseline.agreement_top1 > 0.5"], METRICS)
    with pytest.raises(GateError, match="division by zero"):
        evaluate_gates(["student.perplexity < 1 / (teacher.agreement_top1 - 1)"], METRICS)


def test_gates_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"eval.gates: \[1\] gate 'student.ppl < 3': unknown metric"):
        load_config(REPO / "configs" / "tiny.yaml", ['eval.gates=["agreement_top1 >= 0.5", "student.ppl < 3"]'])


def test_a_gate_or_primary_metric_on_the_baseline_needs_the_baseline():
    gates = 'eval.gates=["agreement_top1 >= 0.5", "student.perplexity < baseline.perplexity"]'
    with pytest.raises(ConfigError) as gate_error:
        load_config(REPO / "configs" / "tiny.yaml", [gates, "distill.baseline=false"])
    assert gate_error.value.args[0].splitlines()[-1].strip() == (
        "eval.gates[1]: 'student.perplexity < baseline.perplexity' reads the baseline, but distill.baseline is false; "
        "set distill.baseline: true or drop the gate"
    )
    with pytest.raises(ConfigError, match=r"registry.primary_metric: 'baseline.perplexity' reads the baseline, but distill.baseline is false; set distill.baseline: true or drop it"):
        load_config(REPO / "configs" / "tiny.yaml", ["registry.primary_metric=baseline.perplexity", "distill.baseline=false"])
    assert load_config(REPO / "configs" / "tiny.yaml", [gates]).distill.baseline  # with the baseline: fine
    assert load_config(REPO / "configs" / "tiny.yaml", ['eval.gates=["agreement_top1 >= 0.5"]', "distill.baseline=false"])
