"""Fine-tuning datasets in one in-memory format (`TaskData`): GLUE and MoleculeNet-style CSVs.

GLUE: SST-2, CoLA and RTE are read offline from the shared data folder (plain readers, no TFDS
builder); every task can also come from TFDS's `glue/<task>` builder, which needs TensorFlow and
internet on first use. Split convention (`validation=`):
  'carve' (default): a seeded validation split (10%, stratified by label) is carved out of GLUE train
    for model selection, and GLUE dev is reported as 'test' (MNLI: 'test_matched', 'test_mismatched');
  'dev': GLUE dev itself is the validation split (MNLI: matched; mismatched is 'validation_mismatched'),
    as in papers that report the best dev score. There is no test split then.

MoleculeNet: CSV files, one SMILES column and one or more label columns; empty cells are missing
labels (label_mask False). SMILES that RDKit cannot parse are skipped, counted, listed in the
provenance and logged. Default split: DeepChem's deterministic scaffold split, 80/10/10.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import pathlib
from typing import Sequence

import numpy as np
import pandas as pd

from exlm_jax.data import paths
from exlm_jax.finetune import splits as splits_lib
from exlm_jax.finetune.metrics import GLUE_TASKS, TASK_TYPES, GlueTask, default_metrics, glue_task

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Provenance:
  """Where a split's rows came from. Splits cut from one file share its provenance.

  sources: files (or 'tfds:glue/<task>:<split>') read, in order; row indices count across them.
  rows_read: data rows read (headers excluded).
  invalid_smiles: (row, SMILES) of molecules RDKit could not parse; they are not in any split.
  missing_labels: label cells without a value (label_mask False) among the kept rows.
  unlabeled_rows: kept rows whose every label is missing (kept: they still count in split sizes).
  """

  sources: tuple[str, ...]
  rows_read: int
  invalid_smiles: tuple[tuple[int, str], ...] = ()
  missing_labels: int = 0
  unlabeled_rows: int = 0


@dataclasses.dataclass
class Split:
  """N examples.

  texts: N strings (sentences or SMILES), or N (sentence_a, sentence_b) pairs.
  labels: classification int32 (N,); regression and multitask_binary float32 (N, T), 0 where missing.
  label_mask: bool, labels' shape; False = no label (never train or score on it).
  rows: int64 (N,) row of each example in `provenance.sources` (0-based, headers excluded).
  derivation: how the split was made from its source rows.
  """

  texts: list
  labels: np.ndarray
  label_mask: np.ndarray
  rows: np.ndarray
  provenance: Provenance
  derivation: str = ""

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, indices: np.ndarray, derivation: str) -> "Split":
    indices = np.asarray(indices, np.int64)
    return Split([self.texts[i] for i in indices], self.labels[indices], self.label_mask[indices],
                 self.rows[indices], self.provenance, derivation)


@dataclasses.dataclass
class TaskData:
  """A fine-tuning task with its splits.

  task_type: 'classification' (softmax over num_outputs classes), 'regression' (num_outputs targets)
    or 'multitask_binary' (num_outputs independent sigmoid tasks, ROC-AUC).
  label_names: class names (classification) or label column names (the other two).
  selection_split: the split model selection uses; report_splits: the splits final results are read on.
  """

  name: str
  task_type: str
  num_outputs: int
  label_names: tuple[str, ...]
  splits: dict[str, Split]
  metrics: tuple[str, ...] = ()
  main_metric: str = ""
  selection_split: str = "validation"
  report_splits: tuple[str, ...] = ("test",)

  def __post_init__(self):
    if self.task_type not in TASK_TYPES:
      raise ValueError(f"task_type={self.task_type!r}; choose one of {TASK_TYPES}")
    if not self.metrics:
      self.metrics, self.main_metric = default_metrics(self.task_type)

  def summary(self) -> str:
    sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
    line = f"{self.name} ({self.task_type}, {self.num_outputs} output(s)): {sizes}"
    invalid = {len(s.provenance.invalid_smiles) for s in self.splits.values()}
    return line + (f"; {max(invalid)} invalid SMILES skipped" if max(invalid, default=0) else "")


def _data_root(root: PathLike | None) -> pathlib.Path:
  root = pathlib.Path(root) if root is not None else paths.data_dir()
  if root is None:
    raise FileNotFoundError("the shared data folder is needed: set EXLM_DATA_DIR or place it at ../shared/data")
  return root


# ---------------------------------------------------------------------------------------------
# GLUE
# ---------------------------------------------------------------------------------------------


def load_glue(task: str, *, source: str = "auto", validation: str = "carve", valid_fraction: float = 0.1,
              seed: int = 0, root: PathLike | None = None, tfds_data_dir: str | None = None) -> TaskData:
  """Loads a GLUE task (see the module docstring for the split convention).

  source: 'local' (shared data folder; sst2, cola, rte), 'tfds' (glue/<task>), or 'auto' (local when
    the task has a local copy and the folder exists, else TFDS).
  """
  spec = glue_task(task)
  if source not in ("auto", "local", "tfds"):
    raise ValueError(f"source={source!r}; choose 'auto', 'local' or 'tfds'")
  if validation not in ("carve", "dev"):
    raise ValueError(f"validation={validation!r}; choose 'carve' (from GLUE train) or 'dev' (GLUE dev)")
  use_local = source == "local" or (
      source == "auto" and spec.name in _LOCAL_GLUE and (root is not None or paths.data_dir() is not None))
  if use_local:
    if spec.name not in _LOCAL_GLUE:
      raise ValueError(
          f"GLUE task {spec.name!r} has no local copy (local: {', '.join(_LOCAL_GLUE)}); use source='tfds'")
    raw = _LOCAL_GLUE[spec.name](_data_root(root) / "glue")
  else:
    raw = _read_glue_tfds(spec, tfds_data_dir)
  return _arrange_glue(spec, raw, validation, valid_fraction, seed)


def _arrange_glue(spec: GlueTask, raw: dict[str, Split], validation: str, valid_fraction: float,
                  seed: int) -> TaskData:
  """Turns GLUE {train, dev...} into train/validation(/test) according to `validation`."""
  train = raw["train"]
  if validation == "carve":
    fractions = (1.0 - valid_fraction, valid_fraction)
    if spec.task_type == "classification":
      train_idx, valid_idx = splits_lib.stratified_split(train.labels, fractions, seed)
      how = "stratified"
    else:
      train_idx, valid_idx = splits_lib.random_split(len(train), fractions, seed)
      how = "random"
    note = f"{how} {valid_fraction:g} of GLUE train, seed {seed}"
    splits = {"train": train.take(train_idx, f"GLUE train without the validation carve ({note})"),
              "validation": train.take(valid_idx, note)}
    dev_names = {name: name.replace("validation", "test") for name in spec.dev_splits}
  else:
    splits = {"train": train}
    dev_names = {name: "validation" if i == 0 else name for i, name in enumerate(spec.dev_splits)}
  for name, new_name in dev_names.items():
    splits[new_name] = raw[name]
  return TaskData(spec.name, spec.task_type, max(spec.num_labels, 1), spec.label_names or ("score",), splits,
                  spec.metrics, spec.main_metric, "validation", tuple(dev_names.values()))


def _glue_split(spec: GlueTask, frame: pd.DataFrame, sources: Sequence[PathLike], label_column: str,
                derivation: str) -> Split:
  """A Split from a frame holding `spec.text_keys` and a label column."""
  columns = [frame[k].astype(str).tolist() for k in spec.text_keys]
  texts = columns[0] if len(columns) == 1 else list(zip(*columns))
  if spec.task_type == "regression":
    labels = frame[label_column].to_numpy(np.float32).reshape(-1, 1)
  else:
    labels = frame[label_column].to_numpy().astype(np.int32)
    bad = (labels < 0) | (labels >= spec.num_labels)
    if bad.any():
      raise ValueError(f"{spec.name} {derivation}: {bad.sum()} label(s) outside 0..{spec.num_labels - 1}, "
                       f"e.g. row {np.flatnonzero(bad)[0]} (unlabelled test data?)")
  provenance = Provenance(tuple(str(s) for s in sources), len(frame))
  return Split(texts, labels, np.ones(labels.shape, bool), np.arange(len(frame), dtype=np.int64), provenance,
               derivation)


def _read_tsv(path: pathlib.Path, **kwargs) -> pd.DataFrame:
  if not path.is_file():
    raise FileNotFoundError(f"missing GLUE file {path}; see shared/data/SOURCES.md")
  return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str, **kwargs)


def _read_sst2(glue_dir: pathlib.Path) -> dict[str, Split]:
  """ALPS's SST-2: GLUE train = train.tsv + dev.tsv (a re-split of it), GLUE dev = test.tsv."""
  spec, folder = GLUE_TASKS["sst2"], glue_dir / "sst2"
  train_files, dev_files = [folder / "train.tsv", folder / "dev.tsv"], [folder / "test.tsv"]
  frame = lambda files: pd.concat([_read_tsv(f) for f in files], ignore_index=True).astype({"label": int})
  return {"train": _glue_split(spec, frame(train_files), train_files, "label", "GLUE train"),
          "validation": _glue_split(spec, frame(dev_files), dev_files, "label", "GLUE dev")}


def _read_cola(glue_dir: pathlib.Path) -> dict[str, Split]:
  """Official CoLA release: GLUE train = in_domain_train, GLUE dev = in_domain_dev + out_of_domain_dev."""
  spec, folder = GLUE_TASKS["cola"], glue_dir / "cola" / "raw"
  train_files = [folder / "in_domain_train.tsv"]
  dev_files = [folder / "in_domain_dev.tsv", folder / "out_of_domain_dev.tsv"]
  names = ["source", "label", "annotation", "sentence"]
  frame = lambda files: pd.concat([_read_tsv(f, header=None, names=names) for f in files],
                                  ignore_index=True).astype({"label": int})
  return {"train": _glue_split(spec, frame(train_files), train_files, "label", "GLUE train"),
          "validation": _glue_split(spec, frame(dev_files), dev_files, "label", "GLUE dev")}


def _read_rte(glue_dir: pathlib.Path) -> dict[str, Split]:
  """Hugging Face glue/rte parquet exports (train, validation; test is unlabelled and not read)."""
  spec, folder = GLUE_TASKS["rte"], glue_dir / "rte"
  out = {}
  for split, derivation in (("train", "GLUE train"), ("validation", "GLUE dev")):
    path = folder / f"{split}.parquet"
    if not path.is_file():
      raise FileNotFoundError(f"missing GLUE file {path}; see shared/data/SOURCES.md")
    out[split] = _glue_split(spec, pd.read_parquet(path), [path], "label", derivation)
  return out


_LOCAL_GLUE = {"sst2": _read_sst2, "cola": _read_cola, "rte": _read_rte}


def _read_glue_tfds(spec: GlueTask, data_dir: str | None) -> dict[str, Split]:
  """All labelled GLUE splits of `spec` through TFDS (`glue/<task>`), ordered by the `idx` feature."""
  try:
    import tensorflow  # noqa: F401  tfds.load needs it to build and read `glue`
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(f"GLUE {spec.name!r} via TFDS needs TensorFlow (pip install tensorflow) and internet on first "
                      f"use; offline copies exist only for {', '.join(_LOCAL_GLUE)}") from e
  out = {}
  for split in ("train", *spec.dev_splits):
    try:
      records = sorted(tfds.as_numpy(tfds.load(f"glue/{spec.name}", split=split, data_dir=data_dir)),
                       key=lambda r: int(r["idx"]))
    except Exception as e:  # download / preparation failures come in many types
      raise RuntimeError(
          f"TFDS could not load glue/{spec.name} split {split!r} (internet needed on first use): {e}") from e
    frame = pd.DataFrame({k: [r[k].decode("utf-8") if isinstance(r[k], bytes) else str(r[k]) for r in records]
                          for k in spec.text_keys})
    frame["label"] = [r["label"] for r in records]
    derivation = "GLUE train" if split == "train" else f"GLUE dev ({split})"
    out[split] = _glue_split(spec, frame, [f"tfds:glue/{spec.name}:{split}"], "label", derivation)
  return out


# ---------------------------------------------------------------------------------------------
# MoleculeNet
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoleculeTask:
  """A MoleculeNet CSV: `path` relative to the shared data folder."""

  name: str
  path: str
  smiles_column: str
  label_columns: tuple[str, ...]
  task_type: str


_TOX21 = ("NR-AR", "NR-AR-LBD", "NR-AhR", "NR-Aromatase", "NR-ER", "NR-ER-LBD", "NR-PPAR-gamma", "SR-ARE",
          "SR-ATAD5", "SR-HSE", "SR-MMP", "SR-p53")

MOLECULENET: dict[str, MoleculeTask] = {t.name: t for t in (
    MoleculeTask("bbbp", "moleculenet/BBBP.csv", "smiles", ("BBBP",), "multitask_binary"),
    MoleculeTask("bace", "moleculenet/bace.csv", "mol", ("Class",), "multitask_binary"),
    MoleculeTask("bace_pic50", "moleculenet/bace.csv", "mol", ("pIC50",), "regression"),
    MoleculeTask("clintox", "moleculenet/clintox.csv", "smiles", ("FDA_APPROVED", "CT_TOX"), "multitask_binary"),
    MoleculeTask("tox21", "moleculenet/tox21.csv", "smiles", _TOX21, "multitask_binary"),
    MoleculeTask("sider", "moleculenet/sider.csv", "smiles", tuple(f"SIDER{i}" for i in range(1, 28)),
                 "multitask_binary"),
    MoleculeTask("esol", "moleculenet/delaney-processed.csv", "smiles",
                 ("measured log solubility in mols per litre",), "regression"),
    MoleculeTask("freesolv", "moleculenet/SAMPL.csv", "smiles", ("expt",), "regression"),
)}


def load_moleculenet(name: str, *, split: str | None = "scaffold", fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0, root: PathLike | None = None, invalid: str = "skip") -> TaskData:
  """A registered MoleculeNet task (`MOLECULENET`), split as in `load_molecule_csv`."""
  if name.lower() not in MOLECULENET:
    raise ValueError(f"unknown MoleculeNet task {name!r}; choose one of {', '.join(MOLECULENET)}")
  spec = MOLECULENET[name.lower()]
  return load_molecule_csv(_data_root(root) / spec.path, spec.smiles_column, spec.label_columns, spec.task_type,
                           name=spec.name, split=split, fractions=fractions, seed=seed, invalid=invalid)


def load_molecule_csv(path: PathLike, smiles_column: str, label_columns: Sequence[str], task_type: str, *,
                      name: str | None = None, split: str | None = "scaffold",
                      fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, invalid: str = "skip") -> TaskData:
  """Any MoleculeNet-style CSV. Empty label cells are missing labels.

  path: a file, or '$DATA/...'. task_type: 'multitask_binary' (0/1 labels), 'regression', or
    'classification' (one column of class ids 0..C-1).
  split: 'scaffold' (deterministic, seed unused), 'random' (seeded), or None (a single split 'all').
  invalid: 'skip' (count, list and log unparsable SMILES) or 'error'.
  """
  if isinstance(label_columns, str):
    label_columns = [label_columns]
  if task_type not in TASK_TYPES:
    raise ValueError(f"task_type={task_type!r}; choose one of {TASK_TYPES}")
  if task_type == "classification" and len(label_columns) != 1:
    raise ValueError(f"a 'classification' task takes one label column, got {len(label_columns)}")
  if invalid not in ("skip", "error"):
    raise ValueError(f"invalid={invalid!r}; choose 'skip' or 'error'")
  path = pathlib.Path(paths.resolve(str(path)))
  name = name or path.stem
  frame = _read_molecule_frame(path, smiles_column, list(label_columns))
  smiles = [s.strip() for s in frame[smiles_column]]
  valid = _parsable(smiles)
  invalid_rows = np.flatnonzero(~valid)
  if invalid_rows.size:
    preview = ", ".join(str(r) for r in invalid_rows[:10]) + (" ..." if invalid_rows.size > 10 else "")
    message = f"{path.name}: {invalid_rows.size} of {len(smiles)} SMILES cannot be parsed by RDKit (rows {preview})"
    if invalid == "error":
      raise ValueError(message + "; fix them or pass invalid='skip'")
    log.warning("%s; skipped", message)
  values = np.stack([_numeric_column(frame[c], c, path) for c in label_columns], axis=1)[valid]
  mask = ~np.isnan(values)
  _check_usable(path, len(frame), int(valid.sum()), mask, list(label_columns))
  labels, label_names, num_outputs = _molecule_labels(values, mask, task_type, list(label_columns), path)
  provenance = Provenance((str(path),), len(frame), tuple((int(r), smiles[r]) for r in invalid_rows),
                          int((~mask).sum()), int((~mask.any(1)).sum()))
  rows = np.flatnonzero(valid).astype(np.int64)
  if task_type == "classification":
    mask = mask[:, 0]
  whole = Split([smiles[r] for r in rows], labels, mask, rows, provenance, f"all parsable rows of {path.name}")
  task = TaskData(name, task_type, num_outputs, label_names, {"all": whole}, selection_split="all",
                  report_splits=("all",))
  return task if split is None else split_molecules(task, split, fractions, seed)


def split_molecules(task: TaskData, method: str = "scaffold", fractions: Sequence[float] = (0.8, 0.1, 0.1),
                    seed: int = 0) -> TaskData:
  """Cuts `task.splits['all']` into train/validation/test by scaffold (deterministic) or at random (seeded)."""
  whole = task.splits["all"]
  if len(fractions) != 3:
    raise ValueError(f"molecule splits take 3 fractions (train, validation, test), got {list(fractions)}")
  if method == "scaffold":
    parts = splits_lib.scaffold_split(whole.texts, fractions)
    how = "scaffold split (DeepChem order)"
  elif method == "random":
    parts = splits_lib.random_split(len(whole), fractions, seed)
    how = f"random split (seed {seed})"
  else:
    raise ValueError(f"split={method!r}; choose 'scaffold', 'random' or None")
  how += f" {'/'.join(f'{f:g}' for f in fractions)} of {len(whole)} molecules"
  splits = {k: whole.take(idx, how) for k, idx in zip(("train", "validation", "test"), parts)}
  return dataclasses.replace(task, splits=splits, selection_split="validation", report_splits=("test",))


def _read_molecule_frame(path: pathlib.Path, smiles_column: str, label_columns: list[str]) -> pd.DataFrame:
  if not path.is_file():
    raise FileNotFoundError(f"no molecule CSV at {path}")
  try:
    header = list(pd.read_csv(path, nrows=0).columns)
  except pd.errors.EmptyDataError:
    raise ValueError(f"{path} is empty; a molecule CSV needs a header row naming the SMILES column "
                     f"({smiles_column!r}) and the label column(s) {label_columns}, then one row per molecule") from None
  missing = [c for c in [smiles_column, *label_columns] if c not in header]
  if missing:
    shown = ", ".join(header[:12]) + (f", ... ({len(header)} columns)" if len(header) > 12 else "")
    raise ValueError(f"{path} has no column(s) {missing}; set data.smiles_column / data.label_columns "
                     f"to columns it has: {shown}")
  return pd.read_csv(path, usecols=[smiles_column, *label_columns], dtype=str, keep_default_na=False)


def _check_usable(path: pathlib.Path, rows: int, parsable: int, mask: np.ndarray, columns: list[str]) -> None:
  """One line naming the file when nothing can be trained on: no data rows, no parsable SMILES, no labels."""
  if rows == 0:
    raise ValueError(f"{path} has a header but no data rows; add one row per molecule")
  if parsable == 0:
    raise ValueError(f"{path}: none of its {rows} SMILES can be parsed by RDKit; check the SMILES column")
  if not mask.any():
    raise ValueError(f"{path} has no labels: every cell of column(s) {columns} is empty (among the {parsable} "
                     "rows with parsable SMILES); fill them in or set data.label_columns to labelled columns")


def _numeric_column(column: pd.Series, name: str, path: pathlib.Path) -> np.ndarray:
  """float64 (N,), NaN for empty cells; raises on any other non-number."""
  text = column.str.strip()
  values = pd.to_numeric(text.where(text != ""), errors="coerce").to_numpy(np.float64)
  bad = np.flatnonzero(np.isnan(values) & (text != "").to_numpy())
  if bad.size:
    raise ValueError(f"{path.name} column {name!r} row {bad[0]}: {text.iloc[bad[0]]!r} is not a number")
  return values


def _parsable(smiles: Sequence[str]) -> np.ndarray:
  """(N,) bool: RDKit parses (and sanitises) the SMILES."""
  from rdkit import Chem, RDLogger

  RDLogger.DisableLog("rdApp.*")
  try:
    return np.array([bool(s) and Chem.MolFromSmiles(s) is not None for s in smiles], bool)
  finally:
    RDLogger.EnableLog("rdApp.*")


def _molecule_labels(values: np.ndarray, mask: np.ndarray, task_type: str, columns: list[str],
                     path: pathlib.Path) -> tuple[np.ndarray, tuple[str, ...], int]:
  """(labels, label_names, num_outputs) from float (N, T) values with NaN = missing."""
  filled = np.where(mask, values, 0.0)
  if task_type == "regression":
    return filled.astype(np.float32), tuple(columns), len(columns)
  if np.any(filled != np.round(filled)) or np.any(filled < 0):
    raise ValueError(f"{path.name}: {task_type} labels must be non-negative integers; see column(s) {columns}")
  if task_type == "multitask_binary":
    if np.any(filled > 1):
      bad = columns[int(np.argwhere(filled > 1)[0, 1])]
      raise ValueError(f"{path.name} column {bad!r} has labels other than 0/1; use task_type='classification'")
    return filled.astype(np.float32), tuple(columns), len(columns)
  num_classes = int(filled.max()) + 1
  return filled[:, 0].astype(np.int32), tuple(str(c) for c in range(num_classes)), num_classes
