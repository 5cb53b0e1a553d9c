"""Checkpoints of the training loop: what one holds, where it goes, and how a run resumes from it.

A checkpoint of step N is one folder, written by every rank:
- `deepspeed/`: the DeepSpeed checkpoint (`engine.save_checkpoint` on every rank: the module
  states from rank 0, or from every rank at ZeRO-3, each rank's optimizer partition, and the
  learning-rate schedule). A plain-torch run writes `model.safetensors`, `optimizer.pt` (tensors
  and numbers only) and `schedule.json` from rank 0 instead.
- `rank-<R>.safetensors`: each rank's RNG states, with the step and world size in its metadata.
- `stream-<R>.json`: each rank's data-stream positions (`kd_core.data.stream.TrackedBatches`):
  for every consumer it reads through (one per DataLoader worker), the epoch, the entry of the
  epoch's shard plan, the rows of it taken in, the rows served, the shuffle generator's state and
  the buffered rows as (epoch, shard index, row) references, as of the last batch the trainer
  took (not what prefetch threads or workers read ahead), and the batches served so far (whose
  turn is next among the workers).
- `source-<R>.safetensors`: what each rank's target source keeps between steps, when it keeps
  anything (`TargetSource.state`): an on-policy run's answers already written for the next step
  (`async`) and its generation actors' weights while they lag behind the student.
- `history.jsonl` and `run.json` from rank 0: the log records so far and the MLflow run id, so a
  resumed run appends to the same history and the same MLflow run.

A resumed rank's stream starts from its positions: it reads back only the shards its buffers
reference and the ones it was reading, whatever the step, and continues with exactly the batch
that comes next; no sample is skipped or repeated. A checkpoint without `stream-<R>.json`
(written by an older kdflow) is resumed by replaying the stream up to step N without training on
it, which reads every batch before it; the run says so in one line.

Where checkpoints go (`CheckpointSink`):
- `RayTrainCheckpoints`: under Ray Train each rank writes its part to a local temporary folder and
  reports it with `ray.train.report(checkpoint=...)`. Ray merges the ranks' parts into one folder
  on the run's storage (the configured store) and hands the latest back through
  `ray.train.get_checkpoint()`, both to workers it restarts after a failure
  (`compute.max_failures`) and to a later run of the same step (`distill.resume: auto`).
- `StoreCheckpoints`: without Ray (`compute.backend: local`, the GPU check) each rank uploads its
  part into `<folder>/step-<N>/` and rank 0 marks the folder complete once every rank has.

Nothing is unpickled: DeepSpeed's files are read with `torch.load(weights_only=True)` (with its
three bookkeeping classes allow-listed), everything else is safetensors and JSON.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from kd_core.config import StorageConfig
from kd_core.storage import Store

COMPLETE_MARKER = "COMPLETE"
_STEP_FOLDER = re.compile(r"step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (another world size, missing files)."""


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------- rank state
def save_rank_state(folder: Path, rank: int, world_size: int, step: int) -> None:
    """This rank's RNG states (CPU, and the current GPU's) with the step it belongs to."""
    from safetensors.torch import save_file

    tensors = {"cpu_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    metadata = {"step": str(step), "world_size": str(world_size), "rank": str(rank)}
    save_file(tensors, str(folder / f"rank-{rank}.safetensors"), metadata=metadata)


def load_rank_state(folder: Path, rank: int, world_size: int) -> int:
    """Restore this rank's RNG states; returns the checkpoint's step. A checkpoint written by
    another number of ranks is refused (its optimizer partitions and data split do not fit)."""
    from safetensors import safe_open

    path = folder / f"rank-{rank}.safetensors"
    written_by = _world_size_of(folder)
    if written_by != world_size:
        raise CheckpointError(
            f"{folder}: the checkpoint was written by {written_by} workers and this run has {world_size}; "
            f"resume with compute.num_workers={written_by}, or set distill.resume=never to start over"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: missing from the checkpoint; set distill.resume=never to start over")
    with safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["step"])
        torch.set_rng_state(handle.get_tensor("cpu_rng"))
        if "cuda_rng" in handle.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(handle.get_tensor("cuda_rng"))
    return step


def _world_size_of(folder: Path) -> int:
    from safetensors import safe_open

    first = folder / "rank-0.safetensors"
    if not first.exists():
        raise CheckpointError(f"{folder}: not a kdflow checkpoint (no rank-0.safetensors); set distill.resume=never to start over")
    with safe_open(str(first), framework="pt") as handle:
        return int(handle.metadata()["world_size"])


def save_stream_positions(folder: Path, rank: int, positions: dict) -> None:
    """This rank's data-stream positions (`TrackedBatches.state()`), as JSON."""
    (folder / f"stream-{rank}.json").write_text(json.dumps(positions))


def load_stream_positions(folder: Path, rank: int) -> dict | None:
    """This rank's data-stream positions, or None for a checkpoint written before kdflow saved
    them (the run then replays its stream to the step)."""
    path = folder / f"stream-{rank}.json"
    if not path.exists():
        return None
    try:
        positions = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); set distill.resume=never to start over") from None
    if not isinstance(positions, dict) or not {"workers", "batches", "positions"} <= positions.keys():
        raise CheckpointError(
            f"{path}: not kdflow data-stream positions (no workers, batches or positions); set distill.resume=never to start over"
        )
    return positions


def save_source_state(folder: Path, rank: int, state: tuple[dict, dict] | None) -> None:
    """What this rank's target source keeps (`TargetSource.state`: tensors as safetensors, the rest
    as JSON); nothing when it keeps nothing."""
    if state is None:
        return
    from safetensors.torch import save_file

    tensors, meta = state
    save_file(tensors, str(folder / f"source-{rank}.safetensors"), metadata={"meta": json.dumps(meta)})


def load_source_state(folder: Path, rank: int) -> tuple[dict, dict] | None:
    """This rank's target-source state, or None when the checkpoint holds none."""
    from safetensors import safe_open

    path = folder / f"source-{rank}.safetensors"
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["meta"])
            return {name: handle.get_tensor(name) for name in handle.keys()}, meta
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable target-source state ({type(err).__name__}: {err}); set distill.resume=never to start over") from None


# ------------------------------------------------------------------------- safe DeepSpeed loads
def _deepspeed_checkpoint_globals() -> list:
    """The non-tensor classes DeepSpeed writes into its optimizer files (plain records)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


@functools.cache
def weights_only_checkpoint_engine_class():
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True` (its own loads
    unpickle arbitrary objects)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine


# ------------------------------------------------------------------------------------- sinks
class CheckpointSink:
    """Where a run's checkpoints go and where the latest comes back from."""

    def latest(self) -> contextlib.AbstractContextManager[Path | None]:
        raise NotImplementedError

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        """Call `write(folder)` to fill this rank's part of the step's checkpoint, then publish it."""
        raise NotImplementedError


class RayTrainCheckpoints(CheckpointSink):
    """Checkpoints reported to Ray Train, which stores them on the run's storage."""

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        import ray.train

        with _scratch_dir() as folder:
            write(folder)
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=step_folder_name(step))


class StoreCheckpoints(CheckpointSink):
    """Checkpoints written straight to `<folder>/step-<N>/` on the store (no Ray)."""

    def __init__(self, storage: StorageConfig, folder: str, keep: int, rank: int = 0):
        self.store, self.folder, self.keep, self.rank = Store(storage), folder, keep, rank

    def complete_steps(self) -> list[int]:
        if not self.store.exists(self.folder):
            return []
        steps = []
        for path in self.store.fs.ls(self.store.path(self.folder), detail=False):
            match = _STEP_FOLDER.search(path.rstrip("/"))
            if match and self.store.exists(f"{self.folder}/{match.group(0)}/{COMPLETE_MARKER}"):
                steps.append(int(match.group(1)))
        return sorted(steps)

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        steps = self.complete_steps()
        if not steps:
            yield None
            return
        with _scratch_dir() as scratch:
            yield self.store.download_dir(f"{self.folder}/{step_folder_name(steps[-1])}", scratch / "checkpoint")

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        target = f"{self.folder}/{step_folder_name(step)}"
        with _scratch_dir() as folder:
            write(folder)
            self.store.upload_dir(folder, target)
        _barrier()  # every rank's part is in place before the folder is marked complete
        if self.rank == 0:
            self.store.write_bytes(f"{target}/{COMPLETE_MARKER}", json.dumps(metrics).encode())
            for old in self.complete_steps()[: -self.keep]:
                self.store.delete(f"{self.folder}/{step_folder_name(old)}")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    from kd_core.models import temporary_dir

    with temporary_dir("checkpoint-") as folder:
        yield Path(folder)
