"""Chat data (`data.source: chat`): records rendered through the chat template, the loss mask over
the assistant's tokens, packed rows that keep attention within each conversation, named errors for
bad records, and the student, cache and eval reading it all (kd_core/data/chat.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hf_models import CHATML, LLAMA2_CHAT, paragraphs, save_model, style_tokenizer

from kd_core.config import DataConfig, StorageConfig
from kd_core.data.shards import read_columns, split_shards
from kd_core.data.sources import DataSourceError
from kd_core.devtools import migrated_sqlite_uri
from kd_core.job import load_config
from kd_core.stages.prep import prep
from kd_core.storage import Store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWERS = ["returns a list of tuples", "applies the function to every value", "the model predicts the next token"]
ANSWERS_SEEN = {f"{answer} {index}" for answer in ANSWERS for index in range(100)}


def conversations(count: int, *, turns: int = 1, seed: int = 0) -> list[dict]:
    """Records of `turns` user/assistant exchanges each (a system turn first on every third)."""
    records = []
    for index in range(count):
        messages = [{"role": "system", "content": "answer briefly"}] if index % 3 == 0 else []
        for turn in range(turns):
            messages += [
                {"role": "user", "content": f"what does zip {seed} {index} {turn} do"},
                {"role": "assistant", "content": f"{ANSWERS[(index + turn) % 3]} {index}"},
            ]
        records.append({"messages": messages})
    return records


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A Qwen-style tokenizer with ChatML, and a Llama-style one without <|endoftext|> or a template."""
    folder = tmp_path_factory.mktemp("tokenizers")
    texts = paragraphs(200, 0) + [record["messages"][-1]["content"] for record in conversations(30)]
    qwen, llama = style_tokenizer("qwen", texts), style_tokenizer("llama", texts)
    qwen.save_pretrained(folder / "qwen")
    llama.save_pretrained(folder / "llama")
    return {"qwen": str(folder / "qwen"), "llama": str(folder / "llama")}


def chat_data(files, tokenizer: str, seq_len: int = 96, **chat) -> DataConfig:
    return DataConfig(source="chat", files=files, tokenizer=tokenizer, seq_len=seq_len, val_fraction=0.2, test_fraction=0.2, chat=chat)


def all_rows(store: Store, manifest) -> dict[str, np.ndarray]:
    parts = [read_columns(store, split_shards(manifest, split)) for split in ("train", "val", "test")]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def conversations_in(rows: dict[str, np.ndarray]):
    """(row, start, end) of each conversation: position ids restart at 0 with each (padding too)."""
    for row, positions in enumerate(rows["position_ids"]):
        starts = [*np.flatnonzero(positions == 0), len(positions)]
        for start, end in zip(starts, starts[1:]):
            yield row, start, end


# ------------------------------------------------------------------------------ the loss mask
@pytest.mark.parametrize("style, template", [("qwen", None), ("llama", LLAMA2_CHAT)], ids=["chatml-of-the-tokenizer", "llama2-from-config"])
def test_the_mask_covers_exactly_the_assistant_turns_as_the_template_writes_them(tmp_path, tokenizers, style, template):
    from transformers import AutoTokenizer

    records = conversations(12, turns=2)
    files = [write_jsonl(tmp_path / "chat.jsonl", records)]
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    manifest = prep(chat_data(files, tokenizers[style], 256, template=template, layout="padded"), store)
    tokenizer = AutoTokenizer.from_pretrained(f"{store.config.root}/{manifest.folder}/tokenizer")
    assert tokenizer.chat_template == (template or CHATML)  # a template from config is saved with the tokenizer
    # What each assistant turn renders as, written out by hand for each template.
    end_of_turn = {"qwen": lambda answer: f"{answer}<|im_end|>\n", "llama": lambda answer: f" {answer} </s>"}[style]
    expected = {
        "".join(end_of_turn(turn["content"]) for turn in record["messages"] if turn["role"] == "assistant") for record in records
    }
    rows = all_rows(store, manifest)
    assert manifest.metrics["truncated"] == 0
    trained = {tokenizer.decode(rows["input_ids"][row][rows["loss_mask"][row].astype(bool)]) for row in range(len(rows["input_ids"]))}
    assert trained == expected
    assert manifest.metrics["train_trained_tokens"] == int(read_columns(store, split_shards(manifest, "train"))["loss_mask"].sum())


def test_prompt_completion_records_and_train_on_all(tmp_path, tokenizers):
    records = [{"prompt": f"what is map {i}", "completion": ANSWERS[i % 3], **({"system": "be brief"} if i % 2 else {})} for i in range(10)]
    files = [write_jsonl(tmp_path / "pairs.jsonl", records)]
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    rows = all_rows(store, prep(chat_data(files, tokenizers["qwen"], train_on="all"), store))
    for row, start, end in conversations_in(rows):
        if rows["input_ids"][row, start] == 0 and not rows["loss_mask"][row, start:end].any():
            continue  # padding: <|endoftext|> (id 0) rows' tail, never trained
        # Every token of a conversation but its first (which nothing in it predicts) is trained on.
        assert rows["loss_mask"][row, start] == 0 and rows["loss_mask"][row, start + 1 : end].all()
    assert int(rows["loss_mask"].sum()) == sum(end - start - 1 for row, start, end in conversations_in(rows) if rows["loss_mask"][row, start:end].any())


# ------------------------------------------------------------------------------ packing
def test_packed_rows_hold_several_conversations_with_restarting_positions_and_padded_rows_one(tmp_path, tokenizers):
    files = [write_jsonl(tmp_path / "chat.jsonl", conversations(30))]
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    packed = all_rows(store, prep(chat_data(files, tokenizers["qwen"]), store))
    padded = all_rows(store, prep(chat_data(files, tokenizers["qwen"], layout="padded"), store))
    trained = lambda rows: int(rows["loss_mask"].sum())  # noqa: E731
    assert trained(packed) == trained(padded)  # the same tokens learned, in fewer rows
    assert len(packed["input_ids"]) < len(padded["input_ids"]) == 30
    per_row = [sum(1 for r, s, e in conversations_in(packed) if r == row and packed["loss_mask"][row, s:e].any()) for row in range(len(packed["input_ids"]))]
    assert max(per_row) >= 2
    assert all(sum(1 for r, s, e in conversations_in(padded) if r == row and padded["loss_mask"][row, s:e].any()) == 1 for row in range(30))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_no_token_attends_across_the_conversations_of_a_packed_row(tmp_path, tokenizers, family):
    """A conversation's logits in a packed row equal its logits alone, and do not move when the
    conversation before it changes: the model's attention stays within each conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_core.models import sequence_inputs

    tokenizer = AutoTokenizer.from_pretrained(tokenizers["qwen"])
    model = AutoModelForCausalLM.from_pretrained(save_model(tmp_path / family, family, tokenizer, layers=2)).eval()
    first, second = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 7))

    def packed(before: torch.Tensor) -> torch.Tensor:
        row = {"input_ids": torch.cat([before, second], 1), "position_ids": torch.cat([torch.arange(9), torch.arange(7)])[None]}
        with torch.no_grad():
            return model(**sequence_inputs(row)[0]).logits[0, 9:]

    with torch.no_grad():
        alone = model(input_ids=second).logits[0]
    torch.testing.assert_close(packed(first), alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed(torch.randint(3, 300, (1, 9))), alone, rtol=1e-5, atol=1e-5)
    # Without the restarting positions the second conversation does see the first.
    with torch.no_grad():
        joined = model(input_ids=torch.cat([first, second], 1)).logits[0, 9:]
    assert not torch.allclose(joined, alone, atol=1e-3)


# ------------------------------------------------------------------------------ bad records
@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, r"chat.jsonl:4: turn 1 has role 'bot', which is not one of data.chat.roles"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, r"chat.jsonl:4: turn 1 is an empty assistant turn"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"chat.jsonl:4: the conversation has no 'assistant' turn"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, r"chat.jsonl:4: turn 0 \(user\) holds int, not text"),
        ({"messages": "hi"}, r"chat.jsonl:4: 'messages' \(data.chat.messages_field\) must be a non-empty list of turns"),
        ({"text": "hi"}, r"chat.jsonl:4: expected 'messages' .* or 'prompt' and 'completion'"),
        ({"prompt": "hi", "completion": ""}, r"chat.jsonl:4: field 'completion' \(data.chat.completion_field\) is an empty assistant turn"),
    ],
)
def test_a_bad_record_names_its_file_and_line(tmp_path, tokenizers, record, message):
    files = [write_jsonl(tmp_path / "chat.jsonl", [*conversations(3), record])]
    with pytest.raises(DataSourceError, match=message):
        prep(chat_data(files, tokenizers["qwen"]), Store(StorageConfig(root=str(tmp_path / "store"))))


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tmp_path, tokenizers):
    long_answer = {"messages": [{"role": "user", "content": "what does zip do"}, {"role": "assistant", "content": " ".join(["value"] * 200)}]}
    long_question = {"messages": [{"role": "user", "content": " ".join(["list"] * 200)}, {"role": "assistant", "content": "a list"}]}
    files = [write_jsonl(tmp_path / "chat.jsonl", [*conversations(12), long_answer, long_question])]
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    truncated = prep(chat_data(files, tokenizers["qwen"], overlong="truncate"), store)
    assert (truncated.metrics["truncated"], truncated.metrics["dropped_untrained"], truncated.metrics["dropped_overlong"]) == (2, 1, 0)
    dropped = prep(chat_data(files, tokenizers["qwen"], overlong="drop"), store)
    assert (dropped.metrics["truncated"], dropped.metrics["dropped_overlong"]) == (0, 2)
    assert dropped.metrics["conversations"] == truncated.metrics["conversations"] == 14


def test_a_template_that_rewrites_earlier_turns_or_no_template_is_a_named_error(tmp_path, tokenizers):
    files = [write_jsonl(tmp_path / "chat.jsonl", conversations(6))]
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    with pytest.raises(DataSourceError, match=r"data.tokenizer: .*llama has no chat template .*give one in data.chat.template"):
        prep(chat_data(files, tokenizers["llama"]), store)
    newest_first = "{% for message in messages | reverse %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    with pytest.raises(DataSourceError, match=r"chat.jsonl:\d+: the chat template does not render this conversation as its turns one after another"):
        prep(chat_data(files, tokenizers["qwen"], template=newest_first), store)


def test_parquet_files_and_a_datasets_folder_are_read(tmp_path, tokenizers):
    records = conversations(9)
    pq.write_table(pa.Table.from_pylist(records[:5]), tmp_path / "part.parquet")
    folder = tmp_path / "saved"
    folder.mkdir()
    table = pa.Table.from_pylist(records[5:])
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:  # what datasets.save_to_disk writes
        writer.write_table(table)
    (folder / "state.json").write_text("{}")
    (folder / "dataset_info.json").write_text("{}")
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    manifest = prep(chat_data([str(tmp_path / "part.parquet"), str(folder)], tokenizers["qwen"]), store)
    assert manifest.metrics["conversations"] == 9 and manifest.metrics["files"] == 2


# ------------------------------------------------------------------------------ the trainer, the cache, eval
def chat_job(tmp_path, tokenizer_folder, *overrides):
    """A tiny chat job whose teacher is a Qwen2 model with a padded output layer."""
    from transformers import AutoTokenizer

    teacher = save_model(tmp_path / "teacher", "qwen2", AutoTokenizer.from_pretrained(tokenizer_folder), padded=13, layers=2)
    files = write_jsonl(tmp_path / "chat.jsonl", conversations(60))
    return load_config(
        os.path.join(REPO, "configs", "tiny.yaml"),
        [
            f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}", "compute.backend=local",
            "data.source=chat", f"data.files=[{files}]", f"teacher.path={teacher}", "data.max_documents=null", "data.seq_len=96",
            "distill.deepspeed.enabled=false", *overrides,
        ],
    )


@pytest.mark.parametrize("cache_format", ["topk", "sampled", "full"])
def test_the_cache_of_a_packed_row_holds_each_conversations_own_targets(tmp_path, tokenizers, cache_format):
    """Cached targets of a conversation packed with others equal the teacher's on it alone."""
    from kd_core.cache.format import CacheLayout
    from kd_core.config import CacheConfig
    from kd_core.models import load_causal_lm
    from kd_core.models.inference import CausalLMTeacher

    config = chat_job(tmp_path, tokenizers["qwen"])
    model = load_causal_lm(config.teacher.path)
    layout = lambda length: CacheLayout.from_config(CacheConfig(format=cache_format, top_k=8, num_samples=4), length, 400, 32)  # noqa: E731
    first, second = np.random.default_rng(0).integers(3, 300, (2, 8))
    packed_row, positions = np.concatenate([first, second])[None], np.concatenate([np.arange(8), np.arange(8)])[None]
    packed = CausalLMTeacher(model, layout(16)).columns(packed_row, 1, torch.Generator().manual_seed(0), positions)
    alone = CausalLMTeacher(model, layout(8)).columns(second[None], 1, torch.Generator().manual_seed(0))
    packed_targets, alone_targets = layout(16).decode(packed), layout(8).decode(alone)
    compared = [name for name in alone_targets if "sample" not in name]  # draws follow the generator's stream, not the row
    assert compared
    for name in compared:
        np.testing.assert_allclose(packed_targets[name][0, 8:], alone_targets[name][0], rtol=1e-3, atol=1e-3, err_msg=name)


@pytest.mark.slow
def test_a_chat_job_distills_on_assistant_tokens_and_eval_measures_only_them(tmp_path, tokenizers):
    from kd_core.data.shards import load_split
    from kd_core.eval import measure_models
    from kd_core.models import load_causal_lm, model_copy
    from kd_core.pipeline import run_pipeline

    config = chat_job(tmp_path, tokenizers["qwen"], "distill.train.max_steps=4", "eval.max_rows=8")
    steps = run_pipeline(config, until="eval")
    store = Store(config.storage)
    metrics = steps["eval"].metrics
    columns = read_columns(store, split_shards(steps["prep"], "test"), 8)
    assistant_positions = int(columns["loss_mask"][:, 1:].sum())
    assert metrics["completion_only"] and metrics["tokens"] == assistant_positions
    # Perplexity over the assistant's tokens alone, computed here from the model itself.
    student = load_causal_lm(model_copy(store, steps["distill"]))
    ids, positions = torch.from_numpy(columns["input_ids"].astype(np.int64)), torch.from_numpy(columns["position_ids"].astype(np.int64))
    with torch.no_grad():
        logits = student(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1].float()
    keep = torch.from_numpy(columns["loss_mask"][:, 1:].astype(bool))
    nll = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep])
    assert metrics["student"]["cross_entropy"] == pytest.approx(float(nll), rel=1e-4)
    # ...which is not the perplexity over every token of the rows.
    every = measure_models({"teacher": student, "student": student}, torch.from_numpy(load_split(store, steps["prep"], "test", 8)), 8)
    assert every["student"]["cross_entropy"] != pytest.approx(metrics["student"]["cross_entropy"], rel=1e-3)
    # Every model answered the held-out prompts, which end where the assistant's turn begins.
    assert all(0 <= metrics[name]["answer_f1"] <= 1 and metrics[name]["answer_prompts"] > 0 for name in ("teacher", "student", "baseline"))
    examples = json.loads(store.read_bytes(f"{steps['eval'].folder}/answers.json"))
    assert examples and all(example["prompt"].endswith("<|im_start|>assistant\n") for example in examples)
    assert set(examples[0]["answers"]) == {"teacher", "student", "baseline"} and examples[0]["reference"] in ANSWERS_SEEN


def test_the_students_loss_counts_only_the_positions_that_predict_assistant_tokens():
    from kd_core.config import ArchitectureConfig
    from kd_core.losses import DistillationObjective, TeacherTargets
    from kd_core.models import build_causal_lm
    from kd_core.tasks.causal_lm_step import CausalLMStep

    model = build_causal_lm(ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), 50, 12, seed=0)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 50, (2, 12), generator=generator),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], list(range(12))]),
        "loss_mask": torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.uint8),
    }
    teacher_logits = torch.randn(2, 12, 50, generator=generator)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    keep = batch["loss_mask"][:, 1:].bool()  # position t counts when token t + 1 is an assistant token
    expected_ce = torch.nn.functional.cross_entropy(logits[:, :-1][keep], batch["input_ids"][:, 1:][keep])
    teacher, student = torch.log_softmax(teacher_logits[:, :-1][keep], -1), torch.log_softmax(logits[:, :-1][keep], -1)
    expected_kd = (teacher.exp() * (teacher - student)).sum(-1).mean()
    objective = DistillationObjective(ce_weight=1.0, kd_weight=1.0)
    for step in (CausalLMStep(model, objective), CausalLMStep(model, objective, fused_chunk_size=5)):
        with torch.no_grad():
            terms = step(batch, TeacherTargets(logits=teacher_logits))
        torch.testing.assert_close(terms["ce"], expected_ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms["kd"], expected_kd, rtol=1e-5, atol=1e-6)
        nothing = step(batch | {"loss_mask": torch.zeros_like(batch["loss_mask"])}, TeacherTargets(logits=teacher_logits))
        assert float(nothing["loss"]) == 0.0 and not torch.isnan(nothing["loss"])


def test_the_bundled_python_pairs_answer_each_question_from_its_own_docs(tmp_path, tokenizers):
    import inspect

    from kd_core.data.python_qa import python_qa_pairs

    pairs = python_qa_pairs(seed=0)
    assert len(pairs) > 800 and pairs == python_qa_pairs(seed=0)
    by_prompt = {pair["prompt"]: pair["completion"] for pair in pairs}
    zip_question = next(prompt for prompt in by_prompt if "`zip`" in prompt and not prompt.startswith("How do I call"))
    assert by_prompt[zip_question] in " ".join(inspect.getdoc(zip).split())  # the docstring's own prose
    assert by_prompt["How do I call `json.dumps`?"].startswith("`json.dumps(obj, *, skipkeys=False")
    assert all(pair["completion"].strip() and len(pair["completion"]) <= 330 for pair in pairs)
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    manifest = prep(DataConfig(source="python-qa", tokenizer=tokenizers["qwen"], seq_len=128, max_documents=60), store)
    assert manifest.metrics["conversations"] == 60 and manifest.details["chat"]["train_on"] == "assistant"


def test_held_out_prompts_end_where_the_answer_starts_and_answers_score_by_words():
    from kd_core.data.chat import conversation_prompts
    from kd_core.eval.answers import answer_scores, word_f1

    rows = {  # two conversations packed in one row, then padding; the second has two assistant turns
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1]]),
        "loss_mask": torch.tensor([[0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0]]),
    }
    prompts = conversation_prompts(rows, 10)
    assert [(p.prompt, p.reference) for p in prompts] == [([5, 6], [7, 8]), ([9], [10])]
    assert conversation_prompts(rows, 1) == prompts[:1]
    assert word_f1("Returns a  list", "returns a list") == 1.0 and word_f1("a list of", "a list") == pytest.approx(0.8)
    assert answer_scores(["returns a list", "nothing"], ["returns a list", "a value"]) == {"answer_exact_match": 0.5, "answer_f1": 0.5}


@pytest.mark.slow
def test_a_pretrained_teacher_is_fine_tuned_and_the_pretrained_student_is_measured_before_distillation(tmp_path, tokenizers):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from kd_core.pipeline import run_pipeline

    student = save_model(tmp_path / "student", "llama", AutoTokenizer.from_pretrained(tokenizers["qwen"]), hidden_size=16, layers=1, seed=1)
    config = chat_job(
        tmp_path, tokenizers["qwen"], "teacher.finetune=true", "teacher.train.max_steps=3", "student.init=pretrained",
        f"student.path={student}", "distill.train.max_steps=2", "eval.max_rows=4", "eval.answer_prompts=2",
        "eval.gates=[student.perplexity < start.perplexity]",
    )
    steps = run_pipeline(config, until="eval")
    teacher = steps["teacher"]
    assert teacher.details["finetuned_from"] == config.teacher.path and "external_url" not in teacher.details
    original, tuned = load_file(f"{config.teacher.path}/model.safetensors"), load_file(f"{config.storage.root}/{teacher.details['model_folder']}/model.safetensors")
    assert original.keys() == tuned.keys() and any(not original[name].equal(tuned[name]) for name in original)
    metrics = steps["eval"].metrics
    assert metrics["start"]["parameters"] == metrics["student"]["parameters"]  # the same model, before and after
    assert metrics["start"]["cross_entropy"] != metrics["student"]["cross_entropy"] and "answer_f1" in metrics["start"]
    assert metrics["gates"][0]["gate"] == "student.perplexity < start.perplexity" and metrics["gates"][0]["right"] == metrics["start"]["perplexity"]
    with pytest.raises(Exception, match=r"reads the student before distillation \(start\)"):
        chat_job(tmp_path / "other", tokenizers["qwen"], "eval.gates=[student.perplexity < start.perplexity]")


def test_chat_and_answer_settings_do_not_change_the_keys_of_jobs_that_do_not_read_them():
    from kd_core.config import EvalConfig, section_hash
    from kd_core.stages.prep import prep_section
    from kd_core.tasks import task_named

    storage = StorageConfig(root="/tmp/unused")
    for task, data in (("causal_lm", DataConfig()), ("reward", DataConfig(source="digit-preferences"))):
        kind = task_named(task)
        changed = data.model_copy(update={"chat": data.chat.model_copy(update={"train_on": "all"})})
        assert section_hash(prep_section(kind, data, storage)) == section_hash(prep_section(kind, changed, storage)), task
    text, chat = {"seq_len": 8}, {"seq_len": 8, "chat": {"train_on": "assistant"}}
    more = EvalConfig(answer_prompts=5)
    causal_lm = task_named("causal_lm")
    assert causal_lm.eval_settings(EvalConfig(), text) == causal_lm.eval_settings(more, text)
    assert causal_lm.eval_settings(EvalConfig(), chat) != causal_lm.eval_settings(more, chat)


def test_answer_gates_need_chat_data_and_export_of_a_baseline_needs_one(tmp_path, tokenizers):
    from kd_core.config import ConfigError
    from kd_core.errors import InputError
    from kd_core.pipeline import export_model

    with pytest.raises(ConfigError, match=r"eval.gates\[0\]: 'student.answer_f1 > 0.1' reads the greedy answers' scores"):
        load_config(os.path.join(REPO, "configs", "tiny.yaml"), ["eval.gates=[student.answer_f1 > 0.1]"])
    with pytest.raises(ConfigError, match=r"registry.primary_metric: 'student.answer_f1' reads the greedy answers' scores"):
        chat_job(tmp_path, tokenizers["qwen"], "data.chat.train_on=all", "registry.primary_metric=student.answer_f1")
    job = chat_job(tmp_path / "export", tokenizers["qwen"], "distill.baseline=false")
    with pytest.raises(InputError, match="--step baseline, but distill.baseline is false"):
        export_model(job, "baseline", str(tmp_path / "out"))
    assert not (tmp_path / "export" / "store").exists()  # refused before any step ran
