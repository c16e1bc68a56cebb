"""The run store: what a workdir written by main.py holds, and how to find and read it back.

Layout (pretraining and fine-tuning alike):
  <workdir>/config.json            the run's resolved config (pretraining: `model.vocab_size` set from the tokenizer)
  <workdir>/tokenizer/             the tokenizer the run trained with
  <workdir>/checkpoints/<step>/    Orbax checkpoints, item 'state' (+ 'data_iter' in pretraining)
  <workdir>/final_metrics.json     written when the run finishes
  <workdir>/run_card.json          what the run was (encoder, data, budget, steps, FLOPs): exlm_jax/run_card.py
  <workdir>/config_history.json    pretraining: what each resume changed in config.json (train/resume.py)
  <workdir>/checkpoints/corrupt/   steps that failed to restore, moved aside (train/checkpoint.py)
  <workdir>/.lock                  held while a run writes the workdir (train/workdir_lock.py)
fine-tuning only:
  <workdir>/task.json              the task (type, outputs, label statistics, pretraining objective)
  <workdir>/results.json           per-seed results and the best validation seed ('best_seed')
  <workdir>/seed_<s>/checkpoints/  the best params of seed s

`resolve_run` accepts a workdir, its checkpoints/ folder, one checkpoints/<step> folder or a fine-tuning
seed folder; `restore_params` reads only the params of a checkpoint (never the optimizer state), the
newest one that reads cleanly (damaged newer steps are named in a warning and left where they are);
`write_json` is the one JSON writer (atomic, process 0 only). Every user of a workdir -- the trainers,
fine-tuning, the analyses and `exlm_jax.load` -- goes through this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from exlm_jax import config_lib
from exlm_jax.models.encoder import ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TASK_FILE = "task.json"
RESULTS_FILE = "results.json"
FINAL_METRICS_FILE = "final_metrics.json"
RUN_CARD_FILE = "run_card.json"
CONFIG_HISTORY_FILE = "config_history.json"
LOCK_FILE = ".lock"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
SEED_PREFIX = "seed_"
PRETRAIN, FINETUNE = "pretrain", "finetune"


def seed_dir(workdir, seed: int) -> pathlib.Path:
  """<workdir>/seed_<seed>: one fine-tuning seed's folder."""
  return pathlib.Path(workdir) / f"{SEED_PREFIX}{seed}"


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------


def read_json(path) -> dict:
  with open(path) as f:
    return json.load(f)


def _jsonable(x):
  """json.dump's `default`: numpy scalars and arrays as Python values, anything else as its str()."""
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return str(x)


def as_json(payload):
  """`payload` as write_json stores it and read_json gives it back (tuples as lists, numpy as Python values)."""
  return json.loads(json.dumps(payload, default=_jsonable))


def write_json(path, payload) -> None:
  """Writes `payload` to `path` (indented, keys sorted) on process 0 only; atomic: written to a temporary
  file beside it and renamed into place, so a reader never sees half a file."""
  if jax.process_index() != 0:
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(temporary, "w") as f:
      json.dump(payload, f, indent=2, sort_keys=True, default=_jsonable)
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Finding a run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunLocation:
  """Where a run's pieces are. kind: PRETRAIN | FINETUNE; step None = the latest checkpoint."""

  workdir: pathlib.Path
  checkpoint_dir: pathlib.Path
  step: int | None
  kind: str
  seed: int | None = None


def _is_step_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and path.name.isdigit()


def has_steps(path: pathlib.Path) -> bool:
  return path.is_dir() and any(_is_step_dir(p) for p in path.iterdir())


def _seed_of(path: pathlib.Path) -> int:
  return int(path.name[len(SEED_PREFIX):])


def _finetune_seed(workdir: pathlib.Path, seed: int | None) -> int:
  """The requested seed, else the best validation seed from results.json, else the first seed folder."""
  seeds = sorted(_seed_of(p) for p in workdir.glob(f"{SEED_PREFIX}*") if p.name[len(SEED_PREFIX):].isdigit()
                 and has_steps(p / CHECKPOINTS_DIR))
  if seed is not None:
    if seed not in seeds:
      raise FileNotFoundError(f"{workdir} has no checkpoint for seed {seed}; seeds with checkpoints: {seeds}")
    return seed
  if (workdir / RESULTS_FILE).is_file():
    best = read_json(workdir / RESULTS_FILE).get("best_seed")
    if best in seeds:
      return best
  if not seeds:
    raise FileNotFoundError(f"{workdir} is a fine-tuning workdir without checkpoints (no seed_<s>/checkpoints/<step>); "
                            "has the run finished its first seed, with save_checkpoints=True?")
  return seeds[0]


def resolve_run(path, seed: int | None = None) -> RunLocation:
  """Finds config, tokenizer and checkpoint folder for any of the path forms in the module docstring.

  seed: fine-tuning workdirs only; default = the best validation seed in results.json.
  """
  path = pathlib.Path(path).expanduser().absolute()
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; pass a workdir written by main.py")
  step = None
  if _is_step_dir(path) and path.parent.name == CHECKPOINTS_DIR:
    step, path = int(path.name), path.parent  # .../checkpoints/<step>
  if path.name == CHECKPOINTS_DIR and (path.parent / CONFIG_FILE).exists():
    return _locate(path.parent, path, step, seed)
  if path.name == CHECKPOINTS_DIR and path.parent.name.startswith(SEED_PREFIX):
    return _locate(path.parent.parent, path, step, _seed_of(path.parent))
  if path.name.startswith(SEED_PREFIX) and (path.parent / CONFIG_FILE).exists():
    return _locate(path.parent, path / CHECKPOINTS_DIR, step, _seed_of(path))
  if (path / CONFIG_FILE).exists():
    return _locate(path, None, step, seed)
  raise FileNotFoundError(f"{path} holds no exlm_jax run (no {CONFIG_FILE}, no {CHECKPOINTS_DIR}/): pass a workdir "
                          "written by main.py, its checkpoints/ folder or one checkpoints/<step> folder")


def _locate(workdir: pathlib.Path, checkpoint_dir: pathlib.Path | None, step: int | None,
            seed: int | None) -> RunLocation:
  kind = FINETUNE if "finetune" in read_json(workdir / CONFIG_FILE) else PRETRAIN
  if checkpoint_dir is None:
    if kind == FINETUNE:
      seed = _finetune_seed(workdir, seed)
      checkpoint_dir = seed_dir(workdir, seed) / CHECKPOINTS_DIR
    else:
      checkpoint_dir = workdir / CHECKPOINTS_DIR
  if not has_steps(checkpoint_dir):
    raise FileNotFoundError(f"{workdir} has {CONFIG_FILE} but no checkpoint under {checkpoint_dir}; "
                            "let the run reach its first checkpoint (checkpoint_every) or pass another path")
  if step is not None and not (checkpoint_dir / str(step)).is_dir():
    raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir}")
  return RunLocation(workdir, checkpoint_dir, step, kind, seed)


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------


def read_config(workdir) -> dict:
  """workdir/config.json. A pretraining run saved before a `data` key existed (e.g. data.packing) gets that key's
  default from config_lib.data_config, which is how such a run was trained (absent keys were read as it)."""
  raw = read_json(pathlib.Path(workdir) / CONFIG_FILE)
  data = raw.get("data")
  if "finetune" not in raw and isinstance(data, dict) and "name" in data:
    raw["data"] = {**config_lib.data_config(data["name"]).to_dict(), **data}
  return raw


def run_config(location: RunLocation) -> ml_collections.ConfigDict:
  """The run's config.json as a ConfigDict (`read_config`)."""
  return ml_collections.ConfigDict(read_config(location.workdir))


def pretrain_objective(location: RunLocation) -> str:
  """The pretraining objective behind the run: its own (pretraining) or that of the run it was fine-tuned from."""
  if location.kind == FINETUNE:
    return read_json(location.workdir / TASK_FILE)["pretrain_objective"]
  return read_json(location.workdir / CONFIG_FILE).get("objective", "")


def read_run_card(workdir) -> dict | None:
  """<workdir>/run_card.json as written (exlm_jax/run_card.py validates it); None when the run has none."""
  path = pathlib.Path(workdir) / RUN_CARD_FILE
  return read_json(path) if path.is_file() else None


def model_config_from_run(config: dict, overrides: dict | None = None) -> ModelConfig:
  """ModelConfig from a run's config.json `model` section (vocab_size included)."""
  if "model" not in config:
    raise ValueError(f"{CONFIG_FILE} has no 'model' section; is it an exlm_jax run?")
  return ModelConfig.from_config(config["model"], **(overrides or {}))


def load_tokenizer(workdir):
  from exlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top  (sentencepiece, rdkit)
  directory = pathlib.Path(workdir) / TOKENIZER_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"{workdir} has no {TOKENIZER_DIR}/ folder; was it written by main.py?")
  return tokenizers.load(directory)


def error_summary(error: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message`, cut to `limit` characters (Orbax errors span pages)."""
  lines = str(error).strip().splitlines()
  first = lines[0].split(" See full TensorStore details")[0] if lines else ""
  text = f"{type(error).__name__}: {first}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def restore_params(checkpoint_dir, step: int | None = None, sharding: jax.sharding.Sharding | None = None
                   ) -> tuple[Any, int]:
  """(params, step) from `checkpoint_dir/<step>`: only the state's 'params' are read (a partial PyTree
  restore: the optimizer state of a pretraining checkpoint is never loaded).

  step None: the newest step that reads cleanly; a newer step that does not (a truncated or missing array
  file, no state/) is named in a warning and left in place (only the trainer moves steps aside).
  Failing that, or for an explicit `step` that does not read, a one-line ValueError naming the path.
  Every array is placed with `sharding` (default: the first local device), whatever mesh wrote it.
  """
  checkpoint_dir = pathlib.Path(checkpoint_dir).absolute()
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  manager = ocp.CheckpointManager(checkpoint_dir, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not candidates:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    failures = []  # (step, error summary), newest first
    for candidate in candidates:
      try:
        params = _read_params(manager, checkpoint_dir, candidate, sharding)
      except Exception as e:  # pylint: disable=broad-except  (any damage: Orbax, TensorStore, JSON, OS errors)
        failures.append((candidate, error_summary(e)))
        continue
      for bad, why in failures:
        log.warning("checkpoint %s/%d does not read (%s); using step %d", checkpoint_dir, bad, why, candidate)
      return params, candidate
  finally:
    manager.close()
  newest, why = failures[0]
  tried = f"; none of its {len(failures)} steps reads" if len(failures) > 1 else ""
  raise ValueError(f"checkpoint {checkpoint_dir}/{newest} cannot be read ({why}){tried}: is a run still writing it, "
                   "or was it damaged? Pass another step or workdir")


def _read_params(manager: ocp.CheckpointManager, checkpoint_dir: pathlib.Path, step: int, sharding):
  metadata = manager.item_metadata(step)["state"]
  if "params" not in metadata:
    raise ValueError(f"checkpoint {checkpoint_dir}/{step} has no 'params' in its state "
                     f"(keys {sorted(metadata)}); is it an exlm_jax checkpoint?")
  target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                   metadata["params"])}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
  return restored["state"]["params"]
