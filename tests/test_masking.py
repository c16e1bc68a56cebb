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
