"""Quality gates: comparisons over the eval metrics, parsed safely and reported with their numbers.

A gate is one comparison between two arithmetic expressions over numbers and metric names:

    student.perplexity <= 1.3 * teacher.perplexity
    agreement_top1 >= 0.55                  # a bare name is the student's metric
    student.kl_to_teacher < baseline.kl_to_teacher

Names are `<model>.<metric>` with model `student`, `teacher`, `baseline`, `start` (the student
before distillation, for one that starts pretrained or cut from the teacher) or `uniform` (the
uniform predictor: what a model that learned nothing scores, worked out by the eval stage), or a
bare metric of the student. The metrics are those the eval stage measures for the job's task
(`Task.metrics`: language-model metrics for `causal_lm`, preference metrics for `reward`). The
text is parsed with Python's `ast` and only numbers, names, `+ - * /`, unary minus and one
comparison (`< <= > >= == !=`) are accepted: nothing is ever evaluated as code, and a call,
attribute chain, subscript or anything else is refused with the gate's text.

A job with no `eval.gates` is gated on sanity (the task's `Task.sanity_gates`, unless
`eval.sanity_gates` is false): the student must beat the uniform predictor by a clear margin, and the no-teacher baseline
when one was trained. A diverged student that collapsed to uniform output therefore fails its
gates, and the registry never makes it champion.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass

MODELS = ("student", "teacher", "baseline", "start", "uniform")
METRICS = (
    # language models (kd_core/tasks/causal_lm.py)
    "cross_entropy", "perplexity", "kl_to_teacher", "ece", "agreement_top1", "agreement_top5", "tokens_per_s",
    "answer_exact_match", "answer_f1",
    # reward models (kd_core/tasks/reward.py)
    "pairwise_accuracy_teacher", "pairwise_accuracy_human", "spearman_teacher", "preference_kl_to_teacher", "pairs_per_s",
    # models with different tokenizers (kd_core/tasks/cross_tokenizer.py)
    "bits_per_byte", "bits_per_character", "tokens_per_byte", "span_agreement", "round_trip", "bytes_per_s",
    # sentence encoders (kd_core/tasks/embedding.py)
    "recall_at_10", "spearman", "mean_cosine", "sentences_per_s", "dimension",
    # tabular models (kd_core/tasks/tabular.py): score is accuracy (classification) or R² (regression)
    "score", "accuracy", "log_loss", "roc_auc", "brier", "rmse", "mae", "r2", "agreement", "synthetic_agreement",
    "teacher_rmse", "synthetic_teacher_rmse", "rows_per_s",
    # every model
    "parameters", "weight_bytes", "latency_ms",
)
"""Every metric name a task measures (each task's `Task.metrics` says which are its own)."""
MAXIMIZED = frozenset(
    {"agreement_top1", "agreement_top5", "tokens_per_s", "answer_exact_match", "answer_f1", "pairwise_accuracy_teacher", "pairwise_accuracy_human", "spearman_teacher", "pairs_per_s",
     "span_agreement", "round_trip", "bytes_per_s", "recall_at_10", "spearman", "mean_cosine", "sentences_per_s",
     "score", "accuracy", "roc_auc", "r2", "agreement", "synthetic_agreement", "rows_per_s"}
)
"""Metrics where higher is better (the registry's default goal for a primary metric)."""
_COMPARISONS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Eq: operator.eq, ast.NotEq: operator.ne}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class GateError(ValueError):
    """A gate that cannot be parsed or evaluated; the message quotes it."""


@dataclass(frozen=True)
class Gate:
    text: str
    left: ast.expr
    compare: type
    right: ast.expr

    @classmethod
    def parse(cls, text: str) -> Gate:
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as err:
            raise GateError(f"gate {text!r}: not a comparison ({err.msg})") from None
        if not isinstance(tree, ast.Compare) or len(tree.ops) != 1:
            raise GateError(f"gate {text!r}: must be one comparison, e.g. 'student.perplexity <= 1.3 * teacher.perplexity'")
        if type(tree.ops[0]) not in _COMPARISONS:
            raise GateError(f"gate {text!r}: the comparison must be one of < <= > >= == !=")
        for side in (tree.left, tree.comparators[0]):
            _check(side, text)
        return cls(text.strip(), tree.left, type(tree.ops[0]), tree.comparators[0])

    def metric_names(self) -> list[tuple[str, str]]:
        """(model, metric) of every name the gate reads."""
        return _names(self.left) + _names(self.right)

    def evaluate(self, metrics: dict) -> dict:
        """{"gate", "passed", "left", "right"}: the comparison and the two numbers it compared."""
        left, right = _value(self.left, metrics, self.text), _value(self.right, metrics, self.text)
        return {"gate": self.text, "passed": bool(_COMPARISONS[self.compare](left, right)), "left": left, "right": right}


def evaluate_gates(gates: list[str], metrics: dict) -> list[dict]:
    return [Gate.parse(text).evaluate(metrics) for text in gates]


def describe_failed(results: list[dict]) -> list[str]:
    """Each failed gate of `evaluate_gates`' results with the two numbers it compared, e.g.
    `student.perplexity < 100 (131.2 vs 100)`."""
    return [f"{gate['gate']} ({gate['left']:.4g} vs {gate['right']:.4g})" for gate in results if not gate["passed"]]


def parse_metric(text: str) -> tuple[str, str]:
    """(model, metric) of one metric name such as `student.perplexity` or `agreement_top1`."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    name = metric_name(node) if node is not None else None
    if name is None:
        raise GateError(f"{text!r} is not a metric name; use e.g. student.perplexity")
    _check(node, text)
    return name


def metric_value(text: str, metrics: dict) -> float:
    """The value of one metric name in the eval metrics."""
    model, metric = parse_metric(text)
    value = metrics.get(model, {}).get(metric)
    if value is None:
        raise GateError(f"{model}.{metric} was not measured")
    return float(value)


def metric_name(node: ast.expr) -> tuple[str, str] | None:
    """(model, metric) for `model.metric` or a bare student metric; None for other nodes."""
    if isinstance(node, ast.Name):
        return "student", node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _check(node: ast.expr, text: str) -> None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        _check(node.left, text)
        _check(node.right, text)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        _check(node.operand, text)
        return
    name = metric_name(node)
    if name is None:
        raise GateError(f"gate {text!r}: {ast.unparse(node)!r} is not allowed; use numbers, metric names and + - * /")
    model, metric = name
    if model not in MODELS:
        raise GateError(f"gate {text!r}: unknown model {model!r}; use {', '.join(MODELS)}")
    if metric not in METRICS:
        raise GateError(f"gate {text!r}: unknown metric {metric!r}; one of {', '.join(METRICS)}")


def _names(node: ast.expr) -> list[tuple[str, str]]:
    if isinstance(node, ast.BinOp):
        return _names(node.left) + _names(node.right)
    if isinstance(node, ast.UnaryOp):
        return _names(node.operand)
    name = metric_name(node)
    return [name] if name else []


def _value(node: ast.expr, metrics: dict, text: str) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left, metrics, text), _value(node.right, metrics, text)
        if isinstance(node.op, ast.Div) and right == 0:
            raise GateError(f"gate {text!r}: division by zero")
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return -_value(node.operand, metrics, text)
    model, metric = metric_name(node)
    value = metrics.get(model, {}).get(metric)
    if value is None:
        raise GateError(f"gate {text!r}: {model}.{metric} was not measured (is there a {model}?)")
    return float(value)
