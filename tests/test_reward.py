"""Multimodal reward-model distillation (`task: reward`): data, models, losses, eval, and the
tiny recipe end to end (prep → teacher → cache → distill + baseline → eval → register on MLflow),
then its teacher used as an existing Hugging Face reward model (`teacher.path`).

The end-to-end test runs the training in this process (`compute.backend: local`, the same
`train_worker` Ray Train workers run) with a DeepSpeed student, to keep `make test` inside its budget.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.cache import cache_shards
from kd_core.config import ConfigError, PreferenceConfig, VisionConfig
from kd_core.job import load_config, validate_config
from kd_core.data.digits import digit_records
from kd_core.data.preferences import read_preference_records, split_by_image
from kd_core.data.shards import read_columns
from kd_core.data.sources import DataSourceError
from kd_core.devtools import migrated_sqlite_uri
from kd_core.eval.reward import load_pairs, preference_calibration, preference_scores, score_pairs
from kd_core.losses import RewardObjective, TeacherTargets, bradley_terry
from kd_core.manifest import ManifestError
from kd_core.models.reward import build_multimodal_reward_model, load_reward_model
from kd_core.pipeline import run_pipeline, search_steps
from kd_core.storage import Store
from kd_core.tune import TRIALS_NAME, best_job
from kd_core.stages.tune import tune

REPO = Path(__file__).resolve().parents[1]


def reward_job(tmp_path, **overrides):
    raw = {
        "task": "reward",
        "data": {"source": "digit-preferences"},
        "storage": {"root": str(tmp_path / "store")},
        "registry": {"primary_metric": "student.pairwise_accuracy_human"},
    }
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        raw.setdefault(section, {})[field] = value
    return validate_config(raw)


def cache_rewards(config, cache_manifest) -> list[np.ndarray]:
    store = Store(config.storage)
    return [read_columns(store, [record])["teacher_chosen"] for record in cache_shards(cache_manifest)]


# ------------------------------------------------------------------------------------- losses
def test_bradley_terry_matches_a_float64_reference_and_skips_unlabelled_pairs():
    chosen = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.bfloat16)
    rejected = torch.tensor([1.0, 1.0, 0.5, -2.0], dtype=torch.bfloat16)
    labels = torch.tensor([1.0, 0.0, 0.7, float("nan")])
    margin = (chosen.double() - rejected.double())[:3]
    y = labels[:3].double()
    expected = -(y * torch.nn.functional.logsigmoid(margin) + (1 - y) * torch.nn.functional.logsigmoid(-margin)).mean()
    loss = bradley_terry(chosen, rejected, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    unlabelled = bradley_terry(chosen, rejected, torch.full((4,), float("nan")))
    assert unlabelled.item() == 0.0 and not math.isnan(unlabelled.item())


def test_reward_objective_weights_each_term_and_leaves_out_missing_targets():
    chosen, rejected = torch.tensor([1.0, 0.0], requires_grad=True), torch.tensor([0.0, 2.0], requires_grad=True)
    teacher = TeacherTargets(chosen_rewards=torch.tensor([2.0, 1.0]), rejected_rewards=torch.tensor([0.0, 0.0]))
    labels = torch.tensor([1.0, float("nan")])
    objective = RewardObjective(pointwise_weight=0.5, pairwise_weight=2.0, temperature=1.0, bradley_terry_weight=3.0)
    terms = objective(chosen, rejected, teacher, human_label=labels)
    assert set(terms) == {"loss", "pointwise", "pairwise", "bt"}
    torch.testing.assert_close(terms["loss"], 0.5 * terms["pointwise"] + 2.0 * terms["pairwise"] + 3.0 * terms["bt"])
    terms["loss"].backward()
    assert chosen.grad is not None and torch.isfinite(chosen.grad).all()
    baseline = RewardObjective(pairwise_weight=0.0, bradley_terry_weight=1.0)(chosen, rejected, human_label=labels)
    assert set(baseline) == {"loss", "bt"}
    with pytest.raises(ValueError, match="no term"):
        RewardObjective(pairwise_weight=1.0)(chosen, rejected)


# --------------------------------------------------------------------------------------- data
def test_digit_preferences_are_real_scans_with_right_and_wrong_answers_in_random_order():
    records = list(digit_records(PreferenceConfig(labeled_fraction=0.5, pairs_per_image=2), seed=3))
    assert len(records) == 1797 * 2
    again = list(digit_records(PreferenceConfig(labeled_fraction=0.5, pairs_per_image=2), seed=3))
    assert [r for _, _, r in records[:50]] == [r for _, _, r in again[:50]]
    labelled = [record for _, _, record in records if "human_label" in record]
    assert 0.45 < len(labelled) / len(records) < 0.55
    assert 0.4 < np.mean([record["human_label"] for record in labelled]) < 0.6  # the order says nothing
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for pixels, digit, record in records[:40]:
        assert pixels.shape == (8, 8) and pixels.dtype == np.uint8 and pixels.max() > 100
        assert f"digit {words[digit]}," in record["image_text"]
        assert record["chosen"] != record["rejected"]


def write_jsonl(folder: Path, records: list) -> Path:
    from kd_core.data.digits import png_bytes

    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "a.png").write_bytes(png_bytes(np.full((8, 8), 200, np.uint8)))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in records) + "\n")
    return path


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b", "image": "img/a.png", "image_text": "t", "human_label": 1}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"pairs.jsonl:2: not valid JSON"),
        (json.dumps({**GOOD, "chosen": ""}), r"pairs.jsonl:2: field 'chosen' must be a non-empty string"),
        (json.dumps({**GOOD, "human_label": 2}), r"pairs.jsonl:2: field 'human_label' must be a number in \[0, 1\]"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "image_text"}), r"pairs.jsonl:2: field 'image_text'"),
    ],
)
def test_a_broken_record_is_reported_by_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path, [GOOD, bad_line])
    with pytest.raises(DataSourceError, match=message):
        list(read_preference_records([str(path)], PreferenceConfig(), {}))


def test_a_missing_image_is_reported_by_file_and_line_before_any_shard_is_written(tmp_path):
    from kd_core.stages.prep import prep
    from kd_core.storage import Store

    path = write_jsonl(tmp_path / "data", [GOOD, {**GOOD, "image": "img/missing.png"}, {**GOOD, "human_label": None}])
    config = reward_job(tmp_path, **{"data.source": "preferences", "data.files": [str(path)]})
    with pytest.raises(DataSourceError, match=r"pairs.jsonl:2: image .*img/missing.png does not exist"):
        prep(config.data, Store(config.storage), task="reward")
    assert not list((tmp_path / "store").rglob("*.arrow"))


@pytest.mark.parametrize(
    "image",
    ["../outside.png", "/etc/hostname", "file:///etc/hostname", "s3://another-bucket/a.png", "simplecache::s3://b/a.png", "img/out/a.png"],
)
def test_an_image_reference_leaving_the_jsonl_folder_is_refused_by_file_and_line(tmp_path, image):
    """A record is input: it may name a file beside its JSONL, not one anywhere else (the last case
    is a symbolic link inside the folder that points out of it, caught after resolving)."""
    path = write_jsonl(tmp_path / "data", [GOOD, {**GOOD, "image": image}])
    (tmp_path / "outside.png").write_bytes((tmp_path / "data" / "img" / "a.png").read_bytes())
    (tmp_path / "data" / "img" / "out").symlink_to(tmp_path)
    with pytest.raises(DataSourceError, match=r"pairs.jsonl:2: image: .*(allowed_schemes|not a name inside its folder|resolves to)"):
        list(read_preference_records([str(path)], PreferenceConfig(), {}))


def test_an_image_url_of_an_allowed_scheme_is_read(tmp_path):
    import fsspec

    from kd_core.data.digits import png_bytes
    from kd_core.data.preferences import load_images

    url = f"memory://kdflow-tests/{tmp_path.name}/a.png"
    fsspec.filesystem("memory").pipe_file(url, png_bytes(np.full((8, 8), 7, np.uint8)))
    path = write_jsonl(tmp_path, [{**GOOD, "image": url}])
    records = list(read_preference_records([str(path)], PreferenceConfig(allowed_schemes=["memory"]), {}))
    assert records[0].image_url == url
    assert load_images(records, 4, {}, max_bytes=2**20)[url].tolist() == [7] * 48


def test_an_oversized_image_or_a_decompression_bomb_is_refused_by_file_and_line(tmp_path, monkeypatch):
    from PIL import Image

    from kd_core.data.digits import png_bytes
    from kd_core.data.preferences import load_images

    path = write_jsonl(tmp_path, [GOOD])
    (tmp_path / "img" / "big.png").write_bytes(png_bytes(np.zeros((40, 40), np.uint8)))  # 1,600 pixels
    big = list(read_preference_records([str(path)], PreferenceConfig(), {}))
    big[0].image_url = str(tmp_path / "img" / "big.png")
    size = (tmp_path / "img" / "big.png").stat().st_size
    with pytest.raises(DataSourceError, match=rf"pairs.jsonl:1: image .*big.png is larger than data.preferences.max_image_bytes \({size - 1} bytes\)"):
        load_images(big, 4, {}, max_bytes=size - 1)
    assert load_images(big, 4, {}, max_bytes=size)  # the limit itself is allowed
    # Past PIL's limit PIL only warns (up to twice it): a warning must stop prep all the same.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with pytest.raises(DataSourceError, match=r"pairs.jsonl:1: image .*big.png has too many pixels to decode safely"):
        load_images(big, 4, {}, max_bytes=size)


def test_pairs_are_split_by_image():
    records = read_preference_records_for(12, 3)
    splits = split_by_image(records, 0.2, 0.2, seed=0)
    images = {split: {record.image_url for record in pairs} for split, pairs in splits.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"] and not images["val"] & images["test"]
    assert sum(len(pairs) for pairs in splits.values()) == 36


def read_preference_records_for(images: int, pairs: int):
    from kd_core.data.preferences import PreferenceRecord

    return [PreferenceRecord("p", "a", "b", f"mem://{i}.png", "t", None, f"x:{i}") for i in range(images) for _ in range(pairs)]


# ------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("fusion", ["prefix", "late"])
def test_multimodal_reward_model_reads_the_image_ignores_padding_and_round_trips(tmp_path, fusion):
    from kd_core.config import ArchitectureConfig

    model = build_multimodal_reward_model(
        VisionConfig(patch_size=2, hidden_size=16, num_layers=1, num_heads=2, fusion=fusion),
        ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2),
        vocab_size=50, max_positions=12, image_size=8, pad_id=1, seed=0,
    ).eval()
    pixels = torch.randint(0, 256, (2, 8 * 8 * 3), dtype=torch.uint8)
    ids = torch.tensor([[5, 6, 7, 1, 1, 1], [8, 9, 1, 1, 1, 1]])
    rewards = model(input_ids=ids, pixel_values=pixels)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32
    torch.testing.assert_close(model(input_ids=ids[:, :3], pixel_values=pixels), rewards)  # right padding changes nothing
    assert not torch.allclose(model(input_ids=ids, pixel_values=pixels.flip(0)), rewards)  # the image does
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert not list((tmp_path / "m").glob("*.bin")) and (tmp_path / "m" / "model.safetensors").exists()
    torch.testing.assert_close(load_reward_model(tmp_path / "m")(input_ids=ids, pixel_values=pixels), rewards)


@pytest.mark.slow
@pytest.mark.parametrize("runner_kind", ["plain", "ddp", "zero2"])
def test_the_vision_warm_start_holds_the_language_model_still_then_lets_it_learn(runner_kind):
    """student.vision.warm_start_steps = 2: for two optimizer steps the language model keeps its
    weights while the image encoder, projector and head learn; from the third it learns too. The
    same with kdflow's plain runner (alone and inside DDP, as Ray Train wraps it for several
    workers) and a DeepSpeed ZeRO-2 engine."""
    from kd_core.config import ArchitectureConfig, DeepSpeedConfig, TrainConfig
    from kd_core.tasks.reward_step import RewardStep
    from kd_core.train.deepspeed_engine import DeepSpeedRunner, deepspeed_config, ensure_process_group
    from kd_core.train.loop import make_optimizer
    from kd_core.train.step import PlainRunner

    model = build_multimodal_reward_model(
        VisionConfig(patch_size=4, hidden_size=16, num_layers=1, num_heads=2),
        ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), vocab_size=50, max_positions=12, image_size=8, pad_id=1, seed=0,
    )
    module = RewardStep(model, RewardObjective(), multimodal=True, pad_id=1, warm_start_steps=2)
    train = TrainConfig(batch_size=4, learning_rate=0.01, warmup_steps=1, max_steps=10)
    if runner_kind == "ddp":
        ensure_process_group()
        wrapped = torch.nn.parallel.DistributedDataParallel(module)
        runner = PlainRunner(wrapped, *make_optimizer(wrapped, train), grad_clip=1.0)
    elif runner_kind == "plain":
        runner = PlainRunner(module, *make_optimizer(module, train), grad_clip=1.0)
    else:
        runner = DeepSpeedRunner(module, *make_optimizer(module, train), deepspeed_config(DeepSpeedConfig(zero_stage=2), train, world_size=1))
    trained = runner.engine.module if runner_kind == "zero2" else module
    generator = torch.Generator().manual_seed(0)
    batch = {
        "chosen_ids": torch.randint(2, 50, (4, 6), generator=generator), "rejected_ids": torch.randint(2, 50, (4, 6), generator=generator),
        "pixels": torch.randint(0, 256, (4, 192), dtype=torch.uint8, generator=generator), "human_label": torch.full((4, 1), float("nan")),
    }
    targets = TeacherTargets(chosen_rewards=torch.tensor([3.0, -1.0, 2.0, 0.0]), rejected_rewards=torch.tensor([-2.0, 1.0, -3.0, 1.0]))

    def snapshot(prefix: str) -> list[torch.Tensor]:
        return [p.detach().clone() for n, p in trained.named_parameters() if n.startswith(prefix)]

    start_text, start_vision = snapshot("model.text."), snapshot("model.vision.")
    for _ in range(2):
        runner.step([(batch, targets)])
    assert all(torch.equal(a, b) for a, b in zip(snapshot("model.text."), start_text))
    assert not all(torch.equal(a, b) for a, b in zip(snapshot("model.vision."), start_vision))
    runner.step([(batch, targets)])
    assert not all(torch.equal(a, b) for a, b in zip(snapshot("model.text."), start_text))


def test_a_warm_start_as_long_as_the_training_or_a_trial_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"student.vision.warm_start_steps: must be below distill.train.max_steps \(8\)"):
        load_config(REPO / "configs" / "reward_tiny.yaml", ["student.vision.warm_start_steps=8"])
    # The recipe searches warm starts of 0 and 300 steps: trials of 200 steps could not learn the text.
    with pytest.raises(ConfigError, match=r"student.vision.warm_start_steps: must be below tune.max_steps \(200\)"):
        load_config(REPO / "configs" / "reward_multimodal.yaml", ["tune.max_steps=200"])
    load_config(REPO / "configs" / "reward_multimodal.yaml", ["tune.max_steps=400"])


# --------------------------------------------------------------------------------------- eval
def test_preference_scores_against_teacher_and_human_labels():
    teacher = {"chosen": np.array([1.0, 0.0, 2.0, 0.0]), "rejected": np.array([0.0, 1.0, 0.0, 3.0])}
    model = {"chosen": np.array([2.0, 1.0, 1.0, -1.0]), "rejected": np.array([0.0, 0.0, 0.0, 0.0])}
    labels = np.array([1.0, 1.0, np.nan, 0.5])  # pair 3 unlabelled, pair 4 a tie: both left out
    scores = preference_scores(model, teacher, labels)
    assert scores["pairwise_accuracy_teacher"] == 0.75  # pairs 1, 3 and 4 agree with the teacher
    assert scores["pairwise_accuracy_human"] == 1.0 and scores["labeled_pairs"] == 2
    itself = preference_scores(teacher, teacher, labels)
    assert itself["spearman_teacher"] == pytest.approx(1.0) and itself["preference_kl_to_teacher"] == pytest.approx(0.0, abs=1e-7)
    assert "pairwise_accuracy_human" not in preference_scores(model, teacher, np.full(4, np.nan))


def test_validation_metrics_are_the_kl_and_the_agreement_with_the_teacher_eval_measures():
    """A trial's `val_agreement` counts as eval's `pairwise_accuracy_teacher` does (a side is
    preferred when its margin is > 0), from the same student scores as its `val_loss`."""
    from types import SimpleNamespace

    from kd_core.tasks.reward import Reward

    class FirstToken(torch.nn.Module):  # a response's reward: its first token id, minus 10 with the image's first pixel set
        def forward(self, input_ids, pixel_values):
            return input_ids[:, 0].float() - 10.0 * pixel_values[:, 0].float()

    chosen = np.array([5, 3, 4, 2, 7, 6, 9])  # student margins: 2, -1, 0 (tie), 1, 2, -2, 3
    rejected = np.array([3, 4, 4, 1, 5, 8, 6])
    pixels = np.zeros((7, 12), dtype=np.uint8)
    pixels[6, 0] = 1  # shifts both responses of the last pair alike: its margin stays 3
    teacher_chosen = np.array([1.0, 0.0, 0.0, 0.5, -1.0, 0.0, 2.0], dtype=np.float32)  # margins: 1, -2, -1, 0 (tie), -3, -1, 0.5
    teacher_rejected = np.array([0.0, 2.0, 1.0, 0.5, 2.0, 1.0, 1.5], dtype=np.float32)
    pad = np.zeros((7, 3), dtype=np.int64)
    rows = {
        "chosen_ids": np.concatenate([chosen[:, None], pad], 1), "rejected_ids": np.concatenate([rejected[:, None], pad], 1),
        "pixels": pixels, "teacher_chosen": teacher_chosen[:, None], "teacher_rejected": teacher_rejected[:, None],
    }
    metrics = Reward().validation_metrics(FirstToken(), rows, 3, SimpleNamespace(prep_details={"pad_id": 0}), "cpu")
    assert set(metrics) == set(Reward.validation_modes) == {"val_loss", "val_agreement"}

    margin, teacher_margin = (chosen - rejected).astype(np.float64), (teacher_chosen - teacher_rejected).astype(np.float64)
    agreement = np.mean((margin > 0) == (teacher_margin > 0))
    assert agreement == 5 / 7  # pairs 1, 2, 3 (a student tie: no preference for chosen, as the teacher), 6, 7; not 4 (a teacher tie), 5
    assert metrics["val_agreement"] == pytest.approx(agreement, abs=1e-12)
    teacher_p = 1 / (1 + np.exp(-teacher_margin))

    def log_sigmoid(x):
        return -np.log1p(np.exp(-x))

    kl = teacher_p * (log_sigmoid(teacher_margin) - log_sigmoid(margin)) + (1 - teacher_p) * (log_sigmoid(-teacher_margin) - log_sigmoid(-margin))
    assert metrics["val_loss"] == pytest.approx(kl.mean(), rel=1e-5)
    scores = preference_scores(
        {"chosen": chosen.astype(np.float32), "rejected": rejected.astype(np.float32)},
        {"chosen": teacher_chosen, "rejected": teacher_rejected}, np.full(7, np.nan),
    )
    assert metrics["val_agreement"] == scores["pairwise_accuracy_teacher"]
    assert metrics["val_loss"] == pytest.approx(scores["preference_kl_to_teacher"], rel=1e-6)


def test_preference_calibration_of_confident_wrong_and_right_models():
    always_right = preference_calibration(np.array([20.0, -20.0]), np.array([True, False]))
    assert always_right["ece"] == pytest.approx(0.0, abs=1e-6)
    always_wrong = preference_calibration(np.array([20.0, -20.0]), np.array([False, True]))
    assert always_wrong["ece"] == pytest.approx(1.0, abs=1e-6)
    coin = preference_calibration(np.zeros(4), np.array([True, False, True, False]))  # p = 0.5: confidence 0.5, right half the time
    assert coin["ece"] == pytest.approx(0.0, abs=1e-9) and coin["calibration"]["count"][0] == 4


# ------------------------------------------------------------------------------------- config
def test_reward_config_rules_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.gates\[0\]: 'perplexity' is not a reward metric"):
        reward_job(tmp_path, **{"eval.gates": ["student.perplexity < 10"]})
    with pytest.raises(ConfigError, match=r"data.source: task reward reads preferences or digit-preferences"):
        reward_job(tmp_path, **{"data.source": "python-docs"})
    with pytest.raises(ConfigError, match=r"registry.primary_metric: 'perplexity' is not a reward metric"):
        reward_job(tmp_path, **{"registry.primary_metric": "student.perplexity"})
    with pytest.raises(ConfigError, match=r"student.vision.patch_size: must divide data.preferences.image_size"):
        validate_config({"task": "reward", "data": {"source": "digit-preferences", "preferences": {"image_size": 10}},
                         "student": {"vision": {"patch_size": 4}}, "registry": {"primary_metric": "pairwise_accuracy_human"}})
    with pytest.raises(ConfigError, match=r"data.source: task causal_lm reads python-docs or files"):
        validate_config({"data": {"source": "digit-preferences"}})
    assert reward_job(tmp_path, **{"eval.gates": ["pairwise_accuracy_human > baseline.pairwise_accuracy_human"]}).registry.maximize


# --------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_reward_recipe_tiny_end_to_end_registers_under_gates(tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    from kd_core.cli import print_summary

    config = load_config(
        REPO / "configs" / "reward_tiny.yaml",
        [f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}"],
    )
    steps = run_pipeline(config)
    assert list(steps) == ["prep", "teacher", "cache", "distill", "baseline", "eval", "register"]
    prep = steps["prep"]
    assert prep.metrics["images"] == 1797 and prep.metrics["labeled_pairs"] > 0
    cached = {split: sum(s["rows"] for s in steps["cache"].details["shards"] if s["split"] == split) for split in ("train", "val")}
    assert cached == {split: prep.details["splits"][split]["rows"] for split in cached}
    assert steps["cache"].details["layout"]["format"] == "reward"
    metrics = steps["eval"].metrics
    assert metrics["task"] == "reward" and metrics["rows"] == min(config.eval.max_rows, prep.details["splits"]["test"]["rows"])
    assert metrics["teacher"]["pairwise_accuracy_teacher"] == 1.0
    for name in ("student", "baseline"):
        assert 0 <= metrics[name]["pairwise_accuracy_human"] <= 1 and -1 <= metrics[name]["spearman_teacher"] <= 1
        assert metrics[name]["parameters"] == metrics["student"]["parameters"] and metrics[name]["pairs_per_s"] > 0
    assert [gate["gate"] for gate in metrics["gates"]] == config.eval.gates
    assert metrics["gates_passed"] == all(gate["passed"] for gate in metrics["gates"])
    assert {"rewards.json", "report.html", "metrics.json", "training_curves.png"} <= set(steps["eval"].outputs)
    history = [json.loads(line) for line in (tmp_path / "store" / steps["distill"].folder / "history.jsonl").read_text().splitlines()]
    assert {"loss", "pairwise", "bt"} <= set(history[-1])
    report = (tmp_path / "store" / steps["eval"].folder / "report.html").read_text()
    assert "preference pairs" in report and "Rewards against the teacher" in report

    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    version = client.get_model_version_by_alias(config.registry.model_name, "challenger")
    assert version.tags["kdflow.gates_passed"] == str(metrics["gates_passed"]).lower()
    champion = steps["register"].details["champion"]
    assert (champion is not None) == metrics["gates_passed"]
    import mlflow  # the registered pyfunc holds the student's Hugging Face directory as its artifact `student`

    registered_dir = mlflow.artifacts.download_artifacts(f"models:/{config.registry.model_name}/{version.version}", dst_path=str(tmp_path / "download"))
    model_dir = Path(registered_dir) / "artifacts" / "student"
    registered = load_reward_model(model_dir)
    pixels = torch.zeros((1, 8 * 8 * 3), dtype=torch.uint8)
    assert torch.isfinite(registered(input_ids=torch.tensor([[5, 6, 7]]), pixel_values=pixels)).all()

    # The same teacher as an existing Hugging Face reward model (`teacher.path`): the same rewards.
    external = load_config(
        REPO / "configs" / "reward_tiny.yaml",
        [f"storage.root={tmp_path / 'store2'}", f"teacher.path={tmp_path / 'store' / steps['teacher'].details['model_folder']}"],
    )
    again = run_pipeline(external, until="cache")
    assert again["teacher"].details["external_url"] and again["cache"].key != steps["cache"].key
    for first, second in zip(cache_rewards(config, steps["cache"]), cache_rewards(external, again["cache"])):
        np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-5)

    print_summary(steps, 1.0)
    printed = " ".join(capsys.readouterr().out.split())  # the tables wrap in a narrow terminal; captions wrap at spaces
    assert re.search(r"the distilled student (beats|does not beat) the human-labels-only model by [+-]\d+\.\d points", printed)
    assert "preference pairs" in printed

    # The cache also holds the teacher's rewards of the validation pairs (what tune trials validate
    # against): the same as the teacher scoring those pairs here.
    store = Store(config.storage)
    teacher_model = load_reward_model(tmp_path / "store" / steps["teacher"].details["model_folder"])
    expected = score_pairs(teacher_model, load_pairs(store, prep, "val"), 64, prep.details["pad_id"], "cpu", text_view=True)
    val_rewards = read_columns(store, cache_shards(steps["cache"], "val"))
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(val_rewards[f"teacher_{side}"][:, 0], expected[side], rtol=1e-5, atol=1e-5)

    # kdflow tune on the same prep and cache: a Ray Tune trial (Ray Train workers) of the reward
    # student, reporting its preference KL to the teacher and its agreement with the teacher on the
    # validation pairs, searching on the agreement (choosing the best of several trials is the
    # language-model search's test, tests/test_kubeflow.py, and tests/test_tune.py's). The store's
    # root is relative, as in the shipped configs: the trials run in folders of Ray's choosing.
    monkeypatch.chdir(tmp_path)
    searched = load_config(REPO / "configs" / "reward_tiny.yaml", [
        "storage.root=store", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}",
        "tune.num_trials=1", "tune.max_steps=4", "tune.eval_every=2", "tune.val_rows=48", "tune.metric=val_agreement",
        "tune.space={distill.reward.pairwise_weight: {kind: uniform, low: 0.5, high: 2.0}, distill.train.learning_rate: {kind: loguniform, low: 0.001, high: 0.03}}",
    ])
    searched_steps = search_steps(searched)
    assert all(searched_steps[name].key == steps[name].key for name in ("prep", "teacher", "cache")), "the search reuses them"
    search = searched_steps["tune"]
    assert search.metrics["trials"] == 1 and search.metrics["errored"] == 0 and "best_val_perplexity" not in search.metrics
    trials = json.loads(store.read_bytes(search.output(TRIALS_NAME).path))
    for trial in trials:
        assert [step for step, _ in trial["reports"]] == [2, 4]
        assert all(0 < kl < 5 for _, kl in trial["reports"]), trial["reports"]
        assert trial["metric_reports"]["val_loss"] == trial["reports"]
        assert [step for step, _ in trial["metric_reports"]["val_agreement"]] == [2, 4]
        assert all(share * 48 == round(share * 48) and 0 <= share <= 1 for _, share in trial["metric_reports"]["val_agreement"])
        assert trial["metrics"] == {"val_loss": trial["val_loss"], "val_agreement": trial["metric_reports"]["val_agreement"][-1][1]}
        assert 0.5 <= trial["params"]["distill.reward.pairwise_weight"] <= 2.0
    assert search.metrics["best_val_agreement"] == max(trial["metrics"]["val_agreement"] for trial in trials)
    assert search.metrics["best_val_loss"] == trials[0]["val_loss"] and search.details["metric"] == "val_agreement"
    print_summary(searched_steps, 1.0)
    assert f"best val_agreement {search.metrics['best_val_agreement']:.4g}" in " ".join(capsys.readouterr().out.split())
    from kd_core.kubeflow.job import job_json
    from kd_core.kubeflow.steps import tune_outputs
    from kd_core.manifest import manifest_url

    _, scalars, page = tune_outputs(job_json(searched), manifest_url(Store(searched.storage), search))
    assert scalars["best_val_agreement"] == search.metrics["best_val_agreement"]
    assert "ranked by val_agreement" in page and "<th>val_loss</th><th>val_agreement</th>" in page
    best = best_job(searched, search)
    assert best.distill.reward.pairwise_weight == search.details["best_params"]["distill.reward.pairwise_weight"]

    # A reward cache without validation rewards (made before kdflow cached them) is refused up front.
    stale = replace(steps["cache"], details={**steps["cache"].details, "shards": [
        shard for shard in steps["cache"].details["shards"] if shard["split"] == "train"
    ]})
    with pytest.raises(ManifestError, match=r"no teacher targets of the validation split.*--force cache"):
        tune(searched, prep, stale, store, force=True)


def test_the_reward_job_compiles_to_the_same_kubeflow_dag(tmp_path):
    """On a cluster the reward job runs through the same DAG and components as a language model."""
    import yaml

    from pipelines import engines

    config = load_config(REPO / "configs" / "reward_multimodal.yaml")
    spec, *_platform = yaml.safe_load_all(engines.compile_pipeline(config, tmp_path / "reward.yaml", "distill").read_text())
    job = json.loads(spec["root"]["inputDefinitions"]["parameters"]["job"]["defaultValue"])
    assert job["task"] == "reward" and job["data"]["source"] == "digit-preferences"
    assert set(spec["root"]["dag"]["tasks"]) >= {"prep", "cache", "distill", "evaluate"}
