"""Extractive QA model: the shared Encoder (copy index 0 everywhere, as in finetune/model.py) + a span head.

Head (MAE-LM / COCO-LM `SQuADHead`): two independent Linear(D->1) scorers give start and end logits
over the encoder states; positions that cannot hold an answer (`p_mask`) are pushed to MASKED_LOGIT.
The reference head uses -inf there; a large negative finite value has the same softmax in float32
(exp underflows to exactly 0) but keeps sums of logits and the loss NaN-free even for a fully masked
row. Loss per window = (CE(start) + CE(end)) / 2; no-answer is the `<s>` position 0, which p_mask
never hides. Params: {'encoder', 'head': {'start', 'end'}}, so a pretrained `encoder` sub-tree drops
in unchanged.

Shapes: B windows, L length, D width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from exlm_jax.data import vocab
from exlm_jax.models.encoder import Encoder, ModelConfig, _dense

MASKED_LOGIT = -1e9


class SquadHead(nn.Module):
  """Encoder states (B, L, D) -> start, end logits (B, L) float32, MASKED_LOGIT where p_mask is True."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, p_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    start = _dense(1, ("embed", None), self.cfg, "start")(hidden)[..., 0].astype(jnp.float32)
    end = _dense(1, ("embed", None), self.cfg, "end")(hidden)[..., 0].astype(jnp.float32)
    if p_mask is not None:
      start, end = jnp.where(p_mask, MASKED_LOGIT, start), jnp.where(p_mask, MASKED_LOGIT, end)
    return start, end


def span_loss(start_logits: jax.Array, end_logits: jax.Array, start: jax.Array, end: jax.Array, mask: jax.Array):
  """Summed (CE(start) + CE(end)) / 2 over windows with mask True, and how many such windows.

  start_logits / end_logits (B, L) float32 (already p-masked); start / end (B,) int labels; mask (B,) bool.
  Returns (loss_sum, weight, span_correct): span_correct counts windows whose argmax start and end both
  hit the labels.
  """
  def nll(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]

  start, end = jnp.where(mask, start, 0), jnp.where(mask, end, 0)
  per_window = 0.5 * (nll(start_logits, start) + nll(end_logits, end))
  weight = jnp.sum(mask.astype(jnp.float32))
  hit = (jnp.argmax(start_logits, -1) == start) & (jnp.argmax(end_logits, -1) == end) & mask
  return jnp.sum(jnp.where(mask, per_window, 0.0)), weight, jnp.sum(hit.astype(jnp.float32))


class SquadModel(nn.Module):
  """Encoder + SquadHead.

  `__call__(batch) -> (loss_sum, weight, metrics)` for the trainer: batch holds tokens (B, L) int32,
  start / end (B,) int32 label positions, p_mask (B, L) bool and optionally mask (B,) bool (False = filler
  row, no loss); weight = number of real windows; metrics name -> (sum, count): loss, span_accuracy.
  `logits(tokens, p_mask=None) -> (start, end)` (B, L) float32 for prediction.
  """

  cfg: ModelConfig
  deterministic: bool = True

  def setup(self):
    self.encoder = Encoder(self.cfg, self.deterministic, name="encoder")
    self.head = SquadHead(self.cfg, name="head")

  def logits(self, tokens: jax.Array, p_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    hidden = self.encoder(tokens, padding_mask=tokens == vocab.PAD)
    return self.head(hidden, p_mask)

  def __call__(self, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
    start_logits, end_logits = self.logits(batch["tokens"], batch["p_mask"])
    mask = batch.get("mask")
    mask = jnp.ones(batch["start"].shape, bool) if mask is None else mask
    loss_sum, weight, correct = span_loss(start_logits, end_logits, batch["start"], batch["end"], mask)
    return loss_sum, weight, {"loss": (loss_sum, weight), "span_accuracy": (correct, weight)}
