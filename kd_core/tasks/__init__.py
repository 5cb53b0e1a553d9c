"""One home per kind of distillation: the `Task` protocol and the registry of tasks.

A task is everything that differs between kinds of distillation: which data it prepares, the
batch columns each role reads, how each role's model is built, its training step and objective,
how the teacher's outputs are computed and cached, how a student is validated and measured, the
report's figures, the CLI's summary and how the registry logs the model. The stages, the
training engine and the eval and registry code are the same for every task: they ask the job's
task (one object, found once by name) and never branch on which one it is.

    TASKS = (CausalLM(), Reward(), CrossTokenizer(), Embedding(), Tabular())   # the registry: a plain tuple, looked up by name
    task = task_named(config.task)        # the job's task, resolved once from the config
    task = task_of(prep_manifest)         # ... and by every later stage from the prep manifest

The prep stage records the task's name in its manifest (`details["task"]`); the stages after it
read it from there (`task_of`), so a cache or a student can never be read as another task's. The
eval stage writes it into its metrics, from which the register stage and the CLI read it.

A task is a stateless object of plain methods: it travels inside a `TrainSpec` to Ray workers
(pickled by reference to its class). Adding a task is one new module here plus its entry in
`TASKS` (docs/ARCHITECTURE.md: "Add a task").
"""

from __future__ import annotations

from kd_core.manifest import Manifest, ManifestError
from kd_core.tasks.base import Task
from kd_core.tasks.causal_lm import CausalLM
from kd_core.tasks.cross_tokenizer import CrossTokenizer
from kd_core.tasks.embedding import Embedding
from kd_core.tasks.reward import Reward
from kd_core.tasks.tabular import Tabular

TASKS: tuple[Task, ...] = (CausalLM(), Reward(), CrossTokenizer(), Embedding(), Tabular())
"""Every task kdflow runs, by `name` (the values `task:` takes in a job config)."""


def task_named(name: str) -> Task:
    """The task of that name; a ValueError naming the known ones otherwise."""
    for task in TASKS:
        if task.name == name:
            return task
    raise ValueError(f"unknown task {name!r}; use one of {', '.join(task.name for task in TASKS)}")


def task_of(prep: Manifest) -> Task:
    """The task a prep manifest was prepared for (recorded by the prep stage)."""
    name = prep.details.get("task")
    if name is None:
        raise ManifestError(
            f"{prep.folder}: this prep manifest names no task (an older kdflow wrote it); rerun the prep step: add --force prep"
        )
    return task_named(name)


__all__ = ["TASKS", "Task", "task_named", "task_of"]
