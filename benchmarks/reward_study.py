"""Why does a multimodal reward student learn its teacher, or not? Variants × seeds, on validation.

On the reward recipe's data, teacher and cache (default: configs/reward_multimodal.yaml; prep,
teacher and cache are made or reused as `kdflow run` would), each variant (a set of config
overrides on top of the job's) trains the student once per seed, in this process: the training
step itself (`RewardStep`, the model `student` builds, kdflow's AdamW with warmup and cosine
decay), no Ray or DeepSpeed, so that many variants fit in an hour on 2 cores. Only the validation
split is read: a recipe's defaults are chosen here, and the test split is left to `kdflow seeds`.

For every run it measures, on the validation pairs:
- agreement with the teacher, accuracy vs the human labels, Spearman ρ with the teacher's rewards
  and the preference KL (the eval stage's metrics, `kd_core/eval/reward.py`);
- agreement by question kind and by digit (the bundled digit data: a scan's digit is looked up in
  scikit-learn's `load_digits` by its pixels);
- the image pathway alone: a linear probe (logistic regression) of the image vector the head reads
  (late fusion: the projected [CLS]; prefix: the mean of the projected patches) for the digit,
  fitted on the training images, scored on the validation images; beside it, the same probe on
  the raw pixels and on the untrained model;
- the loss terms and the validation agreement over training (every `--every` steps), and the
  agreement on 1,000 training pairs at the end (against the validation agreement: overfitting).

Then it prints, per variant, the mean ± standard deviation over the seeds, appends everything
to benchmarks/results/reward_study.jsonl and plots the validation agreement over training (mean
over seeds, the band from the lowest to the highest seed) to `--plot`. `--replot N` only redraws
the plot from the last N records of the results file, one panel per record.

    python benchmarks/reward_study.py --seeds 3 \\
        --variant recipe \\
        --variant patch8 student.vision.patch_size=8 \\
        --variant pointwise distill.reward.pointwise_weight=1.0
    python benchmarks/reward_study.py --variant late student.vision.fusion=late --variant prefix student.vision.fusion=prefix

The runs go one after another, each with `compute.cpus_per_worker` threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_log import append_result  # noqa: E402

HEADLINE = ("agreement", "human_accuracy", "spearman", "kl", "probe", "train_agreement")
KINDS = {"Which digit": "which digit", "even or odd": "even/odd", "larger than": "larger than k", "add one": "plus one"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/reward_multimodal.yaml")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides for every variant")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "OVERRIDE"), help="a variant: its name, then its overrides")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant: distill.train.seed + 0, 1, ...")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: distill.train.max_steps)")
    parser.add_argument("--every", type=int, default=250, help="validation agreement every this many steps")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "reward_study.jsonl")
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "results" / "reward_study.png")
    parser.add_argument("--replot", type=int, default=0, metavar="N", help="only redraw the plot from the last N records")
    args = parser.parse_args()
    if args.replot:
        records = [json.loads(line) for line in args.results.read_text().splitlines()[-args.replot :]]
        plot_curves([record["runs"] for record in records], args.plot)
        return
    variants = {v[0]: v[1:] for v in (args.variant or [["recipe"]])}

    data = prepare_data(args.config, args.overrides)  # makes or reuses prep, teacher and cache
    started, by_variant = time.perf_counter(), {}
    for name, overrides in variants.items():
        for seed in range(args.seeds):
            result = train_and_measure(args.config, [*args.overrides, *overrides], seed, args.steps, args.every, data)
            by_variant.setdefault(name, []).append(result)
    print_tables(by_variant, data["raw_pixel_probe"])
    plot_curves([by_variant], args.plot)
    append_result(
        args.results,
        " ".join(["python", "benchmarks/reward_study.py", *sys.argv[1:]]),
        {"config": args.config, "overrides": args.overrides, "variants": variants, "runs": by_variant,
         "raw_pixel_probe": data["raw_pixel_probe"], "seconds": time.perf_counter() - started},
    )


# ------------------------------------------------------------------------------------------ data
def prepare_data(config_path: str, overrides: list[str]) -> dict:
    """The validation and training pairs with the teacher's rewards, each pair's digit and
    question kind, and the raw-pixel probe's accuracy."""
    import torch

    from kd_core.cache import cache_shards
    from kd_core.data.shards import decode_arrow, read_verified
    from tokenizers import Tokenizer

    from kd_core.eval.reward import load_pairs
    from kd_core.job import load_config
    from kd_core.pipeline import cache_steps, prep_step
    from kd_core.storage import Store

    config = load_config(config_path, overrides)
    torch.set_num_threads(config.compute.cpus_per_worker)
    store = Store(config.storage)
    prep = prep_step(config)
    steps = cache_steps(config, prep)
    data: dict = {"pad_id": prep.details["pad_id"], "store": store, "prep": prep, "cache": steps["cache"]}
    tokenizer = Tokenizer.from_str(store.read_bytes(f"{prep.folder}/tokenizer/tokenizer.json").decode())
    for split in ("train", "val"):
        pairs = load_pairs(store, prep, split)
        cached = [decode_arrow(read_verified(store, record), record.url) for record in cache_shards(steps["cache"], split)]
        for side in ("chosen", "rejected"):
            pairs[f"teacher_{side}"] = np.concatenate([shard[f"teacher_{side}"][:, 0] for shard in cached])
        pairs["digit"] = digits_of(pairs["pixels"])
        pairs["kind"] = np.asarray([question_kind(tokenizer.decode(ids.tolist())) for ids in pairs["chosen_ids"]])
        data[split] = {name: values for name, values in pairs.items() if not name.startswith("text_")}
    data["raw_pixel_probe"] = linear_probe(data["train"]["pixels"].astype(np.float32), data["train"]["digit"],
                                           data["val"]["pixels"].astype(np.float32), data["val"]["digit"])
    return data


def digits_of(pixels: np.ndarray) -> np.ndarray:
    """The digit of each pair's scan, by its pixels in scikit-learn's `load_digits` (-1: not found,
    i.e. not the bundled data)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = np.round(digits.images / 16 * 255).astype(np.uint8).reshape(len(digits.images), -1)
    lookup = {np.repeat(scan, 3).tobytes(): int(digit) for scan, digit in zip(scans, digits.target)}
    return np.asarray([lookup.get(row.tobytes(), -1) for row in pixels])


def question_kind(text: str) -> str:
    return next((kind for marker, kind in KINDS.items() if marker in text), "other")


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """Validation accuracy of a logistic regression from features to digit (one row per image)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = _one_row_per_image(train_x, train_y)
    val_x, val_y = _one_row_per_image(val_x, val_y)
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_x), train_y)
    return float(probe.score(scaler.transform(val_x), val_y))


def _one_row_per_image(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, first = np.unique(x.round(4), axis=0, return_index=True)
    return x[first], y[first]


# -------------------------------------------------------------------------------------- training
def train_and_measure(config_path: str, overrides: list[str], seed: int, steps: int | None, every: int, data: dict) -> dict:
    """One student, trained with `overrides` and distill.train.seed + `seed`, measured on validation."""
    import torch

    from kd_core.job import load_config
    from kd_core.losses import TeacherTargets
    from kd_core.tasks import task_named
    from kd_core.train.loop import make_optimizer
    from kd_core.train.spec import student_spec

    config = load_config(config_path, overrides)
    torch.set_num_threads(config.compute.cpus_per_worker)
    train_config = config.distill.train.model_copy(update={"seed": config.distill.train.seed + seed, **({"max_steps": steps} if steps else {})})
    task = task_named("reward")
    spec = student_spec(task, config.distill, config.student, data["prep"], data["store"], "unused", targets=data["cache"], train=train_config)
    model = task.build_model(spec)
    step_module = task.make_step(spec, model, data["store"])
    optimizer, schedule = make_optimizer(step_module, train_config)
    train, val = data["train"], data["val"]
    untrained_probe = image_probe(model, train, val)
    rng = np.random.default_rng(train_config.seed)
    curve, window, started = [], {}, time.perf_counter()
    columns = ("chosen_ids", "rejected_ids", "pixels", "human_label", "teacher_chosen", "teacher_rejected")
    for step in range(1, train_config.max_steps + 1):
        rows = rng.integers(0, len(train["pixels"]), train_config.batch_size)
        batch = {name: torch.from_numpy(train[name][rows]) for name in columns}
        batch = {name: value.long() if name.endswith("_ids") else value for name, value in batch.items()}
        batch["human_label"] = batch["human_label"].reshape(-1, 1)
        targets = TeacherTargets(chosen_rewards=batch["teacher_chosen"], rejected_rewards=batch["teacher_rejected"])
        terms = step_module(batch, targets)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(step_module.parameters(), train_config.grad_clip or float("inf"))
        optimizer.step()
        schedule.step()
        for name, value in terms.items():
            window.setdefault(name, []).append(float(value.detach()))
        if step % every == 0 or step == train_config.max_steps:
            point = {"step": step, **{name: float(np.mean(values)) for name, values in window.items()}}
            point["val_agreement"] = measure(model, val, data["pad_id"])["agreement"]
            curve.append(point)
            window = {}
            print(f"  {' '.join(overrides) or 'recipe'} seed {seed} step {step}: loss {point['loss']:.3f}, "
                  f"validation agreement {point['val_agreement']:.1%}", flush=True)
    result = measure(model, val, data["pad_id"], details=True)
    result["train_agreement"] = measure(model, {name: values[:1000] for name, values in train.items()}, data["pad_id"])["agreement"]
    result |= {"seed": train_config.seed, "probe": image_probe(model, train, val), "probe_untrained": untrained_probe,
               "curve": curve, "seconds": time.perf_counter() - started}
    return result


def image_vectors(model, pixels: np.ndarray) -> np.ndarray:
    """What the student's head sees of each image: late fusion's projected [CLS], prefix's mean of
    the projected patch tokens."""
    import torch

    model.eval()
    with torch.no_grad():
        tokens = torch.cat([model.image_tokens(torch.from_numpy(pixels[i : i + 512])) for i in range(0, len(pixels), 512)])
    model.train()
    vectors = tokens[:, 0] if model.config.fusion == "late" else tokens.mean(1)
    return vectors.float().numpy()


def image_probe(model, train: dict, val: dict) -> float:
    return linear_probe(image_vectors(model, train["pixels"]), train["digit"], image_vectors(model, val["pixels"]), val["digit"])


def measure(model, pairs: dict, pad_id: int, details: bool = False) -> dict:
    from kd_core.eval.reward import agrees_with_teacher, preference_scores, score_pairs

    model.eval()
    student = score_pairs(model, pairs, 256, pad_id, "cpu", text_view=False)
    model.train()
    teacher = {"chosen": pairs["teacher_chosen"], "rejected": pairs["teacher_rejected"]}
    scores = preference_scores(student, teacher, pairs["human_label"][:, 0])
    result = {"agreement": scores["pairwise_accuracy_teacher"], "human_accuracy": scores.get("pairwise_accuracy_human", float("nan")),
              "spearman": scores["spearman_teacher"], "kl": scores["preference_kl_to_teacher"]}
    if details:
        agrees = agrees_with_teacher(student["chosen"] - student["rejected"], teacher["chosen"] - teacher["rejected"])
        result["by_kind"] = {str(kind): float(agrees[pairs["kind"] == kind].mean()) for kind in np.unique(pairs["kind"])}
        result["by_digit"] = {str(digit): float(agrees[pairs["digit"] == digit].mean()) for digit in np.unique(pairs["digit"])}
    return result


# ---------------------------------------------------------------------------------------- output
def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_tables(by_variant: dict[str, list[dict]], raw_probe: float) -> None:
    seeds = len(next(iter(by_variant.values())))
    print(f"\nvalidation split, mean ± standard deviation over {seeds} seed(s); linear probe of raw pixels: {raw_probe:.3f}")
    print(f"{'variant':<22}" + "".join(f"{name:>18}" for name in (*HEADLINE, "probe (untrained)", "seconds")))
    for name, runs in by_variant.items():
        cells = [mean_spread([run[metric] for run in runs]) for metric in (*HEADLINE, "probe_untrained")]
        print(f"{name:<22}" + "".join(f"{cell:>18}" for cell in cells) + f"{statistics.mean(run['seconds'] for run in runs):>18.0f}")
    print("\nagreement by question kind and by digit (mean over seeds)")
    for name, runs in by_variant.items():
        kinds = {kind: statistics.mean(run["by_kind"][kind] for run in runs) for kind in runs[0]["by_kind"]}
        digits = {digit: statistics.mean(run["by_digit"][digit] for run in runs) for digit in runs[0]["by_digit"]}
        print(f"{name:<22}" + ", ".join(f"{k} {v:.0%}" for k, v in kinds.items()) + " | " + " ".join(f"{d}:{v:.0%}" for d, v in digits.items()))
    print("\nvalidation agreement over training (mean over seeds)")
    for name, runs in by_variant.items():
        points = zip(*(run["curve"] for run in runs))
        print(f"{name:<22}" + " ".join(f"{p[0]['step']}:{statistics.mean(x['val_agreement'] for x in p):.0%}" for p in points))
    print(json.dumps({name: [run["curve"][-1] for run in runs] for name, runs in by_variant.items()})[:2000])


def plot_curves(panels: list[dict[str, list[dict]]], path: Path) -> None:
    """Validation agreement over training per variant: the mean over seeds, and the band between
    the lowest and the highest seed; one panel per group of variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    for axis, by_variant in zip(axes[0], panels):
        for name, runs in by_variant.items():
            steps = [point["step"] for point in runs[0]["curve"]]
            values = np.array([[point["val_agreement"] for point in run["curve"]] for run in runs])
            line = axis.plot(steps, values.mean(0), marker="o", markersize=3, label=f"{name} ({len(runs)} seeds)")[0]
            axis.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
        axis.set_xlabel("optimizer step")
        axis.axhline(0.9, color="grey", linestyle=":", linewidth=1)
        axis.legend(fontsize=7, loc="lower right")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("agreement with the teacher (validation pairs)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
