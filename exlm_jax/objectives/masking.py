"""Mask selection shared by MLM, MAE-LM and ExLM (docs/design.md §2.2), inside the jitted step.

The rule, per EXAMPLE: a block holds one example, or several packed ones told apart by `segment_ids`
(objectives/segments.py; 0 = padding, 1..E the examples in order). For example e with L_e slots
(its `<s> ... </s>`), m_e = floor(mask_prob * L_e + U_e) with U_e ~ U[0, 1) (fairseq's probabilistic
rounding, counted over the whole example as in both papers), capped by the example's maskable slots;
`<s>`, `</s>` and `<pad>` are never selected. Inside the example the m_e maskable slots with the
smallest priority ~ U[0, 1) (one per slot) are masked: uniform without replacement.

Indices of all masked slots of a row come in increasing order, padded to the static bound
`max_masked(mask_prob, n, max_examples)` = ceil(mask_prob * n) + max_examples - 1 (each example's
rounding adds < 1), with a validity mask.

Randomness and rule are separate, so the same examples laid out differently get the same masks:
  * `mask_draws(rng, B, n, E)` -> MaskDraws: U (B, E) per example slot of a row, priority (B, n) per slot;
  * `select_from_draws(tokens, draws, mask_prob, segment_ids)` -> MaskSelection (the rule, deterministic);
  * `select_masked_positions(tokens, rng, mask_prob, segment_ids, max_examples)` = both;
  * `selection_from_mask(is_masked, m_max)` turns any given (B, n) mask into a MaskSelection, for objectives
    that take a GIVEN selection (`MLMModel.loss_given_masks(batch, selection)`).
Moving an example to another row/offset together with its U_e and its slots' priorities gives it the
same masked slots (tests/test_packing.py). With segment_ids None (or one segment per row) the draws and
masks are bit-identical to the one-example-per-block rule: U[:, 0] = uniform(count_rng, (B,)),
priority = uniform(order_rng, (B, n)), count capped at the bound.

Rows holding more than `max_examples` examples (a block source and a model configured with different
bounds) have their examples past the bound masked as ONE example: the static shapes still hold.
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
  count: jax.Array  # (B,) int32, masked slots per row (the sum over the row's examples)


class MaskDraws(NamedTuple):
  count_uniform: jax.Array  # (B, E) float32: U_e for example e + 1 of each row
  priority: jax.Array  # (B, n) float32: one uniform per slot; the smallest ones of an example are masked


def max_masked(mask_prob: float, seq_len: int, max_examples: int = 1) -> int:
  """M_max: the most positions one block of `seq_len` slots holding <= max_examples examples can have masked.

  sum_e floor(p L_e + U_e) < p n + E, so it is at most ceil(p n) + E - 1 (also at most n).
  """
  return max(1, min(seq_len, math.ceil(mask_prob * seq_len) + max_examples - 1))


def maskable(tokens: jax.Array) -> jax.Array:
  """(B, n) bool: slots that may be selected (everything but <pad>, <s>, </s>)."""
  out = jnp.ones(tokens.shape, bool)
  for special in vocab.UNMASKABLE:
    out &= tokens != special
  return out


def mask_draws(rng: jax.Array, batch: int, seq_len: int, max_examples: int = 1) -> MaskDraws:
  """The uniforms one selection uses: U (B, max_examples) and priorities (B, seq_len)."""
  count_rng, order_rng = jax.random.split(rng)
  count_uniform = jax.random.uniform(count_rng, (batch,))[:, None]
  if max_examples > 1:  # the first example's U stays the one-example-per-block draw
    more = jax.random.uniform(jax.random.fold_in(count_rng, 1), (batch, max_examples - 1))
    count_uniform = jnp.concatenate([count_uniform, more], axis=1)
  return MaskDraws(count_uniform, jax.random.uniform(order_rng, (batch, seq_len)))


def selection_from_mask(is_masked: jax.Array, m_max: int) -> MaskSelection:
  """MaskSelection for a given (B, n) mask with at most m_max masked slots per row."""
  count = jnp.sum(is_masked, axis=-1, dtype=jnp.int32)
  # Stable sort puts masked slots first, in increasing position order.
  indices = jnp.argsort(~is_masked, axis=-1, stable=True)[:, :m_max].astype(jnp.int32)
  valid = jnp.arange(m_max)[None, :] < count[:, None]
  return MaskSelection(is_masked, jnp.where(valid, indices, 0), valid, count)


def select_from_draws(tokens: jax.Array, draws: MaskDraws, mask_prob: float,
                      segment_ids: jax.Array | None = None) -> MaskSelection:
  """The masking rule for tokens (B, n) given the draws; max_examples E = draws.count_uniform.shape[1]."""
  seq_len = tokens.shape[1]
  num_examples = draws.count_uniform.shape[1]
  m_max = max_masked(mask_prob, seq_len, num_examples)
  if segment_ids is None:
    segment_ids = (tokens != vocab.PAD).astype(jnp.int32)
  example = jnp.minimum(segment_ids, num_examples)  # (B, n): 0 = no example, else 1..E
  eligible = maskable(tokens) & (example > 0)
  member = example[..., None] == jnp.arange(1, num_examples + 1)  # (B, n, E)
  length = jnp.sum(member, axis=1)  # (B, E) L_e
  count = jnp.floor(mask_prob * length + draws.count_uniform).astype(jnp.int32)
  count = jnp.minimum(count, jnp.sum(member & eligible[..., None], axis=1))
  # Float rounding of p * L_e could in principle exceed the bound: cap the running total at M_max.
  count = jnp.minimum(count, jnp.maximum(m_max - (jnp.cumsum(count, axis=1) - count), 0))
  # Rank of every slot inside its example by priority (+inf for slots that may not be masked): sort by
  # (example, priority); an example's first rank is the number of slots of lower examples.
  priority = jnp.where(eligible, draws.priority, jnp.inf)
  rank = jnp.argsort(jnp.lexsort((priority, example), axis=-1), axis=-1)
  first = seq_len - jnp.sum(length, axis=1, keepdims=True) + jnp.cumsum(length, axis=1) - length  # (B, E)
  slot_example = jnp.maximum(example, 1) - 1
  rank = rank - jnp.take_along_axis(first, slot_example, axis=1)
  is_masked = eligible & (rank < jnp.take_along_axis(count, slot_example, axis=1))
  return selection_from_mask(is_masked, m_max)


def select_masked_positions(tokens: jax.Array, rng: jax.Array, mask_prob: float,
                            segment_ids: jax.Array | None = None, max_examples: int = 1) -> MaskSelection:
  """Chooses the positions to predict for every row of `tokens` (B, n), per example of `segment_ids`."""
  batch, seq_len = tokens.shape
  return select_from_draws(tokens, mask_draws(rng, batch, seq_len, max_examples), mask_prob, segment_ids)
