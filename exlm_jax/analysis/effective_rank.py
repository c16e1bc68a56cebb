"""Effective rank of token representations and the [MASK]-subspace diagnostics; the `effective_rank` tool.

Definition (the threshold is an argument and is recorded in every result):
  rank(H) = min{ k : sum_{i<=k} w_i >= energy * sum_i w_i },  w_i = s_i^2 ('squared') or s_i ('linear'),
with s_1 >= s_2 >= ... the singular values of H (N, d), rows = token states. A threshold reached
to within a relative 1e-12 counts as reached, so exact boundaries are not lost to rounding.

Corpus mode streams rows into a float64 Gram matrix G = H^T H (d, d) on the host; its eigenvalues
are s_i^2. Per-sequence mode takes the rank of every sequence's own matrix and averages it (the
reading a MAE-LM reviewer proposed); results carry `mode` so the two are never confused.

The tool (`analyse`, `python -m exlm_jax.analysis effective_rank`) measures, per layer, like with like:
  * every objective on the same rows: 'clean_input/real', the encoder on the clean input at every real token
    (real = not <s>, </s>, <pad>), the same sequences and row count whatever the objective;
  * plus the views the run's objective defines (`Objective.rank_groups`, e.g. objectives/mlm.py `rank_groups`:
    masks drawn with the pretraining rule at the run's mask_prob, always replaced by [MASK], seeded), with the
    [MASK] group drawn until it holds >= 20 d rows (else a printed warning);
  * on one stated normalisation of every layer's states (`NORMALISATION_RULE`): pre-LN intermediate layers are
    the raw residual stream while post-LN layers come out of a LayerNorm, so raw ranks would compare scales.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.linalg

from exlm_jax import run_store
from exlm_jax.analysis import inputs
from exlm_jax.data import vocab
from exlm_jax.objectives import base

KINDS = ("squared", "linear")
SPECTRA = ("singular", "gram")
CORPUS = "corpus"
PER_SEQUENCE = "per_sequence_mean"
_REL_TOL = 1e-12


@dataclasses.dataclass(frozen=True)
class RankResult:
  """One effective-rank measurement and the settings that produced it."""

  rank: float  # an integer in corpus mode; the mean over sequences in per-sequence mode
  energy: float
  kind: str
  centered: bool
  mode: str  # CORPUS or PER_SEQUENCE
  num_rows: int  # token states used
  dim: int
  num_sequences: int = 0  # per-sequence mode only
  rank_std: float = 0.0  # per-sequence mode only: spread of the per-sequence ranks

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _check_settings(energy: float, kind: str) -> None:
  if not 0.0 < energy <= 1.0:
    raise ValueError(f"energy={energy} must be in (0, 1]; e.g. 0.9 keeps 90% of the spectrum's energy")
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; use one of {KINDS}")


def effective_rank(values, energy: float = 0.9, kind: str = "squared", spectrum: str = "singular"):
  """Smallest k whose top-k spectrum holds `energy` of the total.

  Args:
    values: (..., r) singular values of H (`spectrum='singular'`) or eigenvalues of H^T H
      (`spectrum='gram'`); any order, negatives (round-off in eigenvalues) are clipped to 0.
    energy: the threshold 1 - eps.
    kind: 'squared' sums s_i^2, 'linear' sums s_i.
    spectrum: what `values` holds.
  Returns:
    (...) int64 ranks (a Python int for 1-D input); 0 for an all-zero spectrum.
  """
  _check_settings(energy, kind)
  if spectrum not in SPECTRA:
    raise ValueError(f"spectrum={spectrum!r}; use one of {SPECTRA}")
  values = np.clip(np.asarray(values, np.float64), 0.0, None)
  if spectrum == "singular":
    weights = values**2 if kind == "squared" else values
  else:
    weights = values if kind == "squared" else np.sqrt(values)
  weights = -np.sort(-weights, axis=-1)
  cumulative = np.cumsum(weights, axis=-1)
  total = cumulative[..., -1:]
  reached = cumulative >= (energy - _REL_TOL) * total
  ranks = np.where(total[..., 0] > 0, np.argmax(reached, axis=-1) + 1, 0).astype(np.int64)
  return int(ranks) if ranks.ndim == 0 else ranks


def _flatten_rows(states, mask=None) -> np.ndarray:
  """(..., d) states and optional (...) bool mask -> (N, d) float64 selected rows."""
  states = np.asarray(states, np.float64)
  if mask is None:
    return states.reshape(-1, states.shape[-1])
  mask = np.asarray(mask, bool)
  if mask.shape != states.shape[:-1]:
    raise ValueError(f"mask shape {mask.shape} must equal the states' leading shape {states.shape[:-1]}")
  return states[mask]


def gram_eigenvalues(gram, scale) -> np.ndarray:
  """(..., r, r) Gram matrices -> (..., r) eigenvalues (squared singular values), descending.

  `scale` (...) is the round-off scale: the energy of the UNCENTRED rows (trace of their Gram), times
  N / r for a Gram summed over N > r rows. Values under r * eps * scale are round-off -- of the
  eigen-solver, the summation, and the cancellation in a centred Gram (identical rows must give rank
  0, not noise) -- and are set to 0; real spectra hold their energy far above it.
  """
  values = np.linalg.eigvalsh(gram)[..., ::-1]
  floor = gram.shape[-1] * np.finfo(np.float64).eps * np.asarray(scale, np.float64)[..., None]
  return np.where(values > floor, values, 0.0)


class GramAccumulator:
  """Streams row vectors into G = sum h h^T (float64), the row sum and the row count."""

  def __init__(self, dim: int):
    self.dim = dim
    self.gram = np.zeros((dim, dim), np.float64)
    self.row_sum = np.zeros(dim, np.float64)
    self.count = 0

  def update(self, states, mask=None) -> "GramAccumulator":
    """Adds the rows of `states` (..., d) where `mask` (...) is true (all rows when None)."""
    rows = _flatten_rows(states, mask)
    if rows.shape[-1] != self.dim:
      raise ValueError(f"states have width {rows.shape[-1]}, accumulator was built for d={self.dim}")
    self.gram += rows.T @ rows
    self.row_sum += rows.sum(axis=0)
    self.count += rows.shape[0]
    return self

  def merge(self, other: "GramAccumulator") -> "GramAccumulator":
    """Adds another accumulator's rows into this one (in place) and returns self."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge d={other.dim} into d={self.dim}")
    self.gram += other.gram
    self.row_sum += other.row_sum
    self.count += other.count
    return self

  def centered_gram(self) -> np.ndarray:
    """(d, d) G - N mu mu^T: the Gram matrix of the mean-subtracted rows."""
    if self.count == 0:
      return self.gram.copy()
    return self.gram - np.outer(self.row_sum, self.row_sum) / self.count

  def _gram(self, center: bool) -> np.ndarray:
    return self.centered_gram() if center else self.gram

  def eigenvalues(self, center: bool = False) -> np.ndarray:
    """(d,) eigenvalues of G (= squared singular values of H), descending, round-off set to 0."""
    return gram_eigenvalues(self._gram(center), np.trace(self.gram) * max(1.0, self.count / self.dim))

  def rank(self, energy: float = 0.9, center: bool = False, kind: str = "squared") -> RankResult:
    value = effective_rank(self.eigenvalues(center), energy, kind, spectrum="gram")
    return RankResult(value, energy, kind, center, CORPUS, self.count, self.dim)

  def basis(self, k: int | None = None, energy: float = 0.9, center: bool = False,
            kind: str = "squared") -> np.ndarray:
    """(d, k) top-k right singular vectors of H; k defaults to the effective rank at `energy`."""
    if k is None:
      k = self.rank(energy, center, kind).rank
    _, vectors = np.linalg.eigh(self._gram(center))
    return vectors[:, ::-1][:, :k]


class RankCollector:
  """Corpus-mode Gram accumulators keyed by (group, layer), e.g. ('mlm/masked_real', 3)."""

  def __init__(self):
    self.accumulators: dict[tuple[str, int], GramAccumulator] = {}

  def add(self, group: str, layer: int, states, mask=None) -> None:
    """Adds the rows of `states` (..., d) selected by `mask` (...) to (group, layer)."""
    key = (group, int(layer))
    if key not in self.accumulators:
      self.accumulators[key] = GramAccumulator(np.shape(states)[-1])
    self.accumulators[key].update(states, mask)

  def add_layers(self, group: str, layer_states: Iterable, mask=None) -> None:
    """Adds every layer's states; `layer_states` iterates (..., d) arrays for layers 0, 1, ..."""
    for layer, states in enumerate(layer_states):
      self.add(group, layer, states, mask)

  def merge(self, other: "RankCollector") -> "RankCollector":
    for key, acc in other.accumulators.items():
      if key in self.accumulators:
        self.accumulators[key].merge(acc)
      else:
        self.accumulators[key] = GramAccumulator(acc.dim).merge(acc)
    return self

  def results(self, energy: float = 0.9, center: bool = False,
              kind: str = "squared") -> dict[tuple[str, int], RankResult]:
    return {key: acc.rank(energy, center, kind) for key, acc in sorted(self.accumulators.items())}


def per_sequence_ranks(states, mask=None, energy: float = 0.9, center: bool = False,
                       kind: str = "squared") -> np.ndarray:
  """Effective rank of each sequence's own matrix.

  Args:
    states: (B, L, d) token states; mask: (B, L) bool rows to use (None = all).
  Returns:
    (B,) int ranks; -1 for sequences with no valid row.
  """
  states = np.asarray(states, np.float64)
  mask = np.ones(states.shape[:2], bool) if mask is None else np.asarray(mask, bool)
  counts = mask.sum(axis=1)
  scale = np.einsum("bld,bl->b", states**2, mask)  # uncentred energy: the round-off scale
  if center:
    means = (states * mask[..., None]).sum(axis=1) / np.maximum(counts, 1)[:, None]
    states = states - means[:, None, :]
  # Zero rows leave the singular values unchanged (they only add zeros), so ragged masks batch. The
  # squared singular values are the eigenvalues of the smaller Gram matrix, (L, L) or (d, d): far
  # cheaper than an SVD, and exact enough for energy thresholds (see `gram_eigenvalues`).
  states = np.where(mask[..., None], states, 0.0)
  transposed = states.swapaxes(1, 2)
  gram = states @ transposed if states.shape[1] <= states.shape[2] else transposed @ states
  ranks = effective_rank(gram_eigenvalues(gram, scale), energy, kind, spectrum="gram")
  return np.where(counts > 0, ranks, -1)


class PerSequenceRankCollector:
  """Per-sequence mode: ranks of each sequence's own matrix, keyed by (group, layer), averaged.

  The threshold is fixed at construction because each sequence is reduced to its rank on arrival.
  """

  def __init__(self, energy: float = 0.9, center: bool = False, kind: str = "squared"):
    _check_settings(energy, kind)
    self.energy, self.center, self.kind = energy, center, kind
    self.ranks: dict[tuple[str, int], list[np.ndarray]] = {}
    self.rows: dict[tuple[str, int], int] = {}
    self.dims: dict[tuple[str, int], int] = {}

  def add(self, group: str, layer: int, states, mask=None) -> None:
    """`states` (B, L, d), `mask` (B, L): one matrix per sequence."""
    key = (group, int(layer))
    ranks = per_sequence_ranks(states, mask, self.energy, self.center, self.kind)
    self.ranks.setdefault(key, []).append(ranks[ranks >= 0])
    rows = np.prod(np.shape(states)[:2]) if mask is None else np.asarray(mask, bool).sum()
    self.rows[key] = self.rows.get(key, 0) + int(rows)
    self.dims[key] = np.shape(states)[-1]

  def add_layers(self, group: str, layer_states: Iterable, mask=None) -> None:
    for layer, states in enumerate(layer_states):
      self.add(group, layer, states, mask)

  def results(self) -> dict[tuple[str, int], RankResult]:
    out = {}
    for key in sorted(self.ranks):
      ranks = np.concatenate(self.ranks[key]).astype(np.float64)
      mean = float(ranks.mean()) if ranks.size else float("nan")
      std = float(ranks.std()) if ranks.size else float("nan")
      out[key] = RankResult(mean, self.energy, self.kind, self.center, PER_SEQUENCE, self.rows[key],
                            self.dims[key], num_sequences=int(ranks.size), rank_std=std)
    return out


def rank_curves(results: Mapping[tuple[str, int], RankResult]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{(group, layer): result} -> {group: (layers, ranks)} sorted by layer, for plotting or tables."""
  points: dict[str, list[tuple[int, float]]] = {}
  for (group, layer), result in results.items():
    points.setdefault(group, []).append((layer, result.rank))
  curves = {}
  for group, pairs in points.items():
    layers, ranks = zip(*sorted(pairs))
    curves[group] = (np.asarray(layers), np.asarray(ranks, np.float64))
  return curves


def out_of_span_energy(states, basis, gram: bool = False) -> float:
  """Fraction of the energy of M outside span(U): ||M - M U U^T||_F^2 / ||M||_F^2.

  Args:
    states: M (N, d) (e.g. the [MASK] states), or its Gram matrix M^T M (d, d) with `gram=True`,
      or a GramAccumulator (its uncentred Gram is used).
    basis: U (d, k) with orthonormal columns, e.g. `clean_real.basis(energy=0.9)`.
  Returns:
    a float in [0, 1]; 0 when M lies in the span, 1 when it is orthogonal to it; nan for M = 0.
  """
  basis = np.asarray(basis, np.float64)
  if isinstance(states, GramAccumulator):
    states, gram = states.gram, True
  states = np.asarray(states, np.float64)
  if gram:
    total = np.trace(states)
    inside = np.trace(basis.T @ states @ basis)
  else:
    total = np.sum(states**2)
    inside = np.sum((states @ basis) ** 2)
  if total <= 0:
    return float("nan")
  return float(np.clip((total - inside) / total, 0.0, 1.0))


def principal_angles(basis_a, basis_b) -> np.ndarray:
  """(min(ka, kb),) principal angles in radians, ascending, between span(A) and span(B) ((d, k) each)."""
  angles = scipy.linalg.subspace_angles(np.asarray(basis_a, np.float64), np.asarray(basis_b, np.float64))
  return np.sort(angles)


def mask_subspace_diagnostics(clean_real: GramAccumulator, mask_states: GramAccumulator,
                              masked_real: GramAccumulator | None = None, energy: float = 0.9,
                              center: bool = False) -> dict[str, Any]:
  """The "dimensions allocated to [MASK]" numbers of one layer (docs/design.md §10.1).

  Out-of-span energy of the [MASK] states (group 3) outside the rank_eps basis of the clean
  real-token states (group 2); principal angles between the rank_eps subspaces of the real states
  of masked inputs (group 1, when given) and of the [MASK] states. The out-of-span energy uses the
  uncentred [MASK] Gram; `center` only changes how the bases are chosen.
  """
  real_basis = clean_real.basis(energy=energy, center=center)
  out = {"energy": energy, "centered": center, "real_rank": real_basis.shape[1],
         "mask_out_of_span_energy": out_of_span_energy(mask_states, real_basis)}
  if masked_real is not None:
    angles = principal_angles(masked_real.basis(energy=energy, center=center),
                              mask_states.basis(energy=energy, center=center))
    out["principal_angles_masked_real_vs_mask"] = angles
  return out


# ----------------------------------------------------------------------------------------------
# The tool
# ----------------------------------------------------------------------------------------------

MODES = ("corpus", "per_sequence")
NORMALISATIONS = ("layernorm", "none")
NORMALISATION_RULE = ("layernorm: every layer's token states (pre-LN and post-LN alike) are normalised before the "
                      "rank, x -> (x - mean(x)) / std(x) over the d features (a LayerNorm without scale and bias; "
                      "rows with std 0 stay 0), so the rank does not depend on each token's norm or offset")
MASK_ROWS_PER_DIM = 20  # the [MASK] group needs >= 20 d rows for a stable rank of a d-dimensional cloud


def layer_norm_rows(states) -> np.ndarray:
  """(..., d) -> (..., d) float64: each row minus its mean over the last axis, divided by its standard deviation
  (no epsilon, so a row's scale and offset drop out exactly; constant rows become 0)."""
  states = np.asarray(states, np.float64)
  centred = states - states.mean(axis=-1, keepdims=True)
  std = np.sqrt(np.mean(centred**2, axis=-1, keepdims=True))
  return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def normalise_layers(layers, normalise: str) -> tuple:
  """The layers' states as the rank sees them: `layer_norm_rows` of each ('layernorm') or unchanged ('none')."""
  if normalise not in NORMALISATIONS:
    raise ValueError(f"normalise={normalise!r}; use one of {NORMALISATIONS}")
  return tuple(layers) if normalise == "none" else tuple(layer_norm_rows(h) for h in layers)


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
    return normalise_layers(hidden(tokens, positions, padding), normalise)

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
    if result.mode == PER_SEQUENCE:
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
  states normalised by `normalise` (NORMALISATION_RULE, recorded in `settings`). A [MASK] group still under
  20 d rows after `max_mask_draws` draws is a printed warning (also in `warnings`).
  """
  from exlm_jax.analysis import plots  # pylint: disable=g-import-not-at-top  (plots imports this module)
  run = inputs.as_run(workdir)
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"mode {mode!r}; use 'corpus' and/or 'per_sequence'")
  normalise_layers((), normalise)  # a bad value fails before any work
  if max_mask_draws < 1:
    raise ValueError(f"max_mask_draws={max_mask_draws}; use >= 1")
  groups = _rank_groups(run)
  blocks = inputs.load_data_blocks(data, run, max_sequences) if blocks is None else blocks
  corpus = RankCollector()
  per_seq = PerSequenceRankCollector(energy, center, kind)
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
                   "normalisation_rule": NORMALISATION_RULE if normalise == "layernorm" else "none: raw states",
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


def _out_of_span(corpus: RankCollector, groups: tuple[str, str, str], energy: float, center: bool) -> dict[str, list]:
  """Per layer: energy fraction of the [MASK] states outside the clean-real rank_eps basis, and angles.
  groups: (clean real, [MASK], masked real), as `mask_subspace_diagnostics` takes them."""
  clean_real, mask, masked_real = groups
  acc = corpus.accumulators
  layers = sorted(layer for group, layer in acc if group == mask)
  out = {"layer": [], "mask_out_of_span_energy": [], "real_rank": [], "mean_principal_angle_deg": []}
  for layer in layers:
    diag = mask_subspace_diagnostics(acc[(clean_real, layer)], acc[(mask, layer)], acc[(masked_real, layer)],
                                     energy, center)
    out["layer"].append(layer)
    out["mask_out_of_span_energy"].append(diag["mask_out_of_span_energy"])
    out["real_rank"].append(diag["real_rank"])
    angles = diag["principal_angles_masked_real_vs_mask"]
    out["mean_principal_angle_deg"].append(float(np.degrees(angles).mean()) if angles.size else float("nan"))
  return out
