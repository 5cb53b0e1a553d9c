"""The student's DeepSpeed engine: ZeRO 0–3, fp32 or bf16, gradient accumulation and clipping.

`deepspeed_config(settings, train, world_size)` writes the DeepSpeed JSON from
`distill.deepspeed` and the train section; it is saved beside the model (`deepspeed_config.json`).
The optimizer and schedule are kdflow's own (AdamW without decay on norms and biases, linear warmup
then cosine; `make_optimizer`), handed to DeepSpeed, so a DeepSpeed run and a plain run follow the
same update rule. `DeepSpeedRunner` steps the engine over the micro-batches of one optimizer step:
DeepSpeed scales each micro-batch's loss by 1/accumulation, steps the optimizer and schedule at
the boundary and clips the global gradient norm.

The engine needs a process group: Ray Train workers have one (gloo on CPU, NCCL on GPUs); in a
single process (`compute.backend: local`, the GPU check) a one-rank gloo/NCCL group is started on
loopback.

`TeacherEngine` runs the frozen online teacher in its own optimizer-free engine: with a ZeRO-3
student it is ZeRO-3 too, built partitioned (`deepspeed.zero.Init`) and filled one gathered
parameter at a time from its safetensors, so no rank ever holds a full replica; otherwise each rank
keeps a replica. It runs in eval mode under `no_grad` and its parameters never require gradients.

Checkpoints are DeepSpeed's own (`save_state` on every rank, `load_state`), read back through a
checkpoint engine that loads with `weights_only=True` (`kd_core/train/checkpoints.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from kd_core.config import DeepSpeedConfig, TrainConfig
from kd_core.devtools import free_port
from kd_core.train.checkpoints import CheckpointError, weights_only_checkpoint_engine_class
from kd_core.train.step import MicroBatch, all_ranks_finite

CHECKPOINT_FOLDER, CHECKPOINT_TAG = "deepspeed", "state"


def deepspeed_config(settings: DeepSpeedConfig, train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for this run; the global batch is `train.batch_size` rows."""
    accumulation = settings.gradient_accumulation_steps
    micro_batch = train.batch_size // (world_size * accumulation)
    config = {
        "train_batch_size": micro_batch * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": settings.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.grad_clip:
        config["gradient_clipping"] = train.grad_clip
    if settings.zero_stage == 3:
        config["zero_optimization"] |= {"stage3_gather_16bit_weights_on_model_save": True}
    return config


def ensure_process_group() -> None:
    """A one-rank process group on loopback when none exists (single-process runs)."""
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("LOCAL_RANK", "0")
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def skip_shared_memory_kernels() -> None:
    """Keep DeepSpeed's CPU communication backend from compiling its shared-memory kernels: they
    serve only its inference all-reduce, which training never calls, and the compile takes a
    minute or more of 2 cores in a process that has not built them (again whenever the build's
    environment differs, e.g. between this process and a Ray worker). DeepSpeed keeps its probed
    op table in one dict, so that marking the op incompatible makes `build_shm_op` skip it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def start_deepspeed() -> None:
    """DeepSpeed's distributed state on the process group (started here if there is none), with
    its per-step INFO lines silenced (they would drown the progress bar)."""
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    skip_shared_memory_kernels()
    ensure_process_group()
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


class DeepSpeedRunner:
    def __init__(self, module: nn.Module, optimizer, schedule, config: dict):
        import deepspeed

        start_deepspeed()
        self.config = config
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=config)
        self.engine.checkpoint_engine = weights_only_checkpoint_engine_class()(self.engine._config)
        self.zero_stage = config["zero_optimization"]["stage"]
        self.checks_gradients_itself = hasattr(self.engine.optimizer, "overflow")
        """DeepSpeed's own optimizers (ZeRO, bf16) skip a step with non-finite gradients; a plain
        torch optimizer (ZeRO-0, fp32) is checked here."""

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step over `micro_batches`; a step whose gradients are not finite is
        skipped. DeepSpeed's own optimizers (ZeRO 1–3; bf16, whose `check_grad_overflow` is on
        by default) check the gradients themselves and skip the update and the schedule; with a
        plain torch optimizer (ZeRO-0 in fp32) the check is made here (`_skip_step`)."""
        sums: dict[str, float] = {}
        losses = []
        unclipped_norm = checked_finite = None
        for index, (batch, targets) in enumerate(micro_batches):
            terms = self.engine(batch, targets)
            self.engine.backward(terms["loss"])
            losses.append(terms["loss"].detach())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if index == len(micro_batches) - 1 and self.zero_stage == 0:
                # Without ZeRO, DeepSpeed clips but does not report the norm: take it from the
                # all-reduced gradients before the step.
                grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
                norm = torch.stack(grads).norm() if grads else torch.zeros(())
                unclipped_norm = float(norm)
                if not self.checks_gradients_itself:
                    checked_finite = all_ranks_finite([*losses, norm])
                    if not checked_finite:
                        self._skip_step()
                        continue
            self.engine.step()
        logged = {name: total / len(micro_batches) for name, total in sums.items()}
        grad_norm = unclipped_norm if unclipped_norm is not None else self.engine.get_global_grad_norm()
        logged["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        logged["lr"] = self.engine.get_lr()[0]
        if checked_finite is None:  # DeepSpeed's optimizer judged the gradients: check the losses and its norm
            checked_finite = self.engine.was_step_applied() and all_ranks_finite([*losses, torch.tensor(logged["grad_norm"])])
        logged["nonfinite"] = float(not checked_finite)
        return logged

    def _skip_step(self) -> None:
        """End this step's last micro-batch without an update: the engine is told it is not at a
        gradient-accumulation boundary (so it neither clips, steps the optimizer nor the
        schedule, and its micro-step count stays aligned), then the gradients are dropped."""
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            self.engine.step()
        finally:
            self.engine.set_gradient_accumulation_boundary(None)
        self.engine.zero_grad()

    def save_state(self, folder: Path, rank: int) -> None:
        """DeepSpeed's checkpoint: every rank writes its optimizer partition (and, at ZeRO-3, its
        parameter partition); rank 0 the module states and the schedule."""
        self.engine.save_checkpoint(str(folder / CHECKPOINT_FOLDER), tag=CHECKPOINT_TAG, save_latest=False)

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder / CHECKPOINT_FOLDER), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"{folder / CHECKPOINT_FOLDER}: no DeepSpeed checkpoint to resume from; set distill.resume=never to start over")

    @contextlib.contextmanager
    def gathered_student(self):
        """The full student on every rank (ZeRO-3 gathers its partitions for the duration);
        enter on all ranks, save on one."""
        import deepspeed

        student = self.engine.module.model
        with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None, enabled=self.zero_stage == 3):
            yield student

    def parameters_per_rank(self, teacher: TeacherEngine | None = None) -> dict[str, list[int]]:
        """The student's (and the online teacher's) parameter elements each rank holds
        (`parameters_held`), gathered from every rank: enter on all ranks."""
        models = {"student": self.engine.module.model} | ({"teacher": teacher.model} if teacher is not None else {})
        held = torch.tensor([parameters_held(model) for model in models.values()], dtype=torch.long, device=self.device)
        every_rank = [torch.empty_like(held) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(every_rank, held)
        return {name: [int(rank_held[index]) for rank_held in every_rank] for index, name in enumerate(models)}


class TeacherEngine:
    """The frozen teacher for online distillation, beside the student's `DeepSpeedRunner`."""

    def __init__(self, model_dir: Path, student_config: dict):
        import deepspeed

        start_deepspeed()
        self.zero_stage = 3 if student_config["zero_optimization"]["stage"] == 3 else 0
        bf16 = student_config["bf16"]["enabled"]
        self.config = {
            "train_micro_batch_size_per_gpu": student_config["train_micro_batch_size_per_gpu"],
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
        }
        dtype = torch.bfloat16 if bf16 else torch.float32
        if self.zero_stage == 3:
            import transformers

            try:
                from transformers.initialization import no_init_weights
            except ImportError:  # transformers 4.x
                from transformers.modeling_utils import no_init_weights

            model_config = transformers.AutoConfig.from_pretrained(model_dir)
            model_class = getattr(transformers, model_config.architectures[0])  # imported here, not under zero.Init
            # Built already partitioned, without the random init (the weights are loaded next). The
            # dtype comes from the config's bf16 flag: zero.Init's own `dtype` argument is ignored
            # on accelerators without fp16 (DeepSpeed 0.19.8 then picks bf16 even for float32).
            with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=self.config):
                model = model_class(model_config)
            model.tie_weights()  # skipped with the init; a tied output layer then shares the embedding
            load_partitioned_weights(model, model_dir)
        else:
            from kd_core.models import load_causal_lm

            model = load_causal_lm(model_dir, dtype=dtype)
        model.requires_grad_(False)
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=self.config)
        self.engine.eval()

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    def __call__(self, **inputs):
        with torch.no_grad():
            return self.engine(**inputs)


def parameters_held(model: nn.Module) -> int:
    """Parameter elements this rank holds between forward passes. Under ZeRO-3: its partition of
    each parameter (`ds_tensor`, 1/world size of it, padded) plus the whole of those DeepSpeed keeps
    gathered after their first use (parameters of up to `stage3_param_persistence_threshold`
    elements, 100,000 by default: norms, and every parameter of a tiny model). Otherwise every
    element. Tied parameters count once."""
    unique = {id(parameter): parameter for parameter in model.parameters()}.values()
    return sum(p.ds_tensor.numel() + p.numel() if hasattr(p, "ds_tensor") else p.numel() for p in unique)


def load_partitioned_weights(model: nn.Module, model_dir: Path) -> None:
    """Fill a ZeRO-3-partitioned model from the safetensors in `model_dir`: each parameter is
    gathered, written by rank 0 from the memory-mapped file and re-partitioned, one at a time."""
    import deepspeed
    from safetensors import safe_open

    files = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    rank = torch.distributed.get_rank()
    for name, parameter in model.named_parameters():  # a tied output layer is listed once, as the embedding
        if name not in files:
            raise CheckpointError(f"{model_dir}: no weight {name!r} in its safetensors files; is it the teacher's model directory?")
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if rank == 0:
                with safe_open(str(files[name]), framework="pt") as handle:
                    parameter.data.copy_(handle.get_tensor(name))
