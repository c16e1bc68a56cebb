"""`launch/compare.py --dry_run`: FLOPs and wall time of every run of a plan from ONE measured step per distinct
pretraining config, before anything is spent.

Per distinct pretraining config (arms that differ only in total_steps / budget, such as MLM and MLM++, share
one): the pipeline opens the data (no workdir is written: the tokenizer comes from the data-side cache), the
train step is compiled and timed on a real batch (the median of `timed_steps` after one warm-up step). A run's
estimate is then setup + compile + steps x step time + its evaluations (eval_batches forward passes of about a
third of a step each, every eval_every steps), plus the measured start-up of a fresh interpreter. Fine-tuning is extrapolated from the same measurement: the
encoder's training FLOPs per example (models/flops.py) at the fine-tuning length times the arm's measured
seconds per FLOP, plus the selection-split forward passes and one compile per seed.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax

from exlm_jax.finetune import lengths
from exlm_jax.models import flops as model_flops

# Fields that change a run's length or bookkeeping, not its step: left out of the "distinct config" key.
_NOT_STEP = ("total_steps", "budget", "matched_to", "warmup_steps", "log_every", "eval_every", "eval_batches",
             "checkpoint_every", "keep_checkpoints", "profile_start_step", "profile_num_steps", "async_checkpointing")


def step_key(config) -> str:
  """The canonical JSON of a config without the fields in `_NOT_STEP`."""
  return json.dumps({k: v for k, v in config.to_dict().items() if k not in _NOT_STEP}, sort_keys=True, default=str)


def measure_step(config, timed_steps: int = 2) -> dict:
  """Opens the data, compiles and times the train step of a pretraining `config` (nothing is written)."""
  from exlm_jax.train import loop, steps  # pylint: disable=g-import-not-at-top
  from exlm_jax.train import flops  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  data, resolved, setup, _ = loop.prepare(config, None)
  prepared = time.perf_counter()
  compiled = setup.compile_train_step()
  compiled_at = time.perf_counter()
  state = setup.init_state()
  batch = setup.shard_batch(steps.pipeline_batch(next(data.train_iterator()), data.packing))
  times = []
  for _ in range(timed_steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return {"setup_s": prepared - started, "compile_s": compiled_at - prepared,
          "step_s": statistics.median(times[1:]), "flops_per_step": float(flops.train_flops_per_step(resolved)),
          "total_steps": int(resolved.total_steps), "slot_utilisation": float(data.summary.get("slot_utilisation", 1.0)),
          "max_example_len": int(data.summary.get("max_example_len") or resolved.seq_len),
          "tokens_per_step": int(resolved.batch_size * resolved.seq_len), "model": resolved.model.to_dict(),
          "max_examples_per_block": resolved.data.get("max_examples_per_block")}


def pretrain_estimate(config, m: dict) -> dict:
  """FLOPs, real tokens and wall seconds of a pretraining run of `config` (total_steps resolved in `m` when the
  budget is equal_flops)."""
  steps = m["total_steps"]
  evals = math.ceil(steps / config.eval_every) * config.eval_batches
  wall = m["setup_s"] + m["compile_s"] + steps * m["step_s"] + evals * m["step_s"] / 3
  return {"steps": steps, "flops": steps * m["flops_per_step"],
          "real_tokens": steps * m["tokens_per_step"] * m["slot_utilisation"], "wall_s": wall}


def finetune_estimate(ft_config, split_sizes: dict, m: dict) -> dict:
  """Fine-tuning FLOPs and wall seconds extrapolated from the arm's measured pretraining step `m`."""
  model = m["model"]
  seq_len = int(ft_config.seq_len) if int(ft_config.seq_len) > 0 else lengths.round_up(m["max_example_len"])
  n_train = split_sizes["train"]
  if ft_config.data.max_train_examples > 0:
    n_train = min(n_train, ft_config.data.max_train_examples)
  n_eval = {k: v for k, v in split_sizes.items() if k != "train"}
  if ft_config.data.max_eval_examples > 0:
    n_eval = {k: min(v, ft_config.data.max_eval_examples) for k, v in n_eval.items()}
  steps_per_epoch = math.ceil(n_train / ft_config.batch_size)
  steps = steps_per_epoch * ft_config.num_epochs
  train = model_flops.encoder_train(seq_len, model["num_layers"], model["d_model"], model["mlp_dim"]) * \
      ft_config.batch_size * steps
  forward = model_flops.encoder_forward(seq_len, model["num_layers"], model["d_model"], model["mlp_dim"])
  evals = ft_config.num_epochs * max(ft_config.evals_per_epoch, 1) * sum(n_eval.values()) * forward
  per_seed = train + evals
  seconds_per_flop = m["step_s"] / m["flops_per_step"]
  seeds = len(ft_config.seeds)
  wall = m["setup_s"] + seeds * (per_seed * seconds_per_flop + m["compile_s"])
  return {"steps": steps * seeds, "flops": per_seed * seeds, "real_tokens": None, "wall_s": wall, "seq_len": seq_len}


def split_sizes(ft_config) -> dict:
  """{split: examples} of a fine-tuning task (its data only; no model)."""
  from exlm_jax.finetune import data as data_lib  # pylint: disable=g-import-not-at-top
  task = data_lib.load_task_data(ft_config)
  return {name: len(split.labels) for name, split in task.splits.items()}


def estimate(plan: dict, load_config: Callable, say: Callable[[str], None] = print) -> dict:
  """{run name: estimate} for every pretraining and fine-tuning run of `plan`, plus 'measured' (one row per
  distinct config) and 'total_wall_s'. `load_config(spec, ['--config.k=v', ...])` is main.py's."""
  from exlm_jax.train import reporting  # pylint: disable=g-import-not-at-top
  reporting.quiet_library_logs()
  startup = process_startup_s()
  measured, by_key, out = {}, {}, {}
  configs = {}
  for run in plan["runs"]:
    if run["kind"] != "pretrain":
      continue
    spec, overrides = run["args"][1], run["args"][4:]
    config = load_config(spec, overrides)
    configs[run["arm"]] = config
    key = step_key(config)
    if key not in by_key:
      say(f"[compare] dry run: compiling and timing one {config.objective} step ({run['arm']}) ...")
      by_key[key] = measure_step(config)
      measured[run["arm"]] = {k: v for k, v in by_key[key].items() if k != "model"}
    m = dict(by_key[key])
    if config.get("budget", "steps") != "steps":  # MLM++: its own resolved horizon at the same step time
      from exlm_jax.train import flops  # pylint: disable=g-import-not-at-top
      resolved = flops.resolve_budget(_with_vocab(config, m))
      m["total_steps"] = int(resolved.total_steps)
    else:
      m["total_steps"] = int(config.total_steps)
    out[run["name"]] = {"kind": "pretrain", "arm": run["arm"], **pretrain_estimate(config, m)}
    out[run["name"]]["wall_s"] += startup
    out[run["name"]]["_m"] = m
  sizes = {}
  for run in plan["runs"]:
    if run["kind"] != "finetune":
      continue
    ft = load_config(run["args"][1], run["args"][4:])
    if run["task"] not in sizes:
      sizes[run["task"]] = split_sizes(ft)
    m = out[f"pretrain/{run['name'].split('/')[1]}"]["_m"]
    out[run["name"]] = {"kind": "finetune", "arm": run["arm"], "task": run["task"],
                        **finetune_estimate(ft, sizes[run["task"]], m)}
    out[run["name"]]["wall_s"] += startup
  for row in out.values():
    row.pop("_m", None)
  return {"runs": out, "measured": measured, "total_wall_s": sum(r["wall_s"] for r in out.values()),
          "split_sizes": sizes, "process_startup_s": startup}


def process_startup_s() -> float:
  """Seconds a fresh interpreter takes to import the trainer (every run is its own main.py process)."""
  started = time.perf_counter()
  subprocess.run([sys.executable, "-c", "import exlm_jax.train.loop, exlm_jax.finetune.loop"], check=False,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - started


def _with_vocab(config, m: dict):
  """`config` with the vocabulary (and packing bound) the measured run resolved, for `flops.resolve_budget`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.vocab_size = int(m["model"]["vocab_size"])
  if m.get("max_examples_per_block") and "max_examples_per_block" in out.data:
    out.data.max_examples_per_block = m["max_examples_per_block"]
  return out
