"""The `effective_rank` tool on a pretraining run: per-layer effective rank of the token groups its objective
defines, like with like across objectives (`python -m exlm_jax.analysis effective_rank`).

The measure itself (the definition, the Gram and per-sequence collectors, the [MASK]-subspace diagnostics) is
exlm_jax/analysis/effective_rank.py; this module chooses the rows, normalises the layers, runs the encoder and
writes effective_rank.json / .png:
  * every objective on the same rows: 'clean_input/real', the encoder on the clean input at every real token
    (real = not <s>, </s>, <pad>), the same sequences and row count whatever the objective;
  * plus the views the run's objective defines (`Objective.rank_groups`, e.g. objectives/mlm.py `rank_groups`:
    masks drawn with the pretraining rule at the run's mask_prob, always replaced by [MASK], seeded), with the
    [MASK] group drawn until it holds >= 20 d rows (else a printed warning);
  * on one stated normalisation of every layer's states (effective_rank.py `NORMALISATION_RULE`): pre-LN intermediate layers are
    the raw residual stream while post-LN layers come out of a LayerNorm, so raw ranks would compare scales.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

from exlm_jax import run_store
from exlm_jax.analysis import effective_rank as er
from exlm_jax.analysis import inputs, plots
from exlm_jax.data import vocab
from exlm_jax.objectives import base

MODES = ("corpus", "per_sequence")
MASK_ROWS_PER_DIM = 20  # the [MASK] group needs >= 20 d rows for a stable rank of a d-dimensional cloud


def _rank_groups(run: inputs.Run):
  groups = run.spec.rank_groups
  if groups is None:
    raise ValueError(f"effective_rank does not know objective {run.objective!r} (it defines no rank_groups)")
  return groups


def collect_states(run: inputs.Run, blocks: np.ndarray, batch_size: int = 32, seed: int = 0,
                   normalise: str = "layernorm", max_mask_draws: int = 8, drawn: dict | None = None):
  """Yields (group, layers: tuple of L + 1 (B, n, D) numpy arrays, rows (B, n) bool) per batch and group.

  First base.CLEAN_INPUT for every batch: the encoder on the clean blocks at every real token, the same rows
  for every objective. Then the objective's own views (`RankGroups.collect`) under the pretraining mask rule at
  the run's mask_prob; an objective with a [MASK] group (`mask_subspace`) gets further independent mask draws
  over all blocks until that group holds >= MASK_ROWS_PER_DIM * d rows or `max_mask_draws` draws were made
  (draw r masks batch i with seed index r * num_batches + i, so draw 0 is the single-draw rule). `drawn`, when
  given, receives {'mask_draws', 'mask_rows'} for such an objective. States are normalised by `normalise`.
  """
  groups = _rank_groups(run)
  hidden = inputs.hidden_states_fn(run)

  def states(tokens, positions, padding):
    return er.normalise_layers(hidden(tokens, positions, padding), normalise)

  batches = list(inputs.batches(blocks, batch_size))
  for _, tokens in batches:
    yield base.CLEAN_INPUT, states(tokens, None, tokens == vocab.PAD), base.content_slots(tokens)
  if groups.collect is None:
    return
  mask_group = groups.mask_subspace[1] if groups.mask_subspace else None
  target = MASK_ROWS_PER_DIM * int(run.config.model.d_model)
  mask_rows = 0
  for draw in range(max_mask_draws if mask_group else 1):
    for index, tokens in batches:
      selection = inputs.select_masks(tokens, float(run.config.mask_prob), seed, draw * len(batches) + index)
      for group, (layers, rows) in groups.collect(states, tokens, selection).items():
        mask_rows += int(np.sum(rows)) if group == mask_group else 0
        yield group, layers, rows
    if mask_group and drawn is not None:
      drawn.update(mask_draws=draw + 1, mask_rows=mask_rows)
    if mask_rows >= target:
      break


def _rank_table(results: dict) -> dict[str, dict[str, list]]:
  """{(group, layer): RankResult} -> {group: {'layer': [...], 'rank': [...], 'num_rows': [...], ...}}."""
  table: dict[str, dict[str, list]] = {}
  for (group, layer), result in sorted(results.items()):
    row = table.setdefault(group, {"layer": [], "rank": [], "num_rows": []})
    row["layer"].append(layer)
    row["rank"].append(result.rank)
    row["num_rows"].append(result.num_rows)
    if result.mode == er.PER_SEQUENCE:
      row.setdefault("rank_std", []).append(result.rank_std)
      row.setdefault("num_sequences", []).append(result.num_sequences)
  return table


def analyse(workdir, data: str, out_dir: str, energy: float = 0.9, center: bool = False, kind: str = "squared",
            modes: Sequence[str] = MODES, max_sequences: int = 512, batch_size: int = 32, seed: int = 0,
            out_of_span: bool = True, blocks: np.ndarray | None = None, normalise: str = "layernorm",
            max_mask_draws: int = 8) -> dict:
  """Per-layer effective rank of each token group; writes effective_rank.json and effective_rank.png
  (+ effective_rank_per_sequence.png). `blocks` (R, n) replaces reading `data` (tests, report).

  Groups: base.CLEAN_INPUT (every objective, the same rows) and the objective's views (`collect_states`);
  states normalised by `normalise` (effective_rank.NORMALISATION_RULE, recorded in `settings`). A [MASK] group still under
  20 d rows after `max_mask_draws` draws is a printed warning (also in `warnings`).
  """
  run = inputs.as_run(workdir)
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"mode {mode!r}; use 'corpus' and/or 'per_sequence'")
  er.normalise_layers((), normalise)  # a bad value fails before any work
  if max_mask_draws < 1:
    raise ValueError(f"max_mask_draws={max_mask_draws}; use >= 1")
  groups = _rank_groups(run)
  blocks = inputs.load_data_blocks(data, run, max_sequences) if blocks is None else blocks
  corpus = er.RankCollector()
  per_seq = er.PerSequenceRankCollector(energy, center, kind)
  drawn: dict = {}
  for group, layers, rows in collect_states(run, blocks, batch_size, seed, normalise, max_mask_draws, drawn):
    if "corpus" in modes:
      corpus.add_layers(group, layers, rows)
    if "per_sequence" in modes:
      per_seq.add_layers(group, layers, rows)
  d_model = int(run.config.model.d_model)
  result = {
      "tool": "effective_rank", "workdir": run.workdir, "objective": run.objective, "step": run.step,
      "data": data, "num_sequences": int(len(blocks)), "seq_len": int(blocks.shape[1]),
      "d_model": d_model, "mask_prob": float(run.config.mask_prob), "seed": seed,
      "settings": {"energy": energy, "kind": kind, "centered": center, "normalisation": normalise,
                   "normalisation_rule": er.NORMALISATION_RULE if normalise == "layernorm" else "none: raw states",
                   "definition": "min k: sum_{i<=k} w_i >= energy * sum_i w_i, w_i = s_i^2 (squared) or s_i"},
      "warnings": [],
  }
  if drawn:
    result["mask_group"] = {"group": groups.mask_subspace[1], "rows": drawn["mask_rows"],
                            "draws": drawn["mask_draws"], "target_rows": MASK_ROWS_PER_DIM * d_model}
    if drawn["mask_rows"] < MASK_ROWS_PER_DIM * d_model:
      message = (f"{run.name}: the [MASK] group has {drawn['mask_rows']} rows < {MASK_ROWS_PER_DIM} x d = "
                 f"{MASK_ROWS_PER_DIM * d_model} after {drawn['mask_draws']} mask draws over {len(blocks)} "
                 "sequences, so its rank is noisy; raise --max_sequences or --max_mask_draws")
      print(f"warning: {message}", file=sys.stderr)
      result["warnings"].append(message)
  pngs = {}
  if "corpus" in modes:
    corpus_results = corpus.results(energy, center, kind)
    result["corpus"] = _rank_table(corpus_results)
    # The other centring costs nothing from the same Gram matrices; anisotropy (one large mean
    # direction) can change the answer, so both are always reported.
    result[corpus_key(not center)] = _rank_table(corpus.results(energy, not center, kind))
    pngs["corpus"] = plots.plot_rank_vs_layer(corpus_results, os.path.join(out_dir, "effective_rank.png"),
                                              title=f"Effective rank: {run.name} ({run.objective})")
    if out_of_span and groups.mask_subspace:
      result["mask_out_of_span"] = _out_of_span(corpus, groups.mask_subspace, energy, center)
  if "per_sequence" in modes:
    seq_results = per_seq.results()
    result["per_sequence"] = _rank_table(seq_results)
    pngs["per_sequence"] = plots.plot_rank_vs_layer(
        seq_results, os.path.join(out_dir, "effective_rank_per_sequence.png"),
        title=f"Per-sequence effective rank (mean): {run.name} ({run.objective})")
  result["plots"] = pngs
  run_store.write_json(os.path.join(out_dir, "effective_rank.json"), result)
  return result


def corpus_key(centered: bool) -> str:
  """Key of the corpus-mode table at the centring that was NOT requested: 'corpus_centred' / 'corpus_uncentred'."""
  return "corpus_centred" if centered else "corpus_uncentred"


def corpus_table(result: dict, centered: bool) -> dict:
  """An effective_rank result's corpus table at the given centring, whichever was requested."""
  return result["corpus"] if result["settings"]["centered"] == centered else result[corpus_key(centered)]


def _out_of_span(corpus: er.RankCollector, groups: tuple[str, str, str], energy: float, center: bool) -> dict[str, list]:
  """Per layer: energy fraction of the [MASK] states outside the clean-real rank_eps basis, and angles.
  groups: (clean real, [MASK], masked real), as `effective_rank.mask_subspace_diagnostics` takes them."""
  clean_real, mask, masked_real = groups
  acc = corpus.accumulators
  layers = sorted(layer for group, layer in acc if group == mask)
  out = {"layer": [], "mask_out_of_span_energy": [], "real_rank": [], "mean_principal_angle_deg": []}
  for layer in layers:
    diag = er.mask_subspace_diagnostics(acc[(clean_real, layer)], acc[(mask, layer)], acc[(masked_real, layer)],
                                     energy, center)
    out["layer"].append(layer)
    out["mask_out_of_span_energy"].append(diag["mask_out_of_span_energy"])
    out["real_rank"].append(diag["real_rank"])
    angles = diag["principal_angles_masked_real_vs_mask"]
    out["mean_principal_angle_deg"].append(float(np.degrees(angles).mean()) if angles.size else float("nan"))
  return out
