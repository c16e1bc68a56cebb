"""ExLM on packed blocks: a block of several examples computes exactly what the examples compute one per block.

Each example expands its own <s>, [MASK] slots and </s> (checked against a numpy construction), is its own
DAG row with link-table slots restarting at its first <s> copy, and gives the loss, weight, metrics, per-example
losses and gradients of the same examples run alone with the same masks (1e-5, float32) for the DAG, the
CTC ablation, rope1d_shared and a sparse DAG -- on synthetic ids and on real MOSES molecules packed by the
pipeline's greedy packer. Static bounds hold (and are reached); examples past them are counted, not lost.
"""

import gzip
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from exlm_jax import config_lib
from exlm_jax.data import pipeline, tokenizers, vocab
from exlm_jax.objectives import exlm, masking
from exlm_jax.objectives.segments import default_segments
from test_packing import LENGTHS, N, ROWS, _alone, _examples, _packed

P, K, V = 0.25, 3, 40  # n = 32: M_max = 8, G1 = 10 per example; 3 examples per block: G = 16, L = 64


def _config(max_examples, seq_len=N, vocab_size=V, num_copies=K, mask_prob=P, **knobs):
  """A 1-layer tiny ExLM; packing on with `max_examples` per block (None = packing off)."""
  config = config_lib.pretrain_config("exlm", "tiny", seq_len=seq_len, mask_prob=mask_prob)
  config.model.update(vocab_size=vocab_size, num_layers=1, dropout_rate=0.0, attention_dropout_rate=0.0)
  config.exlm = ml_collections.ConfigDict(dict(num_copies=num_copies, **knobs))
  if max_examples is not None:
    config.data.packing = True
    config.data.max_examples_per_block = max_examples
  return config


def _params(config, seed=0):
  """Initial params plus N(0, 0.05) noise, so the link table's rows and every head differ visibly."""
  model = exlm.make_model(config, True)
  tokens = jnp.full((1, config.seq_len), vocab.PAD, jnp.int32)
  params = nn.unbox(jax.jit(lambda key: model.init(key, tokens, key))(jax.random.key(seed))["params"])
  return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)


def _masks_alone(is_masked, examples, places, n):
  """The packed mask (B, n) carried to the one-example-per-row layout (R, n)."""
  alone = np.zeros((len(examples), n), bool)
  for i, (row, start) in enumerate(places):
    alone[i, :len(examples[i])] = np.asarray(is_masked)[row, start:start + len(examples[i])]
  return alone


def _example_rows(rows_of, max_examples):
  """Row of each example in the packed model's (B X) example rows: b X + (index inside its block)."""
  seen, out = {}, []
  for row in rows_of:
    out.append(row * max_examples + seen.get(row, 0))
    seen[row] = seen.get(row, 0) + 1
  return out


def _loss_and_grads(model, params, batch, selection):
  """((loss_sum, weight, metrics, per-example losses), grads) of loss_given_masks on a given selection."""
  def loss(p):
    loss_sum, weight, metrics = model.apply({"params": p}, batch, selection, method=exlm.ExLMModel.loss_given_masks)
    per_example = model.apply({"params": p}, batch, selection.is_masked, method=exlm.ExLMModel.forward)
    return loss_sum, (weight, metrics, per_example.per_example_loss)

  (loss_sum, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return jax.device_get((loss_sum,) + aux), jax.device_get(grads)


def _check_packed_equals_alone(config_packed, examples, rows_of, n, seed=5, min_masked=1):
  """The packed batch and the same examples one per block (same masks) agree to 1e-5; returns the packed run."""
  max_examples = config_packed.data.max_examples_per_block
  packed_model = exlm.make_model(config_packed, True)
  alone_config = config_packed.copy_and_resolve_references()
  alone_config.data.packing = False
  alone_model = exlm.make_model(alone_config, True)
  assert (packed_model.max_examples, alone_model.max_examples) == (max_examples, 1)
  params = _params(config_packed)
  packed, places = _packed(examples, rows_of, n)
  packed = {key: jnp.asarray(value) for key, value in packed.items()}
  sel = packed_model.apply({"params": params}, packed, jax.random.key(seed), method=exlm.ExLMModel.select_masks)
  alone_masked = _masks_alone(sel.is_masked, examples, places, n)
  assert alone_masked.sum() >= min_masked
  alone_sel = masking.selection_from_mask(jnp.asarray(alone_masked), masking.max_masked(config_packed.mask_prob, n))
  (sum_p, weight_p, metrics_p, per_p), grads_p = _loss_and_grads(packed_model, params, packed, sel)
  (sum_a, weight_a, metrics_a, per_a), grads_a = _loss_and_grads(alone_model, params, jnp.asarray(_alone(examples, n)),
                                                                 alone_sel)
  assert float(weight_p) == float(weight_a) == len(examples)
  np.testing.assert_allclose(sum_p, sum_a, rtol=1e-5)
  # Each example's own loss sits in its own row; the rows of empty example slots are 0.
  rows = _example_rows(rows_of, max_examples)
  np.testing.assert_allclose(per_p[rows], per_a, rtol=1e-5, atol=1e-6)
  assert np.all(np.delete(per_p, rows) == 0) and np.all(per_a > 0)
  assert set(metrics_p) == set(metrics_a) | {"overflow_examples"}
  for name in metrics_a:
    np.testing.assert_allclose(metrics_p[name], metrics_a[name], rtol=1e-5)
  assert tuple(map(float, metrics_p["overflow_examples"])) == (0.0, len(examples))
  for (path, gp), ga in zip(jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_a)):
    np.testing.assert_allclose(gp, ga, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_a)) > 1e-3
  return packed, sel, params, packed_model


# ----------------------------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs", [{}, {"transitions": "ctc"}, {"positions": "rope1d_shared"},
                                   {"max_transition_length": 2 * K}], ids=["dag", "ctc", "rope1d_shared", "sparse"])
def test_exlm_packed_batch_equals_examples_one_per_block(knobs):
  # Three rows of 32 slots holding 3, 2 and 1 examples.
  _check_packed_equals_alone(_config(3, **knobs), _examples(LENGTHS), ROWS, N, min_masked=10)


def test_exlm_packed_link_slots_restart_per_example():
  # The equivalence above needs the link table indexed per example; block-level slots would differ.
  config = _config(3)
  model = exlm.make_model(config, True)
  examples = _examples(LENGTHS)
  packed, places = _packed(examples, ROWS, N)
  sel = masking.select_masked_positions(jnp.asarray(packed["tokens"]), jax.random.key(5), P,
                                        jnp.asarray(packed["segment_ids"]), 3)
  params = _params(config)
  out = jax.device_get(jax.jit(lambda p, b, m: model.apply({"params": p}, b, m, method=exlm.ExLMModel.forward))(
      params, packed, sel.is_masked))
  ex = out.expansion
  rows = ex.examples
  for r in _example_rows(ROWS, 3):
    vertices = rows.vertices[r, :rows.num_vertices[r]]
    slots = ex.vertex_slot[rows.block[r]][vertices]
    np.testing.assert_array_equal(ex.link_slot[rows.block[r]][vertices], slots - slots[0])
  assert ex.link_slot.max() < model.max_link_positions == exlm.max_expanded_length(P, N, K) < ex.tokens.shape[1]


def test_exlm_packed_moses_equals_one_per_block(shared_data):
  # Real molecules, tokenized and packed in order by the pipeline's greedy packer into blocks of 96 slots.
  with gzip.open(shared_data / "smiles/moses/test.csv.gz", "rt") as f:
    smiles = [line.strip() for line in itertools.islice(f, 1, 17)]
  tokenizer = tokenizers.SmilesRegexTokenizer.build(smiles)
  examples = [np.asarray([vocab.BOS] + ids + [vocab.EOS], np.int32) for ids in tokenizer.encode_batch(smiles)]
  starts, closed_early = pipeline.greedy_pack(np.asarray([len(e) for e in examples]), 96, -1)
  rows_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts)).tolist()
  per_block = int(np.diff(starts).max())
  assert closed_early == 0 and 2 <= per_block < len(examples)
  config = _config(per_block, seq_len=96, vocab_size=tokenizer.vocab_size, num_copies=4, mask_prob=0.15)
  _check_packed_equals_alone(config, examples, rows_of, 96, seed=1, min_masked=len(examples))


def test_exlm_one_example_per_block_is_the_bare_token_path():
  examples = _examples([32, 20, 9, 4])
  tokens = jnp.asarray(_alone(examples, N))
  segment_ids, positions = default_segments(tokens)
  as_dict = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
  config = _config(1)
  params = _params(config)
  key = jax.random.key(3)

  def run(model, batch):
    fn = lambda p: (lambda out: (out[0], (out[1], out[2])))(model.apply({"params": p}, batch, key))
    return jax.device_get(jax.jit(jax.value_and_grad(fn, has_aux=True))(params))

  bare = run(exlm.make_model(config, True), tokens)
  # A packed model given a bare token array runs one example per block: the same program, bit for bit.
  bare_packed_model = run(exlm.make_model(config, True).clone(max_examples=3), tokens)
  assert jax.tree.all(jax.tree.map(np.array_equal, bare, bare_packed_model))
  (loss_b, (weight_b, metrics_b)), grads_b = bare
  (loss_d, (weight_d, metrics_d)), grads_d = run(exlm.make_model(config, True), as_dict)
  assert float(weight_d) == float(weight_b) == 4 and float(loss_d) == float(loss_b)
  assert tuple(map(float, metrics_d.pop("overflow_examples"))) == (0.0, 4.0)
  assert jax.tree.all(jax.tree.map(np.array_equal, metrics_d, metrics_b))
  for gd, gb in zip(jax.tree.leaves(grads_d), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(gd, gb, atol=1e-6, rtol=1e-6)


def test_exlm_packed_loss_with_the_batch_sharded_equals_one_device():
  # Each example row gathers from its own block only, so blocks split over 8 devices give the same step.
  lengths = [9, 12, 7, 15, 16, 30, 5, 20, 11, 6, 25, 4, 13, 10, 8, 14]
  rows_of = [0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
  config = _config(3)
  model = exlm.make_model(config, True)
  params = _params(config)
  packed = {key: jnp.asarray(value) for key, value in _packed(_examples(lengths), rows_of, N)[0].items()}
  key = jax.random.key(4)

  def loss(p, batch):
    loss_sum, weight, metrics = model.apply({"params": p}, batch, key)
    return loss_sum, (weight, metrics)

  step = jax.value_and_grad(loss, has_aux=True)
  one = jax.device_get(jax.jit(step)(params, packed))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.jit(step, in_shardings=(replicated, rows))(jax.device_put(params, replicated),
                                                           jax.device_put(packed, rows))
  assert float(one[0][1][0]) == len(lengths)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.device_get(sharded))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Expansion, bounds, overflow
# ----------------------------------------------------------------------------------------------


def _expand_packed_reference(tokens, segment_ids, positions, is_masked, k):
  """Per row: the expanded (token, position, copy, segment) slots and each example's targets, by the rule."""
  out = []
  for tok, seg, pos, mask in zip(tokens, segment_ids, positions, is_masked):
    slots, targets = [], {}
    for i in np.flatnonzero(seg > 0):
      first = i == 0 or seg[i - 1] != seg[i]
      last = i == len(seg) - 1 or seg[i + 1] != seg[i]
      if mask[i] or first or last:
        targets.setdefault(seg[i], []).append(tok[i])
        slots += [(vocab.MASK if mask[i] else tok[i], pos[i], c + 1, seg[i]) for c in range(k)]
      else:
        slots.append((tok[i], pos[i], 0, seg[i]))
    out.append((slots, targets))
  return out


def test_exlm_packed_expansion_matches_numpy_reference():
  examples = _examples(LENGTHS)
  packed, _ = _packed(examples, ROWS, N)
  sel = masking.select_masked_positions(jnp.asarray(packed["tokens"]), jax.random.key(0), 0.4,
                                        jnp.asarray(packed["segment_ids"]), 3)
  groups, block_groups = exlm.max_groups(0.4, N), exlm.max_groups(0.4, N, 3)
  ex = jax.device_get(jax.jit(lambda b, m: exlm.expand(b["tokens"], m, K, block_groups, b["segment_ids"],
                                                       b["positions"], 3, groups))(packed, sel.is_masked))
  assert ex.tokens.shape == (3, exlm.max_expanded_length(0.4, N, K, 3))
  assert ex.examples.vertices.shape == (9, K * groups)
  rows = ex.examples
  for b, (slots, targets) in enumerate(_expand_packed_reference(
      packed["tokens"], packed["segment_ids"], packed["positions"], np.asarray(sel.is_masked), K)):
    got = list(zip(ex.tokens[b], ex.positions[b], ex.copy_index[b], ex.segment_ids[b]))
    assert got[:len(slots)] == slots and ex.length[b] == len(slots)
    assert ex.padding_mask[b, len(slots):].all() and not ex.padding_mask[b, :len(slots)].any()
    assert (ex.segment_ids[b, len(slots):] == 0).all() and (ex.tokens[b, len(slots):] == vocab.PAD).all()
    for e in range(1, 4):
      r = b * 3 + e - 1
      expected = targets.get(e, [])
      assert rows.num_targets[r] == len(expected) and rows.target_valid[r].sum() == len(expected)
      np.testing.assert_array_equal(ex.targets[b][rows.groups[r, :len(expected)]], expected)
      # Its vertices are its expanded slots, in order, k per target.
      vertices = rows.vertices[r, :rows.num_vertices[r]]
      own_slots = np.flatnonzero(ex.is_ext[b] & (ex.segment_ids[b] == e))
      np.testing.assert_array_equal(ex.vertex_slot[b][vertices], own_slots)
      assert rows.length[r] == np.sum(ex.segment_ids[b] == e) and rows.block[r] == b
  assert (ex.num_examples.tolist(), ex.num_dropped.tolist()) == ([3, 2, 1], [0, 0, 0])


def test_exlm_static_bounds():
  for p, n, k in ((0.15, 128, 4), (0.2, 10, 3), (0.4, 32, 1)):
    assert exlm.max_groups(p, n, 1) == exlm.max_groups(p, n) == min(masking.max_masked(p, n) + 2, n)
    assert exlm.max_expanded_length(p, n, k, 1) == n + (k - 1) * exlm.max_groups(p, n)
    assert exlm.max_vertices(p, n, k) == k * exlm.max_groups(p, n)
  assert exlm.max_groups(0.15, 128, 4) == 20 + 3 + 8 and exlm.max_expanded_length(0.15, 128, 4, 4) == 128 + 3 * 31
  # Reached: ten 4-slot examples in 40 slots, p = 0.3 and U near 1 mask both inner slots of each: 40 groups.
  examples = _examples([4] * 10)
  packed, _ = _packed(examples, [0] * 10, 40)
  draws = masking.MaskDraws(jnp.full((1, 10), 0.999, jnp.float32), jax.random.uniform(jax.random.key(0), (1, 40)))
  sel = masking.select_from_draws(jnp.asarray(packed["tokens"]), draws, 0.3, jnp.asarray(packed["segment_ids"]))
  ex = exlm.expand(jnp.asarray(packed["tokens"]), sel.is_masked, 2, exlm.max_groups(0.3, 40, 10),
                   jnp.asarray(packed["segment_ids"]), jnp.asarray(packed["positions"]), 10, exlm.max_groups(0.3, 40))
  assert int(ex.num_targets[0]) == exlm.max_groups(0.3, 40, 10) == 40 and int(ex.num_dropped[0]) == 0
  assert int(ex.length[0]) == exlm.max_expanded_length(0.3, 40, 2, 10) == 80
  # Random packs with worst-case draws stay within every bound, per block and per example.
  rng = np.random.RandomState(1)
  n, k = 48, 3
  for x, p in itertools.product((2, 3, 5), (0.15, 0.5)):
    lengths = rng.randint(3, n // x + 1, 8 * x).tolist()
    packed, _ = _packed(_examples(lengths, seed=x), np.repeat(np.arange(8), x).tolist(), n)
    draws = masking.MaskDraws(jnp.full((8, x), 0.9999, jnp.float32), jax.random.uniform(jax.random.key(x), (8, n)))

    def expanded(batch, draws, x=x, p=p):
      sel = masking.select_from_draws(batch["tokens"], draws, p, batch["segment_ids"])
      return sel, exlm.expand(batch["tokens"], sel.is_masked, k, exlm.max_groups(p, n, x), batch["segment_ids"],
                              batch["positions"], x, exlm.max_groups(p, n))

    sel, ex = jax.device_get(jax.jit(expanded)(packed, draws))
    assert (ex.num_dropped == 0).all() and (ex.num_targets == sel.count + 2 * x).all()
    assert ex.length.max() <= exlm.max_expanded_length(p, n, k, x)
    assert ex.examples.num_targets.max() <= exlm.max_groups(p, n)
    assert ex.examples.length.max() <= exlm.max_expanded_length(p, n, k)


def test_exlm_overflow_is_counted():
  # Block 0 holds 4 examples, block 1 holds 2; the model is built for 2 per block.
  examples = _examples([6, 7, 8, 9, 10, 11])
  rows_of = [0, 0, 0, 0, 1, 1]
  config = _config(2)
  model = exlm.make_model(config, True)
  params = _params(config)
  packed, places = _packed(examples, rows_of, N)
  packed = {key: jnp.asarray(value) for key, value in packed.items()}
  is_masked = np.zeros((2, N), bool)
  is_masked[0, [2, 8, 9, 15, 23]] = is_masked[1, [3, 14]] = True  # masks in examples 1, 2, 3, 4 of block 0

  def run(mask):
    sel = masking.selection_from_mask(jnp.asarray(mask), N)
    fn = jax.jit(lambda p: model.apply({"params": p}, packed, sel, method=exlm.ExLMModel.loss_given_masks))
    out = jax.device_get(fn(params))
    ex = jax.device_get(jax.jit(lambda m: exlm.expand(
        packed["tokens"], m, K, exlm.max_groups(P, N, 2), packed["segment_ids"], packed["positions"], 2,
        exlm.max_groups(P, N)))(jnp.asarray(mask)))
    return out, ex

  (loss_sum, weight, metrics), ex = run(is_masked)
  assert float(weight) == 4 and tuple(map(float, metrics["overflow_examples"])) == (2.0, 6.0)
  assert ex.num_dropped.tolist() == [2, 0] and ex.num_examples.tolist() == [4, 2]
  # Examples 3 and 4 of block 0 stay in the sequence as unexpanded context of their own segments.
  assert not ex.is_ext[0][ex.segment_ids[0] >= 3].any() and (ex.segment_ids[0] >= 3).sum() == 8 + 9
  # The scored examples are exactly those examples alone with the same masks.
  kept = [0, 1, 4, 5]
  alone_masked = _masks_alone(is_masked, examples, places, N)[kept]
  alone_model = exlm.make_model(_config(None), True)
  alone_sel = masking.selection_from_mask(jnp.asarray(alone_masked), masking.max_masked(P, N))
  alone = alone_model.apply({"params": params}, jnp.asarray(_alone([examples[i] for i in kept], N)), alone_sel,
                            method=exlm.ExLMModel.loss_given_masks)
  np.testing.assert_allclose(loss_sum, alone[0], rtol=1e-5)
  assert float(alone[1]) == 4
  # An example with more groups than one example can have (G1 = 10) is counted too: 9 masks + <s> + </s>.
  too_many = np.zeros((2, N), bool)
  too_many[1, 11:20] = True  # the inner slots of example 2 of block 1 (slots 10..20)
  assert int(too_many.sum()) + 2 > exlm.max_groups(P, N)
  (_, weight, metrics), ex = run(too_many)
  assert ex.num_dropped.tolist() == [2, 1] and float(weight) == 3
  assert tuple(map(float, metrics["overflow_examples"])) == (3.0, 6.0)


def test_exlm_make_model_reads_max_examples_per_block():
  assert exlm.make_model(_config(None), True).max_examples == 1
  assert exlm.make_model(_config(4), True).max_examples == 4
  off = _config(4)
  off.data.packing = False
  assert exlm.make_model(off, True).max_examples == 1
  for value in (-1, 0, True):  # (ml_collections lets a bool into an int key)
    config = _config(value)
    with pytest.raises(ValueError, match="max_examples_per_block") as err:
      exlm.make_model(config, True)
    assert "\n" not in str(err.value)
  with pytest.raises(TypeError):  # a float into the int key of config_lib.data_config: refused where it is set
    _config(2.0)
