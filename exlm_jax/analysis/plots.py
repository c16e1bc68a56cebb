"""PNG plots for the analysis tools (matplotlib, Agg backend). Every function returns the path written."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from exlm_jax.analysis.effective_rank import CORPUS, RankResult, rank_curves  # noqa: E402


def _save(fig, path) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def _one_setting(results: Mapping[tuple[str, int], RankResult]) -> RankResult:
  """The shared settings of `results`; mixing thresholds, kinds, centring or modes in one plot is an error."""
  settings = {(r.energy, r.kind, r.centered, r.mode) for r in results.values()}
  if len(settings) != 1:
    raise ValueError(f"results mix settings {sorted(settings)}; plot each (energy, kind, centered, mode) alone")
  return next(iter(results.values()))


def plot_rank_vs_layer(results: Mapping[tuple[str, int], RankResult], path, title: str = "Effective rank",
                       show_dim: bool = True) -> str:
  """One line per group of effective rank against layer; the threshold and settings go in the title."""
  if not results:
    raise ValueError("no rank results to plot")
  first = _one_setting(results)
  fig, ax = plt.subplots(figsize=(6, 4))
  curves = rank_curves(results)
  for group, (layers, ranks) in curves.items():
    ax.plot(layers, ranks, marker="o", label=group)
  top = max(float(np.nanmax(ranks)) for _, ranks in curves.values())
  if show_dim and top >= first.dim / 4:  # else the line would squash the curves; d goes in the label
    ax.axhline(first.dim, color="gray", linestyle="--", linewidth=1, label=f"d = {first.dim}")
  mode = "corpus" if first.mode == CORPUS else "per-sequence mean"
  ax.set_title(f"{title}\nthreshold: {first.energy:g} of {first.kind} singular-value energy, {mode}, "
               f"{'centred' if first.centered else 'uncentred'}")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel("layer (0 = embeddings)")
  ax.set_ylabel(f"effective rank (d = {first.dim})" if show_dim else "effective rank")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_entropy_vs_mask_ratio(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path,
                               title: str = "Predictive entropy at masked positions",
                               vocab_size: int | None = None) -> str:
  """One line per model: {name: (mask_ratios, mean entropies in nats)}; log V drawn when given."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (ratios, entropies) in series.items():
    order = np.argsort(ratios)
    ax.plot(np.asarray(ratios)[order], np.asarray(entropies)[order], marker="o", label=name)
  if vocab_size:
    ax.axhline(np.log(vocab_size), color="gray", linestyle="--", linewidth=1, label=f"log V, V = {vocab_size}")
  ax.set_title(title)
  ax.set_xlabel("mask ratio")
  ax.set_ylabel("entropy (nats)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_dag_alignment(transitions, path_targets, target_tokens: Sequence[str], path,
                       state_labels: Sequence[str] | None = None, log_probs: bool = False,
                       title: str = "DAG transitions and Viterbi alignment") -> str:
  """Heatmap of one example's state-to-state transition matrix with the Viterbi path on top.

  Args:
    transitions: (S, S) transition probabilities E[u, v] (or log-probabilities with `log_probs`).
    path_targets: (S,) target index emitted by each state on the best path, -1 for skipped states
      (one row of `dag_best_path`).
    target_tokens: (M,) token strings of the targets, so state u is labelled with the token it emits.
    path: the PNG to write.
    state_labels: (S,) names of the states (e.g. "g3c2" for group 3, copy 2); default their index.
  """
  trans = np.asarray(transitions, np.float64)
  trans = np.exp(trans) if log_probs else trans
  emits = np.asarray(path_targets)
  num_states = trans.shape[0]
  if trans.shape != (num_states, num_states) or emits.shape != (num_states,):
    raise ValueError(f"need transitions (S, S) and path_targets (S,); got {trans.shape} and {emits.shape}")
  names = list(state_labels) if state_labels is not None else [str(u) for u in range(num_states)]
  labels = [f"{name}: {target_tokens[i]}" if i >= 0 else name for name, i in zip(names, emits)]
  visited = np.flatnonzero(emits >= 0)

  size = max(5.0, 0.22 * num_states + 2)
  fig, ax = plt.subplots(figsize=(size, size))
  image = ax.imshow(np.nan_to_num(trans), cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="P(next state = v | u)")
  # Step i of the path goes from the state emitting target i-1 (row) to the one emitting i (column).
  ax.plot(visited[1:], visited[:-1], color="red", marker="o", markersize=4, linewidth=1, label="Viterbi path")
  for u in visited:
    ax.annotate(str(target_tokens[emits[u]]), (u, u), color="darkred", fontsize=7, ha="center", va="center")
  ticks = np.arange(num_states)
  fontsize = 7 if num_states <= 40 else 5
  ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
  ax.set_yticks(ticks, labels, fontsize=fontsize)
  ax.set_xlabel("to state v (emitted target)")
  ax.set_ylabel("from state u (emitted target)")
  ax.set_title(title)
  ax.legend(loc="lower left", fontsize=8)  # the lower triangle (v <= u) is always empty
  return _save(fig, path)


def plot_repeated_mlm(points: Sequence[Mapping[str, float]], path, title: str = "Repeated-MLM grid") -> str:
  """Measured (markers) and expected (lines) unreal / corrupted ratios against k; one dict per (p, k) point
  with keys k, p, expected_corrupted_ratio, measured_unreal_ratio, measured_corrupted_ratio."""
  ks = [p["k"] for p in points]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(ks, [p["p"] for p in points], "--", color="C0", label="unreal ratio, expected p")
  ax.plot(ks, [p["measured_unreal_ratio"] for p in points], "o", color="C0", label="unreal ratio, measured")
  ax.plot(ks, [p["expected_corrupted_ratio"] for p in points], "--", color="C1", label="corrupted ratio, expected p^k")
  ax.plot(ks, [p["measured_corrupted_ratio"] for p in points], "s", color="C1", label="corrupted ratio, measured")
  ax.set_xlabel("copies per token k")
  ax.set_ylabel("ratio")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)
