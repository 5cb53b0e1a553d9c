"""The teacher cache's on-disk format: bit-packed, quantized columns of Arrow IPC shards.

One cache shard is an Arrow IPC file aligned row for row with a token shard (row r of the cache
describes row r of the tokens; position t describes the teacher's distribution over the token
after input t). Every column is a `fixed_size_list` per row; no pickle anywhere. `CacheLayout`
(stored in the cache manifest's `details["layout"]` and in each file's schema metadata) says how
to read them:

| format    | column          | per row                  | content                                                   |
|-----------|-----------------|--------------------------|-----------------------------------------------------------|
| `topk`    | `topk_packed`   | uint8 × ⌈T·k/8⌉·b bytes  | k entries per position, b = id_bits + logprob_bits each   |
| `topk`    | `tail_logprob`  | float16 × T (optional)   | log(1 − Σ top-k p), from the full softmax                 |
| `sampled` | `sample_packed` | uint8 × ⌈T·n/8⌉·b bytes  | n slots per position, b = id_bits + count_bits each       |
| `full`    | `logprobs`      | float16 × T·V            | every log-prob                                            |
| all       | `entropy`       | float16 × T              | the teacher's full predictive entropy (nats)              |
| optional  | `hidden_<L>`    | float16 × T·H            | hidden state L of the teacher (`cache.hidden_layers`)     |
| `reward`  | `teacher_chosen`, `teacher_rejected` | float32 × 1 | a reward model's scores of a preference pair's two responses (`task: reward`; no `entropy`) |
| `embedding` | `teacher_embedding` | float16 × D | a sentence encoder's embedding of the row's text (`task: embedding`; no `entropy`) |

Packing: entries are unsigned integers of b bits (b ≤ 56), written most-significant bit first
into one bit stream per row; the row's entry count is padded to a multiple of 8 with zero
entries, so every 8 entries fill exactly b bytes and rows are byte-aligned.

- top-k entry = id << logprob_bits | q, where q = round(log p / logprob_floor · (2^logprob_bits − 1))
  (fixed point on [logprob_floor, 0]; log-probs below the floor are stored as the floor).
  id_bits = ⌈log2 V⌉. Decoding gives log p = q · logprob_floor / (2^logprob_bits − 1), then, when
  the tail is stored, shifts the k log-probs so Σ p + p_tail = 1 exactly (undoing quantization
  drift).
- sampled entry = id << count_bits | count, count_bits = bit length of n; count 0 marks an unused
  slot (the draws hit fewer than n distinct ids).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from kd_core.errors import InputError
from kd_core.losses.sampled import draw_teacher_samples

FORMAT_VERSION = 2
"""Bumped when the meaning of any column changes."""


PER_ROW_FORMATS = {
    "reward": (("teacher_chosen", "teacher_rejected"), True), "embedding": (("teacher_embedding",), False), "tabular": (("teacher_prediction",), False),
}
"""Formats of one value (or vector) per row, not per position: format -> (its columns, whether each
holds one value per row, decoded as (rows,); else a vector, decoded as (rows, width))."""


class CacheSettingsError(InputError):
    """Cache settings this teacher and data cannot satisfy, found before any teacher inference."""


# ------------------------------------------------------------------------------------ bit packing
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) unsigned ints < 2**bits -> (rows, ⌈n/8⌉·bits) uint8, MSB first, n padded to 8."""
    if not 1 <= bits <= 56:
        raise ValueError(f"bits must be in [1, 56], got {bits}")
    rows, count = values.shape
    groups_per_row = -(-count // 8)
    lanes = np.zeros((rows, groups_per_row * 8), np.uint64)
    lanes[:, :count] = values
    lanes = lanes.reshape(-1, 8)
    # Entry r of a group starts at bit r·bits of the group's `bits` bytes: OR its value, shifted into
    # an 8-byte big-endian window that starts at that bit's byte, into the output.
    out = np.zeros((len(lanes), bits + 8), np.uint8)
    for lane in range(8):
        offset = lane * bits
        window = (lanes[:, lane] << np.uint64(64 - bits - offset % 8)).astype(">u8").view(np.uint8).reshape(-1, 8)
        out[:, offset // 8 : offset // 8 + 8] |= window
    return out[:, :bits].reshape(rows, groups_per_row * bits)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: (rows, ⌈count/8⌉·bits) uint8 -> (rows, count), uint32 when
    bits ≤ 32 (half the memory traffic downstream), else uint64."""
    rows = packed.shape[0]
    groups = rows * -(-count // 8)
    stream = np.concatenate([np.ascontiguousarray(packed, np.uint8).reshape(-1), np.zeros(8, np.uint8)])
    if len(stream) - 8 != groups * bits:
        raise ValueError(f"packed data holds {len(stream) - 8} bytes, {rows} rows of {count} {bits}-bit entries need {groups * bits}")
    dtype = np.uint32 if bits <= 32 else np.uint64
    if groups == 0:
        return np.zeros((rows, count), dtype)
    out = np.empty((groups, 8), dtype)
    mask = np.uint64((1 << bits) - 1)
    for lane in range(8):
        offset = lane * bits
        # Every group is `bits` bytes long, so lane r of all groups is one strided 8-byte window.
        window = np.ndarray((groups,), dtype=">u8", buffer=stream, offset=offset // 8, strides=(bits,))
        out[:, lane] = (window >> np.uint64(64 - bits - offset % 8)) & mask
    return out.reshape(rows, -1)[:, :count]


# ----------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class CacheLayout:
    """Everything needed to encode or decode a cache shard's columns."""

    format: str
    """`topk`, `sampled`, `full`, `reward` (a reward teacher's scores of preference pairs) or
    `embedding` (a sentence encoder's embedding of each text; `slots` is its width) or `tabular` (a
    tabular teacher's class log-probabilities or prediction of each row; `slots` is their width)."""
    seq_len: int
    vocab_size: int
    slots: int
    """Entries per position: k (topk), n draws (sampled), V (full)."""
    temperature: float = 1.0
    logprob_bits: int = 12
    logprob_floor: float = -24.0
    tail: bool = False
    hidden_layers: tuple[int, ...] = ()
    hidden_size: int = 0
    token_logprobs: bool = False
    """Also keep the log-prob of each position's next token in the row (`teacher_token_logprobs`):
    a student with another tokenizer merges them into each span's probability."""
    version: int = FORMAT_VERSION
    id_bits: int = field(init=False)
    count_bits: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "hidden_layers", tuple(self.hidden_layers))
        object.__setattr__(self, "id_bits", max(1, math.ceil(math.log2(self.vocab_size))))
        object.__setattr__(self, "count_bits", self.slots.bit_length())

    @classmethod
    def from_config(cls, config, seq_len: int, vocab_size: int, hidden_size: int = 0) -> CacheLayout:
        slots = {"topk": config.top_k, "sampled": config.num_samples, "full": vocab_size}[config.format]
        return cls(
            format=config.format,
            seq_len=seq_len,
            vocab_size=vocab_size,
            slots=slots,
            temperature=config.temperature,
            logprob_bits=config.logprob_bits,
            logprob_floor=config.logprob_floor,
            tail=config.tail_mass and config.format == "topk",
            hidden_layers=tuple(config.hidden_layers),
            hidden_size=hidden_size if config.hidden_layers else 0,
        )

    def to_dict(self) -> dict:
        saved = asdict(self)
        for derived in ("id_bits", "count_bits"):
            saved.pop(derived)
        saved["hidden_layers"] = list(self.hidden_layers)
        return saved

    @classmethod
    def from_dict(cls, saved: dict) -> CacheLayout:
        if saved.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"teacher cache format version {saved.get('version')} is not {FORMAT_VERSION} (this kdflow's); "
                "rerun the cache stage with --force"
            )
        return cls(**saved)

    def schema_metadata(self) -> dict[bytes, bytes]:
        return {b"kdflow.cache_layout": json.dumps(self.to_dict()).encode()}

    @property
    def entry_bits(self) -> int:
        return self.id_bits + (self.logprob_bits if self.format == "topk" else self.count_bits)

    # ---------------------------------------------------------------------------------- encode
    def encode(self, teacher_logprobs: torch.Tensor, generator: torch.Generator, hidden: dict[int, torch.Tensor]) -> dict[str, np.ndarray]:
        """Columns (rows × width arrays) for one batch of teacher log-probs (rows, T, V) at the
        cache temperature, plus the chosen hidden states (rows, T, H). The cache stage computes the
        same columns without holding (rows, T, V): `position_targets` per chunk of positions, then
        `pack`."""
        return self.pack(self.position_targets(teacher_logprobs.flatten(0, -2), generator), hidden, rows=teacher_logprobs.shape[0])

    def position_targets(self, teacher_logprobs: torch.Tensor, generator: torch.Generator, next_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What the cache keeps of n positions' log-probs (n, V) at the cache temperature, on their
        device: `topk_entries` (n, k) ids with their quantized log-probs and `tail_logprob` (n,),
        `sample_entries` (n, slots) ids with their counts (drawn with `generator`, which must live
        on the log-probs' device), or `logprobs` (n, V) float16; and `entropy` (n,). Each position
        is computed alone (the draws take the generator's stream in position order), so the targets
        of consecutive chunks, concatenated, are those of all the positions at once."""
        targets: dict[str, torch.Tensor] = {}
        if self.format == "topk":
            top = teacher_logprobs.topk(self.slots, dim=-1)
            levels = (1 << self.logprob_bits) - 1
            quantized = torch.round(top.values.clamp_min(self.logprob_floor) / self.logprob_floor * levels).long()
            targets["topk_entries"] = (top.indices.long() << self.logprob_bits) | quantized
            if self.tail:
                # log Σ over the other V − k ids, computed from the full distribution (not 1 − Σ head).
                rest = teacher_logprobs.scatter(-1, top.indices, float("-inf"))
                targets["tail_logprob"] = torch.logsumexp(rest, dim=-1).clamp_min(-65504).half()
        elif self.format == "sampled":
            ids, counts = draw_teacher_samples(teacher_logprobs, self.slots, generator=generator)
            targets["sample_entries"] = (ids.long() << self.count_bits) | counts.long()
        else:
            targets["logprobs"] = teacher_logprobs.clamp_min(-65504).half()
        entropy = -(teacher_logprobs.exp() * teacher_logprobs).nan_to_num(0.0).sum(-1)
        targets["entropy"] = entropy.half()
        if self.token_logprobs:  # `next_ids` (n,): each position's next token in its row
            targets["token_logprobs"] = teacher_logprobs.gather(-1, next_ids.long().unsqueeze(-1)).squeeze(-1).clamp_min(-65504)
        return targets

    def pack(self, targets: dict[str, torch.Tensor], hidden: dict[int, torch.Tensor], rows: int) -> dict[str, np.ndarray]:
        """The Arrow columns (rows × width arrays) of rows·T positions' `position_targets`
        (concatenated in row order) and the chosen hidden states (rows, T, H)."""
        columns: dict[str, np.ndarray] = {}
        for name, values in targets.items():
            values = values.reshape(rows, -1).cpu().numpy()
            if name.endswith("_entries"):  # topk_entries -> topk_packed, sample_entries -> sample_packed
                columns[name.removesuffix("_entries") + "_packed"] = pack_bits(values.astype(np.uint64), self.entry_bits)
            else:
                columns[name] = values
        for layer in self.hidden_layers:
            columns[f"hidden_{layer}"] = hidden[layer].half().reshape(rows, -1).cpu().numpy()
        return columns

    # ---------------------------------------------------------------------------------- decode
    def decode(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Shard columns -> per-position teacher targets under the trainer's batch keys:
        `teacher_topk_ids` / `teacher_topk_logprobs` (rows, T, k), `teacher_sample_ids` /
        `teacher_sample_counts` (rows, T, n), `teacher_logits` (rows, T, V), `teacher_entropy`
        (rows, T), `teacher_hidden_<L>` (rows, T, H); for `reward`, `teacher_chosen` and
        `teacher_rejected` (rows,); for `embedding`, `teacher_embedding` (rows, D); for `tabular`,
        `teacher_prediction` (rows, C). Ids are int32,
        values float32."""
        if self.format in PER_ROW_FORMATS:
            names, one_value = PER_ROW_FORMATS[self.format]
            return {name: columns[name][:, 0 if one_value else slice(None)].astype(np.float32) for name in names}
        rows, T = len(columns["entropy"]), self.seq_len
        targets = {"teacher_entropy": columns["entropy"].astype(np.float32).reshape(rows, T)}
        if self.format == "topk":
            entries = unpack_bits(columns["topk_packed"], self.entry_bits, T * self.slots).reshape(rows, T, self.slots)
            targets["teacher_topk_ids"] = _as_int32(entries >> entries.dtype.type(self.logprob_bits))
            quantized = torch.from_numpy(_as_int32(entries & entries.dtype.type((1 << self.logprob_bits) - 1)))
            logprobs = quantized.float() * (self.logprob_floor / ((1 << self.logprob_bits) - 1))
            if self.tail:
                logprobs = _renormalise_head(logprobs, torch.from_numpy(columns["tail_logprob"]).float().reshape(rows, T))
            targets["teacher_topk_logprobs"] = logprobs.numpy()
        elif self.format == "sampled":
            entries = unpack_bits(columns["sample_packed"], self.entry_bits, T * self.slots).reshape(rows, T, self.slots)
            targets["teacher_sample_ids"] = _as_int32(entries >> entries.dtype.type(self.count_bits))
            targets["teacher_sample_counts"] = _as_int32(entries & entries.dtype.type((1 << self.count_bits) - 1))
        else:
            # Log-probs at the cache temperature τ, times τ, are the logits up to a per-position
            # constant: the loss may apply any temperature to them.
            targets["teacher_logits"] = columns["logprobs"].astype(np.float32).reshape(rows, T, -1) * np.float32(self.temperature)
        if self.token_logprobs:
            targets["teacher_token_logprobs"] = columns["token_logprobs"].astype(np.float32).reshape(rows, T)
        for layer in self.hidden_layers:
            targets[f"teacher_hidden_{layer}"] = columns[f"hidden_{layer}"].astype(np.float32).reshape(rows, T, -1)
        return targets


def _as_int32(values: np.ndarray) -> np.ndarray:
    """Unsigned values below 2^31 as int32: a free view of uint32 data, a copy of uint64 data."""
    return values.view(np.int32) if values.dtype == np.uint32 else values.astype(np.int32)


def _renormalise_head(head_logprobs: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    """Shift the k log-probs of each position so that Σ exp(head) = 1 − exp(tail)."""
    wanted = torch.log((-torch.expm1(tail_logprob.clamp_max(0.0))).clamp_min(1e-30))
    return head_logprobs + (wanted - torch.logsumexp(head_logprobs, dim=-1)).unsqueeze(-1)
