"""Never lose a run, data and API side: content-keyed caches, crashed-build leftovers, API inputs
(whitespace, invalid SMILES, one bad string in a batch), predict_masked on inputs of mostly [MASK]s and
with [MASK]s past seq_len, fine-tuning CSVs without labels, and a quiet first screen."""

import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import exlm_jax
from exlm_jax import api, config_lib
from exlm_jax.data import builders, pipeline, tokenizers, vocab
from exlm_jax.finetune import tasks
from exlm_jax.objectives import exlm, maelm, mlm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_api import SMILES, make_pretraining_workdir  # noqa: E402  pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Data caches keyed on content
# ----------------------------------------------------------------------------------------------

def _smiles_config(tmp_path, path):
  cfg = config_lib.pretrain_config()
  cfg.seq_len, cfg.batch_size, cfg.eval_batches, cfg.seed = 24, 4, 1, 0
  cfg.data = config_lib.data_config("smiles", str(path), tfds_dir=str(tmp_path / "tfds"), eval_fraction=0.2)
  return cfg


def _write_keeping_size_and_mtime(path: pathlib.Path, text: str) -> None:
  before = path.stat()
  assert len(text.encode()) == before.st_size
  path.write_text(text)
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


def _records(corpus) -> list[str]:
  return sorted(list(corpus.train) + list(corpus.eval))


def test_same_size_edit_rebuilds_corpus_token_cache_and_vocabulary(tmp_path):
  corpus_file = tmp_path / "mols.smi"
  old = ["CCO", "CCN", "c1ccccc1", "CC(=O)O", "CCCC", "OCCO", "NCCN", "CC(C)O"]
  corpus_file.write_text("\n".join(old) + "\n")
  cfg = _smiles_config(tmp_path, corpus_file)
  first = pipeline.load_pretraining_data(cfg, str(tmp_path / "run1"))
  old_sha256 = hashlib.sha256(corpus_file.read_bytes()).hexdigest()

  new = [s.replace("N", "S") for s in old]  # same length per line: same byte size; mtime put back too
  _write_keeping_size_and_mtime(corpus_file, "\n".join(new) + "\n")
  second = pipeline.load_pretraining_data(cfg, str(tmp_path / "run2"))  # a fresh workdir
  assert _records(builders.build_corpus(cfg.data)) == sorted(new)  # the build was redone from the new bytes
  assert second.summary["token_cache"] != first.summary["token_cache"]
  vocab_of = lambda tok: {tok.id_to_token(i) for i in range(tok.vocab_size)}  # noqa: E731
  assert "S" in vocab_of(second.tokenizer) and "N" not in vocab_of(second.tokenizer)
  assert "N" in vocab_of(first.tokenizer)
  # The training blocks hold the new molecules' ids.
  decoded = {second.tokenizer.decode(second.train_blocks[i]["tokens"]) for i in range(len(second.train_blocks))}
  assert decoded <= set(new) and not decoded & (set(old) - set(new))
  # The summary names the content each run trained on.
  assert first.summary.get("content_sha256") == old_sha256
  assert second.summary.get("content_sha256") == hashlib.sha256(corpus_file.read_bytes()).hexdigest() != old_sha256


def test_leftovers_of_crashed_builds_are_removed(tmp_path):
  corpus_file = tmp_path / "mols.smi"
  corpus_file.write_text("\n".join(SMILES * 2) + "\n")
  cfg = _smiles_config(tmp_path, corpus_file)
  data = pipeline.load_pretraining_data(cfg, str(tmp_path / "run1"))
  corpus = builders.build_corpus(cfg.data)
  config_dir = pathlib.Path(corpus.data_dir) / corpus.name
  token_dir = pathlib.Path(data.summary["token_cache"])
  tokenizer_dirs = list((pathlib.Path(corpus.data_dir) / "exlm_tokenizers" / corpus.name.replace("/", "__")).iterdir())
  tokenizer_dir = next(d for d in tokenizer_dirs if d.is_dir())
  # What kill -9 in the middle of each build leaves: the temporary, and no finished cache.
  for finished in (config_dir / "1.0.0", token_dir, tokenizer_dir):
    subprocess.run(["rm", "-r", str(finished)], check=True)
  leftovers = [config_dir / "incomplete.ABC123_1.0.0", token_dir.with_name(token_dir.name + ".tmpk1ll3d"),
               tokenizer_dir.with_name(tokenizer_dir.name + ".tmpk1ll3d")]
  for leftover in leftovers:
    leftover.mkdir()
    (leftover / "partial").write_bytes(b"x" * 100)

  again = pipeline.load_pretraining_data(cfg, str(tmp_path / "run2"))
  assert [p for p in leftovers if p.exists()] == []
  assert (config_dir / "1.0.0" / "dataset_info.json").exists() and (token_dir / "eval.json").exists()
  assert again.summary["token_cache"] == str(token_dir) and again.summary["train_blocks"] == data.summary["train_blocks"]


def test_build_once_builds_once_while_another_process_holds_the_lock(tmp_path):
  from exlm_jax.data import caches  # pylint: disable=g-import-not-at-top
  target = str(tmp_path / "cache" / "key")
  calls = []

  def write(tmp):
    calls.append(tmp)
    time.sleep(0.3)
    pathlib.Path(tmp, "done.json").write_text("{}")

  threads = [threading.Thread(target=caches.build_once, args=(target, "done.json", write)) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 1 and os.path.exists(os.path.join(target, "done.json"))
  assert os.listdir(tmp_path / "cache") == ["key"]  # no temporary left


# ----------------------------------------------------------------------------------------------
# API inputs
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smiles_tokenizer():
  return tokenizers.SmilesRegexTokenizer.build(SMILES)


@pytest.fixture(scope="module")
def mlm_model(tmp_path_factory, smiles_tokenizer):
  path = tmp_path_factory.mktemp("mlm_run")
  make_pretraining_workdir(path, "mlm", smiles_tokenizer, num_layers=1)
  return exlm_jax.load(path, devices=jax.local_devices()[:1])


def test_api_strips_whitespace_like_training(mlm_model):
  ids, _ = mlm_model.tokenize(["CCO\n", "  c1ccccc1O\t"])
  reference, _ = mlm_model.tokenize(["CCO", "c1ccccc1O"])
  np.testing.assert_array_equal(ids, reference)
  np.testing.assert_array_equal(mlm_model.embed(["CCO\n"]), mlm_model.embed(["CCO"]))
  assert mlm_model.predict_masked(["CC[MASK]\n"]) == mlm_model.predict_masked(["CC[MASK]"])


def test_api_invalid_smiles_get_nan_rows_and_one_warning(mlm_model, caplog):
  texts = ["CCO", "C1CC", "", "c1ccccc1O", "CC Na"]  # ring not closed, empty, uncovered characters
  with caplog.at_level(logging.WARNING, logger="exlm_jax.api"):
    out = mlm_model.embed(texts)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "3 of 5 input(s)" in warnings[0] and all(f"#{i} " in warnings[0] for i in (1, 2, 4))
  assert "'C1CC' (RDKit cannot parse it)" in warnings[0] and "'' (empty)" in warnings[0]
  assert np.isnan(out[[1, 2, 4]]).all() and np.isfinite(out[[0, 3]]).all()
  np.testing.assert_allclose(out[[0, 3]], mlm_model.embed(["CCO", "c1ccccc1O"]), rtol=1e-5, atol=1e-6)


def test_api_one_bad_string_never_fails_predict_masked(mlm_model, caplog):
  with caplog.at_level(logging.WARNING, logger="exlm_jax.api"):
    out = mlm_model.predict_masked(["CC[MASK]O", "C C[MASK]", "CCO"], top_k=2)
  assert out[1] is None and out[2] == []  # cannot be tokenized / has nothing to predict
  assert out[0] == mlm_model.predict_masked(["CC[MASK]O"], top_k=2)[0]
  assert any("#1 'C C[MASK]'" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# predict_masked on inputs of mostly [MASK]s
# ----------------------------------------------------------------------------------------------

def _workdir(tmp_path, objective, tokenizer, seq_len):
  """A 1-layer pretraining workdir with seq_len slots."""
  import test_api  # pylint: disable=g-import-not-at-top
  original = test_api.tiny_pretrain_config
  test_api.tiny_pretrain_config = lambda obj, vocab_size: original(obj, vocab_size, seq_len=seq_len)
  try:
    config, params = make_pretraining_workdir(tmp_path, objective, tokenizer, num_layers=1)
  finally:
    test_api.tiny_pretrain_config = original
  return exlm_jax.load(tmp_path, devices=jax.local_devices()[:1]), config, params


def _mask_log_probs_reference(objective, config, params, ids, rows_slots):
  """(len(rows_slots), V) float64 log-probabilities, by the objective's training-side code: MLM's predict,
  MAE-LM's decoder, ExLM's forward (the DAG targets' copies) on one row at a time with one mask each."""
  net = {"mlm": mlm, "maelm": maelm, "exlm": exlm}[objective].make_model(config, True)
  out = []
  for row, slot in rows_slots:
    tokens = ids[row:row + 1]
    if objective == "mlm":
      logits = net.apply({"params": params}, tokens, np.array([[slot]], np.int32), method=net.predict)[0, 0]
    elif objective == "maelm":
      def decoder(m, t, masked):
        dec_in, _ = m.decoder_input(t, masked)
        return m.lm_head(m.decoder(dec_in, t == vocab.PAD)[0, slot], m.encoder.embedding)
      logits = net.apply({"params": params}, tokens, tokens == vocab.MASK, method=decoder)
    else:  # groups [<s>, the masks in order, </s>]: mask j's k copies are vertices (j + 1) k .. (j + 2) k - 1
      k = config.exlm.num_copies
      j = int(np.count_nonzero(tokens[0, :slot] == vocab.MASK))
      vertex_logits = net.apply({"params": params}, tokens, tokens == vocab.MASK, method=net.forward).logits[0]
      copies = jax.nn.log_softmax(vertex_logits[(j + 1) * k:(j + 2) * k], -1)
      out.append(np.asarray(jax.nn.logsumexp(copies, axis=0) - np.log(k), np.float64))
      continue
    out.append(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64))
  return np.stack(out)


def _check_against(model, predictions, reference_logp, top_k):
  probs = np.exp(reference_logp)
  probs[:, list(api.NEVER_PREDICTED)] = 0
  for got, p in zip(predictions, probs):
    best = np.argsort(-p)[:top_k]
    assert [t for t, _ in got] == [model.tokenizer.id_to_token(int(i)) for i in best]
    np.testing.assert_allclose([q for _, q in got], p[best], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("objective", ["exlm", "mlm", "maelm"])
def test_predict_masked_mostly_masks_and_masks_past_seq_len(tmp_path, smiles_tokenizer, objective, caplog):
  seq_len = 64
  model, config, params = _workdir(tmp_path, objective, smiles_tokenizer, seq_len)
  m = api.MASK_STRING
  texts = ["C" + m + "O", m * 5, "C" + m * 6, m * 13, m * (seq_len - 2)]
  out = model.predict_masked(texts, top_k=3)
  assert [len(x) for x in out] == [1, 5, 6, 13, seq_len - 2]
  assert all(len(p) == 3 and all(0 < q <= 1 for _, q in p) for x in out for p in x)
  # One mask with the mostly-[MASK] rows in the same batch (their static bound) is still the training-side
  # prediction; so is every single-mask row on its own.
  ids, _ = model.tokenize(texts[:1])
  _check_against(model, out[0], _mask_log_probs_reference(objective, config, params, ids, [(0, 2)]), 3)
  if objective != "exlm":  # every mask of a mostly-[MASK] row, one at a time, against the training code
    ids, _ = model.tokenize(texts[3:4])
    _check_against(model, out[3], _mask_log_probs_reference(objective, config, params, ids,
                                                            [(0, s) for s in range(1, 14)]), 3)
  else:  # the rule on the padded block equals the rule on a block long enough to need no padding
    ids, _ = model.tokenize(texts[1:2])  # (1, 8): 5 masks -> 8 slots, 10 groups
    long_ids = np.full((1, 32), vocab.PAD, np.int32)
    long_ids[:, :ids.shape[1]] = ids
    slots = np.zeros((1, 8), np.int32)
    slots[0, :5] = np.arange(1, 6)
    logp = np.asarray(model.masked_logits_fn(model.params, long_ids, slots), np.float64)[0, :5]
    _check_against(model, out[1], logp, 3)

  with caplog.at_level(logging.WARNING, logger="exlm_jax.api"):
    cut = model.predict_masked(["C" + m * 70], top_k=2)[0]  # 62 content slots: 61 masks fit
  assert len(cut) == 70 and all(p is not None for p in cut[:61]) and cut[61:] == [None] * 9
  assert any("9 [MASK](s) of 1 input(s) fall past the run's seq_len=64" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Fine-tuning CSVs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("smiles,y\nCCO,\nCCN,\nc1ccccc1,\n", "no labels: every cell of column(s) ['y'] is empty"),
    ("", "is empty"),
    ("smiles,y\n", "has a header but no data rows"),
    ("smiles,y\nC1CC,1\nXx,0\n", "none of its 2 SMILES can be parsed by RDKit"),
    ("smiles,label\nCCO,1\n", "has no column(s) ['y']"),
])
def test_molecule_csv_without_usable_labels_is_one_line_naming_the_file(tmp_path, content, message):
  path = tmp_path / "task.csv"
  path.write_text(content)
  for task_type in ("multitask_binary", "classification", "regression"):
    with pytest.raises(ValueError) as info:
      tasks.load_molecule_csv(path, "smiles", ["y"], task_type)
    text = str(info.value)
    assert "\n" not in text and str(path) in text and message in text, text


# ----------------------------------------------------------------------------------------------
# A quiet first screen
# ----------------------------------------------------------------------------------------------

def test_first_screen_has_our_lines_and_no_library_noise(tmp_path):
  corpus_file = tmp_path / "mols.smi"
  corpus_file.write_text("\n".join(SMILES * 8) + "\n")
  env = dict(os.environ, PYTHONPATH=str(REPO), EXLM_TFDS_DIR=str(tmp_path / "tfds"), JAX_PLATFORMS="")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
  command = [sys.executable, str(REPO / "main.py"), "--config", str(REPO / "configs" / "quickstart.py"),
             f"--config.data.path={corpus_file}", "--config.total_steps=2", "--config.log_every=1",
             "--config.eval_every=2", "--config.checkpoint_every=2", "--config.model.num_layers=1",
             "--config.seq_len=32", "--config.batch_size=4", "--config.data.eval_fraction=0.2",
             f"--workdir={tmp_path / 'run'}"]
  with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
    result = subprocess.run(command, stdout=out, stderr=err, env=env, cwd=tmp_path, timeout=600)
  stdout, stderr = (tmp_path / "stdout").read_bytes(), (tmp_path / "stderr").read_bytes()
  assert result.returncode == 0, stderr.decode()[-3000:]
  both = stdout + stderr
  assert b"\x1b" not in both and b"\r" not in both  # no escape codes, no progress bars redrawn in place
  for noise in (b"Unable to initialize backend", b"Using custom data configuration", b"has no dataset_info.json",
                b"Downloading and preparing dataset", b"Generating splits"):
    assert noise not in both, noise
  text = stdout.decode()
  assert "building corpus exlm_smiles_corpus/mols.smi-" in text
  assert "step 2/2 | loss" in text and "done: checkpoints in" in text
