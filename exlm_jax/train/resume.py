"""Rerunning pretraining into a workdir that already holds a run: nothing to do, or what may change.

Checked before anything is written (train/loop.py):
  * a finished run -- final_metrics.json at step >= total_steps and not preempted -- is left byte-identical
    (`finished_run`); a larger total_steps continues it;
  * the new config is compared with the saved config.json (`check_config`). Keys in `RESUMABLE` may
    change: they decide how long, how often and on which devices the run goes on, not what it learns
    from. They are recorded (`record_config`: config.json rewritten, the change appended to
    config_history.json). Any other difference -- objective and its block (exlm / maelm / mlm), mask_prob,
    any model field that shapes the parameters or the maths, seq_len, batch_size (the data iterator
    counts global batches, so another size would read other rows), seed (masks, dropout and data order),
    any data field (source, tokenizer, workers) -- is refused in one line naming the differing keys: the
    checkpoint, the data stream or the objective would no longer match what was trained.
  * grad_clip_norm may change between positive values; switching clipping on or off is refused (it adds or
    drops a stage of the optimizer state, so the checkpoint would not restore).
Fine-tuning has its own rule: a finished seed is reused only by the same config (its fingerprint).
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import pathlib

from exlm_jax import run_store

RESUMABLE = (
    # length, reporting, evaluation and checkpoint cadence
    "total_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
    "async_checkpointing", "profile_start_step", "profile_num_steps",
    # optimisation: how a diverged run goes on from its last good checkpoint (grad_clip_norm: see above)
    "learning_rate", "lr_schedule", "warmup_steps", "adam_b1", "adam_b2", "adam_eps", "weight_decay",
    "grad_clip_norm",
    # layout and speed: same parameters, same data stream (checkpoints restore onto any mesh)
    "mesh.*", "sharding", "sharding_tolerance", "logical_axis_rules", "grad_accum_steps", "model.remat",
    "model.attention_impl", "model.dtype", "data.prefetch_batches", "data.tfds_dir",
)
_DERIVED = ("model.vocab_size", "data.max_examples_per_block")  # filled by the data (vocabulary; -1 = the
# packing bound a greedy pass finds): compared once the new config has the value (> 0)
_ABSENT = "<absent>"
_SHOWN_KEYS = 6


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
  """{dotted key: (saved value, new value)} of every key that differs (absent on one side included)."""
  old, now = _flatten(saved), _flatten(new)
  changes = {}
  for key in sorted(old.keys() | now.keys()):
    before, after = old.get(key, _ABSENT), now.get(key, _ABSENT)
    if key in _DERIVED and (not isinstance(after, int) or after <= 0):
      continue
    if before != after:
      changes[key] = (before, after)
  return changes


def _resumable(key: str, before, after) -> bool:
  if key == "grad_clip_norm":
    return (float(before or 0) > 0) == (float(after or 0) > 0)
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE)


def shown(changes: dict) -> str:
  text = ", ".join(f"{k} {json.dumps(b)} -> {json.dumps(a)}" for k, (b, a) in list(changes.items())[:_SHOWN_KEYS])
  return text + (f" and {len(changes) - _SHOWN_KEYS} more" if len(changes) > _SHOWN_KEYS else "")


def check_config(workdir, config) -> dict[str, tuple]:
  """The resumable changes of `config` against workdir/config.json; a one-line ValueError naming the keys
  when any change is not resumable (nothing is written either way). {} for a workdir without a checkpoint:
  nothing was trained yet (e.g. a run that stopped at the memory check), so any config may start there."""
  path = pathlib.Path(workdir) / run_store.CONFIG_FILE
  if not path.is_file() or not run_store.has_steps(pathlib.Path(workdir) / run_store.CHECKPOINTS_DIR):
    return {}
  saved = run_store.read_config(workdir)
  changes = config_changes(saved, run_store.as_json(config.to_dict()))
  refused = {k: v for k, v in changes.items() if not _resumable(k, *v)}
  if refused:
    raise ValueError(
        f"{workdir} holds a run with another config: {shown(refused)}; these cannot change when resuming "
        f"(the checkpoints, data stream or objective would not match): use a fresh --workdir, or rerun with the "
        f"values in {path}")
  return changes


def record_config(workdir, config, changes: dict[str, tuple], resumed_from: int | None) -> None:
  """Writes config.json (the config this run trains with) and, for a resume that changed resumable keys,
  appends {time, resumed_from_step, changes: {key: [old, new]}} to config_history.json."""
  workdir = pathlib.Path(workdir)
  if changes and resumed_from is not None:
    path = workdir / run_store.CONFIG_HISTORY_FILE
    history = run_store.read_json(path) if path.is_file() else []
    history.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "resumed_from_step": resumed_from, "changes": {k: list(v) for k, v in changes.items()}})
    run_store.write_json(path, history)
  run_store.write_json(workdir / run_store.CONFIG_FILE, config.to_dict())


def finished_run(workdir, total_steps: int) -> dict | None:
  """final_metrics.json of a run that already reached `total_steps` (and was not preempted), else None."""
  path = pathlib.Path(workdir) / run_store.FINAL_METRICS_FILE
  if not path.is_file():
    return None
  final = run_store.read_json(path)
  if final.get("preempted") or int(final.get("step", -1)) < total_steps:
    return None
  return final
