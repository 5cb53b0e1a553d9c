"""A user's own data and teacher: which files become which documents, what a changed file or
teacher does to the step keys, tokenizers kdflow did not train (Llama- and GPT-2-style), data on
a real S3 API with a local store, and the one-line errors for bad input.

The teachers are saved here with transformers (random weights, tiny); the S3 API is moto's
server on loopback. Run: .venv/bin/python -m pytest tests/test_own_data.py
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_core.config import DataConfig, StorageConfig
from kd_core.job import load_config
from kd_core.stages.prep import prep
from kd_core.data.shards import load_split
from kd_core.data.sources import DataSourceError, split_long, split_stream
from kd_core.devtools import migrated_sqlite_uri
from kd_core.storage import Store, StorageError
from hf_models import style_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "teacher student distill cache shard token layer model python data loss batch step".split()


def paragraphs(count: int, seed: int, prefix: str = "doc") -> list[str]:
    rng = random.Random(seed)
    return [f"{prefix}{i} " + " ".join(rng.choice(WORDS) for _ in range(30)) for i in range(count)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def files_config(files, **changes) -> DataConfig:
    return DataConfig(**{"source": "files", "files": [str(f) for f in files], "vocab_size": 300, "seq_len": 16, "rows_per_shard": 8, **changes})


@pytest.fixture
def store(tmp_path):
    return Store(StorageConfig(root=str(tmp_path / "store")))


# ------------------------------------------------------------------------------ changed data is seen
def test_an_edited_or_added_file_redoes_prep_and_an_unchanged_corpus_is_reused(tmp_path, store):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    first = write_jsonl(corpus / "a.jsonl", paragraphs(20, 0))
    config = files_config([corpus / "*.jsonl"])
    original = prep(config, store)
    assert prep(config, store).reused

    write_jsonl(first, paragraphs(20, 1))  # same name, new content
    edited = prep(config, store)
    assert not edited.reused and edited.key != original.key

    write_jsonl(corpus / "b.jsonl", paragraphs(10, 2, prefix="extra"))
    added = prep(config, store)
    assert not added.reused and added.key != edited.key and added.metrics["documents"] == 30 and added.metrics["files"] == 2


def test_a_refreshed_bucket_is_seen_with_data_on_s3_and_a_local_store(tmp_path, s3_endpoint, s3_bucket, store):
    import s3fs

    s3 = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    s3.pipe(f"{s3_bucket}/corpus/a.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in paragraphs(20, 0)).encode())
    # The store is a local folder: the data's s3:// URLs still get storage.s3 (else kdflow would go to AWS).
    local_store = Store(StorageConfig(root=str(tmp_path / "local"), s3={"endpoint_url": s3_endpoint}))
    config = files_config([f"s3://{s3_bucket}/corpus/*.jsonl"])
    original = prep(config, local_store)
    assert original.metrics["documents"] == 20
    assert prep(config, local_store).reused

    s3.pipe(f"{s3_bucket}/corpus/b.jsonl", json.dumps({"text": "a new record " * 20}).encode() + b"\n")
    refreshed = prep(config, local_store)
    assert not refreshed.reused and refreshed.metrics["documents"] == 21


def test_a_teachers_config_and_tokenizer_are_part_of_its_identity_and_local_weights_are_hashed_once(tmp_path, store, monkeypatch):
    from kd_core.storage import content_identity
    from kd_core.stages.teacher import teacher

    monkeypatch.setenv("KDFLOW_CACHE", str(tmp_path / "kdflow-cache"))
    folder = save_teacher(tmp_path / "teacher", "gpt2")
    prepared = prep(files_config([write_jsonl(tmp_path / "d.jsonl", paragraphs(30, 0))], tokenizer=str(folder)), store)
    from kd_core.config import ComputeConfig, TeacherConfig

    def teacher_key():
        return teacher(TeacherConfig(path=str(folder)), prepared, store, ComputeConfig(backend="local")).key

    key = teacher_key()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attn_pdrop": 0.5}))
    assert teacher_key() != key

    weights = folder / "model.safetensors"
    import fsspec

    fs = fsspec.filesystem("file")
    identity = content_identity(fs, str(weights))
    assert list((tmp_path / "kdflow-cache" / "hashes").iterdir())  # the hash was kept by size and mtime
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size; the modification time put back: the kept hash is used, the bytes not read
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_identity(fs, str(weights)) == identity
    (kept,) = [path for path in (tmp_path / "kdflow-cache" / "hashes").iterdir() if f"sha256:{path.read_text()}" == identity]
    kept.write_text(identity.removeprefix("sha256:")[:40])  # cut short (a full disk): not trusted, the bytes hashed again
    rehashed = content_identity(fs, str(weights))
    assert rehashed != identity and len(rehashed) == len(identity) and f"sha256:{kept.read_text()}" == rehashed
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert content_identity(fs, str(weights)) != identity


# ---------------------------------------------------------------------------- only text is trained on
def test_null_and_empty_values_are_skipped_and_counted(tmp_path, store):
    path = tmp_path / "d.jsonl"
    records = [{"text": t} for t in paragraphs(12, 0)] + [{"text": None}, {"text": ""}, {"text": "   "}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    pq.write_table(pa.table({"text": pa.array([*paragraphs(5, 1, "pq"), None], pa.string())}), tmp_path / "e.parquet")
    manifest = prep(files_config([path, tmp_path / "e.parquet"]), store)
    assert manifest.metrics["documents"] == 17 and manifest.metrics["skipped_empty"] == 4


@pytest.mark.parametrize(
    "value, shown", [(42, "int 42"), (["a", "b"], 'list ["a", "b"]'), ({"nested": "x"}, 'dict {"nested": "x"}'), (True, "bool true")]
)
def test_a_value_that_is_not_a_string_names_file_and_line(tmp_path, store, value, shown):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine text"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(DataSourceError, match=re.escape(f"d.jsonl:2: field 'text' (data.text_field) holds {shown}; expected a string")):
        prep(files_config([path]), store)


def test_parquet_numbers_corrupt_parquet_and_json_arrays_are_named(tmp_path, store):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataSourceError, match=r"ints.parquet: column 'text' \(data.text_field\) has type int64; expected strings"):
        prep(files_config([tmp_path / "ints.parquet"]), store)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataSourceError, match=r"broken.parquet: not a readable Parquet file"):
        prep(files_config([tmp_path / "broken.parquet"]), store)
    (tmp_path / "array.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    with pytest.raises(DataSourceError, match=r"array.json:1: a JSON array; JSON Lines expected"):
        prep(files_config([tmp_path / "array.json"]), store)


def test_text_that_is_not_utf8_is_named_and_a_bom_is_dropped(tmp_path, store):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin.txt:3: not UTF-8 text"):
        prep(files_config([latin]), store)
    records = tmp_path / "latin.jsonl"
    records.write_bytes(b'{"text": "ok"}\n' + json.dumps({"text": "caf\xe9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataSourceError, match=r"latin.jsonl:2: not UTF-8 text"):
        prep(files_config([records]), store)

    bom = write_jsonl(tmp_path / "bom.jsonl", paragraphs(12, 0))
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())  # as Windows editors save UTF-8
    assert prep(files_config([bom]), store).metrics["documents"] == 12


def test_folders_and_compressed_files_are_read(tmp_path, store):
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", paragraphs(6, 0, "plain"))
    with gzip.open(folder / "nested" / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps({"text": t}) + "\n" for t in paragraphs(6, 1, "zipped")))
    for beside in ("README", "README.md", ".hidden.txt", "dataset_info.json", "_SUCCESS"):  # what tools leave beside data
        (folder / beside).write_text('{"not": "data"}')
    manifest = prep(files_config([folder]), store)
    assert manifest.metrics["files"] == 2 and manifest.metrics["documents"] == 12

    (folder / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "cut short"}\n' * 50)[:-12])
    with pytest.raises(StorageError, match=r"data.files: .*broken.jsonl.gz: cannot be read \((EOFError|BadGzipFile)"):
        prep(files_config([folder]), store)


# ------------------------------------------------------------------------ no leaks into held-out data
def word_ngrams(store, manifest, split, n=12):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.local_path(f"{manifest.folder}/tokenizer"))
    words = tokenizer.decode(load_split(store, manifest, split).reshape(-1)).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_a_file_matched_twice_and_duplicate_documents_do_not_leak_into_the_test_split(tmp_path, store):
    rng = random.Random(0)
    texts = [f"record{i} " + " ".join(f"{rng.choice(WORDS)}{rng.randrange(1000)}" for _ in range(30)) for i in range(60)]
    write_jsonl(tmp_path / "a.jsonl", texts)
    write_jsonl(tmp_path / "copy.jsonl", texts[:20])  # the same records in a second file
    config = files_config([tmp_path / "*.jsonl", tmp_path / "a.jsonl"], val_fraction=0.2, test_fraction=0.2, vocab_size=2000)
    manifest = prep(config, store)
    assert manifest.metrics["files"] == 2  # a.jsonl, matched by both entries, is read once
    assert manifest.metrics["documents"] == 60 and manifest.metrics["duplicates_removed"] == 20
    test = word_ngrams(store, manifest, "test")
    assert test and not test & word_ngrams(store, manifest, "train")


# ------------------------------------------------------------------------------ prep scales linearly
def whole_text_pieces(text: str, limit: int) -> list[str]:
    """The reference cut (kdflow's before it streamed): the whole text in memory, blank-line
    paragraphs, a long paragraph cut by re-slicing what is left (quadratic in its length), the
    paragraphs gathered into pieces of at most `limit`. benchmarks/prep_throughput.py times it."""
    pieces, piece, size = [], [], 0
    for paragraph in text.split("\n\n"):
        parts = []
        while len(paragraph) > limit:
            cut = paragraph.rfind(" ", limit // 2, limit)
            cut = cut if cut > 0 else limit
            parts.append(paragraph[:cut])
            paragraph = paragraph[cut:]
        for part in [*parts, paragraph]:
            if piece and size + len(part) > limit:
                pieces.append("\n\n".join(piece))
                piece, size = [], 0
            piece.append(part)
            size += len(part) + 2
    return pieces + (["\n\n".join(piece)] if piece else [])


def test_streamed_splitting_gives_the_reference_pieces_wherever_the_chunks_break():
    rng = random.Random(0)
    text = "".join(rng.choice(["word ", "x" * 9, "\n", "\n\n", "\n\n\n", " "]) for _ in range(20_000))
    text += "y" * 1000 + " " + "z" * 700  # a long last paragraph, with and without spaces to cut at
    whole = whole_text_pieces(text, 300)
    assert list(split_long(text, limit=300)) == whole
    cuts = sorted(rng.sample(range(1, len(text)), 300))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert list(split_stream(chunks, limit=300)) == whole
    assert "".join(whole).replace("\n", "") == text.replace("\n", "") and max(map(len, whole)) <= 300
    # A paragraph exactly `limit` long whose blank line is split between two chunks.
    assert list(split_stream(["aaaaaaaaaa\n", "\ncc"], limit=10)) == whole_text_pieces("aaaaaaaaaa\n\ncc", 10) == ["aaaaaaaaaa", "cc"]
    for trial in range(200):  # short texts, every limit, chunks broken anywhere
        text = "".join(rng.choice(["ab ", "x" * 7, "\n", "\n\n", " ", "y" * 13]) for _ in range(rng.randrange(60)))
        limit = rng.randrange(2, 40)
        cuts = sorted(rng.sample(range(1, len(text)), min(10, len(text) - 1))) if len(text) > 1 else []
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert list(split_stream(chunks, limit)) == whole_text_pieces(text, limit), (text, limit, chunks)


# ----------------------------------------------------------------------------------- S3 errors
def test_s3_data_errors_name_the_url_and_what_to_set(tmp_path, s3_endpoint, monkeypatch):
    storage = {"root": str(tmp_path / "local"), "s3": {"endpoint_url": s3_endpoint}}
    with pytest.raises(StorageError, match=r"data.files: s3://no-such-bucket-kdflow/x/\*.jsonl: not found"):
        prep(files_config(["s3://no-such-bucket-kdflow/x/*.jsonl"]), Store(StorageConfig(**storage)))
    # One attempt each (storage.s3's retry settings; the defaults retry for about 12 s first).
    unreachable = {"root": str(tmp_path / "local"), "s3": {"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1, "retries": 1}}
    with pytest.raises(StorageError, match=r"s3://bucket/x.jsonl: the S3 endpoint does not answer.*storage.s3.endpoint_url"):
        prep(files_config(["s3://bucket/x.jsonl"]), Store(StorageConfig(**unreachable)))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # the instance above holds the credentials it found
    try:
        with pytest.raises(StorageError, match=r"s3://bucket/x.jsonl: no S3 credentials; set AWS_ACCESS_KEY_ID"):
            prep(files_config(["s3://bucket/x.jsonl"]), Store(StorageConfig(**storage)))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # nor may a later test get this one, without credentials


# ------------------------------------------------------------------------------------- file modes
def test_outputs_respect_the_umask(tmp_path):
    script = (
        "import os, sys; os.umask(int(sys.argv[2], 8));"
        "from kd_core.config import StorageConfig; from kd_core.storage import Store;"
        "Store(StorageConfig(root=sys.argv[1])).write_bytes('a/b.json', b'{}')"
    )
    for umask, mode in (("022", 0o644), ("027", 0o640)):
        root = tmp_path / umask
        subprocess.run([sys.executable, "-c", script, str(root), umask], check=True, cwd=REPO)
        assert (root / "a" / "b.json").stat().st_mode & 0o777 == mode


# ------------------------------------------------------------------------------ teachers and tokenizers
def save_teacher(folder, style: str, *, padded: int = 0, context: int = 64):
    """A tiny teacher saved with transformers: Llama with a Llama-style tokenizer, GPT-2 with a
    GPT-2-style one; `padded` extra output rows past the tokenizer (as many released models have)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = style_tokenizer(style, paragraphs(200, 7))
    vocab = len(tokenizer) + padded
    torch.manual_seed(0)
    if style == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, max_position_embeddings=context, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=context, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def teacher_job(tmp_path, teacher_folder, *overrides):
    write_jsonl(tmp_path / "own.jsonl", paragraphs(80, 3))
    return load_config(
        os.path.join(REPO, "configs", "tiny.yaml"),
        [
            f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}",
            "compute.backend=local", "data.source=files", f"data.files=[{tmp_path / 'own.jsonl'}]", f"teacher.path={teacher_folder}",
            "distill.baseline=false", "data.max_documents=null", *overrides,
        ],
    )


@pytest.mark.slow
@pytest.mark.parametrize("style, padded", [("llama", 0), ("gpt2", 64)])
def test_a_teacher_saved_with_transformers_teaches_with_its_own_tokenizer_and_the_registered_student_generates(tmp_path, style, padded):
    import mlflow
    import torch
    from transformers import AutoTokenizer

    from kd_core.pipeline import run_pipeline

    folder = save_teacher(tmp_path / "teacher", style, padded=padded)
    config = teacher_job(tmp_path, folder)
    assert config.data.tokenizer == str(folder)  # teacher.path alone: the teacher's own tokenizer
    steps = run_pipeline(config)
    teacher_tokenizer = AutoTokenizer.from_pretrained(folder)
    prepared = steps["prep"].details
    assert prepared["vocab_size"] == len(teacher_tokenizer)  # nothing added
    assert prepared["special_token_ids"]["eos"] == teacher_tokenizer.eos_token_id
    rows = load_split(Store(config.storage), steps["prep"], "train")
    assert rows.max() < len(teacher_tokenizer) and (rows == teacher_tokenizer.eos_token_id).any()  # documents end with the eos

    mlflow.set_tracking_uri(config.registry.tracking_uri)
    champion = mlflow.transformers.load_model(f"models:/{config.registry.model_name}@champion", return_type="components")
    tokenizer, model = champion["tokenizer"], champion["model"].eval()
    tokenizer.padding_side = "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id < model.config.vocab_size
    assert (model.config.eos_token_id, model.config.pad_token_id) == (teacher_tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch = tokenizer(["teacher student", "a much longer prompt about the data and the model"], return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt_length = batch["input_ids"].shape[1]
    assert generated.shape[0] == 2 and prompt_length < generated.shape[1] <= prompt_length + 4
    assert torch.equal(generated[:, :prompt_length], batch["input_ids"])


def test_a_teacher_with_a_short_context_or_a_too_large_top_k_is_a_named_error(tmp_path):
    from kd_core.cache.format import CacheSettingsError
    from kd_core.pipeline import run_pipeline
    from kd_core.models.teacher import TeacherError

    short = save_teacher(tmp_path / "short", "llama", context=16)
    with pytest.raises(TeacherError, match=r"data.seq_len: 32 tokens per row, but the teacher at .* reads at most 16"):
        run_pipeline(teacher_job(tmp_path, short), until="cache")
    folder = save_teacher(tmp_path / "teacher", "llama")
    with pytest.raises(CacheSettingsError, match=r"cache.top_k: 5000 is more than the vocabulary's \d+ tokens"):
        run_pipeline(teacher_job(tmp_path, folder, "cache.top_k=5000"), until="cache")


def test_a_split_without_a_full_row_is_a_named_error(tmp_path, store):
    path = write_jsonl(tmp_path / "d.jsonl", [f"w{i}" for i in range(20)])  # train: 16 documents, 2 rows; val: 2 documents
    with pytest.raises(DataSourceError, match=r"data: the val split holds no full row of data.seq_len=16 tokens \(2 documents"):
        prep(files_config([path], val_fraction=0.1, test_fraction=0.1), store)


def test_truncation_saved_in_a_teachers_tokenizer_does_not_cut_documents(tmp_path, store):
    tokenizer = style_tokenizer("gpt2", paragraphs(50, 0))
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    tokenizer.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["truncation"]["max_length"] == 4
    texts = paragraphs(30, 1)
    manifest = prep(files_config([write_jsonl(tmp_path / "d.jsonl", texts)], tokenizer=str(tmp_path / "tok")), store)
    tokens = sum(manifest.metrics[f"{split}_tokens"] for split in ("train", "val", "test"))
    assert tokens > 30 * 20  # thirty-word documents, not four tokens each


def test_a_tokenizer_that_names_a_token_it_lacks_is_refused_before_any_id_is_added(tmp_path, store):
    tokenizer = style_tokenizer("gpt2", paragraphs(50, 0))
    tokenizer.save_pretrained(tmp_path / "tok")
    settings = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": "<pad>"}))
    path = write_jsonl(tmp_path / "d.jsonl", paragraphs(30, 1))
    with pytest.raises(DataSourceError, match=r"data.tokenizer: .*tok: tokenizer_config.json / special_tokens_map.json name tokens that tokenizer.json lacks \(<pad>\)"):
        prep(files_config([path], tokenizer=str(tmp_path / "tok")), store)


@pytest.mark.parametrize(
    "override, message",
    [
        ("cache.hidden_layers=[7]", "error: cache.hidden_layers: 7 is not a hidden state of the teacher (0..1); pick layers in that range"),
        ("data.val_fraction=0.2", "error: data: the train split holds no full row of data.seq_len=32 tokens (3 documents"),
    ],
)
@pytest.mark.slow
def test_cache_and_split_checks_end_in_one_line_and_exit_2(tmp_path, override, message):
    folder = save_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": f"w{i}"}) + "\n" for i in range(5)))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"storage: {{root: {tmp_path / 'store'}}}\ndata: {{source: files, files: ['{tmp_path}/*.jsonl'], seq_len: 32}}\n"
        f"teacher: {{path: {folder}}}\ncache: {{top_k: 8}}\ncompute: {{backend: local}}\n"
    )
    write_jsonl(tmp_path / "own.jsonl", paragraphs(40, 3))
    if "val_fraction" in override:  # five one-word documents: no split fills a row
        (tmp_path / "own.jsonl").unlink()
    done = subprocess.run([sys.executable, "-m", "kd_core.cli", "cache", str(job), override], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "KDFLOW_QUIET": "1"}, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in done.stderr


def test_validate_check_inputs_probes_data_tokenizer_teacher_and_store(tmp_path, capsys, s3_endpoint):
    from kd_core.cli import main

    folder = save_teacher(tmp_path / "teacher", "gpt2")
    write_jsonl(tmp_path / "own.jsonl", paragraphs(40, 3))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"storage: {{root: {tmp_path / 'store'}}}\ndata: {{source: files, files: ['{tmp_path}/*.jsonl'], seq_len: 32}}\n"
        f"teacher: {{path: {folder}}}\nregistry: {{tracking_uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n"
    )
    assert main(["validate", "--check-inputs", str(job)]) == 0
    out = capsys.readouterr().out
    assert "data.files: 1 files" in out and "data.tokenizer:" in out and "teacher.path:" in out
    assert not (tmp_path / "store").exists()  # nothing was prepared

    cases = {
        "data.seq_len=100": "data.seq_len: 100 tokens per row, but the teacher at",
        f"teacher.path={tmp_path / 'missing'}": "data.tokenizer: ",
        f"data.files=[{tmp_path / 'nothing-*.jsonl'}]": "data.files: ",
        "storage.root=s3://kdflow-no-such-bucket/job": "storage.root: s3://kdflow-no-such-bucket/job: not found",
    }
    for override, message in cases.items():
        assert main(["validate", "--check-inputs", str(job), override, f"storage.s3.endpoint_url={s3_endpoint}"]) == 2, override
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (override, lines)
