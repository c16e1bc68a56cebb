"""Orbax checkpoints: train state + per-process Grain iterator state, async, keep last N.

Restore always goes through an abstract state that carries the TARGET shardings, so a checkpoint
written on one mesh restores onto another (different device count or axis sizes).
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


def make_manager(directory: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      create=True,
      enable_async_checkpointing=bool(config.async_checkpointing),
  )
  handlers = {"state": ocp.StandardCheckpointHandler(), "data_iter": grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(epath.Path(directory).absolute(), item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None, force: bool = False) -> bool:
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state, data_iter=None, step: int | None = None):
  """Restores (state, step) onto the shardings in `abstract_state`; the iterator in place."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    saved = manager.item_metadata(step)
    if saved is not None and "data_iter" in saved and saved["data_iter"] is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    else:
      log.warning("checkpoint %d has no data-iterator state; the input pipeline restarts", step)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], step


def latest_checkpoint_dir(path: str) -> epath.Path:
  """The checkpoints/ folder of a workdir (or the folder itself); a clear error when there is none."""
  path = epath.Path(path).absolute()
  for directory in (path / "checkpoints", path):
    if directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir()):
      return directory
  raise FileNotFoundError(f"{path} holds no checkpoint: pass a workdir written by main.py or its "
                          "checkpoints/ folder")


def restore_params(path: str, sharding=None):
  """(params, step) of the latest checkpoint under `path` (a workdir or its checkpoints/ folder).

  Every array is placed with `sharding` (default: the first local device), whatever mesh wrote it.
  """
  manager = ocp.CheckpointManager(latest_checkpoint_dir(path),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  step = manager.latest_step()
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = manager.item_metadata(step)["state"]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  return restored["state"]["params"], step


def write_json(path: str, payload) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=str)
