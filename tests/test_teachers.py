"""Several teachers (`teachers:`, `distill.route`, `distill.teacher_weights`; issue 22): the config's
rules, the loss of a routed or weighted mix of teachers against its definition, and a job that
distils from two teachers' caches and online, logging each teacher's KD and tokens."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kd_core.config import ConfigError
from kd_core.devtools import migrated_sqlite_uri
from kd_core.job import load_config
from kd_core.losses import DistillationObjective, TeacherMix, TeacherTargets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECOND = ["teachers={second: {architecture: {hidden_size: 24, num_layers: 1, num_heads: 2}, train: {max_steps: 12, batch_size: 8, learning_rate: 0.01, warmup_steps: 2}}}"]


def job(tmp_path, *overrides):
    return load_config(
        os.path.join(REPO, "configs", "tiny.yaml"),
        [f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}", "compute.backend=local",
         "distill.deepspeed.enabled=false", "distill.baseline=false", "distill.train.log_every=1", *overrides],
    )


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides, message",
    [
        ((*SECOND, "distill.teacher_weights={teacher: 0.5, second: 0.4}"), "the weights sum to 0.9; they must sum to 1"),
        ((*SECOND, "distill.teacher_weights={teacher: 1.2, second: -0.2}"), "distill.teacher_weights.second: a weight is at least 0"),
        ((*SECOND, "distill.teacher_weights={teacher: 0.5, third: 0.5}"), "distill.teacher_weights.third: not a teacher"),
        ((*SECOND,), "teachers.second: no token is taught by it"),
        ((*SECOND, "distill.teacher_weights={teacher: 1.0, second: 0.0}"), "teachers.second: no token is taught by it"),
        ((*SECOND, "distill.route={sorting: third}"), "distill.route.sorting: 'third' is not a teacher"),
        ((*SECOND, "distill.route={a: second}", "distill.teacher_weights={teacher: 0.5, second: 0.5}"), "set one"),
        ((*SECOND, "distill.route={a: second}"), "distill.route: sends each conversation's tokens to a teacher by its tag"),
        ((*SECOND, "distill.teacher_weights={teacher: 0.5, second: 0.5}", "distill.loss.fused=true"), "distill.loss.fused: not with several teachers"),
        (("teachers={teacher: {}}",), "not 'teacher'"),
        ((*SECOND, "distill.teacher_weights={teacher: 0.5, second: 0.5}", "distill.teacher_source=on_policy", "data.source=python-qa",
          "data.tokenizer=gpt2", "distill.on_policy.writer=teacher"), "distill.on_policy.writer: with several teachers"),
    ],
)
def test_several_teachers_are_named_used_and_weighted_to_one(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        job(tmp_path, *overrides)


def test_weights_that_sum_to_one_are_accepted(tmp_path):
    config = job(tmp_path, *SECOND, "distill.teacher_weights={teacher: 0.3, second: 0.7}")
    assert config.distill.teacher_weights == {"teacher": 0.3, "second": 0.7}


# ------------------------------------------------------------------------------ the loss
def logits(seed, shape=(2, 9, 31)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * 2


def test_weighted_forward_kl_teaches_the_mixture_of_the_teachers():
    """Σ w_t KL(p_t ‖ q) differs from KL(Σ w_t p_t ‖ q) by a constant of q: the same gradient."""
    student = logits(0).requires_grad_()
    first, second = logits(1), logits(2)
    labels = torch.zeros(2, 9, dtype=torch.long)
    objective = DistillationObjective(ce_weight=0.0, kd_weight=1.0)
    mix = TeacherMix({"a": TeacherTargets(logits=first), "b": TeacherTargets(logits=second)}, {"a": None, "b": None}, {"a": 0.25, "b": 0.75})
    weighted = sum(weight * objective(student, labels, part)["kd"] for _, weight, part in mix.split(None))
    (mixed_gradient,) = torch.autograd.grad(weighted, student)
    mixture = torch.log(0.25 * torch.softmax(first.double(), -1) + 0.75 * torch.softmax(second.double(), -1)).float()
    (mixture_gradient,) = torch.autograd.grad(objective(student, labels, TeacherTargets(logits=mixture))["kd"], student)
    torch.testing.assert_close(mixed_gradient, mixture_gradient, rtol=1e-4, atol=1e-6)


def test_a_routed_mix_is_the_mean_over_every_token_of_its_own_teachers_divergence():
    from kd_core.tasks.causal_lm_step import CausalLMStep

    class Fixed(torch.nn.Module):  # a "model" whose logits are given
        def __init__(self, values):
            super().__init__()
            self.values = torch.nn.Parameter(values)

        def forward(self, **inputs):
            return type("Output", (), {"logits": self.values})()

    first, second = logits(3), logits(4)
    route = torch.zeros(2, 9, dtype=torch.bool)
    route[0, 2:7] = route[1, :3] = True  # those tokens are the second teacher's
    loss_mask = torch.ones(2, 9, dtype=torch.uint8)
    loss_mask[1, 6:] = 0
    batch = {"input_ids": torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(5)), "position_ids": torch.arange(9).repeat(2, 1),
             "loss_mask": loss_mask}
    objective = DistillationObjective(ce_weight=0.3, kd_weight=0.7, divergence="reverse_kl")
    step = CausalLMStep(Fixed(logits(6)), objective, vocab_size=31)
    mix = TeacherMix({"teacher": TeacherTargets(logits=first), "second": TeacherTargets(logits=second)}, {"teacher": ~route, "second": route})
    terms = step(batch, mix)
    # The same tokens against one set of logits that are, at each position, its own teacher's.
    routed = torch.where(route.unsqueeze(-1), second, first)
    single = step(batch, TeacherTargets(logits=routed))
    torch.testing.assert_close(terms["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd"], single["kd"], rtol=1e-5, atol=1e-6)
    counted = torch.zeros(2, 9, dtype=torch.bool)
    counted[:, :-1] = loss_mask[:, 1:].bool()
    assert float(terms["tokens_second"]) == int((route & counted).sum()) and float(terms["tokens_teacher"]) == int((~route & counted).sum())


def test_each_teachers_kd_is_per_token_it_taught_across_micro_batches_and_ranks():
    """A teacher that taught 2 tokens of one micro-batch and none of the other: its KD is the mean
    over those 2 tokens, not halved by the micro-batch where it taught nothing."""
    from kd_core.train.loop import _per_teacher

    # Means over 2 micro-batches of (kd × tokens, tokens): (0.6 × 2 + 0) / 2 and (2 + 0) / 2.
    terms = _per_teacher({"kd": 0.4, "kd_rare_sum": 0.6, "tokens_rare": 1.0, "kd_common_sum": 3.0, "tokens_common": 10.0}, micro_batches=2)
    assert terms == {"kd": 0.4, "kd_rare": pytest.approx(0.6), "tokens_rare": 2.0, "kd_common": pytest.approx(0.3), "tokens_common": 20.0}
    assert _per_teacher({"kd_idle_sum": 0.0, "tokens_idle": 0.0}, 1) == {"kd_idle": 0.0, "tokens_idle": 0.0}


# ------------------------------------------------------------------------------ the job
def history(store, manifest) -> list[dict]:
    text = store.read_bytes(f"{manifest.folder}/history.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["cache", "online"])
def test_a_job_distils_from_two_weighted_teachers_and_logs_each(tmp_path, source):
    from kd_core.pipeline import run_pipeline
    from kd_core.storage import Store

    config = job(tmp_path, *SECOND, "distill.teacher_weights={teacher: 0.5, second: 0.5}", f"distill.teacher_source={source}",
                 "distill.train.max_steps=3")
    steps = run_pipeline(config, until="distill")
    records = history(Store(config.storage), steps["distill"])
    assert all(record["tokens_teacher"] > 0 and record["tokens_second"] == record["tokens_teacher"] for record in records)
    assert all(record["kd"] == pytest.approx(0.5 * record["kd_teacher"] + 0.5 * record["kd_second"], rel=1e-5) for record in records)
    assert records[0]["kd_teacher"] != records[0]["kd_second"]  # two different teachers
    other = run_pipeline(job(tmp_path, *SECOND, "distill.teacher_weights={teacher: 0.8, second: 0.2}", f"distill.teacher_source={source}",
                             "distill.train.max_steps=3"), until="distill")
    assert other["distill"].key != steps["distill"].key and other["distill"].config["teacher_weights"] == {"teacher": 0.8, "second": 0.2}


EXACT = ["data.source=exact-answers", "data.exact_answers={tasks: [sort, reverse], pairs_per_task: 60, held_out_pairs: 5}",
         "data.max_documents=null", "data.chat.layout=padded", "distill.on_policy.max_new_tokens=6"]


@pytest.mark.slow
@pytest.mark.parametrize("source, objective", [("cache", "divergence"), ("on_policy", "divergence"), ("on_policy", "policy_gradient")])
def test_each_task_family_is_taught_by_its_routed_teacher(tmp_path, source, objective):
    """`distill.route` by the records' tags (the exact-answers families), from the caches or on the
    student's own answers (which keep their prompt's tag), learned by a divergence or the policy gradient."""
    from kd_core.pipeline import run_pipeline
    from kd_core.storage import Store

    config = job(tmp_path, *SECOND, "distill.route={sort: second}", f"distill.teacher_source={source}", "distill.train.max_steps=3",
                 f"distill.on_policy.objective={objective}", *EXACT)
    steps = run_pipeline(config, until="distill")
    assert steps["prep"].details["tags"] == ["reverse", "sort"]
    records = history(Store(config.storage), steps["distill"])
    assert all(record["tokens_teacher"] > 0 and record["tokens_second"] > 0 for record in records)
    assert steps["distill"].config["route"] == {"sort": "second"}



def test_a_route_naming_a_tag_the_data_lacks_is_refused_before_any_teacher_trains(tmp_path):
    from kd_core.errors import InputError
    from kd_core.pipeline import run_pipeline

    config = job(tmp_path, *SECOND, "distill.route={sorting: second}", "distill.train.max_steps=3", *EXACT)
    with pytest.raises(InputError, match=r"distill.route.sorting: no conversation of the data has this tag; its tags are reverse, sort"):
        run_pipeline(config, until="distill")
    assert not (tmp_path / "store" / "teacher").exists()
