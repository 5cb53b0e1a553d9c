"""The on-policy comparison (issue 22): configs/on_policy.yaml's student distilled four ways at the
same steps, batch and answers per step, with the same teacher, loss and seed.

Arms (overrides of the job; `distill.on_policy.mixing` is GKD's λ):
- SFT on teacher outputs: the teacher samples the answers (`writer: teacher`), the student learns
  them by cross-entropy alone (sequence-level KD). The teacher writes in the training process.
- offline KD (λ = 0): the dataset's answers, the teacher's full distribution at each token.
- on-policy KD (λ = 1): the student's own answers, scored by the teacher (the job as it is).
- GKD (λ = 0.5): each step is on-policy with probability 0.5.
Every arm first learns the dataset's answers for the job's `distill.on_policy.offline_steps`
with its own loss (the SFT arm: cross-entropy), then as above.
The no-teacher baseline (the dataset's answers, cross-entropy) is trained once and shown too.

Each arm runs through the pipeline (prep, teacher and baseline reused; eval on the test split).
Then every model answers every test problem greedily, and the answers are scored per task family,
on the lengths trained on and on the longer ones past them:
- exact match against the right answer;
- agreement with the teacher: the share of problems where its answer is the teacher's.
Throughput comes from each arm's distill step: training tokens/s, answer tokens the generation
engine wrote per second (the actor's own clock), the seconds the trainer waited for answers, and
the tokens trained on (answers or dataset), so the arms are compared at equal tokens.

    .venv/bin/python benchmarks/on_policy.py                       # configs/on_policy.yaml, every arm
    .venv/bin/python benchmarks/on_policy.py configs/on_policy.yaml distill.train.max_steps=300 --arms on_policy offline

Prints a table per family and a summary; appends a record (machine, date, command, versions)
to benchmarks/results/on_policy.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_log import append_result  # noqa: E402

ARMS = {
    "sft": ("SFT on teacher outputs", [
        "distill.on_policy.writer=teacher", "distill.on_policy.mixing=1.0", "distill.on_policy.generation_actors=0",
        "distill.on_policy.teacher_actors=0", "distill.loss.ce_weight=1.0", "distill.loss.kd_weight=0.0",
    ]),
    "offline": ("offline KD (λ = 0)", ["distill.on_policy.mixing=0.0"]),
    "on_policy": ("on-policy KD (λ = 1)", ["distill.on_policy.mixing=1.0"]),
    "gkd": ("GKD (λ = 0.5)", ["distill.on_policy.mixing=0.5"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "on_policy.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm (e.g. distill.train.max_steps=300)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args()

    from kd_core.job import load_config
    from kd_core.pipeline import run_pipeline

    results, models = {}, {}
    for arm in args.arms:
        label, overrides = ARMS[arm]
        print(f"\n=== {label} ===", flush=True)
        steps = run_pipeline(load_config(args.config, [*args.overrides, *overrides]), until="eval")
        distilled, evaluation = steps["distill"], steps["eval"].metrics
        results[arm] = {
            "label": label,
            "distill_key": distilled.key,
            "trained_tokens": distilled.metrics.get("trained_tokens"),
            "training_tokens_per_s": distilled.metrics.get("tokens_per_s"),
            "generated_tokens_per_s": distilled.metrics.get("generated_tokens_per_s"),
            "generation_wait_s": distilled.metrics.get("generation_wait_s"),
            "train_seconds": distilled.metrics.get("train_seconds"),
            "eval_answer_exact_match": evaluation["student"].get("answer_exact_match"),
            "eval_agreement_top1": evaluation["student"].get("agreement_top1"),
        }
        models[arm] = distilled
        shared = steps
    config = load_config(args.config, list(args.overrides))
    per_family = family_scores(config, shared, models)
    for arm in results:
        results[arm]["families"] = per_family[arm]
    results["teacher"] = {"label": "teacher", "families": per_family["teacher"]}
    results["baseline"] = {"label": "no teacher (dataset answers, CE)", "families": per_family["baseline"]}
    print_tables(results)
    append_result(REPO / "benchmarks" / "results" / "on_policy.jsonl", " ".join(["benchmarks/on_policy.py", *sys.argv[1:]]), {"arms": results})


def family_scores(config, steps, students: dict) -> dict[str, dict]:
    """{model: {family: {"trained": (exact match, agreement, n), "longer": (...)}}} over every test problem."""
    import torch
    from transformers import AutoTokenizer

    from kd_core.data.chat import ConversationPrompt
    from kd_core.data.exact_answers import exact_answer_pairs
    from kd_core.eval.answers import greedy_answers, normalized
    from kd_core.models import load_causal_lm, local_copy
    from kd_core.models.teacher import teacher_model_dir
    from kd_core.storage import Store

    store, data = Store(config.storage), config.data
    tokenizer = AutoTokenizer.from_pretrained(local_copy(store, f"{steps['prep'].folder}/tokenizer"))
    problems = [record for record in exact_answer_pairs(data.exact_answers, data.seed, data.val_fraction, data.test_fraction) if record["split"] == "test"]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True) for r in problems]
    prompts = [ConversationPrompt(tokenizer(text, add_special_tokens=False)["input_ids"], []) for text in rendered]
    stop_ids, pad_id = [tokenizer.eos_token_id], tokenizer.pad_token_id
    folders = {"teacher": teacher_model_dir(store, steps["teacher"]), "baseline": local_copy(store, f"{steps['baseline'].folder}/model")}
    folders |= {arm: local_copy(store, f"{manifest.folder}/model") for arm, manifest in students.items()}
    answers = {}
    torch.set_num_threads(2)
    for name, folder in folders.items():
        model = load_causal_lm(folder).eval()
        written = greedy_answers(model, prompts, stop_ids, pad_id, config.eval.max_new_tokens, "cpu", batch_size=128)
        answers[name] = [normalized(tokenizer.decode(ids, skip_special_tokens=True)) for ids in written]
        print(f"answered {len(prompts)} test problems: {name}", flush=True)
    longest = data.exact_answers.train_lengths[1]
    scores = {}
    for name, said in answers.items():
        grouped = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
        for record, answer, teacher in zip(problems, said, answers["teacher"]):
            bucket = grouped[record["tag"]]["trained" if record["length"] <= longest else "longer"]
            bucket[0] += answer == normalized(record["completion"])
            bucket[1] += answer == teacher
            bucket[2] += 1
        scores[name] = {family: {where: (right / n, agree / n, n) for where, (right, agree, n) in buckets.items()} for family, buckets in grouped.items()}
    return scores


def print_tables(results: dict) -> None:
    families = sorted(next(iter(results.values()))["families"])
    order = ["teacher", "baseline", *[arm for arm in ARMS if arm in results]]
    print("\nexact match (agreement with the teacher), test problems of the trained lengths | longer ones")
    print("| model | " + " | ".join(families) + " | all trained | all longer |")
    print("|---|" + "---:|" * (len(families) + 2))
    for name in order:
        cells, totals = [], {"trained": [0, 0, 0], "longer": [0, 0, 0]}
        for family in families:
            parts = []
            for where in ("trained", "longer"):
                exact, agree, n = results[name]["families"][family].get(where, (0.0, 0.0, 0))
                totals[where][0] += exact * n
                totals[where][1] += agree * n
                totals[where][2] += n
                parts.append(f"{exact:.1%}" if name == "teacher" else f"{exact:.1%} ({agree:.0%})")
            cells.append(" / ".join(parts))
        for where in ("trained", "longer"):
            right, agree, n = totals[where]
            cells.append(f"{right / max(n, 1):.1%}" if name == "teacher" else f"{right / max(n, 1):.1%} ({agree / max(n, 1):.0%})")
        print(f"| {results[name]['label']} | " + " | ".join(cells) + " |")
    print("\n| arm | trained tokens | training tok/s | generated tok/s | waited for answers (s) | train s | eval exact match | eval token agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arm in ARMS:
        if arm not in results:
            continue
        r = results[arm]
        show = lambda value, fmt: "—" if value is None else format(value, fmt)  # noqa: E731
        print(
            f"| {r['label']} | {show(r['trained_tokens'], ',.0f')} | {show(r['training_tokens_per_s'], ',.0f')} | "
            f"{show(r['generated_tokens_per_s'], ',.0f')} | {show(r['generation_wait_s'], '.0f')} | {show(r['train_seconds'], '.0f')} | "
            f"{show(r['eval_answer_exact_match'], '.1%')} | {show(r['eval_agreement_top1'], '.1%')} |"
        )


if __name__ == "__main__":
    main()
