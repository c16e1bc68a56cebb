"""AdamW with decoupled weight decay, linear warm-up then linear/cosine decay, optional clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  """0 -> peak over `warmup_steps`, then linear (fairseq polynomial_decay, power 1) or cosine to 0.

  A run shortened with `--config.total_steps` keeps its shape: warm-up is capped at total_steps.
  """
  warmup_steps = min(config.warmup_steps, config.total_steps)
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(warmup_steps, 1))
  decay_steps = max(config.total_steps - warmup_steps, 1)
  if config.lr_schedule == "linear":
    decay = optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
  elif config.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
  elif config.lr_schedule == "constant":
    decay = optax.constant_schedule(config.learning_rate)
  else:
    raise ValueError(f"lr_schedule={config.lr_schedule!r}; choose linear, cosine or constant")
  return optax.join_schedules([warmup, decay], [warmup_steps])


def weight_decay_mask(params):
  """Decay matrices and embeddings; exclude biases and LayerNorm parameters (all 1-D leaves)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config) -> optax.GradientTransformation:
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(
      learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
      weight_decay=config.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)
