"""On-policy rollouts: the student's answers and the teacher's scores, in the training process or
in Ray actors (`distill.on_policy`; `OnPolicyTargets` in kd_core/train/targets.py drives them).

Generation (`Generation`: one per training worker):
- `LocalGeneration` (`generation_actors: 0`): the trained student samples its answers itself, so
  they are always written by the current weights.
- `ActorGeneration` (`generation_actors: N`): the worker's own N `GenerationWorker` Ray actors,
  each holding a copy of the student that the task builds (`Task.build_model`). The copy is
  refreshed from the trained student (the DeepSpeed engine's module, or the plain one) when it is
  `sync_every` steps old; micro-batches go to the actors in turn. Calls to one actor run in the
  order they were made, so a refresh sent before a batch is in place when that batch is answered.

Every batch of answers carries the version of the weights that wrote it: the optimizer step whose
student they were. `staleness` is the step that trains on the answers minus that version: 0 when
the student answers itself, up to `sync_every - 1` with actors, and at least 1 with `async`
(written while the previous step trained).

Sampling is seeded per (run seed, step, rank, micro-batch) (`answer_seed`), so answers depend on
the weights and the seed alone. They do not depend on where they are written or on a resume.

Scoring (`Scoring`):
- `LocalScoring` (`teacher_actors: 0`): the teacher loaded beside the student.
- `ActorScoring` (`teacher_actors: N`): a pool of `TeacherScorer` actors made by the driver
  (`teacher_pool`: one pool per teacher, with several), shared by every worker of a run and every
  trial of a search. The teacher then never shares the student's memory, and may sit on other
  nodes or GPUs.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kd_core.config import OnPolicyConfig, StorageConfig
from kd_core.manifest import Manifest
from kd_core.models.teacher import teacher_model_dir
from kd_core.storage import Store


def answer_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """The sampling seed of one micro-batch's answers."""
    return zlib.crc32(f"{seed}:{step}:{rank}:{micro_batch}".encode())


def answered(task, model, batch: dict[str, torch.Tensor], spec, sampling, seed: int) -> dict[str, torch.Tensor]:
    """The task's on-policy batch (`Task.on_policy_batch`) written by `model` under `seed`, leaving
    the process's own random state as it was."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return task.on_policy_batch(model, batch, spec, sampling)


def _on(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _actor_device(settings: OnPolicyConfig) -> torch.device:
    return torch.device("cuda" if settings.actor_gpus > 0 and torch.cuda.is_available() else "cpu")


def _threads(settings: OnPolicyConfig) -> int:
    return max(1, int(settings.actor_cpus))


# ------------------------------------------------------------------------------------ generation
@dataclass
class Answers:
    """A micro-batch's answers: the batch to train on, the weights' version that wrote it, and
    what writing it cost on the engine (seconds, answer tokens)."""

    batch: dict[str, torch.Tensor]
    version: int
    seconds: float = 0.0
    tokens: int = 0


@dataclass
class GenerationStats:
    """Totals since the run (or its resume) started, for the log records."""

    seconds: float = 0.0
    tokens: int = 0
    waited: float = 0.0
    """Seconds the training step spent waiting for answers (the generation bottleneck)."""
    staleness: list[int] = field(default_factory=list)
    """The staleness of the latest step's answers."""

    def record(self, answers: list[Answers], step: int, waited: float) -> None:
        self.seconds += sum(a.seconds for a in answers)
        self.tokens += sum(a.tokens for a in answers)
        self.waited += waited
        self.staleness = [step - a.version for a in answers]

    def terms(self) -> dict[str, float]:
        terms = {"generation_wait_s": self.waited, "generated_tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0}
        if self.staleness:
            terms["staleness"] = sum(self.staleness) / len(self.staleness)
        return terms


def _written(task, model, batch, spec, sampling, seed: int, version: int) -> Answers:
    started = time.perf_counter()
    rows = answered(task, model, batch, spec, sampling, seed)
    tokens = int(rows["loss_mask"].sum()) if rows is not batch else 0  # a batch without a prompt to answer is left as it is
    return Answers(rows, version, time.perf_counter() - started, tokens)


class LocalGeneration:
    """The trained student answers itself (always the current weights); or, given a `writer` (the
    teacher: `distill.on_policy.writer`), that model answers, and its answers are data to learn
    (no sampling log-probs: the step treats them as the dataset's own rows)."""

    def __init__(self, spec, sampling, writer=None):
        self.spec, self.sampling, self.writer = spec, sampling, writer

    def submit(self, batch, seed: int, student, version: int) -> Answers:
        """`version`: the optimizer steps `student` has taken."""
        answers = _written(self.spec.task, self.writer or student, batch, self.spec, self.sampling, seed, version)
        if self.writer is not None:
            answers.batch = {name: values for name, values in answers.batch.items() if name != "sampler_logprobs"}
        return answers

    def result(self, pending: Answers, device) -> Answers:
        return pending

    def state(self, step: int) -> dict:
        return {}

    def restore(self, state: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class GenerationWorker:
    """A Ray actor holding a copy of the student: loads refreshed weights, writes answers."""

    def __init__(self, spec):
        settings = spec.on_policy
        torch.set_num_threads(_threads(settings))
        self.spec, self.device = spec, _actor_device(settings)
        self.model = spec.task.build_model(spec).to(self.device).eval().requires_grad_(False)
        self.sampling = spec.task.on_policy_sampling(spec, Store(spec.storage))
        self.version = -1

    def load(self, weights: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(weights)
        self.version = version

    def weights(self) -> tuple[dict[str, torch.Tensor], int]:
        return {name: value.cpu() for name, value in self.model.state_dict().items()}, self.version

    def answer(self, batch: dict[str, torch.Tensor], seed: int) -> Answers:
        answers = _written(self.spec.task, self.model, _on(batch, self.device), self.spec, self.sampling, seed, self.version)
        answers.batch = _on(answers.batch, "cpu")
        return answers


class ActorGeneration:
    """This training worker's generation actors (module docstring)."""

    def __init__(self, spec):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        settings = spec.on_policy
        worker = ray.remote(num_cpus=settings.actor_cpus, num_gpus=settings.actor_gpus)(GenerationWorker)
        # Outside the worker's placement group (a Tune trial's captures its children): the group
        # holds the worker's own CPUs only, so an actor placed in it would wait forever.
        outside = PlacementGroupSchedulingStrategy(placement_group=None)
        self.actors = [worker.options(scheduling_strategy=outside).remote(spec) for _ in range(settings.generation_actors)]
        self.sync_every = settings.sync_every
        self.version: int | None = None
        """The version of the weights the actors hold (None: none sent yet)."""
        self.turn = 0

    def refresh(self, student, version: int) -> None:
        """Send the student's weights (`version`: the optimizer steps it has taken) when the actors'
        copy is `sync_every` steps old."""
        if self.version is not None and version - self.version < self.sync_every:
            return
        self.load({name: value.detach().to("cpu", copy=True) for name, value in student.state_dict().items()}, version)

    def load(self, weights: dict[str, torch.Tensor], version: int) -> None:
        import ray

        reference = ray.put(weights)
        for actor in self.actors:
            actor.load.remote(reference, version)
        self.version = version

    def submit(self, batch, seed: int, student, version: int):
        self.refresh(student, version)
        actor = self.actors[self.turn % len(self.actors)]
        self.turn += 1
        return actor.answer.remote(_on(batch, "cpu"), seed)

    def result(self, pending, device) -> Answers:
        """The answers of a submission (or ones already in hand: kept by a checkpoint)."""
        import ray

        answers = pending if isinstance(pending, Answers) else ray.get(pending)
        answers.batch = _on(answers.batch, device)
        return answers

    def state(self, step: int) -> dict:
        """What a resume at `step` needs to write the same answers: the copy's weights and version,
        unless the next submission (from the student at `step`) refreshes them anyway."""
        import ray

        if self.version is None or step - self.version >= self.sync_every:
            return {}
        weights, version = ray.get(self.actors[0].weights.remote())
        return {"version": version, "weights": weights}

    def restore(self, state: dict, step: int) -> None:
        if state:
            self.load(state["weights"], state["version"])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


# -------------------------------------------------------------------------------------- scoring
class LocalScoring:
    """The teacher beside the student (loaded by the task, on this worker)."""

    def __init__(self, teacher, spec):
        self.teacher, self.spec = teacher, spec

    def score(self, batches: list[dict[str, torch.Tensor]]) -> list:
        return [self.spec.task.online_targets(self.teacher, batch, self.spec) for batch in batches]


class TeacherScorer:
    """A Ray actor holding the teacher step's model; scores batches for any run of its job."""

    def __init__(self, storage: StorageConfig, teacher: Manifest, task, settings: OnPolicyConfig):
        torch.set_num_threads(_threads(settings))
        self.device = _actor_device(settings)
        self.task = task
        self.teacher = task.load_online_teacher(teacher_model_dir(Store(storage), teacher), None, self.device)

    def score(self, batch: dict[str, torch.Tensor], spec):
        return self.task.online_targets(self.teacher, _on(batch, self.device), spec).to("cpu")


class ActorScoring:
    """A shared pool of `TeacherScorer` actors; a worker's batches go to them in turn, from its
    rank on, so the workers of a run spread over the pool."""

    def __init__(self, actors: list, spec, rank: int):
        import ray

        self.actors, self.turn = actors, rank
        self.spec = ray.put(spec)  # sent once, read by reference with every batch

    def score(self, batches: list[dict[str, torch.Tensor]]) -> list:
        import ray

        device = batches[0]["input_ids"].device if batches else "cpu"
        pending = []
        for batch in batches:
            pending.append(self.actors[self.turn % len(self.actors)].score.remote(_on(batch, "cpu"), self.spec))
            self.turn += 1
        return [targets.to(device) for targets in ray.get(pending)]


@contextlib.contextmanager
def teacher_pool(storage: StorageConfig, teachers: dict[str, Manifest], task, settings: OnPolicyConfig | None) -> Iterator[dict[str, list] | None]:
    """The teacher actors of an on-policy run (`settings`) with `teacher_actors`: name -> that
    many actors for each of its online `teachers` (None for any other run), killed when the run
    is over. A search makes them once for all its trials."""
    if settings is None or not settings.teacher_actors or not teachers:
        yield None
        return
    import ray

    # A scorer holds nothing but the teacher: one that dies is restarted and its batch retried.
    scorer = ray.remote(num_cpus=settings.actor_cpus, num_gpus=settings.actor_gpus, max_restarts=3, max_task_retries=3)(TeacherScorer)
    pools = {name: [scorer.remote(storage, manifest, task, settings) for _ in range(settings.teacher_actors)] for name, manifest in teachers.items()}
    try:
        yield pools
    finally:
        for actors in pools.values():
            for actor in actors:
                ray.kill(actor)
