"""The bundled preference data of the reward recipe: questions about real handwritten digits.

The images are scikit-learn's `load_digits()`: 1,797 scans of digits written by 43 people (UCI
"Optical Recognition of Handwritten Digits"), 8 × 8 pixels, each with the digit a person assigned
to it. Nobody here drew them; they install with scikit-learn, offline.

For every image, `pairs_per_image` questions (one per kind below) get two answers, one right and
one wrong, in a random order: the order says nothing. The record carries
- `image`: the scan as a PNG file beside the JSONL (a real file in storage);
- `image_text`: a text rendering of the scan, for the text-only teacher: the digit a person wrote
  and how heavy the strokes are (from the pixels);
- `human_label` on a seeded `labeled_fraction` of the pairs: 1 when `chosen` is the right answer
  (by the dataset's human-assigned digit), 0 when `rejected` is; absent on the other pairs.

Question kinds: which digit it is; even or odd; larger than k; the digit plus one. A wrong digit
is drawn from the ones people confuse it with most (1/7, 3/8, 4/9, 5/6, ...) half of the time.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from kd_core.config import PreferenceConfig
from kd_core.storage import Store

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CONFUSED_WITH = {0: (6, 8), 1: (7, 4), 2: (7, 3), 3: (8, 5), 4: (9, 1), 5: (6, 3), 6: (5, 0), 7: (1, 2), 8: (3, 9), 9: (4, 8)}
DATASET_VERSION = 1


def digit_preferences_url(store: Store, config: PreferenceConfig, seed: int) -> str:
    """The JSONL of the bundled data in `store`, written on first use (same settings, same files)."""
    settings = {"version": DATASET_VERSION, "labeled_fraction": config.labeled_fraction, "pairs_per_image": config.pairs_per_image, "seed": seed}
    folder = "datasets/digit-preferences-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    jsonl = f"{folder}/pairs.jsonl"
    if not store.exists(jsonl):  # written last: its presence means every image is there
        records = []
        for index, (pixels, digit, record) in enumerate(digit_records(config, seed)):
            image_name = f"images/digit-{index // config.pairs_per_image:05d}.png"
            if index % config.pairs_per_image == 0:
                store.write_bytes(f"{folder}/{image_name}", png_bytes(pixels))
            records.append(json.dumps({**record, "image": image_name}))
        store.write_bytes(jsonl, ("\n".join(records) + "\n").encode())
    return store.url(jsonl)


def digit_records(config: PreferenceConfig, seed: int):
    """(pixels 8×8 uint8, digit, record without `image`) for every pair, image by image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    kinds = (_which_digit, _even_or_odd, _larger_than, _plus_one)
    for image, digit in zip(digits.images, digits.target):
        digit = int(digit)
        pixels = np.round(image / 16 * 255).astype(np.uint8)
        rendering = f"A scanned handwritten digit {WORDS[digit]}, written with {_stroke_weight(pixels)} strokes."
        for kind in rng.permutation(len(kinds))[: config.pairs_per_image]:
            prompt, right, wrong = kinds[kind](digit, rng)
            right_first = bool(rng.random() < 0.5)
            record = {
                "prompt": prompt,
                "chosen": right if right_first else wrong,
                "rejected": wrong if right_first else right,
                "image_text": rendering,
            }
            if rng.random() < config.labeled_fraction:
                record["human_label"] = 1.0 if right_first else 0.0
            yield pixels, digit, record


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _stroke_weight(pixels: np.ndarray) -> str:
    ink = float((pixels > 127).mean())
    return "thin" if ink < 0.22 else "heavy" if ink > 0.34 else "medium"


def _other_digit(digit: int, rng) -> int:
    if rng.random() < 0.5:
        return int(rng.choice(CONFUSED_WITH[digit]))
    return int(rng.choice([d for d in range(10) if d != digit]))


def _which_digit(digit: int, rng):
    return "Which digit is written in the image?", f"The digit is {WORDS[digit]}.", f"The digit is {WORDS[_other_digit(digit, rng)]}."


def _even_or_odd(digit: int, rng):
    right, wrong = ("even", "odd") if digit % 2 == 0 else ("odd", "even")
    return "Is the digit in the image even or odd?", f"It is {right}.", f"It is {wrong}."


def _larger_than(digit: int, rng):
    k = int(rng.choice([d for d in range(1, 9) if d != digit]))
    yes, no = f"Yes, it is larger than {WORDS[k]}.", f"No, it is not larger than {WORDS[k]}."
    prompt = f"Is the digit in the image larger than {WORDS[k]}?"
    return (prompt, yes, no) if digit > k else (prompt, no, yes)


def _plus_one(digit: int, rng):
    wrong = _other_digit(digit, rng)
    prompt = "What do you get when you add one to the digit in the image?"
    return prompt, f"You get {WORDS[digit + 1]}.", f"You get {WORDS[wrong + 1]}."
