"""Fine-tuning metrics against independent float64 numpy / brute-force oracles, degenerate inputs, GLUE table.

metrics.py wraps scikit-learn / scipy, so the oracles here are written out from the definitions instead.
"""

import logging

import numpy as np
import pytest

from exlm_jax.finetune import metrics


def _random_classes(seed, n=200, k=2):
  rng = np.random.default_rng(seed)
  return rng.integers(0, k, n), rng.integers(0, k, n)


def _f1(preds, labels):
  """F1 of class 1 from the counts."""
  tp, fp, fn = (np.sum((preds == 1) & (labels == 1)), np.sum((preds == 1) & (labels != 1)),
                np.sum((preds != 1) & (labels == 1)))
  return 2 * tp / (2 * tp + fp + fn)


def _mcc(preds, labels):
  """Gorodkin's multiclass MCC from the K x K confusion matrix C: (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))."""
  classes = np.union1d(preds, labels)
  confusion = np.array([[np.sum((labels == a) & (preds == b)) for b in classes] for a in classes], np.float64)
  s, c, t, p = confusion.sum(), np.trace(confusion), confusion.sum(1), confusion.sum(0)
  return (c * s - t @ p) / np.sqrt((s * s - p @ p) * (s * s - t @ t))


def _pearson(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  return (x @ y) / np.sqrt((x @ x) * (y @ y))


def _average_ranks(x):
  """Rank of each value: 1 + #smaller + (#equal - 1) / 2, by brute-force comparison."""
  x = np.asarray(x)
  return 1 + (x[None, :] < x[:, None]).sum(1) + ((x[None, :] == x[:, None]).sum(1) - 1) / 2


def _pairwise_auc(scores, labels):
  """P(score of a positive > score of a negative), ties counted half, over every (positive, negative) pair."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  return np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_their_definitions(seed):
  preds, labels = _random_classes(seed)
  assert metrics.accuracy(preds, labels) == pytest.approx(np.mean(preds == labels))
  assert metrics.f1_binary(preds, labels) == pytest.approx(_f1(preds, labels))
  assert metrics.f1_binary(1 - preds, 1 - labels, positive=0) == pytest.approx(_f1(preds, labels))
  assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(_mcc(preds, labels))
  preds3, labels3 = _random_classes(seed, k=3)
  assert metrics.matthews_corrcoef(preds3, labels3) == pytest.approx(_mcc(preds3, labels3))
  assert metrics.f1_binary(preds3, labels3) == pytest.approx(_f1(preds3, labels3))  # class 1 against the rest


def test_classification_edge_cases():
  labels = np.array([0, 1, 1, 0, 1])
  constant = np.ones(5, int)
  assert metrics.matthews_corrcoef(constant, labels) == 0.0 == metrics.matthews_corrcoef(labels, constant)
  assert metrics.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
  assert metrics.matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
  assert metrics.f1_binary(np.zeros(5, int), np.zeros(5, int)) == 0.0  # no positives anywhere
  assert metrics.f1_binary(constant, labels) == pytest.approx(_f1(constant, labels))
  with pytest.raises(ValueError, match="empty split"):
    metrics.accuracy([], [])
  with pytest.raises(ValueError, match="3 values"):
    metrics.accuracy([0, 1, 1], [0, 1])


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_float64_numpy(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=300)
  y = 0.5 * x + rng.normal(size=300)
  assert metrics.pearson(x, y) == pytest.approx(_pearson(x, y), abs=1e-12)
  assert metrics.pearson(x.astype(np.float32), y.astype(np.float32)) == pytest.approx(
      _pearson(x.astype(np.float32), y.astype(np.float32)), abs=1e-12)  # float32 inputs scored in float64
  assert metrics.spearman(x, y) == pytest.approx(_pearson(_average_ranks(x), _average_ranks(y)), abs=1e-12)
  xt, yt = np.round(x), np.round(y * 2) / 2  # many ties
  assert metrics.spearman(xt, yt) == pytest.approx(_pearson(_average_ranks(xt), _average_ranks(yt)), abs=1e-12)


def test_correlations_constant_input_is_zero_not_nan():
  y = np.arange(10.0)
  for fn in (metrics.pearson, metrics.spearman):
    assert fn(np.full(10, 3.0), y) == 0.0
    assert fn(y, np.full(10, 3.0)) == 0.0
  assert metrics.pearson(y, 2 * y + 1) == pytest.approx(1.0)
  assert metrics.pearson([5.0], [1.0]) == 0.0  # a single example is constant too


def test_non_finite_predictions_give_nan():
  y = np.arange(6.0)
  for bad in (np.nan, np.inf):
    p = np.where(y == 2, bad, y)
    assert np.isnan(metrics.pearson(p, y)) and np.isnan(metrics.spearman(p, y))
    assert np.isnan(metrics.roc_auc(p, (y > 2).astype(int)))
    assert np.isnan(metrics.rmse(p, y)) and np.isnan(metrics.mae(p, y))
  scores, labels = np.tile(y[:, None], (1, 2)), np.tile((y > 2)[:, None], (1, 2)).astype(float)
  scores[2, 1] = np.nan
  result = metrics.multitask_roc_auc(scores, labels)
  assert result.per_task[0] == 1.0 and np.isnan(result.per_task[1]) and np.isnan(result.mean)  # not averaged away
  assert not metrics.is_improvement("roc_auc", result.mean, 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_roc_auc_matches_pairwise_count_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 150)
  scores = np.round(rng.normal(size=150) + labels, 1)  # rounded: ties across classes
  assert metrics.roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)
  assert metrics.roc_auc(scores, labels.astype(np.float32)) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_multitask_roc_auc_with_missing_labels_and_single_class_task():
  rng = np.random.default_rng(0)
  n, t = 120, 4
  labels = rng.integers(0, 2, (n, t)).astype(np.float32)
  labels[:, 2] = 1.0  # task 2: one class only -> skipped
  scores = rng.normal(size=(n, t)) + labels
  mask = rng.random((n, t)) > 0.3
  labels_nan = np.where(mask, labels, np.nan)
  expected = [_pairwise_auc(scores[mask[:, j], j], labels[mask[:, j], j]) for j in (0, 1, 3)]
  for result in (metrics.multitask_roc_auc(scores, labels, mask), metrics.multitask_roc_auc(scores, labels_nan)):
    assert result.skipped == (2,)
    assert result.num_scored == 3
    assert np.isnan(result.per_task[2])
    assert result.mean == pytest.approx(np.mean(expected))
  with pytest.raises(ValueError, match="none of the 1 task"):
    metrics.multitask_roc_auc(scores[:, 2], labels[:, 2])
  with pytest.raises(ValueError, match="0/1"):
    metrics.roc_auc([0.1, 0.2, 0.3], [0, 1, 2])


def test_regression_errors_match_numpy_and_respect_mask():
  rng = np.random.default_rng(1)
  targets, preds = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
  mask = rng.random((50, 2)) > 0.2
  diffs = [preds[mask[:, j], j] - targets[mask[:, j], j] for j in (0, 1)]
  want_rmse = np.mean([np.sqrt(np.mean(d * d)) for d in diffs])
  want_mae = np.mean([np.mean(np.abs(d)) for d in diffs])
  assert metrics.rmse(preds, targets, mask) == pytest.approx(want_rmse)
  assert metrics.mae(preds, targets, mask) == pytest.approx(want_mae)
  assert metrics.rmse(preds, np.where(mask, targets, np.nan)) == pytest.approx(want_rmse)  # NaN target = missing
  assert metrics.rmse(preds[:, 0], targets[:, 0]) == pytest.approx(np.sqrt(np.mean((preds[:, 0] - targets[:, 0])**2)))
  with pytest.raises(ValueError, match="no labelled targets"):
    metrics.rmse(preds, targets, np.zeros_like(mask))


def test_compute_metrics_for_glue_tasks():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 2, 100)
  logits = rng.normal(size=(100, 2)) + np.eye(2)[labels]
  preds = logits.argmax(-1)
  mrpc = metrics.GLUE_TASKS["mrpc"]
  out = metrics.compute_metrics(mrpc.metrics, "classification", logits, labels)
  assert out["accuracy"] == pytest.approx(np.mean(preds == labels))
  assert out["f1"] == pytest.approx(_f1(preds, labels))
  assert out[mrpc.main_metric] == pytest.approx((out["accuracy"] + out["f1"]) / 2)
  cola = metrics.GLUE_TASKS["cola"]
  assert metrics.compute_metrics(cola.metrics, "classification", preds, labels)["mcc"] == pytest.approx(
      _mcc(preds, labels))
  y = rng.uniform(0, 5, (100, 1)).astype(np.float32)
  p = y + rng.normal(size=(100, 1))
  stsb = metrics.compute_metrics(metrics.GLUE_TASKS["stsb"].metrics, "regression", p, y)
  assert stsb["pearson_spearman"] == pytest.approx(
      (_pearson(p[:, 0], y[:, 0]) + _pearson(_average_ranks(p[:, 0]), _average_ranks(y[:, 0]))) / 2)
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.compute_metrics(["auc"], "classification", logits, labels)
  with pytest.raises(ValueError, match="needs a classification task"):
    metrics.compute_metrics(["accuracy"], "regression", p, y)


def test_compute_metrics_roc_auc_reports_skipped_tasks(caplog):
  labels = np.array([[0, 1], [1, 1], [0, 1], [1, 1]], np.float32)
  scores = np.array([[0.1, 0.3], [0.9, 0.2], [0.2, 0.5], [0.8, 0.1]])
  with caplog.at_level(logging.INFO, logger="exlm_jax.finetune.metrics"):
    out = metrics.compute_metrics(["roc_auc"], "multitask_binary", scores, labels, np.ones_like(labels, bool),
                                  task_names=["A", "B"])
  assert out == {"roc_auc": 1.0, "roc_auc_tasks_skipped": 1.0}
  assert "B" in caplog.text


def test_glue_table_and_model_selection_direction():
  assert set(metrics.GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
  for task in metrics.GLUE_TASKS.values():
    assert task.main_metric in task.metrics
    assert set(task.metrics) <= set(metrics.METRIC_NAMES)
    assert task.num_labels == 1 or len(task.label_names) == task.num_labels
  assert metrics.GLUE_TASKS["stsb"].task_type == "regression"
  assert metrics.GLUE_TASKS["mnli"].dev_splits == ("validation_matched", "validation_mismatched")
  assert metrics.glue_task("STS-B").name == "stsb"
  assert metrics.is_improvement("rmse", 0.5, 0.6) and not metrics.is_improvement("rmse", 0.7, 0.6)
  assert metrics.is_improvement("mcc", 0.1, None) and not metrics.is_improvement("mcc", float("nan"), 0.0)
  assert metrics.is_improvement("accuracy", 0.9, 0.8)
