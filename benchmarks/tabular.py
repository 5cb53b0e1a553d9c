"""The tabular recipes over seeds (issue 25): a scikit-learn teacher, the distilled MLP (with and
without MUNGE rows) and the hard-label MLP, on the datasets bundled with scikit-learn.

Each seed changes the split (`data.seed`), the teacher's `random_state` and the students' seed;
every arm of a seed shares its split and teacher. Arms (overrides of the recipe):
- `kd_munge`: the recipe (KD on the training rows and `cache.synthetic.rows` MUNGE rows);
- `kd`: KD on the training rows alone (`cache.synthetic.rows=0`).
The teacher and the hard-label MLP (the recipe's baseline) are measured beside them. Quality on the
test split; speed at batch 1 and 1024 on this machine. Prints mean ± standard deviation over the
seeds per model, and appends every seed's numbers to benchmarks/results/tabular.jsonl.

    .venv/bin/python benchmarks/tabular.py                                     # configs/tabular.yaml, 5 seeds
    .venv/bin/python benchmarks/tabular.py configs/tabular_regression.yaml --seeds 0 1 2
    .venv/bin/python benchmarks/tabular.py configs/tabular.yaml data.table.dataset=digits
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_log import append_result  # noqa: E402

ARMS = {"kd_munge": ("KD student + MUNGE rows (the recipe)", []), "kd": ("KD student, training rows only", ["cache.synthetic.rows=0"])}
COLUMNS = {
    "classification": [("accuracy", "{:.2%}"), ("log_loss", "{:.4f}"), ("roc_auc", "{:.4f}"), ("ece", "{:.3f}"), ("agreement", "{:.2%}"),
                       ("synthetic_agreement", "{:.2%}")],
    "regression": [("r2", "{:.3f}"), ("rmse", "{:.2f}"), ("mae", "{:.2f}"), ("teacher_rmse", "{:.2f}"), ("synthetic_teacher_rmse", "{:.2f}")],
}
SPEED = [("latency_ms", "{:.3f}"), ("rows_per_s", "{:,.0f}"), ("weight_bytes", "{:,.0f}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "tabular.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "tabular.jsonl")
    args = parser.parse_args()

    from kd_core.job import load_config
    from kd_core.pipeline import run_pipeline

    runs: dict[str, list[dict]] = {}
    kind = None
    for seed in args.seeds:
        seeded = [f"data.seed={seed}", f"teacher.sklearn.seed={seed}", f"distill.train.seed={seed}"]
        for arm in args.arms:
            label, overrides = ARMS[arm]
            print(f"\n=== seed {seed}: {label} ===", flush=True)
            config = load_config(args.config, [*args.overrides, *seeded, *overrides])
            metrics = run_pipeline(config, until="eval")["eval"].metrics
            kind = "regression" if "r2" in metrics["student"] else "classification"
            runs.setdefault(arm, []).append(metrics["student"] | {"seed": seed})
            if arm == args.arms[0]:
                runs.setdefault("teacher", []).append(metrics["teacher"] | {"seed": seed})
                runs.setdefault("baseline", []).append(metrics["baseline"] | {"seed": seed})
                rows = metrics["rows"]
    labels = {"teacher": "teacher (scikit-learn)", **{arm: ARMS[arm][0] for arm in args.arms}, "baseline": "hard-label MLP"}
    print_table(runs, labels, kind, rows, len(args.seeds))
    append_result(args.results, " ".join(["benchmarks/tabular.py", *sys.argv[1:]]), {"kind": kind, "test_rows": rows, "runs": runs})


def mean_std(values: list[float], form: str) -> str:
    if len(values) == 1:
        return form.format(values[0])
    return f"{form.format(statistics.mean(values))} ± {form.format(statistics.stdev(values))}"


def print_table(runs: dict, labels: dict, kind: str, rows: int, seeds: int) -> None:
    columns = COLUMNS[kind] + SPEED
    print(f"\ntest split: {rows:,} rows per seed; mean ± std over {seeds} seeds")
    print("| model | " + " | ".join(name for name, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, label in labels.items():
        cells = []
        for metric, form in columns:
            values = [run[metric] for run in runs[name] if metric in run]
            cells.append(mean_std(values, form) if values else "—")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
