"""Plain masked language modelling (the baseline both papers compare against).

Selected positions are replaced by [MASK] (100 % by default, as both papers; BERT's 80/10/10 with
`mlm.bert_corruption=True`), the encoder runs on the corrupted block, and the tied LM head is applied
only at the M_max gathered masked positions (B, M_max, V) -- never over the full sequence.
Loss = cross-entropy summed over valid masked tokens, normalised by their global count.

A batch is a token array (B, n) or a packed-block dict {'tokens', 'segment_ids', 'positions'}
(objectives/segments.py): masks are drawn per example (masking.py, bound set by `max_examples`, the
data's `max_examples_per_block`) and the encoder attends within each example at its own positions, so
a packed batch gives the loss, weight, metrics and gradients of the same examples one per block.
`__call__(batch, mask_rng)` = `select_masks` + `loss_given_masks(batch, selection, corrupt_rng)`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exlm_jax.data import vocab
from exlm_jax.models import flops
from exlm_jax.models.encoder import Encoder, ModelConfig
from exlm_jax.models.heads import LMHead
from exlm_jax.objectives import base
from exlm_jax.objectives.masking import MaskSelection, max_masked, select_masked_positions
from exlm_jax.objectives.segments import split_batch


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
  """Encoder + LM head; `__call__(batch (B, n) tokens or packed dict, mask_rng) -> (loss_sum, weight, metrics)`.

  max_examples: the most examples one block holds (1 = one example per block); sets the static mask bound.
  """

  cfg: ModelConfig
  mask_prob: float
  bert_corruption: bool = False
  deterministic: bool = True
  max_examples: int = 1

  def setup(self):
    self.encoder = Encoder(self.cfg, self.deterministic, name="encoder")
    self.lm_head = LMHead(self.cfg, name="lm_head")

  def __call__(self, batch, mask_rng):
    select_rng, corrupt_rng = jax.random.split(mask_rng)
    return self.loss_given_masks(batch, self.select_masks(batch, select_rng), corrupt_rng)

  def select_masks(self, batch, rng) -> MaskSelection:
    """The positions to predict, per example (masking.py)."""
    tokens, segment_ids, _ = split_batch(batch)
    return select_masked_positions(tokens, rng, self.mask_prob, segment_ids, self.max_examples)

  def loss_given_masks(self, batch, selection: MaskSelection, corrupt_rng=None):
    """(loss_sum, weight, metrics) for a given selection; corrupt_rng is needed with bert_corruption only."""
    tokens, segment_ids, positions = split_batch(batch)
    if self.bert_corruption and corrupt_rng is None:
      raise ValueError("mlm.bert_corruption=True draws its 80/10/10 replacements: pass corrupt_rng")
    inputs = corrupt(tokens, selection.is_masked, corrupt_rng, self.cfg.vocab_size, self.bert_corruption)
    hidden = self.encoder(inputs, positions=positions, padding_mask=tokens == vocab.PAD, segment_ids=segment_ids)
    gathered = jnp.take_along_axis(hidden, selection.indices[..., None], axis=1)  # (B, M_max, D)
    logits = self.lm_head(gathered, self.encoder.embedding)
    targets = jnp.take_along_axis(tokens, selection.indices, axis=1)
    return masked_token_metrics(logits, targets, selection.valid)

  def predict(self, batch, positions_to_predict):
    """Logits (B, P, V) at given positions of an already-masked input or packed dict (API / analyses)."""
    inputs, segment_ids, positions = split_batch(batch)
    hidden = self.encoder(inputs, positions=positions, padding_mask=inputs == vocab.PAD, segment_ids=segment_ids)
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
  return MLMModel(base.model_config(config), config.mask_prob, bool(options(config).bert_corruption), deterministic,
                  base.max_examples_per_block(config))


def masked_log_probs():
  """predict_masked's rule: the LM head at the [MASK] slots of the input, as in training (MLMModel.predict)."""
  return MLMModel.predict


def train_flops(config: ml_collections.ConfigDict, include_remat: bool) -> flops.Breakdown:
  """One sequence: the encoder on n slots, the LM head at the M_max masked positions (of a block holding up to
  `base.max_examples_per_block(config)` examples)."""
  m, n = config.model, config.seq_len
  m_max = max_masked(config.mask_prob, n, base.max_examples_per_block(config))
  return flops.Breakdown(
      encoder=flops.model_encoder_train(m, n, include_remat),
      lm_head=3 * flops.lm_head_forward(m_max, m.d_model, m.vocab_size),
      shapes=(("seq_len", n), ("masked_max", m_max)))


def rank_groups(hidden_states, tokens: np.ndarray, selection) -> dict:
  """effective_rank's masked-input views (real = content tokens; the clean input is the tool's shared
  base.CLEAN_INPUT): 'masked_input/real' the real unmasked tokens of the masked input (group 1),
  'masked_input/mask' the [MASK] states (group 3)."""
  masked = np.asarray(selection.is_masked)
  masked_states = hidden_states(np.where(masked, vocab.MASK, tokens), None, tokens == vocab.PAD)
  return {"masked_input/real": (masked_states, base.content_slots(tokens) & ~masked),
          "masked_input/mask": (masked_states, masked)}


OBJECTIVE = base.register(base.Objective(
    name="mlm", title="MLM", make_model=make_model, flops=train_flops, masked_log_probs=masked_log_probs,
    exports_masked_lm=True, options=options, packed_batches=True,
    rank_groups=base.RankGroups(
        rank_groups, headline={"masked_input": "masked_input/real"},
        mask_subspace=(base.CLEAN_INPUT, "masked_input/mask", "masked_input/real"))))
