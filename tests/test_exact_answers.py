"""The bundled exact-answer problems (`data.source: exact-answers`, kd_core/data/exact_answers.py),
their character tokenizer, and records that name their own split (`data.chat.split_field`).

Every answer is checked against an independent computation from its prompt; the splits against
their lengths; the prep of the source against its records. Seconds on a CPU.

Run: PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_exact_answers.py -x -q
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest
from pydantic import ValidationError

from kd_core.config import DataConfig, ExactAnswersConfig, StorageConfig, section_hash
from kd_core.data.exact_answers import (
    SPLIT_FIELD, char_tokenizer, char_tokenizer_url, char_vocabulary, exact_answer_pairs, exact_answers_url,
)
from kd_core.data.shards import read_columns, split_shards
from kd_core.data.sources import DataSourceError
from kd_core.data.tokenizer import load_tokenizer
from kd_core.stages.prep import prep, prep_section
from kd_core.storage import Store, url_to_fs
from kd_core.tasks import task_named

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ExactAnswersConfig(pairs_per_task=60, train_lengths=(2, 3), held_out_lengths=[4, 6], held_out_pairs=5)


def pairs(settings: ExactAnswersConfig = SMALL, seed: int = 0) -> list[dict]:
    return exact_answer_pairs(settings, seed, val_fraction=0.1, test_fraction=0.2)


def solved(prompt: str) -> tuple[str, str, int]:
    """(family, answer, length) of a prompt, worked out here from its text alone."""
    if match := re.fullmatch(r"(\d+)([+-])(\d+)", prompt):
        first, second = int(match[1]), int(match[3])
        if match[2] == "+":
            return "add", str(first + second), len(match[1])
        assert second <= first, prompt  # differences are never negative
        return "subtract", str(first - second), len(match[1])
    if match := re.fullmatch(r"sort((?: \d)+)", prompt):
        digits = match[1].split()
        return "sort", " ".join(sorted(digits, key=int)), len(digits)
    if match := re.fullmatch(r"reverse ([a-z]+)", prompt):
        return "reverse", "".join(reversed(match[1])), len(match[1])
    if match := re.fullmatch(r"drop vowels ([a-z]+)", prompt):
        return "drop_vowels", re.sub("[aeiou]", "", match[1]), len(match[1])
    raise AssertionError(f"a prompt of no family: {prompt!r}")


# ------------------------------------------------------------------------------------- problems
def test_every_answer_is_the_one_its_prompt_asks_for():
    records = pairs(ExactAnswersConfig(pairs_per_task=300, train_lengths=(1, 3), held_out_lengths=[4, 5, 9], held_out_pairs=20))
    assert Counter(record["tag"] for record in records).keys() == {"add", "subtract", "sort", "reverse", "drop_vowels"}
    for record in records:
        family, answer, length = solved(record["prompt"])
        assert (record["tag"], record["completion"], record["length"]) == (family, answer, length), record
        assert record["completion"]  # no empty answer (a word of vowels alone keeps a consonant)
    assert any(record["prompt"].startswith("0") for record in records if record["tag"] == "add")  # 1-digit operands include 0


def test_the_problems_follow_the_seed_and_each_family_its_own_draws():
    assert pairs(seed=3) == pairs(seed=3)
    assert [r["prompt"] for r in pairs(seed=3)] != [r["prompt"] for r in pairs(seed=4)]
    alone = pairs(SMALL.model_copy(update={"tasks": ["sort"]}))
    assert alone == [record for record in pairs() if record["tag"] == "sort"]


def test_no_prompt_is_in_two_splits_and_only_the_test_split_holds_the_longer_problems():
    records = pairs()
    prompts = [record["prompt"] for record in records]
    assert len(prompts) == len(set(prompts))
    by_split = {split: [r for r in records if r["split"] == split] for split in ("train", "val", "test")}
    assert sum(map(len, by_split.values())) == len(records) and all(by_split.values())
    for family in SMALL.tasks:
        lengths = {split: {r["length"] for r in rows if r["tag"] == family} for split, rows in by_split.items()}
        assert lengths["train"] == {2, 3} and lengths["val"] <= {2, 3}, family
        assert lengths["test"] == {2, 3, 4, 6}, family  # in range and beyond it
        assert max(lengths["test"]) > max(lengths["train"])
        held_out = [r for r in records if r["tag"] == family and r["length"] in (4, 6)]
        assert len(held_out) == 10 and {r["split"] for r in held_out} == {"test"}


def test_lengths_and_families_are_checked_where_they_are_set():
    with pytest.raises(ValidationError, match=r"held_out_lengths: each must be longer than train_lengths' longest \(3\)"):
        ExactAnswersConfig(train_lengths=(1, 3), held_out_lengths=[3, 5])
    with pytest.raises(ValidationError, match=r"train_lengths: must be \[shortest, longest\]"):
        ExactAnswersConfig(train_lengths=(4, 2))
    with pytest.raises(ValidationError, match="list each task family once"):
        ExactAnswersConfig(tasks=["add", "add"])
    with pytest.raises(ValidationError, match=r"chat.split_field: the exact-answers records name their split in 'split'"):
        DataConfig(source="exact-answers", chat={"split_field": "fold"})


# ------------------------------------------------------------------------------------ tokenizer
def test_the_character_tokenizer_gives_every_character_of_the_data_a_token_and_round_trips(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    hf = load_tokenizer(char_tokenizer_url(store, None), store.config).hf  # as prep reads it from the store
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>" and len(hf) == len(char_vocabulary(None))
    records = pairs(ExactAnswersConfig(pairs_per_task=400, train_lengths=(1, 3), held_out_lengths=[4, 5]))
    for record in records:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
        text = hf.apply_chat_template(messages, tokenize=False)
        assert text == f"{record['prompt']}={record['completion']}<|endoftext|>"
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) - len("<|endoftext|>") + 1 and ids[-1] == hf.eos_token_id  # one token a character
        assert hf.decode(ids) == text and hf.decode(ids, skip_special_tokens=True) == text.removesuffix("<|endoftext|>")
    every_character = "".join(sorted(set("".join(r["prompt"] + r["completion"] for r in records)) | set(" \n=+-")))
    assert hf.convert_ids_to_tokens(hf(every_character, add_special_tokens=False)["input_ids"]) == list(every_character)


def test_a_template_of_ones_own_adds_its_characters_and_an_unknown_character_is_an_error():
    template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %} → {% endif %}{% endfor %}"
    hf = char_tokenizer(template)
    assert "→" in hf.get_vocab() and hf.chat_template == template
    with pytest.raises(Exception, match="WordLevel"):
        char_tokenizer(None)("é")


# --------------------------------------------------------------------------------------- splits
def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("char")
    char_tokenizer(None).save_pretrained(folder)
    return str(folder)


def chat_records(count: int) -> list[dict]:
    return [{"prompt": f"{index}+1", "completion": str(index + 1), "split": ("train", "val", "test")[index % 3]} for index in range(count)]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "1+1", "completion": "2", "split": "holdout"}, r"chat.jsonl:5: 'split' \(data.chat.split_field\) is 'holdout'; it must be one of train, val, test"),
        ({"prompt": "1+1", "completion": "2"}, r"chat.jsonl:5: the record has no 'split' \(data.chat.split_field\)"),
        ({"prompt": "1+1", "completion": "2", "split": None}, r"chat.jsonl:5: the record has no 'split'"),
    ],
)
def test_a_record_without_a_known_split_names_its_file_and_line(tmp_path, tokenizer_folder, bad, message):
    files = [write_jsonl(tmp_path / "chat.jsonl", [*chat_records(4), bad])]
    config = DataConfig(source="chat", files=files, tokenizer=tokenizer_folder, seq_len=16, chat={"split_field": "split"})
    with pytest.raises(DataSourceError, match=message):
        prep(config, Store(StorageConfig(root=str(tmp_path / "store"))))


def test_records_go_to_the_split_they_name_and_a_split_nobody_names_is_an_error(tmp_path, tokenizer_folder):
    records = chat_records(30)
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    files = [write_jsonl(tmp_path / "chat.jsonl", records)]
    config = DataConfig(source="chat", files=files, tokenizer=tokenizer_folder, seq_len=16, chat={"split_field": "split", "layout": "padded"})
    manifest = prep(config, store)
    hf = load_tokenizer(tokenizer_folder, store.config).hf
    for split in ("train", "val", "test"):
        rows = read_columns(store, split_shards(manifest, split))
        written = {hf.decode(row[mask.astype(bool)], skip_special_tokens=True) for row, mask in zip(rows["input_ids"], rows["loss_mask"])}
        assert written == {record["completion"] for record in records if record["split"] == split}, split
    no_val = [write_jsonl(tmp_path / "no_val.jsonl", [record for record in records if record["split"] != "val"])]
    with pytest.raises(DataSourceError, match=r"data: no record names split val in 'split' \(data.chat.split_field\)"):
        prep(config.model_copy(update={"files": no_val}), store)


# ------------------------------------------------------------------------------------------ prep
def test_prep_of_the_source_writes_each_split_from_its_records_with_the_character_tokenizer(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    config = DataConfig(source="exact-answers", exact_answers=SMALL, seq_len=32, val_fraction=0.1, test_fraction=0.2, chat={"layout": "padded"})
    manifest = prep(config, store)
    fs, path = url_to_fs(exact_answers_url(store, SMALL, 0, 0.1, 0.2), store.config)  # written by prep: the same URL
    records = [json.loads(line) for line in fs.cat_file(path).splitlines()]
    assert records == pairs()
    expected = Counter(record[SPLIT_FIELD] for record in records)
    assert {split: manifest.details["splits"][split]["conversations"] for split in expected} == dict(expected)
    assert manifest.details["vocab_size"] == len(char_vocabulary(None))
    hf = load_tokenizer(f"{tmp_path}/{manifest.folder}/tokenizer", store.config).hf
    assert hf.chat_template and hf.eos_token == "<|endoftext|>"
    longest = {}
    for split in ("train", "test"):
        rows = read_columns(store, split_shards(manifest, split))
        answers = {hf.decode(row[mask.astype(bool)], skip_special_tokens=True) for row, mask in zip(rows["input_ids"], rows["loss_mask"])}
        assert answers == {r["completion"] for r in records if r[SPLIT_FIELD] == split}
        longest[split] = int((rows["input_ids"] != hf.pad_token_id).sum(axis=1).max())
    assert longest["test"] > longest["train"]  # the held-out problems are longer


def test_the_prep_key_covers_the_problems_settings_for_this_source_alone():
    kind, storage = task_named("causal_lm"), StorageConfig(root="/tmp/unused")
    key = lambda data: section_hash(prep_section(kind, data, storage))  # noqa: E731
    other = ExactAnswersConfig(held_out_lengths=[4, 7])
    source = DataConfig(source="exact-answers")
    assert key(source) != key(source.model_copy(update={"exact_answers": other}))
    for data in (DataConfig(), DataConfig(source="python-qa", tokenizer=None)):
        assert key(data) == key(data.model_copy(update={"exact_answers": other}))
        assert "split_field" not in json.dumps(prep_section(kind, data, storage))  # unset: the keys from before the field
    reward = task_named("reward")
    preferences = DataConfig(source="digit-preferences")
    assert section_hash(prep_section(reward, preferences, storage)) == section_hash(prep_section(reward, preferences.model_copy(update={"exact_answers": other}), storage))


def test_the_source_needs_no_tokenizer_but_the_other_chat_sources_still_do(tmp_path):
    from kd_core.config import ConfigError
    from kd_core.job import load_config

    overrides = [f"storage.root={tmp_path}", f"registry.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    job = load_config(os.path.join(REPO, "configs", "on_policy.yaml"), overrides)
    assert job.data.source == "exact-answers" and job.data.tokenizer is None
    with pytest.raises(ConfigError, match="data.tokenizer: chat data is rendered through a Hugging Face tokenizer's chat template"):
        load_config(os.path.join(REPO, "configs", "on_policy.yaml"), [*overrides, "data.source=python-qa"])
    with pytest.raises(ConfigError, match=r"cache.top_k: must be <= the exact-answers character tokenizer's 102 tokens, got 200"):
        load_config(os.path.join(REPO, "configs", "on_policy.yaml"), [*overrides, "distill.teacher_source=cache", "cache.top_k=200"])


def test_the_preflight_renders_the_first_problems_through_the_character_tokenizer(tmp_path):
    from kd_core.job import load_config
    from kd_core.preflight import job_conversations, template_check_of

    job = load_config(os.path.join(REPO, "configs", "on_policy.yaml"), [f"storage.root={tmp_path}", f"registry.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    conversations = job_conversations(job, 3)
    assert [c.where for c in conversations] == ["exact-answers pair 1", "exact-answers pair 2", "exact-answers pair 3"]
    assert all(c.split in ("train", "val", "test") for c in conversations)
    result = template_check_of(job, 8)
    assert result.status == "pass", result.message
    assert not (tmp_path / "datasets").exists()  # nothing written to the store before the run
