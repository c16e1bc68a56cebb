"""Batches of blocks: the token array alone, or packed blocks with their segments.

A batch is either `tokens (B, n) int32` (one example per block, `<s> ... </s> <pad>...`) or a dict
(exlm_jax/data/pipeline.py with data.packing on):
  tokens      (B, n) int32  several complete examples per block, each its own `<s> ... </s>`;
  segment_ids (B, n) int32  0 = padding, 1..E the examples of the block in order;
  positions   (B, n) int32  per example: 0 at its `<s>`, counting up inside it; 0 at padding.
One example per block is the special case segment_ids = (tokens != <pad>), positions = arange(n)
(`default_segments`). Objectives take either form: `split_batch` gives (tokens, segment_ids, positions)
with None for a bare token array (or a dict without segments), so that path stays exactly the
one-example-per-block computation.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from exlm_jax.data import vocab


def default_segments(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(segment_ids, positions), each (B, n) int32, of one-example-per-block `tokens` (B, n)."""
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return (tokens != vocab.PAD).astype(jnp.int32), positions


def split_batch(batch: Any) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """(tokens, segment_ids or None, positions or None) of a token array or a batch dict."""
  if not isinstance(batch, Mapping):
    return batch, None, None
  segment_ids, positions = batch.get("segment_ids"), batch.get("positions")
  if (segment_ids is None) != (positions is None):
    raise ValueError(f"a batch needs both 'segment_ids' and 'positions' or neither; got keys {sorted(batch)}")
  return batch["tokens"], segment_ids, positions


def real_counts(batch: Any) -> dict[str, jax.Array]:
  """{'real_tokens', 'examples'}: int32 scalars, the real (non-padding) slots and the examples of a batch.

  Packed: slots with segment_ids > 0 and, per row, its highest segment id (segments are 1..E in order);
  a bare token array: slots != <pad> and rows holding any. What throughput counts as real work.
  """
  tokens, segment_ids, _ = split_batch(batch)
  if segment_ids is None:
    segment_ids = (tokens != vocab.PAD).astype(jnp.int32)
  return {"real_tokens": jnp.sum(segment_ids > 0, dtype=jnp.int32),
          "examples": jnp.sum(jnp.max(segment_ids, axis=-1), dtype=jnp.int32)}
