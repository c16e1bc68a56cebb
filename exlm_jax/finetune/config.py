"""Fine-tuning configuration: validation of `config_lib.finetune_config`-based configs (one-line errors before
any data work) and the optimizer fields train/optim.py reads. The defaults live in exlm_jax/config_lib.py."""

from __future__ import annotations

import jax
import ml_collections

from exlm_jax.train import partitioning

OVERLONG = ("truncate", "skip")  # data.overlong: what fine-tuning does with inputs over seq_len (finetune/lengths.py)

# Model fields a fine-tuning config may change on top of the pretrained architecture.
MODEL_OVERRIDES = ("dropout_rate", "attention_dropout_rate", "dtype", "remat")


def label_columns(value) -> list[str]:
  """'A,B' (or a list) -> ['A', 'B']."""
  if isinstance(value, str):
    return [c.strip() for c in value.split(",") if c.strip()]
  return [str(c) for c in value]


def validate_config(config, num_devices: int) -> None:
  """Raises a one-line ValueError naming the bad field and how to fix it."""
  for field in ("batch_size", "eval_batch_size", "num_epochs", "log_every"):
    if config[field] <= 0:
      raise ValueError(f"{field}={config[field]} must be positive")
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate={config.learning_rate} must be positive, e.g. --config.learning_rate=2e-5")
  if not 0.0 <= config.warmup_ratio < 1.0:
    raise ValueError(f"warmup_ratio={config.warmup_ratio} must lie in [0, 1), e.g. 0.06")
  if config.eval_every < 0:
    raise ValueError(f"eval_every={config.eval_every} must be >= 0 (0 = evals_per_epoch per epoch)")
  if config.evals_per_epoch < 1:
    raise ValueError(f"evals_per_epoch={config.evals_per_epoch} must be >= 1")
  if not config.seeds:
    raise ValueError("seeds is empty; give at least one, e.g. --config.seeds='(0,)'")
  if config.seq_len != 0 and config.seq_len < 4:
    raise ValueError(f"seq_len={config.seq_len} leaves no room for text; use >= 4 (or 0: from the pretraining run)")
  if config.data.overlong not in OVERLONG:
    raise ValueError(f"data.overlong={config.data.overlong!r}; choose 'truncate' (cut at the end) or 'skip'")
  unknown = sorted(set(config.model.keys()) - set(MODEL_OVERRIDES))
  if unknown:
    raise ValueError(f"config.model may only override {MODEL_OVERRIDES} of the pretrained encoder, got {unknown}")
  dp = partitioning.data_parallel_size(config.mesh, num_devices)
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % (dp * jax.process_count()):
      raise ValueError(f"{field}={config[field]} must be divisible by the data-parallel size {dp} "
                       f"(and by {jax.process_count()} processes)")
  if config.data.path and not label_columns(config.data.label_columns):
    raise ValueError("data.path is set but data.label_columns is empty; e.g. --config.data.label_columns=A,B")


def optimizer_config(config, total_steps: int) -> ml_collections.ConfigDict:
  """The fields `train/optim.py` reads, with warm-up as a fraction of the run's steps."""
  return ml_collections.ConfigDict(dict(
      learning_rate=config.learning_rate, total_steps=total_steps,
      warmup_steps=int(round(config.warmup_ratio * total_steps)), lr_schedule=config.lr_schedule,
      adam_b1=config.adam_b1, adam_b2=config.adam_b2, adam_eps=config.adam_eps,
      weight_decay=config.weight_decay, weight_decay_rule=config.weight_decay_rule,
      grad_clip_norm=config.grad_clip_norm))
