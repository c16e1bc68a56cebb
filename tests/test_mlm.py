"""MLM objective: loss vs a float64 numpy reference, 80/10/10 statistics, logits only at masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import numpy_reference as ref
from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.objectives import base, get, mlm
from exlm_jax.objectives.masking import select_masked_positions


def _config(**kw):
  cfg = config_lib.pretrain_config("mlm", "tiny", seq_len=24, **kw)
  cfg.model.vocab_size = 40
  cfg.model.dropout_rate = cfg.model.attention_dropout_rate = 0.0
  return cfg


def _tokens(batch, n, seed=0):
  rng = np.random.RandomState(seed)
  tokens = np.zeros((batch, n), np.int32)
  for b in range(batch):
    length = rng.randint(6, n + 1)
    tokens[b, :length] = rng.randint(vocab.NUM_SPECIAL, 40, length)
    tokens[b, 0], tokens[b, length - 1] = vocab.BOS, vocab.EOS
  return tokens


def test_mlm_loss_equals_float64_numpy_reference():
  cfg = _config()
  objective = get("mlm")
  params = nn.unbox(base.init_params(objective, cfg, jax.random.key(0)))
  tokens = _tokens(4, 24)
  key = jax.random.key(7)
  loss_sum, (weight, metrics) = base.apply_loss(objective, cfg, params, jnp.asarray(tokens), key, train=False)

  # Same masks as the model draws (mask selection has its own statistical tests).
  mask_rng, _ = jax.random.split(key)
  select_rng, _ = jax.random.split(mask_rng)
  sel = jax.device_get(select_masked_positions(jnp.asarray(tokens), select_rng, cfg.mask_prob))
  corrupted = np.where(sel.is_masked, vocab.MASK, tokens)
  model_cfg = base.model_config(cfg)
  hidden = ref.encoder(params["encoder"], corrupted, model_cfg, padding_mask=tokens == vocab.PAD)
  nll = []
  for b in range(4):
    for j in np.flatnonzero(sel.is_masked[b]):
      logp = ref.log_softmax(ref.lm_head(hidden[b, j], params["lm_head"], params["encoder"]["token_embed"]["embedding"]))
      nll.append(-logp[tokens[b, j]])
  assert weight == len(nll) > 0
  np.testing.assert_allclose(loss_sum / weight, np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"][0], loss_sum)


def test_bert_corruption_is_80_10_10():
  tokens = jnp.asarray(np.tile(_tokens(1, 400, seed=3), (50, 1)))
  is_masked = jnp.asarray(np.random.RandomState(0).rand(*tokens.shape) < 0.5) & (tokens > vocab.EOS)
  out = np.asarray(mlm.corrupt(tokens, is_masked, jax.random.key(0), 40, True))
  sel, tok = np.asarray(is_masked), np.asarray(tokens)
  assert (out[~sel] == tok[~sel]).all()
  frac_mask = (out[sel] == vocab.MASK).mean()
  frac_same = (out[sel] == tok[sel]).mean()
  assert abs(frac_mask - 0.8) < 0.01 and abs(frac_same - (0.1 + 0.1 / 35)) < 0.01
  assert (out[sel] >= vocab.NUM_SPECIAL).sum() + (out[sel] == vocab.MASK).sum() == sel.sum()
  default = np.asarray(mlm.corrupt(tokens, is_masked, jax.random.key(0), 40, False))
  assert (default[sel] == vocab.MASK).all()


def test_logits_only_at_masked_positions():
  cfg = _config()
  model = mlm.make_model(cfg, True)
  params = base.init_params(get("mlm"), cfg, jax.random.key(0))
  tokens = jnp.asarray(_tokens(2, 24))
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens, jax.random.key(0)))(params)
  m_max = -(-0.15 * 24 // 1)
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")}
  assert (2, int(m_max), 40) in shapes
  assert not any(len(s) == 3 and s[1] == 24 and s[2] == 40 for s in shapes)
