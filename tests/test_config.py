"""Job config: validation, error messages that name the field and value, overrides, hashing.

Run: .venv/bin/python -m pytest tests/test_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_core.config import ConfigError, public_dict, section_hash
from kd_core.job import JobConfig, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, JobConfig)


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED_CONFIGS} >= {"demo.yaml", "tiny.yaml"}


def test_error_names_field_path_and_value(tmp_path):
    path = write(tmp_path, "distill:\n  loss:\n    temperature: -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "distill.loss.temperature: must be > 0, got -1" in str(caught.value)
    assert str(path) in str(caught.value)


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "data:\n  seq_len: 2\ncache:\n  top_k: 0\n")
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert "data.seq_len: must be >= 8, got 2" in message
    assert "cache.top_k: must be > 0, got 0" in message


def test_unknown_field_suggests_the_close_name(tmp_path):
    path = write(tmp_path, "distill:\n  loss:\n    temperture: 2\n")
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert "distill.loss.temperture: unknown field; did you mean 'temperature'?" in message


def test_wrong_choice_lists_the_choices(tmp_path):
    message = str(pytest.raises(ConfigError, load_config, write(tmp_path, "compute:\n  backend: slurm\n")).value)
    assert "compute.backend: must be one of 'ray' or 'local', got 'slurm'" in message


def test_model_validator_names_field(tmp_path):
    path = write(tmp_path, "student:\n  architecture: {hidden_size: 30, num_heads: 4}\n")
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert "student.architecture: num_heads (4) must divide hidden_size (30)" in message


def test_cross_section_rule(tmp_path):
    path = write(tmp_path, "data: {vocab_size: 300}\ncache: {top_k: 400}\n")
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert "cache.top_k: must be <= data.vocab_size (300), got 400" in message


def test_tail_loss_needs_the_cache_temperature():
    message = str(pytest.raises(ConfigError, validate_config, {"distill": {"loss": {"temperature": 2.0}}}).value)
    assert "distill.loss.temperature: must equal cache.temperature (1.0) when distill.loss.topk_tail is true, got 2.0" in message
    validate_config({"distill": {"loss": {"temperature": 2.0}}, "cache": {"temperature": 2.0}})
    validate_config({"distill": {"loss": {"temperature": 2.0, "topk_tail": False}}})


def test_tail_rule_does_not_apply_to_online_teachers_or_full_caches():
    validate_config({"distill": {"teacher_source": "online", "loss": {"temperature": 2.0}}})
    validate_config({"data": {"vocab_size": 1000}, "cache": {"format": "full"}, "distill": {"loss": {"temperature": 2.0}}})


def test_full_cache_is_for_small_vocabularies():
    message = str(pytest.raises(ConfigError, validate_config, {"data": {"vocab_size": 32000}, "cache": {"format": "full"}}).value)
    assert "cache.format: 'full' stores every log-prob and is for vocabularies up to cache.full_max_vocab (8192)" in message


def test_feature_distillation_needs_cached_teacher_layers():
    loss = {"feature_weight": 1.0, "feature_layers": [[1, 3]]}
    message = str(pytest.raises(ConfigError, validate_config, {"distill": {"loss": loss}}).value)
    assert "teacher layer 3 is not cached; add it to cache.hidden_layers (now [])" in message
    message = str(pytest.raises(ConfigError, validate_config, {"distill": {"loss": {"feature_weight": 1.0}}}).value)
    assert "must list (student layer, teacher layer) pairs when feature_weight > 0" in message
    bad_student = {"distill": {"loss": {"feature_weight": 1.0, "feature_layers": [[9, 3]]}}, "cache": {"hidden_layers": [3]}}
    assert "student layer 9 is not in 0..2" in str(pytest.raises(ConfigError, validate_config, bad_student).value)
    validate_config({"distill": {"loss": loss}, "cache": {"hidden_layers": [3]}})
    validate_config({"distill": {"loss": loss, "teacher_source": "online"}})


def test_loss_needs_a_weighted_term():
    message = str(pytest.raises(ConfigError, validate_config, {"distill": {"loss": {"ce_weight": 0, "kd_weight": 0}}}).value)
    assert "distill.loss: ce_weight and kd_weight are both 0: nothing would be trained" in message


def test_global_batch_must_split_evenly_across_workers():
    message = str(pytest.raises(ConfigError, validate_config, {"compute": {"num_workers": 3}}).value)
    assert "teacher.train.batch_size: must be a multiple of compute.num_workers (3), got 16" in message


def test_dotted_overrides_are_typed(tmp_path):
    path = write(tmp_path, "distill:\n  train:\n    max_steps: 300\n")
    config = load_config(path, ["distill.train.max_steps=50", "distill.loss.kd_weight=0.25", "compute.backend=local"])
    assert config.distill.train.max_steps == 50
    assert config.distill.loss.kd_weight == 0.25
    assert config.compute.backend == "local"


def test_an_override_names_a_searched_field_whole(tmp_path):
    """`tune.space` keys are dotted field names: the override's rest after tune.space is one key."""
    config = load_config(write(tmp_path, "{}\n"), ["tune.space.distill.loss.kd_weight={kind: uniform, low: 0.2, high: 0.9}"])
    assert list(config.tune.space) == ["distill.loss.kd_weight"]
    assert config.tune.space["distill.loss.kd_weight"].high == 0.9


def test_bad_override_value_is_reported_like_a_file_value(tmp_path):
    path = write(tmp_path, "{}\n")
    message = str(pytest.raises(ConfigError, load_config, path, ["distill.loss.temperature=-1"]).value)
    assert "distill.loss.temperature: must be > 0, got -1" in message


def test_override_without_equals_is_rejected(tmp_path):
    message = str(pytest.raises(ConfigError, load_config, write(tmp_path, "{}\n"), ["distill.train.max_steps"]).value)
    assert "expected the form section.field=value" in message


def test_override_into_a_value_is_rejected(tmp_path):
    message = str(pytest.raises(ConfigError, load_config, write(tmp_path, "name: job\n"), ["name.first=x"]).value)
    assert "name is not a section" in message


def test_missing_file_and_bad_yaml(tmp_path):
    assert "config file not found" in str(pytest.raises(ConfigError, load_config, tmp_path / "nope.yaml").value)
    assert "not valid YAML" in str(pytest.raises(ConfigError, load_config, write(tmp_path, "a: [1,\n")).value)
    assert "must be a mapping" in str(pytest.raises(ConfigError, load_config, write(tmp_path, "- 1\n")).value)


def test_files_source_needs_files():
    message = str(pytest.raises(ConfigError, validate_config, {"data": {"source": "files"}}).value)
    assert "data.files: must list at least one file" in message


def test_secrets_never_reach_public_dict_or_hash():
    plain = validate_config({"storage": {"root": "s3://bucket/x"}})
    secret = validate_config(
        {"storage": {"root": "s3://bucket/x", "s3": {"access_key_id": "AKIAEXAMPLE", "secret_access_key": "hunter2"}}}
    )
    dumped = str(public_dict(secret))
    assert "hunter2" not in dumped and "AKIAEXAMPLE" not in dumped
    assert "hunter2" not in repr(secret)
    assert section_hash(secret.storage) == section_hash(plain.storage)


def test_section_hash_tracks_values():
    base = validate_config({})
    changed = validate_config({"distill": {"loss": {"kd_weight": 0.9}}})
    assert section_hash(base.distill) != section_hash(changed.distill)
    assert section_hash(base.data) == section_hash(changed.data)


def test_every_field_has_a_docstring():
    missing = []

    def visit(model, prefix):
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                visit(annotation, f"{prefix}{name}.")

    visit(JobConfig, "")
    assert missing == []
