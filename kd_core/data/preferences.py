"""Prep for reward models (`task: reward`): preference records with images -> tokenizer and pair shards.

Input: JSONL files of preference records (`data.preferences` names the fields):

    {"prompt": "...", "chosen": "...", "rejected": "...", "image": "images/0001.png",
     "image_text": "a text rendering of the image", "human_label": 1.0}

A record is input, and so is its `image`: a path relative to the JSONL file's folder that stays
inside it (no absolute path, no `..`, and on local disk no symbolic link out of it), or a URL
whose scheme is in `data.preferences.allowed_schemes` (none by default). The `storage.s3` settings
reach `s3://` URLs only. An image file is read up to `max_image_bytes`, and decoding keeps to
PIL's pixel limit (its decompression-bomb warning is an error). Every record and every image is
checked before any shard is written: a broken record, a bad label, a refused reference or a
missing, oversized or unreadable image raises `DataSourceError` naming the file and line.

Steps:
1. read and check the records (source `preferences`), or first write the bundled digit data to the
   store (`digit-preferences`, kd_core/data/digits.py);
2. split by image (seeded), so no held-out image was seen in training under another question;
3. train a byte-level BPE tokenizer on the training texts (or load `data.tokenizer`);
4. encode two views of every pair: the student's (`prompt ⏎ response`, plus the image as
   image_size² RGB pixels) and the teacher's (`image_text ⏎ prompt ⏎ response`, text only), each
   padded to `seq_len` tokens or cut to its last `seq_len` (the response is at the end);
5. write each split as Arrow shards of `rows_per_shard` pairs, then the manifest.

Shard columns (one row per pair): `chosen_ids`, `rejected_ids` (student view) and
`text_chosen_ids`, `text_rejected_ids` (teacher view), int32 × seq_len, right-padded with the pad
id; `pixels`, uint8 × image_size²·3 (H, W, RGB); `human_label`, float32 × 1 (NaN: no label).
"""

from __future__ import annotations

import io
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from kd_core.config import DataConfig, PreferenceConfig, StorageConfig
from kd_core.data.shards import SPLITS, write_shards
from kd_core.data.sources import DataSourceError, matching_files
from kd_core.data.tokenizer import load_tokenizer, save_hf_tokenizer, train_tokenizer
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import StorageError, Store, inside, relative_name, url_to_fs


@dataclass
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    image_url: str
    image_text: str
    human_label: float | None
    source: str
    """`file:line`, for error messages."""


def prepare_preferences(config: DataConfig, store: Store, run: StageRun) -> tuple[dict, dict]:
    """Prep's work for preference data (`task: reward`) into `run`'s folder: (metrics, details)."""
    with run.timed("collect"):
        urls = _source_urls(config, store)
        records = list(read_preference_records(urls, config.preferences, store.config))
        if not records:
            raise DataSourceError(f"data.files: {', '.join(urls)} hold no preference records")
        images = load_images(records, config.preferences.image_size, store.config, config.preferences.max_image_bytes)
        splits = split_by_image(records, config.val_fraction, config.test_fraction, config.seed)
    with run.timed("tokenizer"):
        if config.tokenizer:
            prepared = load_tokenizer(config.tokenizer, store.config, separates_documents=False)
        else:
            texts = [text for record in splits["train"] for text in (record.prompt, record.chosen, record.rejected, record.image_text)]
            prepared = train_tokenizer(texts, config.vocab_size)
        save_hf_tokenizer(prepared, run)
    tokenizer, special_ids = prepared.tokenizer, prepared.ids()
    pad_id = special_ids["pad"]
    details: dict = {
        "seq_len": config.seq_len,
        "vocab_size": tokenizer.get_vocab_size(),
        "pad_id": pad_id,
        "special_token_ids": special_ids,
        "image_size": config.preferences.image_size,
        "splits": {},
    }
    truncated = 0
    with run.timed("encode"), progress_bar("prep: encode pairs", total=len(records)) as bar:
        for split in SPLITS:
            columns, cut = encode_pairs(tokenizer, splits[split], images, config.seq_len, pad_id)
            truncated += cut
            details["splits"][split] = _write_split(run, split, columns, config.rows_per_shard, pad_id)
            bar.advance(len(splits[split]))
    metrics = {
        "pairs": len(records),
        "images": len(images),
        "labeled_pairs": sum(record.human_label is not None for record in records),
        "truncated_responses": truncated,
        **{f"{split}_pairs": details["splits"][split]["rows"] for split in SPLITS},
        **{f"{split}_labeled": details["splits"][split]["labeled"] for split in SPLITS},
        **{f"{split}_tokens": details["splits"][split]["tokens"] for split in SPLITS},
    }
    return metrics, details


def _source_urls(config: DataConfig, store: Store) -> list[str]:
    if config.source == "digit-preferences":
        from kd_core.data.digits import digit_preferences_url

        return [digit_preferences_url(store, config.preferences, config.seed)]
    urls = []
    for pattern in config.files:
        fs, matches = matching_files(pattern, store.config)
        if not fs.exists(matches[0]):
            raise DataSourceError(f"data.files: {pattern!r} matches no file")
        urls.extend(fs.unstrip_protocol(path) for path in matches)
    return urls


def read_preference_records(urls: list[str], config: PreferenceConfig, storage: StorageConfig):
    """Every record of the JSONL files, checked; errors name `file:line` and the field."""
    for url in urls:
        if not url.endswith((".jsonl", ".json")):
            raise DataSourceError(f"{url}: preference records must be JSONL (.jsonl)")
        fs, path = url_to_fs(url, storage)
        folder = ImageFolder(url.rsplit("/", 1)[0], Path(path).parent if isinstance(fs, LocalFileSystem) else None)
        for line_number, line in enumerate(fs.cat_file(path).decode("utf-8").splitlines(), start=1):
            if line.strip():
                yield _parse_record(line, f"{url}:{line_number}", folder, config)


@dataclass(frozen=True)
class ImageFolder:
    """Where a JSONL file's relative image paths point: its folder's URL, and its local path when
    it is on this machine's disk (where symbolic links are resolved before the containment check)."""

    url: str
    local: Path | None


def image_url(image: str, where: str, folder: ImageFolder, allowed_schemes: list[str]) -> str:
    """The URL of a record's image reference, refused (naming `where`) unless it is a path inside
    the JSONL file's folder or a URL of an allowed scheme."""
    if "://" in image or "::" in image:
        scheme = image.split("://", 1)[0].lower()
        if "::" in image or scheme not in allowed_schemes:
            allowed = ", ".join(allowed_schemes) or "none"
            raise DataSourceError(
                f"{where}: image: {image!r} has URL scheme {scheme!r}, not in data.preferences.allowed_schemes ({allowed}); "
                "give a path relative to the JSONL file, or add the scheme to data.preferences.allowed_schemes"
            )
        return image
    fix = "give a path relative to the JSONL file's folder, inside it (or a URL of a scheme in data.preferences.allowed_schemes)"
    try:
        if folder.local is not None:
            inside(folder.local, image, f"{where}: image", fix)
        else:
            relative_name(image, f"{where}: image", fix)
    except StorageError as err:
        raise DataSourceError(str(err)) from None
    return f"{folder.url}/{image}"


def _parse_record(line: str, where: str, folder: ImageFolder, config: PreferenceConfig) -> PreferenceRecord:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{where}: not valid JSON ({err.msg}); fix or remove the line") from None
    if not isinstance(raw, dict):
        raise DataSourceError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    texts = {}
    for field in (config.prompt_field, config.chosen_field, config.rejected_field, config.image_field, config.image_text_field):
        value = raw.get(field)
        if not isinstance(value, str) or not value.strip():
            raise DataSourceError(f"{where}: field {field!r} must be a non-empty string, got {json.dumps(value)[:60]}")
        texts[field] = value
    label = raw.get(config.label_field)
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 1 or math.isnan(label):
            raise DataSourceError(
                f"{where}: field {config.label_field!r} must be a number in [0, 1] (1 = chosen preferred) or null, got {json.dumps(label)}"
            )
        label = float(label)
    return PreferenceRecord(
        prompt=texts[config.prompt_field], chosen=texts[config.chosen_field], rejected=texts[config.rejected_field],
        image_url=image_url(texts[config.image_field], where, folder, config.allowed_schemes),
        image_text=texts[config.image_text_field], human_label=label, source=where,
    )


def load_images(records: list[PreferenceRecord], size: int, storage: StorageConfig, max_bytes: int) -> dict[str, np.ndarray]:
    """image URL -> (size·size·3,) uint8 RGB, each image read (at most `max_bytes`) and resized once."""
    from PIL import Image, UnidentifiedImageError

    images: dict[str, np.ndarray] = {}
    wanted = {record.image_url: record.source for record in records}
    with progress_bar("prep: images", total=len(wanted)) as bar:
        for url, where in wanted.items():
            fs, path = url_to_fs(url, storage)
            try:
                with fs.open(path, "rb") as handle:
                    data = handle.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise DataSourceError(
                        f"{where}: image {url} is larger than data.preferences.max_image_bytes ({max_bytes} bytes); "
                        "shrink the image or raise the limit"
                    )
                images[url] = decode_image(data, size)
            except FileNotFoundError:
                raise DataSourceError(f"{where}: image {url} does not exist; fix the record's image reference or add the file") from None
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
                raise DataSourceError(f"{where}: image {url} has too many pixels to decode safely ({err}); shrink the image") from None
            except (UnidentifiedImageError, OSError) as err:
                raise DataSourceError(f"{where}: image {url} is not a readable image ({err})") from None
            bar.advance()
    return images


def decode_image(data: bytes, size: int) -> np.ndarray:
    """(size·size·3,) uint8 RGB of an encoded image (PNG, JPEG, ...), resized bicubic: the pixels
    a multimodal student reads (prep, and the registered model's pyfunc). An image past PIL's
    pixel limit raises (`DecompressionBombWarning` is an error here, not a line in a log)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).reshape(-1)


def split_by_image(records: list[PreferenceRecord], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list]:
    """Held-out splits by image (every pair about one image lands in one split), seeded."""
    images = sorted({record.image_url for record in records})
    random.Random(seed).shuffle(images)
    if len(images) < 3:
        raise DataSourceError(f"data: found {len(images)} distinct images; need at least 3 (one per split)")
    n_val = max(1, round(len(images) * val_fraction))
    n_test = max(1, round(len(images) * test_fraction))
    split_of = {url: "val" for url in images[:n_val]} | {url: "test" for url in images[n_val : n_val + n_test]}
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for record in records:
        splits[split_of.get(record.image_url, "train")].append(record)
    random.Random(seed + 1).shuffle(splits["train"])  # every shard a uniform sample of the pairs
    return splits


def student_text(prompt: str, response: str) -> str:
    """The text a multimodal student reads for one response (the image comes beside it)."""
    return f"{prompt}\n{response}"


def encode_texts(tokenizer, texts: list[str], seq_len: int, pad_id: int) -> tuple[np.ndarray, int]:
    """(len(texts), seq_len) int32 ids, right-padded, each cut to its last `seq_len` tokens (the
    response the reward is about is at the end), and how many were cut."""
    out = np.full((len(texts), seq_len), pad_id, dtype=np.int32)
    cut = 0
    for row, encoding in enumerate(tokenizer.encode_batch(texts)):
        tokens = encoding.ids[-seq_len:]
        cut += len(encoding.ids) > seq_len
        out[row, : len(tokens)] = tokens
    return out, cut


def encode_pairs(tokenizer, records: list[PreferenceRecord], images: dict[str, np.ndarray], seq_len: int, pad_id: int):
    """The shard columns of `records` (see the module docstring) and how many responses were cut."""
    columns, truncated = {}, 0
    for name, text_of in (
        ("chosen_ids", lambda r: student_text(r.prompt, r.chosen)),
        ("rejected_ids", lambda r: student_text(r.prompt, r.rejected)),
        ("text_chosen_ids", lambda r: f"{r.image_text}\n{r.prompt}\n{r.chosen}"),
        ("text_rejected_ids", lambda r: f"{r.image_text}\n{r.prompt}\n{r.rejected}"),
    ):
        columns[name], cut = encode_texts(tokenizer, [text_of(record) for record in records], seq_len, pad_id)
        truncated += cut
    width = len(next(iter(images.values())))
    columns["pixels"] = np.stack([images[record.image_url] for record in records]) if records else np.zeros((0, width), np.uint8)
    labels = [np.nan if record.human_label is None else record.human_label for record in records]
    columns["human_label"] = np.asarray(labels, dtype=np.float32).reshape(-1, 1)
    return columns, truncated


def _write_split(run: StageRun, split: str, columns: dict[str, np.ndarray], rows_per_shard: int, pad_id: int) -> dict:
    rows = len(columns["pixels"])
    names = write_shards(run, split, columns, rows_per_shard)
    tokens = int((columns["chosen_ids"] != pad_id).sum() + (columns["rejected_ids"] != pad_id).sum())
    labeled = int(np.isfinite(columns["human_label"]).sum())
    return {"shards": names, "rows": rows, "tokens": tokens, "labeled": labeled}
