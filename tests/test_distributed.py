"""The student's DeepSpeed engine: same updates as plain torch, accumulation, the online teacher,
and 2 ranks at ZeRO-3 (processes on a gloo group) holding half of the student and the teacher each.
(2 Ray workers at ZeRO-2 against 1 worker: tests/test_checkpoints.py, through a killed worker.)

Run: .venv/bin/python -m pytest tests/test_distributed.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_core.stages.cache import cache
from kd_core.job import load_config
from kd_core.stages.prep import prep
from kd_core.storage import Store
from kd_core.stages.distill import distill
from kd_core.stages.teacher import teacher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    config = load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={folder}", "compute.backend=local", "distill.train.log_every=1"])
    store = Store(config.storage)
    prepared = prep(config.data, store)
    taught = teacher(config.teacher, prepared, store, config.compute)
    return config, store, prepared, cache(config.cache, prepared, taught, store, config.compute)


def run_distill(job, compute=None, train=None, **deepspeed):
    config, store, prepared, cached = job
    section = config.distill.model_copy(update={"deepspeed": config.distill.deepspeed.model_copy(update=deepspeed)})
    if train:
        section = section.model_copy(update={"train": section.train.model_copy(update=train)})
    manifest = distill(section, config.student, prepared, cached, store, compute or config.compute)
    history = [json.loads(line) for line in store.read_bytes(f"{manifest.folder}/history.jsonl").decode().splitlines()]
    return manifest, history


def losses(history):
    return [record["loss"] for record in history]


@pytest.mark.slow
def test_deepspeed_zero_stages_follow_the_plain_torch_updates(job):
    _, plain = run_distill(job, enabled=False)
    for stage in (0, 2):
        manifest, history = run_distill(job, zero_stage=stage)
        assert losses(history) == pytest.approx(losses(plain), rel=1e-4), stage
        assert [r["grad_norm"] for r in history] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-3)
        assert [r["lr"] for r in history] == pytest.approx([r["lr"] for r in plain])
        saved = json.loads(job[1].read_bytes(f"{manifest.folder}/deepspeed_config.json"))
        assert saved["zero_optimization"]["stage"] == stage and saved["train_batch_size"] == job[0].distill.train.batch_size
        assert "model/model.safetensors" in manifest.outputs


def test_gradient_accumulation_gives_the_same_updates_as_the_whole_batch(job):
    _, whole = run_distill(job)
    manifest, accumulated = run_distill(job, gradient_accumulation_steps=2)
    saved = json.loads(job[1].read_bytes(f"{manifest.folder}/deepspeed_config.json"))
    assert (saved["train_micro_batch_size_per_gpu"], saved["gradient_accumulation_steps"]) == (4, 2)
    assert losses(accumulated) == pytest.approx(losses(whole), rel=1e-4)


def test_online_teacher_and_a_full_logit_cache_give_the_same_losses(job):
    config, store, prepared, _ = job
    from kd_core.stages.teacher import teacher as teacher_step

    taught = teacher_step(config.teacher, prepared, store, config.compute)
    full = cache(config.cache.model_copy(update={"format": "full"}), prepared, taught, store, config.compute)
    section = config.distill.model_copy(update={"loss": config.distill.loss.model_copy(update={"divergence": "generalized_jsd"})})
    histories = {}
    for name, targets, source in (("cache", full, "cache"), ("online", taught, "online")):
        manifest = distill(section.model_copy(update={"teacher_source": source}), config.student, prepared, targets, store, config.compute)
        histories[name] = [json.loads(line) for line in store.read_bytes(f"{manifest.folder}/history.jsonl").decode().splitlines()]
    # The cache holds float16 log-probs: the same targets to about 1e-3 relative, so the same training.
    assert losses(histories["cache"]) == pytest.approx(losses(histories["online"]), rel=2e-3)
    assert [r["kd"] for r in histories["cache"]] == pytest.approx([r["kd"] for r in histories["online"]], rel=2e-2)


def test_the_online_teacher_runs_frozen_and_partitioned_beside_a_zero3_student(job):
    import torch

    from kd_core.config import DeepSpeedConfig
    from kd_core.models import load_causal_lm
    from kd_core.train.deepspeed_engine import TeacherEngine, deepspeed_config
    from kd_core.models.teacher import teacher_model_dir

    config, store, prepared, _ = job
    taught = teacher(config.teacher, prepared, store, config.compute)
    model_dir = teacher_model_dir(store, taught)
    student_json = deepspeed_config(DeepSpeedConfig(zero_stage=3), config.distill.train, world_size=1)
    engine = TeacherEngine(model_dir, student_json)
    parameters = list(engine.model.parameters())
    # Partitioned: outside a gather no parameter holds its full data, only its rank's partition
    # (the whole of it here, with one rank); frozen: no gradients, before or after a forward.
    assert all(p.numel() == 0 and p.ds_tensor.numel() >= p.ds_numel for p in parameters)
    input_ids = torch.randint(0, config.data.vocab_size, (2, 16))
    expected = load_causal_lm(model_dir)(input_ids=input_ids).logits
    assert torch.allclose(engine(input_ids=input_ids).logits, expected, atol=1e-5)
    assert not any(p.requires_grad or p.grad is not None for p in parameters)

    online = config.distill.model_copy(update={"teacher_source": "online"})
    histories = {}
    for stage in (2, 3):
        section = online.model_copy(update={"deepspeed": online.deepspeed.model_copy(update={"zero_stage": stage})})
        manifest = distill(section, config.student, prepared, taught, store, config.compute)
        histories[stage] = [json.loads(line) for line in store.read_bytes(f"{manifest.folder}/history.jsonl").decode().splitlines()]
    assert losses(histories[3]) == pytest.approx(losses(histories[2]), rel=1e-4)


def random_teacher_folder(prepared, store, folder: Path, hidden_size: int) -> Path:
    """A random one-layer Llama teacher in a Hugging Face folder, with the prepared tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=prepared.details["vocab_size"], hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=prepared.details["seq_len"])
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = store.local_path(f"{prepared.folder}/tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer / name).read_bytes())
    return folder


def train_rank(rank: int, world_size: int, port: int, spec, results) -> None:
    """One data-parallel rank, as a Ray Train worker runs it: a gloo group on loopback, then the loop."""
    import os

    import torch

    from kd_core.train.loop import train_worker

    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    result = train_worker(spec, rank, world_size)
    results.put((rank, {name: value for name, value in result.items() if name != "files"}))
    torch.distributed.destroy_process_group()


def train_ranks(spec, world_size: int) -> dict:
    """Rank 0's result of training `spec` on `world_size` processes."""
    import multiprocessing
    import queue
    import time

    from kd_core.devtools import free_port

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=train_rank, args=(rank, world_size, port, spec, results)) for rank in range(world_size)]
    for process in ranks:
        process.start()
    returned: dict[int, dict] = {}
    deadline = time.monotonic() + 300
    try:
        while len(returned) < world_size:
            assert time.monotonic() < deadline, "the ranks did not finish within 5 minutes"
            try:
                rank, result = results.get(timeout=1)
                returned[rank] = result
            except queue.Empty:  # a rank that died leaves the others waiting in a collective: stop them
                failed = [process.exitcode for process in ranks if process.exitcode not in (None, 0)]
                assert not failed, f"a rank exited with {failed[0]}; its traceback is above"
    finally:
        for process in ranks:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return returned[0]


@pytest.mark.slow
def test_two_zero3_ranks_each_hold_half_of_the_online_teacher_and_the_student(job, tmp_path):
    """ZeRO-3 at 2 ranks (gloo on CPU) with the online teacher in its optimizer-free engine: each
    rank holds half of both models' parameters, and training is the 1-rank training."""
    from kd_core.config import ArchitectureConfig, DeepSpeedConfig
    from kd_core.models import count_parameters, load_causal_lm
    from kd_core.tasks import task_of
    from kd_core.train.spec import TrainSpec
    from kd_core.train.loop import train_worker

    config, store, prepared, _ = job
    # Models wide enough (H = 384) that every weight matrix exceeds DeepSpeed's persistence
    # threshold (100,000 elements): only the norms stay whole on every rank.
    teacher_dir = random_teacher_folder(prepared, store, tmp_path / "teacher", hidden_size=384)
    taught = teacher(config.teacher.model_copy(update={"path": str(teacher_dir)}), prepared, store, config.compute)
    student = ArchitectureConfig(hidden_size=384, num_layers=1, num_heads=2)
    train = config.distill.train.model_copy(update={"max_steps": 3, "log_every": 1, "data_split": "rows"})
    runs = {}
    for world_size in (1, 2):
        spec = TrainSpec.from_prep(prepared, store, f"zero3-{world_size}-ranks", student, train, task=task_of(prepared),
                                   objective=config.distill.loss, deepspeed=DeepSpeedConfig(zero_stage=3), online_teacher=taught)
        result = train_worker(spec) if world_size == 1 else train_ranks(spec, world_size)  # one rank: in this process
        history = [json.loads(line) for line in store.read_bytes(f"{spec.output_folder}/history.jsonl").decode().splitlines()]
        runs[world_size] = result, history
    (one, one_history), (two, two_history) = runs[1], runs[2]
    totals = {"student": one["parameters"], "teacher": count_parameters(load_causal_lm(teacher_dir))}
    for model, total in totals.items():
        # One rank holds everything (and a second copy of the norms, its gathered persistent ones);
        # each of two ranks half, give or take the norms and the partitions' padding.
        assert total <= one["parameters_per_rank"][model][0] <= 1.01 * total, model
        assert two["parameters_per_rank"][model] == pytest.approx([total / 2, total / 2], rel=0.01), model
    # Same global batches of 8 rows (4 per rank); float32 sums in another order: 1e-4 relative.
    assert losses(two_history) == pytest.approx(losses(one_history), rel=1e-4)
    assert [r["grad_norm"] for r in two_history] == pytest.approx([r["grad_norm"] for r in one_history], rel=1e-3)
