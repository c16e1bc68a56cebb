"""The official SQuAD v1.1 / v2.0 evaluation, written from its definition.

Answers are compared after `normalize_answer`: lower-case, drop ASCII punctuation, drop the articles
a / an / the, collapse whitespace. Per question the best score over its gold answers counts:
  EM: normalised prediction == normalised gold;
  F1: harmonic mean of token precision and recall, tokens being the whitespace-split normalised text
    (common tokens counted with multiplicity). v1.1: no common token -> 0. v2.0: if either side has no
    token, F1 = EM (so an empty prediction scores 1 on an unanswerable question); golds that normalise
    to nothing are dropped, and a question without gold answers is scored against "".
Reported in percent, like the official scripts. v2.0 adds HasAns_* / NoAns_* (answerable / unanswerable
questions) and, given no-answer scores, best_exact / best_f1 with their thresholds: the best score
over "predict no answer when the no-answer score is above t", i.e. the official `best_f1_thresh`.
The sweep only places t between distinct scores, so the reported threshold reproduces the reported
best score (the official script can credit half of a group of tied scores, and reports t = 0.0 when
answering nothing is best; here that t is one below the smallest score). Without ties and when
answering something is best, both agree exactly.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

from exlm_jax.finetune.squad.reader import SquadExample

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """Lower-case, no punctuation, no articles, single spaces: the official SQuAD answer normalisation."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, version: str = "v2.0") -> float:
  """Token-overlap F1 of one prediction against one gold answer (see the module docstring for versions)."""
  predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if version == "v2.0" and (not predicted or not wanted):
    return float(predicted == wanted)
  common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(predicted), common / len(wanted)
  return 2 * precision * recall / (precision + recall)


def gold_answers(example: SquadExample, version: str) -> list[str]:
  """The gold texts a question is scored against ([""] for a v2.0 question without a usable answer)."""
  if version == "v1.1":
    return [a.text for a in example.answers]
  return [a.text for a in example.answers if normalize_answer(a.text)] or [""]


def evaluate(examples: Sequence[SquadExample], predictions: Mapping[str, str], version: str = "v2.0",
             na_scores: Mapping[str, float] | None = None, na_threshold: float = 0.0) -> dict[str, float]:
  """The official metrics for `predictions` (question id -> answer text, "" = no answer).

  v2.0 with `na_scores` (question id -> no-answer score, higher = more likely unanswerable, e.g. the null
  score minus the best span's): `predictions` hold each question's best span, the main exact / f1 answer
  "" where na_score > na_threshold, and best_exact / best_f1 come with the threshold that reaches them.
  Every question needs a prediction.
  """
  if version not in ("v1.1", "v2.0"):
    raise ValueError(f"SQuAD version {version!r}; choose 'v1.1' or 'v2.0'")
  missing = [e.qid for e in examples if e.qid not in predictions or (na_scores is not None and e.qid not in na_scores)]
  if missing:
    raise ValueError(f"no prediction (or no-answer score) for {len(missing)} of {len(examples)} questions "
                     f"(first: {missing[0]!r}); predict every question")
  if not examples:
    raise ValueError("evaluate got no questions")
  golds = {e.qid: gold_answers(e, version) for e in examples}
  raw_exact = {q: max(exact_match(predictions[q], g) for g in gs) for q, gs in golds.items()}
  raw_f1 = {q: max(f1_score(predictions[q], g, version) for g in gs) for q, gs in golds.items()}
  if version == "v1.1":
    return dict(exact=_percent(raw_exact.values()), f1=_percent(raw_f1.values()), total=len(examples))
  has_answer = {e.qid: bool(e.answers) for e in examples}
  exact, f1 = raw_exact, raw_f1
  if na_scores is not None:  # an unanswered question scores 1 exactly when it is unanswerable
    unanswered = {q for q in golds if na_scores[q] > na_threshold}
    exact, f1 = ({q: float(not has_answer[q]) if q in unanswered else s for q, s in raw.items()}
                 for raw in (raw_exact, raw_f1))
  out = dict(exact=_percent(exact.values()), f1=_percent(f1.values()), total=len(examples))
  for name, wanted in (("HasAns", True), ("NoAns", False)):
    qids = [q for q in golds if has_answer[q] == wanted]
    if qids:
      out.update({f"{name}_exact": _percent(exact[q] for q in qids), f"{name}_f1": _percent(f1[q] for q in qids),
                  f"{name}_total": len(qids)})
  if na_scores is not None:
    for name, raw in (("exact", raw_exact), ("f1", raw_f1)):
      out[f"best_{name}"], out[f"best_{name}_thresh"] = best_threshold(raw, na_scores, has_answer, predictions)
  return out


def best_threshold(raw: Mapping[str, float], na_scores: Mapping[str, float], has_answer: Mapping[str, bool],
                   predictions: Mapping[str, str]) -> tuple[float, float]:
  """(best score in %, threshold) over "answer exactly the questions with na_score <= t".

  raw: per-question score of its prediction when answered. An unanswered question scores 1 if it is
  unanswerable, else 0; an answered unanswerable question scores 0 unless its prediction is "".
  """
  qids = sorted(raw, key=lambda q: na_scores[q])
  score = best = float(sum(not has_answer[q] for q in qids))  # answer nothing
  threshold = float(na_scores[qids[0]]) - 1.0
  for i, q in enumerate(qids):
    score += raw[q] if has_answer[q] else -float(bool(predictions[q]))
    group_ends = i + 1 == len(qids) or na_scores[qids[i + 1]] != na_scores[q]
    if group_ends and score > best:
      best, threshold = score, float(na_scores[q])
  return 100.0 * best / len(qids), threshold


def _percent(values) -> float:
  values = list(values)
  return 100.0 * sum(values) / len(values)
