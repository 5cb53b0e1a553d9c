"""The bundled problems with exact answers (`data.source: exact-answers`): sums, differences,
sorting and string transforms, generated from a seed, each with one right answer.

Task families (`data.exact_answers.tasks`), each record tagged with its family (`tag`):
- `add`: "347+58" -> "405"; `subtract`: "347-58" -> "289" (the second number at most the
  first, so never negative). The first operand has exactly `length` digits (one digit may be 0);
  the second of a sum is below 10^d for a d drawn uniformly from 1 to `length` (so it may have
  fewer digits, or be 0), the second of a difference any number from 0 to the first.
- `sort`: "sort 3 1 2" -> "1 2 3": `length` digits, separated by spaces.
- `reverse`: "reverse abc" -> "cba"; `drop_vowels`: "drop vowels abcde" -> "bcd" (a, e, i, o, u
  removed; the word holds at least one other letter, so no answer is empty): `length` random
  lowercase letters.

Splits. Each family's problems of the train lengths (`train_lengths`, spread evenly over them) are
shuffled and split into val / test / train by `data.val_fraction` and `test_fraction`; the
problems of each held-out length (`held_out_lengths`, all longer) go to test alone. No prompt
appears twice, so none is in two splits. Records: `prompt`, `completion`, `tag`, `length`,
`split`; prep reads the split from `split` (`data.chat.split_field`).

Each family draws from its own generator (seeded by `data.seed` and its name), so the problems of
one family do not change when another is added or removed. `exact_answers_url` writes the records
once as JSON Lines into the store. The draws use `random.Random`, whose integer methods may
change between Python versions: the prep key includes the Python version.

The character tokenizer. Without `data.tokenizer`, the records are read with a character-level
Hugging Face tokenizer (`char_tokenizer`): every printable ASCII character, and every character of
the chat template's text, is one token, plus `<|endoftext|>` (eos: it ends each answer) and
`<|pad|>`. One token per digit keeps the arithmetic learnable by tiny models. Its chat template is
`data.chat.template` or `DEFAULT_TEMPLATE`: "347+58=405<|endoftext|>", the prompt, `=`, the answer.
`char_tokenizer_url` writes it once into the store as a tokenizer folder that `load_tokenizer`
reads.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import string
import tempfile

from kd_core.config import ExactAnswersConfig
from kd_core.storage import Store

DATASET_VERSION = 1
"""Bump when the problems generated for the same settings change (it is part of the prep key)."""
SPLIT_FIELD = "split"
"""The records' field naming their split."""
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
VOWELS = "aeiou"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}={{ message['content'] }}<|endoftext|>"
    "{% else %}{{ message['content'] }}{% if message['role'] == 'system' %}\n{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)
"""The character tokenizer's chat template: "347+58=405<|endoftext|>" (a system turn, if any, on
a line of its own before the prompt)."""
ATTEMPTS_PER_PAIR = 20
"""Draws per wanted problem before a length with few distinct problems gives up."""


# -------------------------------------------------------------------------------------- problems
def problem(task: str, length: int, draw: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of `task` at `length` (module docstring)."""
    if task in ("add", "subtract"):
        first = draw.randrange(10 ** (length - 1) if length > 1 else 0, 10**length)
        if task == "add":
            second = draw.randrange(10**draw.randint(1, length))
            return f"{first}+{second}", str(first + second)
        second = draw.randint(0, first)
        return f"{first}-{second}", str(first - second)
    if task == "sort":
        digits = [draw.randrange(10) for _ in range(length)]
        return "sort " + " ".join(map(str, digits)), " ".join(map(str, sorted(digits)))
    word = "".join(draw.choice(string.ascii_lowercase) for _ in range(length))
    if task == "reverse":
        return f"reverse {word}", word[::-1]
    if task == "drop_vowels":
        kept = "".join(letter for letter in word if letter not in VOWELS)
        if not kept:  # nothing left to answer: make the last letter a consonant
            word = word[:-1] + draw.choice([letter for letter in string.ascii_lowercase if letter not in VOWELS])
            kept = word[-1]
        return f"drop vowels {word}", kept
    raise ValueError(f"unknown exact-answers task {task!r}")


def distinct_problems(task: str, lengths: list[int], count: int, draw: random.Random, seen: set[str]) -> list[dict]:
    """About `count` problems spread evenly over `lengths`, none with a prompt in `seen` (which
    gains theirs); a length runs out after ATTEMPTS_PER_PAIR draws per wanted problem."""
    records = []
    for index, length in enumerate(lengths):
        wanted = count // len(lengths) + (index < count % len(lengths))
        found = 0
        for _ in range(wanted * ATTEMPTS_PER_PAIR):
            if found == wanted:
                break
            prompt, answer = problem(task, length, draw)
            if prompt not in seen:
                seen.add(prompt)
                records.append({"prompt": prompt, "completion": answer, "tag": task, "length": length})
                found += 1
    return records


def exact_answer_pairs(settings: ExactAnswersConfig, seed: int, val_fraction: float, test_fraction: float) -> list[dict]:
    """Every record (module docstring), family by family: the train lengths' problems (val, test,
    then train), then the held-out lengths' (test)."""
    records, seen = [], set()
    shortest, longest = settings.train_lengths
    for task in settings.tasks:
        draw = random.Random(f"{seed}:{task}")
        in_range = distinct_problems(task, list(range(shortest, longest + 1)), settings.pairs_per_task, draw, seen)
        draw.shuffle(in_range)
        n_val, n_test = max(1, round(len(in_range) * val_fraction)), max(1, round(len(in_range) * test_fraction))
        for index, record in enumerate(in_range):
            record[SPLIT_FIELD] = "val" if index < n_val else "test" if index < n_val + n_test else "train"
        held_out = distinct_problems(task, settings.held_out_lengths, settings.held_out_pairs * len(settings.held_out_lengths), draw, seen)
        records += in_range + [record | {SPLIT_FIELD: "test"} for record in held_out]
    return records


def exact_answers_url(store: Store, settings: ExactAnswersConfig, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The JSON Lines file of the records in `store`, written on first use."""
    relative = f"datasets/exact-answers-{_digest(settings.model_dump(mode='json'), seed, val_fraction, test_fraction)}/pairs.jsonl"
    if not store.exists(relative):
        records = exact_answer_pairs(settings, seed, val_fraction, test_fraction)
        store.write_bytes(relative, "".join(json.dumps(record) + "\n" for record in records).encode())
    return store.url(relative)


def _digest(*settings) -> str:
    described = json.dumps([DATASET_VERSION, platform.python_version(), *settings], sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- tokenizer
def char_vocabulary(template: str | None) -> list[str]:
    """The character tokenizer's tokens, in id order: eos, pad, then every printable ASCII
    character and every other character of `template` (None: DEFAULT_TEMPLATE), sorted."""
    characters = set(string.printable) | set(template or DEFAULT_TEMPLATE)
    return [END_OF_TEXT, PAD, *sorted(characters)]


def char_tokenizer(template: str | None):
    """A Hugging Face fast tokenizer with one token per character (`char_vocabulary`) and
    `template` (None: DEFAULT_TEMPLATE) as its chat template. A character outside its vocabulary
    is an error when tokenized, never a silent stand-in."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate(char_vocabulary(template))}
    backend = Tokenizer(models.WordLevel(vocabulary))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character on its own
    backend.decoder = decoders.Fuse()  # joined back without spaces
    backend.add_special_tokens([END_OF_TEXT, PAD])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=END_OF_TEXT, pad_token=PAD, clean_up_tokenization_spaces=False
    )
    hf.chat_template = template or DEFAULT_TEMPLATE
    return hf


def char_tokenizer_url(store: Store, template: str | None) -> str:
    """The character tokenizer's folder in `store` (tokenizer.json, tokenizer_config.json, the
    chat template), written on first use."""
    relative = f"datasets/exact-answers-tokenizer-{_digest(template or DEFAULT_TEMPLATE)}"
    if not store.exists(f"{relative}/tokenizer_config.json"):  # uploaded last (files in name order)
        with tempfile.TemporaryDirectory(prefix="kdflow-char-tokenizer-") as folder:
            char_tokenizer(template).save_pretrained(folder)
            store.upload_dir(folder, relative)
    return store.url(relative)
