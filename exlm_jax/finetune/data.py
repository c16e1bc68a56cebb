"""Fine-tuning data: the task's splits (subsampled as configured), tokenized into `<s> A </s> </s> B </s>`
blocks with their labels, and fixed-size batches padded with filler rows whose labels are masked out."""

from __future__ import annotations

import dataclasses

import numpy as np

from exlm_jax.data import vocab
from exlm_jax.finetune import tasks as tasks_lib
from exlm_jax.finetune.config import label_columns
from exlm_jax.finetune.encoding import encode_examples
from exlm_jax.train.reporting import note


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
