"""Fine-tuning sequence length: never silently beyond what pretraining trained.

seq_len=0 (config_lib.finetune_config's default) resolves to the longest example the `init_from` run trained
on -- `data.max_example_len` of its run card, in slots with <s> and </s> (the pipeline's records, which for
packed molecule blocks is not the block size) -- rounded up to a multiple of 8, at most the encoder's
`max_positions` for a learned table. An explicit --config.seq_len wins. init_from='' (a random encoder) and
'hf:PATH' (no run card) use config_lib.FINETUNE_FALLBACK_SEQ_LEN; a workdir without a run card (written before
cards existed) is an error asking for --config.seq_len.

Inputs longer than seq_len slots are cut (`data.overlong='truncate'`, finetune/encoding.py: at the end, pairs
longest-first) or dropped from their split (`'skip'`), and counted per split either way (`length_report`):
results.json 'lengths' and a line of results.md.

A learned position table (positions 'absolute' / 'absolute+relbias') fed real tokens at positions the
pretraining run never reached (an input longer than its max_example_len after truncation) prints one warning
line with the counts per split. rope2d computes its positions and never warns.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from exlm_jax import config_lib
from exlm_jax.finetune import tasks as tasks_lib
from exlm_jax.finetune.encoding import example_lengths
from exlm_jax.train.reporting import note

log = logging.getLogger(__name__)

FROM_PRETRAINING = 0  # the seq_len sentinel
LEARNED_POSITIONS = ("absolute", "absolute+relbias")
MULTIPLE = 8


def round_up(n: int, multiple: int = MULTIPLE) -> int:
  return -(-int(n) // multiple) * multiple


def default_seq_len(init, init_from: str) -> tuple[int, str]:
  """(seq_len, where it came from) for seq_len=0; see the module docstring."""
  cfg = init.model_config
  if init.max_example_len is not None:
    length = round_up(init.max_example_len)
    why = f"init_from's longest training example, max_example_len {init.max_example_len}, rounded up to {MULTIPLE}"
    if cfg.positions in LEARNED_POSITIONS and length > cfg.max_positions:
      length, why = cfg.max_positions, why + f", capped at max_positions {cfg.max_positions}"
    return length, why
  if init_from and not init_from.startswith("hf:"):
    raise ValueError(f"init_from={init_from} has no run_card.json giving data.max_example_len (a run written before "
                     "run cards), so the fine-tuning length cannot default to it; pass --config.seq_len=N")
  fallback = config_lib.FINETUNE_FALLBACK_SEQ_LEN
  if cfg.positions in LEARNED_POSITIONS:
    fallback = min(fallback, cfg.max_positions)
  return fallback, "the fallback without a pretraining run card (init_from='' or hf:)"


def resolve_seq_len(config, init):
  """A copy of `config` with seq_len resolved (printed with its origin); checks it against a learned table."""
  config = config.copy_and_resolve_references()
  if config.seq_len == FROM_PRETRAINING:
    with config.unlocked():
      config.seq_len, why = default_seq_len(init, config.init_from)
    note(f"seq_len {config.seq_len}: {why} (--config.seq_len=N overrides)")
  cfg = init.model_config
  if cfg.positions != "rope2d" and config.seq_len > cfg.max_positions:
    raise ValueError(f"seq_len={config.seq_len} exceeds the encoder's max_positions={cfg.max_positions}")
  return config


def length_report(task: tasks_lib.TaskData, tokenizer, seq_len: int, overlong: str,
                  trained_len: int | None) -> tuple[dict, dict[str, np.ndarray]]:
  """({split: counts}, {split: (N,) bool over-long}) before any example is cut or dropped.

  counts: examples, overlong (more than seq_len slots), truncated / skipped (the overlong ones, by `overlong`),
  overlong_share, longest (slots, untruncated) and beyond_pretraining (inputs that after truncation still reach
  positions >= trained_len; None when trained_len is unknown).
  """
  counts, masks = {}, {}
  for name, split in task.splits.items():
    lengths = example_lengths(split.texts, tokenizer)
    over = lengths > seq_len
    kept = np.minimum(lengths, seq_len) if overlong == "truncate" else lengths[~over]
    counts[name] = {
        "examples": len(split), "overlong": int(over.sum()),
        "truncated": int(over.sum()) if overlong == "truncate" else 0,
        "skipped": int(over.sum()) if overlong == "skip" else 0,
        "overlong_share": float(over.mean()) if len(split) else 0.0,
        "longest": int(lengths.max(initial=0)),
        "beyond_pretraining": None if trained_len is None else int((kept > trained_len).sum())}
    masks[name] = over
  return counts, masks


def fit_to_length(task: tasks_lib.TaskData, init, config) -> tuple[tasks_lib.TaskData, dict]:
  """(task, report): over-long inputs counted per split and, with data.overlong='skip', dropped from their split;
  a warning line when a learned position table would see positions pretraining never trained.

  report: {seq_len, overlong, trained_len, positions, splits: {split: counts}} (`length_report`), for results.json.
  """
  overlong = config.data.overlong
  counts, masks = length_report(task, init.tokenizer, config.seq_len, overlong, init.max_example_len)
  if overlong == "skip":
    splits = {name: split.take(np.flatnonzero(~masks[name]), f"{split.derivation}; {counts[name]['skipped']} "
                               f"inputs over seq_len={config.seq_len} skipped") for name, split in task.splits.items()}
    task = dataclasses.replace(task, splits=splits)
  report = {"seq_len": int(config.seq_len), "overlong": overlong, "trained_len": init.max_example_len,
            "positions": init.model_config.positions, "splits": counts}
  note(f"inputs over seq_len={config.seq_len} ({overlong}): {overlong_summary(report)}")
  warn_untrained_positions(report)
  return task, report


def overlong_summary(report: dict) -> str:
  """'train 3/1631 (0.18%), validation 0/204 (0.00%)': over-long inputs per split."""
  return ", ".join(f"{name} {c['overlong']}/{c['examples']} ({c['overlong_share']:.2%})"
                   for name, c in report["splits"].items())


def warn_untrained_positions(report: dict) -> str | None:
  """The warning line (logged and printed) when a learned table meets positions >= trained_len; else None."""
  beyond = {name: c["beyond_pretraining"] for name, c in report["splits"].items() if c["beyond_pretraining"]}
  if report["positions"] not in LEARNED_POSITIONS or not beyond:
    return None
  message = (f"learned positions ({report['positions']}) were pretrained on at most {report['trained_len']} slots but "
             f"seq_len={report['seq_len']} lets inputs reach further: "
             + ", ".join(f"{name} {n}" for name, n in beyond.items())
             + f" input(s) use untrained positions; --config.seq_len={report['trained_len']} truncates them instead")
  log.warning(message)
  note("WARNING: " + message)
  return message


def warn_untrained_window(init, seq_len: int) -> str | None:
  """The warning line for tasks whose rows are full windows of seq_len slots (SQuAD): a learned position table
  pretrained on at most max_example_len slots meets untrained positions whenever seq_len is longer."""
  trained = init.max_example_len
  if init.model_config.positions not in LEARNED_POSITIONS or trained is None or seq_len <= trained:
    return None
  message = (f"learned positions ({init.model_config.positions}) were pretrained on at most {trained} slots but "
             f"windows of seq_len={seq_len} use positions up to {seq_len - 1}; --config.seq_len={round_up(trained)} "
             "or less keeps to trained positions")
  log.warning(message)
  note("WARNING: " + message)
  return message

