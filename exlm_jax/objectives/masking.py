"""Mask selection shared by MLM, MAE-LM and ExLM (DESIGN.md §2), inside the jitted step.

Per example: L = number of non-pad slots, m = floor(mask_prob * L + U) with U ~ U[0, 1)
(fairseq's probabilistic rounding, counted over the whole block as in both papers), capped by the
number of maskable slots; `<s>`, `</s>` and `<pad>` are never selected. Positions are drawn
uniformly without replacement. Indices of masked positions are returned in increasing order,
padded to the static bound M_max = ceil(mask_prob * n) with a validity mask.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from exlm_jax.data import vocab


class MaskSelection(NamedTuple):
  is_masked: jax.Array  # (B, n) bool
  indices: jax.Array  # (B, M_max) int32, masked positions in increasing order; padded with 0
  valid: jax.Array  # (B, M_max) bool
  count: jax.Array  # (B,) int32, m per example


def max_masked(mask_prob: float, seq_len: int) -> int:
  """M_max: the most positions one block of `seq_len` slots can have masked."""
  return max(1, math.ceil(mask_prob * seq_len))


def maskable(tokens: jax.Array) -> jax.Array:
  """(B, n) bool: slots that may be selected (everything but <pad>, <s>, </s>)."""
  out = jnp.ones(tokens.shape, bool)
  for special in vocab.UNMASKABLE:
    out &= tokens != special
  return out


def select_masked_positions(tokens: jax.Array, rng: jax.Array, mask_prob: float) -> MaskSelection:
  """Chooses the positions to predict for every row of `tokens` (B, n)."""
  batch, seq_len = tokens.shape
  m_max = max_masked(mask_prob, seq_len)
  count_rng, order_rng = jax.random.split(rng)
  real_len = jnp.sum(tokens != vocab.PAD, axis=-1)
  eligible = maskable(tokens)
  uniform = jax.random.uniform(count_rng, (batch,))
  count = jnp.floor(mask_prob * real_len + uniform).astype(jnp.int32)
  count = jnp.minimum(jnp.minimum(count, jnp.sum(eligible, axis=-1)), m_max)
  # Random priority for eligible slots, +inf for the rest; the `count` smallest are masked.
  priority = jnp.where(eligible, jax.random.uniform(order_rng, (batch, seq_len)), jnp.inf)
  rank = jnp.argsort(jnp.argsort(priority, axis=-1), axis=-1)
  is_masked = rank < count[:, None]
  # Stable sort puts masked slots first, in increasing position order.
  indices = jnp.argsort(~is_masked, axis=-1, stable=True)[:, :m_max].astype(jnp.int32)
  valid = jnp.arange(m_max)[None, :] < count[:, None]
  indices = jnp.where(valid, indices, 0)
  return MaskSelection(is_masked, indices, valid, count)
