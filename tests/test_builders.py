"""TFDS corpus builders (array_record, no TensorFlow) on the shared data and on constructed files."""

import csv
import gzip
import itertools
import os
import sys

import pytest

from exlm_jax import config_lib
from exlm_jax.data import builders


def _cfg(tmp_path, name, path, **kw):
  return config_lib.data_config(name, str(path), tfds_dir=str(tmp_path / "tfds"), **kw)


def test_no_tensorflow_needed():
  import tensorflow_datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  assert "tensorflow" not in sys.modules


def test_moses_smiles_counts_and_order(tmp_path, shared_data):
  corpus = builders.build_corpus(_cfg(tmp_path, "smiles", "$DATA/smiles/moses/test.csv.gz", max_examples=500,
                                      eval_fraction=0.05))
  with gzip.open(shared_data / "smiles/moses/test.csv.gz", "rt", newline="") as f:
    source = [r[0] for r in itertools.islice(csv.reader(f), 1, 501)]
  s = corpus.summary
  assert s["records_read"] == 500 and s["skipped_empty"] == s["skipped_invalid"] == 0
  assert s["train_records"] + s["eval_records"] == 500 and 0 < s["eval_records"] < 100
  assert len(corpus.train) == s["train_records"]
  train, held_out = list(corpus.train), list(corpus.eval)
  assert sorted(train + held_out) == sorted(source)
  assert train == [x for x in source if x not in set(held_out)]  # source order kept
  assert corpus.train[:7] == train[:7] and corpus.train[len(train) - 1] == train[-1]  # random access agrees
  # Reopening reuses the build; another max_examples is another BuilderConfig.
  again = builders.build_corpus(_cfg(tmp_path, "smiles", "$DATA/smiles/moses/test.csv.gz", max_examples=500,
                                     eval_fraction=0.05))
  assert again.name == corpus.name and again.summary == s
  other = builders.builder_config(_cfg(tmp_path, "smiles", "$DATA/smiles/moses/test.csv.gz", max_examples=400))
  assert other.name != corpus.name.split("/")[1]


def test_agnews_text_column(tmp_path, shared_data):
  corpus = builders.build_corpus(_cfg(tmp_path, "text", "$DATA/text/agnews/dev.tsv", column="0", max_examples=300))
  with open(shared_data / "text/agnews/dev.tsv", newline="", encoding="utf-8") as f:
    source = [r[0].strip() for r in itertools.islice(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 300)]
  assert corpus.summary["records_read"] == 300
  assert corpus.summary["train_records"] + corpus.summary["eval_records"] == 300
  assert sorted(list(corpus.train) + list(corpus.eval)) == sorted(source)


def test_rdkit_first_5k_with_validation(tmp_path):
  rdkit = pytest.importorskip("rdkit")
  from rdkit import Chem, RDConfig, rdBase  # pylint: disable=g-import-not-at-top
  del rdkit
  path = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")
  with open(path) as f:
    rows = [line.split()[0] for line in itertools.islice(f, 1000)]
  with rdBase.BlockLogs():
    invalid = sum(Chem.MolFromSmiles(s) is None for s in rows)
  corpus = builders.build_corpus(_cfg(tmp_path, "smiles", "rdkit:NCI/first_5K.smi", max_examples=1000,
                                      validate_smiles=True))
  s = corpus.summary
  assert s["records_read"] == 1000 and s["skipped_invalid"] == invalid
  assert s["train_records"] + s["eval_records"] + s["skipped_invalid"] == 1000


def test_invalid_and_empty_smiles_are_counted(tmp_path):
  path = tmp_path / "mols.csv"
  path.write_text("id,SMILES\n1,CCO\n2,C1CC\n3,\n4,c1ccccc1\n5,not_a_smiles\n6,CC(=O)O\n")
  corpus = builders.build_corpus(_cfg(tmp_path, "smiles", path, validate_smiles=True, eval_fraction=0.0))
  s = corpus.summary
  assert (s["records_read"], s["skipped_empty"], s["skipped_invalid"]) == (6, 1, 2)
  assert list(corpus.train) == ["CCO", "c1ccccc1", "CC(=O)O"] and len(corpus.eval) == 0


def test_eval_path_and_never_empty_holdout(tmp_path):
  train, evals = tmp_path / "train.smi", tmp_path / "eval.smi"
  train.write_text("smiles name\nCCO a\nCCN b\nCCC c\n")
  evals.write_text("c1ccccc1\nCCCl\n")
  corpus = builders.build_corpus(_cfg(tmp_path, "smiles", train, eval_path=str(evals)))
  assert list(corpus.train) == ["CCO", "CCN", "CCC"] and list(corpus.eval) == ["c1ccccc1", "CCCl"]
  assert corpus.summary["records_read"] == 5
  tiny = builders.build_corpus(_cfg(tmp_path, "smiles", train, eval_fraction=0.001))
  assert (len(tiny.train), len(tiny.eval)) == (2, 1)  # the lowest-hash record is held out


def test_text_documents_blank_line_and_jsonl(tmp_path):
  txt = tmp_path / "docs.txt"
  txt.write_text("first doc line one\nline two\n\n\nsecond doc\n\nthird\n")
  corpus = builders.build_corpus(_cfg(tmp_path, "text", txt, documents="blank_line", eval_fraction=0.0))
  assert list(corpus.train) == ["first doc line one\nline two", "second doc", "third"]
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text('{"text": "alpha beta"}\n{"text": ""}\n{"text": "gamma"}\n')
  corpus = builders.build_corpus(_cfg(tmp_path, "text", jsonl, eval_fraction=0.0))
  assert list(corpus.train) == ["alpha beta", "gamma"] and corpus.summary["skipped_empty"] == 1


def test_errors_are_one_line_and_actionable(tmp_path, shared_data):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    builders.build_corpus(_cfg(tmp_path, "smiles", tmp_path / "nope.smi"))
  with pytest.raises(FileNotFoundError, match="shared data folder|does not exist"):
    builders.build_corpus(_cfg(tmp_path, "smiles", "$DATA/smiles/nope.csv"))
  with pytest.raises(ValueError, match=r"column 'smile' not found .*\['SMILES'\].*config.data.column"):
    builders.build_corpus(_cfg(tmp_path, "smiles", "$DATA/smiles/moses/test.csv.gz", column="smile",
                               max_examples=10))
  with pytest.raises(ValueError, match="no column named like .*column='0'|0-based index"):
    builders.build_corpus(_cfg(tmp_path, "text", "$DATA/text/agnews/dev.tsv", max_examples=10))
  with pytest.raises(ValueError, match="column 5 is out of range"):
    builders.build_corpus(_cfg(tmp_path, "text", "$DATA/text/agnews/dev.tsv", column="5", max_examples=10))
  empty = tmp_path / "empty.smi"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match="empty corpus"):
    builders.build_corpus(_cfg(tmp_path, "smiles", empty))
  with pytest.raises(ValueError, match="config.data.path is empty"):
    builders.build_corpus(_cfg(tmp_path, "smiles", ""))
  for path, kw in ((tmp_path / "nope.smi", {}), ("$DATA/smiles/moses/test.csv.gz", dict(column="x")), (empty, {})):
    with pytest.raises((FileNotFoundError, ValueError)) as info:
      builders.build_corpus(_cfg(tmp_path, "smiles", path, max_examples=10, **kw))
    assert "\n" not in str(info.value)
