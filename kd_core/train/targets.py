"""Where a student's teacher targets come from, step by step: the `TargetSource`s.

The training loop asks its source for each optimizer step's micro-batches
(`source.step_batches(next_batch, student, step, count)`: (batch, targets) pairs) and passes them
to the step module; the objectives take one `TeacherTargets` (`kd_core/losses/targets.py`). A
source reads the stream's batches itself (`next_batch()`), so it may replace them (the on-policy
source trains on the student's own answers) or read one step ahead (its `async`). What it holds
between steps goes into checkpoints (`state`, `restore`). `target_source` picks one per run from
the spec:

- `CachedTargets` (a spec with cache shards: `distill.teacher_source: cache`): the training stream
  already decoded the cache shard's columns into the batch through the cache codec
  (`CacheLayout.decode`); they become the batch's `TeacherTargets`.
- `OnlineTargets` (a spec with an online teacher: `teacher_source: online`): the frozen teacher,
  loaded by the task on this worker (`Task.load_online_teacher`), runs on the batch
  (`Task.online_targets`: for a language model, the same forward pass the cache stage runs,
  `kd_core.models.inference.teacher_forward`).
- `OnPolicyTargets` (`teacher_source: on_policy`): with probability `distill.on_policy.mixing`
  (GKD's λ, drawn per optimizer step from the seed and the step, so every rank and every
  micro-batch of a step agree, and a resumed run draws the same), the step's batches become the
  student's own answers to their prompts (`Task.on_policy_batch`); the teacher then scores
  whichever batches they are. Where answers are written and scored (the training process, or
  Ray actors) is `kd_core/train/rollouts.py`'s.
- `NoTargets`: a model that learns from the data alone (a teacher kdflow trains, the baseline).

A new way to get targets is one more class here, the spec field that asks for it, and its case
in `target_source`.
"""

from __future__ import annotations

import random
import time
from typing import Protocol

import torch
from torch import nn

from kd_core.losses import TeacherMix, TeacherTargets
from kd_core.models.teacher import teacher_model_dir
from kd_core.storage import Store
from kd_core.train.rollouts import ActorGeneration, ActorScoring, Answers, GenerationStats, LocalGeneration, LocalScoring, answer_seed
from kd_core.train.spec import TrainSpec


class TargetSource(Protocol):
    teacher: object | None
    """The model this source runs on every batch in the training process, if any (its parameters
    are counted per rank)."""

    def step_batches(self, next_batch, student: nn.Module, step: int, count: int) -> list[tuple[dict[str, torch.Tensor], TeacherTargets | None]]:
        """The `count` (batch to train on, its targets) pairs of optimizer `step` for the `student`
        being trained, on the batch's device; `next_batch()` reads the next batch of the stream."""
        ...

    def log_terms(self) -> dict[str, float]:
        """What the source adds to a log record (e.g. the generation's staleness)."""
        ...

    def state(self, step: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """What a checkpoint after `step` optimizer steps keeps of the source (tensors, JSON), if anything."""
        ...

    def restore(self, state: tuple[dict[str, torch.Tensor], dict] | None, step: int) -> None:
        """Continue at `step` from `state()` of a checkpoint (None: it kept nothing)."""
        ...

    def batches_ahead(self) -> int:
        """Stream batches the source has read past the steps it handed out (`async`)."""
        ...

    def close(self) -> None:
        """Release what the source holds (actors)."""
        ...


class BatchSource:
    """A source that gives each batch its targets as it comes, keeping nothing between steps."""

    teacher = None

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], TeacherTargets | None]:
        raise NotImplementedError

    def step_batches(self, next_batch, student: nn.Module, step: int, count: int) -> list[tuple[dict[str, torch.Tensor], TeacherTargets | None]]:
        return [self(next_batch(), student, step) for _ in range(count)]

    def log_terms(self) -> dict[str, float]:
        return {}

    def state(self, step: int) -> None:
        return None

    def restore(self, state, step: int) -> None:
        pass

    def batches_ahead(self) -> int:
        return 0

    def close(self) -> None:
        pass


class NoTargets(BatchSource):
    """No teacher: the model learns from the data alone."""

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], None]:
        return batch, None


class CachedTargets(BatchSource):
    """The cache's targets, decoded into the batch by the training stream (several teachers':
    the `teacher`'s under the plain keys, each other's under `<name>:` keys)."""

    def __init__(self, spec: TrainSpec):
        self.spec = spec

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], TeacherTargets | TeacherMix]:
        targets = TeacherTargets.from_batch(batch)  # `<name>:` keys are not its own
        if not self.spec.several_teachers:
            return batch, targets
        parts = {"teacher": targets}
        for name in self.spec.more_caches:
            prefix = f"{name}:"
            parts[name] = TeacherTargets.from_batch({key[len(prefix) :]: value for key, value in batch.items() if key.startswith(prefix)})
        return batch, teacher_mix(self.spec, batch, parts)


class OnlineTargets(BatchSource):
    """The teacher (or teachers) run on every batch, as the job's task runs it."""

    def __init__(self, scoring, teacher=None):
        self.scoring, self.teacher = scoring, teacher

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], TeacherTargets]:
        return batch, self.scoring.score([batch])[0]


def routed_positions(spec: TrainSpec, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Teacher name -> the batch positions it teaches (`distill.route`): each token goes to the
    teacher its conversation's tag (the `tag_ids` column; `prep_details["tags"]` names them) is
    routed to, and every other token to `teacher`."""
    tags = spec.prep_details.get("tags")
    if tags is None or "tag_ids" not in batch:
        raise ValueError(
            f"{spec.output_folder}: distill.route reads each conversation's tag, which this prepared data does not record "
            "(prepared by an older kdflow); rerun prep (--force prep)"
        )
    tag_ids, positions = batch["tag_ids"], {}
    for name in {name for name in spec.route.values() if name != "teacher"}:
        routed = [index for index, tag in enumerate(tags) if spec.route.get(tag) == name]
        positions[name] = torch.isin(tag_ids, torch.tensor(routed, dtype=tag_ids.dtype, device=tag_ids.device))
    elsewhere = torch.zeros_like(tag_ids, dtype=torch.bool)
    for mask in positions.values():
        elsewhere |= mask
    return {"teacher": ~elsewhere, **positions}


def teacher_mix(spec: TrainSpec, batch: dict[str, torch.Tensor], parts: dict[str, TeacherTargets]) -> TeacherMix:
    """Several teachers' targets of `batch`, routed (`distill.route`) or weighted (`distill.teacher_weights`)."""
    if spec.route:
        return TeacherMix(parts, routed_positions(spec, batch))
    return TeacherMix({name: parts[name] for name in spec.teacher_weights}, {name: None for name in spec.teacher_weights}, spec.teacher_weights)


class OnPolicyTargets:
    """The student's own answers, scored by the teacher (GKD's mixing: module docstring), written
    and scored where `generation` and `scoring` say (`kd_core/train/rollouts.py`). With `async`,
    each step reads and submits the next step's batches before it trains, and a checkpoint keeps
    those answers (and the generation actors' weights, while they lag), so a resumed run trains on
    exactly what an uninterrupted one would."""

    def __init__(self, spec: TrainSpec, generation, scoring, rank: int, device, teacher=None):
        self.spec, self.generation, self.scoring, self.rank, self.device = spec, generation, scoring, rank, device
        self.teacher = teacher
        """The teacher in this process (None: it is scored by actors)."""
        self.ahead: tuple[int, bool, list] | None = None
        """(step, on-policy, its submitted micro-batches): the next step's, written while this one trains."""
        self.stats = GenerationStats()
        self.trained_tokens = 0

    def on_policy(self, step: int) -> bool:
        """Whether `step` learns answers written for it: never before `offline_steps`, then with
        probability `mixing`, drawn from the seed and the step."""
        if step < self.spec.on_policy.offline_steps:
            return False
        return random.Random(f"{self.spec.train.seed}:{step}").random() < self.spec.on_policy.mixing

    def submitted(self, next_batch, student, step: int, count: int, version: int) -> tuple[int, bool, list]:
        """Step `step`'s micro-batches, read, and sent to be answered by the student of `version`
        optimizer steps when the step is on-policy."""
        on_policy = self.on_policy(step)
        items = []
        for micro_batch in range(count):
            batch = next_batch()
            seed = answer_seed(self.spec.train.seed, step, self.rank, micro_batch)
            items.append(self.generation.submit(batch, seed, student, version) if on_policy else batch)
        return step, on_policy, items

    def step_batches(self, next_batch, student, step: int, count: int):
        current = self.ahead if self.ahead is not None and self.ahead[0] == step else self.submitted(next_batch, student, step, count, step)
        self.ahead = None
        if self.spec.on_policy.async_generation and step + 1 < self.spec.train.max_steps:
            self.ahead = self.submitted(next_batch, student, step + 1, count, step)
        _, on_policy, items = current
        batches = items
        if on_policy:
            waited = time.perf_counter()
            answers = [self.generation.result(item, self.device) for item in items]
            self.stats.record(answers, step, time.perf_counter() - waited)
            batches = [a.batch for a in answers]
        self.trained_tokens += sum(int(batch["loss_mask"].sum()) for batch in batches if "loss_mask" in batch)
        return list(zip(batches, self.scoring.score(batches)))

    def log_terms(self) -> dict[str, float]:
        """The generation's (`GenerationStats.terms`) and `trained_tokens`: the tokens this worker's
        student has learned on so far (answers or the dataset's), for comparing runs at equal tokens."""
        return self.stats.terms() | {"trained_tokens": float(self.trained_tokens)}

    def state(self, step: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The answers already written for the next step (`async`), the generation actors' weights
        while a resume would not refresh them, and the counts the log records carry on."""
        tensors = {}
        meta = {"trained_tokens": self.trained_tokens, "generation": {"seconds": self.stats.seconds, "tokens": self.stats.tokens, "waited": self.stats.waited}}
        if self.ahead is not None:
            ahead_step, on_policy, items = self.ahead
            meta["ahead"] = {"step": ahead_step, "on_policy": on_policy, "micro_batches": len(items), "versions": []}
            for index, item in enumerate(items):
                if on_policy:
                    answers = self.generation.result(item, "cpu")
                    items[index] = answers  # resolved; kept as it is for this run too
                    meta["ahead"]["versions"].append(answers.version)
                    batch = answers.batch
                else:
                    batch = item
                tensors |= {f"ahead.{index}.{name}": value.detach().cpu().contiguous() for name, value in batch.items()}
        generation = self.generation.state(step)
        if generation:
            meta["generation_version"] = generation["version"]
            tensors |= {f"weights.{name}": value.clone().contiguous() for name, value in generation["weights"].items()}
        return tensors, meta

    def restore(self, state: tuple[dict[str, torch.Tensor], dict] | None, step: int) -> None:
        if state is None:
            return
        tensors, meta = state
        self.trained_tokens = meta.get("trained_tokens", 0)
        counts = meta.get("generation", {})
        self.stats.seconds, self.stats.tokens, self.stats.waited = counts.get("seconds", 0.0), counts.get("tokens", 0), counts.get("waited", 0.0)
        if "generation_version" in meta:
            weights = {name.removeprefix("weights."): value for name, value in tensors.items() if name.startswith("weights.")}
            self.generation.restore({"version": meta["generation_version"], "weights": weights}, step)
        if "ahead" in meta:
            ahead = meta["ahead"]
            items = []
            for index in range(ahead["micro_batches"]):
                prefix = f"ahead.{index}."
                batch = {name.removeprefix(prefix): value.to(self.device) for name, value in tensors.items() if name.startswith(prefix)}
                items.append(Answers(batch, ahead["versions"][index]) if ahead["on_policy"] else batch)
            self.ahead = (ahead["step"], ahead["on_policy"], items)

    def batches_ahead(self) -> int:
        return len(self.ahead[2]) if self.ahead is not None else 0

    def close(self) -> None:
        self.generation.close()


def target_source(
    spec: TrainSpec, store: Store, runner, device: torch.device, rank: int = 0, teacher_actors: dict[str, list] | None = None,
) -> TargetSource:
    """The source of `spec`'s run: the online teachers (loaded here, on this worker, or the
    driver's `teacher_actors` for an on-policy run with `teacher_actors`), the cache, or none."""
    if spec.online_teacher is not None:
        scoring, teacher = online_scoring(spec, store, runner, device, rank, teacher_actors)  # the teachers that teach
        if spec.on_policy is None:
            return OnlineTargets(scoring, teacher)
        settings = spec.on_policy
        if settings.generation_actors:
            generation = ActorGeneration(spec)
        else:
            writer = None
            if settings.writer == "teacher":
                from kd_core.train.deepspeed_engine import TeacherEngine

                writer = teacher.model if isinstance(teacher, TeacherEngine) else teacher  # a DeepSpeed engine's module writes
            generation = LocalGeneration(spec, spec.task.on_policy_sampling(spec, store), writer)
        return OnPolicyTargets(spec, generation, scoring, rank, device, teacher)
    if spec.cache_shards:
        return CachedTargets(spec)
    return NoTargets()


def online_scoring(spec: TrainSpec, store: Store, runner, device, rank: int, teacher_actors: dict[str, list] | None):
    """(how batches are scored, the `teacher` model in this process or None): each online teacher
    loaded here, or scored by its actors (`distill.on_policy.teacher_actors`); several teachers'
    scores become one `TeacherMix` per batch."""
    by_actors = spec.on_policy is not None and spec.on_policy.teacher_actors
    if by_actors and not teacher_actors:
        raise ValueError(
            f"{spec.output_folder}: distill.on_policy.teacher_actors is {spec.on_policy.teacher_actors} but this worker was given no "
            "teacher actors (they are made by the Ray driver: compute.backend ray)"
        )
    scorings, teacher = {}, None
    for name, manifest in spec.online_teachers().items():
        if by_actors:
            scorings[name] = ActorScoring(teacher_actors[name], spec, rank)
            continue
        model = spec.task.load_online_teacher(teacher_model_dir(store, manifest), runner, device)
        teacher = model if name == "teacher" else teacher
        scorings[name] = LocalScoring(model, spec)
    if spec.several_teachers:
        return SeveralTeachers(scorings, spec), teacher
    return scorings["teacher"], teacher


class SeveralTeachers:
    """Scores each batch with the teachers that teach some of its tokens (`teacher_mix`)."""

    def __init__(self, scorings: dict, spec: TrainSpec):
        self.scorings, self.spec = scorings, spec

    def score(self, batches: list[dict[str, torch.Tensor]]) -> list[TeacherMix]:
        mixes = []
        for batch in batches:
            positions = routed_positions(self.spec, batch) if self.spec.route else None
            needed = [name for name in self.scorings if positions is None or positions[name].any()] or ["teacher"]
            parts = {name: self.scorings[name].score([batch])[0] for name in needed}
            for name in self.scorings:  # a teacher with no token here: any scored part stands in, taught nowhere
                parts.setdefault(name, parts[needed[0]])
            mixes.append(teacher_mix(self.spec, batch, parts))
        return mixes
