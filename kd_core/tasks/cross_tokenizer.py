"""`task: cross_tokenizer`: a language-model teacher distilled into a student with another tokenizer.

- prep: text rows that keep their characters, with the teacher's view of each and its tokens'
  character offsets (`kd_core/data/cross_text.py`); the teacher's tokenizer is `data.tokenizer`,
  or a byte-level BPE trained here;
- the student's tokenizer: a step of its own (`student_tokenizer`, `kd_core/data/student_tokenizer.py`):
  `student.tokenizer.path`, or one of another kind and size trained on the prepared text. The
  student and the baseline read it; prep and the cache never do, so one cache serves students
  with any tokenizer;
- models: Llama-style causal LMs from config, each with its own vocabulary; the teacher learns
  next-token cross-entropy on its view, the student on its own plus the KD term of
  `distill.cross_tokenizer` over the spans the two tokenizations share (`cross_tokenizer_step.py`);
- teacher outputs: the causal LM's cache (top-k, sampled or full, at the teacher's positions, in
  its vocabulary) plus the log-prob of each next token (`CacheLayout.token_logprobs`), or the
  teacher online (full logits; and its hidden states for `dskd`);
- validation: bits per byte; eval: bits per byte and per character for every model (each with
  its own tokenizer: perplexities of different tokenizers do not compare), cross-entropy per own
  token, agreement on aligned spans, size and speed (`kd_core/eval/cross_tokenizer.py`);
- registry: the transformers flavour, a `text-generation` pipeline with the student's tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from kd_core.tasks.base import Task, models_table

if TYPE_CHECKING:
    import torch
    from rich.table import Table

    from kd_core.cache.format import CacheLayout

LABELS = {"teacher": "teacher", "student": "KD student", "baseline": "no-teacher student (CE only)"}


class CrossTokenizer(Task):
    name = "cross_tokenizer"
    data_sources = ("python-docs", "files")
    metrics = (
        "bits_per_byte", "bits_per_character", "cross_entropy", "tokens_per_byte", "span_agreement", "round_trip", "parameters",
        "weight_bytes", "bytes_per_s", "latency_ms",
    )
    # Uniform over the 256 byte values is 8 bits per byte, whatever the tokenizer; a model must do 1 % better.
    sanity_gates = ("student.bits_per_byte < 0.99 * uniform.bits_per_byte", "student.bits_per_byte < baseline.bits_per_byte")
    objective_field = "cross_tokenizer"
    validation_modes = {"val_loss": "min"}
    validation_label = "validation bits per byte"

    # ----------------------------------------------------------------------------- the job config
    def check_config(self, job) -> None:
        super().check_config(job)
        distill, cache, loss = job.distill, job.cache, job.distill.cross_tokenizer
        if job.student.init != "config":
            raise ValueError("student.init: task cross_tokenizer builds its student from config (student.architecture) for its own tokenizer; set init: config")
        if distill.teacher_source == "on_policy":
            raise ValueError("distill.teacher_source: task cross_tokenizer distils from the cache or an online teacher; set cache or online")
        if loss.method == "dskd" and distill.teacher_source == "cache":
            raise ValueError(
                "distill.cross_tokenizer.method: dskd projects the teacher's hidden states and runs its output layer, which the "
                "training reads online; set distill.teacher_source: online (or method: uld or span_kl from the cache)"
            )
        from_cache = distill.teacher_source == "cache"
        if from_cache and cache.format in ("topk", "sampled") and loss.kd_weight > 0 and loss.temperature != cache.temperature:
            raise ValueError(
                f"distill.cross_tokenizer.temperature: must equal cache.temperature ({cache.temperature}): the cache keeps the "
                f"teacher's {cache.format} distribution at it; got {loss.temperature}"
            )
        if from_cache and cache.format == "topk" and not cache.tail_mass:
            raise ValueError("cache.tail_mass: the cross-tokenizer losses compare the top k with the rest of the teacher's mass; set tail_mass: true")
        if job.data.tokenizer is None and cache.format == "topk" and cache.top_k > job.data.vocab_size:
            raise ValueError(f"cache.top_k: must be <= data.vocab_size ({job.data.vocab_size}), got {cache.top_k}")

    @property
    def tunable_prefixes(self) -> tuple[str, ...]:
        """Never the student's tokenizer: every trial reads the one step."""
        return ("distill.cross_tokenizer.", "distill.train.", "student.architecture.")

    # ------------------------------------------------------------------------------------- prep
    def data_settings(self, data) -> dict:
        return data.model_dump(mode="json", exclude={"preferences", "exact_answers", "chat", "texts", "table"})

    def prepare(self, data, store, run, source) -> tuple[dict, dict]:
        from kd_core.data.cross_text import prepare_cross_text

        return prepare_cross_text(data, store, run, source)

    # ---------------------------------------------------------------------------------- training
    def student_settings(self, student) -> dict:
        return student.model_dump(mode="json", include={"architecture"})

    def student_inputs(self, student, prep, store, force=False) -> dict:
        """The `student_tokenizer` step: keyed by `student.tokenizer` (a folder's files' identity)
        and prep, run here or reused (announced as the pipeline's steps are); redone when the step
        reading it is forced (`--force prep`, `--force distill`, ...)."""
        from kd_core.data.student_tokenizer import student_tokenizer_step

        return {"student_tokenizer": student_tokenizer_step(student.tokenizer, prep, store, force)}

    def columns(self, role: str, prep_details: dict) -> tuple[str, ...]:
        from kd_core.data.cross_text import CROSS_TEXT_COLUMNS

        return ("input_ids", "tokens", "text_length") if role == "teacher" else CROSS_TEXT_COLUMNS

    def build_model(self, spec) -> torch.nn.Module:
        """From config with seeded random weights, for the role's own vocabulary and rows: the
        prepared ones (the teacher), the student tokenizer step's, whose rows are as long as its
        tokens of the longest prepared row (students)."""
        from kd_core.models import build_causal_lm

        vocab_size, special_ids = role_vocabulary(spec)
        own = spec.student_inputs.get("student_tokenizer")
        positions = spec.seq_len if spec.role == "teacher" or own is None else own.details["max_row_tokens"]
        return build_causal_lm(spec.architecture, vocab_size, positions, special_ids=special_ids, seed=spec.train.seed, dropout=spec.train.dropout)

    def make_step(self, spec, model, store) -> torch.nn.Module:
        from kd_core.models import local_copy
        from kd_core.data.views import StudentView
        from kd_core.tasks.cross_tokenizer_step import CrossTokenizerStep, shared_vocabulary

        vocab_size, special_ids = role_vocabulary(spec)
        if spec.role == "teacher":
            return CrossTokenizerStep(model, "teacher", vocab_size=vocab_size)
        student_tokenizer = local_copy(store, spec.tokenizer_folder)
        view = StudentView(student_tokenizer, special_ids)
        objective = spec.objective
        if objective is None:
            return CrossTokenizerStep(model, "student", view=view, vocab_size=vocab_size)
        shared = (
            shared_vocabulary(local_copy(store, f"{spec.prep_folder}/tokenizer"), student_tokenizer, spec.vocab_size, vocab_size)
            if objective.method == "span_kl" else None
        )
        dual_space, teacher_head = (self._dual_space(spec, store, model)) if objective.method == "dskd" else (None, None)
        return CrossTokenizerStep(
            model, "student", objective=objective, view=view, shared=shared, vocab_size=vocab_size, dual_space=dual_space, teacher_head=teacher_head,
        )

    def _dual_space(self, spec, store, model):
        """DSKD's projections (trained with the student) and a frozen copy of the online teacher's
        output layer."""
        from kd_core.losses.cross_tokenizer import DualSpaceDistillation
        from kd_core.models import load_causal_lm
        from kd_core.models.teacher import teacher_model_dir

        teacher = load_causal_lm(teacher_model_dir(store, spec.online_teacher))
        head = teacher.get_output_embeddings().requires_grad_(False)
        student_size, teacher_size = model.config.hidden_size, teacher.config.hidden_size
        return DualSpaceDistillation(student_size, teacher_size, model.get_input_embeddings().embedding_dim, teacher.get_input_embeddings().embedding_dim), head

    def batch_tokens(self, batch) -> int:
        return int(batch["tokens"].sum())

    def validation_metrics(self, model, rows, batch_size, spec, device) -> dict[str, float]:
        """Bits per byte of the role's own view of the validation rows."""
        from kd_core.models import local_copy
        from kd_core.storage import Store
        from kd_core.data.views import StudentView, numpy_rows, teacher_view, token_nll

        vocab_size, special_ids = role_vocabulary(spec)
        view = None if spec.role == "teacher" else StudentView(local_copy(Store(spec.storage), spec.tokenizer_folder), special_ids)
        nats, total_bytes = 0.0, 0
        for start in range(0, len(rows["input_ids"]), batch_size):
            batch = numpy_rows(rows, start, start + batch_size, device)
            nll, _, _ = token_nll(model, teacher_view(batch) if view is None else view(batch), vocab_size)
            nats += float(nll.sum())
            total_bytes += int(batch["text_length"].sum())
        return {"val_loss": nats / math.log(2) / max(total_bytes, 1)}

    # ------------------------------------------------------------------------ teacher outputs
    def cache_layout(self, config, prep, store, teacher) -> CacheLayout:
        """The causal LM's layout over the teacher's view, keeping each next token's log-prob."""
        from kd_core.tasks.causal_lm import CausalLM

        return dataclasses.replace(CausalLM().cache_layout(config, prep, store, teacher), token_logprobs=True)

    def load_cache_teacher(self, model_dir, device, layout, prep_details, positions_per_chunk=None):
        from kd_core.tasks.causal_lm import CausalLM

        return CausalLM().load_cache_teacher(model_dir, device, layout, prep_details, positions_per_chunk)

    def load_online_teacher(self, model_dir, runner, device):
        from kd_core.models import load_causal_lm

        return load_causal_lm(model_dir).to(device).eval().requires_grad_(False)

    def online_targets(self, teacher, batch, spec):
        """The teacher's full logits on its view (cut to its vocabulary), and for `dskd` its
        embeddings' output and last hidden state."""
        import torch

        from kd_core.losses import TeacherTargets

        dual_space = spec.objective is not None and spec.objective.method == "dskd"
        with torch.no_grad():
            output = teacher(input_ids=batch["input_ids"].long(), output_hidden_states=dual_space)
        hidden = {0: output.hidden_states[0], len(output.hidden_states) - 1: output.hidden_states[-1]} if dual_space else {}
        return TeacherTargets(logits=output.logits[..., : spec.vocab_size], hidden=hidden)

    # ---------------------------------------------------------------------------------- eval
    def measure(self, config, prep, teacher, student, baseline, store, run, device) -> tuple[dict, dict, None]:
        from kd_core.eval.cross_tokenizer import measure_across_tokenizers

        held_out, scores = measure_across_tokenizers(config, prep, teacher, student, baseline, store, device)
        scores["uniform"] = {"bits_per_byte": 8.0}
        return held_out, scores, None

    def training_curves_png(self, histories, metrics) -> bytes:
        from kd_core.eval.plots import CurvesSpec, training_curves_png

        return training_curves_png(histories, metrics, CurvesSpec(LABELS, "ce", "training cross-entropy (nats per own token)", "bits_per_byte", "bits per byte (lower is better)", "{:.3f}"))

    def report_html(self, job_name, metrics, histories, extras) -> str:
        from kd_core.eval.figures import metrics_table_html
        from kd_core.eval.report import report_html

        columns = [
            ("bits_per_byte", "bits/byte", "{:.4f}"), ("bits_per_character", "bits/character", "{:.4f}"), ("cross_entropy", "nats per own token", "{:.4f}"),
            ("tokens_per_byte", "tokens/byte", "{:.3f}"), ("span_agreement", "agreement on aligned spans", "{:.1%}"), ("parameters", "parameters", "{:,}"),
            ("weight_bytes", "size on disk", None), ("bytes_per_s", "bytes/s", "{:,.0f}"), ("latency_ms", "latency (ms/batch)", "{:.1f}"),
        ]
        columns.insert(4, ("round_trip", "rows given back exactly", "{:.1%}"))
        table = metrics_table_html(metrics, columns, LABELS, not_for_teacher=("span_agreement",)) + lossy_warning(metrics, html=True)
        held_out = f'{metrics["rows"]:,} rows, {metrics["bytes"]:,} bytes'
        return report_html(job_name, metrics, {"training_curves": self.training_curves_png(histories, metrics)}, table, held_out)

    # ------------------------------------------------------------------------------- preflight
    def preflight_checks(self, job, records, *, deep) -> list[tuple[str, str, str]]:
        """Cheap: which KD methods the job's teacher source allows. Deep: the two tokenizers (a
        folder as it is; one kdflow trains, trained on the first documents as prep would) on the
        first `records` documents: the vocabulary overlap, the share of spans that are one token
        on both sides, an example of a longer span, and whether each tokenizer gives the text
        back (bits per byte count all of it only then)."""
        from kd_core.tasks.cross_tokenizer_preflight import deep_rows, method_row, student_tokenizer_row

        return [method_row(job), student_tokenizer_row(job), *(deep_rows(job, records) if deep else [])]

    # --------------------------------------------------------------------------------- register
    def log_model(self, model_dir):
        from kd_core.registry import log_text_generation

        return log_text_generation(model_dir)

    # ------------------------------------------------------------------------------------- CLI
    def headline(self, step, manifest) -> str | None:
        metrics, details = manifest.metrics, manifest.details
        if step == "prep":
            return f"{metrics['documents']:,} docs, {metrics['train_bytes']:,} train bytes in {metrics['train_tokens']:,} teacher tokens, vocab {details['vocab_size']}"
        if step == "eval":
            return f"{metrics['bytes']:,} held-out bytes ({metrics['split']})"
        if step == "cache":  # the causal LM's cache, with each next token's log-prob
            from kd_core.tasks.causal_lm import CausalLM

            return CausalLM().headline(step, manifest)
        return None

    def comparison_table(self, metrics) -> Table:
        def cells(row: dict, teacher: bool) -> tuple[str, ...]:
            agreement = "—" if teacher else f"{row['span_agreement']:.1%}"
            lossy = " (!)" if row.get("round_trip", 1.0) < 1 else ""
            return (f"{row['parameters']:,}", f"{row['bits_per_byte']:.4f}{lossy}", f"{row['tokens_per_byte']:.3f}", agreement, f"{row['bytes_per_s']:,.0f}")

        table = models_table(
            f"held-out {metrics['split']} split, {metrics['bytes']:,} bytes; each model with its own tokenizer; speed on {metrics.get('device', 'this machine')}",
            ("model", "parameters", "bits/byte", "tokens/byte", "agreement on aligned spans", "bytes/s"), LABELS, metrics, cells,
        )
        table.caption = lossy_warning(metrics) or None
        return table

    def best_trial_metrics(self, val_loss: float) -> dict[str, float]:
        return {"best_val_bits_per_byte": val_loss}


def lossy_warning(metrics: dict, html: bool = False) -> str:
    """A line naming the models whose tokens do not give the held-out text back ('' when none)."""
    lossy = [f"{LABELS[name]} ({metrics[name]['round_trip']:.0%} of rows)" for name in LABELS if metrics.get(name, {}).get("round_trip", 1.0) < 1]
    if not lossy:
        return ""
    line = (f"(!) the tokens of {', '.join(lossy)} do not give every held-out row back exactly: the characters they drop cost "
            "them nothing, so their bits per byte are lower than they would be and do not compare with the others'")
    return f"<p><b>{line}</b></p>" if html else line


def role_vocabulary(spec) -> tuple[int, dict[str, int]]:
    """The role's vocabulary size and special ids: prep's for the teacher, the student tokenizer
    step's for a student."""
    own = spec.student_inputs.get("student_tokenizer")
    if spec.role == "teacher" or own is None:
        return spec.vocab_size, spec.special_token_ids
    return own.details["vocab_size"], own.details["special_token_ids"]
