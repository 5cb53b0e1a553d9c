"""Held-out measurements of sentence encoders (`task: embedding`): every model embeds the same
held-out texts; the students are compared with the teacher (`kd_core/eval/embedding_metrics.py`).

Per student (the distilled one, the no-teacher baseline, and a student cut from the teacher as it
started, `start`):
- `recall_at_10`: retrieval fidelity, the share of each text's 10 nearest held-out texts by the
  teacher that the student finds among its own 10 nearest;
- `spearman`: Spearman correlation of the two models' cosine similarities over pairs of texts;
- `mean_cosine`: the mean cosine to the teacher's embedding of the same text (students as wide as
  the teacher only);
- the same recall and Spearman at each Matryoshka prefix width (`distill.embedding.matryoshka_dims`
  and the full width), for the report's plot.

Per model: `parameters`, `weight_bytes` (the safetensors on disk), `sentences_per_s` (the held-out
texts through the encoder in batches of `batch_size`, after one untimed warm-up batch) and
`latency_ms` (the median time to embed one text, over the first `throughput_batches` × 4 texts).
The uniform row holds what an encoder that learned nothing scores: random embeddings find
k/(N − 1) of the teacher's neighbours (`recall_at_10`) and correlate 0 (`spearman`).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from kd_core.data.shards import read_columns, split_shards
from kd_core.eval import parameter_bytes, synchronize
from kd_core.eval.embedding_metrics import embedding_fidelity
from kd_core.models import count_parameters, model_copy
from kd_core.models.encoders import TextTokenizer, embed_rows, load_sentence_encoder
from kd_core.models.teacher import teacher_model_dir
from kd_core.progress import progress_bar

NEIGHBOURS = 10


def measure_encoders(
    config, prep, teacher, student, baseline, store, device, dims: list[int], start_model=None, tokenizer: TextTokenizer | None = None,
) -> tuple[dict, dict, dict]:
    """({rows} of the held-out split, each model's metrics, {model: per-width fidelity} for the
    plot). `start_model`: the student before distillation (an encoder), when it did not start from
    random weights. `tokenizer`: the students' own (another encoder folder's), with which they read
    the texts; the teacher reads the prepared ids."""
    rows = read_columns(store, split_shards(prep, config.split), config.max_rows)
    count = len(rows["input_ids"])
    if count <= NEIGHBOURS:
        raise ValueError(f"eval: the {config.split} split holds {count} texts; retrieval fidelity needs more than {NEIGHBOURS}: add data or raise data.{config.split}_fraction")
    models = {"teacher": teacher_model_dir(store, teacher), "student": model_copy(store, student)}
    if baseline is not None:
        models["baseline"] = model_copy(store, baseline)
    scores, curves, teacher_embeddings = {}, {}, None
    with progress_bar("eval: embed", total=count * (len(models) + (start_model is not None))) as bar:
        for name in [*models, *(["start"] if start_model is not None else [])]:
            folder = models.get(name)
            model = (load_sentence_encoder(folder) if folder is not None else start_model).to(device).eval()
            embeddings, speed = embed_and_time(model, rows, config.batch_size, config.throughput_batches, device, None if name == "teacher" else tokenizer)
            bar.advance(count)
            scores[name] = speed | {
                "parameters": count_parameters(model),
                "weight_bytes": sum(f.stat().st_size for f in folder.rglob("*.safetensors")) if folder is not None else parameter_bytes(model),
                "dimension": int(embeddings.shape[1]),
            }
            if name == "teacher":
                teacher_embeddings = embeddings
                continue
            widths = sorted({*[d for d in dims if d <= embeddings.shape[1]], embeddings.shape[1]})
            fidelity = embedding_fidelity(embeddings, teacher_embeddings, k=NEIGHBOURS, dims=widths)
            curves[name] = fidelity.pop("dims")
            scores[name] |= {"recall_at_10": fidelity[f"recall_at_{NEIGHBOURS}"], "spearman": fidelity["spearman"]}
            if "mean_cosine" in fidelity:
                scores[name]["mean_cosine"] = fidelity["mean_cosine"]
    scores["uniform"] = {"recall_at_10": NEIGHBOURS / (count - 1), "spearman": 0.0}
    return {"rows": count}, scores, curves


def embed_and_time(model, rows: dict[str, np.ndarray], batch_size: int, latency_texts: int, device, tokenizer=None) -> tuple[np.ndarray, dict]:
    """(the rows' embeddings, {sentences_per_s, latency_ms}): one untimed warm-up batch, then every
    batch timed (device synchronised; a model with its own `tokenizer` is timed with its
    tokenization), then `latency_texts` × 4 texts one at a time."""
    embed_rows(model, {name: values[:batch_size] for name, values in rows.items()}, batch_size, device, tokenizer)  # warm-up
    synchronize(device)
    began = time.perf_counter()
    embeddings = embed_rows(model, rows, batch_size, device, tokenizer)
    synchronize(device)
    seconds = time.perf_counter() - began
    latencies = []
    for index in range(min(latency_texts * 4, len(rows["input_ids"]))):
        one = {name: values[index : index + 1] for name, values in rows.items()}
        synchronize(device)
        began = time.perf_counter()
        embed_rows(model, one, 1, device, tokenizer)
        synchronize(device)
        latencies.append(time.perf_counter() - began)
    return embeddings, {"sentences_per_s": len(embeddings) / max(seconds, 1e-9), "latency_ms": 1000 * statistics.median(latencies)}


def fidelity_png(curves: dict[str, list[dict]], labels: dict[str, str], teacher_dimension: int) -> bytes:
    """Recall@10 and Spearman against the teacher at each prefix width, one line per student."""
    from kd_core.eval.figures import COLORS, figure_png, pyplot

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    for name, points in curves.items():
        widths = [point["dim"] for point in points]
        for axis, key in zip(axes, (f"recall_at_{NEIGHBOURS}", "spearman"), strict=True):
            axis.plot(widths, [point[key] for point in points], "o-", color=COLORS.get(name, "#2ca02c"), label=labels.get(name, name))
    for axis, title in zip(axes, (f"retrieval fidelity: recall@{NEIGHBOURS} of the teacher's neighbours", "Spearman ρ of pairwise similarities"), strict=True):
        axis.set(xlabel=f"embedding width used (prefix; the teacher's is {teacher_dimension})", title=title, ylim=(0, 1.02))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=9)
    return figure_png(figure)

