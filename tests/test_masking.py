"""Masking: special tokens protected, counts follow probabilistic rounding, indices sorted/valid."""

import jax
import jax.numpy as jnp
import numpy as np

from exlm_jax.data import vocab
from exlm_jax.objectives.masking import max_masked, select_masked_positions


def _blocks(lengths, n):
  rows = []
  for length in lengths:
    row = np.full(n, vocab.PAD, np.int32)
    row[:length] = np.arange(length) % 20 + vocab.NUM_SPECIAL
    row[0], row[length - 1] = vocab.BOS, vocab.EOS
    rows.append(row)
  return jnp.asarray(np.stack(rows))


def test_specials_never_masked_and_indices_consistent():
  n, p = 32, 0.3
  tokens = _blocks([32, 20, 5, 3, 12, 32, 31, 2], n).at[0, 10].set(vocab.EOS)  # an interior </s> too
  for seed in range(20):
    sel = select_masked_positions(tokens, jax.random.key(seed), p)
    is_masked = np.asarray(sel.is_masked)
    tok = np.asarray(tokens)
    assert not is_masked[np.isin(tok, vocab.UNMASKABLE)].any()
    assert sel.indices.shape == (8, max_masked(p, n))
    for b in range(8):
      expected = np.flatnonzero(is_masked[b])
      m = int(sel.count[b])
      assert m == len(expected)
      np.testing.assert_array_equal(np.asarray(sel.indices[b, :m]), expected)
      assert np.asarray(sel.valid[b]).sum() == m


def test_count_is_probabilistic_rounding_of_real_length():
  # L = 37 real slots, p = 0.15 -> p*L = 5.55: m is 5 w.p. 0.45 and 6 w.p. 0.55 (fairseq rule).
  n, p, trials = 40, 0.15, 4000
  tokens = jnp.tile(_blocks([37], n), (trials, 1))
  counts = np.asarray(select_masked_positions(tokens, jax.random.key(0), p).count)
  assert set(np.unique(counts)) == {5, 6}
  assert abs((counts == 6).mean() - 0.55) < 0.03
  # Positions are uniform over the 35 maskable slots.
  freq = np.asarray(select_masked_positions(tokens, jax.random.key(1), p).is_masked).mean(0)
  assert freq[0] == 0 and freq[36] == 0 and freq[37:].sum() == 0
  np.testing.assert_allclose(freq[1:36], 5.55 / 35, atol=0.025)


def _single_example_rule(tokens, rng, mask_prob):
  """The rule as written before packed blocks existed (one example per block), kept verbatim as the reference."""
  batch, seq_len = tokens.shape
  m_max = max(1, int(np.ceil(mask_prob * seq_len)))
  count_rng, order_rng = jax.random.split(rng)
  real_len = jnp.sum(tokens != vocab.PAD, axis=-1)
  eligible = (tokens != vocab.PAD) & (tokens != vocab.BOS) & (tokens != vocab.EOS)
  uniform = jax.random.uniform(count_rng, (batch,))
  count = jnp.floor(mask_prob * real_len + uniform).astype(jnp.int32)
  count = jnp.minimum(jnp.minimum(count, jnp.sum(eligible, axis=-1)), m_max)
  priority = jnp.where(eligible, jax.random.uniform(order_rng, (batch, seq_len)), jnp.inf)
  rank = jnp.argsort(jnp.argsort(priority, axis=-1), axis=-1)
  is_masked = rank < count[:, None]
  indices = jnp.argsort(~is_masked, axis=-1, stable=True)[:, :m_max].astype(jnp.int32)
  valid = jnp.arange(m_max)[None, :] < count[:, None]
  return is_masked, jnp.where(valid, indices, 0), valid, count


def test_one_example_per_block_is_bit_identical_to_the_single_example_rule():
  rng = np.random.RandomState(0)
  for seed in range(12):
    n = int(rng.randint(4, 60))
    p = float(rng.choice([0.15, 0.3, 0.5, 0.8]))
    tokens = _blocks(rng.randint(2, n + 1, 6), n)
    key = jax.random.key(seed)
    expected = _single_example_rule(tokens, key, p)
    segment_ids = (tokens != vocab.PAD).astype(jnp.int32)
    for sel in (select_masked_positions(tokens, key, p), select_masked_positions(tokens, key, p, segment_ids)):
      for got, want in zip(sel, expected):
        np.testing.assert_array_equal(got, want)
    # A larger example bound only widens the index padding: same masks, same first indices.
    wide = select_masked_positions(tokens, key, p, segment_ids, max_examples=4)
    np.testing.assert_array_equal(wide.is_masked, expected[0])
    np.testing.assert_array_equal(wide.indices[:, :expected[1].shape[1]], expected[1])
    assert wide.indices.shape[1] == max_masked(p, n, 4) == min(n, expected[1].shape[1] + 3)
