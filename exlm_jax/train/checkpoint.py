"""Orbax checkpoints: train state + per-process Grain iterator state, async, keep last N.

Restore always goes through an abstract state that carries the TARGET shardings, so a checkpoint
written on one mesh restores onto another (different device count, axis sizes or process count).

The data-iterator item holds one JSON file per process (`process_{i}-of-{n}.json`, Grain's
format). Resuming with a different process count works when every saved process recorded the same
position (the pipeline's state `{'next_index': t}` counts GLOBAL batches: process p of P reads its
rows of global batch t, for any P), and fails with a one-line reason otherwise (e.g. Grain worker
processes, whose state is per-worker).

Async saves: an error in a background save is raised at the next `save` (Orbax waits for the
previous save first) or by `finish`; always call `finish(manager)` before the process exits.

Damaged checkpoints: `restore` walks back from the newest step to the newest one that restores cleanly.
A newer step that failed (a truncated or zero-filled array file, no state/, a truncated data_iter JSON) is
then known to be damaged -- an older step restored onto the same target -- and is MOVED (never deleted)
to `checkpoints/corrupt/<step>-<UTC time>` with a one-line warning; Orbax only sees integer-named folders
as steps, so corrupt/ is neither restored nor rotated. When no step restores, nothing is moved (the
cause may be the target, e.g. another model size) and the error is one line naming the folder.
Reading a finished run back (params only, any path form) is exlm_jax/run_store.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from exlm_jax.run_store import error_summary
from exlm_jax.run_store import write_json  # noqa: F401  (the trainers' JSON writer: atomic, process 0 only)
from exlm_jax.train.reporting import note

log = logging.getLogger(__name__)

STATE, DATA_ITER = "state", "data_iter"
CORRUPT_DIR = "corrupt"


# ----------------------------------------------------------------------------------------------
# Data-iterator item: Grain's per-process JSON files, restorable onto another process count
# ----------------------------------------------------------------------------------------------

def _process_file(directory: epath.Path, index: int, count: int) -> epath.Path:
  return directory / f"process_{index}-of-{count}.json"


def _read_state(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): this checkpoint's data-iterator state is damaged") from None


def saved_iterator_states(directory) -> dict[str, Any]:
  """{file name: parsed state} of a checkpoint's data_iter folder."""
  directory = epath.Path(directory)
  return {p.name: _read_state(p) for p in sorted(directory.glob("process_*-of-*.json"))}


def iterator_state_for_process(directory, index: int, count: int) -> Any:
  """The state process `index` of `count` should resume from; a one-line ValueError when there is none."""
  directory = epath.Path(directory)
  own = _process_file(directory, index, count)
  if own.exists():
    return _read_state(own)
  saved = saved_iterator_states(directory)
  if not saved:
    raise FileNotFoundError(f"{directory} holds no data-iterator state (process_*-of-*.json)")
  counts = sorted({name.rsplit("-of-", 1)[1].removesuffix(".json") for name in saved})
  states = list(saved.values())
  if len(counts) == 1 and all(s == states[0] for s in states) and set(states[0]) == {"next_index"}:
    log.info("data iterator: saved by %s processes, resuming on %d at global batch %s", counts[0], count,
             states[0]["next_index"])
    return states[0]
  raise ValueError(
      f"data-iterator state in {directory} was saved by {'/'.join(counts)} process(es) and this run has "
      f"{count}; the saved positions differ per process ({len(set(json.dumps(s) for s in states))} distinct, "
      "e.g. Grain worker processes), so they cannot be mapped -- resume with the saved process count, or "
      "with data.num_workers=0 on both runs")


class DataIterHandler(grain.checkpoint.CheckpointHandler):
  """Grain's handler, plus restore onto a different process count (see the module docstring)."""

  def restore(self, directory: epath.Path, item=None, args=None):
    item = item or args.item
    state = iterator_state_for_process(directory, jax.process_index(), jax.process_count())
    item.set_state(state)
    if hasattr(item, "start_prefetch"):
      item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
  item: Any


# ----------------------------------------------------------------------------------------------
# Manager, save, restore
# ----------------------------------------------------------------------------------------------

def make_manager(directory: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      create=True,
      enable_async_checkpointing=bool(config.async_checkpointing),
  )
  handlers = {STATE: ocp.StandardCheckpointHandler(), DATA_ITER: DataIterHandler()}
  return ocp.CheckpointManager(epath.Path(directory).absolute(), item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None, force: bool = False) -> bool:
  """Starts saving `step` (async when configured); first raises any error of an earlier async save."""
  manager.check_for_errors()
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iter is not None:
    items[DATA_ITER] = DataIterSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for in-flight saves (raising their errors) and closes the manager; call before exiting."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  finally:
    manager.close()


@contextlib.contextmanager
def finishing(manager: ocp.CheckpointManager):
  """`with finishing(manager):` -- `finish` on the way out; the loop's own exception wins over a save's."""
  try:
    yield manager
  except BaseException:
    try:
      finish(manager)
    except Exception as e:  # pylint: disable=broad-except
      log.error("checkpoint save also failed while handling an error: %s", e)
    raise
  finish(manager)


def _has_item(manager: ocp.CheckpointManager, step: int, name: str) -> bool:
  return (epath.Path(manager.directory) / str(step) / name).is_dir()


def restore(manager: ocp.CheckpointManager, abstract_state, data_iter=None, step: int | None = None):
  """Restores (state, step) onto the shardings in `abstract_state`; the iterator in place.

  step None: the newest step that restores cleanly, newer damaged ones moved aside (module docstring).
  """
  if step is not None:
    return _restore_step(manager, step, abstract_state, data_iter), step
  candidates = sorted(manager.all_steps(), reverse=True)
  if not candidates:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  failures = []  # (step, error summary), newest first
  for candidate in candidates:
    try:
      state = _restore_step(manager, candidate, abstract_state, data_iter)
    except Exception as e:  # pylint: disable=broad-except  (any damage: Orbax, TensorStore, JSON, OS errors)
      error = e
    else:
      error = None
    if not _all_processes_agree(error is None):
      failures.append((candidate, error_summary(error) if error else "failed on another process"))
      continue
    for bad, why in failures:
      destination = move_aside(manager, bad)
      note(f"WARNING: checkpoint step {bad} does not restore ({why}); moved it to {destination}, resuming from "
           f"step {candidate}")
    if failures:
      manager.reload()
    return state, candidate
  newest, why = failures[0]
  raise ValueError(
      f"no checkpoint in {manager.directory} restores (steps {', '.join(str(s) for s, _ in failures)}; newest: "
      f"{why}): if the config changed, rerun with the saved config.json; otherwise use a fresh --workdir")


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    if _has_item(manager, step, DATA_ITER):
      items[DATA_ITER] = DataIterRestore(data_iter)
    else:
      log.warning("checkpoint %d has no data-iterator state; the input pipeline restarts", step)
  return manager.restore(step, args=ocp.args.Composite(**items))[STATE]


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one process's unreadable shard makes the step bad for all)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves checkpoint `step` to <directory>/corrupt/<step>-<UTC time> (process 0; all processes wait)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  destination = epath.Path(manager.directory) / CORRUPT_DIR / f"{step}-{stamp}"
  if jax.process_index() == 0:
    destination.parent.mkdir(parents=True, exist_ok=True)
    (epath.Path(manager.directory) / str(step)).rename(destination)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"exlm_jax: checkpoint {step} moved aside")
  return destination
