"""Effective rank of token representations and the [MASK]-subspace diagnostics (the measure; the tool that runs
it on a pretraining run is exlm_jax/analysis/rank_tool.py).

Definition (the threshold is an argument and is recorded in every result):
  rank(H) = min{ k : sum_{i<=k} w_i >= energy * sum_i w_i },  w_i = s_i^2 ('squared') or s_i ('linear'),
with s_1 >= s_2 >= ... the singular values of H (N, d), rows = token states. A threshold reached
to within a relative 1e-12 counts as reached, so exact boundaries are not lost to rounding.

Corpus mode streams rows into a float64 Gram matrix G = H^T H (d, d) on the host; its eigenvalues
are s_i^2. Per-sequence mode takes the rank of every sequence's own matrix and averages it (the
reading a MAE-LM reviewer proposed); results carry `mode` so the two are never confused.

Layer states are compared on one stated normalisation (`NORMALISATION_RULE`, `normalise_layers`): pre-LN
intermediate layers are the raw residual stream while post-LN layers come out of a LayerNorm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import scipy.linalg


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


NORMALISATIONS = ("layernorm", "none")
NORMALISATION_RULE = ("layernorm: every layer's token states (pre-LN and post-LN alike) are normalised before the "
                      "rank, x -> (x - mean(x)) / std(x) over the d features (a LayerNorm without scale and bias; "
                      "rows with std 0 stay 0), so the rank does not depend on each token's norm or offset")


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
