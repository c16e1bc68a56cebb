"""exlm_jax.load: round trip of a pretraining checkpoint, pure/jitted forward functions, predict_masked
for the three objectives, and clear errors for paths without a checkpoint.

`make_pretraining_workdir` writes exactly what the pretraining loop writes (config.json with the
vocabulary size, tokenizer/, checkpoints/<step> with the Orbax 'state' item) from a freshly initialised
tiny model, so these tests don't pay for a data pipeline; test_finetune_loop.py reuses it.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import exlm_jax
from exlm_jax import api, config_lib
from exlm_jax.data import tokenizers, vocab
from exlm_jax.objectives import exlm, maelm, mlm
from exlm_jax.train import checkpoint, partitioning, steps
from exlm_jax.train import loop as train_loop

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CN1CCC[C@H]1c1cccnc1", "O=C(O)c1ccccc1Cl", "CC(C)Cc1ccccc1Br"]


def tiny_pretrain_config(objective: str, vocab_size: int, seq_len: int = 32) -> ml_collections.ConfigDict:
  config = config_lib.pretrain_config(objective, "tiny")
  config.seq_len = seq_len
  config.async_checkpointing = False
  if objective == "maelm":  # the paper's encoder: post-LN, embedding LN, absolute + relative bias
    config.model.update(pre_ln=False, positions="absolute+relbias", embed_layernorm=True, max_positions=64,
                        rel_pos_bins=8, max_rel_pos=16)
    config.maelm = ml_collections.ConfigDict(dict(decoder_layers=1))
  if objective == "exlm":
    config.exlm = ml_collections.ConfigDict(dict(num_copies=2))
  return train_loop.with_vocab_size(config, vocab_size)


def random_state(setup: steps.TrainSetup, seed: int = 0) -> steps.TrainState:
  """A TrainState with the trainer's exact tree, filled on the host (N(0, 0.02); LayerNorm scales 1).

  Compiling the real init costs several CPU seconds per objective; the tests only need the tree.
  """
  abstract = setup.abstract_state()
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype))

  params = jax.tree_util.tree_map_with_path(fill, abstract.params)
  opt_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract.opt_state)
  return steps.TrainState(step=jnp.asarray(step_of(abstract)), params=params, opt_state=opt_state)


def step_of(abstract_state) -> np.ndarray:
  return np.zeros(abstract_state.step.shape, abstract_state.step.dtype)


def make_pretraining_workdir(path: pathlib.Path, objective: str, tokenizer, step: int = 3, num_layers: int = 2):
  """A pretraining workdir as train/loop.py leaves it; returns (config, the saved params)."""
  config = tiny_pretrain_config(objective, tokenizer.vocab_size)
  config.model.num_layers = num_layers  # 1 layer: half the compile time
  state = random_state(steps.TrainSetup.create(config, partitioning.create_mesh(config.mesh)))
  manager = checkpoint.make_manager(str(path / "checkpoints"), config)
  checkpoint.save(manager, step, jax.device_get(state), force=True)
  manager.wait_until_finished()
  manager.close()
  checkpoint.write_json(str(path / "config.json"), config.to_dict())
  tokenizer.save(path / "tokenizer")
  return config, jax.device_get(state.params)


@pytest.fixture(scope="module")
def smiles_tokenizer():
  return tokenizers.SmilesRegexTokenizer.build(SMILES)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, smiles_tokenizer):
  path = tmp_path_factory.mktemp("mlm_run")
  config, params = make_pretraining_workdir(path, "mlm", smiles_tokenizer)
  return path, config, params


def test_load_round_trips_and_encode_equals_training_forward(mlm_run):
  path, config, saved = mlm_run
  model = exlm_jax.load(path)
  assert model.kind == "pretrain" and model.step == 3 and model.objective == "mlm"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), model.params, saved)

  ids, pad = model.tokenize(["CCO", "c1ccccc1O"])
  assert ids.dtype == np.int32 and ids.shape[1] % 8 == 0 and (ids[:, 0] == vocab.BOS).all()
  assert model.detokenize(ids) == ["CCO", "c1ccccc1O"]

  # The training-time forward: the MLM objective's own model (its encoder), on the params of the whole
  # training state restored by the trainer's checkpoint module (Orbax StandardRestore, not the run store's
  # params-only restore).
  setup = steps.TrainSetup.create(config, partitioning.create_mesh(config.mesh))
  manager = checkpoint.make_manager(str(path / "checkpoints"), config)
  state, step = checkpoint.restore(manager, setup.abstract_state())
  manager.close()
  restored = state.params
  assert step == 3
  net = mlm.make_model(config, True)
  reference = jax.jit(lambda p, t, m: net.apply({"params": p}, t, m, method=lambda mod, t, m: mod.encoder(
      t, padding_mask=m)))(restored, ids, pad)
  hidden = model.encode(ids, pad)
  assert hidden.shape == (2, ids.shape[1], config.model.d_model)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(reference), rtol=1e-5, atol=1e-5)

  # Pure functions compose with the caller's own transformations.
  jitted = jax.jit(model.encode_fn)(model.params, ids, pad)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(reference), rtol=1e-5, atol=1e-5)
  per_example = jax.jit(jax.vmap(lambda i, m: model.encode_fn(model.params, i[None], m[None])[0]))(ids, pad)
  np.testing.assert_allclose(np.asarray(per_example), np.asarray(reference), rtol=1e-5, atol=1e-5)

  vectors = model.embed(["CCO", "c1ccccc1O"])
  weights = (~pad)[..., None]
  np.testing.assert_allclose(vectors, (np.asarray(reference) * weights).sum(1) / weights.sum(1), rtol=1e-5, atol=1e-5)
  for sub in ("checkpoints", "checkpoints/3"):  # the other accepted path forms
    assert exlm_jax.load(path / sub).step == 3


def test_predict_masked_mlm_matches_the_lm_head(mlm_run):
  path, config, saved = mlm_run
  model = exlm_jax.load(path, devices=jax.local_devices()[:1])
  texts = ["CC[MASK]c1ccccc1", "[MASK]CC[MASK]"]
  out = model.predict_masked(texts, top_k=3)
  assert [len(x) for x in out] == [1, 2] and all(len(m) == 3 for x in out for m in x)
  ids, _ = model.tokenize(texts)
  assert (ids == vocab.MASK).sum() == 3  # "[MASK]" is kept as id 4 by the SMILES tokenizer
  net = mlm.make_model(config, True)
  slots = np.array([[3, 0], [1, 4]], np.int32)
  logits = np.array(jax.jit(lambda p, t, s: net.apply({"params": p}, t, s, method=net.predict))(saved, ids, slots))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)  # the model's distribution; specials are only never proposed
  probs[..., list(api.NEVER_PREDICTED)] = 0.0
  for b, j in ((0, 0), (1, 0), (1, 1)):
    best = np.argsort(-probs[b, j])[:3]
    got = out[b][j]
    assert [t for t, _ in got] == [smiles_token(model, i) for i in best]
    np.testing.assert_allclose([p for _, p in got], probs[b, j, best], rtol=1e-4)


def smiles_token(model, i):
  return model.tokenizer.id_to_token(int(i))


@pytest.mark.parametrize("objective", ["maelm", "exlm"])
def test_predict_masked_maelm_exlm_match_their_models(tmp_path, smiles_tokenizer, objective):
  config, saved = make_pretraining_workdir(tmp_path, objective, smiles_tokenizer, num_layers=1)
  model = exlm_jax.load(tmp_path, devices=jax.local_devices()[:1])
  texts = ["CC(=O)N[MASK]1ccc(O)cc1", "C[MASK]O"]
  out = model.predict_masked(texts, top_k=4)
  assert [len(x) for x in out] == [1, 1] and all(len(m) == 4 for x in out for m in x)
  ids, _ = model.tokenize(texts)
  is_masked = ids == vocab.MASK
  slot = np.argmax(is_masked, axis=1)
  net = {"maelm": maelm, "exlm": exlm}[objective].make_model(config, True)
  if objective == "maelm":
    def reference(m, tokens, masked):
      dec_in, _ = m.decoder_input(tokens, masked)
      hidden = m.decoder(dec_in, tokens == vocab.PAD)
      return m.lm_head(hidden[jnp.arange(2), slot], m.encoder.embedding)
    logits = jax.jit(lambda p, t, m: net.apply({"params": p}, t, m, method=reference))(saved, ids, is_masked)
    logp = jax.nn.log_softmax(logits, -1)
  else:  # groups [<s>, the mask, </s>]: the mask's k copies are vertices k .. 2k-1
    k = config.exlm.num_copies
    logits = jax.jit(lambda p, t, m: net.apply({"params": p}, t, m, method=net.forward).logits)(saved, ids, is_masked)
    copies = jax.nn.log_softmax(logits[:, k:2 * k], -1)
    logp = jax.nn.logsumexp(copies, axis=1) - np.log(k)
  probs = np.exp(np.asarray(logp, np.float64))
  probs[:, list(api.NEVER_PREDICTED)] = 0
  for b in range(2):
    best = np.argsort(-probs[b])[:4]
    assert [t for t, _ in out[b][0]] == [smiles_token(model, i) for i in best]
    np.testing.assert_allclose([p for _, p in out[b][0]], probs[b, best], rtol=1e-4)


def test_load_without_checkpoint_gives_a_clear_error(tmp_path, mlm_run):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="holds no exlm_jax run"):
    exlm_jax.load(empty)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    exlm_jax.load(tmp_path / "missing")
  half = tmp_path / "half"  # config.json written, no checkpoint yet
  half.mkdir()
  (half / "config.json").write_text(json.dumps(mlm_run[1].to_dict()))
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    exlm_jax.load(half)
  with pytest.raises(ValueError, match="fine-tuning workdir"):
    exlm_jax.load(mlm_run[0], devices=jax.local_devices()[:1]).predict(["CCO"])


def test_import_is_lazy():
  import subprocess
  import sys
  code = "import sys, exlm_jax; assert 'jax' not in sys.modules; assert callable(exlm_jax.load)"
  subprocess.run([sys.executable, "-c", code], check=True)
