"""Fine-tuning tasks behind one protocol (`Task`), and the labelled tasks' data.

`load_task(config)` is the task registry: GLUE, MoleculeNet and CSV tasks are `LabelledTask`s (their
splits subsampled as configured, tokenized into `<s> A </s> </s> B </s>` blocks with their labels, fixed-size
batches padded with filler rows whose labels are masked out, a sentence-level head); SQuAD (`squad_v1`,
`squad_v2`) is finetune/squad/task.py's `SquadTask`. finetune/loop.py trains and scores any of them the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.finetune import lengths as lengths_lib
from exlm_jax.finetune import results as results_lib
from exlm_jax.finetune import tasks as tasks_lib
from exlm_jax.finetune.config import label_columns
from exlm_jax.finetune.encoding import encode_examples
from exlm_jax.finetune.model import ClassificationHead, FinetuneLoss
from exlm_jax.train import steps
from exlm_jax.train.reporting import note


class Encoded(Protocol):
  """A split ready for the trainer: `len()` rows, `batch(indices, batch_size)` -> the loss module's batch dict
  (padded to batch_size with rows that carry no loss)."""

  def __len__(self) -> int: ...

  def batch(self, indices: np.ndarray, batch_size: int) -> dict: ...


class Task(Protocol):
  """What the one fine-tuning loop (finetune/loop.py) needs of a task.

  name, task_type; metrics (names `score` returns), main_metric (model selection, finetune/metrics.py
  `is_improvement`), selection_split, report_splits.
  summary() -> one line; tokenizer_corpus() -> (texts, 'text' | 'smiles'): what a scratch tokenizer is
  built on; fit_to_length(init, config) -> (task, length report for results.json or None): inputs over
  config.seq_len counted per split and handled by config.data.overlong (finetune/lengths.py);
  encode(tokenizer, seq_len) -> {split: Encoded} (logs what it cut or counted);
  loss_model(model_config, train) -> the steps.LossModel the trainer fine-tunes, whose `predict(batch)`
  gives the (B, ...) outputs that score(split, outputs (N, ...)) -> {metric: float} reads;
  write_predictions(directory, split, outputs) -> per-seed prediction files (may write nothing);
  info() -> task.json fields; results_info() -> extra results.json fields; sources() -> the data files (or
  TFDS names) the run card fingerprints; head_flops(d_model, seq_len) -> forward FLOPs of the head per row.
  """

  name: str
  task_type: str
  metrics: tuple[str, ...]
  main_metric: str
  selection_split: str
  report_splits: tuple[str, ...]

  def summary(self) -> str: ...

  def tokenizer_corpus(self) -> tuple[list[str], str]: ...

  def fit_to_length(self, init, config) -> tuple["Task", dict | None]: ...

  def encode(self, tokenizer, seq_len: int) -> dict[str, Encoded]: ...

  def loss_model(self, model_config, train: Encoded) -> steps.LossModel: ...

  def score(self, split: str, outputs: np.ndarray) -> dict[str, float]: ...

  def write_predictions(self, directory, split: str, outputs: np.ndarray) -> None: ...

  def info(self) -> dict: ...

  def results_info(self) -> dict: ...

  def sources(self) -> list[str]: ...

  def head_flops(self, d_model: int, seq_len: int) -> float: ...


def validate_task_config(config) -> None:
  """Task-specific checks (one-line errors) before any data work; unknown task names fail here."""
  name = config.finetune.task.lower()
  if name in config_lib.SQUAD_TASKS:
    from exlm_jax.finetune.squad import task as squad_task  # pylint: disable=g-import-not-at-top
    squad_task.validate_config(config)
  elif not (config.data.path or name == "csv" or name.replace("-", "") in tasks_lib.GLUE_TASKS
            or name in tasks_lib.MOLECULENET):
    known = ", ".join([*tasks_lib.GLUE_TASKS, *tasks_lib.MOLECULENET, *config_lib.SQUAD_TASKS, "csv"])
    raise ValueError(f"unknown fine-tuning task {config.finetune.task!r}; choose one of {known}")


def load_task(config) -> Task:
  """The task registry: config.finetune.task (or config.data.path) -> its Task."""
  if config.finetune.task.lower() in config_lib.SQUAD_TASKS and not config.data.path:
    from exlm_jax.finetune.squad import task as squad_task  # pylint: disable=g-import-not-at-top
    return squad_task.load(config)
  data = load_task_data(config)
  mean, std = target_stats(data, config.finetune.normalize_targets)
  return LabelledTask(data, mean, std, config.finetune.pooler_dropout)


def load_task_data(config) -> tasks_lib.TaskData:
  """The TaskData named by config.finetune.task (or the CSV in config.data.path), subsampled as asked."""
  data = config.data
  if data.path or config.finetune.task == "csv":
    if not data.path:
      raise ValueError("finetune.task='csv' needs --config.data.path=FILE.csv")
    task = tasks_lib.load_molecule_csv(data.path, data.smiles_column, label_columns(data.label_columns),
                                       data.task_type, split=data.split, fractions=tuple(data.fractions),
                                       seed=data.split_seed)
  else:
    name = config.finetune.task.lower()
    if name.replace("-", "") in tasks_lib.GLUE_TASKS:
      task = tasks_lib.load_glue(name, source=data.source, validation=data.validation,
                                 valid_fraction=data.valid_fraction, seed=data.split_seed)
    else:
      task = tasks_lib.load_moleculenet(name, split=data.split, fractions=tuple(data.fractions), seed=data.split_seed)
  return subsample(task, data.max_train_examples, data.max_eval_examples, data.split_seed)


def subsample(task: tasks_lib.TaskData, max_train: int, max_eval: int, seed: int) -> tasks_lib.TaskData:
  """At most max_train training / max_eval other examples per split (seeded, order kept); -1 = all."""
  rng = np.random.default_rng(seed)
  splits = {}
  for name, split in task.splits.items():
    limit = max_train if name == "train" else max_eval
    if 0 < limit < len(split):
      keep = np.sort(rng.choice(len(split), limit, replace=False))
      split = split.take(keep, f"{split.derivation}; subsample of {limit} (seed {seed})")
    splits[name] = split
  return dataclasses.replace(task, splits=splits)


@dataclasses.dataclass
class EncodedSplit:
  """tokens (N, L) int32; labels (N,) int32 or (N, T) float32; mask like labels (bool)."""

  tokens: np.ndarray
  labels: np.ndarray
  mask: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  def batch(self, indices: np.ndarray, batch_size: int) -> dict:
    return make_batch(self, indices, batch_size)


def target_stats(task: tasks_lib.TaskData, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) per target over the labelled training cells (regression), else zeros/ones."""
  width = task.num_outputs
  if task.task_type != "regression" or not normalize:
    return np.zeros(width, np.float32), np.ones(width, np.float32)
  train = task.splits["train"]
  labels = np.where(train.label_mask, train.labels, np.nan).astype(np.float64)
  mean, std = np.nanmean(labels, 0), np.nanstd(labels, 0)
  std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
  return np.nan_to_num(mean).astype(np.float32), std.astype(np.float32)


def encode_split(split: tasks_lib.Split, tokenizer, seq_len: int, task_type: str, mean, std) -> tuple[EncodedSplit, int]:
  """(EncodedSplit, number truncated). Regression labels are normalised with (mean, std)."""
  tokens, truncated = encode_examples(split.texts, tokenizer, seq_len)
  labels, mask = np.asarray(split.labels), np.asarray(split.label_mask, bool)
  if task_type == "classification":
    labels = labels.astype(np.int32)
  else:
    labels = labels.astype(np.float32).reshape(len(split), -1)
    mask = mask.reshape(labels.shape)
    labels = np.where(mask, (labels - mean) / std, 0.0).astype(np.float32)
  return EncodedSplit(tokens, labels, mask), truncated


def encode_task(task: tasks_lib.TaskData, tokenizer, seq_len: int, mean, std) -> dict[str, EncodedSplit]:
  """Every split encoded (a line per split: size, truncations, <unk> rate); fails on an empty training split."""
  encoded = {}
  for name, split in task.splits.items():
    encoded[name], truncated = encode_split(split, tokenizer, seq_len, task.task_type, mean, std)
    unk = float(np.mean(encoded[name].tokens[encoded[name].tokens != vocab.PAD] == vocab.UNK))
    note(f"{name}: {len(split)} examples, {truncated} truncated to seq_len={seq_len}, {unk:.2%} <unk> tokens")
  if len(encoded["train"]) == 0:
    raise ValueError(f"task {task.name} has an empty training split")
  return encoded


def _filler_tokens(rows: int, seq_len: int) -> np.ndarray:
  """`<s> </s> <pad>...` rows that pad a batch (their labels are masked out)."""
  tokens = np.full((rows, seq_len), vocab.PAD, np.int32)
  tokens[:, 0], tokens[:, 1] = vocab.BOS, vocab.EOS
  return tokens


def make_batch(split: EncodedSplit, indices: np.ndarray, batch_size: int) -> dict:
  """Rows `indices` of `split`, padded to batch_size with filler rows whose label mask is False."""
  fill = batch_size - len(indices)
  tokens, labels, mask = split.tokens[indices], split.labels[indices], split.mask[indices]
  if fill:
    tokens = np.concatenate([tokens, _filler_tokens(fill, tokens.shape[1])])
    labels = np.concatenate([labels, np.zeros((fill, *labels.shape[1:]), labels.dtype)])
    mask = np.concatenate([mask, np.zeros((fill, *mask.shape[1:]), bool)])
  return {"tokens": tokens, "labels": labels, "mask": mask}


# ----------------------------------------------------------------------------------------------
# Labelled tasks (GLUE, MoleculeNet, CSV) behind the Task protocol
# ----------------------------------------------------------------------------------------------


def loss_model(cfg, task_type: str, num_outputs: int, pooler_dropout: float, example_batch: dict) -> steps.LossModel:
  """FinetuneLoss as TrainSetup trains it; `example_batch`: one row with the structure of every batch.

  Dropout key: the step key itself, fold_in(PRNGKey(seed), step). With a pretrained encoder as the
  `init_state` override, the head is initialised on its own, `ClassificationHead.init(PRNGKey(seed))`
  (no encoder forward); without one, encoder and head come from `FinetuneLoss.init`.
  """

  def make(deterministic: bool) -> FinetuneLoss:
    return FinetuneLoss(cfg, num_outputs, pooler_dropout, deterministic, task_type)

  def with_new_head(params, override, rng):
    head = ClassificationHead(cfg, num_outputs).init(rng, jnp.zeros((1, cfg.d_model)))["params"]
    return steps.replace_subtrees({**params, "head": nn.meta.unbox(head)}, override)

  return steps.LossModel(make, example_batch, rngs=lambda key: (key, key), init_override=with_new_head)


@dataclasses.dataclass
class LabelledTask:
  """A TaskData (one label vector per example) as a Task: a `<s>` head (finetune/model.py), the task's metrics.

  mean, std: (C,) regression target statistics (zeros / ones otherwise; `target_stats`).
  """

  data: tasks_lib.TaskData
  mean: np.ndarray
  std: np.ndarray
  pooler_dropout: float = 0.1

  name = property(lambda self: self.data.name)
  task_type = property(lambda self: self.data.task_type)
  metrics = property(lambda self: self.data.metrics)
  main_metric = property(lambda self: self.data.main_metric)
  selection_split = property(lambda self: self.data.selection_split)
  report_splits = property(lambda self: self.data.report_splits)

  def summary(self) -> str:
    return self.data.summary()

  def tokenizer_corpus(self) -> tuple[list[str], str]:
    texts = self.data.splits["train"].texts
    flat = [t for pair in texts for t in (pair if isinstance(pair, tuple) else (pair,))]
    return flat, "text" if self.data.name in tasks_lib.GLUE_TASKS else "smiles"

  def fit_to_length(self, init, config) -> tuple["LabelledTask", dict]:
    data, report = lengths_lib.fit_to_length(self.data, init, config)
    return dataclasses.replace(self, data=data), report

  def encode(self, tokenizer, seq_len: int) -> dict[str, EncodedSplit]:
    return encode_task(self.data, tokenizer, seq_len, self.mean, self.std)

  def loss_model(self, model_config, train: EncodedSplit) -> steps.LossModel:
    return loss_model(model_config, self.data.task_type, self.data.num_outputs, self.pooler_dropout,
                      train.batch(np.arange(0), 1))

  def score(self, split: str, outputs: np.ndarray) -> dict[str, float]:
    return results_lib.score(self.data, split, outputs, self.mean, self.std)

  def write_predictions(self, directory, split: str, outputs: np.ndarray) -> None:
    del directory, split, outputs  # the scores in result.json are these tasks' record

  def info(self) -> dict:
    task = self.data
    return {"name": task.name, "task_type": task.task_type, "num_outputs": task.num_outputs,
            "label_names": list(task.label_names), "metrics": list(task.metrics), "main_metric": task.main_metric,
            "selection_split": task.selection_split, "report_splits": list(task.report_splits),
            "split_sizes": {k: len(v) for k, v in task.splits.items()},
            "invalid_smiles": results_lib.invalid_smiles(task), "target_mean": self.mean.tolist(),
            "target_std": self.std.tolist()}

  def results_info(self) -> dict:
    return {"invalid_smiles": results_lib.invalid_smiles(self.data)}

  def sources(self) -> list[str]:
    return list(dict.fromkeys(s for split in self.data.splits.values() for s in split.provenance.sources))

  def head_flops(self, d_model: int, seq_len: int) -> float:
    """The `<s>` head: dense D->D, then D->C (finetune/model.py ClassificationHead); 2 FLOPs per multiply-add."""
    del seq_len
    return float(2 * d_model * d_model + 2 * d_model * self.data.num_outputs)
