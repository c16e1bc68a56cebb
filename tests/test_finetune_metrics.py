"""Fine-tuning metrics against sklearn / scipy, degenerate inputs, and the GLUE task table."""

import logging

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from exlm_jax.finetune import metrics


def _random_classes(seed, n=200, k=2):
  rng = np.random.default_rng(seed)
  return rng.integers(0, k, n), rng.integers(0, k, n)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
  preds, labels = _random_classes(seed)
  assert metrics.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
  assert metrics.f1_binary(preds, labels) == pytest.approx(skm.f1_score(labels, preds))
  assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(skm.matthews_corrcoef(labels, preds))
  preds3, labels3 = _random_classes(seed, k=3)
  assert metrics.matthews_corrcoef(preds3, labels3) == pytest.approx(skm.matthews_corrcoef(labels3, preds3))


def test_classification_edge_cases():
  labels = np.array([0, 1, 1, 0, 1])
  constant = np.ones(5, int)
  assert metrics.matthews_corrcoef(constant, labels) == 0.0 == skm.matthews_corrcoef(labels, constant)
  assert metrics.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
  assert metrics.matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
  assert metrics.f1_binary(np.zeros(5, int), np.zeros(5, int)) == 0.0  # no positives anywhere
  assert metrics.f1_binary(constant, labels) == pytest.approx(skm.f1_score(labels, constant))
  with pytest.raises(ValueError, match="empty split"):
    metrics.accuracy([], [])
  with pytest.raises(ValueError, match="3 values"):
    metrics.accuracy([0, 1, 1], [0, 1])


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=300)
  y = 0.5 * x + rng.normal(size=300)
  assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
  assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
  xt, yt = np.round(x), np.round(y * 2) / 2  # many ties
  assert metrics.spearman(xt, yt) == pytest.approx(scipy.stats.spearmanr(xt, yt)[0], abs=1e-12)
  np.testing.assert_allclose(metrics.rankdata(xt), scipy.stats.rankdata(xt))


def test_correlations_constant_input_is_zero_not_nan():
  y = np.arange(10.0)
  for fn in (metrics.pearson, metrics.spearman):
    assert fn(np.full(10, 3.0), y) == 0.0
    assert fn(y, np.full(10, 3.0)) == 0.0
  assert metrics.pearson(y, 2 * y + 1) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_roc_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 150)
  scores = np.round(rng.normal(size=150) + labels, 1)  # rounded: ties across classes
  assert metrics.roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


def test_multitask_roc_auc_with_missing_labels_and_single_class_task():
  rng = np.random.default_rng(0)
  n, t = 120, 4
  labels = rng.integers(0, 2, (n, t)).astype(np.float32)
  labels[:, 2] = 1.0  # task 2: one class only -> skipped
  scores = rng.normal(size=(n, t)) + labels
  mask = rng.random((n, t)) > 0.3
  labels_nan = np.where(mask, labels, np.nan)
  expected = [skm.roc_auc_score(labels[mask[:, j], j], scores[mask[:, j], j]) for j in (0, 1, 3)]
  for result in (metrics.multitask_roc_auc(scores, labels, mask), metrics.multitask_roc_auc(scores, labels_nan)):
    assert result.skipped == (2,)
    assert result.num_scored == 3
    assert np.isnan(result.per_task[2])
    assert result.mean == pytest.approx(np.mean(expected))
  with pytest.raises(ValueError, match="none of the 1 task"):
    metrics.multitask_roc_auc(scores[:, 2], labels[:, 2])
  with pytest.raises(ValueError, match="0/1"):
    metrics.roc_auc([0.1, 0.2, 0.3], [0, 1, 2])


def test_regression_errors_match_sklearn_and_respect_mask():
  rng = np.random.default_rng(1)
  targets, preds = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
  mask = rng.random((50, 2)) > 0.2
  want_rmse = np.mean([np.sqrt(skm.mean_squared_error(targets[mask[:, j], j], preds[mask[:, j], j])) for j in (0, 1)])
  want_mae = np.mean([skm.mean_absolute_error(targets[mask[:, j], j], preds[mask[:, j], j]) for j in (0, 1)])
  assert metrics.rmse(preds, targets, mask) == pytest.approx(want_rmse)
  assert metrics.mae(preds, targets, mask) == pytest.approx(want_mae)
  assert metrics.rmse(preds[:, 0], targets[:, 0]) == pytest.approx(np.sqrt(skm.mean_squared_error(targets[:, 0],
                                                                                                  preds[:, 0])))


def test_compute_metrics_for_glue_tasks():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 2, 100)
  logits = rng.normal(size=(100, 2)) + np.eye(2)[labels]
  preds = logits.argmax(-1)
  mrpc = metrics.GLUE_TASKS["mrpc"]
  out = metrics.compute_metrics(mrpc.metrics, "classification", logits, labels)
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
  assert out["f1"] == pytest.approx(skm.f1_score(labels, preds))
  assert out[mrpc.main_metric] == pytest.approx((out["accuracy"] + out["f1"]) / 2)
  cola = metrics.GLUE_TASKS["cola"]
  assert metrics.compute_metrics(cola.metrics, "classification", preds, labels)["mcc"] == pytest.approx(
      skm.matthews_corrcoef(labels, preds))
  y = rng.uniform(0, 5, (100, 1)).astype(np.float32)
  p = y + rng.normal(size=(100, 1))
  stsb = metrics.compute_metrics(metrics.GLUE_TASKS["stsb"].metrics, "regression", p, y)
  assert stsb["pearson_spearman"] == pytest.approx(
      (scipy.stats.pearsonr(p[:, 0], y[:, 0])[0] + scipy.stats.spearmanr(p[:, 0], y[:, 0])[0]) / 2)
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
