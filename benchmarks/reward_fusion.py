"""How fast does a multimodal reward student learn from the teacher's rewards? `late` vs `prefix` fusion.

On the reward recipe's data, teacher and cache (default: configs/reward_multimodal.yaml; prep,
teacher and cache are reused when done), the student is trained twice with the same seed, batches,
optimizer (kdflow's AdamW with the config's warmup and a cosine decay over `--steps`) and
objective (`distill.reward`): once with each `student.vision.fusion`. No DeepSpeed or Ray: the
training step itself (`RewardStep`), in this process. Every `--every` steps both are scored on the validation pairs: the
share of pairs on which they prefer the response the teacher prefers. The table puts the two side
by side; the last column is late − prefix.

    .venv/bin/python benchmarks/reward_fusion.py                       # configs/reward_multimodal.yaml
    .venv/bin/python benchmarks/reward_fusion.py --steps 200 --every 100 configs/reward_tiny.yaml storage.root=/tmp/x

Appends a record to benchmarks/results/reward_fusion.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_log import append_result  # noqa: E402

from kd_core.cache import cache_shards  # noqa: E402
from kd_core.job import load_config  # noqa: E402
from kd_core.data.shards import decode_arrow, read_verified  # noqa: E402
from kd_core.eval.reward import load_pairs, score_pairs  # noqa: E402
from kd_core.losses import RewardObjective, TeacherTargets  # noqa: E402
from kd_core.models.reward import build_multimodal_reward_model, load_reward_model  # noqa: E402
from kd_core.pipeline import cache_steps, prep_step  # noqa: E402
from kd_core.storage import Store  # noqa: E402
from kd_core.train.loop import make_optimizer  # noqa: E402
from kd_core.tasks.reward_step import RewardStep  # noqa: E402
from kd_core.models.teacher import teacher_model_dir  # noqa: E402

FUSIONS = ("late", "prefix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/reward_multimodal.yaml")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value config overrides")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "reward_fusion.jsonl")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    torch.set_num_threads(config.compute.cpus_per_worker)
    store = Store(config.storage)
    prep = prep_step(config)
    steps = cache_steps(config, prep)
    train, val = load_pairs(store, prep, "train"), load_pairs(store, prep, "val")
    cached = [decode_arrow(read_verified(store, record), record.url) for record in cache_shards(steps["cache"])]
    train["teacher_chosen"] = np.concatenate([shard["teacher_chosen"][:, 0] for shard in cached])
    train["teacher_rejected"] = np.concatenate([shard["teacher_rejected"][:, 0] for shard in cached])
    pad_id = prep.details["pad_id"]
    teacher = score_pairs(load_reward_model(teacher_model_dir(store, steps["teacher"])), val, 256, pad_id, "cpu", text_view=True)
    teacher_prefers = (teacher["chosen"] - teacher["rejected"]) > 0
    curves, seconds = {}, {}
    for fusion in FUSIONS:
        curves[fusion], seconds[fusion] = train_and_score(config, prep, train, val, teacher_prefers, fusion, args.steps, args.every)
    print(f"\nvalidation pairs on which the student prefers what the teacher prefers ({len(teacher_prefers)} pairs)")
    print(f"{'step':>6} {'late':>8} {'prefix':>8} {'late − prefix':>14}")
    for step in curves["late"]:
        late, prefix = curves["late"][step], curves["prefix"][step]
        print(f"{step:>6} {late:>8.1%} {prefix:>8.1%} {100 * (late - prefix):>+13.1f}pt")
    print(f"seconds: late {seconds['late']:.0f}, prefix {seconds['prefix']:.0f} (ratio {seconds['prefix'] / seconds['late']:.2f}×)")
    append_result(
        args.results,
        " ".join(["python", "benchmarks/reward_fusion.py", *sys.argv[1:]]),
        {"config": args.config, "curves": {f: {str(k): v for k, v in c.items()} for f, c in curves.items()}, "seconds": seconds},
    )


def train_and_score(config, prep, train, val, teacher_prefers, fusion, steps, every) -> tuple[dict[int, float], float]:
    vision = config.student.vision.model_copy(update={"fusion": fusion})
    model = build_multimodal_reward_model(
        vision, config.student.architecture, prep.details["vocab_size"], prep.details["seq_len"],
        image_size=prep.details["image_size"], pad_id=prep.details["pad_id"], seed=config.distill.train.seed,
    )
    step_module = RewardStep(model, RewardObjective.from_config(config.distill.reward), multimodal=True, pad_id=prep.details["pad_id"])
    optimizer, schedule = make_optimizer(step_module, config.distill.train.model_copy(update={"max_steps": steps}))
    rng = np.random.default_rng(config.distill.train.seed)
    batch_size, curve, started = config.distill.train.batch_size, {}, time.perf_counter()
    for step in range(1, steps + 1):
        rows = rng.integers(0, len(train["pixels"]), batch_size)
        batch = {name: torch.from_numpy(values[rows]) for name, values in train.items() if not name.startswith("text_")}
        batch = {name: value.long() if name.endswith("_ids") else value for name, value in batch.items()}
        terms = step_module(batch, TeacherTargets.from_batch(batch))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(step_module.parameters(), config.distill.train.grad_clip or float("inf"))
        optimizer.step()
        schedule.step()
        if step % every == 0:
            model.eval()
            with torch.no_grad():
                scores = score_pairs(model, val, 256, prep.details["pad_id"], "cpu", text_view=False)
            model.train()
            curve[step] = float(np.mean(((scores["chosen"] - scores["rejected"]) > 0) == teacher_prefers))
            print(f"{fusion:>6} step {step}: loss {float(terms['loss'].detach()):.3f}, agreement with the teacher {curve[step]:.1%}", flush=True)
    return curve, time.perf_counter() - started


if __name__ == "__main__":
    main()
