"""The fine-tuning model: the shared Encoder (copy index 0 everywhere) + a sentence-level head.

All three pretraining objectives hand over the same `Encoder` parameters (`Objective.encoder_params`),
so one model serves MLM, MAE-LM and ExLM checkpoints. For ExLM this is "no expansion, copy = 0"
(docs/design.md §9.1, §12.6): no `[MASK]` exists downstream, nothing is expanded, the transition head is
dropped.

Head (both papers, fairseq `ClassificationHead`): the `<s>` state (slot 0) -> dropout -> dense(D->D)
-> tanh -> dropout -> linear(D->num_outputs). The same head serves
  * 'classification': num_outputs classes, softmax cross-entropy;
  * 'regression': num_outputs targets, squared error (MSE) over labelled cells;
  * 'multitask_binary': num_outputs independent sigmoid tasks, binary cross-entropy masked by the
    label mask (a missing label contributes exactly zero loss and zero gradient).
Every loss returns (sum, count) over the batch; the step divides the global sum by the global count.
`FinetuneLoss` (model + task loss over a batch dict) is the module the one trainer (train/steps.py)
fine-tunes (finetune/loop.py `loss_model`).

Shapes: B batch, L length, D width, C = num_outputs (classes or targets/tasks).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from exlm_jax.data import vocab
from exlm_jax.finetune.metrics import TASK_TYPES
from exlm_jax.models.encoder import Encoder, ModelConfig, _dense


class ClassificationHead(nn.Module):
  """`<s>` state (B, D) -> dropout -> dense -> tanh -> dropout -> linear -> (B, C) float32."""

  cfg: ModelConfig
  num_outputs: int
  pooler_dropout: float = 0.1
  deterministic: bool = True

  @nn.compact
  def __call__(self, cls_state: jax.Array) -> jax.Array:
    drop = lambda x: nn.Dropout(self.pooler_dropout)(x, deterministic=self.deterministic)
    x = _dense(self.cfg.d_model, ("embed", "mlp"), self.cfg, "dense")(drop(cls_state))
    x = jnp.tanh(x)
    out = _dense(self.num_outputs, ("mlp", None), self.cfg, "out")(drop(x))
    return out.astype(jnp.float32)


class FinetuneModel(nn.Module):
  """Encoder + ClassificationHead. `__call__(tokens (B, L) int32) -> (B, C)` float32 outputs.

  Outputs are logits (classification, multitask_binary) or predictions (regression, in the
  normalised target space when the loop standardises targets). Params: {'encoder', 'head'}.
  """

  cfg: ModelConfig
  num_outputs: int
  pooler_dropout: float = 0.1
  deterministic: bool = True

  def setup(self):
    self.encoder = Encoder(self.cfg, self.deterministic, name="encoder")
    self.head = ClassificationHead(self.cfg, self.num_outputs, self.pooler_dropout, self.deterministic, name="head")

  def __call__(self, tokens: jax.Array) -> jax.Array:
    hidden = self.encoder(tokens, padding_mask=tokens == vocab.PAD)  # copy index 0 everywhere
    return self.head(hidden[:, 0])


# ----------------------------------------------------------------------------------------------
# Losses: (sum, count) over a batch; padded rows have an all-False mask
# ----------------------------------------------------------------------------------------------


def classification_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  """Softmax CE. logits (B, C) f32; labels (B,) int; mask (B,) bool. Returns (sum, count, correct)."""
  labels = jnp.where(mask, labels, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  weights = mask.astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
  return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(weights), correct


def regression_loss(preds: jax.Array, targets: jax.Array, mask: jax.Array):
  """Squared error over labelled cells. preds/targets (B, T) f32; mask (B, T) bool. Returns (sum, count)."""
  diff = preds.astype(jnp.float32) - jnp.where(mask, targets, 0.0).astype(jnp.float32)
  return jnp.sum(jnp.where(mask, diff * diff, 0.0)), jnp.sum(mask.astype(jnp.float32))


def masked_bce_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  """Sigmoid BCE over labelled cells. logits/labels (B, T); mask (B, T) bool. Returns (sum, count).

  Missing cells are removed with `where` after sanitising their labels, so a NaN or any value in a
  missing cell gives exactly zero loss and zero gradient.
  """
  logits = logits.astype(jnp.float32)
  labels = jnp.where(mask, labels, 0.0).astype(jnp.float32)
  # log(1 + exp(-|x|)) form: stable for large |x|.
  bce = jnp.maximum(logits, 0.0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.sum(jnp.where(mask, bce, 0.0)), jnp.sum(mask.astype(jnp.float32))


def task_loss(task_type: str, outputs: jax.Array, labels: jax.Array, mask: jax.Array):
  """(loss_sum, weight, metrics) with metrics as name -> (sum, count) pairs, like the objectives."""
  if task_type == "classification":
    loss_sum, count, correct = classification_loss(outputs, labels, mask)
    return loss_sum, count, {"loss": (loss_sum, count), "accuracy": (correct, count)}
  if task_type == "regression":
    loss_sum, count = regression_loss(outputs, labels, mask)
  elif task_type == "multitask_binary":
    loss_sum, count = masked_bce_loss(outputs, labels, mask)
  else:
    raise ValueError(f"task_type={task_type!r}; choose one of {TASK_TYPES}")
  return loss_sum, count, {"loss": (loss_sum, count)}


# ----------------------------------------------------------------------------------------------
# The loss module the trainer fine-tunes
# ----------------------------------------------------------------------------------------------


class FinetuneLoss(FinetuneModel):
  """FinetuneModel + its task loss, over a batch dict (the objective contract of objectives/base.py).

  batch: tokens (B, L) int32; labels (B,) int32 (classification) or (B, C) float32; mask like labels
  (bool; False on filler rows). `__call__(batch, rng)` -> (loss_sum, weight, metrics) of `task_loss`
  (rng unused: dropout comes from the 'dropout' collection); `predict(batch)` -> (B, C) float32 outputs.
  """

  task_type: str = "classification"

  def __call__(self, batch: dict, rng: jax.Array | None = None):
    del rng
    return task_loss(self.task_type, self.predict(batch), batch["labels"], batch["mask"])

  def predict(self, batch: dict) -> jax.Array:
    return super().__call__(batch["tokens"])
