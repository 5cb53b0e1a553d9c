"""`task: causal_lm`: a language-model teacher distilled into a smaller language model.

- prep: text (the bundled Python docs, or files) packed into rows of token ids
  (`kd_core/data/prep.py`);
- models: Llama-style causal LMs built from config (`kd_core.models.build_causal_lm`), or a
  student that starts from a pretrained Hugging Face causal LM (`student.init: pretrained`, any
  architecture) or is cut from the teacher (`from_teacher`: its blocks, optionally its most
  important channels; `kd_core/models/students.py`); a teacher kdflow trains learns next-token
  cross-entropy, the student `DistillationObjective` (`distill.loss`: CE + T²-scaled KD, optional
  hidden-state distillation), on its logits cut to the data's vocabulary;
- teacher outputs: top-k, sampled or full log-probs, entropy and hidden states per position,
  computed with the output layer chunk by chunk (`kd_core/models/inference.py`);
- validation: next-token cross-entropy (nats/token); eval: perplexity, KL to the teacher, top-1 /
  top-5 agreement, calibration, size and speed (`kd_core/eval`);
- registry: the transformers flavour, a `text-generation` pipeline.

Each method imports the library it calls: loading a job checks it against its task, and that must
not wait for torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kd_core.config import CHAT_SOURCES
from kd_core.tasks.base import Task, models_table

if TYPE_CHECKING:
    import torch
    from rich.table import Table

    from kd_core.cache.format import CacheLayout
    from kd_core.losses import DistillationObjective


class CausalLM(Task):
    name = "causal_lm"
    data_sources = ("python-docs", "files", *CHAT_SOURCES)
    metrics = (
        "cross_entropy", "perplexity", "kl_to_teacher", "ece", "agreement_top1", "agreement_top5",
        "answer_exact_match", "answer_f1", "parameters", "weight_bytes", "tokens_per_s", "latency_ms",
    )
    # A student must be at least 1% better than uniform: float error puts a collapsed student a hair below.
    sanity_gates = ("student.perplexity < 0.99 * uniform.perplexity", "student.perplexity < baseline.perplexity")
    objective_field = "loss"
    validation_modes = {"val_loss": "min"}
    validation_label = "validation loss (nats/token)"

    # ----------------------------------------------------------------------------- the job config
    def check_config(self, job) -> None:
        super().check_config(job)
        cache, loss = job.cache, job.distill.loss
        if job.data.source in CHAT_SOURCES and job.data.source != "exact-answers" and not job.data.tokenizer:
            raise ValueError(
                "data.tokenizer: chat data is rendered through a Hugging Face tokenizer's chat template; set data.tokenizer "
                "(or teacher.path, whose tokenizer is then used)"
            )
        if job.distill.teacher_source == "on_policy":
            if job.data.source not in CHAT_SOURCES or job.data.chat.train_on != "assistant":
                raise ValueError(
                    "distill.teacher_source: on_policy has the student answer the data's prompts, which chat data with "
                    "data.chat.train_on: assistant marks (data.source chat, python-qa or exact-answers)"
                )
            if job.distill.deepspeed.enabled and job.distill.deepspeed.zero_stage == 3:
                raise ValueError(
                    "distill.deepspeed.zero_stage: on-policy sampling runs the student in the training process, which ZeRO-3 "
                    "partitions; use zero_stage 0-2 for teacher_source: on_policy"
                )
            if job.distill.on_policy.teacher_top_k and not loss.topk_tail:
                raise ValueError(
                    "distill.loss.topk_tail: distill.on_policy.teacher_top_k gives the teacher's top k at the loss temperature, "
                    "compared with the tail bucket; set topk_tail: true"
                )
            if job.distill.on_policy.teacher_top_k and job.distill.on_policy.objective == "policy_gradient":
                raise ValueError(
                    "distill.on_policy.teacher_top_k: the policy-gradient objective needs the teacher's log-prob of every sampled "
                    "token, which its top k may not hold; set teacher_top_k: null or objective: divergence"
                )
            if job.distill.loss.fused and job.distill.on_policy.objective == "policy_gradient":
                raise ValueError("distill.loss.fused: the policy-gradient objective reads the student's full logits; set fused: false")
        trains_tokenizer = job.data.tokenizer is None  # else the vocabulary is the tokenizer's, checked by the cache stage
        vocabulary, named = job.data.vocab_size, f"data.vocab_size ({job.data.vocab_size})"
        if trains_tokenizer and job.data.source == "exact-answers":
            from kd_core.data.exact_answers import char_vocabulary

            vocabulary = len(char_vocabulary(job.data.chat.template))
            named = f"the exact-answers character tokenizer's {vocabulary} tokens"
        if trains_tokenizer and cache.format == "topk" and cache.top_k > vocabulary:
            raise ValueError(f"cache.top_k: must be <= {named}, got {cache.top_k}")
        if trains_tokenizer and cache.format == "full" and vocabulary > cache.full_max_vocab:
            raise ValueError(
                f"cache.format: 'full' stores every log-prob and is for vocabularies up to cache.full_max_vocab "
                f"({cache.full_max_vocab}); {named}: use topk or sampled"
            )
        student_layers = self._check_student_start(job)
        if loss.feature_weight > 0:
            if not loss.feature_layers:
                raise ValueError("distill.loss.feature_layers: must list (student layer, teacher layer) pairs when feature_weight > 0")
            for student_layer, teacher_layer in loss.feature_layers:
                if student_layers is not None and not 0 <= student_layer <= student_layers:
                    raise ValueError(f"distill.loss.feature_layers: student layer {student_layer} is not in 0..{student_layers}")
                if job.distill.teacher_source == "cache" and teacher_layer not in cache.hidden_layers:
                    raise ValueError(
                        f"distill.loss.feature_layers: teacher layer {teacher_layer} is not cached; add it to cache.hidden_layers "
                        f"(now {cache.hidden_layers})"
                    )
        from_cache = job.distill.teacher_source == "cache"
        top_k_targets = (from_cache and cache.format == "topk") or (job.distill.teacher_source == "on_policy" and job.distill.on_policy.teacher_top_k)
        if top_k_targets and loss.divergence != "forward_kl" and not loss.topk_tail:
            raise ValueError(
                f"distill.loss.topk_tail: {loss.divergence} compares top-k targets as two distributions over the top k and one "
                "bucket for the rest of the vocabulary; set topk_tail: true (or divergence: forward_kl)"
            )
        needs_cache_temperature = from_cache and ((loss.topk_tail and cache.format == "topk") or cache.format == "sampled")
        if needs_cache_temperature and loss.kd_weight > 0 and loss.temperature != cache.temperature:
            reason = "cache.format is sampled" if cache.format == "sampled" else "distill.loss.topk_tail is true"
            raise ValueError(
                f"distill.loss.temperature: must equal cache.temperature ({cache.temperature}) when "
                f"{reason}, got {loss.temperature}; set both" + ("" if cache.format == "sampled" else ", or topk_tail: false")
            )

    def check_teachers(self, job) -> None:
        """Several teachers share the data's tokenizer; each part of the loss is the one objective
        (no learned feature projections, running balance or fused pass per teacher)."""
        distill, loss = job.distill, job.distill.loss
        if distill.route and job.data.source not in CHAT_SOURCES:
            raise ValueError("distill.route: sends each conversation's tokens to a teacher by its tag, which chat data has (data.source chat, python-qa, exact-answers)")
        for name, value in (("feature_weight", loss.feature_weight > 0), ("balance_terms", loss.balance_terms), ("fused", loss.fused)):
            if value:
                raise ValueError(f"distill.loss.{name}: not with several teachers (each teacher's KD term is the objective's own); turn it off")
        if distill.teacher_source == "on_policy" and distill.on_policy.writer == "teacher":
            raise ValueError("distill.on_policy.writer: with several teachers, which one writes is not defined; use writer: student")
        if distill.route and distill.teacher_source == "online" and distill.deepspeed.enabled and distill.deepspeed.zero_stage == 3:
            raise ValueError(
                "distill.deepspeed.zero_stage: routed online teachers score only the batches they teach, which differ by rank, "
                "and a ZeRO-3 teacher's forward pass needs every rank; use zero_stage 0-2, or teacher_source: cache"
            )
        if distill.teacher_weights and distill.teacher_source == "on_policy" and distill.on_policy.objective == "policy_gradient":
            raise ValueError(
                "distill.teacher_weights: the policy-gradient objective reads one teacher log-prob per sampled token; route the "
                "tokens to one teacher each (distill.route), or use objective: divergence"
            )

    def _check_student_start(self, job) -> int | None:
        """A student cut from a teacher kdflow trains is checked against `teacher.architecture`
        here (one from `teacher.path` before training, `kd_core.train.spec.student_start`). Returns
        the student's block count where the config tells it (None: a pretrained student's, or one
        cut from an external teacher by default, is known once its folder is read)."""
        student = job.student
        if student.init == "config":
            return student.architecture.num_layers
        if student.init == "pretrained":
            return None
        cut = student.from_teacher
        if job.teacher.path is None:
            teacher = job.teacher.architecture
            cut.check_width(teacher.hidden_size, teacher.intermediate_size or 4 * teacher.hidden_size, "llama")
            return len(cut.kept_layers(teacher.num_layers))
        return len(cut.layers) if cut.layers is not None else cut.num_layers

    # ------------------------------------------------------------------------------------- prep
    def data_settings(self, data) -> dict:
        """The chat section for chat sources, `exact_answers` (and its generator's version) for that
        source alone; `chat.split_field` only when set and `chat.tag_field` only when not `tag`, so
        the keys of jobs without them stay as they were before they existed (a prep from before
        tags lacks `tag_ids`: `distill.route` then asks for `--force prep`)."""
        excluded = {"preferences", "exact_answers", "texts", "table"} | (set() if data.source in CHAT_SOURCES else {"chat"})
        if data.source == "exact-answers":
            from kd_core.data.exact_answers import DATASET_VERSION

            excluded -= {"exact_answers"}
        settings = data.model_dump(mode="json", exclude=excluded)
        if "chat" in settings and settings["chat"]["split_field"] is None:
            del settings["chat"]["split_field"]
        if "chat" in settings and settings["chat"]["tag_field"] == "tag":
            del settings["chat"]["tag_field"]
        if data.source == "exact-answers":
            settings["exact_answers"]["version"] = DATASET_VERSION
        return settings

    def prepare(self, data, store, run, source) -> tuple[dict, dict]:
        from kd_core.data.chat import prepare_chat
        from kd_core.data.prep import prepare_text

        return (prepare_chat if data.source in CHAT_SOURCES else prepare_text)(data, store, run, source)

    # ---------------------------------------------------------------------------------- training
    def student_settings(self, student) -> dict:
        """A student from config: its architecture; a pretrained one: its folder (the stage adds its
        weights' identity); one cut from the teacher: the cut (the teacher step is an input)."""
        if student.init == "pretrained":
            return {"init": "pretrained", "path": student.path}
        if student.init == "from_teacher":
            return {"init": "from_teacher", "from_teacher": student.from_teacher.model_dump(mode="json")}
        return student.model_dump(mode="json", include={"architecture"})

    def columns(self, role: str, prep_details: dict) -> tuple[str, ...]:
        from kd_core.data.chat import CHAT_COLUMNS

        return CHAT_COLUMNS if "chat" in prep_details else ("input_ids",)

    def build_model(self, spec) -> torch.nn.Module:
        """From config (seeded random weights), or where the spec's `student_start` says: the
        pretrained folder (each worker fetches it, once per node), or cut from the teacher step's
        model (`kd_core/models/students.py`)."""
        from kd_core.models import build_causal_lm

        start = spec.student_start
        if start.init == "pretrained":
            from kd_core.models.students import load_pretrained_student, pretrained_model_dir
            from kd_core.storage import Store

            return load_pretrained_student(pretrained_model_dir(start.path, start.weights_identity, Store(spec.storage), start.field), spec.train.dropout)
        if start.init == "from_teacher":
            from kd_core.models import load_causal_lm
            from kd_core.models.students import cut_from_teacher
            from kd_core.models.teacher import teacher_model_dir
            from kd_core.storage import Store

            teacher = load_causal_lm(teacher_model_dir(Store(spec.storage), start.teacher))
            student = cut_from_teacher(teacher, list(start.layers), start.hidden_size, start.intermediate_size)
            if hasattr(student.config, "attention_dropout"):
                student.config.attention_dropout = spec.train.dropout
            return student.train()
        return build_causal_lm(
            spec.architecture, spec.vocab_size, spec.seq_len, special_ids=spec.special_token_ids, seed=spec.train.seed,
            dropout=spec.train.dropout,
        )

    def make_step(self, spec, model, store) -> torch.nn.Module:
        """The student's logits are cut to the data's vocabulary (a pretrained student's output
        layer may be padded past its tokenizer)."""
        from kd_core.tasks.causal_lm_step import CausalLMStep

        loss = spec.objective
        return CausalLMStep(
            model, self.make_objective(spec, store, model.config.hidden_size), loss.fused_chunk_size if loss and loss.fused else None,
            vocab_size=spec.vocab_size, on_policy_objective=spec.on_policy.objective if spec.on_policy else "divergence",
        )

    def make_objective(self, spec, store, student_hidden_size: int) -> DistillationObjective:
        """The configured objective; cross-entropy alone when the spec has no objective (teacher,
        baseline). Feature distillation's projections need the student's hidden size (the built
        model's: a pretrained or cut student's is not `student.architecture`'s) and the teacher's:
        the online teacher's config.json, or the cache's layout."""
        from kd_core.losses import DistillationObjective
        from kd_core.models.teacher import teacher_model_config

        if spec.objective is None:
            return DistillationObjective(kd_weight=0.0)
        if spec.online_teacher is not None:
            model_config = teacher_model_config(store, spec.online_teacher)
            teacher_hidden_size = model_config.get("hidden_size", model_config.get("n_embd"))  # GPT-2 configs: n_embd
        else:
            teacher_hidden_size = (spec.cache_layout or {}).get("hidden_size") or None
        return DistillationObjective.from_config(
            spec.objective, student_hidden_size=student_hidden_size, teacher_hidden_size=teacher_hidden_size
        )

    def batch_tokens(self, batch) -> int:
        return batch["input_ids"].numel()

    def validation_metrics(self, model, rows, batch_size, spec, device) -> dict[str, float]:
        import numpy as np
        import torch

        from kd_core.tasks.causal_lm_step import next_token_loss

        columns = {name: torch.from_numpy(values.astype(np.int64)) for name, values in rows.items() if name in self.columns("student", spec.prep_details)}
        return {"val_loss": next_token_loss(model, columns, batch_size, device, spec.vocab_size)}

    # ------------------------------------------------------------------------ teacher outputs
    def cache_layout(self, config, prep, store, teacher) -> CacheLayout:
        """The data's vocabulary and row length, the teacher's hidden size, the format settings."""
        from kd_core.cache.format import CacheLayout, CacheSettingsError
        from kd_core.models.teacher import teacher_model_config

        model_config = teacher_model_config(store, teacher)
        data_vocab, teacher_vocab = prep.details["vocab_size"], model_config["vocab_size"]
        if teacher_vocab < data_vocab:
            raise CacheSettingsError(
                f"teacher: it predicts {teacher_vocab} tokens (config.json vocab_size) but the prepared data's tokenizer has "
                f"{data_vocab}; prepare the data with the teacher's own tokenizer (data.tokenizer: the teacher's folder)"
            )
        if config.format == "topk" and config.top_k > data_vocab:
            raise CacheSettingsError(f"cache.top_k: {config.top_k} is more than the vocabulary's {data_vocab} tokens; set cache.top_k <= {data_vocab}")
        if config.format == "full" and data_vocab > config.full_max_vocab:
            raise CacheSettingsError(
                f"cache.format: 'full' is for vocabularies up to cache.full_max_vocab ({config.full_max_vocab}); "
                f"the data has {data_vocab}: use topk or sampled"
            )
        layers = model_config.get("num_hidden_layers", model_config.get("n_layer", 0))  # GPT-2 configs name it n_layer
        for layer in config.hidden_layers:
            if not 0 <= layer <= layers:
                raise CacheSettingsError(f"cache.hidden_layers: {layer} is not a hidden state of the teacher (0..{layers}); pick layers in that range")
        # A teacher output layer padded past the tokenizer (e.g. 152064 logits for 151936 tokens) is cut
        # to the data's vocabulary: the cache describes the distribution over real tokens only.
        hidden_size = model_config.get("hidden_size", model_config.get("n_embd", 0))
        return CacheLayout.from_config(config, prep.details["seq_len"], data_vocab, hidden_size)

    def load_cache_teacher(self, model_dir, device, layout, prep_details, positions_per_chunk=None):
        from kd_core.models import load_causal_lm
        from kd_core.models.inference import CausalLMTeacher, teacher_dtype
        from kd_core.tasks.causal_lm_step import CachedLMTargets

        model = load_causal_lm(model_dir, dtype=teacher_dtype(device)).to(device).eval()
        return CachedLMTargets(CausalLMTeacher(model, layout, positions_per_chunk), device)

    def load_online_teacher(self, model_dir, runner, device):
        """In its own DeepSpeed engine beside a DeepSpeed student (partitioned when the student is
        ZeRO-3), else a replica on the student's device."""
        from kd_core.models import load_causal_lm
        from kd_core.train.deepspeed_engine import DeepSpeedRunner, TeacherEngine

        if isinstance(runner, DeepSpeedRunner):
            return TeacherEngine(model_dir, runner.config)
        return load_causal_lm(model_dir).to(device).eval().requires_grad_(False)

    def online_targets(self, teacher, batch, spec):
        """The teacher's full logits (cut to the data's vocabulary: a padded output layer's extra
        entries dropped) and the hidden layers feature distillation matches, through the forward
        pass the cache stage runs (`teacher_forward`); an on-policy run with
        `distill.on_policy.teacher_top_k` gets the top k at the loss temperature instead."""
        import torch

        from kd_core.losses import TeacherTargets
        from kd_core.models import sequence_inputs
        from kd_core.models.inference import teacher_forward

        objective = spec.objective
        layers = sorted({layer for _, layer in objective.feature_layers}) if objective is not None and objective.feature_weight > 0 else []
        input_ids = batch["input_ids"]
        with torch.no_grad():
            forward = teacher_forward(teacher, input_ids, layers, position_ids=sequence_inputs(batch)[0].get("position_ids"))
            logits = forward.logits(slice(None)).unflatten(0, input_ids.shape)
        targets = TeacherTargets(logits=logits[..., : spec.vocab_size], hidden=forward.hidden)
        top_k = spec.on_policy.teacher_top_k if spec.on_policy is not None else None
        return targets.top_k(top_k, spec.objective.temperature) if top_k else targets

    def on_policy_sampling(self, spec, store) -> list[int]:
        """The stop tokens of the student's answers: the prepared tokenizer's eos and the special
        token that ends the training answers (`kd_core.data.chat.stop_token_ids`, on the first
        training rows)."""
        from transformers import AutoTokenizer

        from kd_core.data.chat import conversation_prompts, stop_token_ids
        from kd_core.data.shards import read_columns
        from kd_core.models import local_copy

        tokenizer = AutoTokenizer.from_pretrained(local_copy(store, spec.tokenizer_folder))
        return stop_token_ids(tokenizer, conversation_prompts(read_columns(store, spec.token_shards[:1], 64), 64))

    def on_policy_batch(self, student, batch, spec, sampling) -> dict:
        """`sample_answers`: the student's answers to the prompt of each row's first conversation."""
        from kd_core.tasks.causal_lm_step import sample_answers

        return sample_answers(student, batch, spec.on_policy, sampling, spec.special_token_ids["pad"], spec.seq_len, spec.vocab_size)

    # ---------------------------------------------------------------------------------- eval
    def eval_settings(self, config, prep_details) -> dict:
        return config.model_dump(mode="json") if "chat" in prep_details else super().eval_settings(config, prep_details)

    def measure(self, config, prep, teacher, student, baseline, store, run, device) -> tuple[dict, dict, None]:
        from kd_core.eval import measure_language_models

        held_out, scores, examples = measure_language_models(config, prep, teacher, student, baseline, store, run, device)
        vocab_size = prep.details["vocab_size"]
        scores["uniform"] = {"cross_entropy": math.log(vocab_size), "perplexity": float(vocab_size)}
        return held_out, scores, examples

    def training_curves_png(self, histories, metrics) -> bytes:
        from kd_core.eval.plots import LANGUAGE_MODEL_CURVES, training_curves_png

        return training_curves_png(histories, metrics, LANGUAGE_MODEL_CURVES)

    def report_html(self, job_name, metrics, histories, extras) -> str:
        from kd_core.eval.report import answers_html, language_model_figures, language_model_table, report_html

        held_out = f'{metrics["rows"]:,} rows, {metrics["tokens"]:,} {"assistant " if metrics.get("completion_only") else ""}tokens'
        table = language_model_table(metrics)
        return report_html(job_name, metrics, language_model_figures(metrics, histories), table, held_out, answers_html(extras or []))

    # --------------------------------------------------------------------------------- register
    def log_model(self, model_dir):
        from kd_core.registry import log_text_generation

        return log_text_generation(model_dir)

    # ------------------------------------------------------------------------------------- CLI
    def headline(self, step, manifest) -> str | None:
        metrics, details = manifest.metrics, manifest.details
        if step == "prep" and "chat" in details:
            changed = [
                f"{metrics[key]:,} {label}"
                for key, label in (("duplicates_removed", "duplicates dropped"), ("truncated", "truncated"), ("dropped_overlong", "too long, dropped"),
                                   ("dropped_untrained", "no assistant token within seq_len, dropped"))
                if metrics.get(key)
            ]
            return (
                f"{metrics['conversations']:,} conversations{' (' + ', '.join(changed) + ')' if changed else ''}, "
                f"{metrics['train_trained_tokens']:,} trained of {metrics['train_tokens']:,} train tokens "
                f"({details['chat']['layout']}, rows {metrics['row_fill']:.0%} full), vocab {details['vocab_size']}"
            )
        if step == "prep":
            dropped = [f"{metrics[key]:,} {label}" for key, label in (("duplicates_removed", "duplicates"), ("skipped_empty", "empty")) if metrics.get(key)]
            return (
                f"{metrics['documents']:,} docs{' (dropped ' + ', '.join(dropped) + ')' if dropped else ''}, "
                f"{metrics['train_tokens']:,} train tokens, vocab {details['vocab_size']}"
            )
        if step == "cache":
            layout = details["layout"]
            kept = {"topk": f"top-{layout['slots']}", "sampled": f"{layout['slots']} samples", "full": "full log-probs"}[details["format"]]
            return f"{kept}, {metrics['bytes_per_token']} bytes/token"
        if step == "eval":
            return f"{metrics['tokens']:,} held-out {'assistant ' if metrics.get('completion_only') else ''}tokens ({metrics['split']})"
        return None

    def comparison_table(self, metrics) -> Table:
        answered = "answer_f1" in metrics.get("student", {})

        def cells(row: dict, teacher: bool) -> tuple[str, ...]:
            agreement = "—" if teacher else f"{row['agreement_top1']:.1%} / {row['agreement_top5']:.1%}"
            kl = "—" if teacher else f"{row['kl_to_teacher']:.4f}"
            answers = (f"{row['answer_exact_match']:.1%} / {row['answer_f1']:.3f}",) if answered else ()
            return f"{row['parameters']:,}", f"{row['perplexity']:.2f}", kl, agreement, *answers, f"{row['ece']:.3f}", f"{row['tokens_per_s']:,.0f}"

        return models_table(
            f"held-out {metrics['split']} split, {metrics['tokens']:,} {'assistant ' if metrics.get('completion_only') else ''}tokens; speed on {metrics.get('device', 'this machine')}",
            ("model", "parameters", "perplexity", "KL from teacher", "top-1 / top-5 agreement", *(("answers: exact / F1",) if answered else ()), "ECE", "tokens/s"),
            {"teacher": "teacher", "start": "student before distillation", "student": "KD student", "baseline": "no-teacher student (CE only)"},
            metrics, cells,
        )

    def best_trial_metrics(self, val_loss: float) -> dict[str, float]:
        return {"best_val_perplexity": math.exp(val_loss)}
