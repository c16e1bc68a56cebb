"""Packed blocks: a block of several examples computes exactly what the examples compute one per block.

encoder / masking / mlm: the same examples packed vs one per block (same masks) agree to 1e-5;
pipeline: the greedy pack of real MOSES (and text documents) keeps every record once, in order, with its
own <s> ... </s> and positions, fills >= 85 % of 128 slots, is cached by its options and resumes exactly;
trainer: a packed step on a (2,4) mesh equals one device, real tokens are counted on device, and a killed
packed run via main.py resumes to the losses of an uninterrupted one.
"""

import dataclasses
import gzip
import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exlm_jax import config_lib
from exlm_jax.data import blocks, builders
from exlm_jax.data import pipeline
from exlm_jax.data import vocab
from exlm_jax.models import encoder as enc
from exlm_jax.objectives import base, get, mlm
from exlm_jax.objectives import masking, segments
from exlm_jax.objectives.segments import default_segments, split_batch
from exlm_jax.train import partitioning, steps


# ----------------------------------------------------------------------------------------------
# Layouts: the same examples packed (several per row) and alone (one per row)
# ----------------------------------------------------------------------------------------------

def _examples(lengths, vocab_size=40, seed=0):
  """Examples `<s> x ... x </s>` of the given total lengths (>= 2)."""
  rng = np.random.RandomState(seed)
  out = []
  for length in lengths:
    ex = rng.randint(vocab.NUM_SPECIAL, vocab_size, length)
    ex[0], ex[-1] = vocab.BOS, vocab.EOS
    out.append(ex.astype(np.int32))
  return out


def _packed(examples, rows_of, n, pad_token=vocab.PAD):
  """(batch dict, places): example i at the next free slot of row rows_of[i]; places[i] = (row, start)."""
  num_rows = max(rows_of) + 1
  tokens = np.full((num_rows, n), pad_token, np.int32)
  segment_ids = np.zeros((num_rows, n), np.int32)
  positions = np.zeros((num_rows, n), np.int32)
  used, count, places = [0] * num_rows, [0] * num_rows, []
  for ex, row in zip(examples, rows_of):
    start = used[row]
    assert start + len(ex) <= n
    count[row] += 1
    tokens[row, start:start + len(ex)] = ex
    segment_ids[row, start:start + len(ex)] = count[row]
    positions[row, start:start + len(ex)] = np.arange(len(ex))
    used[row] += len(ex)
    places.append((row, start))
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}, places


def _alone(examples, n):
  """(R, n) tokens: example i alone in row i, padded."""
  tokens = np.full((len(examples), n), vocab.PAD, np.int32)
  for i, ex in enumerate(examples):
    tokens[i, :len(ex)] = ex
  return tokens


# Three rows of 32 slots holding 3, 2 and 1 examples.
LENGTHS, ROWS, N = [9, 12, 7, 15, 16, 30], [0, 0, 0, 1, 1, 2], 32


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["rope2d", "absolute+relbias"])
@pytest.mark.parametrize("pre_ln", [True, False])
def test_encoder_packed_block_equals_each_example_alone(scheme, pre_ln):
  cfg = enc.ModelConfig(vocab_size=40, num_layers=2, d_model=32, num_heads=2, mlp_dim=64, dropout_rate=0.0,
                        attention_dropout_rate=0.0, max_positions=64, rel_pos_bins=32, max_rel_pos=32,
                        positions=scheme, pre_ln=pre_ln, embed_layernorm=not pre_ln)
  examples = _examples(LENGTHS)
  # Padding slots hold arbitrary tokens: segment 0 alone must keep them out.
  packed, places = _packed(examples, ROWS, N, pad_token=17)
  alone = _alone(examples, N)
  model = enc.Encoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(alone))["params"])
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  run = jax.jit(lambda tokens, positions, segment_ids, padding: model.apply(
      {"params": params}, tokens, positions, padding_mask=padding, segment_ids=segment_ids))
  out_packed = np.asarray(run(packed["tokens"], packed["positions"], packed["segment_ids"], None))
  out_alone = np.asarray(jax.jit(lambda t: model.apply({"params": params}, t, padding_mask=t == vocab.PAD))(alone))
  for i, (row, start) in enumerate(places):
    length = len(examples[i])
    np.testing.assert_allclose(out_packed[row, start:start + length], out_alone[i, :length], atol=1e-5, rtol=1e-5)
  assert np.isfinite(out_packed).all()  # padding queries attend to nothing and stay finite
  # Without the segment mask the examples would see each other: the check above is not vacuous.
  mixed = np.asarray(model.apply({"params": params}, packed["tokens"], packed["positions"],
                                 padding_mask=packed["segment_ids"] == 0))
  assert not np.allclose(mixed[0, :9], out_alone[0, :9], atol=1e-3)


def test_encoder_segment_mask_on_the_unfused_dropout_path():
  cfg = enc.ModelConfig(vocab_size=40, num_layers=1, d_model=32, num_heads=2, mlp_dim=64, dropout_rate=0.0,
                        attention_dropout_rate=1e-9)
  examples = _examples(LENGTHS)
  packed, places = _packed(examples, ROWS, N)
  params = nn.unbox(enc.Encoder(cfg).init(jax.random.key(0), jnp.asarray(packed["tokens"]))["params"])
  args = (packed["tokens"], packed["positions"])
  fused = enc.Encoder(cfg, deterministic=True).apply({"params": params}, *args, segment_ids=packed["segment_ids"])
  unfused = enc.Encoder(cfg, deterministic=False).apply({"params": params}, *args, segment_ids=packed["segment_ids"],
                                                        rngs={"dropout": jax.random.key(1)})
  real = packed["segment_ids"] > 0
  np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(unfused)[real], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------

def _draws_alone(draws, places, examples, n, e_of):
  """Each example's own U and slot priorities, carried to its one-per-row layout (U in column 0)."""
  u = np.asarray(draws.count_uniform)
  prio = np.asarray(draws.priority)
  count_u = np.zeros((len(examples), 1), np.float32)
  alone_prio = np.random.RandomState(9).rand(len(examples), n).astype(np.float32)  # pads: anything
  for i, (row, start) in enumerate(places):
    count_u[i, 0] = u[row, e_of[i]]
    alone_prio[i, :len(examples[i])] = prio[row, start:start + len(examples[i])]
  return masking.MaskDraws(jnp.asarray(count_u), jnp.asarray(alone_prio))


def _segment_index(rows_of):
  """0-based index of every example inside its row."""
  seen = {}
  out = []
  for row in rows_of:
    out.append(seen.get(row, 0))
    seen[row] = out[-1] + 1
  return out


@pytest.mark.parametrize("mask_prob", [0.15, 0.4, 0.8])
def test_masking_packed_selection_equals_each_example_alone(mask_prob):
  examples = _examples(LENGTHS)
  packed, places = _packed(examples, ROWS, N)
  e_of = _segment_index(ROWS)
  tokens, segment_ids = jnp.asarray(packed["tokens"]), jnp.asarray(packed["segment_ids"])
  max_examples = 3
  for seed in range(10):
    draws = masking.mask_draws(jax.random.key(seed), *tokens.shape, max_examples)
    sel = jax.device_get(masking.select_from_draws(tokens, draws, mask_prob, segment_ids))
    alone = jax.device_get(masking.select_from_draws(
        jnp.asarray(_alone(examples, N)), _draws_alone(draws, places, examples, N, e_of), mask_prob))
    u = np.asarray(draws.count_uniform)
    for i, (row, start) in enumerate(places):
      length = len(examples[i])
      np.testing.assert_array_equal(sel.is_masked[row, start:start + length], alone.is_masked[i, :length])
      # The count rule, evaluated in float32 as the step does: floor(p L_e + U_e), capped by maskable slots.
      expected = min(int(np.floor(np.float32(mask_prob) * np.float32(length) + u[row, e_of[i]])), length - 2)
      assert sel.is_masked[row, start:start + length].sum() == expected
    assert not sel.is_masked[packed["segment_ids"] == 0].any()
    assert sel.indices.shape == (3, masking.max_masked(mask_prob, N, max_examples))
    for row in range(3):
      m = int(sel.count[row])
      np.testing.assert_array_equal(sel.indices[row, :m], np.flatnonzero(sel.is_masked[row]))
      assert sel.valid[row].sum() == m


def test_masking_bound_holds_for_many_small_examples():
  # Ten 4-slot examples in 40 slots, p = 0.3, U near 1: each rounds up to its 2 maskable slots, 20 in all,
  # within ceil(0.3 * 40) + 10 - 1 = 21, so nothing is cut.
  examples = _examples([4] * 10)
  packed, _ = _packed(examples, [0] * 10, 40)
  draws = masking.MaskDraws(jnp.full((1, 10), 0.999, jnp.float32), jax.random.uniform(jax.random.key(0), (1, 40)))
  sel = masking.select_from_draws(jnp.asarray(packed["tokens"]), draws, 0.3, jnp.asarray(packed["segment_ids"]))
  assert masking.max_masked(0.3, 40, 10) == 21 and int(sel.count[0]) == 20


def test_masking_examples_past_the_bound_are_masked_as_one():
  examples = _examples([10, 10, 10, 10])
  packed, _ = _packed(examples, [0] * 4, 40)
  draws = masking.mask_draws(jax.random.key(3), 1, 40, 2)
  sel = masking.select_from_draws(jnp.asarray(packed["tokens"]), draws, 0.5, jnp.asarray(packed["segment_ids"]))
  u = np.asarray(draws.count_uniform)[0]
  masked = np.asarray(sel.is_masked)[0]
  assert masked[:10].sum() == np.floor(np.float32(0.5) * 10 + u[0])
  assert masked[10:].sum() == np.floor(np.float32(0.5) * 30 + u[1])
  assert int(sel.count[0]) <= masking.max_masked(0.5, 40, 2)


def test_default_segments_and_split_batch():
  tokens = jnp.asarray(_alone(_examples([5, 3]), 6))
  segment_ids, positions = default_segments(tokens)
  np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(positions, np.tile(np.arange(6), (2, 1)))
  for batch in (tokens, {"tokens": tokens}):
    out = split_batch(batch)
    assert out[0] is tokens and out[1] is None and out[2] is None
  with pytest.raises(ValueError, match="both 'segment_ids' and 'positions'"):
    split_batch({"tokens": tokens, "segment_ids": segment_ids})


# ----------------------------------------------------------------------------------------------
# MLM
# ----------------------------------------------------------------------------------------------

def _mlm(max_examples, positions="rope2d"):
  cfg = config_lib.pretrain_config("mlm", "tiny", seq_len=N)
  cfg.model.vocab_size = 40
  cfg.model.positions = positions
  cfg.model.dropout_rate = cfg.model.attention_dropout_rate = 0.0
  return cfg, mlm.make_model(cfg, True).clone(max_examples=max_examples)


@pytest.mark.parametrize("positions", ["rope2d", "absolute+relbias"])
def test_mlm_packed_batch_equals_examples_one_per_block(positions):
  cfg, model = _mlm(3, positions)
  params = nn.unbox(base.init_params(get("mlm"), cfg, jax.random.key(0)))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  examples = _examples(LENGTHS)
  packed, places = _packed(examples, ROWS, N)
  packed = {k: jnp.asarray(v) for k, v in packed.items()}
  sel = model.apply({"params": params}, packed, jax.random.key(5), method=mlm.MLMModel.select_masks)
  is_masked = np.asarray(sel.is_masked)
  alone_masked = np.zeros((len(examples), N), bool)
  for i, (row, start) in enumerate(places):
    alone_masked[i, :len(examples[i])] = is_masked[row, start:start + len(examples[i])]
  alone_sel = masking.selection_from_mask(jnp.asarray(alone_masked), masking.max_masked(cfg.mask_prob, N))
  alone = jnp.asarray(_alone(examples, N))

  def loss(p, batch, selection):
    loss_sum, weight, metrics = model.apply({"params": p}, batch, selection, method=mlm.MLMModel.loss_given_masks)
    return loss_sum, (weight, metrics)

  (sum_p, (weight_p, metrics_p)), grads_p = jax.value_and_grad(loss, has_aux=True)(params, packed, sel)
  (sum_a, (weight_a, metrics_a)), grads_a = jax.value_and_grad(loss, has_aux=True)(params, alone, alone_sel)
  assert float(weight_p) == float(weight_a) == alone_masked.sum() > 0
  np.testing.assert_allclose(sum_p, sum_a, rtol=1e-5)
  for name in metrics_a:
    np.testing.assert_allclose(metrics_p[name], metrics_a[name], rtol=1e-5)
  for (path, gp), ga in zip(jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_a)):
    np.testing.assert_allclose(gp, ga, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a)) > 1e-3


def test_mlm_call_is_select_then_loss_given_masks():
  cfg, model = _mlm(3)
  params = base.init_params(get("mlm"), cfg, jax.random.key(0))
  packed = {k: jnp.asarray(v) for k, v in _packed(_examples(LENGTHS), ROWS, N)[0].items()}
  key = jax.random.key(2)
  direct = model.apply({"params": params}, packed, key)
  select_rng, _ = jax.random.split(key)
  sel = masking.select_masked_positions(packed["tokens"], select_rng, cfg.mask_prob, packed["segment_ids"], 3)
  given = model.apply({"params": params}, packed, sel, method=mlm.MLMModel.loss_given_masks)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), direct, given))
  # The bare token array still works (today's trainer) and is the one-example-per-block computation.
  tokens = jnp.asarray(_alone(_examples(LENGTHS[:2]), N))
  segment_ids, positions = default_segments(tokens)
  bare = model.apply({"params": params}, tokens, key)
  as_dict = model.apply({"params": params}, {"tokens": tokens, "segment_ids": segment_ids, "positions": positions},
                        key)
  np.testing.assert_allclose(bare[0], as_dict[0], rtol=1e-6)
  assert bare[1] == as_dict[1]


# ----------------------------------------------------------------------------------------------
# Pipeline on real MOSES
# ----------------------------------------------------------------------------------------------

def _config(tmp_path, name, path, seq_len=128, batch_size=8, **data):
  cfg = config_lib.pretrain_config()
  cfg.seq_len, cfg.batch_size, cfg.eval_batches, cfg.seed = seq_len, batch_size, 4, 3
  cfg.data = config_lib.data_config(name, str(path), tfds_dir=str(tmp_path / "tfds"), **data)
  return cfg


MOSES = "$DATA/smiles/moses/test.csv.gz"


@pytest.fixture(scope="module")
def moses(tmp_path_factory, shared_data):
  del shared_data
  tmp = tmp_path_factory.mktemp("packed")
  cfg = _config(tmp, "smiles", MOSES, max_examples=3000, eval_fraction=0.05, packing=True)
  return pipeline.load_pretraining_data(cfg, str(tmp / "wd")), cfg, tmp


def _segments_of(rows):
  """Every example of packed rows as (tokens, positions), checking the block format on the way."""
  out = []
  for tokens, segment_ids, positions in zip(rows["tokens"], rows["segment_ids"], rows["positions"]):
    real = segment_ids > 0
    assert np.array_equal(real, tokens != vocab.PAD)
    assert real[:np.flatnonzero(real)[-1] + 1].all()  # padding only after the last example
    ids = segment_ids[real]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    assert np.all(positions[~real] == 0)
    for s in range(1, ids.max() + 1):
      ex, pos = tokens[segment_ids == s], positions[segment_ids == s]
      np.testing.assert_array_equal(pos, np.arange(len(ex)))
      assert ex[0] == vocab.BOS and ex[-1] == vocab.EOS
      assert np.count_nonzero(ex == vocab.BOS) == 1 and np.count_nonzero(ex == vocab.EOS) == 1
      out.append(ex)
  return out


def test_pipeline_every_record_once_in_order(moses, shared_data):
  data, cfg, _ = moses
  corpus = builders.build_corpus(cfg.data)
  expected = [np.asarray([vocab.BOS] + ids[:cfg.seq_len - 2] + [vocab.EOS])
              for ids in data.tokenizer.encode_batch(list(corpus.train)) if ids]
  blocks = data.train_blocks
  rows = blocks.rows(np.arange(len(blocks)))
  got = _segments_of(rows)
  assert len(got) == len(expected) == data.summary["train_examples"]
  assert all(np.array_equal(a, b) for a, b in zip(got, expected))
  # Greedy: every block but the last was closed because its next example did not fit (no cap is hit at -1).
  used = (rows["segment_ids"] > 0).sum(1)
  per_block = rows["segment_ids"].max(1)
  first_size = np.asarray([len(expected[i]) for i in np.cumsum(per_block)[:-1]])
  assert np.all(used[:-1] + first_size > cfg.seq_len)
  assert data.max_examples_per_block == per_block.max() == data.summary["max_examples_per_block"]
  assert data.summary["closed_early"] == 0
  # With the source file as the independent reference for the first block.
  with gzip.open(shared_data / "smiles/moses/test.csv.gz", "rt") as f:
    source = [line.strip() for line in itertools.islice(f, 1, 3001)]
  first = [data.tokenizer.decode(ex) for ex in got[:per_block[0]]]
  assert all(smiles in source for smiles in first)


def test_pipeline_slot_utilisation_and_counts(moses, caplog):
  data, cfg, tmp = moses
  s = data.summary
  rows = data.train_blocks.rows(np.arange(len(data.train_blocks)))
  utilisation = float(np.mean(rows["segment_ids"] > 0))
  assert utilisation >= 0.85 and abs(s["slot_utilisation"] - utilisation) < 1e-4
  assert s["packing"] is True and s["train_blocks"] == len(data.train_blocks) < s["train_examples"]
  assert abs(s["examples_per_block"] - s["train_examples"] / s["train_blocks"]) < 1e-3
  with caplog.at_level(logging.INFO):
    pipeline.load_pretraining_data(cfg, str(tmp / "wd"))
  assert any("max_examples_per_block" in r.getMessage() and "slot_utilisation" in r.getMessage()
             for r in caplog.records)


def test_pipeline_batches_resume_and_fresh_pipelines_agree(moses):
  data, cfg, tmp = moses
  it = data.train_iterator(0, 1)
  before = pipeline.first_batches(it, 3)
  state = pipeline.iterator_state_json(it)
  expected = pipeline.first_batches(it, 4)
  resumed = data.train_iterator(0, 1)
  pipeline.restore_iterator_state(resumed, state)
  fresh = pipeline.load_pretraining_data(cfg, str(tmp / "wd2")).train_iterator(0, 1)
  for a, b in zip(before + expected, pipeline.first_batches(fresh, 7)):
    assert set(a) == {"tokens", "segment_ids", "positions"}
    assert all(np.array_equal(a[k], b[k]) for k in a)
  for a, b in zip(expected, pipeline.first_batches(resumed, 4)):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  shards = [next(data.train_iterator(p, 2)) for p in range(2)]
  for k in before[0]:
    np.testing.assert_array_equal(np.concatenate([shards[0][k], shards[1][k]]), before[0][k])


def test_pipeline_eval_batches_packed(moses):
  data = dataclasses.replace(moses[0], num_eval_batches=0)  # all of the eval split
  batches = data.eval_batches(0, 1)
  n = len(data.eval_blocks)
  assert n % data.batch_size  # the last batch has padding rows
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert set(rows) == {"tokens", "segment_ids", "positions"}
  assert np.all(rows["segment_ids"][n:] == 0) and np.all(rows["tokens"][n:] == vocab.PAD)
  assert len(_segments_of({k: v[:n] for k, v in rows.items()})) == data.summary["eval_examples"]


def test_pipeline_pack_cache_keyed_by_options(moses, monkeypatch):
  data, cfg, tmp = moses
  packs = os.path.join(data.summary["token_cache"], "packs")
  listed = lambda: set(os.listdir(packs))
  assert pipeline.pack_key(128, -1, "truncate") in listed()
  keys = {pipeline.pack_key(n, e, o) for n in (64, 128) for e in (-1, 2, 3) for o in ("truncate", "skip")}
  assert len(keys) == 12
  capped = cfg.copy_and_resolve_references()
  capped.data.max_examples_per_block = 2
  before = listed()
  small = pipeline.load_pretraining_data(capped, str(tmp / "wd"))
  rows = small.train_blocks.rows(np.arange(len(small.train_blocks)))
  assert rows["segment_ids"].max() == 2 == small.max_examples_per_block
  assert small.summary["closed_early"] > 0 and small.summary["train_examples"] == data.summary["train_examples"]
  shorter = cfg.copy_and_resolve_references()
  shorter.seq_len = 64
  short = pipeline.load_pretraining_data(shorter, str(tmp / "wd"))
  assert short.train_blocks.rows(np.array([0]))["tokens"].shape == (1, 64)
  assert listed() - before == {pipeline.pack_key(128, 2, "truncate"), pipeline.pack_key(64, -1, "truncate")}
  # A second load reads the saved tables: the greedy pass does not run again.
  monkeypatch.setattr(blocks, "greedy_pack", lambda *a: pytest.fail("pack table was not reused"))
  again = pipeline.load_pretraining_data(cfg, str(tmp / "wd"))
  assert again.summary == data.summary


def test_pipeline_packing_off_is_one_example_per_block(moses):
  data, cfg, tmp = moses
  off = cfg.copy_and_resolve_references()
  off.data.packing = False
  plain = pipeline.load_pretraining_data(off, str(tmp / "wd"))
  assert not plain.packing and plain.max_examples_per_block == 1
  batch = next(plain.train_iterator(0, 1))
  assert set(batch) == {"tokens"}
  offsets = np.load(os.path.join(plain.summary["token_cache"], "train.offsets.npy"))
  keep, _ = pipeline.records_keep(offsets, 128, "truncate")
  expected = pipeline.make_blocks(plain.train_blocks.tokens, offsets[keep], np.diff(offsets)[keep], 128)
  np.testing.assert_array_equal(plain.train_blocks.batch(np.arange(len(keep))), expected)
  assert abs(plain.summary["slot_utilisation"] - np.mean(expected != vocab.PAD)) < 1e-4
  # A pack of one example per block is the same blocks, in the batch-dict form.
  one = cfg.copy_and_resolve_references()
  one.data.max_examples_per_block = 1
  single = pipeline.load_pretraining_data(one, str(tmp / "wd"))
  rows = single.train_blocks.rows(np.arange(len(single.train_blocks)))
  np.testing.assert_array_equal(rows["tokens"], expected)
  np.testing.assert_array_equal(rows["segment_ids"], expected != vocab.PAD)


# ----------------------------------------------------------------------------------------------
# Pipeline: text documents
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", [True, False])
def test_pipeline_text_documents(tmp_path, shared_data, packing):
  del shared_data
  # AG News documents take 35..280 tokens here: some share a block of 160, some are truncated.
  cfg = _config(tmp_path, "text", "$DATA/text/agnews/dev.tsv", seq_len=160, column="0", max_examples=300,
                vocab_size=400, eval_fraction=0.05, text_units="documents", packing=packing)
  data = pipeline.load_pretraining_data(cfg, str(tmp_path / "wd"))
  encoded = data.tokenizer.encode_batch(list(builders.build_corpus(cfg.data).train))
  expected = [[vocab.BOS] + ids[:158] + [vocab.EOS] for ids in encoded if ids]
  blocks = data.train_blocks
  rows = blocks.rows(np.arange(len(blocks)))
  if packing:
    got = _segments_of(rows)
    assert rows["segment_ids"].max() > 1
  else:
    assert set(rows) == {"tokens"}
    got = [row[row != vocab.PAD] for row in rows["tokens"]]
  assert [list(g) for g in got] == expected
  assert data.summary["truncated_overlong"] >= sum(len(ids) > 158 for ids in encoded) > 0


def test_pipeline_text_stream_with_packing_is_one_segment_per_window(tmp_path, shared_data):
  del shared_data
  cfg = _config(tmp_path, "text", "$DATA/text/agnews/dev.tsv", seq_len=48, column="0", max_examples=300,
                vocab_size=400, eval_fraction=0.05, packing=True)
  data = pipeline.load_pretraining_data(cfg, str(tmp_path / "wd"))
  batch = next(data.train_iterator(0, 1))
  np.testing.assert_array_equal(batch["segment_ids"], batch["tokens"] != vocab.PAD)
  np.testing.assert_array_equal(batch["positions"], np.where(batch["tokens"] != vocab.PAD, np.arange(48), 0))


def test_pipeline_config_errors(tmp_path):
  for key, value, match in (("text_units", "sentences", "choose 'stream'"),
                            ("max_examples_per_block", 0, "integer >= 1, or -1")):
    cfg = _config(tmp_path, "text", "$DATA/text/agnews/dev.tsv", **{key: value})
    with pytest.raises(ValueError, match=match):
      pipeline.load_pretraining_data(cfg, str(tmp_path / "wd"))
  assert not (tmp_path / "tfds").exists()
  # data.packing is a bool key of config_lib.data_config: anything else is refused where it is set.
  with pytest.raises(ValueError, match="--config.data.packing=.yes. must be true or false"):
    config_lib.override(_config(tmp_path, "smiles", "unused"), "data.packing", "yes")


# ----------------------------------------------------------------------------------------------
# Trainer: packed batches through TrainSetup on a mesh, real-token counts, kill and resume via main.py
# ----------------------------------------------------------------------------------------------

# Eight rows of 32 slots holding 1..4 examples (17 in all), lengths 4..30.
TRAIN_LENGTHS = [9, 12, 7, 15, 16, 30, 4, 5, 6, 14, 10, 10, 20, 11, 8, 8, 8]
TRAIN_ROWS = [0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 5, 5, 6, 7, 7, 7]


def _packed_setup(mesh, dropout=0.1):
  cfg = config_lib.pretrain_config("mlm", "tiny", seq_len=N, batch_size=8)
  cfg.model.vocab_size = 40
  cfg.model.dropout_rate = cfg.model.attention_dropout_rate = dropout
  cfg.data = config_lib.data_config("smiles", "unused")
  cfg.data.packing, cfg.data.max_examples_per_block = True, 4
  devices = jax.devices()[:int(np.prod(list(mesh.values())))]
  return steps.TrainSetup.create(cfg, partitioning.create_mesh(mesh, devices))


def test_trainer_mesh_packed_step_equals_one_device():
  batch, _ = _packed(_examples(TRAIN_LENGTHS), TRAIN_ROWS, N)
  one, many = _packed_setup(dict(data=1, fsdp=1, tensor=1)), _packed_setup(dict(data=2, fsdp=4, tensor=1))
  assert jax.tree.structure(one.model.example_batch) == jax.tree.structure(batch)
  state1, state8 = one.init_state(), many.init_state()
  loss1, grads1 = one.loss_and_grads(state1.params, batch, 3)
  loss8, grads8 = many.loss_and_grads(state8.params, batch, 3)
  np.testing.assert_allclose(loss1, loss8, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path))
  for _ in range(2):
    state1, m1 = one.train_step(state1, batch)
    state8, m8 = many.train_step(state8, batch)
    np.testing.assert_allclose(m1["loss"], m8["loss"], atol=1e-5)
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Real-token counts of the step (on device, sharded rows) against a numpy count of the batch.
  assert int(m8["real_tokens"]) == int(m1["real_tokens"]) == np.count_nonzero(batch["segment_ids"]) == sum(TRAIN_LENGTHS)
  assert int(m8["examples"]) == len(TRAIN_LENGTHS)


def test_trainer_step_sees_the_segments_of_a_packed_batch():
  """The trainer's loss on a packed dict is the objective's loss on that dict (segments, positions and all),
  and differs from the same tokens without their segments."""
  setup = _packed_setup(dict(data=1, fsdp=1, tensor=1), dropout=0.0)
  batch, _ = _packed(_examples(TRAIN_LENGTHS), TRAIN_ROWS, N)
  params = setup.init_state().params
  loss, _ = setup.loss_and_grads(params, batch, 7)
  rng, dropout = steps.split_rngs(jax.random.fold_in(jax.random.PRNGKey(setup.config.seed), 7))
  model = mlm.make_model(setup.config, False)
  assert model.max_examples == 4  # base.max_examples: data.max_examples_per_block with packing
  loss_sum, weight, _ = model.apply({"params": params}, {k: jnp.asarray(v) for k, v in batch.items()}, rng,
                                    rngs={"dropout": dropout})
  np.testing.assert_allclose(loss, loss_sum / weight, rtol=1e-6)
  unsegmented = model.apply({"params": params}, {"tokens": jnp.asarray(batch["tokens"])}, rng,
                            rngs={"dropout": dropout})
  assert abs(float(unsegmented[0] / unsegmented[1]) - float(loss)) > 1e-4
  # Packing off: the bare token array, exactly today's path.
  bare = dict(tokens=batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
  assert steps.pipeline_batch(bare, False) is batch["tokens"] and steps.pipeline_batch(bare, True) is bare


def test_real_counts_of_bare_and_packed_batches():
  batch, _ = _packed(_examples(TRAIN_LENGTHS), TRAIN_ROWS, N)
  tokens = _alone(_examples(LENGTHS), N)
  tokens = np.concatenate([tokens, np.full((1, N), vocab.PAD, np.int32)])  # an all-padding row
  packed = jax.device_get(segments.real_counts({k: jnp.asarray(v) for k, v in batch.items()}))
  bare = jax.device_get(segments.real_counts(jnp.asarray(tokens)))
  assert packed == {"real_tokens": np.sum(batch["tokens"] != vocab.PAD), "examples": len(TRAIN_LENGTHS)}
  assert bare == {"real_tokens": sum(LENGTHS), "examples": len(LENGTHS)}


def test_max_examples_rule():
  cfg = config_lib.pretrain_config("mlm", "tiny")
  assert base.max_examples_per_block(cfg) == 1  # no data block
  cfg.data = config_lib.data_config("smiles", "x")
  cfg.data.packing, cfg.data.max_examples_per_block = False, 7
  assert base.max_examples_per_block(cfg) == 1
  cfg.data.packing = True
  assert base.max_examples_per_block(cfg) == 7
  cfg.data.max_examples_per_block = -1
  with pytest.raises(ValueError, match="max_examples_per_block=-1 with data.packing on"):
    base.max_examples_per_block(cfg)


PACKED_RUN_CONFIG = """
from exlm_jax import config_lib

def get_config(arg=None):
  config = config_lib.pretrain_config("mlm", "tiny")
  config.data = config_lib.data_config("smiles", "$DATA/smiles/moses/test.csv.gz", max_examples=1200,
                                       eval_fraction=0.05)
  config.data.packing, config.data.max_examples_per_block = True, -1
  config.seq_len, config.batch_size = 128, 8
  config.total_steps, config.warmup_steps, config.log_every, config.eval_every = 6, 2, 1, 6
  config.checkpoint_every, config.eval_batches, config.async_checkpointing = 2, 1, False
  return config
"""
WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def _start_run(config_path, workdir, log_path, delay=0.0):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             EXLM_TFDS_DIR=str(config_path.parent / "tfds"), EXLM_TEST_STEP_DELAY=str(delay))
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable, WORKER, "--config", str(config_path), "--workdir", str(workdir)],
                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(WORKER) + "/..")


def _logged_losses(workdir):
  path = workdir / "test_losses.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
  return {r["step"]: r["loss"] for r in rows}


def _finish(proc, log_path, timeout=600):
  try:
    assert proc.wait(timeout=timeout) == 0, open(log_path).read()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()


def test_resume_of_a_killed_packed_run_is_identical(tmp_path, shared_data):
  del shared_data
  config_path = tmp_path / "packed_run.py"
  config_path.write_text(PACKED_RUN_CONFIG)
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  _finish(_start_run(config_path, straight, tmp_path / "straight.log"), tmp_path / "straight.log")
  baseline = _logged_losses(straight)
  assert sorted(baseline) == list(range(1, 7))

  proc = _start_run(config_path, killed, tmp_path / "killed.log", delay=0.5)
  try:
    deadline = time.time() + 600
    while not ((killed / "checkpoints" / "2").is_dir() and max(_logged_losses(killed), default=0) >= 3):
      assert proc.poll() is None and time.time() < deadline, open(tmp_path / "killed.log").read()[-3000:]
      time.sleep(0.1)
  finally:
    proc.kill()  # SIGKILL mid-run: no clean save
    proc.wait()
  assert max(_logged_losses(killed)) < 6
  _finish(_start_run(config_path, killed, tmp_path / "resumed.log"), tmp_path / "resumed.log")
  assert "resumed from step" in open(tmp_path / "resumed.log").read()
  resumed = _logged_losses(killed)
  for step in range(1, 7):
    np.testing.assert_allclose(resumed[step], baseline[step], atol=1e-6, err_msg=f"step {step}")

  # final_metrics.json reports real-token throughput; the last window (step 6) holds the 6th batch.
  final = json.loads((killed / "final_metrics.json").read_text())
  perf = final["perf"]
  spec = importlib.util.spec_from_file_location("packed_run", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.tfds_dir = str(tmp_path / "tfds")
  data = pipeline.load_pretraining_data(config, str(killed))
  sixth = pipeline.first_batches(data.train_iterator(0, 1), 6)[-1]
  assert perf["real_tokens_per_step"] == np.count_nonzero(sixth["segment_ids"])
  assert perf["examples_per_step"] == sixth["segment_ids"].max(axis=1).sum()
  assert perf["slot_utilisation"] == pytest.approx(np.mean(sixth["segment_ids"] > 0))
  assert perf["real_tokens_per_s"] == pytest.approx(perf["tokens_per_s"] * perf["slot_utilisation"])
  assert perf["slot_utilisation"] > 0.8
  written = json.loads((killed / "config.json").read_text())
  assert written["data"]["max_examples_per_block"] == data.max_examples_per_block > 1
