"""AdamW with decoupled weight decay, linear warm-up then linear/cosine decay, optional clipping.

Weight decay (`weight_decay_rule`): "all" (default) decays every parameter, as both papers' fairseq runs
do; "bert" leaves biases and LayerNorm parameters undecayed (the BERT / Hugging Face rule). Both rules
read parameter NAMES, never shapes, so a `scan_layers` model (layers stacked into one leading axis, which
turns every bias into a 2-D array) gets exactly the optimiser of its unrolled twin.
"""

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


WEIGHT_DECAY_RULES = ("all", "bert")
_NO_DECAY_BERT = ("bias", "scale")  # Dense/attention biases; LayerNorm scale and bias


def weight_decay_mask(params, rule: str = "all"):
  """Bool tree like `params`: True where decoupled weight decay applies (see the module docstring)."""
  if rule == "all":
    return jax.tree.map(lambda _: True, params)
  if rule == "bert":
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in _NO_DECAY_BERT, params)
  raise ValueError(f"weight_decay_rule={rule!r}; choose one of {', '.join(WEIGHT_DECAY_RULES)}")


def make_optimizer(config) -> optax.GradientTransformation:
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(
      learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
      weight_decay=config.weight_decay,
      mask=lambda params: weight_decay_mask(params, config.weight_decay_rule)))
  return optax.chain(*parts)
