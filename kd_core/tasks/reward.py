"""`task: reward`: a text reward model distilled into a multimodal reward model.

- prep: preference pairs with images (`kd_core/data/preferences.py`), each in two views: the
  student's (prompt and response tokens, and the image's pixels) and the teacher's (the image's
  text rendering, the prompt and the response);
- models: the teacher is a sequence-classification reward model on the text view (kdflow trains
  it with Bradley–Terry on the human labels), the student a `MultimodalRewardModel` on pixels and
  text (`kd_core/models/reward.py`), learning `RewardObjective` (`distill.reward`); the baseline
  learns Bradley–Terry on the human labels alone;
- teacher outputs: the teacher's reward of both responses of every pair, for the training and
  the validation pairs (a search's trials validate against the latter);
- validation: the preference KL to the teacher (nats/pair, T = 1: `val_loss`) and the share of
  pairs on which the student prefers the response the teacher prefers (`val_agreement`); eval: pairwise accuracy
  against the teacher and the human labels, Spearman correlation with the teacher's rewards,
  preference KL, calibration, size and speed (`kd_core/eval/reward.py`);
- registry: the pyfunc of `kd_core/registry/pyfunc.py`, scoring (prompt, response, image) rows.

Each method imports the library it calls: loading a job checks it against its task, and that must
not wait for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kd_core.tasks.base import Task, models_table

if TYPE_CHECKING:
    from rich.table import Table

    from kd_core.cache.format import CacheLayout

TEACHER_VIEW = ("text_chosen_ids", "text_rejected_ids")
"""The columns the text teacher reads: the image's rendering, the prompt and each response."""
STUDENT_VIEW = ("chosen_ids", "rejected_ids", "pixels")
"""The columns the multimodal student reads: the prompt and each response, and the image."""


class Reward(Task):
    name = "reward"
    data_sources = ("preferences", "digit-preferences")
    metrics = (
        "pairwise_accuracy_teacher", "pairwise_accuracy_human", "spearman_teacher", "preference_kl_to_teacher", "ece",
        "parameters", "weight_bytes", "pairs_per_s", "latency_ms",
    )
    sanity_gates = (
        "student.preference_kl_to_teacher < 0.99 * uniform.preference_kl_to_teacher",
        "student.preference_kl_to_teacher < baseline.preference_kl_to_teacher",
    )
    objective_field = "reward"
    validation_modes = {"val_loss": "min", "val_agreement": "max"}
    validation_label = "preference KL to the teacher (nats/pair)"
    validation_labels = {"val_agreement": "agreement with the teacher (share of pairs)"}

    # ----------------------------------------------------------------------------- the job config
    def check_config(self, job) -> None:
        super().check_config(job)
        if job.student.init != "config":
            raise ValueError(
                f"student.init: a reward student (a multimodal model) is built from student.architecture and student.vision; "
                f"got {job.student.init!r}: set it to config"
            )
        if job.distill.teacher_source != "cache":
            raise ValueError("distill.teacher_source: reward models distill from the cache of teacher rewards; set it to cache")
        image_size = job.data.preferences.image_size
        if image_size % job.student.vision.patch_size:
            raise ValueError(
                f"student.vision.patch_size: must divide data.preferences.image_size ({image_size}), got {job.student.vision.patch_size}"
            )
        warm_start = job.student.vision.warm_start_steps
        if warm_start >= job.distill.train.max_steps:
            raise ValueError(
                f"student.vision.warm_start_steps: must be below distill.train.max_steps ({job.distill.train.max_steps}), "
                f"got {warm_start}: the language model would never learn"
            )
        if job.tune.space and job.tune.max_steps is not None and warm_start >= job.tune.max_steps:
            raise ValueError(
                f"student.vision.warm_start_steps: must be below tune.max_steps ({job.tune.max_steps}), the steps of a search "
                f"trial, got {warm_start}: the trials' language models would never learn"
            )

    # ------------------------------------------------------------------------------------- prep
    def data_settings(self, data) -> dict:
        return data.model_dump(mode="json", exclude={"chat", "exact_answers", "texts", "table"})

    def prepare(self, data, store, run, source) -> tuple[dict, dict]:
        from kd_core.data.preferences import prepare_preferences

        return prepare_preferences(data, store, run)

    def separates_documents(self) -> bool:
        return False  # each response is its own row: no separator between documents

    # ---------------------------------------------------------------------------------- training
    def student_settings(self, student) -> dict:
        return student.model_dump(mode="json", include={"architecture", "vision"})

    def columns(self, role: str, prep_details: dict) -> tuple[str, ...]:
        """A text teacher never sees the images, the multimodal student never the text view."""
        return (*(TEACHER_VIEW if role == "teacher" else STUDENT_VIEW), "human_label")

    def build_model(self, spec):
        from kd_core.config import VisionConfig
        from kd_core.models.reward import build_multimodal_reward_model, build_text_reward_model

        details = spec.prep_details
        common = {"pad_id": details["pad_id"], "seed": spec.train.seed, "dropout": spec.train.dropout}
        if spec.role == "teacher":
            return build_text_reward_model(spec.architecture, spec.vocab_size, spec.seq_len, **common)
        vision = spec.student.vision if spec.student is not None else VisionConfig()
        return build_multimodal_reward_model(vision, spec.architecture, spec.vocab_size, spec.seq_len, image_size=details["image_size"], **common)

    def make_step(self, spec, model, store):
        from kd_core.losses import RewardObjective
        from kd_core.tasks.reward_step import RewardStep

        if spec.objective is None:  # the teacher and the baseline: human labels alone
            objective = RewardObjective(pairwise_weight=0.0, bradley_terry_weight=1.0)
        else:
            objective = RewardObjective.from_config(spec.objective)
        multimodal = spec.role == "student"
        warm_start = spec.student.vision.warm_start_steps if multimodal and spec.student is not None else 0
        return RewardStep(model, objective, multimodal=multimodal, pad_id=spec.prep_details["pad_id"], warm_start_steps=warm_start)

    def batch_tokens(self, batch) -> int:
        """Both responses of each pair, in the view the model reads (the only one its batches carry)."""
        return sum(batch[name].numel() for name in (*TEACHER_VIEW[:2], *STUDENT_VIEW[:2]) if name in batch)

    def validation_reads_cache(self) -> bool:
        return True  # the teacher's rewards of the validation pairs

    def validation_metrics(self, model, rows, batch_size, spec, device) -> dict[str, float]:
        from kd_core.tasks.reward_step import preference_fit_to_teacher

        kl, agreement = preference_fit_to_teacher(model, rows, batch_size, spec.prep_details["pad_id"], device)
        return {"val_loss": kl, "val_agreement": agreement}

    # ------------------------------------------------------------------------ teacher outputs
    def cache_splits(self) -> tuple[str, ...]:
        # The validation pairs' rewards are what a `kdflow tune` trial measures its student against.
        return ("train", "val")

    def cache_layout(self, config, prep, store, teacher) -> CacheLayout:
        from kd_core.cache.format import CacheLayout

        # One score per response: nothing to choose.
        return CacheLayout(format="reward", seq_len=prep.details["seq_len"], vocab_size=prep.details["vocab_size"], slots=1)

    def load_cache_teacher(self, model_dir, device, layout, prep_details, positions_per_chunk=None):
        from kd_core.models.reward import load_reward_model
        from kd_core.tasks.reward_step import CachedRewards

        return CachedRewards(load_reward_model(model_dir).to(device).eval(), device, prep_details["pad_id"])

    # ---------------------------------------------------------------------------------- eval
    def measure(self, config, prep, teacher, student, baseline, store, run, device) -> tuple[dict, dict, dict]:
        import numpy as np

        from kd_core.eval.reward import measure_reward_models, reward_model_dirs, uniform_preference_scores, write_rewards
        from kd_core.models.teacher import teacher_model_dir

        model_dirs = reward_model_dirs(store, teacher_model_dir(store, teacher), student, baseline)
        scores, rewards = measure_reward_models(config, prep, model_dirs, store, run, device)
        scores["uniform"] = uniform_preference_scores({side: np.asarray(values) for side, values in rewards["teacher"].items()})
        write_rewards(run, rewards)
        return {"rows": scores["teacher"]["pairs"]}, scores, rewards

    def training_curves_png(self, histories, metrics) -> bytes:
        from kd_core.eval.plots import REWARD_CURVES, training_curves_png

        return training_curves_png(histories, metrics, REWARD_CURVES)

    def report_html(self, job_name, metrics, histories, extras) -> str:
        from kd_core.eval.report import report_html
        from kd_core.eval.reward_report import reward_figures, reward_metrics_table

        figures = reward_figures(metrics, histories, extras)  # extras: each model's rewards, for the scatter plot
        return report_html(job_name, metrics, figures, reward_metrics_table(metrics), f'{metrics["rows"]:,} preference pairs')

    # --------------------------------------------------------------------------------- register
    def log_model(self, model_dir):
        from kd_core.registry import log_reward_pyfunc

        return log_reward_pyfunc(model_dir)

    # ------------------------------------------------------------------------------------- CLI
    def headline(self, step, manifest) -> str | None:
        metrics, details = manifest.metrics, manifest.details
        if step == "prep":
            return (
                f"{metrics['pairs']:,} pairs ({metrics['labeled_pairs']:,} human-labelled), {metrics['images']:,} images, "
                f"vocab {details['vocab_size']}"
            )
        if step == "cache":
            pairs = {split: sum(s["rows"] for s in details["shards"] if s.get("split", "train") == split) for split in ("train", "val")}
            return f"teacher rewards of {pairs['train']:,} training and {pairs['val']:,} validation pairs"
        if step == "eval":
            return f"{metrics['rows']:,} held-out pairs ({metrics['split']})"
        return None

    def comparison_table(self, metrics) -> Table:
        """The distilled student against the human-labels-only model."""

        def cells(row: dict, teacher: bool) -> tuple[str, ...]:
            human = f"{row['pairwise_accuracy_human']:.1%}" if "pairwise_accuracy_human" in row else "—"
            agreement = "—" if teacher else f"{row['pairwise_accuracy_teacher']:.1%}"
            rho = "—" if teacher else f"{row['spearman_teacher']:.3f}"
            return f"{row['parameters']:,}", human, agreement, rho, f"{row['ece']:.3f}" if "ece" in row else "—", f"{row['pairs_per_s']:,.0f}"

        table = models_table(
            f"held-out {metrics['split']} split, {metrics['rows']:,} preference pairs; speed on {metrics.get('device', 'this machine')}",
            ("model", "parameters", "accuracy vs human labels", "agreement with teacher", "Spearman ρ vs teacher", "ECE", "pairs/s"),
            {"teacher": "text teacher (reads the rendering)", "student": "KD student (reads the image)", "baseline": "same student, human labels only"},
            metrics, cells,
        )
        if "baseline" in metrics and "pairwise_accuracy_human" in metrics["student"] and "pairwise_accuracy_human" in metrics["baseline"]:
            gain = metrics["student"]["pairwise_accuracy_human"] - metrics["baseline"]["pairwise_accuracy_human"]
            verdict = "beats" if gain > 0 else "does not beat"
            table.caption = f"the distilled student {verdict} the human-labels-only model by {gain * 100:+.1f} points of accuracy vs human labels"
        return table
