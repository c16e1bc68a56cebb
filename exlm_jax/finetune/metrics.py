"""Fine-tuning metrics (GLUE and MoleculeNet definitions) and the GLUE task table.

The maths is scikit-learn's and scipy's; these thin wrappers add our conventions. Every metric returns
a Python float. Degenerate inputs give a defined value instead of NaN or an exception: MCC, Pearson and
Spearman are 0.0 when either side is constant (sklearn's MCC convention, extended), F1 is 0.0 when
there are no true or predicted positives. Non-finite predictions give NaN (never selected as the best
checkpoint) for the correlations, ROC-AUC and the regression errors. Multi-task metrics score each task
over its labelled entries only (label mask / NaN label), and ROC-AUC skips, and counts, tasks whose
labelled entries hold a single class.

Shapes: N examples, C classes, T tasks (label columns).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np
import scipy.stats
from sklearn import metrics as skm

log = logging.getLogger(__name__)

TASK_TYPES = ("classification", "regression", "multitask_binary")

# Composite metrics are means of their parts; the loop selects checkpoints by a task's `main_metric`.
_COMPOSITES = {"pearson_spearman": ("pearson", "spearman"), "acc_and_f1": ("accuracy", "f1")}
_LOWER_IS_BETTER = frozenset({"rmse", "mae"})


# ---------------------------------------------------------------------------------------------
# GLUE task table
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task as TFDS's `glue/<name>` builder lays it out.

  text_keys: the sentence feature(s); two keys = a sentence-pair task.
  num_labels: classes; 1 = regression (STS-B, targets 0..5 as given).
  dev_splits: TFDS names of the labelled GLUE dev split(s); the first one is used for model selection
    when GLUE dev serves as validation (MNLI: matched).
  """

  name: str
  text_keys: tuple[str, ...]
  num_labels: int
  label_names: tuple[str, ...]
  metrics: tuple[str, ...]
  main_metric: str
  dev_splits: tuple[str, ...] = ("validation",)

  @property
  def task_type(self) -> str:
    return "regression" if self.num_labels == 1 else "classification"

  @property
  def is_pair(self) -> bool:
    return len(self.text_keys) == 2


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", ("sentence",), 2, ("unacceptable", "acceptable"), ("mcc", "accuracy"), "mcc"),
    GlueTask("sst2", ("sentence",), 2, ("negative", "positive"), ("accuracy",), "accuracy"),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent"),
             ("accuracy", "f1", "acc_and_f1"), "acc_and_f1"),
    GlueTask("qqp", ("question1", "question2"), 2, ("not_duplicate", "duplicate"),
             ("accuracy", "f1", "acc_and_f1"), "acc_and_f1"),
    GlueTask("stsb", ("sentence1", "sentence2"), 1, (), ("pearson", "spearman", "pearson_spearman"),
             "pearson_spearman"),
    GlueTask("mnli", ("premise", "hypothesis"), 3, ("entailment", "neutral", "contradiction"), ("accuracy",),
             "accuracy", ("validation_matched", "validation_mismatched")),
    GlueTask("qnli", ("question", "sentence"), 2, ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
    GlueTask("rte", ("sentence1", "sentence2"), 2, ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
    GlueTask("wnli", ("sentence1", "sentence2"), 2, ("not_entailment", "entailment"), ("accuracy",), "accuracy"),
)}


def glue_task(name: str) -> GlueTask:
  key = name.lower().replace("-", "")
  if key not in GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)}")
  return GLUE_TASKS[key]


def default_metrics(task_type: str) -> tuple[tuple[str, ...], str]:
  """(metrics, main_metric) for a non-GLUE task: ROC-AUC for binary tasks, RMSE/MAE for regression."""
  if task_type == "multitask_binary":
    return ("roc_auc",), "roc_auc"
  if task_type == "regression":
    return ("rmse", "mae"), "rmse"
  if task_type == "classification":
    return ("accuracy",), "accuracy"
  raise ValueError(f"task_type={task_type!r}; choose one of {TASK_TYPES}")


def is_improvement(metric: str, new: float, best: float | None) -> bool:
  """Whether `new` beats `best` for model selection (None = nothing yet; NaN never wins)."""
  if not np.isfinite(new):
    return False
  if best is None or not np.isfinite(best):
    return True
  return new < best if metric in _LOWER_IS_BETTER else new > best


# ---------------------------------------------------------------------------------------------
# Classification and correlation metrics (GLUE)
# ---------------------------------------------------------------------------------------------


def _pair(preds, labels) -> tuple[np.ndarray, np.ndarray]:
  preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
  if preds.shape != labels.shape:
    raise ValueError(f"predictions have {preds.size} values but labels have {labels.size}")
  if preds.size == 0:
    raise ValueError("metric on an empty split: no examples to score")
  return preds, labels


def _finite(*arrays) -> bool:
  return all(np.all(np.isfinite(a)) for a in arrays)


def _constant(x: np.ndarray) -> bool:
  return bool(np.all(x == x[0]))


def accuracy(preds, labels) -> float:
  """Fraction of exact matches. preds, labels: (N,) class ids."""
  preds, labels = _pair(preds, labels)
  return float(skm.accuracy_score(labels, preds))


def f1_binary(preds, labels, positive: int = 1) -> float:
  """F1 of the positive class (GLUE MRPC/QQP). 0.0 when there are no true and no predicted positives."""
  preds, labels = _pair(preds, labels)
  return float(skm.f1_score(labels == positive, preds == positive, zero_division=0.0))


def matthews_corrcoef(preds, labels) -> float:
  """Matthews correlation (multiclass form). 0.0 when preds or labels are constant."""
  preds, labels = _pair(preds, labels)
  return float(skm.matthews_corrcoef(labels, preds))


def _correlation(statistic, x, y) -> float:
  """statistic(x, y).statistic in float64; NaN when a value is not finite, 0.0 when either side is constant."""
  x, y = _pair(x, y)
  if not _finite(x, y):
    return float("nan")
  if _constant(x) or _constant(y):
    return 0.0
  return float(statistic(x.astype(np.float64), y.astype(np.float64)).statistic)


def pearson(x, y) -> float:
  """Pearson correlation. x, y: (N,). 0.0 when either is constant."""
  return _correlation(scipy.stats.pearsonr, x, y)


def spearman(x, y) -> float:
  """Spearman rank correlation (Pearson of average ranks). 0.0 when either is constant."""
  return _correlation(scipy.stats.spearmanr, x, y)


# ---------------------------------------------------------------------------------------------
# ROC-AUC and regression errors (MoleculeNet)
# ---------------------------------------------------------------------------------------------


def roc_auc(scores, labels) -> float:
  """Binary ROC-AUC with ties counted half. scores: (N,); labels: (N,) 0/1."""
  scores, labels = _pair(scores, labels)
  positive = labels == 1
  if not np.all(positive | (labels == 0)):
    raise ValueError(f"ROC-AUC labels must be 0/1, got values {np.unique(labels)[:5].tolist()}")
  if positive.all() or not positive.any():
    raise ValueError("ROC-AUC needs both classes; this task has only one in the split")
  if not _finite(scores):
    return float("nan")
  return float(skm.roc_auc_score(positive, scores))


@dataclasses.dataclass(frozen=True)
class AucResult:
  """Multi-task ROC-AUC.

  mean: mean over the scored tasks. per_task: (T,) float, NaN for skipped tasks.
  skipped: indices of tasks without both classes among their labelled examples.
  """

  mean: float
  per_task: np.ndarray
  skipped: tuple[int, ...]

  @property
  def num_scored(self) -> int:
    return len(self.per_task) - len(self.skipped)


def _as_columns(values, mask) -> tuple[np.ndarray, np.ndarray]:
  values = np.asarray(values)
  values = values.reshape(-1, 1) if values.ndim == 1 else values
  mask = np.ones(values.shape, bool) if mask is None else np.asarray(mask, bool).reshape(values.shape)
  if np.issubdtype(values.dtype, np.floating):
    mask = mask & ~np.isnan(values)
  return values, mask


def multitask_roc_auc(scores, labels, mask=None) -> AucResult:
  """ROC-AUC per task over its labelled examples, averaged over tasks that have both classes.

  scores: (N, T) or (N,) logits or probabilities; labels: same shape, 0/1, NaN = missing;
  mask: optional bool, False = missing. Raises when no task can be scored.
  """
  labels, valid = _as_columns(labels, mask)
  scores = np.asarray(scores).reshape(labels.shape)
  per_task, skipped = np.full(labels.shape[1], np.nan), []
  for t in range(labels.shape[1]):
    y = labels[valid[:, t], t]
    if np.unique(y).size < 2:
      skipped.append(t)
      continue
    per_task[t] = roc_auc(scores[valid[:, t], t], y)
  if len(skipped) == labels.shape[1]:
    raise ValueError(f"ROC-AUC undefined: none of the {labels.shape[1]} task(s) has both classes in this split")
  scored = np.setdiff1d(np.arange(labels.shape[1]), skipped)
  return AucResult(float(np.mean(per_task[scored])), per_task, tuple(skipped))


def _per_task_error(preds, targets, mask, error) -> float:
  """Mean over tasks of `error(targets, preds)` on each task's labelled entries; NaN for a non-finite one."""
  targets, valid = _as_columns(targets, mask)
  preds = np.asarray(preds, np.float64).reshape(targets.shape)
  columns = [(targets[valid[:, t], t], preds[valid[:, t], t]) for t in range(targets.shape[1]) if valid[:, t].any()]
  if not columns:
    raise ValueError("regression metric on a split with no labelled targets")
  return float(np.mean([error(y, p) if _finite(y, p) else np.nan for y, p in columns]))


def rmse(preds, targets, mask=None) -> float:
  """Root mean squared error per task over labelled entries, averaged over tasks. (N, T) or (N,)."""
  return _per_task_error(preds, targets, mask, skm.root_mean_squared_error)


def mae(preds, targets, mask=None) -> float:
  """Mean absolute error per task over labelled entries, averaged over tasks. (N, T) or (N,)."""
  return _per_task_error(preds, targets, mask, skm.mean_absolute_error)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

_CLASSIFICATION = {"accuracy": accuracy, "f1": f1_binary, "mcc": matthews_corrcoef}
_CORRELATION = {"pearson": pearson, "spearman": spearman}
_ERRORS = {"rmse": rmse, "mae": mae}
METRIC_NAMES = (*_CLASSIFICATION, *_CORRELATION, *_ERRORS, "roc_auc", *_COMPOSITES)


def compute_metrics(metric_names: Sequence[str], task_type: str, outputs, labels, label_mask=None,
                    task_names: Sequence[str] | None = None) -> dict[str, float]:
  """Scores model outputs on one split.

  outputs: classification -> (N, C) logits or (N,) class ids; regression -> (N, T) or (N,) predictions;
    multitask_binary -> (N, T) logits or probabilities.
  labels / label_mask: as in `tasks.Split` (classification (N,), otherwise (N, T)); mask False = no label.
  For 'roc_auc' the result also holds 'roc_auc_tasks_skipped' (count); skipped task names are logged.
  """
  unknown = [m for m in metric_names if m not in METRIC_NAMES]
  if unknown:
    raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRIC_NAMES)}")
  if task_type not in TASK_TYPES:
    raise ValueError(f"task_type={task_type!r}; choose one of {TASK_TYPES}")
  outputs, labels, preds = np.asarray(outputs), np.asarray(labels), None
  if task_type == "classification":
    preds = outputs.argmax(-1) if outputs.ndim == 2 else outputs
    keep = slice(None) if label_mask is None else np.asarray(label_mask, bool).reshape(-1)
    preds, labels = preds.reshape(-1)[keep], labels.reshape(-1)[keep]
  elif label_mask is not None:
    label_mask = np.asarray(label_mask, bool)
  results = {}
  for name in metric_names:
    parts = _COMPOSITES.get(name, (name,))
    values = [_single_metric(part, task_type, outputs, preds, labels, label_mask, task_names, results)
              for part in parts]
    results[name] = float(np.mean(values))
  return results


def _single_metric(name, task_type, outputs, preds, labels, label_mask, task_names, results) -> float:
  if name in results:
    return results[name]
  if name in _CLASSIFICATION:
    if task_type != "classification":
      raise ValueError(f"metric {name!r} needs a classification task, got task_type={task_type!r}")
    return _CLASSIFICATION[name](preds, labels)
  if name in _CORRELATION:
    _, valid = _as_columns(labels, label_mask)
    if valid.ndim == 2 and valid.shape[1] != 1:
      raise ValueError(f"metric {name!r} needs a single regression target, got {valid.shape[1]}")
    flat = valid.reshape(-1)
    return _CORRELATION[name](outputs.reshape(-1)[flat], labels.reshape(-1)[flat])
  if name in _ERRORS:
    return _ERRORS[name](outputs, labels, label_mask)
  result = multitask_roc_auc(outputs, labels, label_mask)
  if result.skipped:
    names = [task_names[t] if task_names else str(t) for t in result.skipped]
    log.info("ROC-AUC skipped %d task(s) with a single class in this split: %s", len(names), ", ".join(names))
  results["roc_auc_tasks_skipped"] = float(len(result.skipped))
  return result.mean
