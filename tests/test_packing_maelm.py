"""MAE-LM on packed blocks: a packed batch computes exactly what its examples compute one per block.

Equivalence (1e-5) of loss, weight, metrics and gradients against today's one-example-per-block path with
the same masks, for the default recipe and every knob that changes the data path, with both position
schemes; the encoder never sees masked tokens and never sees another example; a block of one example in
the batch-dict form is bit-identical to the token array; the kept bound K_max against brute force and
the real masking rule; overflow is counted; `make_model` reads the bound from the data config.
"""

import functools
import itertools

import flax
import flax.linen as nn
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.objectives import base, maelm, masking
from exlm_jax.objectives.segments import default_segments
from test_packing import LENGTHS, N, ROWS, _alone, _examples, _packed, _segment_index  # pylint: disable=wrong-import-order

P, V, E = 0.3, 40, 3  # ROWS hold at most 3 examples


def _config(positions, packing, **knobs):
  config = config_lib.pretrain_config("maelm", "tiny", seq_len=N, mask_prob=P)
  config.model.update(vocab_size=V, pre_ln=False, positions=positions, embed_layernorm=True, max_positions=64,
                      rel_pos_bins=16, max_rel_pos=24)
  config.maelm = ml_collections.ConfigDict({"decoder_layers": 1, **knobs})
  config.data.packing = packing
  config.data.max_examples_per_block = E if packing else -1
  return config


@functools.lru_cache(maxsize=None)
def _models(positions="absolute+relbias", **knobs):
  """(packed model, one-per-block model, params): the same MAE-LM built from a packed and a plain data config.

  Params are drawn directly, far from the N(0, 0.02) init so that no comparison is blind.
  """
  packed, alone = (maelm.make_model(_config(positions, packing, **knobs), True) for packing in (True, False))
  shapes = nn.meta.unbox(jax.eval_shape(alone.init, jax.random.key(0), base.dummy_tokens(1, N), jax.random.key(0)))
  rng = np.random.RandomState(0)
  flat = {path: jnp.asarray(rng.normal(0, 0.15, s.shape) + (path[-1] == "scale"), jnp.float32)
          for path, s in flax.traverse_util.flatten_dict(shapes["params"]).items()}
  return packed, alone, flax.traverse_util.unflatten_dict(flat)


def _packed_batch(examples):
  batch, places = _packed(examples, ROWS, N)
  return {k: jnp.asarray(v) for k, v in batch.items()}, places


def _alone_selection(is_masked, examples, places):
  """The packed selection carried to the one-example-per-row layout (the one-per-block bound M_max)."""
  alone = np.zeros((len(examples), N), bool)
  for i, (row, start) in enumerate(places):
    alone[i, :len(examples[i])] = np.asarray(is_masked)[row, start:start + len(examples[i])]
  return masking.selection_from_mask(jnp.asarray(alone), masking.max_masked(P, N))


def _loss_and_grads(model, params, batch, selection):
  def loss(p):
    loss_sum, weight, metrics = model.apply({"params": p}, batch, selection, method=maelm.MAELMModel.loss_given_masks)
    return loss_sum, (weight, metrics)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


_KNOBS = [{}, {"share_pos_emb": True}, {"decoder_rel_pos": True}, {"no_pos_align": True}, {"no_fill_mask": True},
          {"mask_in_encoder": True}]
_CASES = [(positions, knobs) for positions in ("absolute+relbias", "rope2d") for knobs in _KNOBS
          if not (positions == "rope2d" and knobs.get("share_pos_emb"))]  # share_pos_emb needs the absolute table


@pytest.mark.parametrize("positions,knobs", _CASES,
                         ids=[f"{p}-{'+'.join(k) or 'released'}" for p, k in _CASES])
def test_maelm_packed_batch_equals_examples_one_per_block(positions, knobs):
  packed_model, alone_model, params = _models(positions, **knobs)
  assert (packed_model.max_examples, alone_model.max_examples) == (E, 1)
  examples = _examples(LENGTHS)
  packed, places = _packed_batch(examples)
  sel = packed_model.apply({"params": params}, packed, jax.random.key(5), method=maelm.MAELMModel.select_masks)
  alone_sel = _alone_selection(sel.is_masked, examples, places)
  assert int(alone_sel.count.min()) >= 2  # every example predicts something
  (sum_p, (weight_p, metrics_p)), grads_p = _loss_and_grads(packed_model, params, packed, sel)
  (sum_a, (weight_a, metrics_a)), grads_a = _loss_and_grads(alone_model, params, jnp.asarray(_alone(examples, N)),
                                                            alone_sel)
  assert float(weight_p) == float(weight_a) == float(alone_sel.count.sum())
  np.testing.assert_allclose(sum_p, sum_a, rtol=1e-5)
  assert set(metrics_p) == set(metrics_a) == {"loss", "accuracy", "kept_overflow"}
  for name in metrics_a:
    np.testing.assert_allclose(metrics_p[name], metrics_a[name], rtol=1e-5, err_msg=name)
  assert tuple(map(float, metrics_p["kept_overflow"])) == (0.0, len(examples))  # counted per example
  for (path, gp), ga in zip(jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_a)):
    np.testing.assert_allclose(gp, ga, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
  for part in ("encoder", "decoder", "lm_head"):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a[part])) > 1e-3


@pytest.mark.parametrize("positions", ["absolute+relbias", "rope2d"])
def test_maelm_packed_encoder_never_sees_masked_tokens_nor_other_examples(positions):
  model, _, params = _models(positions)
  examples = _examples(LENGTHS, seed=1)
  packed, places = _packed_batch(examples)
  sel = model.apply({"params": params}, packed, jax.random.key(2), method=maelm.MAELMModel.select_masks)
  states = jax.jit(lambda batch: model.apply({"params": params}, batch, None, sel,
                                             method=maelm.MAELMModel.loss_and_states)[3]["decoder_input"])
  tokens, is_masked = np.asarray(packed["tokens"]), np.asarray(sel.is_masked)
  kept = ~is_masked & (np.asarray(packed["segment_ids"]) > 0)
  base_states = np.asarray(states(packed))
  # Every masked token replaced by another content token: kept states do not move at all.
  other = vocab.NUM_SPECIAL + (tokens - vocab.NUM_SPECIAL + 1 + np.arange(tokens.size).reshape(tokens.shape) % 7) % (
      V - vocab.NUM_SPECIAL)
  changed = np.where(is_masked, other, tokens)
  assert is_masked.any() and np.all(changed[is_masked] != tokens[is_masked])
  np.testing.assert_array_equal(np.asarray(states(dict(packed, tokens=jnp.asarray(changed))))[kept], base_states[kept])
  # One kept content token of example 0 changed: its example's kept states move, the row's other examples' do not.
  row, start = places[0]
  span = np.zeros_like(kept)
  span[row, start:start + len(examples[0])] = True
  col = start + 1 + int(np.flatnonzero(kept[row, start + 1:start + len(examples[0]) - 1])[0])
  moved = tokens.copy()
  moved[row, col] = vocab.NUM_SPECIAL + (tokens[row, col] - vocab.NUM_SPECIAL + 1) % (V - vocab.NUM_SPECIAL)
  diff = np.abs(np.asarray(states(dict(packed, tokens=jnp.asarray(moved)))) - base_states).max(-1)
  others_in_span = span & kept
  others_in_span[row, col] = False
  assert diff[others_in_span].min() > 1e-4
  np.testing.assert_array_equal(diff[~span], 0.0)


@pytest.mark.parametrize("knobs", [{}, {"no_pos_align": True, "decoder_rel_pos": True}, {"mask_in_encoder": True}],
                         ids=["released", "no_pos_align+decoder_rel_pos", "mask_in_encoder"])
def test_maelm_one_example_blocks_as_a_dict_are_the_token_array_path(knobs):
  """Same draws, masks and forward bits; gradients to 1e-6 (the dict's masks and gathers have other shapes,
  so XLA may sum the backward's terms in another order)."""
  _, model, params = _models(**knobs)
  tokens = jnp.asarray(_alone(_examples(LENGTHS, seed=3), N))
  segment_ids, positions = default_segments(tokens)
  as_dict = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
  key = jax.random.key(4)

  @jax.jit
  def run(batch):
    def loss(p):
      loss_sum, weight, metrics, states = model.apply({"params": p}, batch, key,
                                                      method=maelm.MAELMModel.loss_and_states)
      return loss_sum, (weight, metrics, states)
    return jax.value_and_grad(loss, has_aux=True)(params)

  (forward_bare, grads_bare), (forward_dict, grads_dict) = run(tokens), run(as_dict)
  assert float(forward_bare[1][0]) > 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(forward_bare), jax.tree.leaves(forward_dict)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_bare), jax.tree.leaves(grads_dict)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_maelm_predict_on_a_packed_dict_equals_each_example_alone():
  packed_model, alone_model, params = _models("rope2d")
  examples = _examples(LENGTHS, seed=4)
  for ex in examples:
    ex[1:-1:3] = vocab.MASK  # at least two [MASK] slots per example
  packed, places = _packed_batch(examples)
  asked = [np.flatnonzero(ex == vocab.MASK)[:2] for ex in examples]
  at_packed = np.zeros((3, 2 * E), np.int32)
  for i, ((row, start), j) in enumerate(zip(places, _segment_index(ROWS))):
    at_packed[row, 2 * j:2 * j + 2] = start + asked[i]
  got = packed_model.apply({"params": params}, packed, at_packed, method=maelm.MAELMModel.predict)
  want = alone_model.apply({"params": params}, jnp.asarray(_alone(examples, N)), jnp.asarray(np.stack(asked)),
                           method=maelm.MAELMModel.predict)
  for i, ((row, _), j) in enumerate(zip(places, _segment_index(ROWS))):
    np.testing.assert_allclose(got[row, 2 * j:2 * j + 2], want[i], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The kept bound K_max
# ----------------------------------------------------------------------------------------------


def _kept_one(p, length):
  """Tokens one well-formed example keeps at U = 0, float32 as the masking rule evaluates p * L."""
  return length - min(int(np.floor(np.float32(p) * np.float32(length))), length - 2)


def _brute_force_max_kept(p, n, max_examples):
  """The worst block by enumeration: every multiset of at most E example lengths >= 2 in n slots."""
  best, argbest = 0, ()
  for count in range(1, max_examples + 1):
    for lengths in itertools.combinations_with_replacement(range(2, n + 1), count):
      if sum(lengths) <= n and sum(_kept_one(p, L) for L in lengths) > best:
        best, argbest = sum(_kept_one(p, L) for L in lengths), lengths
  return best, argbest


@pytest.mark.parametrize("p", [0.15, 0.3, 0.5, 0.8])
def test_maelm_max_kept_equals_brute_force(p):
  for n in (2, 5, 9, 16):
    for e in (1, 2, 3, 5):
      assert maelm.max_kept(p, n, e) == _brute_force_max_kept(p, n, e)[0], (p, n, e)


def test_maelm_max_kept_one_example_is_unchanged_and_several_add_at_most_one_each():
  for p, n in itertools.product((0.1, 0.15, 0.21, 0.3, 0.45), (16, 64, 128, 300, 512)):
    lengths = np.arange(n + 1, dtype=np.float32)
    one = int(np.max(lengths - np.floor(np.float32(p) * lengths)))  # the one-example-per-block bound
    assert maelm.max_kept(p, n) == one
    for e in (2, 4, 8):  # p < 1/2: an example's specials never exceed what p masks, so each adds < 1
      assert one <= maelm.max_kept(p, n, e) <= min(n, one + e - 1)
  assert maelm.max_kept(0.21, 300) == 238  # float32(0.21) * 300 < 63: one more than n - floor(p n)
  assert maelm.max_kept(0.15, 128, 40) == 128  # forty examples of 3 slots mask nothing at p = 0.15


def _kept_through_the_rule(p, rows, n, u):
  """(kept per row, overflow count) of packed rows of `rows` example lengths, with U = u for every example."""
  examples = [ex for row in rows for ex in _examples(row, seed=len(row))]
  batch, _ = _packed(examples, [r for r, row in enumerate(rows) for _ in row], n)
  e = max(len(row) for row in rows)
  draws = masking.MaskDraws(jnp.full((len(rows), e), u, jnp.float32),
                            jax.random.uniform(jax.random.key(len(rows)), (len(rows), n)))
  tokens, segment_ids = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])
  sel = masking.select_from_draws(tokens, draws, p, segment_ids)
  view = maelm.compact_kept(tokens, sel.is_masked, maelm.max_kept(p, n, e), segment_ids, jnp.asarray(batch["positions"]))
  kept = np.asarray(jnp.sum(~sel.is_masked & (segment_ids > 0), axis=1))
  return kept, int(view.overflow.sum())


@pytest.mark.parametrize("p,n,e", [(0.15, 24, 3), (0.5, 16, 4), (0.8, 16, 3), (0.15, 128, 4)])
def test_maelm_max_kept_holds_through_the_masking_rule_and_is_attained(p, n, e):
  rng = np.random.RandomState(0)
  rows = []
  for _ in range(64):  # random greedy packs of at most e examples
    row, left = [], n
    while len(row) < e and left >= 2:
      row.append(int(rng.randint(2, min(left, n // 2 + 8) + 1)))
      left -= row[-1]
    rows.append(row)
  if n <= 24:  # the worst block found by enumeration is attained
    rows.append(list(_brute_force_max_kept(p, n, e)[1]))
  k_max = maelm.max_kept(p, n, e)
  for u in (0.0, float(np.nextafter(np.float32(1), np.float32(0)))):
    kept, overflow = _kept_through_the_rule(p, rows, n, u)
    assert kept.max() <= k_max and overflow == 0
    if u == 0.0 and n <= 24:
      assert kept[-1] == k_max


def test_maelm_packed_overflow_is_counted_and_blanked():
  """Outside the bound only malformed blocks: here an example whose content is all </s> (never masked)."""
  model, _, params = _models()
  examples = _examples(LENGTHS)
  examples[3][1:-1] = vocab.EOS  # 13 unmaskable tokens in row 1, next to a normal example of 16
  packed, _ = _packed_batch(examples)
  loss_sum, weight, metrics, states = jax.jit(lambda b, k: model.apply(
      {"params": params}, b, k, method=maelm.MAELMModel.loss_and_states))(packed, jax.random.key(1))
  is_masked, segment_ids = np.asarray(states["is_masked"]), np.asarray(packed["segment_ids"])
  kept = ~is_masked & (segment_ids > 0)
  k_max = maelm.max_kept(P, N, E)
  slot = np.cumsum(kept, axis=1) - 1
  overflow = kept & (slot >= k_max)
  assert overflow.sum() == np.maximum(kept.sum(1) - k_max, 0).sum() > 0
  assert tuple(map(float, metrics["kept_overflow"])) == (overflow.sum(), len(examples))
  assert np.all(np.asarray(states["decoder_input"])[overflow] == 0) and np.isfinite(float(loss_sum)) and weight > 0


def test_maelm_make_model_reads_max_examples_from_the_data_config():
  config = _config("rope2d", True)
  config.data.max_examples_per_block = 7
  assert maelm.make_model(config, True).max_examples == 7
  config.data.packing = False
  assert maelm.make_model(config, True).max_examples == 1
  for value in (-1, 0):
    config = _config("rope2d", True)
    config.data.max_examples_per_block = value
    with pytest.raises(ValueError, match=r"^config.data.max_examples_per_block=.* data.packing on"):
      maelm.make_model(config, True)
