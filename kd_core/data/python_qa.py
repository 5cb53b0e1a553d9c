"""The bundled instruction data of the chat recipe: questions about Python answered by its own docs.

Every public function, class and method with a docstring in a fixed list of standard-library
modules and built-in types (`SOURCES`) gives up to two instruction pairs:
- "What does `zip` do?" (the wording drawn, seeded, from `ASKED`) answered by the first
  paragraph of its docstring (signature lines and doctests left out, at most `MAX_ANSWER_CHARS`,
  cut at a sentence end);
- "How do I call `json.dumps`?" answered by its signature, when Python can tell it
  (`inspect.signature`, else the `name(...) --> ...` line that opens many built-in docstrings).

The text ships with the running Python, so the data is the same on every machine with the same
Python version and needs no download. `python_qa_url` writes the pairs once as JSON Lines
(`prompt`, `completion`) into the store, from where prep reads them as `data.source: chat`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import platform
import random
import re

from kd_core.storage import Store

DATASET_VERSION = 1
SOURCES = (
    "builtins", "itertools", "functools", "json", "re", "math", "string", "collections", "textwrap", "os.path", "statistics",
    "random", "shutil", "heapq", "bisect", "operator", "fnmatch", "base64", "difflib", "glob",
)
TYPES = ("str", "list", "dict", "set", "bytes", "int", "float", "tuple")
"""Built-in types whose methods are asked about too (`str.split`)."""
ASKED = ("What does `{name}` do?", "Explain `{name}`.", "What is `{name}` for?", "Describe `{name}` briefly.")
MAX_ANSWER_CHARS = 320


def python_qa_url(store: Store, seed: int) -> str:
    """The JSON Lines file of the bundled pairs in `store`, written on first use."""
    settings = {"version": DATASET_VERSION, "python": platform.python_version(), "seed": seed}
    relative = "datasets/python-qa-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12] + "/pairs.jsonl"
    if not store.exists(relative):
        lines = "".join(json.dumps(pair) + "\n" for pair in python_qa_pairs(seed))
        store.write_bytes(relative, lines.encode())
    return store.url(relative)


def python_qa_pairs(seed: int) -> list[dict[str, str]]:
    """Every pair (module docstring), in a fixed order; `seed` picks each question's wording."""
    generator = random.Random(seed)
    pairs = []
    for name, documented in _documented():
        answer = first_paragraph(inspect.cleandoc(documented.__doc__), name)
        if answer:
            pairs.append({"prompt": generator.choice(ASKED).format(name=name), "completion": answer})
        signature = _signature(name, documented)
        if signature:
            pairs.append({"prompt": f"How do I call `{name}`?", "completion": f"`{signature}`"})
    return pairs


def _documented():
    """(dotted name, object) of every public function, class (exceptions aside) and method with a
    docstring of its own in SOURCES and TYPES."""
    for module_name in SOURCES:
        module = importlib.import_module(module_name)
        prefix = "" if module_name == "builtins" else f"{module_name}."
        for name in sorted(dir(module)):
            value = getattr(module, name)
            exception = inspect.isclass(value) and issubclass(value, BaseException)
            if not name.startswith("_") and callable(value) and getattr(value, "__doc__", None) and not exception:
                yield prefix + name, value
    for type_name in TYPES:
        kind = getattr(importlib.import_module("builtins"), type_name)
        for name in sorted(vars(kind)):
            method = getattr(kind, name)
            if not name.startswith("_") and callable(method) and getattr(method, "__doc__", None):
                yield f"{type_name}.{name}", method


def first_paragraph(doc: str, name: str) -> str:
    """The docstring's first paragraph of prose: a leading signature line (`zip(*iterables) -->
    ...`) and doctest lines dropped, whitespace joined, cut at a sentence end within
    MAX_ANSWER_CHARS."""
    short = name.rsplit(".", 1)[-1]
    lines = doc.strip().splitlines()
    if lines and re.match(rf"{re.escape(short)}\(.*\)", lines[0]):
        lines = lines[1:]
        if lines and lines[0].startswith("--"):
            lines = lines[1:]
    paragraph = []
    for line in lines:
        text = line.strip()
        if not text:
            if paragraph:
                break
            continue
        if text.startswith((">>>", "...")):
            continue
        paragraph.append(text)
    answer = " ".join(paragraph)
    if len(answer) > MAX_ANSWER_CHARS:
        cut = answer.rfind(". ", 0, MAX_ANSWER_CHARS)
        answer = answer[: cut + 1] if cut > 40 else answer[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0] + " ..."
    return answer


def _signature(name: str, value) -> str | None:
    short = name.rsplit(".", 1)[-1]
    try:
        return f"{name}{inspect.signature(value)}"
    except (TypeError, ValueError):
        first = inspect.cleandoc(value.__doc__).strip().splitlines()[:1]
        match = re.match(rf"({re.escape(short)}\([^)]*\))", first[0]) if first else None
        return f"{name.rsplit('.', 1)[0] + '.' if '.' in name else ''}{match.group(1)}" if match else None
