"""Downstream table and paired method-vs-baseline statistics of a comparison (numpy / scipy; no JAX).

Pairs are (task, fine-tuning seed): the method's and the baseline's fine-tunings of one task share the split and
the seed (head init, dropout, data order), so their difference is paired. Differences are oriented so that
positive = the method is better (RMSE / MAE: lower is better) and, to pool tasks with different metrics, divided
by the baseline's mean on that task (a relative difference). Tests: the two-sided sign test on wins vs losses
(scipy.stats.binomtest; ties dropped) and the Wilcoxon signed-rank test on the relative differences
(scipy.stats.wilcoxon), each None with the reason when it cannot be computed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.stats

LOWER_IS_BETTER = frozenset({"rmse", "mae"})  # as finetune/metrics.py's model selection
ALPHA = 0.05


def test_values(results: dict) -> tuple[str, dict[int, float]]:
  """(main metric, {seed: value on the test split at the best validation step}) of a fine-tuning results.json."""
  metric = results["main_metric"]
  split = next((s for s in results["report_splits"] if s != results["selection_split"]), results["selection_split"])
  key = "report" if split != results["selection_split"] else "selection"
  return metric, {int(r["seed"]): float(r[key][split][metric]) for r in results["per_seed"]}


def truncation_share(results: dict) -> float | None:
  """Share of the task's inputs (all splits) longer than the fine-tuning length (results.json 'lengths'); None
  when the results do not count them."""
  splits = (results.get("lengths") or {}).get("splits")
  if not splits:
    return None
  total = sum(int(c.get("examples", 0)) for c in splits.values())
  over = sum(int(c.get("overlong", 0)) for c in splits.values())
  return over / total if total else None


def cell(values: Sequence[float]) -> dict:
  """Mean and sample std (ddof=1; 0 for one value) of a column cell."""
  values = [float(v) for v in values]
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)) if values else math.nan, "std": std, "n": len(values)}


def best_per_column(table: dict[str, dict[str, dict]], metrics: dict[str, str]) -> dict[str, str | None]:
  """{task: the arm with the best mean} (ties: the first arm); None where no arm has a finite value."""
  best = {}
  for task, metric in metrics.items():
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    scored = [(sign * row[task]["mean"], arm) for arm, row in table.items()
              if task in row and np.isfinite(row[task]["mean"])]
    best[task] = max(scored, key=lambda x: x[0])[1] if scored else None
  return best


def paired(method: dict[str, dict[int, float]], baseline: dict[str, dict[int, float]],
           metrics: dict[str, str]) -> dict:
  """Method vs baseline over the (task, seed) pairs both have. `method` / `baseline`: {task: {seed: value}}.

  Returns n, per-task mean difference (task units, positive = method better), the mean relative difference,
  wins / losses / ties, the sign-test and Wilcoxon p-values (None + `why` when not computable)."""
  diffs, rel, per_task = [], [], {}
  for task, metric in metrics.items():
    m, b = method.get(task, {}), baseline.get(task, {})
    seeds = sorted(set(m) & set(b))
    if not seeds:
      continue
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    d = [sign * (m[s] - b[s]) for s in seeds]
    scale = abs(float(np.mean([b[s] for s in seeds]))) or 1.0
    per_task[task] = {"mean_diff": float(np.mean(d)), "n": len(d), "metric": metric}
    diffs += d
    rel += [x / scale for x in d]
  wins = sum(d > 0 for d in diffs)
  losses = sum(d < 0 for d in diffs)
  out = {"n": len(diffs), "per_task": per_task, "wins": int(wins), "losses": int(losses),
         "ties": int(len(diffs) - wins - losses),
         "mean_relative_diff": float(np.mean(rel)) if rel else None,
         "sign_p": None, "wilcoxon_p": None, "why": None}
  if wins + losses == 0:
    out["why"] = "no pair differs" if diffs else "no pairs"
    return out
  out["sign_p"] = float(scipy.stats.binomtest(int(wins), int(wins + losses), 0.5).pvalue)
  nonzero = [x for x in rel if x != 0]
  if len(nonzero) >= 2:
    out["wilcoxon_p"] = float(scipy.stats.wilcoxon(nonzero).pvalue)
  else:
    out["why"] = f"Wilcoxon needs >= 2 differing pairs (has {len(nonzero)})"
  return out


def smallest_sign_p(n: int) -> float:
  """The smallest two-sided sign-test p-value `n` pairs can reach (all won): 2 / 2^n, capped at 1."""
  return min(1.0, 2.0 / 2 ** n) if n else 1.0


def verdict(method: str, baseline: str, result: dict, alpha: float = ALPHA) -> str:
  """One sentence the statistics choose: a detected win / loss, no detectable difference, or too few pairs."""
  n = result["n"]
  if n == 0:
    return f"{method} vs {baseline}: no paired fine-tuning results."
  p = result["wilcoxon_p"] if result["wilcoxon_p"] is not None else result["sign_p"]
  test = "Wilcoxon" if result["wilcoxon_p"] is not None else "sign test"
  rel = result["mean_relative_diff"]
  rel_text = f"mean relative difference {100 * rel:+.1f} %" if rel is not None else "no difference"
  wins = f"{result['wins']}/{n} pairs won"
  if smallest_sign_p(n) > alpha:
    return (f"{method} vs {baseline}: too few pairs to detect anything (n = {n}; even winning every pair gives "
            f"sign-test p = {smallest_sign_p(n):.2g} > {alpha}); {rel_text}, {wins}.")
  if p is None:
    return f"{method} vs {baseline}: no detectable difference ({result['why']}); {wins}."
  if p < alpha:
    side = "better" if (rel or 0) > 0 else "worse"
    return f"{method} is {side} than {baseline} downstream: {rel_text}, {wins}, {test} p = {p:.2g} (n = {n})."
  return f"{method} vs {baseline}: no detectable difference, {test} p = {p:.2g} (n = {n}); {rel_text}, {wins}."
