"""Plain masked language modelling (the baseline both papers compare against).

Selected positions are replaced by [MASK] (100 % by default, as both papers; BERT's 80/10/10 with
`mlm.bert_corruption=True`), the encoder runs on the corrupted block, and the tied LM head is applied
only at the M_max gathered masked positions (B, M_max, V) -- never over the full sequence.
Loss = cross-entropy summed over valid masked tokens, normalised by their global count.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from exlm_jax.data import vocab
from exlm_jax.models.encoder import Encoder, ModelConfig
from exlm_jax.models.heads import LMHead
from exlm_jax.objectives import base
from exlm_jax.objectives.masking import select_masked_positions


def masked_token_metrics(logits: jax.Array, targets: jax.Array, valid: jax.Array):
  """CE summed over valid slots and (sum, count) metrics. logits (B, M, V) f32; targets/valid (B, M)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  weights = valid.astype(jnp.float32)
  loss_sum = jnp.sum(nll * weights)
  count = jnp.sum(weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  return loss_sum, count, {"loss": (loss_sum, count), "accuracy": (correct, count)}


def corrupt(tokens, is_masked, rng, vocab_size: int, bert_corruption: bool):
  """[MASK] at selected slots; with bert_corruption, 10 % random real token and 10 % unchanged."""
  if not bert_corruption:
    return jnp.where(is_masked, vocab.MASK, tokens)
  choice_rng, token_rng = jax.random.split(rng)
  u = jax.random.uniform(choice_rng, tokens.shape)
  random_tokens = jax.random.randint(token_rng, tokens.shape, vocab.NUM_SPECIAL, vocab_size)
  replacement = jnp.where(u < 0.8, vocab.MASK, jnp.where(u < 0.9, random_tokens, tokens))
  return jnp.where(is_masked, replacement, tokens)


class MLMModel(nn.Module):
  """Encoder + LM head; `__call__(tokens (B, n), mask_rng) -> (loss_sum, weight, metrics)`."""

  cfg: ModelConfig
  mask_prob: float
  bert_corruption: bool = False
  deterministic: bool = True

  def setup(self):
    self.encoder = Encoder(self.cfg, self.deterministic, name="encoder")
    self.lm_head = LMHead(self.cfg, name="lm_head")

  def __call__(self, tokens, mask_rng):
    select_rng, corrupt_rng = jax.random.split(mask_rng)
    selection = select_masked_positions(tokens, select_rng, self.mask_prob)
    inputs = corrupt(tokens, selection.is_masked, corrupt_rng, self.cfg.vocab_size, self.bert_corruption)
    hidden = self.encoder(inputs, padding_mask=tokens == vocab.PAD)
    gathered = jnp.take_along_axis(hidden, selection.indices[..., None], axis=1)  # (B, M_max, D)
    logits = self.lm_head(gathered, self.encoder.embedding)
    targets = jnp.take_along_axis(tokens, selection.indices, axis=1)
    loss_sum, count, metrics = masked_token_metrics(logits, targets, selection.valid)
    return loss_sum, count, metrics

  def predict(self, inputs, positions_to_predict):
    """Logits (B, P, V) at given positions of an already-masked input (for the API / analyses)."""
    hidden = self.encoder(inputs, padding_mask=inputs == vocab.PAD)
    gathered = jnp.take_along_axis(hidden, positions_to_predict[..., None], axis=1)
    return self.lm_head(gathered, self.encoder.embedding)


# `config.mlm`: a config writes only what it changes; `options(config)` merges these defaults over it.
DEFAULTS = dict(
    bert_corruption=False,  # BERT's 80 % [MASK] / 10 % random token / 10 % unchanged instead of 100 % [MASK]
)


def options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.mlm` merged over `DEFAULTS`; unknown keys are an error."""
  return base.read_options(config, "mlm", DEFAULTS)


def make_model(config: ml_collections.ConfigDict, deterministic: bool) -> MLMModel:
  return MLMModel(base.model_config(config), config.mask_prob, bool(options(config).bert_corruption), deterministic)


OBJECTIVE = base.register(base.Objective(name="mlm", make_model=make_model, options=options))
