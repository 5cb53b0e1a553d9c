"""The embedding comparison (issue 24): configs/embedding.yaml's student (all-MiniLM-L6-v2 cut to 3
of its 6 blocks) distilled by each objective at the same steps, batch and seed, from one cache
of the teacher's embeddings.

Arms (overrides of the job):
- MSE (the job as it is): the teacher's embedding alone;
- MSE + Matryoshka: also the teacher's similarity structure at widths 64, 128, 256 (weight 1);
- MSE + relational: also RKD distance and angle (Park et al.) over each batch.
The no-teacher student (the same cut, fine-tuned with SimCSE on the same texts), the cut before
any training and the teacher are measured beside them, on the held-out texts: recall@10 of the
teacher's neighbours, Spearman ρ of pairwise similarities, mean cosine to the teacher, recall@10
at each Matryoshka width, sentences/s and latency on this machine, parameters.

    .venv/bin/python benchmarks/embedding.py                      # configs/embedding.yaml, every arm
    .venv/bin/python benchmarks/embedding.py configs/embedding.yaml distill.train.max_steps=50 --arms mse --results /tmp/e.jsonl

Prints the table and appends a record (machine, date, command, versions) to
benchmarks/results/embedding.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_log import append_result  # noqa: E402

ARMS = {
    "mse": ("MSE", []),
    "mse_matryoshka": ("MSE + Matryoshka (64, 128, 256)", ["distill.embedding.matryoshka_weight=1.0"]),
    "mse_relational": ("MSE + relational (RKD distance 1, angle 2)", [
        "distill.embedding.matryoshka_weight=0.0", "distill.embedding.distance_weight=1.0", "distill.embedding.angle_weight=2.0",
    ]),
}
WIDTHS = (64, 128, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "embedding.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm (e.g. distill.train.max_steps=100)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "embedding.jsonl")
    args = parser.parse_args()

    from kd_core.job import load_config
    from kd_core.pipeline import run_pipeline
    import json

    from kd_core.storage import Store

    results, reference = {}, None
    for arm in args.arms:
        label, overrides = ARMS[arm]
        print(f"\n=== {label} ===", flush=True)
        config = load_config(args.config, [*args.overrides, *overrides])
        steps = run_pipeline(config, until="eval")
        metrics = steps["eval"].metrics
        curves = json.loads(Store(config.storage).read_bytes(f"{steps['eval'].folder}/fidelity_by_width.json"))
        results[arm] = {"label": label, "distill_key": steps["distill"].key, "train_seconds": steps["distill"].metrics.get("train_seconds"),
                        **metrics["student"], "widths": curves["student"]}
        reference = metrics | {"baseline_widths": curves.get("baseline"), "start_widths": curves.get("start")}
    results["teacher"] = {"label": "teacher (all-MiniLM-L6-v2, 6 blocks)", **reference["teacher"]}
    if "start" in reference:
        results["start"] = {"label": "the cut before training (3 blocks)", **reference["start"], "widths": reference["start_widths"]}
    results["baseline"] = {"label": "no-teacher student (SimCSE)", **reference["baseline"], "widths": reference["baseline_widths"]}
    print_table(results, reference)
    append_result(args.results, " ".join(["benchmarks/embedding.py", *sys.argv[1:]]), {"arms": results, "rows": reference["rows"]})


def print_table(results: dict, reference: dict) -> None:
    teacher_speed = results["teacher"]["sentences_per_s"]
    print(f"\nheld-out test split: {reference['rows']:,} texts; speed on {reference.get('device', 'this machine')}")
    print("| model | recall@10 | Spearman ρ | mean cosine | " + " | ".join(f"recall@10 at {w}" for w in WIDTHS) + " | sentences/s (× teacher) | ms/text | parameters | train s |")
    print("|---|" + "---:|" * (7 + len(WIDTHS)))
    for name in ["teacher", "start", "baseline", *[arm for arm in ARMS if arm in results]]:
        if name not in results:
            continue
        row = results[name]
        teacher = name == "teacher"
        by_width = {point["dim"]: point["recall_at_10"] for point in row.get("widths") or []}
        cells = [
            "—" if teacher else f"{row['recall_at_10']:.1%}", "—" if teacher else f"{row['spearman']:.3f}",
            "—" if teacher or "mean_cosine" not in row else f"{row['mean_cosine']:.3f}",
            *("—" if teacher or w not in by_width else f"{by_width[w]:.1%}" for w in WIDTHS),
            f"{row['sentences_per_s']:,.0f} ({row['sentences_per_s'] / teacher_speed:.2f}×)", f"{row['latency_ms']:.1f}", f"{row['parameters']:,}",
            f"{row['train_seconds']:.0f}" if row.get("train_seconds") else "—",
        ]
        print(f"| {row['label']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
