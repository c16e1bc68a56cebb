"""Train/validation/test splits as index arrays: random, stratified (text) and scaffold (molecules).

Every function returns one int64 index array per fraction, each sorted ascending; together they
partition 0..N-1. Split sizes use DeepChem's cut-offs: split i ends at floor(N * (f_0 + ... + f_i)).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_EPS = 1e-9  # so that e.g. (0.7 + 0.2) * 10 cuts at 9, not 8


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
  fractions = np.asarray(fractions, np.float64)
  if fractions.ndim != 1 or fractions.size < 2 or np.any(fractions < 0) or abs(fractions.sum() - 1) > 1e-6:
    raise ValueError(f"split fractions {list(fractions)} must be >= 2 non-negative numbers summing to 1")
  return fractions


def _cutoffs(n: int, fractions: np.ndarray) -> np.ndarray:
  """(K-1,) end positions of all splits but the last."""
  return np.floor(np.cumsum(fractions)[:-1] * n + _EPS).astype(np.int64)


def random_split(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> tuple[np.ndarray, ...]:
  """Seeded random partition of range(n)."""
  fractions = _check_fractions(fractions)
  order = np.random.default_rng(seed).permutation(n)
  return tuple(np.sort(part) for part in np.split(order, _cutoffs(n, fractions)))


def stratified_split(labels, fractions: Sequence[float] = (0.9, 0.1), seed: int = 0) -> tuple[np.ndarray, ...]:
  """Seeded random partition with `random_split`'s sizes that keeps each label's share in every split.

  labels: (N,) hashable ids. Each class's shuffled members are spread evenly over [0, 1) and the
  examples are cut in that order, so every split holds each class's share to within one example.
  """
  fractions = _check_fractions(fractions)
  labels = np.asarray(labels).reshape(-1)
  rng = np.random.default_rng(seed)
  position = np.empty(labels.size, np.float64)
  for value in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == value))
    position[members] = (np.arange(members.size) + rng.random()) / members.size
  order = np.lexsort((rng.random(labels.size), position))
  return tuple(np.sort(part) for part in np.split(order, _cutoffs(labels.size, fractions)))


def murcko_scaffold(smiles: str) -> str:
  """Bemis-Murcko scaffold SMILES without chirality ('' for acyclic molecules)."""
  from rdkit import Chem
  from rdkit.Chem.Scaffolds import MurckoScaffold

  mol = Chem.MolFromSmiles(smiles)
  if mol is None:
    raise ValueError(f"RDKit cannot parse SMILES {smiles!r}; drop invalid molecules before a scaffold split")
  return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)


def scaffold_groups(smiles: Sequence[str]) -> list[np.ndarray]:
  """Indices grouped by scaffold, in DeepChem's order: size descending, ties by first index descending.

  (DeepChem sorts by the key (len(group), group[0]) with reverse=True, so among equal-sized groups the
  one whose first molecule comes LATER in the file goes first.)
  """
  from rdkit import RDLogger

  groups: dict[str, list[int]] = {}
  RDLogger.DisableLog("rdApp.*")
  try:
    for i, s in enumerate(smiles):
      groups.setdefault(murcko_scaffold(s), []).append(i)
  finally:
    RDLogger.EnableLog("rdApp.*")
  ordered = sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)
  return [np.asarray(g, np.int64) for g in ordered]


def scaffold_split(smiles: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[np.ndarray, ...]:
  """Deterministic scaffold split (DeepChem `ScaffoldSplitter`): no seed, every scaffold in one split.

  Groups (see `scaffold_groups`) fill train until the next group would pass floor(N * f_train), then
  validation up to the cumulative cut-off, and the rest goes to test. All SMILES must parse.
  """
  fractions = _check_fractions(fractions)
  cutoffs = np.cumsum(fractions)[:-1] * len(smiles)
  parts: list[list[np.ndarray]] = [[] for _ in fractions]
  sizes = np.zeros(len(fractions), np.int64)
  for group in scaffold_groups(smiles):
    target = len(fractions) - 1
    for i, cutoff in enumerate(cutoffs):
      if sizes[: i + 1].sum() + group.size <= cutoff + _EPS:
        target = i
        break
    parts[target].append(group)
    sizes[target] += group.size
  return tuple(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
