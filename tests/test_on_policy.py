"""On-policy distillation (`distill.teacher_source: on_policy`, issue 22's first pieces): the
student answers the batch's prompts itself, the online teacher scores its answers, GKD's mixing
decides per step, and the step learns them by a divergence without cross-entropy or by the
policy-gradient objective (kd_core/tasks/causal_lm_step.py, kd_core/train/targets.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hf_models import paragraphs, save_model, style_tokenizer

from kd_core.config import ConfigError, OnPolicyConfig
from kd_core.job import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Qwen-style tokenizer with ChatML, a teacher on it, and chat records."""
    root = tmp_path_factory.mktemp("on_policy")
    tokenizer = style_tokenizer("qwen", paragraphs(200, 0))
    save_model(root / "teacher", "qwen2", tokenizer, padded=13, layers=2)
    records = [{"messages": [{"role": "user", "content": f"what does zip {i} do"}, {"role": "assistant", "content": f"returns a list {i}"}]}
               for i in range(60)]
    (root / "chat.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def job(tmp_path, folder, *overrides):
    return load_config(
        os.path.join(REPO, "configs", "tiny.yaml"),
        [
            f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "compute.backend=local",
            "data.source=chat", f"data.files=[{folder / 'chat.jsonl'}]", f"teacher.path={folder / 'teacher'}", "data.max_documents=null",
            "data.seq_len=64", "distill.teacher_source=on_policy", "distill.deepspeed.enabled=false", "distill.baseline=false", *overrides,
        ],
    )


def chat_batch(folder) -> dict[str, torch.Tensor]:
    """Two packed rows as prep writes them: two conversations in the first, one in the second."""
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(10)) + list(range(8)) + list(range(6)), list(range(14)) + list(range(10))])
    mask = torch.zeros(2, 24, dtype=torch.uint8)
    mask[0, 6:10], mask[0, 15:18], mask[1, 9:14] = 1, 1, 1
    return {"input_ids": ids, "position_ids": positions, "loss_mask": mask}


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_students_answers_follow_their_prompts_and_record_the_sampling_distribution(folder, temperature):
    from transformers import AutoModelForCausalLM

    from kd_core.tasks.causal_lm_step import sample_answers

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(folder / "teacher").train()
    batch = chat_batch(folder)
    settings = OnPolicyConfig(max_new_tokens=5, temperature=temperature, samples_per_prompt=2)
    rows = sample_answers(student, batch, settings, stop_ids=[7], pad_id=0, seq_len=24)
    assert student.training  # back in train mode
    assert rows["input_ids"].shape == (4, 24) and set(rows) == {"input_ids", "position_ids", "loss_mask", "sampler_logprobs"}
    prompts = [batch["input_ids"][0, :6], batch["input_ids"][1, :9]]  # each row's first conversation, up to its answer
    for row in range(4):
        prompt, answer = prompts[row // 2], rows["loss_mask"][row].bool()
        length = len(prompt) + int(answer.sum())
        assert torch.equal(rows["input_ids"][row, : len(prompt)], prompt) and not answer[: len(prompt)].any()
        assert answer[len(prompt) : length].all() and not answer[length:].any() and int(answer.sum()) <= 5
        assert 7 not in rows["input_ids"][row, len(prompt) : length - 1].tolist()  # a stop token can only end the answer
        assert torch.equal(rows["position_ids"][row, :length], torch.arange(length)) and rows["position_ids"][row, length] == 0
        # The sampling distribution, recomputed: softmax(logits / T) of the position before each answer token.
        with torch.no_grad():
            logits = student(input_ids=rows["input_ids"][row : row + 1, :length]).logits[0].float()
        tokens = rows["input_ids"][row, len(prompt) : length]
        expected = torch.log_softmax(logits[len(prompt) - 1 : length - 1] / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(rows["sampler_logprobs"][row, len(prompt) : length], expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ mixing
def test_mixing_decides_per_step_the_same_on_every_call_and_lambda_0_is_the_online_teacher(tmp_path, folder):
    from kd_core.pipeline import cache_steps, prep_step
    from kd_core.storage import Store
    from kd_core.tasks import task_of
    from kd_core.train.spec import student_spec
    from kd_core.train.targets import OnPolicyTargets

    config = job(tmp_path, folder, "distill.on_policy.mixing=0.5")
    prep = prep_step(config)
    teacher = cache_steps(config, prep)["teacher"]
    spec = student_spec(task_of(prep), config.distill, config.student, prep, Store(config.storage), "out", targets=teacher)
    assert spec.on_policy == config.distill.on_policy
    source = OnPolicyTargets(None, spec, [0])
    decisions = [source.on_policy(step) for step in range(200)]
    assert decisions == [source.on_policy(step) for step in range(200)]  # every rank and micro-batch of a step agree
    assert 70 < sum(decisions) < 130
    never = OnPolicyTargets(None, spec.__class__(**{**spec.__dict__, "on_policy": OnPolicyConfig(mixing=0.0)}), [0])
    always = OnPolicyTargets(None, spec.__class__(**{**spec.__dict__, "on_policy": OnPolicyConfig(mixing=1.0)}), [0])
    assert not any(never.on_policy(step) for step in range(200)) and all(always.on_policy(step) for step in range(200))


# ------------------------------------------------------------------------------ the step
@pytest.mark.parametrize("objective", ["divergence", "policy_gradient"])
def test_the_students_own_answers_are_learned_without_cross_entropy(folder, objective):
    from transformers import AutoModelForCausalLM

    from kd_core.losses import DistillationObjective, TeacherTargets, policy_gradient_reverse_kl
    from kd_core.tasks.causal_lm_step import CausalLMStep, sample_answers

    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_pretrained(folder / "teacher")
    rows = sample_answers(student, chat_batch(folder), OnPolicyConfig(max_new_tokens=6), stop_ids=[7], pad_id=0, seq_len=24)
    teacher_logits = torch.randn(len(rows["input_ids"]), 24, 400, generator=torch.Generator().manual_seed(2)) * 3
    step = CausalLMStep(student, DistillationObjective(ce_weight=0.7, kd_weight=0.5, divergence="reverse_kl"), vocab_size=400,
                        on_policy_objective=objective)
    terms = step(rows, TeacherTargets(logits=teacher_logits))
    assert step.objective.ce_weight == 0.7  # the cross-entropy weight is back for the dataset's batches
    counted = torch.zeros(rows["loss_mask"].shape, dtype=torch.bool)
    counted[:, :-1] = rows["loss_mask"][:, 1:].bool()
    if objective == "divergence":
        torch.testing.assert_close(terms["loss"], 0.5 * terms["kd"])  # no cross-entropy on the student's own samples
    else:
        ids = rows["input_ids"]
        with torch.no_grad():
            logits = student(input_ids=ids, position_ids=rows["position_ids"], use_cache=False).logits[..., :400].float()
        gather = lambda values: torch.log_softmax(values[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # noqa: E731
        expected = policy_gradient_reverse_kl(gather(logits), rows["sampler_logprobs"][:, 1:], gather(teacher_logits), mask=counted[:, :-1])
        torch.testing.assert_close(terms["loss"].detach(), 0.5 * expected, rtol=1e-5, atol=1e-6)
    terms["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())


# ------------------------------------------------------------------------------ the job
def test_an_on_policy_job_distills_and_its_settings_are_in_its_key(tmp_path, folder):
    from kd_core.pipeline import run_pipeline

    steps = run_pipeline(job(tmp_path, folder, "distill.train.max_steps=3", "distill.on_policy.max_new_tokens=4"), until="distill")
    assert steps["distill"].metrics["loss"] == pytest.approx(0.5 * steps["distill"].metrics["kd"])  # every batch on-policy: no CE
    assert steps["distill"].config["on_policy"]["max_new_tokens"] == 4
    other = run_pipeline(job(tmp_path, folder, "distill.train.max_steps=3", "distill.on_policy.max_new_tokens=5"), until="distill")
    assert other["distill"].key != steps["distill"].key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("data.source=files", "data.chat.train_on=assistant"), "on_policy has the student answer the data's prompts"),
        (("data.chat.train_on=all",), "on_policy has the student answer the data's prompts"),
        (("distill.deepspeed.enabled=true", "distill.deepspeed.zero_stage=3"), "distill.deepspeed.zero_stage: on-policy sampling"),
        (("distill.loss.fused=true", "distill.on_policy.objective=policy_gradient"), "the policy-gradient objective reads the student's full logits"),
    ],
)
def test_settings_on_policy_cannot_run_are_config_errors(tmp_path, folder, overrides, message):
    with pytest.raises(ConfigError, match=message):
        job(tmp_path, folder, *overrides)


def test_the_preflight_checks_an_on_policy_job_on_the_bundled_pairs_as_an_online_one(tmp_path, folder):
    from kd_core.preflight import deep_checks

    config = job(tmp_path, folder, "data.source=python-qa", "data.files=[]", "data.seq_len=128", "distill.loss.divergence=reverse_kl")
    results = {result.name: result for result in deep_checks(config)}
    assert results["template"].status == "pass" and "python-qa pair" not in results["template"].message
    assert results["loss"].status == "pass" and "online teacher, reverse_kl" in results["loss"].message, results["loss"]
    assert results["temperatures"].status == "pass" and "online teacher" in results["temperatures"].message
