"""Start / end logits of all windows -> one answer per question, cut out of the original context.

Per question, over all its windows, a candidate span is a pair of context tokens (s, e) with
s <= e < s + max_answer_length, s in a window that gives it the most context (features.max_context_mask:
each span is then scored in exactly one window), scored start[s] + end[e]. The search is exact over
every such pair (the reference implementations first keep the top n_best starts and ends; searching the
L x max_answer_length band instead costs little and never misses the best pair). Candidates whose text
is empty (a lone whitespace piece) are skipped; the n-best list keeps the n_best best distinct texts.
The no-answer (null) score is start[0] + end[0] of `<s>`, the smallest over the question's windows.
SQuAD 2.0 answers "" when null_score - best span score exceeds a threshold (evaluate.best_threshold
picks it on an evaluation set); v1.1 always answers the best span.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from exlm_jax.finetune.squad.features import SquadFeatures, max_context_mask


@dataclasses.dataclass(frozen=True)
class Prediction:
  """A question's best span, its score (start + end logit), the null score and the n-best (text, score) list.

  start, end: character offsets of `text` in the context (context[start:end] == text; 0, 0 without a span).
  """

  qid: str
  text: str
  score: float
  null_score: float
  nbest: tuple[tuple[str, float], ...]
  start: int = 0
  end: int = 0

  @property
  def score_diff(self) -> float:
    """null_score - score: above the threshold, answer "no answer"."""
    return self.null_score - self.score


def predict_answers(features: SquadFeatures, start_logits: np.ndarray, end_logits: np.ndarray, n_best: int = 20,
                    max_answer_length: int = 30) -> dict[str, Prediction]:
  """Question id -> Prediction for every question of `features`; logits (W, L) float over its windows."""
  start_logits, end_logits = np.asarray(start_logits, np.float64), np.asarray(end_logits, np.float64)
  if start_logits.shape != features.tokens.shape or end_logits.shape != features.tokens.shape:
    raise ValueError(f"logits {start_logits.shape} / {end_logits.shape} do not match the features' windows "
                     f"{features.tokens.shape}; predict every window, in order")
  if n_best < 1 or max_answer_length < 1:
    raise ValueError(f"n_best={n_best} and max_answer_length={max_answer_length} must be >= 1")
  out = {}
  for index, example in enumerate(features.examples):
    windows = features.windows_of(index)
    out[example.qid] = _predict_one(features, index, windows, start_logits[windows], end_logits[windows], n_best,
                                    max_answer_length)
  return out


def _candidates(features: SquadFeatures, windows: np.ndarray, start_logits, end_logits, max_answer_length: int):
  """(scores, first, last) over all allowed spans of a question: first / last are context token indices."""
  owned = max_context_mask(features.doc_start[windows], features.doc_len[windows])
  scores, firsts, lasts = [], [], []
  for w, row in enumerate(windows):
    offset, doc_start, n = features.context_offset[row], features.doc_start[row], features.doc_len[row]
    start = start_logits[w, offset:offset + n]
    end = np.concatenate([end_logits[w, offset:offset + n], np.full(max_answer_length - 1, -np.inf)])
    first = np.arange(n)[:, None]
    last = first + np.arange(max_answer_length)[None, :]  # (n, max_answer_length): e = s + k
    score = np.where(owned[w][:, None], start[:, None] + end[last], -np.inf)
    keep = np.isfinite(score)
    scores.append(score[keep])
    firsts.append(np.broadcast_to(first, score.shape)[keep] + doc_start)
    lasts.append(last[keep] + doc_start)
  return np.concatenate(scores), np.concatenate(firsts), np.concatenate(lasts)


def _predict_one(features, index, windows, start_logits, end_logits, n_best, max_answer_length) -> Prediction:
  example, spans = features.examples[index], features.context_spans[index]
  scores, firsts, lasts = _candidates(features, windows, start_logits, end_logits, max_answer_length)
  nbest: dict[str, float] = {}
  best_chars = (0, 0)
  for i in np.argsort(-scores, kind="stable"):
    chars = int(spans[firsts[i], 0]), int(spans[lasts[i], 1])
    text = example.context[chars[0]:chars[1]]
    if text and text not in nbest:
      best_chars = best_chars if nbest else chars
      nbest[text] = float(scores[i])
      if len(nbest) == n_best:
        break
  null_score = float(np.min(start_logits[:, 0] + end_logits[:, 0]))
  if not nbest:  # only whitespace pieces in the context: nothing to answer
    return Prediction(example.qid, "", -np.inf, null_score, ())
  text, score = next(iter(nbest.items()))
  return Prediction(example.qid, text, score, null_score, tuple(nbest.items()), *best_chars)


def final_answers(predictions: Mapping[str, Prediction], null_threshold: float | None = 0.0) -> dict[str, str]:
  """Question id -> answer text: the best span, or "" where score_diff > null_threshold (None: never "", v1.1)."""
  return {q: "" if null_threshold is not None and p.score_diff > null_threshold else p.text
          for q, p in predictions.items()}
