"""Fine-tuning results: scores of a split's outputs, mean ± sample std over seeds, the best seed,
results.md and the final_metrics.json that launch/sweep.py tabulates."""

from __future__ import annotations

import numpy as np

from exlm_jax.finetune import lengths as lengths_lib
from exlm_jax.finetune import tasks as tasks_lib
from exlm_jax.finetune.metrics import compute_metrics, is_improvement

_HIDDEN = ("roc_auc_tasks_skipped",)  # kept in results.json, left out of progress lines and tables


def shown(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in _HIDDEN)


def score(task: tasks_lib.TaskData, split_name: str, outputs: np.ndarray, mean, std) -> dict[str, float]:
  """Task metrics of (N, C) outputs on a split (regression outputs mapped back to label units)."""
  split = task.splits[split_name]
  if task.task_type == "regression":
    outputs = outputs * std + mean
  return compute_metrics(task.metrics, task.task_type, outputs, split.labels, split.label_mask,
                         task.label_names)


def invalid_smiles(task: tasks_lib.TaskData) -> list[list]:
  """[row, SMILES] of every input RDKit could not parse (left out of all splits); [] for text tasks."""
  return [list(x) for x in task.splits["train"].provenance.invalid_smiles]


def mean_std(values) -> dict:
  """Mean and sample standard deviation (ddof=1; 0.0 for one value) over seeds."""
  values = [float(v) for v in values]
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std, "values": values}


def summarize(per_seed: list[dict], task: tasks_lib.TaskData) -> dict:
  """{split: {metric: {mean, std, values}}} over seeds, for the selection split and the report splits."""
  summary = {}
  selection = task.selection_split
  for split in dict.fromkeys([selection, *task.report_splits]):
    key = "selection" if split == selection else "report"
    metrics = per_seed[0][key][split].keys()
    summary[split] = {m: mean_std([r[key][split][m] for r in per_seed]) for m in metrics}
  return summary


def best_seed(per_seed: list[dict], task: tasks_lib.TaskData) -> int:
  best, value = per_seed[0]["seed"], None
  for r in per_seed:
    v = r["selection"][task.selection_split][task.main_metric]
    if is_improvement(task.main_metric, v, value):
      best, value = r["seed"], v
  return best


def final_metrics(results: dict, total_steps: int, wall_time_s: float) -> dict:
  """The pretraining loop's final_metrics.json shape (what launch/sweep.py tabulates): seed means of the
  selection split under 'eval' and of the first other report split under 'test'."""
  means = lambda split: {m: v["mean"] for m, v in results["summary"][split].items()}
  others = [s for s in results["report_splits"] if s != results["selection_split"]]
  return {"step": total_steps, "eval": means(results["selection_split"]),
          "test": means(others[0]) if others else {}, "main_metric": results["main_metric"],
          "task": results["task"], "num_seeds": len(results["seeds"]), "wall_time_s": wall_time_s,
          "preempted": False}


def length_lines(report: dict | None) -> list[str]:
  """The results.md line on seq_len and the inputs over it per split (finetune/lengths.py); [] without a report."""
  if not report:
    return []
  cut = "truncated" if report["overlong"] == "truncate" else "skipped"
  line = (f"seq_len {report['seq_len']} (pretraining's max_example_len: {report['trained_len'] or '-'}); inputs "
          f"over it, {cut}: {lengths_lib.overlong_summary(report)}")
  beyond = {n: c["beyond_pretraining"] for n, c in report["splits"].items() if c["beyond_pretraining"]}
  if beyond and report["positions"] in lengths_lib.LEARNED_POSITIONS:
    line += (f"; WARNING: {', '.join(f'{n} {k}' for n, k in beyond.items())} input(s) reach learned positions "
             "pretraining never trained")
  return [line]


def results_markdown(results: dict) -> str:
  """A Markdown table: one row per seed, then mean ± std; columns = selection + report split metrics."""
  selection, report = results["selection_split"], results["report_splits"]
  columns = [(selection, "selection", m) for m in results["summary"][selection] if m not in _HIDDEN]
  columns += [(s, "report", m) for s in report if s != selection for m in results["summary"][s] if m not in _HIDDEN]
  header = ["seed", "best step"] + [f"{s} {m}" for s, _, m in columns]
  lines = [f"# Fine-tuning: {results['task']} ({results['task_type']})", "",
           f"init_from: `{results['init_from'] or 'random init'}` ({results['pretrain_objective'] or '-'}, "
           f"step {results['init_step']}); model selection on `{selection}` by {results['main_metric']}; "
           f"{len(results['seeds'])} seed(s); mean ± sample std.",
           f"splits: {results['split_sizes']}" + ("" if results["task"] in tasks_lib.GLUE_TASKS
                                                  or "invalid_smiles" not in results else
                                                  f"; invalid SMILES left out: {len(results['invalid_smiles'])}"),
           *length_lines(results.get("lengths")), "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results["per_seed"]:
    cells = [str(r["seed"]), str(r["best_step"])] + [f"{r[kind][s][m]:.4f}" for s, kind, m in columns]
    lines.append("| " + " | ".join(cells) + " |")
  cells = ["mean ± std", ""] + [f"{results['summary'][s][m]['mean']:.4f} ± {results['summary'][s][m]['std']:.4f}"
                                for s, _, m in columns]
  lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
