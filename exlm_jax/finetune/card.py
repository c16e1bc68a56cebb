"""The run card of a fine-tuning workdir (exlm_jax/run_card.py, kind='finetune').

What each field is for a fine-tuning run:
  objective    the pretraining objective of `init_from` (None for a random encoder)
  encoder      the fine-tuned encoder (the pretrained architecture with config.model's overrides)
  data         the task data: path = its source files (';'-joined), content_sha256 = sha256 of their bytes in that
               order (None when one is not a local file, e.g. TFDS), records = training examples (after subsampling
               and data.overlong), max_example_len = the longest training input as encoded (slots, <= seq_len)
  steps        optimizer steps summed over the seeds (each seed is one fine-tuning of the same encoder)
  real_tokens_seen  non-padding training tokens (filler rows excluded), summed over sessions
  train_flops  steps * (encoder training FLOPs on seq_len slots + the head's), models/flops.py conventions
  wall_time_s  summed over resumes (a rerun that only reuses finished seeds adds its own short session)
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import ml_collections
import numpy as np

from exlm_jax import run_card
from exlm_jax.data import vocab
from exlm_jax.models import flops as flops_lib

_CHUNK = 1 << 20


def content_sha256(sources: list[str]) -> str | None:
  """sha256 of the files' bytes concatenated in order; None when one is not a local file."""
  paths = [pathlib.Path(s) for s in sources]
  if not paths or not all(p.is_file() for p in paths):
    return None
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(_CHUNK), b""):  # pylint: disable=cell-var-from-loop
        digest.update(chunk)
  return digest.hexdigest()


def data_summary(task, init, train_tokens: np.ndarray) -> dict:
  """The keys run_card.build_card reads, for the task data; train_tokens: (N, L) the encoded training split."""
  sources = task.sources()
  lengths = (train_tokens != vocab.PAD).sum(axis=1)
  return {"source": ";".join(sources) or None, "content_sha256": content_sha256(sources),
          "tokenizer": getattr(init.tokenizer, "kind", type(init.tokenizer).__name__),
          "vocab_size": int(init.model_config.vocab_size), "train_records": int(len(train_tokens)),
          "max_example_len": int(lengths.max(initial=0))}


def flops_per_step(model_config, batch_size: int, seq_len: int, head_flops: float) -> float:
  """Training FLOPs of one step: the encoder on batch_size x seq_len slots and the task's head (`head_flops`: its
  forward FLOPs per row, `Task.head_flops`), 3x forward (models/flops.py conventions)."""
  model = ml_collections.ConfigDict(dataclasses.asdict(model_config))
  return float(batch_size * (flops_lib.model_encoder_train(model, seq_len, False) + 3 * head_flops))


def write(workdir, config, init, task, train_tokens: np.ndarray, per_seed: list[dict], seeds_trained: int,
          wall_time_s: float) -> dict:
  """Writes <workdir>/run_card.json (kind 'finetune') on top of the previous card; returns it.

  per_seed: every seed's result (reused ones included); seeds_trained: how many this session trained;
  wall_time_s: this session's.
  """
  card_config = {"objective": init.objective or None, "model": dataclasses.asdict(init.model_config),
                 "batch_size": int(config.batch_size), "seq_len": int(config.seq_len)}
  real_tokens = int((train_tokens != vocab.PAD).sum()) * int(config.num_epochs) * seeds_trained
  perf = {"step": sum(int(r["total_steps"]) for r in per_seed), "wall_time_s": wall_time_s,
          "real_tokens_seen": real_tokens,
          "flops_per_step": flops_per_step(init.model_config, config.batch_size, config.seq_len,
                                           task.head_flops(init.model_config.d_model, config.seq_len))}
  return run_card.update_card(workdir, "finetune", card_config, data_summary(task, init, train_tokens), perf)
