"""The Repeated-MLM pilot (docs/design.md §10.4) as a pretraining objective: repeat, mask, predict.

The transform of exlm_jax/analysis/repeated_mlm.py inside the jitted step, in JAX, on the pipeline's
blocks (B, n) -> (B, 2 + k (n - 2)) -- never truncated -- with `mask_prob` = p, every copy at its
original position and copy index 1..k (2-D RoPE, as ExLM), and the MLM loss on every masked copy
(`repeated_mlm.loss='masked'`) or only on the copies of tokens whose k copies are all masked ('lost').
Config: configs/repeated_mlm_smiles_small.py (its sweep holds p or p^k fixed).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from exlm_jax.data import vocab
from exlm_jax.models import flops
from exlm_jax.models.encoder import Encoder, ModelConfig
from exlm_jax.models.heads import LMHead
from exlm_jax.objectives import base
from exlm_jax.objectives.masking import maskable
from exlm_jax.objectives.mlm import masked_token_metrics

LOSSES = ("masked", "lost")


def repeated_length(seq_len: int, k: int) -> int:
  """Slots of a repeated block: `<s>`, k copies of each of at most n - 2 content tokens, `</s>`."""
  return 2 + k * (seq_len - 2)


class Repeated(NamedTuple):
  """Pipeline blocks (B, n) repeated in JAX; every field (B, T), T = repeated_length(n, k)."""

  tokens: jax.Array  # int32 uncorrupted repeated block, <pad> after the last </s>
  positions: jax.Array  # int32 original slot of each copy (0 at padding)
  copy_index: jax.Array  # int32 1..k for copies of content tokens, 0 for specials and padding
  content: jax.Array  # bool copies of content tokens (the maskable slots)


def repeat_tokens(tokens: jax.Array, k: int) -> Repeated:
  """Repeats every content slot of `tokens` (B, n) k times; specials once, `<pad>` dropped (then re-padded)."""
  batch, n = tokens.shape
  length = repeated_length(n, k)
  content = maskable(tokens)
  copies = jnp.where(content, k, (tokens != vocab.PAD).astype(jnp.int32))  # (B, n)
  start = jnp.cumsum(copies, axis=1) - copies
  copy = jnp.arange(k, dtype=jnp.int32)
  dest = jnp.where(copy < copies[..., None], start[..., None] + copy, length)  # (B, n, k); `length` = dropped
  rows = jnp.arange(batch)[:, None, None]
  scatter = lambda fill, values: jnp.full((batch, length), fill, jnp.int32).at[rows, dest].set(  # noqa: E731
      jnp.broadcast_to(values, dest.shape).astype(jnp.int32), mode="drop")
  slot = jnp.arange(n, dtype=jnp.int32)[None, :, None]
  copy_index = scatter(0, jnp.where(content[..., None], copy + 1, 0))
  return Repeated(scatter(vocab.PAD, tokens[..., None]), scatter(0, slot), copy_index, copy_index > 0)


def bernoulli_bound(p: float, slots: int) -> int:
  """Static bound on Bernoulli(p) successes among `slots`: the mean + 6 sd (+1), at most `slots`."""
  return min(slots, math.ceil(p * slots + 6.0 * math.sqrt(p * (1.0 - p) * slots)) + 1)


def lost_tokens(rep: Repeated, is_masked: jax.Array, seq_len: int, k: int) -> jax.Array:
  """(B, n) bool: source slots whose k copies are all masked (the corrupted semantics)."""
  rows = jnp.arange(rep.tokens.shape[0])[:, None]
  masked = jnp.zeros((rep.tokens.shape[0], seq_len), jnp.int32).at[rows, rep.positions].add(
      (is_masked & rep.content).astype(jnp.int32))
  return masked == k


class RepeatedMLMModel(nn.Module):
  """Encoder + tied LM head on repeated blocks; `__call__(tokens (B, n), mask_rng) -> (loss_sum, weight, metrics)`."""

  cfg: ModelConfig
  mask_prob: float
  num_copies: int
  loss: str = "masked"
  deterministic: bool = True

  def setup(self):
    self.encoder = Encoder(self.cfg, self.deterministic, name="encoder")
    self.lm_head = LMHead(self.cfg, name="lm_head")

  def __call__(self, tokens, mask_rng):
    k, n = self.num_copies, tokens.shape[1]
    rep = repeat_tokens(tokens, k)
    is_masked = rep.content & (jax.random.uniform(mask_rng, rep.tokens.shape) < self.mask_prob)
    lost = lost_tokens(rep, is_masked, n, k)  # (B, n)
    lost_slot = jnp.take_along_axis(lost, rep.positions, axis=1) & rep.content
    predict = is_masked if self.loss == "masked" else is_masked & lost_slot
    hidden = self.encoder(jnp.where(is_masked, vocab.MASK, rep.tokens), rep.positions, rep.copy_index,
                          rep.tokens == vocab.PAD)
    bound = bernoulli_bound(self.mask_prob, rep.tokens.shape[1] - 2)
    indices = jnp.argsort(~predict, axis=1, stable=True)[:, :bound]  # predicted slots first, in order
    valid = jnp.take_along_axis(predict, indices, axis=1)
    logits = self.lm_head(jnp.take_along_axis(hidden, indices[..., None], axis=1), self.encoder.embedding)
    targets = jnp.take_along_axis(rep.tokens, indices, axis=1)
    loss_sum, count, metrics = masked_token_metrics(logits, targets, valid)
    f32 = lambda x: jnp.sum(x).astype(jnp.float32)  # noqa: E731
    metrics["unreal_ratio"] = (f32(is_masked), f32(rep.content))
    metrics["corrupted_ratio"] = (f32(lost), f32(maskable(tokens)))
    metrics["overflow"] = (f32(predict) - f32(valid), jnp.float32(tokens.shape[0]))  # 0 but for a 6-sd event
    return loss_sum, count, metrics


# `config.repeated_mlm`: a config writes only what it changes; `options(config)` merges these defaults over it.
DEFAULTS = dict(
    num_copies=2,  # k copies of every content token
    loss="masked",  # which masked copies the loss covers: "masked" (every one) | "lost" (all k copies masked)
)


def options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.repeated_mlm` merged over `DEFAULTS`; unknown keys are an error."""
  return base.read_options(config, "repeated_mlm", DEFAULTS)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for a Repeated-MLM config that cannot work."""
  opts = options(config)
  if not isinstance(opts.num_copies, int) or opts.num_copies < 1:
    raise ValueError(f"repeated_mlm.num_copies={opts.num_copies!r}: need an integer k >= 1")
  if opts.loss not in LOSSES:
    raise ValueError(f"repeated_mlm.loss={opts.loss!r}; choose one of {LOSSES}")


def make_model(config: ml_collections.ConfigDict, deterministic: bool) -> RepeatedMLMModel:
  validate(config)
  opts = options(config)
  return RepeatedMLMModel(base.model_config(config), float(config.mask_prob), int(opts.num_copies), opts.loss,
                          deterministic)


def train_flops(config: ml_collections.ConfigDict, include_remat: bool) -> flops.Breakdown:
  """One sequence: the encoder on the 2 + k (n - 2) repeated slots, the LM head at the Bernoulli bound of
  predicted copies."""
  m, n = config.model, config.seq_len
  k = int(options(config).num_copies)
  length = repeated_length(n, k)
  bound = bernoulli_bound(float(config.mask_prob), length - 2)
  return flops.Breakdown(
      encoder=flops.model_encoder_train(m, length, include_remat),
      lm_head=3 * flops.lm_head_forward(bound, m.d_model, m.vocab_size),
      shapes=(("seq_len", n), ("repeated_len", length), ("predicted_max", bound)))


OBJECTIVE = base.register(base.Objective(
    name="repeated_mlm", title="Repeated-MLM", make_model=make_model, validate=validate,
    options=options, copies_option="num_copies", flops=train_flops))
