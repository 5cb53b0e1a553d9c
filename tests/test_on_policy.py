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
from kd_core.devtools import migrated_sqlite_uri
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
            f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}", "compute.backend=local",
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
    real = student.get_output_embeddings().weight.shape[0] - 13  # the rows past the tokenizer's are padding
    rows = sample_answers(student, batch, settings, stop_ids=[7], pad_id=0, seq_len=24, vocab_size=real)
    assert int(rows["input_ids"].max()) < real  # a padding row is never sampled
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
        expected = torch.log_softmax(logits[len(prompt) - 1 : length - 1, :real] / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)
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
    source = OnPolicyTargets(spec, generation=None, scoring=None, rank=0, device="cpu")
    decisions = [source.on_policy(step) for step in range(200)]
    assert decisions == [source.on_policy(step) for step in range(200)]  # every rank and micro-batch of a step agree
    assert 70 < sum(decisions) < 130
    never = OnPolicyTargets(spec.__class__(**{**spec.__dict__, "on_policy": OnPolicyConfig(mixing=0.0)}), None, None, 0, "cpu")
    always = OnPolicyTargets(spec.__class__(**{**spec.__dict__, "on_policy": OnPolicyConfig(mixing=1.0)}), None, None, 0, "cpu")
    assert not any(never.on_policy(step) for step in range(200)) and all(always.on_policy(step) for step in range(200))
    later = OnPolicyTargets(spec.__class__(**{**spec.__dict__, "on_policy": OnPolicyConfig(mixing=1.0, offline_steps=50)}), None, None, 0, "cpu")
    assert [later.on_policy(step) for step in range(100)] == [False] * 50 + [True] * 50  # the dataset's answers first


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


def test_answers_the_teacher_writes_are_learned_as_data(tmp_path, folder):
    """`writer: teacher` (supervised KD on teacher outputs): cross-entropy counts on its answers."""
    from kd_core.pipeline import run_pipeline

    steps = run_pipeline(job(tmp_path, folder, "distill.train.max_steps=2", "distill.on_policy.max_new_tokens=4", "distill.on_policy.writer=teacher"),
                         until="distill")
    metrics = steps["distill"].metrics
    assert metrics["loss"] == pytest.approx(0.5 * metrics["ce"] + 0.5 * metrics["kd"]) and metrics["ce"] > 0
    assert "staleness" in metrics and metrics["trained_tokens"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("data.source=files", "data.chat.train_on=assistant"), "on_policy has the student answer the data's prompts"),
        (("data.chat.train_on=all",), "on_policy has the student answer the data's prompts"),
        (("distill.deepspeed.enabled=true", "distill.deepspeed.zero_stage=3"), "distill.deepspeed.zero_stage: on-policy sampling"),
        (("distill.loss.fused=true", "distill.on_policy.objective=policy_gradient"), "the policy-gradient objective reads the student's full logits"),
        (("distill.on_policy.teacher_top_k=8", "distill.on_policy.objective=policy_gradient"), "needs the teacher's log-prob of every sampled"),
        (("distill.on_policy.teacher_top_k=8", "distill.loss.divergence=reverse_kl", "distill.loss.topk_tail=false"), "distill.loss.topk_tail"),
        (("distill.on_policy.teacher_top_k=8", "distill.loss.topk_tail=false"), "teacher_top_k gives the teacher's top k at the loss temperature"),
        (("compute.backend=ray", "tune.space={distill.on_policy.teacher_actors: {kind: int, low: 1, high: 2}}"), "where the answers are written is not searched"),
        (("distill.on_policy.generation_actors=1",), "distill.on_policy.generation_actors: actors run on Ray, and compute.backend is local"),
        (("distill.on_policy.teacher_actors=2",), "distill.on_policy.teacher_actors: actors run on Ray, and compute.backend is local"),
        (("distill.on_policy.async=true",), "async: the answers are written one step ahead by generation actors"),
        (("distill.on_policy.sync_every=2",), "sync_every: refreshes the generation actors' copy of the student"),
        (("compute.backend=ray", "distill.on_policy.writer=teacher", "distill.on_policy.teacher_actors=1"), "writer: the teacher writes the answers in the training process"),
    ],
)
def test_settings_on_policy_cannot_run_are_config_errors(tmp_path, folder, overrides, message):
    with pytest.raises(ConfigError, match=message):
        job(tmp_path, folder, *overrides)


@pytest.mark.parametrize("top_k", [None, 8])
def test_the_preflight_checks_an_on_policy_job_on_the_bundled_pairs_as_an_online_one(tmp_path, folder, top_k):
    from kd_core.preflight import deep_checks

    config = job(tmp_path, folder, "data.source=python-qa", "data.files=[]", "data.seq_len=128", "distill.loss.divergence=reverse_kl",
                 f"distill.on_policy.teacher_top_k={top_k or 'null'}")
    results = {result.name: result for result in deep_checks(config)}
    assert results["template"].status == "pass" and "python-qa pair" not in results["template"].message
    scored = "online teacher, its top 8, reverse_kl" if top_k else "online teacher, reverse_kl"
    assert results["loss"].status == "pass" and scored in results["loss"].message, results["loss"]
    assert results["temperatures"].status == "pass" and "online teacher" in results["temperatures"].message


# ------------------------------------------------------------------------------ actors
def actor_spec(tmp_path, folder, output: str, **on_policy):
    """A student spec of the on-policy job whose answers are written and scored as `on_policy` says."""
    from kd_core.pipeline import cache_steps, prep_step
    from kd_core.storage import Store
    from kd_core.tasks import task_of
    from kd_core.train.spec import student_spec

    config = job(tmp_path, folder, "distill.on_policy.max_new_tokens=4", "distill.train.log_every=1", "distill.train.batch_size=4")
    prep = prep_step(config)
    teacher = cache_steps(config, prep)["teacher"]
    distill = config.distill.model_copy(update={"on_policy": OnPolicyConfig(**{"max_new_tokens": 4, "actor_cpus": 0.5, **on_policy})})
    return config, student_spec(task_of(prep), distill, config.student, prep, Store(config.storage), output, targets=teacher,
                                checkpoint_every=config.distill.checkpoint_every)


def trained(spec, teacher_actors=None, **options) -> list[dict]:
    """`train_worker` given a driver's teacher pool, as Ray Train's workers are; the log records."""
    from kd_core.storage import Store
    from kd_core.train.loop import train_worker

    train_worker(spec, teacher_actors=teacher_actors, **options)
    text = Store(spec.storage).read_bytes(f"{spec.output_folder}/history.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_actors_write_and_score_what_the_training_process_would(tmp_path, folder, ray_runtime):
    """Seeded per step and micro-batch, refreshed every step: the actors' answers and the teacher
    actors' targets (here its top 16 tokens, `teacher_top_k`) are the training process's own, so
    the runs are the same."""
    from kd_core.train.rollouts import teacher_pool

    train = {"max_steps": 3}
    _, local = actor_spec(tmp_path, folder, "local", teacher_top_k=16)
    _, actors = actor_spec(tmp_path, folder, "actors", generation_actors=1, teacher_actors=1, teacher_top_k=16)
    local.train = actors.train = local.train.model_copy(update=train)
    with teacher_pool(actors.storage, actors.online_teachers(), actors.task, actors.on_policy) as pool:
        by_process, by_actors = trained(local), trained(actors, pool)
    assert [r["loss"] for r in by_actors] == pytest.approx([r["loss"] for r in by_process], rel=1e-5)
    assert all(r["staleness"] == 0 for r in by_actors + by_process) and all(r["generated_tokens_per_s"] > 0 for r in by_actors)


@pytest.mark.slow
def test_a_crashed_async_run_resumes_with_the_answers_it_had_written(tmp_path, folder, ray_runtime, request):
    """`async` answers one step ahead with weights refreshed every 2 steps; a checkpoint keeps the
    answers written for the next step and the actors' lagging weights, so the resumed run trains
    on exactly what the uninterrupted one did."""
    from kd_core.storage import Store
    from kd_core.train.rollouts import teacher_pool

    settings = {"generation_actors": 1, "teacher_actors": 1, "sync_every": 2, "async": True}
    _, whole = actor_spec(tmp_path, folder, "whole", **settings)
    _, interrupted = actor_spec(tmp_path, folder, "interrupted", **settings)
    whole.train = interrupted.train = whole.train.model_copy(update={"max_steps": 5, "dropout": 0.0})
    whole.checkpoint_every = interrupted.checkpoint_every = 3
    pool = teacher_pool(whole.storage, whole.online_teachers(), whole.task, whole.on_policy)
    actors = pool.__enter__()  # one pool serves the three runs, as it serves a search's trials
    request.addfinalizer(lambda: pool.__exit__(None, None, None))
    reference = trained(whole, actors)
    # The first step's answers are written before it, the rest one step ahead; the weights are sent every 2 steps.
    assert [r["staleness"] for r in reference] == [0, 1, 2, 1, 2]

    def crash_at(step):
        def progress(done, record):
            if done == step:
                raise RuntimeError("crashed")
        return progress

    with pytest.raises(RuntimeError, match="crashed"):
        trained(interrupted, actors, progress=crash_at(4))
    store = Store(interrupted.storage)
    checkpoint = store.path(f"{interrupted.checkpoint_folder}/step-00000003")
    assert {path.rsplit("/", 1)[-1] for path in store.fs.ls(checkpoint)} >= {"source-0.safetensors"}
    resumed = trained(interrupted, actors)
    assert [r["step"] for r in resumed] == list(range(1, 6))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    assert [r["staleness"] for r in resumed[3:]] == [r["staleness"] for r in reference[3:]]
    assert [r["trained_tokens"] for r in resumed] == [r["trained_tokens"] for r in reference]  # the counts carry on too


@pytest.mark.slow
def test_an_on_policy_job_on_ray_trains_with_generation_and_teacher_actors(tmp_path, folder, ray_runtime):
    """Through Ray Train: the driver makes the teacher pool, the worker its generation actor."""
    from kd_core.pipeline import run_pipeline

    config = job(
        tmp_path, folder, "compute.backend=ray", "compute.cpus_per_worker=1", "distill.train.max_steps=3", "distill.train.log_every=1",
        "distill.on_policy.max_new_tokens=4", "distill.on_policy.generation_actors=1", "distill.on_policy.teacher_actors=1",
        "distill.on_policy.actor_cpus=0.5", "distill.on_policy.async=true",
    )
    distilled = run_pipeline(config, until="distill")["distill"]
    assert distilled.metrics["staleness"] == 1 and distilled.metrics["generated_tokens_per_s"] > 0
    assert distilled.metrics["loss"] == pytest.approx(0.5 * distilled.metrics["kd"])
    # Where the answers are written is not what they are: the same job without actors has the same key.
    assert "generation_actors" not in distilled.config["on_policy"] and distilled.config["on_policy"]["async"] is True


def test_actors_a_local_ray_cannot_place_are_refused_before_training(ray_runtime):
    from kd_core.config import ComputeConfig, OnPolicyConfig
    from kd_core.train.ray_glue import check_room_for_actors

    compute = ComputeConfig(num_workers=1, cpus_per_worker=1)
    crowded = OnPolicyConfig(generation_actors=1, teacher_actors=3, actor_cpus=1)
    with pytest.raises(ValueError, match=r"need 5 CPUs, and this Ray has 2; lower distill.on_policy.actor_cpus"):
        check_room_for_actors(crowded, 1, compute, workers=1, cpus_per_worker=1)
    check_room_for_actors(crowded.model_copy(update={"actor_cpus": 0.25}), 1, compute, workers=1, cpus_per_worker=1)
    # A search: every concurrent trial has its workers and generation actors; the teacher pool is shared.
    with pytest.raises(ValueError, match=r"2 concurrent trials × .* need 3.5 CPUs.* or tune.max_concurrent"):
        check_room_for_actors(crowded.model_copy(update={"actor_cpus": 0.5, "teacher_actors": 1}), 1, compute, 1, 1, concurrent=2)


@pytest.mark.slow
def test_the_on_policy_recipe_compiles_to_the_same_dags_and_searches_its_sampling_settings(tmp_path):
    """Kubeflow: the on-policy job is the same DAG; tune: λ, β, the temperature and top-p are searchable."""
    import yaml

    from pipelines import engines

    space = (
        "tune.space={distill.on_policy.mixing: {kind: uniform, low: 0.0, high: 1.0}, "
        "distill.loss.divergence_parameter: {kind: uniform, low: 0.1, high: 0.9}, "
        "distill.on_policy.temperature: {kind: uniform, low: 0.5, high: 1.5}, distill.on_policy.top_p: {kind: choice, values: [0.9, 1.0]}}"
    )
    config = load_config(os.path.join(REPO, "configs", "on_policy.yaml"), ["distill.loss.divergence=generalized_jsd", space])
    for pipeline, steps in (("distill", {"prep", "cache", "distill", "evaluate", "condition-1"}),
                            ("tune-distill", {"prep", "cache", "tune", "distill", "evaluate", "condition-1"})):
        spec, _ = yaml.safe_load_all(engines.compile_pipeline(config, tmp_path / f"{pipeline}.yaml", pipeline).read_text())
        assert set(spec["root"]["dag"]["tasks"]) == steps
    with pytest.raises(ConfigError, match=r"tune.space.distill.on_policy.temperature: the value 0.0 makes the job invalid"):
        load_config(os.path.join(REPO, "configs", "on_policy.yaml"), ["tune.space={distill.on_policy.temperature: {kind: uniform, low: 0.0, high: 1.0}}"])


@pytest.mark.slow
def test_an_on_policy_search_runs_its_trials_with_generation_actors_and_one_teacher_pool(tmp_path, folder, ray_runtime):
    """A Tune trial's placement group captures what its workers start: the generation actors must
    be placed outside it, or the first on-policy step waits forever (it did)."""
    from kd_core.pipeline import search_steps

    config = job(
        tmp_path, folder, "compute.backend=ray", "compute.cpus_per_worker=1", "distill.on_policy.max_new_tokens=4",
        "distill.on_policy.generation_actors=1", "distill.on_policy.teacher_actors=1", "distill.on_policy.actor_cpus=0.5",
        "tune.space={distill.on_policy.temperature: {kind: uniform, low: 0.7, high: 1.3}}", "tune.num_trials=1", "tune.max_concurrent=1",
        "tune.max_steps=4", "tune.eval_every=2", "tune.grace_period=1",
    )
    searched = search_steps(config)["tune"]
    assert searched.metrics["trials"] == 1 and searched.metrics["best_val_loss"] > 0
