"""Does distilling from the cache cost quality? The same student, distilled four ways.

On the job's data, teacher and student (default: the demo), the student is distilled with the
same objective weights, steps, seed and data order from:

1. online: the teacher runs on every batch; full logits (forward KL);
2. the top-k cache (`cache.top_k`, 12-bit log-probs + tail);
3. the sampled cache (Random-Sampling KD, `cache.num_samples` draws);
4. the sampled cache with the fused chunked loss (`distill.loss.fused`).

Each is evaluated on the held-out split: perplexity, KL(teacher ‖ student) and expected
calibration error, beside the teacher and the no-teacher baseline. Every step is a pipeline stage,
so reruns reuse finished caches and students (the demo's top-k student is the demo's own).

    .venv/bin/python benchmarks/cache_quality.py                  # configs/demo.yaml
    .venv/bin/python benchmarks/cache_quality.py configs/tiny.yaml compute.backend=local

Appends a record to benchmarks/results/cache_quality.jsonl.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_log import append_result  # noqa: E402

from kd_core.stages.cache import cache  # noqa: E402
from kd_core.job import load_config  # noqa: E402
from kd_core.stages.prep import prep  # noqa: E402
from kd_core.data.shards import load_split  # noqa: E402
from kd_core.eval import measure_models  # noqa: E402
from kd_core.models import load_causal_lm, local_copy  # noqa: E402
from kd_core.storage import Store  # noqa: E402
from kd_core.stages.distill import baseline, distill  # noqa: E402
from kd_core.stages.teacher import teacher  # noqa: E402
from kd_core.models.teacher import teacher_model_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cache_quality.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    store, compute = Store(config.storage), config.compute
    prepared = prep(config.data, store)
    taught = teacher(config.teacher, prepared, store, compute)
    caches = {
        "topk": cache(config.cache.model_copy(update={"format": "topk"}), prepared, taught, store, compute),
        "sampled": cache(config.cache.model_copy(update={"format": "sampled"}), prepared, taught, store, compute),
    }
    fused_loss = config.distill.loss.model_copy(update={"fused": True})
    ways = {
        "online, full logits": (config.distill.model_copy(update={"teacher_source": "online"}), taught),
        f"top-{config.cache.top_k} cache": (config.distill.model_copy(update={"teacher_source": "cache"}), caches["topk"]),
        f"sampled-{config.cache.num_samples} cache": (config.distill.model_copy(update={"teacher_source": "cache"}), caches["sampled"]),
        f"sampled-{config.cache.num_samples} cache, fused loss": (
            config.distill.model_copy(update={"teacher_source": "cache", "loss": fused_loss}),
            caches["sampled"],
        ),
    }
    students = {}
    for label, (section, targets) in ways.items():
        started = time.perf_counter()
        students[label] = distill(section, config.student, prepared, targets, store, compute)
        print(f"{label}: {'reused' if students[label].reused else f'trained in {time.perf_counter() - started:.0f} s'}")
    students["no teacher (CE only)"] = baseline(config.distill, config.student, prepared, store, compute)

    rows = torch.from_numpy(load_split(store, prepared, config.eval.split, config.eval.max_rows))
    teacher_model = load_causal_lm(teacher_model_dir(store, taught)).eval()
    models = {"teacher": teacher_model}
    models |= {label: load_causal_lm(local_copy(store, manifest.details["model_folder"])).eval() for label, manifest in students.items()}
    scores = measure_models(models, rows, config.eval.batch_size)
    table = {}
    for label, result in scores.items():
        table[label] = {name: result[name] for name in ("cross_entropy", "perplexity", "kl_to_teacher", "ece")}
        table[label]["train_seconds"] = students[label].metrics.get("train_seconds") if label in students else None

    print(f"\nheld-out {config.eval.split} split, {rows.numel():,} tokens")
    print(f"{'student distilled from':<36}{'perplexity':>12}{'KL(teacher||s)':>16}{'ECE':>8}{'train s':>9}")
    for label, result in table.items():
        seconds = result.get("train_seconds")
        print(
            f"{label:<36}{result['perplexity']:>12.2f}{result['kl_to_teacher']:>16.4f}{result['ece']:>8.4f}"
            f"{'' if seconds is None else f'{seconds:.0f}':>9}"
        )
    fields = {
        "tokens": int(rows.numel()),
        "results": {label: {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))} for label, result in table.items()},
        "cache_bytes_per_token": {name: manifest.metrics["bytes_per_token"] for name, manifest in caches.items()},
    }
    append_result(args.results, f"python benchmarks/cache_quality.py {args.config} {' '.join(args.overrides)}".strip(), fields)


if __name__ == "__main__":
    main()
