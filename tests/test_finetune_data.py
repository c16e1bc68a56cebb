"""Fine-tuning data: GLUE readers, MoleculeNet CSVs, splits and token-block encoding."""

import csv
import logging

import numpy as np
import pandas as pd
import pytest
from rdkit.Chem.Scaffolds import MurckoScaffold

from exlm_jax.data import vocab
from exlm_jax.finetune import encoding, splits, tasks


class CharTokenizer:
  """Fake tokenizer: one id per character, no specials."""

  vocab_size = 256 + vocab.NUM_SPECIAL

  def encode(self, text):
    return [ord(c) % 256 + vocab.NUM_SPECIAL for c in text]


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def test_single_sentence_layout_and_truncation():
  tokens, truncated = encoding.encode_examples(["ab", "abcdefgh"], CharTokenizer(), 6)
  a, b = vocab.NUM_SPECIAL + ord("a"), vocab.NUM_SPECIAL + ord("b")
  assert tokens.dtype == np.int32 and tokens.shape == (2, 6)
  np.testing.assert_array_equal(tokens[0], [vocab.BOS, a, b, vocab.EOS, vocab.PAD, vocab.PAD])
  np.testing.assert_array_equal(tokens[1], [vocab.BOS, a, b, a + 2, a + 3, vocab.EOS])
  assert truncated == 1


def test_pair_layout_is_fairseq_sentence_prediction():
  tok = CharTokenizer()
  tokens, truncated = encoding.encode_examples([("ab", "c")], tok, 10)
  expected = [vocab.BOS, *tok.encode("ab"), vocab.EOS, vocab.EOS, *tok.encode("c"), vocab.EOS]
  expected += [vocab.PAD] * (10 - len(expected))
  np.testing.assert_array_equal(tokens[0], expected)
  assert truncated == 0
  tokens, truncated = encoding.encode_examples([("abcdefgh", "xy"), ("ab", "c")], tok, 10)  # budget 6: A keeps 4
  np.testing.assert_array_equal(tokens[0], [vocab.BOS, *tok.encode("abcd"), vocab.EOS, vocab.EOS, *tok.encode("xy"),
                                            vocab.EOS])
  assert truncated == 1
  with pytest.raises(ValueError, match="seq_len=4"):
    encoding.encode_examples([("a", "b")], tok, 4)
  with pytest.raises(ValueError, match="mix of single sentences and sentence pairs"):
    encoding.encode_examples([("a", "b"), "c"], tok, 8)


def test_example_lengths_say_which_inputs_encode_examples_cuts():
  """Untruncated slots (+2 single, +4 pair): over seq_len exactly where the padded row has no padding left and
  its content differs from the untruncated text."""
  tok = CharTokenizer()
  rng = np.random.default_rng(0)
  words = ["".join("abcdefgh"[i] for i in rng.integers(0, 8, rng.integers(1, 12))) for _ in range(40)]
  for texts in (words, list(zip(words[::2], words[1::2]))):
    lengths = encoding.example_lengths(texts, tok)
    pieces = [(t,) if isinstance(t, str) else t for t in texts]
    np.testing.assert_array_equal(lengths, [sum(map(len, p)) + 2 * len(p) for p in pieces])
    for seq_len in (8, 12, 16):
      tokens, truncated = encoding.encode_examples(texts, tok, seq_len)
      content = (tokens >= vocab.NUM_SPECIAL).sum(axis=1)  # the characters kept (specials are below NUM_SPECIAL)
      cut = content < np.array([sum(map(len, p)) for p in pieces])
      np.testing.assert_array_equal(lengths > seq_len, cut)
      assert truncated == cut.sum()


def test_encoding_with_the_real_smiles_tokenizer():
  tokenizers = pytest.importorskip("exlm_jax.data.tokenizers")
  tok = tokenizers.SmilesRegexTokenizer.build(["CCO", "c1ccccc1Cl"])
  tokens, truncated = encoding.encode_examples(["CCO", "c1ccccc1Cl"], tok, 8)
  np.testing.assert_array_equal(tokens[0, :5], [vocab.BOS, *tok.encode("CCO"), vocab.EOS])
  assert tokens[1, -1] == vocab.EOS and truncated == 1


def _truncate_loop(len_a, len_b, budget):
  """HuggingFace 'longest_first': drop one token from the longer segment (B on ties) until it fits."""
  while len_a + len_b > budget:
    if len_a > len_b:
      len_a -= 1
    else:
      len_b -= 1
  return len_a, len_b


def test_truncate_pair_matches_longest_first_loop():
  for len_a in range(12):
    for len_b in range(12):
      for budget in range(14):
        assert encoding.truncate_pair(len_a, len_b, budget) == _truncate_loop(len_a, len_b, budget)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _assert_partition(parts, n):
  joined = np.concatenate(parts)
  assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))


def test_random_and_stratified_splits_are_seeded_partitions():
  parts = splits.random_split(1000, (0.8, 0.1, 0.1), seed=3)
  _assert_partition(parts, 1000)
  assert [p.size for p in parts] == [800, 100, 100]
  assert all(np.array_equal(a, b) for a, b in zip(parts, splits.random_split(1000, (0.8, 0.1, 0.1), seed=3)))
  assert not np.array_equal(parts[1], splits.random_split(1000, (0.8, 0.1, 0.1), seed=4)[1])
  labels = np.r_[np.zeros(900, int), np.ones(100, int)]
  train, valid = splits.stratified_split(labels, (0.9, 0.1), seed=0)
  _assert_partition((train, valid), 1000)
  assert labels[valid].sum() == 10 and valid.size == 100
  labels = np.repeat([0, 1, 2], [14, 13, 13])
  parts = splits.stratified_split(labels, (0.8, 0.1, 0.1), seed=1)
  assert [p.size for p in parts] == [32, 4, 4]
  for part, fraction in zip(parts, (0.8, 0.1, 0.1)):
    assert np.all(np.abs(np.bincount(labels[part], minlength=3) - fraction * np.bincount(labels)) < 1 + 1e-9)
  with pytest.raises(ValueError, match="summing to 1"):
    splits.random_split(10, (0.5, 0.4))


# ---------------------------------------------------------------------------------------------
# GLUE
# ---------------------------------------------------------------------------------------------

GLUE_COUNTS = {"sst2": (67349, 872), "cola": (8551, 1043), "rte": (2490, 277)}


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(GLUE_COUNTS))
def test_glue_local_readers_give_sources_md_counts(shared_data, name):
  n_train, n_dev = GLUE_COUNTS[name]
  dev = tasks.load_glue(name, validation="dev", root=shared_data)
  assert (len(dev.splits["train"]), len(dev.splits["validation"])) == (n_train, n_dev)
  assert dev.report_splits == ("validation",) and set(dev.splits) == {"train", "validation"}
  carved = tasks.load_glue(name, root=shared_data)
  train, valid, test = (carved.splits[k] for k in ("train", "validation", "test"))
  assert len(test) == n_dev and carved.report_splits == ("test",)
  _assert_partition((train.rows, valid.rows), n_train)
  assert len(valid) == pytest.approx(0.1 * n_train, abs=2)
  assert abs(valid.labels.mean() - dev.splits["train"].labels.mean()) < 0.01  # stratified
  assert [train.texts[i] == dev.splits["train"].texts[r] for i, r in enumerate(train.rows[:50])] == [True] * 50
  again = tasks.load_glue(name, root=shared_data)
  assert np.array_equal(again.splits["validation"].rows, valid.rows)
  assert train.labels.dtype == np.int32 and train.label_mask.all()
  assert all(isinstance(t, tuple) for t in test.texts) == (name == "rte")


@pytest.mark.data
def test_cola_dev_joins_in_and_out_of_domain(shared_data):
  dev = tasks.load_glue("cola", validation="dev", root=shared_data).splits["validation"]
  assert dev.texts[0] == "The sailors rode the breeze clear of the rocks."
  assert len(dev.provenance.sources) == 2 and dev.provenance.rows_read == 1043


def test_glue_without_local_copy_needs_tfds():
  with pytest.raises(ValueError, match="no local copy"):
    tasks.load_glue("mrpc", source="local")
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="TensorFlow"):
      tasks.load_glue("mrpc")
  with pytest.raises(ValueError, match="unknown GLUE task"):
    tasks.load_glue("imdb")


def _fake_tfds(monkeypatch, n=40):
  """Stands in for TensorFlow + TFDS: glue/<task> splits of n records, labels idx % 3, in reverse idx order."""
  import sys
  import types

  def load(name, split, data_dir=None):
    records = [{"idx": i, "label": np.float32(i % 3) if "stsb" in name else i % 3,
                "premise": f"p{split}{i}".encode(), "hypothesis": f"h{i}".encode(),
                "sentence1": f"a{i}".encode(), "sentence2": f"b{i}".encode()} for i in range(n)]
    return records[::-1]

  monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(load=load, as_numpy=lambda ds: ds))


def test_glue_through_tfds_names_mnli_dev_splits(monkeypatch):
  _fake_tfds(monkeypatch)
  carved = tasks.load_glue("mnli", source="tfds")
  assert set(carved.splits) == {"train", "validation", "test_matched", "test_mismatched"}
  assert carved.report_splits == ("test_matched", "test_mismatched")
  assert carved.splits["test_mismatched"].texts[0] == ("pvalidation_mismatched0", "h0")
  assert len(carved.splits["validation"]) == 4 and carved.num_outputs == 3
  dev = tasks.load_glue("mnli", source="tfds", validation="dev")
  assert set(dev.splits) == {"train", "validation", "validation_mismatched"}
  assert dev.splits["validation"].texts[1] == ("pvalidation_matched1", "h1")
  stsb = tasks.load_glue("stsb")
  assert stsb.task_type == "regression" and stsb.splits["train"].labels.shape == (36, 1)
  assert stsb.splits["test"].labels.dtype == np.float32 and stsb.main_metric == "pearson_spearman"


# ---------------------------------------------------------------------------------------------
# MoleculeNet
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bbbp(shared_data):
  return tasks.load_moleculenet("bbbp", split=None, root=shared_data)


@pytest.mark.data
def test_bbbp_scaffold_split_is_deterministic_and_scaffold_disjoint(bbbp):
  whole = bbbp.splits["all"]
  assert whole.provenance.rows_read == 2050
  assert len(whole) + len(whole.provenance.invalid_smiles) == 2050
  parts = splits.scaffold_split(whole.texts)
  _assert_partition(parts, len(whole))
  assert parts[0].size <= 0.8 * len(whole) and parts[0].size + parts[1].size <= 0.9 * len(whole)
  scaffolds = [MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False) for s in whole.texts]
  owner = {}
  for split_id, part in enumerate(parts):
    for i in part:
      assert owner.setdefault(scaffolds[i], split_id) == split_id
  task = tasks.split_molecules(bbbp, "scaffold")  # a second, independent run: same split
  for key, part in zip(("train", "validation", "test"), parts):
    np.testing.assert_array_equal(task.splits[key].rows, whole.rows[part])


@pytest.mark.data
def test_tox21_label_mask_matches_empty_cells(shared_data):
  task = tasks.load_moleculenet("tox21", split=None, root=shared_data)
  whole = task.splits["all"]
  with open(shared_data / "moleculenet" / "tox21.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert whole.provenance.rows_read == len(rows) == 7831
  cells = np.array([[rows[r][c] for c in task.label_names] for r in whole.rows])
  assert task.num_outputs == 12 and whole.labels.shape == (len(whole), 12)
  np.testing.assert_array_equal(whole.label_mask, cells != "")
  np.testing.assert_array_equal(whole.labels[whole.label_mask], cells[cells != ""].astype(np.float32))
  assert np.all(whole.labels[~whole.label_mask] == 0)
  assert whole.provenance.missing_labels == int((cells == "").sum())
  assert [whole.texts[i] == rows[r]["smiles"] for i, r in enumerate(whole.rows[:20])] == [True] * 20


@pytest.mark.data
def test_moleculenet_registry_columns_exist(shared_data):
  for spec in tasks.MOLECULENET.values():
    header = pd.read_csv(shared_data / spec.path, nrows=0).columns
    assert {spec.smiles_column, *spec.label_columns} <= set(header), spec.name


def _write_csv(path, text):
  path.write_text(text)
  return path


def test_invalid_smiles_are_counted_and_reported(tmp_path, caplog):
  path = _write_csv(tmp_path / "mols.csv", "smiles,y1,y2\nCCO,1,0\nC1CC,0,1\nc1ccccc1,,1\n,1,1\nCC(C,0,0\nCCN ,0,\n")
  with caplog.at_level(logging.WARNING, logger="exlm_jax.finetune.tasks"):
    task = tasks.load_molecule_csv(path, "smiles", ["y1", "y2"], "multitask_binary", split=None)
  whole = task.splits["all"]
  assert whole.provenance.rows_read == 6
  assert whole.provenance.invalid_smiles == ((1, "C1CC"), (3, ""), (4, "CC(C"))
  assert "3 of 6 SMILES" in caplog.text
  assert whole.texts == ["CCO", "c1ccccc1", "CCN"]
  np.testing.assert_array_equal(whole.rows, [0, 2, 5])
  np.testing.assert_array_equal(whole.label_mask, [[True, True], [False, True], [True, False]])
  assert whole.provenance.missing_labels == 2
  with pytest.raises(ValueError, match="3 of 6 SMILES"):
    tasks.load_molecule_csv(path, "smiles", ["y1", "y2"], "multitask_binary", split=None, invalid="error")
  random = tasks.load_molecule_csv(path, "smiles", ["y1"], "regression", split="random", seed=0)
  assert sum(len(s) for s in random.splits.values()) == 3


def test_missing_column_and_bad_labels_fail_with_one_line_errors(tmp_path):
  path = _write_csv(tmp_path / "mols.csv", "smiles,y\nCCO,1\nCCN,abc\n")
  with pytest.raises(ValueError, match=r"no column\(s\) \['label'\]; set data.smiles_column .* columns it has: smiles, y"):
    tasks.load_molecule_csv(path, "smiles", ["label"], "regression")
  with pytest.raises(ValueError, match="'abc' is not a number"):
    tasks.load_molecule_csv(path, "smiles", ["y"], "regression")
  path = _write_csv(tmp_path / "multi.csv", "smiles,y\nCCO,1\nCCN,2\n")
  with pytest.raises(ValueError, match="other than 0/1"):
    tasks.load_molecule_csv(path, "smiles", ["y"], "multitask_binary", split=None)
  classes = tasks.load_molecule_csv(path, "smiles", "y", "classification", split=None)
  assert classes.num_outputs == 3 and classes.splits["all"].labels.dtype == np.int32
  assert classes.splits["all"].label_mask.shape == (2,)
