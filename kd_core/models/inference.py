"""Teacher inference for a language-model cache, in memory bounded by a chunk of positions.

Materialising a batch's logits costs rows × T × V floats, and its float32 log-softmax as many
again (about 40 GB each for 32 rows of 2048 tokens over a 152k vocabulary). `CausalLMTeacher`
never holds either. Per batch it runs the model's body once (its final hidden states, rows × T ×
H, and any cached hidden layers), then its output layer chunk by chunk over the flattened
positions: the chunk's logits in the model's dtype, their float32 log-softmax at the cache
temperature, and the chunk's targets (`CacheLayout.position_targets`: top-k, samples drawn on the
model's device, full log-probs, entropy), which are all the cache keeps. The peak is a few
chunk × V float32 tensors beside the body's activations.

Chunks are `positions_per_chunk` positions, by default as many as fit `LOGITS_CHUNK_BYTES` of
float32 log-probs, in whole blocks of 64. The targets do not depend on the chunk size where the
arithmetic is the same. On a CPU in float32 a position's logits are the same dot products in any
chunk while the matrix kernels take their main path (chunks of 1 to 7 rows, a remainder path,
rounded differently on this project's test machine; blocks of 64, and a batch's last chunk, a
multiple of T, did not), and the draws take the generator's stream in position order: the cache
is byte-identical to computing the whole batch at once (`tests/test_cache.py`, at several chunk
sizes). On a GPU the draws use the device's generator, whose stream advances per
call: the chunk boundaries, a pure function of V, are part of what fixes a sampled cache's bytes
there, and changing `LOGITS_CHUNK_BYTES` needs a new cache code version (`STAGE_CODE_VERSIONS`).

A model whose forward does more than its output layer applied to the body's final hidden states
(e.g. Gemma 2's logit soft-capping) is found by one comparison at load time; its logits then come
from its whole forward pass (one rows × T × V tensor in the model's dtype), and only the float32
log-softmax and the targets are chunked.
"""

from __future__ import annotations

import numpy as np
import torch

from kd_core.cache.format import CacheLayout

LOGITS_CHUNK_BYTES = 256 * 2**20
"""Float32 log-probs computed at once: positions per chunk = this / (4 bytes · V), in blocks of 64
(384 positions for a 152k vocabulary; every position of a batch at the demo's 2k)."""

POSITION_BLOCK = 64
"""Default chunks are whole blocks of this many positions (see the module docstring)."""


def teacher_dtype(device: str) -> torch.dtype | str:
    """The dtype the cache runs a language-model teacher in. On a GPU its own (`"auto"`:
    config.json's `dtype`, else its weights'): bfloat16 for most published models, float32 for a
    teacher kdflow trained. On a CPU float32: without AVX512-BF16 or AMX, bf16 matrix products are
    emulated (a 512 × 512 × 8192 product took 185 times as long as in float32 on this project's
    AMD EPYC test machine), and float32 keeps CPU caches what they were."""
    return "auto" if device == "cuda" else torch.float32


def default_positions_per_chunk(vocab_size: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size * POSITION_BLOCK)) * POSITION_BLOCK


class CausalLMTeacher:
    """A causal LM's cache targets, batch by batch, with its output layer run chunk by chunk."""

    def __init__(self, model, layout: CacheLayout, positions_per_chunk: int | None = None):
        self.model, self.layout = model, layout
        self.positions_per_chunk = positions_per_chunk or default_positions_per_chunk(layout.vocab_size)
        self.output_layer = separable_output_layer(model, min(layout.seq_len, 8))

    @torch.no_grad()
    def columns(self, rows: np.ndarray, batch_size: int, generator: torch.Generator, position_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The Arrow columns of token rows (rows, T), `batch_size` rows through the model at a time;
        `generator` (on the model's device) draws the samples of a sampled cache. `position_ids`
        (rows, T), where rows hold several sequences (packed chat data), restart with each one."""
        device = next(self.model.parameters()).device
        blocks: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(rows), batch_size):
            batch = torch.as_tensor(rows[start : start + batch_size], dtype=torch.long, device=device)
            positions = None if position_ids is None else torch.as_tensor(position_ids[start : start + batch_size], dtype=torch.long, device=device)
            targets, hidden = self.batch_targets(batch, generator, positions)
            for name, values in self.layout.pack(targets, hidden, rows=len(batch)).items():
                blocks.setdefault(name, []).append(values)
        return {name: np.concatenate(parts) for name, parts in blocks.items()}

    def batch_targets(
        self, batch: torch.Tensor, generator: torch.Generator, position_ids: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        """`CacheLayout.position_targets` of every position of a batch (rows, T), in row order, and
        the cached hidden layers (rows, T, H)."""
        forward = teacher_forward(self.model, batch, self.layout.hidden_layers, self.output_layer, position_ids)
        # each position's next token in its row (the last position's: its own, never read)
        next_ids = torch.cat([batch[:, 1:], batch[:, -1:]], dim=1).flatten() if self.layout.token_logprobs else None
        chunks = [
            self.chunk_targets(
                forward.logits(slice(start, start + self.positions_per_chunk)), generator,
                None if next_ids is None else next_ids[start : start + self.positions_per_chunk],
            )
            for start in range(0, batch.numel(), self.positions_per_chunk)
        ]
        targets = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
        return targets, forward.hidden

    def chunk_targets(self, logits: torch.Tensor, generator: torch.Generator, next_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One chunk's targets from its logits (n, V') in the model's dtype; a padded output layer's
        entries past the data's vocabulary are dropped before the softmax. `next_ids` (n,): the
        chunk's next tokens, for a layout that keeps their log-probs."""
        teacher_logprobs = torch.log_softmax(logits[..., : self.layout.vocab_size].float() / self.layout.temperature, dim=-1)
        del logits  # the chunk's last reference: freed before the targets' temporaries are made
        return self.layout.position_targets(teacher_logprobs, generator, next_ids)


class TeacherForward:
    """A teacher's forward pass over a batch of token rows (rows, T): its logits at any flattened
    positions, and the hidden states asked for (layer -> (rows, T, H))."""

    def __init__(self, final_hidden: torch.Tensor | None, whole_logits: torch.Tensor | None, output_layer, hidden: dict[int, torch.Tensor]):
        self.final_hidden, self.whole_logits, self.output_layer, self.hidden = final_hidden, whole_logits, output_layer, hidden

    def logits(self, positions: slice) -> torch.Tensor:
        """(n, V') logits of the flattened positions, in the model's dtype: the output layer applied
        to just these positions' final hidden states, or cut from the whole forward's logits."""
        if self.output_layer is not None:
            return self.output_layer(self.final_hidden[positions])
        return self.whole_logits.flatten(0, 1)[positions]


def teacher_forward(model, batch: torch.Tensor, hidden_layers, output_layer=None, position_ids: torch.Tensor | None = None) -> TeacherForward:
    """The teacher's forward pass, shared by the cache stage (`CausalLMTeacher`) and the online
    teacher (`kd_core.train.targets.OnlineTargets`). With `output_layer` (see
    `separable_output_layer`) the model's body runs once and the output layer later, on the
    positions asked for; without it the whole forward pass gives every position's logits.
    `position_ids` (rows, T) restart with every sequence of a packed row, which keeps attention
    within each (None: one sequence per row). Call it under `torch.no_grad()`."""
    wants_hidden = bool(hidden_layers)
    inputs = {"input_ids": batch} | ({} if position_ids is None else {"position_ids": position_ids})
    if output_layer is not None:
        output = model.base_model(**inputs, output_hidden_states=wants_hidden, use_cache=False)
        forward = TeacherForward(output.last_hidden_state.flatten(0, 1), None, output_layer, {})
    else:
        output = model(**inputs, output_hidden_states=wants_hidden, use_cache=False)
        forward = TeacherForward(None, output.logits, None, {})
    forward.hidden = {layer: output.hidden_states[layer] for layer in hidden_layers}
    return forward


@torch.no_grad()
def separable_output_layer(model, probe_length: int) -> torch.nn.Module | None:
    """The model's output layer when its logits are exactly that layer applied to its body's final
    hidden states (Llama, Qwen, Mistral, GPT-2, ...), checked on one probe row; None when its
    forward does more (soft-capping, logit scaling) or it has no separate output layer."""
    head = model.get_output_embeddings()
    if head is None or model.base_model is model:
        return None
    device = next(model.parameters()).device
    probe = torch.arange(probe_length, device=device).unsqueeze(0) % model.config.vocab_size
    whole = model(input_ids=probe, use_cache=False).logits
    split = head(model.base_model(input_ids=probe, use_cache=False).last_hidden_state)
    return head if whole.shape == split.shape and torch.equal(whole, split) else None
