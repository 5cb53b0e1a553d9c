"""Prep for chat and instruction data (`data.source: chat`): records -> conversations rendered
through the tokenizer's chat template -> rows with a loss mask over the assistant's tokens.

Records (JSON Lines, Parquet, or a Hugging Face `datasets` folder's Arrow files; field names in
`data.chat`) hold either `messages`, a list of {role, content} turns, or `prompt` and
`completion` (optionally `system`), which become a user turn and an assistant turn. Every record
is checked before anything is tokenized, and a bad one is an error naming `file:line`: a turn
that is not a {role, content} object, a role outside `data.chat.roles`, content that is not a
string, an empty assistant turn, a conversation without an assistant turn.

Rendering. A conversation is rendered by the tokenizer's chat template (`apply_chat_template`,
or `data.chat.template` in its place, which prep also saves into the prepared tokenizer so the
registered model chats with it) and tokenized as one text, without special tokens added (the
template writes its own). The assistant's part of the text is found by rendering prefixes: for
an assistant turn i, the conversation up to turn i with the generation prompt, and up to and
including turn i; the characters between the two are the assistant's turn as the template
writes it (its content and end-of-turn marker). A template that does not render a conversation
as the concatenation of its turns (one that rewrites earlier turns) is an error naming the
record: give one that does in `data.chat.template`.

The loss mask. Token j is trained on (`loss_mask[j] = 1`: position j − 1 learns to predict it)
when it starts inside an assistant span (`train_on: assistant`) or anywhere in the conversation
(`train_on: all`), except a conversation's first token, which nothing in its conversation
predicts. Padding is never trained on.

Rows. `layout: packed` puts several conversations into each row of `seq_len` tokens: each goes,
in order, into the open row with the least room that still holds it (best fit), else starts a
new row; what no conversation fills is padded. `padded` gives each conversation a row of its own. `position_ids` restart at 0 with every
conversation (and with the padding after it), which is how the model keeps attention within a
conversation: Hugging Face models treat a restart of the position ids in a row as the start of a
new sequence and mask attention across it (`transformers.masking_utils`,
`find_packed_sequence_indices`) when no KV cache is used, with the eager and SDPA kernels kdflow
runs (transformers' flash-attention path honours packing only for one row per batch). A conversation longer than `seq_len`
is cut to its first `seq_len` tokens (`overlong: truncate`) or left out (`drop`); both are
counted, and a cut conversation left with no trained token is dropped and counted too.

Splits. Conversations go into train / val / test like text documents: after a seeded shuffle,
`data.val_fraction` and `test_fraction` of them are held out. With `data.chat.split_field` set,
each record names its own split in that field instead (`train`, `val` or `test`; anything else,
or no value, is an error naming `file:line`), and each split must get a conversation. The
`exact-answers` source's records carry theirs in `split` (`chat_settings`). Exact duplicates are
dropped before splitting: the first in file order is kept, with its split.

Shards: `input_ids` (int32), `position_ids` (int32), `loss_mask` (uint8) and `tag_ids` (int16),
each (rows, seq_len), one set per split. A token's tag id is its conversation's tag (the record's
`data.chat.tag_field`, else its file's name) as an index into the prep manifest's
`details["tags"]`, -1 on padding: what `distill.route` sends to a teacher.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field

import numpy as np

from kd_core.config import ChatConfig, DataConfig
from kd_core.data.shards import SPLITS, split_documents, write_split
from kd_core.data.sources import DataSourceError, FileSource
from kd_core.data.tokenizer import load_tokenizer, save_hf_tokenizer
from kd_core.progress import progress_bar, say
from kd_core.stage import StageRun
from kd_core.storage import Store

CHAT_COLUMNS = ("input_ids", "position_ids", "loss_mask")
"""The columns of a chat shard (a text shard has `input_ids` alone)."""


@dataclass(frozen=True)
class Conversation:
    where: str
    """`file:line` (or `file:row N`) of the record it came from."""
    turns: tuple[tuple[str, str], ...]
    """(role, content) per turn, in order."""
    split: str | None = None
    """The split its record names (`data.chat.split_field`); None: no split field is read."""
    tag: str = ""
    """Its kind: the record's `data.chat.tag_field`, else the name of its file."""

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.turns]


def conversation_of(record: dict, where: str, chat: ChatConfig) -> Conversation:
    """A record's turns, checked (module docstring); errors name `where`."""
    if chat.messages_field in record and record[chat.messages_field] is not None:
        messages = record[chat.messages_field]
        if not isinstance(messages, list) or not messages:
            raise DataSourceError(f"{where}: {chat.messages_field!r} (data.chat.messages_field) must be a non-empty list of turns")
        turns = tuple(_turn(message, where, index, chat) for index, message in enumerate(messages))
    elif chat.prompt_field in record and chat.completion_field in record:
        turns = tuple(
            _checked(role, record.get(name), where, f"field {name!r} (data.chat.{setting})", chat)
            for role, name, setting in (
                ("system", chat.system_field, "system_field"), ("user", chat.prompt_field, "prompt_field"),
                (chat.assistant_role, chat.completion_field, "completion_field"),
            )
            if role != "system" or record.get(name) is not None
        )
    else:
        raise DataSourceError(
            f"{where}: expected {chat.messages_field!r} (data.chat.messages_field) or {chat.prompt_field!r} and "
            f"{chat.completion_field!r} (data.chat.prompt_field, completion_field); the record has {sorted(record)[:8]}"
        )
    if not any(role == chat.assistant_role for role, _ in turns):
        raise DataSourceError(f"{where}: the conversation has no {chat.assistant_role!r} turn; there is nothing for the student to learn to write")
    tag = record.get(chat.tag_field)
    if not isinstance(tag, str) or not tag:
        tag = where.rsplit(":", 1)[0].replace("\\", "/").rsplit("/", 1)[-1]
    return Conversation(where, turns, _split_of(record, where, chat), tag)


def _split_of(record: dict, where: str, chat: ChatConfig) -> str | None:
    if chat.split_field is None:
        return None
    split = record.get(chat.split_field)
    if split is None:
        raise DataSourceError(
            f"{where}: the record has no {chat.split_field!r} (data.chat.split_field); with it set, every record names its "
            f"split, one of {', '.join(SPLITS)}: add it, or unset data.chat.split_field to split at random"
        )
    if split not in SPLITS:
        raise DataSourceError(f"{where}: {chat.split_field!r} (data.chat.split_field) is {split!r}; it must be one of {', '.join(SPLITS)}")
    return split


def chat_settings(config: DataConfig) -> ChatConfig:
    """`data.chat` as prep reads it: for the `exact-answers` source, with the split read from the
    records' `split` field."""
    if config.source == "exact-answers":
        from kd_core.data.exact_answers import SPLIT_FIELD

        return config.chat.model_copy(update={"split_field": SPLIT_FIELD})
    return config.chat


def split_conversations(conversations: list[Conversation], config: DataConfig, chat: ChatConfig) -> dict[str, list[Conversation]]:
    """train / val / test (module docstring): each conversation's own split when
    `chat.split_field` is set, else `split_documents` by `data.val_fraction` and `test_fraction`."""
    if chat.split_field is None:
        return split_documents(conversations, config.val_fraction, config.test_fraction)
    splits = {split: [c for c in conversations if c.split == split] for split in SPLITS}
    empty = [split for split in SPLITS if not splits[split]]
    if empty:
        raise DataSourceError(
            f"data: no record names split {', '.join(empty)} in {chat.split_field!r} (data.chat.split_field) among the "
            f"{len(conversations)} conversations read; every split needs at least one"
        )
    return splits


def _turn(message, where: str, index: int, chat: ChatConfig) -> tuple[str, str]:
    if not isinstance(message, dict) or chat.role_field not in message or chat.content_field not in message:
        raise DataSourceError(
            f"{where}: turn {index} must be an object with {chat.role_field!r} and {chat.content_field!r} "
            "(data.chat.role_field, content_field)"
        )
    return _checked(message[chat.role_field], message[chat.content_field], where, f"turn {index}", chat)


def _checked(role, content, where: str, what: str, chat: ChatConfig) -> tuple[str, str]:
    if role not in chat.roles:
        raise DataSourceError(f"{where}: {what} has role {role!r}, which is not one of data.chat.roles {chat.roles}; add it there or fix the record")
    if not isinstance(content, str):
        raise DataSourceError(f"{where}: {what} ({role}) holds {type(content).__name__}, not text")
    if role == chat.assistant_role and not content.strip():
        raise DataSourceError(f"{where}: {what} is an empty {role} turn; remove the record or give the answer")
    return role, content


def first_conversations(source: FileSource, chat: ChatConfig, count: int) -> list[Conversation]:
    """The conversations of the first `count` records, checked as prep checks them (`kdflow
    validate --check-inputs` and `--deep` read no further)."""
    return [conversation_of(record, where, chat) for where, record in itertools.islice(source.records(), count)]


# ------------------------------------------------------------------------------------ rendering
class ChatEncoder:
    """Renders conversations through a Hugging Face tokenizer's chat template and tokenizes them
    with the loss mask of `train_on` (module docstring)."""

    def __init__(self, hf_tokenizer, chat: ChatConfig, where: str):
        """`where` names the tokenizer in errors (its URL)."""
        self.tokenizer, self.chat = hf_tokenizer, chat
        if chat.template is not None:
            hf_tokenizer.chat_template = chat.template
        if not getattr(hf_tokenizer, "chat_template", None):
            raise DataSourceError(
                f"data.tokenizer: {where} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                "give one in data.chat.template"
            )

    def render(self, conversation: Conversation, upto: int | None = None, generation_prompt: bool = False) -> str:
        """The template's text of the first `upto` turns (all of them: None)."""
        messages = conversation.messages()[:upto]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2 raises its own errors (TemplateError, UndefinedError) from the template
            raise DataSourceError(f"{conversation.where}: the chat template fails on this conversation ({err}); fix data.chat.template or the record") from None

    def assistant_spans(self, conversation: Conversation, text: str) -> list[tuple[int, int]]:
        """(start, end) characters of each assistant turn in the rendered `text`."""
        spans = []
        for index, (role, _) in enumerate(conversation.turns):
            if role != self.chat.assistant_role:
                continue
            before = self.render(conversation, index, generation_prompt=True)
            through = self.render(conversation, index + 1)
            if not (through.startswith(before) and text.startswith(through)):
                raise DataSourceError(
                    f"{conversation.where}: the chat template does not render this conversation as its turns one after another "
                    f"(turn {index} changes the text before it), so the assistant's tokens cannot be told apart; give a template "
                    "that does in data.chat.template"
                )
            if len(through) == len(before):
                raise DataSourceError(
                    f"{conversation.where}: the chat template writes nothing for turn {index} ({role}); the student would have "
                    "nothing to learn from it: give a template that renders assistant turns in data.chat.template"
                )
            spans.append((len(before), len(through)))
        return spans

    def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, trained) of one conversation: int32 and bool, one per token."""
        text = self.render(conversation)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoding["input_ids"], dtype=np.int32)
        starts = np.asarray([start for start, _ in encoding["offset_mapping"]], dtype=np.int64)
        if self.chat.train_on == "all":
            trained = np.ones(len(ids), dtype=bool)
        else:
            trained = np.zeros(len(ids), dtype=bool)
            for start, end in self.assistant_spans(conversation, text):
                trained |= (starts >= start) & (starts < end)
        trained[:1] = False  # nothing in the conversation predicts its first token
        return ids, trained


@dataclass(frozen=True)
class ConversationPrompt:
    prompt: list[int]
    reference: list[int]
    tag: int = -1
    """Its conversation's tag id (`tag_ids`; -1: the rows carry none)."""


def conversation_prompts(rows, limit: int) -> list[ConversationPrompt]:
    """The first `limit` conversations of chat rows (`input_ids`, `position_ids`, `loss_mask`:
    arrays or tensors, (rows, T)) that have an assistant turn: (the tokens before its first
    trained token, the run of trained tokens from there, its tag id when the rows carry
    `tag_ids`). What a model answers at eval, and what the student answers itself in on-policy
    distillation."""
    prompts = []
    tag_rows = rows["tag_ids"].tolist() if "tag_ids" in rows else [None] * len(rows["input_ids"])
    for ids, positions, trained, tags in zip(rows["input_ids"].tolist(), rows["position_ids"].tolist(), rows["loss_mask"].tolist(), tag_rows):
        starts = [index for index, position in enumerate(positions) if position == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            first = next((index for index in range(start, end) if trained[index]), None)
            if first is None:
                continue  # padding, or a conversation cut before its answer
            stop = first
            while stop < end and trained[stop]:
                stop += 1
            prompts.append(ConversationPrompt(ids[start:first], ids[first:stop], tags[start] if tags is not None else -1))
            if len(prompts) == limit:
                return prompts
    return prompts


def stop_token_ids(tokenizer, prompts: list[ConversationPrompt]) -> list[int]:
    """Where a model's answer ends: the tokenizer's eos, and the last special token of each
    reference answer (the template's end-of-turn marker, e.g. ChatML's <|im_end|>, which may be
    followed by plain text such as a newline)."""
    special = set(tokenizer.all_special_ids)
    ends = {next((token for token in reversed(p.reference) if token in special), None) for p in prompts}
    return sorted(({tokenizer.eos_token_id} | ends) - {None})


# ------------------------------------------------------------------------------------------ rows
@dataclass
class ChatCounts:
    duplicates: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_untrained: int = 0
    """Conversations left with no trained token once cut to seq_len."""
    tokens: dict[str, int] = field(default_factory=dict)
    trained_tokens: dict[str, int] = field(default_factory=dict)
    longest: int = 0
    """Tokens of the longest conversation, before any cut."""


def fit_to_rows(
    encoded: list[tuple[np.ndarray, np.ndarray]], seq_len: int, layout: str, pad_id: int, tags: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """Rows of `seq_len` (module docstring: packed or padded) holding the conversations in order,
    each at most `seq_len` tokens: `input_ids`, `position_ids`, `loss_mask`; with `tags` (one per
    conversation), `tag_ids` too: each token's conversation's tag (-1 on padding)."""
    rows: list[list[tuple[np.ndarray, np.ndarray, int]]] = []
    open_rows: list[tuple[int, int]] = []  # (tokens still free, row), sorted: best fit in O(log rows)
    for index, (ids, trained) in enumerate(encoded):
        place = bisect.bisect_left(open_rows, (len(ids), -1)) if layout == "packed" else len(open_rows)
        if place == len(open_rows):
            rows.append([])
            free, row = seq_len, len(rows) - 1
        else:
            free, row = open_rows.pop(place)
        rows[row].append((ids, trained, tags[index] if tags is not None else -1))
        if layout == "packed" and free - len(ids) > 0:
            bisect.insort(open_rows, (free - len(ids), row))
    input_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
    position_ids = np.zeros((len(rows), seq_len), dtype=np.int32)
    loss_mask = np.zeros((len(rows), seq_len), dtype=np.uint8)
    tag_ids = np.full((len(rows), seq_len), -1, dtype=np.int16)
    for row, members in enumerate(rows):
        start = 0
        for ids, trained, tag in members:
            end = start + len(ids)
            input_ids[row, start:end], loss_mask[row, start:end], tag_ids[row, start:end] = ids, trained, tag
            position_ids[row, start:end] = np.arange(len(ids))
            start = end
        position_ids[row, start:] = np.arange(seq_len - start)  # the padding is a sequence of its own
    columns = {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask}
    return columns | ({"tag_ids": tag_ids} if tags is not None else {})


def encode_split(
    encoder: ChatEncoder, conversations: list[Conversation], seq_len: int, chat: ChatConfig, counts: ChatCounts, advance,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[Conversation]]:
    """Each conversation's (ids, trained), cut or left out when longer than `seq_len` (counted),
    and the conversations kept."""
    encoded, kept = [], []
    for conversation in conversations:
        ids, trained = encoder.encode(conversation)
        advance(1)
        counts.longest = max(counts.longest, len(ids))
        if len(ids) > seq_len:
            if chat.overlong == "drop":
                counts.dropped_overlong += 1
                continue
            counts.truncated += 1
            ids, trained = ids[:seq_len], trained[:seq_len]
            if not trained.any():
                counts.dropped_untrained += 1
                continue
        encoded.append((ids, trained))
        kept.append(conversation)
    return encoded, kept


def prepare_chat(config: DataConfig, store: Store, run: StageRun, source: FileSource | None) -> tuple[dict, dict]:
    """Prep's work for chat records into `run`'s folder: (metrics, details). `source` None: the
    bundled `python-qa` or `exact-answers` pairs (written to the store on first use)."""
    chat, counts = chat_settings(config), ChatCounts()
    source = source or FileSource([bundled_pairs_url(config, store)], config.text_field, store.config)
    with run.timed("collect"):
        conversations = collect_conversations(config, chat, source, counts)
        splits = split_conversations(conversations, config, chat)
    with run.timed("tokenizer"):
        tokenizer_url = config.tokenizer
        if tokenizer_url is None and config.source == "exact-answers":
            from kd_core.data.exact_answers import char_tokenizer_url

            tokenizer_url = char_tokenizer_url(store, chat.template)
        prepared = load_tokenizer(tokenizer_url, store.config)
        encoder = ChatEncoder(prepared.hf, chat, tokenizer_url)
        save_hf_tokenizer(prepared, run)
    special_ids = prepared.ids()
    tags = sorted({conversation.tag for conversation in conversations})
    if len(tags) > np.iinfo(np.int16).max:
        raise DataSourceError(
            f"data.chat.tag_field: the conversations have {len(tags):,} distinct tags (a record without {chat.tag_field!r} is tagged "
            f"with its file's name), more than the {np.iinfo(np.int16).max:,} prep records; tag the records by kind"
        )
    details: dict = {
        "seq_len": config.seq_len, "vocab_size": prepared.tokenizer.get_vocab_size(), "special_token_ids": special_ids, "splits": {},
        "chat": {"train_on": chat.train_on, "layout": chat.layout}, "tags": tags,
    }
    with run.timed("tokenize_and_pack"), progress_bar("prep: render and tokenize", total=len(conversations)) as bar:
        for split in SPLITS:
            encoded, kept = encode_split(encoder, splits[split], config.seq_len, chat, counts, bar.advance)
            if not encoded:
                raise DataSourceError(
                    f"data: no conversation of the {split} split fits data.seq_len={config.seq_len} tokens with a trained token "
                    f"({len(splits[split])} conversations); raise data.seq_len, set data.chat.overlong: truncate, or add data"
                )
            tag_index = {tag: index for index, tag in enumerate(tags)}
            columns = fit_to_rows(encoded, config.seq_len, chat.layout, special_ids["pad"], [tag_index[c.tag] for c in kept])
            if split == "train":
                order = np.random.default_rng(config.seed).permutation(len(columns["input_ids"]))
                columns = {name: values[order] for name, values in columns.items()}
            details["splits"][split] = write_split(run, split, columns, config.rows_per_shard) | {"conversations": len(encoded)}
            counts.tokens[split] = sum(len(ids) for ids, _ in encoded)
            counts.trained_tokens[split] = int(columns["loss_mask"].sum())
    metrics = {
        "documents": len(conversations),
        "conversations": len(conversations),
        "files": len(source.files),
        "duplicates_removed": counts.duplicates,
        "truncated": counts.truncated,
        "dropped_overlong": counts.dropped_overlong,
        "dropped_untrained": counts.dropped_untrained,
        **{f"{split}_tokens": details["splits"][split]["tokens"] for split in SPLITS},
        **{f"{split}_trained_tokens": counts.trained_tokens[split] for split in SPLITS},
        "row_fill": round(counts.tokens["train"] / details["splits"]["train"]["tokens"], 4),
        "longest_conversation": counts.longest,
    }
    overlong = counts.truncated + counts.dropped_overlong
    if overlong > 0.1 * len(conversations):
        say(
            f"[yellow]warning:[/yellow] {overlong:,} of {len(conversations):,} conversations are longer than data.seq_len={config.seq_len} "
            f"tokens and were {'truncated' if chat.overlong == 'truncate' else 'dropped'} (the longest has {counts.longest:,}); "
            "raise data.seq_len to train on them whole"
        )
    return metrics, details


def bundled_pairs_url(config: DataConfig, store: Store) -> str:
    """The JSON Lines file of a bundled source's pairs (`python-qa`, `exact-answers`), written to
    `store` on first use."""
    if config.source == "exact-answers":
        from kd_core.data.exact_answers import exact_answers_url

        return exact_answers_url(store, config.exact_answers, config.seed, config.val_fraction, config.test_fraction)
    from kd_core.data.python_qa import python_qa_url

    return python_qa_url(store, config.seed)


def collect_conversations(config: DataConfig, chat: ChatConfig, source: FileSource, counts: ChatCounts) -> list[Conversation]:
    """Every record's conversation, checked (against `chat`, `chat_settings`), without exact
    duplicates, shuffled (seeded)."""
    conversations, seen = [], set()
    with progress_bar("prep: read records", total=source.total_bytes) as bar:
        for where, record in source.records(bar.advance):
            conversation = conversation_of(record, where, chat)
            fingerprint = hashlib.blake2b(json.dumps(conversation.turns).encode(), digest_size=16).digest()
            if fingerprint in seen:
                counts.duplicates += 1
                continue
            seen.add(fingerprint)
            conversations.append(conversation)
    random.Random(config.seed).shuffle(conversations)
    if config.max_documents is not None:
        conversations = conversations[: config.max_documents]
    if len(conversations) < 3:
        raise DataSourceError(
            f"data: found {len(conversations)} distinct conversations ({counts.duplicates} duplicates dropped); need at least 3 (one per split)"
        )
    return conversations

