"""`task: embedding`: a sentence encoder distilled into a smaller, faster one.

- prep: texts (the paragraphs and headings of the documents), one per row, tokenized the way the
  teacher reads them (`kd_core/data/embedding_text.py`); the tokenizer is the teacher's
  (`data.tokenizer`, which defaults to `teacher.path`), or a byte-level BPE trained here;
- models: sentence encoders (`kd_core/models/encoders.py`): an encoder, pooling, an optional
  projection, optional normalisation. The teacher is any sentence-transformers or Hugging Face
  encoder folder (`teacher.path`; its pooling and normalisation read from its own modules), or a
  BERT kdflow trains with SimCSE. The student is a BERT built from config (`student.architecture`,
  `student.embedding`), or cut from the teacher (`init: from_teacher`: evenly spaced blocks by
  default, optionally a narrower output through a learned projection, `student.embedding.output_dim`);
- objective: `distill.embedding` (`kd_core/losses/embedding.py`): MSE, cosine, Matryoshka,
  relational (RKD distance and angle, similarity KL) and soft-label contrastive terms, weighted;
  the no-teacher baseline learns SimCSE on the same texts;
- teacher outputs: each text's teacher embedding (float16), for the training and the validation
  texts (`kd_core.cache.format`, format `embedding`);
- validation: the similarity-structure error to the teacher (`val_loss`) and recall@10 of its
  neighbours; eval: retrieval fidelity, Spearman of similarities, mean cosine, the same at every
  Matryoshka width, speed and size (`kd_core/eval/embedding.py`);
- registry: MLflow's sentence-transformers flavour: the folder is a sentence-transformers model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kd_core.tasks.base import Task, models_table

if TYPE_CHECKING:
    import torch
    from rich.table import Table

    from kd_core.cache.format import CacheLayout

LABELS = {"teacher": "teacher", "start": "student before distillation", "student": "KD student", "baseline": "no-teacher student (SimCSE)"}
SIMCSE_TEMPERATURE = 0.05
"""The temperature of SimCSE (Gao et al., 2021), what the baseline and a teacher kdflow trains learn."""


class Embedding(Task):
    name = "embedding"
    data_sources = ("python-docs", "files")
    metrics = ("recall_at_10", "spearman", "mean_cosine", "parameters", "weight_bytes", "sentences_per_s", "latency_ms", "dimension")
    # Random embeddings find k/(N − 1) of the teacher's neighbours; a student must find twice that.
    sanity_gates = ("student.recall_at_10 > 2 * uniform.recall_at_10", "student.recall_at_10 > baseline.recall_at_10")
    objective_field = "embedding"
    pretrained_reads_data_ids = False  # a student from another encoder folder reads the text with its own tokenizer
    validation_modes = {"val_loss": "min", "val_recall_at_10": "max"}
    validation_label = "similarity error to the teacher (mean squared cosine difference)"
    validation_labels = {"val_recall_at_10": "recall@10 of the teacher's neighbours"}

    # ----------------------------------------------------------------------------- the job config
    def check_config(self, job) -> None:
        super().check_config(job)
        distill, student = job.distill, job.student
        if distill.teacher_source != "cache":
            raise ValueError(
                "distill.teacher_source: an embedding teacher's output for a text never changes, and the cache keeps it in 2 bytes per "
                "dimension; set it to cache"
            )
        if distill.baseline and distill.train.dropout == 0:
            raise ValueError("distill.train.dropout: the no-teacher baseline learns SimCSE, whose two views of a text differ only by dropout; set it above 0 (SimCSE uses 0.1) or distill.baseline: false")
        if job.teacher.finetune:
            raise ValueError("teacher.finetune: an embedding teacher is used as it is (teacher.path) or trained here with SimCSE (teacher.path unset); set finetune: false")
        if job.teacher.path is None and job.teacher.train.dropout == 0:
            raise ValueError("teacher.train.dropout: a teacher kdflow trains learns SimCSE, whose two views of a text differ only by dropout; set it above 0 (SimCSE uses 0.1)")
        if student.init == "from_teacher" and (student.from_teacher.hidden_size or student.from_teacher.intermediate_size):
            raise ValueError("student.from_teacher: an encoder is cut by blocks only; for a narrower embedding set student.embedding.output_dim")
        if student.init == "config":
            width = student.embedding.output_dim or student.architecture.hidden_size
            too_wide = [dim for dim in distill.embedding.matryoshka_dims if dim > width]
            if too_wide:
                raise ValueError(f"distill.embedding.matryoshka_dims: {too_wide} exceed the student's embedding width ({width})")

    @property
    def tunable_prefixes(self) -> tuple[str, ...]:
        return ("distill.embedding.", "distill.train.", "student.architecture.", "student.embedding.")

    # ------------------------------------------------------------------------------------- prep
    def data_settings(self, data) -> dict:
        return data.model_dump(mode="json", exclude={"preferences", "exact_answers", "chat", "table"})

    def prepare(self, data, store, run, source) -> tuple[dict, dict]:
        from kd_core.data.embedding_text import prepare_embedding_texts

        return prepare_embedding_texts(data, store, run, source)

    def separates_documents(self) -> bool:
        return False  # each text is its own row

    # ---------------------------------------------------------------------------------- training
    def student_settings(self, student) -> dict:
        return student.model_dump(mode="json", include={"architecture", "embedding", "init", "path", "from_teacher"})

    def student_inputs(self, student, prep, store, force=False) -> dict:
        """A student from another encoder folder (`student.init: pretrained`) reads the texts with
        its own tokenizer: the folder's, copied into the store by the `student_tokenizer` step (and
        saved beside the distilled model instead of the data's)."""
        if student.init != "pretrained":
            return {}
        from kd_core.config import StudentTokenizerConfig
        from kd_core.data.student_tokenizer import student_tokenizer_step

        settings = StudentTokenizerConfig(path=student.path)
        return {"student_tokenizer": student_tokenizer_step(settings, prep, store, force, field="student.path", separates_documents=False)}

    def columns(self, role: str, prep_details: dict) -> tuple[str, ...]:
        """A student may read the text with its own tokenizer (`student.init: pretrained`)."""
        return ("input_ids", "tokens") if role == "teacher" else ("input_ids", "tokens", "text_bytes", "text_length")

    def build_model(self, spec) -> torch.nn.Module:
        """A teacher kdflow trains: a BERT from `teacher.architecture`, mean-pooled and normalised.
        A student: another encoder folder, cut from the teacher (`student_start`) or built from config."""
        from kd_core.models.encoders import build_sentence_encoder

        common = {"pad_id": spec.special_token_ids["pad"], "seed": spec.train.seed, "dropout": spec.train.dropout}
        if spec.role == "teacher":
            return build_sentence_encoder(spec.architecture, spec.vocab_size, spec.seq_len, **common)
        settings = spec.student.embedding
        if spec.student_start.init in ("from_teacher", "pretrained"):
            return start_model(spec.student_start, spec.storage, settings.output_dim, spec.train.seed, spec.train.dropout, spec.seq_len).train()
        return build_sentence_encoder(
            spec.architecture, spec.vocab_size, spec.seq_len, **common, pooling=settings.pooling, normalize=settings.normalize, output_dim=settings.output_dim,
        )

    def make_step(self, spec, model, store) -> torch.nn.Module:
        from kd_core.losses.embedding import EmbeddingObjective
        from kd_core.tasks.embedding_step import EmbeddingStep

        tokenizer = own_tokenizer(spec, store)
        if spec.objective is None:  # the baseline, and a teacher kdflow trains
            return EmbeddingStep(model, None, SIMCSE_TEMPERATURE, tokenizer)
        teacher_dim = spec.cache_layout["slots"]
        dims = spec.objective.matryoshka_dims
        if any(dim > model.dimension for dim in dims):
            raise ValueError(f"distill.embedding.matryoshka_dims: {dims} exceed the student's embedding width ({model.dimension})")
        return EmbeddingStep(model, EmbeddingObjective.from_config(spec.objective, model.dimension, teacher_dim), SIMCSE_TEMPERATURE, tokenizer)

    def batch_tokens(self, batch) -> int:
        return int(batch["tokens"].sum())

    def validation_reads_cache(self) -> bool:
        return True  # the teacher's embeddings of the validation texts

    def validation_metrics(self, model, rows, batch_size, spec, device) -> dict[str, float]:
        from kd_core.storage import Store
        from kd_core.tasks.embedding_step import similarity_fit

        return similarity_fit(model, rows, batch_size, device, own_tokenizer(spec, Store(spec.storage)))

    # ------------------------------------------------------------------------ teacher outputs
    def cache_splits(self) -> tuple[str, ...]:
        return ("train", "val")  # a search trial's student is validated against the latter

    def cache_layout(self, config, prep, store, teacher) -> CacheLayout:
        """One embedding per text, as wide as the teacher's."""
        from kd_core.cache.format import CacheLayout, CacheSettingsError
        from kd_core.models.encoders import encoder_width, read_sentence_config
        from kd_core.models.teacher import teacher_model_config, teacher_model_dir

        model_config = teacher_model_config(store, teacher)
        data_vocab = prep.details["vocab_size"]
        if model_config.get("vocab_size", data_vocab) < data_vocab:
            raise CacheSettingsError(
                f"teacher: its embedding table holds {model_config['vocab_size']} tokens (config.json vocab_size) but the prepared data's "
                f"tokenizer has {data_vocab}; prepare the data with the teacher's own tokenizer (data.tokenizer: the teacher's folder)"
            )
        folder = teacher_model_dir(store, teacher)
        settings = read_sentence_config(folder)
        problem = settings.reading_problem(prep.details["seq_len"], "the teacher")
        if problem:
            raise CacheSettingsError(problem)
        width = encoder_width(model_config)
        if settings.dense_folder is not None:
            import json

            width = json.loads((folder / settings.dense_folder / "config.json").read_text())["out_features"]
        return CacheLayout(format="embedding", seq_len=prep.details["seq_len"], vocab_size=data_vocab, slots=width)

    def load_cache_teacher(self, model_dir, device, layout, prep_details, positions_per_chunk=None):
        from kd_core.models.encoders import load_sentence_encoder
        from kd_core.tasks.embedding_step import CachedEmbeddings

        return CachedEmbeddings(load_sentence_encoder(model_dir).to(device).eval(), device)

    # ---------------------------------------------------------------------------------- eval
    def measure(self, config, prep, teacher, student, baseline, store, run, device) -> tuple[dict, dict, dict]:
        import json

        from kd_core.eval.embedding import measure_encoders

        record = student.details.get("student_start", {})
        start = None
        if record.get("init") in ("from_teacher", "pretrained"):
            from kd_core.train.spec import StudentStart

            begun = StudentStart(record["init"], path=record.get("path"), weights_identity=record.get("weights_identity"), teacher=teacher, layers=tuple(record.get("layers") or ()))
            output_dim = student.config["student"]["embedding"]["output_dim"]
            start = start_model(begun, store.config, output_dim, student.config["train"]["seed"], 0.0, prep.details["seq_len"])
        dims = list(student.config.get("loss", {}).get("matryoshka_dims", []))
        tokenizer = None
        if "student_tokenizer" in student.inputs:  # the students read the texts with their own folder's tokenizer
            from kd_core.models import model_copy
            from kd_core.models.encoders import TextTokenizer

            tokenizer = TextTokenizer.of_folder(model_copy(store, student), prep.details["seq_len"])
        held_out, scores, curves = measure_encoders(config, prep, teacher, student, baseline, store, device, dims, start, tokenizer)
        run.write_bytes("fidelity_by_width.json", json.dumps(curves, indent=2).encode())
        return held_out, scores, {"curves": curves, "teacher_dimension": scores["teacher"]["dimension"]}

    def training_curves_png(self, histories, metrics) -> bytes:
        from kd_core.eval.plots import CurvesSpec, training_curves_png

        return training_curves_png(histories, metrics, CurvesSpec(LABELS, "loss", "training loss", "recall_at_10", "recall@10 of the teacher's neighbours", "{:.1%}"))

    def report_html(self, job_name, metrics, histories, extras) -> str:
        from kd_core.eval.embedding import fidelity_png
        from kd_core.eval.figures import metrics_table_html
        from kd_core.eval.report import report_html

        columns = [
            ("recall_at_10", "recall@10 of the teacher's neighbours", "{:.1%}"), ("spearman", "Spearman ρ of similarities", "{:.3f}"),
            ("mean_cosine", "mean cosine to the teacher", "{:.3f}"), ("dimension", "width", "{:,}"), ("parameters", "parameters", "{:,}"),
            ("weight_bytes", "size on disk", None), ("sentences_per_s", "sentences/s", "{:,.0f}"), ("latency_ms", "latency (ms/text)", "{:.1f}"),
        ]
        table = metrics_table_html(metrics, columns, LABELS, not_for_teacher=("recall_at_10", "spearman", "mean_cosine"))
        figures = {"training_curves": self.training_curves_png(histories, metrics)}
        if extras and extras.get("curves"):
            figures["fidelity_by_width"] = fidelity_png(extras["curves"], LABELS, extras["teacher_dimension"])
        return report_html(job_name, metrics, figures, table, f'{metrics["rows"]:,} held-out texts')

    # ------------------------------------------------------------------------------- preflight
    def preflight_checks(self, job, records, *, deep) -> list[tuple[str, str, str]]:
        """Cheap: the teacher (its folder's JSON files) and the student, described. Deep: the texts,
        the teacher's embeddings and the objective on the first `records` documents."""
        from kd_core.tasks.embedding_preflight import cheap_rows, deep_rows

        return [*cheap_rows(job), *(deep_rows(job, records) if deep else [])]

    # --------------------------------------------------------------------------------- register
    def log_model(self, model_dir):
        from kd_core.registry import log_sentence_transformer

        return log_sentence_transformer(model_dir)

    # ------------------------------------------------------------------------------------- CLI
    def headline(self, step, manifest) -> str | None:
        metrics, details = manifest.metrics, manifest.details
        if step == "prep":
            cut = metrics.get("train_truncated", 0) / max(metrics["train_texts"], 1)
            cut_note = f"; {cut:.0%} of the training texts cut at data.seq_len={details['seq_len']}" + (" (!)" if cut > 0.5 else "") if cut else ""
            return (f"{metrics['documents']:,} docs -> {metrics['train_texts']:,} train, {metrics['val_texts']:,} val, {metrics['test_texts']:,} test texts; "
                    f"vocab {details['vocab_size']:,}{cut_note}")
        if step == "cache":
            layout = details["layout"]
            texts = sum(shard["rows"] for shard in details["shards"])
            return f"teacher embeddings of {texts:,} texts, {layout['slots']} dimensions (float16)"
        if step == "eval":
            return f"{metrics['rows']:,} held-out texts ({metrics['split']})"
        return None

    def comparison_table(self, metrics) -> Table:
        def cells(row: dict, teacher: bool) -> tuple[str, ...]:
            recall = "—" if teacher else f"{row['recall_at_10']:.1%}"
            rho = "—" if teacher else f"{row['spearman']:.3f}"
            return f"{row['parameters']:,}", f"{row['dimension']}", recall, rho, f"{row['sentences_per_s']:,.0f}", f"{row['latency_ms']:.1f}"

        table = models_table(
            f"held-out {metrics['split']} split, {metrics['rows']:,} texts; speed on {metrics.get('device', 'this machine')}",
            ("model", "parameters", "width", "recall@10 of teacher's neighbours", "Spearman ρ", "sentences/s", "ms/text"), LABELS, metrics, cells,
        )
        if "baseline" in metrics:
            gain = metrics["student"]["recall_at_10"] - metrics["baseline"]["recall_at_10"]
            speed = metrics["student"]["sentences_per_s"] / max(metrics["teacher"]["sentences_per_s"], 1e-9)
            table.caption = f"the distilled student keeps {metrics['student']['recall_at_10']:.1%} of the teacher's neighbours ({gain * 100:+.1f} points against the no-teacher student) at {speed:.1f}× the teacher's speed"
            if "start" in metrics and metrics["start"]["recall_at_10"] > metrics["student"]["recall_at_10"]:
                table.caption += f"; (!) below the student before distillation ({metrics['start']['recall_at_10']:.1%}): training lost fidelity"
        return table

    def best_trial_metrics(self, val_loss: float) -> dict[str, float]:
        return {"best_val_similarity_error": val_loss}


def start_model(start, storage, output_dim: int | None, seed: int, dropout: float, seq_len: int):
    """The encoder a student starts as when not from config: another encoder folder as it is
    (`pretrained`), or the teacher step's encoder with only blocks `start.layers` (`from_teacher`);
    with its pooling, normalisation and projection, or a new seeded projection to `output_dim` when
    that is set; it reads texts of up to `seq_len` tokens (prep's cut)."""
    from kd_core.models.encoders import load_sentence_encoder, started_from
    from kd_core.models.students import pretrained_model_dir
    from kd_core.models.teacher import teacher_model_dir
    from kd_core.storage import Store

    if start.init == "pretrained":
        source = load_sentence_encoder(pretrained_model_dir(start.path, start.weights_identity, Store(storage), start.field), dropout=dropout)
        return started_from(source, None, output_dim, seed, seq_len)
    source = load_sentence_encoder(teacher_model_dir(Store(storage), start.teacher), dropout=dropout)
    return started_from(source, start.layers, output_dim, seed, seq_len)


def own_tokenizer(spec, store):
    """A student's own tokenizer when it has one (the `student_tokenizer` step: `student.init:
    pretrained`), cut at the data's `seq_len`; None: it reads the prepared ids."""
    if "student_tokenizer" not in spec.student_inputs or spec.role != "student":
        return None
    from kd_core.models import local_copy
    from kd_core.models.encoders import TextTokenizer

    return TextTokenizer.of_folder(local_copy(store, spec.tokenizer_folder), spec.seq_len)
