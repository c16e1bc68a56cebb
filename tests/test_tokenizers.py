"""Tokenizers on real data: SMILES regex and BPE on MOSES, SentencePiece unigram on AG News."""

import csv
import gzip
import itertools

import ml_collections
import pytest

from exlm_jax.data import tokenizers
from exlm_jax.data import vocab


@pytest.fixture(scope="module")
def moses_smiles(shared_data):
  """The first 3000 SMILES of the MOSES test set."""
  with gzip.open(shared_data / "smiles/moses/test.csv.gz", "rt", newline="") as f:
    rows = csv.reader(f)
    assert next(rows) == ["SMILES"]
    return [r[0] for r in itertools.islice(rows, 3000)]


@pytest.fixture(scope="module")
def agnews_text(shared_data):
  """All 10,001 AG News dev documents (column 0 of a header-less TSV)."""
  with open(shared_data / "text/agnews/dev.tsv", newline="", encoding="utf-8") as f:
    return [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


@pytest.fixture(scope="module")
def unigram(agnews_text):
  return tokenizers.SentencePieceTokenizer.train(agnews_text[:1500], vocab_size=600)


def _data_cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(tokenizer="smiles_regex", vocab_size=400, spm_max_sentences=2000), **kw))


def test_split_smiles_atoms():
  assert tokenizers.split_smiles("Brc1ccc(Cl)cc1[C@@H](N)C%12") == [
      "Br", "c", "1", "c", "c", "c", "(", "Cl", ")", "c", "c", "1", "[C@@H]", "(", "N", ")", "C", "%12"]


@pytest.mark.parametrize("bad", ["CCa", "C C", "C%1", "CC!"])
def test_split_smiles_raises_instead_of_dropping(bad):
  with pytest.raises(tokenizers.UncoveredSmilesError, match="does not cover"):
    tokenizers.split_smiles(bad)


def test_smiles_regex_round_trip_on_moses(moses_smiles):
  tok = tokenizers.SmilesRegexTokenizer.build(moses_smiles)
  assert [tok.id_to_token(i) for i in range(vocab.NUM_SPECIAL)] == list(vocab.SPECIAL_TOKENS)
  assert tok.build_stats["strings"] == len(moses_smiles) and tok.build_stats["uncovered"] == 0
  for s in moses_smiles:
    ids = tok.encode(s)
    assert min(ids) >= vocab.NUM_SPECIAL  # no specials added, nothing unknown in its own corpus
    assert tok.decode(ids) == s


def test_smiles_regex_unknown_uncovered_and_specials(moses_smiles):
  tok = tokenizers.SmilesRegexTokenizer.build(moses_smiles[:200] + ["CCa"])
  assert tok.build_stats["uncovered"] == 1  # counted, not half-counted
  assert tok.encode("[U]C") == [vocab.UNK, tok.token_to_id("C")]
  ids = [vocab.BOS] + tok.encode("CCO") + [vocab.EOS, vocab.PAD, vocab.MASK]
  assert tok.decode(ids) == "CCO"
  with pytest.raises(tokenizers.UncoveredSmilesError):
    tok.encode("CCa")


def test_sentencepiece_special_ids_and_lossless_round_trip(unigram, agnews_text):
  assert [unigram.id_to_token(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "[MASK]"]
  assert unigram.vocab_size == 600
  encoded = unigram.encode_batch(agnews_text)
  assert all(min(ids) >= vocab.NUM_SPECIAL for ids in encoded if ids)
  assert [unigram.decode(ids) for ids in encoded] == agnews_text  # all 10,001 documents
  assert unigram.decode([vocab.BOS] + unigram.encode("Oil prices rise.") + [vocab.EOS, vocab.PAD]) == (
      "Oil prices rise.")


def test_long_documents_are_cut_for_sentencepiece_training(agnews_text):
  doc = " ".join(agnews_text[:40]) + "\n\nsecond paragraph"
  pieces = list(tokenizers._training_pieces(doc))  # pylint: disable=protected-access
  assert len(pieces) > 5 and max(map(len, pieces)) <= 1000 and pieces[-1] == "second paragraph"
  assert "".join(pieces[:-1]) == " ".join(agnews_text[:40])


def test_smiles_bpe_round_trip(moses_smiles):
  tok = tokenizers.SentencePieceTokenizer.train(moses_smiles[:2000], vocab_size=400, kind="smiles_bpe")
  assert [tok.id_to_token(i) for i in range(5)] == list(vocab.SPECIAL_TOKENS)
  encoded = tok.encode_batch(moses_smiles)
  assert [tok.decode(ids) for ids in encoded] == moses_smiles
  regex_len = sum(len(tokenizers.split_smiles(s)) for s in moses_smiles)
  assert sum(map(len, encoded)) < 0.6 * regex_len  # BPE merges atoms into longer pieces


def test_save_load_every_kind(tmp_path, moses_smiles, unigram):
  regex = tokenizers.SmilesRegexTokenizer.build(moses_smiles[:500])
  for name, tok, sample in (("regex", regex, moses_smiles[0]), ("spm", unigram, "Stocks fell on Monday.")):
    tok.save(tmp_path / name)
    back = tokenizers.load(tmp_path / name)
    assert back.kind == tok.kind and back.vocab_size == tok.vocab_size
    assert back.encode(sample) == tok.encode(sample) and back.fingerprint() == tok.fingerprint()
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tokenizers.load(tmp_path / "missing")


def test_build_tokenizer_caches_and_checks_kind(tmp_path, moses_smiles):
  cache = tmp_path / "tok"
  first = tokenizers.build_tokenizer(_data_cfg(tokenizer="smiles_bpe"), moses_smiles[:1000], cache)
  again = tokenizers.build_tokenizer(_data_cfg(tokenizer="smiles_bpe"), [], cache)  # nothing to train on
  assert again.fingerprint() == first.fingerprint()
  with pytest.raises(ValueError, match="holds a 'smiles_bpe' tokenizer"):
    tokenizers.build_tokenizer(_data_cfg(tokenizer="smiles_regex"), moses_smiles[:10], cache)
  with pytest.raises(ValueError, match="unknown config.data.tokenizer"):
    tokenizers.build_tokenizer(_data_cfg(tokenizer="wordpiece"), moses_smiles[:10], None)


def test_sentencepiece_vocab_too_large_is_actionable():
  with pytest.raises(ValueError, match="lower config.data.vocab_size"):
    tokenizers.SentencePieceTokenizer.train(["CCO", "CCN"] * 5, vocab_size=5000, kind="smiles_bpe")
