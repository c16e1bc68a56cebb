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
Reading a finished run back (params only, any path form) is exlm_jax/run_store.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from exlm_jax.run_store import write_json  # noqa: F401  (the trainers' JSON writer: atomic, process 0 only)

log = logging.getLogger(__name__)

STATE, DATA_ITER = "state", "data_iter"


# ----------------------------------------------------------------------------------------------
# Data-iterator item: Grain's per-process JSON files, restorable onto another process count
# ----------------------------------------------------------------------------------------------

def _process_file(directory: epath.Path, index: int, count: int) -> epath.Path:
  return directory / f"process_{index}-of-{count}.json"


def saved_iterator_states(directory) -> dict[str, Any]:
  """{file name: parsed state} of a checkpoint's data_iter folder."""
  directory = epath.Path(directory)
  return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("process_*-of-*.json"))}


def iterator_state_for_process(directory, index: int, count: int) -> Any:
  """The state process `index` of `count` should resume from; a one-line ValueError when there is none."""
  directory = epath.Path(directory)
  own = _process_file(directory, index, count)
  if own.exists():
    return json.loads(own.read_text())
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
  """Restores (state, step) onto the shardings in `abstract_state`; the iterator in place."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    if _has_item(manager, step, DATA_ITER):
      items[DATA_ITER] = DataIterRestore(data_iter)
    else:
      log.warning("checkpoint %d has no data-iterator state; the input pipeline restarts", step)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], step
