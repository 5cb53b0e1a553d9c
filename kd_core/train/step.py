"""One optimizer step of the training loop, with or without DeepSpeed.

The trained module is the task's step (`Task.make_step`: the model plus its objective, whose
feature projections, if any, train with it; it holds the model as `.model`). `forward(batch,
targets)` returns the loss terms, so DDP and DeepSpeed wrap the whole computation and every
trained parameter is theirs to synchronise; `targets` is what the loop's `TargetSource` gave for
the batch (`kd_core/train/targets.py`), or None.

- `PlainRunner` steps a (DDP-wrapped or bare) step module with a torch optimizer.
- `DeepSpeedRunner` steps a DeepSpeed engine built around it (`kd_core/train/deepspeed_engine.py`).

Both take the micro-batches of one optimizer step, each a (batch, targets) pair, and return the logged floats: each loss term
averaged over the micro-batches, the learning rate, the gradient norm (before clipping) and
`nonfinite`: 1.0 when a micro-batch's loss or the gradient norm was NaN or infinite on any rank, in
which case the update was skipped (weights, optimizer state and schedule unchanged; every rank
agrees, so the loop's abort policy acts on all ranks at once). Both
save their model, optimizer and schedule into a checkpoint folder (`save_state`, every rank) and
restore them from one (`load_state`); see `kd_core/train/checkpoints.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kd_core.losses import TeacherTargets

MicroBatch = tuple[dict[str, torch.Tensor], TeacherTargets | None]
"""A batch and its teacher targets (None: the model learns from the data alone)."""


def all_ranks_finite(values: list[torch.Tensor]) -> bool:
    """Whether every value is finite on every data-parallel rank (one all-reduce of a flag when
    there is more than one rank, so that all ranks skip or abort together)."""
    finite = torch.stack([value.detach().float().reshape(()) for value in values]).isfinite().all()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flag = finite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag.bool()
    return bool(finite)


def unwrap(module: nn.Module) -> nn.Module:
    """The step module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class PlainRunner:
    """AdamW + schedule on a bare or DDP-wrapped step module; one micro-batch per step."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, schedule, grad_clip: float | None):
        self.module, self.optimizer, self.schedule, self.grad_clip = module, optimizer, schedule, grad_clip

    def step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        ((batch, targets),) = micro_batches
        terms = self.module(batch, targets)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip if self.grad_clip else float("inf"))
        finite = all_ranks_finite([terms["loss"].detach(), grad_norm])
        if finite:  # a non-finite step leaves everything as it was
            self.optimizer.step()
            self.schedule.step()
        logged = {name: float(value.detach()) for name, value in terms.items()}
        return {**logged, "grad_norm": float(grad_norm), "lr": self.schedule.get_last_lr()[0], "nonfinite": float(not finite)}

    def student(self) -> nn.Module:
        return unwrap(self.module).model

    def save_state(self, folder: Path, rank: int) -> None:
        """Rank 0 writes the weights (safetensors), optimizer (tensors and numbers) and schedule
        (JSON); the other ranks hold the same replicas."""
        from safetensors.torch import save_model

        if rank != 0:
            return
        save_model(unwrap(self.module), str(folder / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        (folder / "schedule.json").write_text(json.dumps(self.schedule.state_dict()))

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_model

        module = unwrap(self.module)
        device = next(module.parameters()).device
        load_model(module, str(folder / "model.safetensors"), device=str(device))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
        self.schedule.load_state_dict(json.loads((folder / "schedule.json").read_text()))
