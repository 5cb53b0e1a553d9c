"""A diverged run never becomes champion.

- A step whose loss or gradient norm is NaN or infinite changes nothing (weights, optimizer
  moments, schedule), with plain torch and with DeepSpeed with and without ZeRO; all ranks agree.
- A run that keeps diverging aborts with `TrainingDiverged`, naming the step and the last finite
  loss (the tiny job at learning rate 1e30, plain and DeepSpeed).
- With no `eval.gates`, the default sanity gates fail a student no better than uniform.

Run: .venv/bin/python -m pytest tests/test_nonfinite.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_core.config import DeepSpeedConfig, TrainConfig
from kd_core.job import load_config
from kd_core.stages.prep import prep
from kd_core.errors import TrainingDiverged
from kd_core.gates import evaluate_gates
from kd_core.tasks.causal_lm import CausalLM
from kd_core.tasks.reward import Reward
from kd_core.storage import Store
from kd_core.train.deepspeed_engine import DeepSpeedRunner, deepspeed_config
from kd_core.tasks import task_of
from kd_core.train.spec import TrainSpec
from kd_core.train.loop import make_optimizer, train_worker
from kd_core.train.step import PlainRunner

REPO = Path(__file__).resolve().parents[1]
TRAIN = TrainConfig(batch_size=2, learning_rate=0.1, warmup_steps=3, max_steps=10)


class Regression(nn.Module):
    """A real module with the runners' contract: forward(batch, targets) returns the loss terms."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, batch, targets):
        return {"loss": ((self.linear(batch["x"]) - batch["y"]) ** 2).mean()}


def batch(seed: int, poisoned: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, generator=generator)
    if poisoned:
        x[0, 0] = float("nan")
    return {"x": x, "y": torch.randn(2, 1, generator=generator)}


def make_runner(kind: str):
    module = Regression()
    optimizer, schedule = make_optimizer(module, TRAIN)
    if kind == "plain":
        return PlainRunner(module, optimizer, schedule, grad_clip=1.0)
    config = deepspeed_config(DeepSpeedConfig(zero_stage=int(kind[-1])), TRAIN, world_size=1)
    return DeepSpeedRunner(module, optimizer, schedule, config)


def weights(runner) -> list[torch.Tensor]:
    module = runner.engine.module if isinstance(runner, DeepSpeedRunner) else runner.module
    return [parameter.detach().clone() for parameter in module.parameters()]


@pytest.mark.parametrize("kind", ["plain", "zero0", "zero1", "zero2"])
def test_a_non_finite_step_changes_nothing(kind):
    """clean, NaN, clean ends exactly where clean, clean does: the NaN step moved no weight, no
    Adam moment or step count, and not the learning-rate schedule."""
    reference, poisoned = make_runner(kind), make_runner(kind)
    for step in (batch(1), batch(2)):
        reference_terms = reference.step([(step, None)])
    first = poisoned.step([(batch(1), None)])
    before = weights(poisoned)
    skipped = poisoned.step([(batch(9, poisoned=True), None)])
    assert first["nonfinite"] == 0.0 and skipped["nonfinite"] == 1.0 and math.isnan(skipped["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, weights(poisoned)))
    assert skipped["lr"] == first["lr"]  # the schedule waited
    last = poisoned.step([(batch(2), None)])
    assert last["nonfinite"] == 0.0 and last["lr"] == reference_terms["lr"]
    assert all(torch.equal(a, b) for a, b in zip(weights(reference), weights(poisoned)))
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(poisoned)))


def _verdict_of_rank(rank: int, port: int, verdicts) -> None:
    from kd_core.train.step import all_ranks_finite

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loss = torch.tensor(float("inf") if rank == 1 else 2.0)  # only rank 1 saw a non-finite loss
        verdicts[rank] = all_ranks_finite([loss, torch.tensor(1.0)])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_rank_skips_when_one_rank_is_not_finite():
    import torch.multiprocessing as mp

    from kd_core.devtools import free_port

    verdicts = mp.Manager().dict()
    mp.spawn(_verdict_of_rank, args=(free_port(), verdicts), nprocs=2)
    assert dict(verdicts) == {0: False, 1: False}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={tmp_path_factory.mktemp('nonfinite')}", "compute.backend=local"])
    store = Store(config.storage)
    return config, store, prep(config.data, store)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["plain", "zero3"])
def test_a_run_at_learning_rate_1e30_aborts_naming_the_step_and_the_last_finite_loss(prepared, runner):
    config, store, prep_manifest = prepared
    train = config.distill.train.model_copy(update={"learning_rate": 1e30, "max_nonfinite_steps": 2, "max_steps": 20})
    deepspeed = None if runner == "plain" else config.distill.deepspeed.model_copy(update={"zero_stage": 3})
    spec = TrainSpec.from_prep(prep_manifest, store, f"diverged-{runner}", config.student.architecture, train, task=task_of(prep_manifest), deepspeed=deepspeed)
    with pytest.raises(TrainingDiverged) as raised:
        train_worker(spec)
    diverged = raised.value
    # The first update (finite loss) blows the weights up; every later step is skipped, and the
    # third in a row aborts: max_nonfinite_steps = 2.
    assert (diverged.last_finite_step, diverged.step) == (1, 4)
    assert math.isfinite(diverged.last_finite_loss) and diverged.last_finite_loss > 0
    assert str(diverged) == (
        f"diverged-{runner}: training diverged at step 4: the loss or gradient norm was NaN or infinite for 3 steps in a row "
        f"(distill.train.max_nonfinite_steps = 2); the last finite loss was {diverged.last_finite_loss:.4g} at step 1. "
        "Lower distill.train.learning_rate, keep distill.train.grad_clip set, or check the data and teacher targets"
    )
    assert not store.exists(f"diverged-{runner}/model/model.safetensors")  # nothing saved to be registered


def test_the_default_gates_fail_a_student_no_better_than_uniform():
    vocab = 300
    metrics = {
        "uniform": {"perplexity": float(vocab)},
        "baseline": {"perplexity": 120.0},
        "student": {"perplexity": vocab * 0.9995},  # a collapsed student: uniform up to float error
    }
    assert list(CausalLM.sanity_gates[:1]) == ["student.perplexity < 0.99 * uniform.perplexity"]
    results = evaluate_gates(list(CausalLM.sanity_gates), metrics)
    assert [gate["passed"] for gate in results] == [False, False]
    metrics["student"]["perplexity"] = 110.0
    assert [gate["passed"] for gate in evaluate_gates(list(CausalLM.sanity_gates), metrics)] == [True, True]
    metrics["student"]["perplexity"] = math.nan  # a diverged student's NaN never passes
    assert not any(gate["passed"] for gate in evaluate_gates(list(CausalLM.sanity_gates), metrics))


def test_the_uniform_reward_model_scores_the_kl_of_a_coin_against_the_teacher():
    import numpy as np

    from kd_core.eval.reward import uniform_preference_scores

    teacher = {"chosen": np.array([2.0, -1.0, 0.5], dtype=np.float32), "rejected": np.array([0.0, 1.0, 0.5], dtype=np.float32)}
    p = 1 / (1 + np.exp(-(teacher["chosen"] - teacher["rejected"]).astype(np.float64)))
    coin = np.mean(p * np.log(2 * p) + (1 - p) * np.log(2 * (1 - p)))  # KL(Bernoulli(p) ‖ Bernoulli(1/2))
    scores = uniform_preference_scores(teacher)
    assert scores["preference_kl_to_teacher"] == pytest.approx(coin, rel=1e-5) and scores["pairwise_accuracy_human"] == 0.5
    assert Reward.sanity_gates[0] == "student.preference_kl_to_teacher < 0.99 * uniform.preference_kl_to_teacher"


def test_the_divergence_comes_out_of_ray_trains_worker_group_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from kd_core.train.ray_glue import _diverged_worker

    diverged = TrainingDiverged("run: training diverged at step 4", step=4, last_finite_loss=3.2, last_finite_step=1)
    wrapped = RuntimeError("worker 1 failed")
    wrapped.__cause__ = diverged
    assert _diverged_worker(WorkerGroupError("rank 0 and 1 failed", {0: diverged, 1: wrapped})) is diverged
    assert _diverged_worker(WorkerGroupError("rank 0 failed", {0: RuntimeError("out of memory")})) is None
    assert _diverged_worker(ValueError("not from Ray Train")) is None
    import pickle  # Ray carries worker errors across processes: the fields survive

    assert pickle.loads(pickle.dumps(diverged)).last_finite_loss == 3.2
