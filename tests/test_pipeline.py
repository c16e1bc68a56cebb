"""Grain pipeline: block format, sharding, exact resume, eval batches, overlong / invalid counts."""

import gzip
import itertools
import json

import numpy as np
import pytest

from exlm_jax import config_lib
from exlm_jax.data import builders
from exlm_jax.data import pipeline
from exlm_jax.data import vocab


def _config(tmp_path, name, path, seq_len=32, batch_size=8, eval_batches=4, **data):
  cfg = config_lib.pretrain_config()
  cfg.seq_len, cfg.batch_size, cfg.eval_batches, cfg.seed = seq_len, batch_size, eval_batches, 3
  cfg.data = config_lib.data_config(name, str(path), tfds_dir=str(tmp_path / "tfds"), **data)
  return cfg


@pytest.fixture(scope="module")
def smiles_data(tmp_path_factory, shared_data):
  del shared_data
  tmp = tmp_path_factory.mktemp("smiles")
  cfg = _config(tmp, "smiles", "$DATA/smiles/moses/test.csv.gz", seq_len=40, max_examples=600, eval_fraction=0.05)
  return pipeline.load_pretraining_data(cfg, str(tmp / "workdir")), cfg, tmp


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, shared_data):
  del shared_data
  tmp = tmp_path_factory.mktemp("text")
  cfg = _config(tmp, "text", "$DATA/text/agnews/dev.tsv", seq_len=48, column="0", max_examples=800,
                vocab_size=400, eval_fraction=0.05)
  return pipeline.load_pretraining_data(cfg, str(tmp / "workdir")), cfg, tmp


def _check_rows(tokens, seq_len, one_eos):
  """<s> first, </s> as the last real token, only <pad> after it, no <pad> before it."""
  assert tokens.dtype == np.int32 and tokens.shape[1] == seq_len
  for row in tokens:
    real = np.flatnonzero(row != vocab.PAD)
    last = real[-1]
    assert row[0] == vocab.BOS and row[last] == vocab.EOS
    assert len(real) == last + 1  # pads only after </s>
    assert np.count_nonzero(row == vocab.BOS) == 1 and np.count_nonzero(row == vocab.MASK) == 0
    if one_eos:
      assert np.count_nonzero(row == vocab.EOS) == 1


def _rows(batches):
  return sorted(tuple(r) for b in batches for r in b["tokens"])


def test_smiles_batches(smiles_data, shared_data):
  data, cfg, _ = smiles_data
  s = data.summary
  assert s["records_read"] == 600 and s["train_records"] + s["eval_records"] == 600
  assert s["train_blocks"] == s["train_records"] and s["vocab_size"] == data.tokenizer.vocab_size
  batches = pipeline.first_batches(data.train_iterator(0, 1), 5)
  for b in batches:
    assert set(b) == {"tokens"} and b["tokens"].shape == (cfg.batch_size, cfg.seq_len)
    _check_rows(b["tokens"], cfg.seq_len, one_eos=True)
  with gzip.open(shared_data / "smiles/moses/test.csv.gz", "rt") as f:
    source = {line.strip() for line in itertools.islice(f, 1, 601)}
  for row in (row for b in batches for row in b["tokens"]):
    smiles = data.tokenizer.decode(row)
    assert smiles in source or (row[-1] == vocab.EOS and any(x.startswith(smiles) for x in source))  # truncated


def test_text_batches_are_packed(text_data):
  data, cfg, _ = text_data
  batches = pipeline.first_batches(data.train_iterator(0, 1), 5)
  rows = np.concatenate([b["tokens"] for b in batches])
  _check_rows(rows, cfg.seq_len, one_eos=False)
  full = np.count_nonzero(rows[:, -1] == vocab.EOS)
  assert full >= len(rows) - 1  # only the stream's final block is padded
  assert np.any(np.count_nonzero(rows == vocab.EOS, axis=1) > 1)  # </s> between documents
  n = len(data.train_blocks)
  assert n == -(-data.summary["train_tokens"] // (cfg.seq_len - 2))
  last = data.train_blocks[n - 1]["tokens"]
  _check_rows(last[None], cfg.seq_len, one_eos=False)


def test_text_packing_is_exact(text_data):
  data, cfg, _ = text_data
  corpus = builders.build_corpus(cfg.data)  # already built: reopens
  expected = []
  for ids in data.tokenizer.encode_batch(list(corpus.train)):
    expected += ([vocab.EOS] if expected else []) + ids
  content = []
  for row in data.train_blocks.batch(np.arange(len(data.train_blocks))):
    last = np.flatnonzero(row != vocab.PAD)[-1]
    content += list(row[1:last])
  assert content == expected


def test_sharding_partitions_the_global_batch(smiles_data):
  data, _, _ = smiles_data
  single = pipeline.first_batches(data.train_iterator(0, 1), 3)
  shards = [pipeline.first_batches(data.train_iterator(p, 2), 3) for p in range(2)]
  for t in range(3):
    a, b = shards[0][t]["tokens"], shards[1][t]["tokens"]
    assert a.shape == b.shape == (4, data.seq_len)
    assert not {tuple(r) for r in a} & {tuple(r) for r in b}
    assert _rows([shards[0][t], shards[1][t]]) == _rows([single[t]])
  with pytest.raises(ValueError, match="divisible by the 3 processes"):
    data.train_iterator(0, 3)


def test_resume_is_exact_across_epochs(smiles_data):
  data, _, _ = smiles_data
  it = data.train_iterator(0, 1)
  pipeline.first_batches(it, 3)
  state = pipeline.iterator_state_json(it)
  expected = pipeline.first_batches(it, 4)
  resumed = data.train_iterator(0, 1)
  pipeline.restore_iterator_state(resumed, state)
  assert json.loads(state) == {"next_index": 3}
  for a, b in zip(expected, pipeline.first_batches(resumed, 4)):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  # Infinite and reshuffled: two epochs each cover every block once, in different orders.
  n = len(data.train_blocks)
  per_epoch = n // data.batch_size
  fresh = data.train_iterator(0, 1)
  epochs = [pipeline.first_batches(fresh, per_epoch) for _ in range(2)]
  if n % data.batch_size == 0:
    assert _rows(epochs[0]) == _rows(epochs[1])
  assert not np.array_equal(epochs[0][0]["tokens"], epochs[1][0]["tokens"])


def test_eval_batches_deterministic_padded_complete(smiles_data):
  data, cfg, _ = smiles_data
  n = len(data.eval_blocks)
  assert 0 < n <= cfg.eval_batches * cfg.batch_size
  batches = data.eval_batches(0, 1)
  assert len(batches) == -(-n // cfg.batch_size)
  rows = np.concatenate([b["tokens"] for b in batches])
  real = rows[rows[:, 0] == vocab.BOS]
  assert len(real) == n and np.all(rows[n:] == vocab.PAD)  # padding only at the end, all <pad>
  assert _rows([{"tokens": real}]) == sorted(tuple(data.eval_blocks[i]["tokens"]) for i in range(n))
  again = data.eval_batches(0, 1)
  assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))
  halves = [data.eval_batches(p, 2) for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(batches)
  assert _rows(halves[0] + halves[1]) == _rows(batches)


def test_workdir_tokenizer_reused_on_resume(smiles_data):
  data, cfg, tmp = smiles_data
  again = pipeline.load_pretraining_data(cfg, str(tmp / "workdir"))
  assert again.tokenizer.fingerprint() == data.tokenizer.fingerprint()
  assert (tmp / "workdir" / "tokenizer" / "tokenizer.json").exists()
  changed = cfg.copy_and_resolve_references()
  changed.data.tokenizer = "smiles_bpe"
  with pytest.raises(ValueError, match="use a fresh workdir"):
    pipeline.load_pretraining_data(changed, str(tmp / "workdir"))


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_overlong_counts(tmp_path, overlong):
  # seq_len 8 leaves 6 content slots. Token counts: 6, 7, 8, 2, 3 (c1ccccc1 is 8 tokens).
  path = tmp_path / "mols.smi"
  path.write_text("CCCCCC\nCCCCCCC\nc1ccccc1\nCO\nCCN\n")
  cfg = _config(tmp_path, "smiles", path, seq_len=8, batch_size=2, eval_fraction=0.0, overlong=overlong)
  data = pipeline.load_pretraining_data(cfg, str(tmp_path / "wd"))
  s = data.summary
  if overlong == "truncate":
    assert (s["truncated_overlong"], s["skipped_overlong"], s["train_blocks"]) == (2, 0, 5)
    blocks = [data.train_blocks[i]["tokens"] for i in range(5)]
    assert data.tokenizer.decode(blocks[2]) == "c1cccc"  # kept <s> at 0 and </s> at the end
    assert blocks[2][0] == vocab.BOS and blocks[2][-1] == vocab.EOS
  else:
    assert (s["truncated_overlong"], s["skipped_overlong"], s["train_blocks"]) == (0, 2, 3)
  assert s["eval_blocks"] == 0 and data.eval_batches(0, 1) == []
  _check_rows(next(data.train_iterator(0, 1))["tokens"], 8, one_eos=True)


def test_invalid_and_untokenizable_smiles_counted(tmp_path):
  pytest.importorskip("rdkit")
  path = tmp_path / "mols.csv"
  path.write_text("SMILES\nCCO\nC1CC\nCCN\nc1ccccc1\nXYZ\n")
  cfg = _config(tmp_path, "smiles", path, eval_fraction=0.0, validate_smiles=True)
  s = pipeline.load_pretraining_data(cfg, str(tmp_path / "wd")).summary
  assert (s["records_read"], s["skipped_invalid"], s["train_blocks"]) == (5, 2, 3)
  # Without RDKit validation, a string the atom regex cannot cover ('a' outside brackets) is counted.
  path.write_text("SMILES\nCCO\nCCa\nCCN\n")
  cfg = _config(tmp_path, "smiles", path, eval_fraction=0.0)
  s = pipeline.load_pretraining_data(cfg, str(tmp_path / "wd2")).summary
  assert (s["skipped_untokenizable"], s["train_blocks"]) == (1, 2)


def test_config_errors_fail_before_building(tmp_path):
  cfg = _config(tmp_path, "text", "$DATA/text/agnews/dev.tsv", tokenizer="smiles_regex")
  with pytest.raises(ValueError, match="smiles_regex' reads SMILES only"):
    pipeline.load_pretraining_data(cfg, str(tmp_path / "wd"))
  cfg = _config(tmp_path, "smiles", tmp_path / "x.smi", overlong="drop")
  with pytest.raises(ValueError, match="choose 'truncate' or 'skip'"):
    pipeline.load_pretraining_data(cfg, str(tmp_path / "wd"))
  assert not (tmp_path / "tfds").exists()
