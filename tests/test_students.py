"""Students that do not start from random weights (`student.init`, `task: causal_lm`).

- `pretrained`: a Llama student and a Qwen2 student whose output layer is padded past the
  tokenizer distil end to end from a teacher saved with the same tokenizer; the student's and the
  baseline's first weights are the folder's; a changed folder changes the distill and baseline
  keys; the checks before training (no path, pickled weights only, another vocabulary, a short
  context) are named errors.
- `from_teacher`: the evenly spaced default blocks; a cut keeping every block at full width gives
  the teacher's logits exactly and the kept blocks are the teacher's; width pruning keeps the
  most important channels and round-trips through save_pretrained / from_pretrained; the range
  and layout checks are named errors; the distilled student and the baseline start from the same
  cut, and the manifests and the registry record where they started.

The models are tiny and saved with transformers (tests/hf_models.py); every job runs in this
process (compute.backend=local). Run: .venv/bin/python -m pytest tests/test_students.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_models import paragraphs, save_model, style_tokenizer
from kd_core.config import ConfigError, FromTeacherConfig
from kd_core.devtools import migrated_sqlite_uri
from kd_core.job import load_config
from kd_core.models.students import StudentError, cut_from_teacher
from kd_core.storage import Store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    return style_tokenizer("llama", paragraphs(200, 7), vocab_size=300)


@pytest.fixture
def teacher_folder(tmp_path, tokenizer):
    return save_model(tmp_path / "teacher", "llama", tokenizer, hidden_size=32, layers=4, heads=2)


def job(tmp_path, teacher, *overrides, steps: int = 6):
    data = tmp_path / "own.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in paragraphs(60, 3)))
    return load_config(
        os.path.join(REPO, "configs", "tiny.yaml"),
        [
            f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}",
            "compute.backend=local", "data.source=files", f"data.files=[{data}]", f"teacher.path={teacher}",
            "data.max_documents=null", f"distill.train.max_steps={steps}", "eval.max_rows=8", *overrides,
        ],
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def starting_models(config, steps):
    """The distilled student's and the baseline's models as their workers build them."""
    from kd_core.tasks import task_of
    from kd_core.train.spec import student_spec, student_start

    store, prep = Store(config.storage), steps["prep"]
    start = student_start(config.student, prep, store, steps["teacher"])
    task = task_of(prep)
    built = []
    for targets in (steps.get("cache") or steps["teacher"], None):
        spec = student_spec(task, config.distill, config.student, prep, store, "unused", targets=targets, start=start)
        built.append(task.build_model(spec))
    return built


# ------------------------------------------------------------------------------------------ pretrained
@pytest.mark.slow
def test_a_pretrained_llama_student_starts_from_its_folder_distils_and_registration_records_it(tmp_path, tokenizer, teacher_folder):
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from kd_core.pipeline import run_pipeline

    student_folder = save_model(tmp_path / "student", "llama", tokenizer, hidden_size=16, layers=1, seed=3)
    config = job(tmp_path, teacher_folder, "student.init=pretrained", f"student.path={student_folder}")
    steps = run_pipeline(config)

    folder_weights = weights(AutoModelForCausalLM.from_pretrained(student_folder))
    student, baseline = starting_models(config, steps)
    assert same_weights(weights(student), folder_weights) and same_weights(weights(baseline), folder_weights)
    trained = weights(AutoModelForCausalLM.from_pretrained(Store(config.storage).local_path(steps["distill"].details["model_folder"])))
    assert not same_weights(trained, folder_weights)  # it trained from there

    recorded = steps["distill"].details["student_start"]
    assert recorded["init"] == "pretrained" and recorded["path"] == str(student_folder) and len(recorded["weights_identity"]) == 64
    assert steps["baseline"].details["student_start"] == recorded
    assert steps["eval"].metrics["student"]["perplexity"] > 1

    mlflow.set_tracking_uri(config.registry.tracking_uri)
    client = MlflowClient()
    params = client.get_run(steps["register"].details["run_id"]).data.params
    assert params["student.start.init"] == "pretrained" and params["student.start.weights_identity"] == recorded["weights_identity"]
    version = client.get_model_version(config.registry.model_name, str(steps["register"].details["version"]))
    assert json.loads(version.tags["kdflow.student_start"]) == recorded


@pytest.mark.slow
def test_a_qwen2_student_with_a_padded_output_layer_distils_from_an_online_teacher(tmp_path, tokenizer, teacher_folder):
    from transformers import AutoModelForCausalLM

    from kd_core.pipeline import run_pipeline

    student_folder = save_model(tmp_path / "student", "qwen2", tokenizer, hidden_size=16, layers=1, padded=13)
    config = job(tmp_path, teacher_folder, "student.init=pretrained", f"student.path={student_folder}", "distill.teacher_source=online")
    steps = run_pipeline(config, until="eval")
    saved = AutoModelForCausalLM.from_pretrained(Store(config.storage).local_path(steps["distill"].details["model_folder"]))
    assert type(saved).__name__ == "Qwen2ForCausalLM" and saved.config.vocab_size == len(tokenizer) + 13
    history = [json.loads(line) for line in Store(config.storage).read_bytes(f"{steps['distill'].folder}/history.jsonl").splitlines()]
    assert all(torch.isfinite(torch.tensor(record["kd"])) for record in history if "kd" in record) and "kd" in history[-1]
    student = steps["eval"].metrics["student"]
    assert torch.isfinite(torch.tensor([student["perplexity"], student["kl_to_teacher"]])).all()


def test_the_distill_and_baseline_keys_change_when_the_pretrained_folders_weights_change(tmp_path, tokenizer, teacher_folder):
    from kd_core.pipeline import run_pipeline

    student_folder = save_model(tmp_path / "student", "llama", tokenizer, hidden_size=16, layers=1, seed=3)
    config = job(tmp_path, teacher_folder, "student.init=pretrained", f"student.path={student_folder}", steps=2)
    first = run_pipeline(config, until="distill")
    assert run_pipeline(config, until="distill")["distill"].reused
    save_model(student_folder, "llama", tokenizer, hidden_size=16, layers=1, seed=4)  # same config, new weights
    second = run_pipeline(config, until="distill")
    assert second["cache"].reused and not second["distill"].reused
    assert second["distill"].key != first["distill"].key and second["baseline"].key != first["baseline"].key


def test_init_pretrained_needs_a_path_and_a_path_needs_init_pretrained(tmp_path, teacher_folder):
    with pytest.raises(ConfigError, match=r"student.path: student.init is pretrained: set it to the URL"):
        job(tmp_path, teacher_folder, "student.init=pretrained")
    with pytest.raises(ConfigError, match=r"student.path: it is read only with student.init: pretrained"):
        job(tmp_path, teacher_folder, f"student.path={teacher_folder}")


def test_pretrained_folders_that_cannot_start_this_student_are_named_errors_before_the_teacher_step(tmp_path, tokenizer, teacher_folder):
    from safetensors.torch import load_file

    from kd_core.pipeline import run_pipeline

    pickled = save_model(tmp_path / "pickled", "llama", tokenizer, hidden_size=16, layers=1)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")  # as older transformers saved it
    (pickled / "model.safetensors").unlink()
    other = save_model(tmp_path / "other", "llama", style_tokenizer("gpt2", paragraphs(200, 8), vocab_size=300), hidden_size=16, layers=1)
    short = save_model(tmp_path / "short", "llama", tokenizer, hidden_size=16, layers=1, context=16)
    cases = {
        pickled: r"student.path: .*pickled holds no .safetensors weights \(it has pytorch_model.bin: pickled weights, which kdflow never loads\)",
        other: r"student.path: .*other uses a different vocabulary .* a student must read the data's token ids",
        short: r"data.seq_len: 32 tokens per row, but the student \(student.path\) at .*short reads at most 16 .*; set data.seq_len <= 16",
    }
    for folder, message in cases.items():
        with pytest.raises(StudentError, match=message):
            run_pipeline(job(tmp_path, teacher_folder, "student.init=pretrained", f"student.path={folder}"), until="cache")
    assert not any(path.name == "teacher" for path in (tmp_path / "store").iterdir())  # no teacher step ran


# ---------------------------------------------------------------------------------------- from_teacher
@pytest.mark.parametrize("teacher_layers, count, kept", [(4, 2, [0, 3]), (5, 3, [0, 2, 4]), (4, None, [0, 3]), (6, None, [0, 3, 5]), (3, 1, [0])])
def test_the_default_blocks_are_evenly_spaced_from_the_first_to_the_last(teacher_layers, count, kept):
    assert FromTeacherConfig(num_layers=count).kept_layers(teacher_layers) == kept


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_a_cut_of_every_block_is_the_teacher_and_kept_blocks_are_the_teachers(tmp_path, tokenizer, family):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(save_model(tmp_path / family, family, tokenizer, layers=4)).eval()
    ids = torch.randint(0, len(tokenizer), (2, 12))
    whole = cut_from_teacher(teacher, [0, 1, 2, 3]).eval()
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, teacher(ids).logits)
    cut = cut_from_teacher(teacher, [0, 3])
    blocks = "transformer.h" if family == "gpt2" else "model.layers"
    teacher_weights, cut_weights = weights(teacher), weights(cut)
    assert type(cut) is type(teacher) and cut.config.num_hidden_layers == 2
    for name, tensor in cut_weights.items():
        source = name.replace(f"{blocks}.1.", f"{blocks}.3.")
        assert torch.equal(tensor, teacher_weights[source]), name
    assert not any(f"{blocks}.2." in name for name in cut_weights)


def test_a_cut_of_a_tied_kdflow_teacher_keeps_its_embedding_tied():
    from kd_core.config import ArchitectureConfig
    from kd_core.models import build_causal_lm

    teacher = build_causal_lm(ArchitectureConfig(hidden_size=32, num_layers=4, num_heads=2), 300, 32, seed=0).eval()
    cut = cut_from_teacher(teacher, [0, 3], hidden_size=24)
    assert cut.config.tie_word_embeddings and cut.lm_head.weight.data_ptr() == cut.model.embed_tokens.weight.data_ptr()
    assert cut(torch.randint(0, 300, (1, 8))).logits.shape == (1, 8, 300)


def test_width_pruning_keeps_the_most_important_channels_and_the_saved_model_round_trips(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(save_model(tmp_path / "teacher", "llama", tokenizer, hidden_size=32, layers=2)).eval()
    important, mlp_important = [1, 4, 9, 17, 20, 30], [[0, 5, 33, 60], [2, 3, 40, 63]]
    with torch.no_grad():  # make those channels the loudest: every weight that reads or writes them, ×10
        teacher.model.embed_tokens.weight[:, important] *= 10
        teacher.lm_head.weight[:, important] *= 10
        for index, block in enumerate(teacher.model.layers):
            for projection in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj):
                projection.weight[:, important] *= 10
            for projection in (block.self_attn.o_proj, block.mlp.down_proj):
                projection.weight[important] *= 10
            block.mlp.gate_proj.weight[mlp_important[index]] *= 10
            block.mlp.up_proj.weight[mlp_important[index]] *= 10
            block.mlp.down_proj.weight[:, mlp_important[index]] *= 10
    cut = cut_from_teacher(teacher, [0, 1], hidden_size=6, intermediate_size=4)
    assert (cut.config.hidden_size, cut.config.intermediate_size, cut.config.head_dim) == (6, 4, 16)
    assert torch.equal(cut.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, important])
    for index, (kept, source) in enumerate(zip(cut.model.layers, teacher.model.layers)):
        assert torch.equal(kept.self_attn.q_proj.weight, source.self_attn.q_proj.weight[:, important])  # heads whole: 32 rows
        assert torch.equal(kept.self_attn.o_proj.weight, source.self_attn.o_proj.weight[important])
        assert torch.equal(kept.mlp.gate_proj.weight, source.mlp.gate_proj.weight[mlp_important[index]][:, important])
        assert torch.equal(kept.mlp.down_proj.weight, source.mlp.down_proj.weight[important][:, mlp_important[index]])
        assert torch.equal(kept.input_layernorm.weight, source.input_layernorm.weight[important])
    cut.save_pretrained(tmp_path / "cut")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all() and torch.equal(logits, cut.eval()(ids).logits)


@pytest.mark.slow
def test_a_student_cut_from_the_teacher_and_its_baseline_start_from_the_same_cut_and_record_it(tmp_path, tokenizer, teacher_folder):
    from transformers import AutoModelForCausalLM

    from kd_core.pipeline import run_pipeline

    config = job(tmp_path, teacher_folder, "student.init=from_teacher", "student.from_teacher.hidden_size=16",
                 "student.from_teacher.intermediate_size=32", steps=2)
    steps = run_pipeline(config, until="eval")
    assert steps["eval"].metrics["student"]["parameters"] < steps["eval"].metrics["teacher"]["parameters"]
    student, baseline = starting_models(config, steps)
    expected = cut_from_teacher(AutoModelForCausalLM.from_pretrained(teacher_folder), [0, 3], 16, 32)
    assert same_weights(weights(student), weights(expected)) and same_weights(weights(baseline), weights(expected))
    recorded = {"init": "from_teacher", "teacher_key": steps["teacher"].key, "layers": [0, 3], "hidden_size": 16, "intermediate_size": 32}
    assert steps["distill"].details["student_start"] == recorded and steps["baseline"].details["student_start"] == recorded
    assert steps["baseline"].inputs["teacher"] == steps["teacher"].key  # the baseline reads the teacher step: its key covers it
    saved = AutoModelForCausalLM.from_pretrained(Store(config.storage).local_path(steps["distill"].details["model_folder"]))
    assert (saved.config.num_hidden_layers, saved.config.hidden_size, saved.config.head_dim) == (2, 16, 16)


def test_cuts_that_do_not_fit_the_teacher_are_named_errors(tmp_path, tokenizer, teacher_folder):
    from kd_core.pipeline import run_pipeline

    with pytest.raises(StudentError, match=r"student.from_teacher.layers: \[7\] are not blocks of the teacher, which has 4 \(0..3\)"):
        run_pipeline(job(tmp_path, teacher_folder, "student.init=from_teacher", "student.from_teacher.layers=[0,7]"), until="cache")
    gpt2 = save_model(tmp_path / "gpt2", "gpt2", tokenizer, layers=2)
    with pytest.raises(StudentError, match=r"student.from_teacher.hidden_size: width pruning works on the Llama layout .* the teacher is 'gpt2'"):
        run_pipeline(job(tmp_path, gpt2, "student.init=from_teacher", "student.from_teacher.hidden_size=16"), until="cache")
    from transformers import AutoModelForCausalLM

    with pytest.raises(StudentError, match=r"student.from_teacher.hidden_size: width pruning"):
        cut_from_teacher(AutoModelForCausalLM.from_pretrained(gpt2), [0], hidden_size=16)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["student.init=from_teacher", "student.from_teacher.hidden_size=64"], r"student.from_teacher.hidden_size: 64 is wider than the teacher's 32"),
        (["student.init=from_teacher", "student.from_teacher.layers=[0,9]"], r"student.from_teacher.layers: \[9\] are not blocks of the teacher, which has 1"),
        (["student.init=from_teacher", "student.from_teacher.layers=[1,0]"], r"student.from_teacher.layers: must be block indices >= 0 in increasing order"),
        (["student.init=from_teacher", "tune.space.student.architecture.hidden_size={kind: choice, values: [16, 32]}"],
         r"tune.space.student.architecture.hidden_size: the student starts from the teacher"),
        (["task=reward", "data.source=digit-preferences", "student.init=from_teacher"], r"student.init: a reward student .* set it to config"),
    ],
)
def test_cuts_of_a_teacher_kdflow_trains_are_checked_when_the_job_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(REPO, "configs", "tiny.yaml"), overrides)


def test_a_pretrained_student_on_s3_is_downloaded_once_and_must_stay_the_folder_recorded(tmp_path, tokenizer, s3_endpoint, s3_bucket, monkeypatch):
    import s3fs
    from transformers import AutoModelForCausalLM

    import kd_core.models.students as students
    from kd_core.config import StorageConfig

    monkeypatch.setattr(students, "CACHE_ROOT", tmp_path / "cache")
    folder = save_model(tmp_path / "student", "llama", tokenizer, hidden_size=16, layers=1)
    s3 = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    s3.put(f"{folder}/", f"{s3_bucket}/student/", recursive=True)
    url, store = f"s3://{s3_bucket}/student", Store(StorageConfig(root=str(tmp_path / "store"), s3={"endpoint_url": s3_endpoint}))
    _, identity = students.pretrained_identity(url, store)
    local = students.pretrained_model_dir(url, identity, store)
    assert local.parent == tmp_path / "cache" / "students" and students.pretrained_model_dir(url, identity, store) == local
    model = students.load_pretrained_student(local)
    assert same_weights(weights(model), weights(AutoModelForCausalLM.from_pretrained(folder)))
    s3.pipe(f"{s3_bucket}/student/config.json", (folder / "config.json").read_bytes().replace(b"}", b', "note": 1}', 1))
    with pytest.raises(StudentError, match=r"student.path: s3://.*/student changed after this step recorded it"):
        students.pretrained_model_dir(url, identity, store)
