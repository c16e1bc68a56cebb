"""Prediction without a trainer: logits for every window, and `answer(question, context)` for one question.

Both are pure functions of (params, model config, inputs) that run SquadModel.logits; batches are padded to a
fixed size, so a caller that jits them (the API passes its jitted, device-sharded `logits_fn`) compiles once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from exlm_jax.finetune.squad import decode
from exlm_jax.finetune.squad.features import FeatureConfig, OffsetTokenizer, SquadFeatures, build_features
from exlm_jax.finetune.squad.model import SquadModel
from exlm_jax.finetune.squad.reader import SquadExample
from exlm_jax.models.encoder import ModelConfig

LogitsFn = Callable[..., tuple]  # (params, tokens (B, L) int32) -> start, end logits (B, L)


class SpanAnswer(NamedTuple):
  """An answer: its text, score and character offsets in the context (context[start:end] == text).

  No answer (SQuAD 2.0): text "", score = the null score, start = end = 0.
  """

  text: str
  score: float
  start: int
  end: int


def squad_logits(model_cfg: ModelConfig, params, tokens):
  """(start, end) logits (B, L) float32 of SquadModel over tokens (B, L) int32 (no p_mask)."""
  return SquadModel(model_cfg).apply({"params": params}, tokens, method=SquadModel.logits)


def window_logits(params, model_cfg: ModelConfig, features: SquadFeatures, batch_size: int = 64,
                  logits_fn: LogitsFn | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Start and end logits (W, L) float32 of every window (no p_mask: decoding only reads context and `<s>`).

  logits_fn(params, tokens) replaces `squad_logits` (e.g. a jitted one); batches have `batch_size` rows.
  """
  logits_fn = logits_fn or (lambda p, tokens: squad_logits(model_cfg, p, tokens))
  starts, ends = [], []
  for first in range(0, len(features), batch_size):
    rows = np.arange(first, min(first + batch_size, len(features)))
    start, end = logits_fn(params, features.batch(rows, batch_size)["tokens"])
    starts.append(np.asarray(start)[:len(rows)])
    ends.append(np.asarray(end)[:len(rows)])
  shape = (0, features.tokens.shape[1])
  return (np.concatenate(starts) if starts else np.zeros(shape, np.float32),
          np.concatenate(ends) if ends else np.zeros(shape, np.float32))


def answer(params, tokenizer: OffsetTokenizer, model_cfg: ModelConfig, question: str, context: str, *,
           feature_config: FeatureConfig = FeatureConfig(), n_best: int = 20, max_answer_length: int = 30,
           null_threshold: float | None = 0.0, logits_fn: LogitsFn | None = None,
           batch_size: int | None = None) -> SpanAnswer:
  """The answer to `question` in `context` (a SpanAnswer: text, score, character offsets).

  The best span and its start + end logit or, when null_score - best span score > null_threshold (SQuAD 2.0
  models; use the evaluation's best_f1_thresh), no answer ("", null score). null_threshold=None never
  abstains (v1.1). batch_size: windows per logits call (default: all of them).
  """
  if not context.strip():
    raise ValueError("answer() needs a non-empty context to find the answer in")
  example = SquadExample("question", "", question, context, ())
  features = build_features([example], tokenizer, feature_config)
  start, end = window_logits(params, model_cfg, features, batch_size or len(features), logits_fn)
  predictions = decode.predict_answers(features, start, end, n_best, max_answer_length)
  prediction = predictions[example.qid]
  if decode.final_answers(predictions, null_threshold)[example.qid]:
    return SpanAnswer(prediction.text, prediction.score, prediction.start, prediction.end)
  return SpanAnswer("", prediction.null_score, 0, 0)
