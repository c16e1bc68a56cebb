"""Fine-tuning loop shared by every task (GLUE, MoleculeNet, any MoleculeNet-style CSV, SQuAD 1.1 / 2.0).

  python main.py --config configs/finetune_glue.py:task=sst2 --config.init_from=runs/mlm_text --workdir runs/ft_sst2
  python main.py --config configs/finetune_moleculenet.py:task=bbbp --config.init_from=runs/exlm_smiles --workdir runs/ft_bbbp
  python main.py --config configs/finetune_squad.py:task=squad_v2 --config.init_from=runs/maelm_text --workdir runs/ft_squad

`run(config, workdir)` (called by main.py for configs with a `finetune` section):
  1. restores the pretraining params of `config.init_from` (a workdir, its checkpoints/ folder or one
     checkpoints/<step> folder) and hands over the encoder with `objectives.get(objective).encoder_params`,
     checked leaf by leaf against the fine-tuning encoder (built from that run's config.json `model`
     section; copy index 0 everywhere, i.e. ExLM without expansion). init_from='' trains from scratch
     (finetune/handoff.py);
  2. loads the task through the registry `finetune/data.py load_task` (a `Task`: GLUE / MoleculeNet /
     CSV as `<s> A </s> </s> B </s>` blocks of `seq_len` slots with a `<s>` head; SQuAD as question +
     context windows with a span head, finetune/squad/task.py) and encodes it with the pretraining run's
     tokenizer; seq_len=0 is init_from's longest training example rounded up to 8, longer inputs are truncated
     or skipped and counted per split (`Task.fit_to_length`, finetune/lengths.py);
  3. for every seed in `config.seeds`: trains the task's loss module (`Task.loss_model`) with the one trainer
     (train/steps.py `TrainSetup`: AdamW, linear warm-up over `warmup_ratio` of the steps then linear
     decay to 0) for `num_epochs`, evaluates the selection split every `eval_every` steps (0:
     `evals_per_epoch` times per epoch), keeps the best params by the task's main metric, scores the
     report splits (test) with them, writes the task's prediction files (`Task.write_predictions`; SQuAD:
     seed_<s>/predictions_<split>.json) and saves the params (Orbax, `seed_<s>/checkpoints/<best step>`);
  4. writes results.json (per seed and mean ± sample std over seeds), results.md, final_metrics.json
     (seed means, in the pretraining loop's shape for launch/sweep.py; finetune/results.py), TensorBoard
     events under tensorboard/seed_<s>/, config.json, task.json, tokenizer/ (so `exlm_jax.load` works) and
     run_card.json (kind 'finetune'; finetune/card.py).
A seed whose seed_<s>/result.json exists is not run again (delete it, or the workdir, to redo it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import time

import jax
import ml_collections
import numpy as np

from exlm_jax import run_store
from exlm_jax.finetune import card as card_lib
from exlm_jax.finetune import data as data_lib
from exlm_jax.finetune import lengths as lengths_lib
from exlm_jax.finetune import results as results_lib
from exlm_jax.finetune.config import optimizer_config, validate_config
from exlm_jax.finetune.handoff import Initialisation, pretrained_encoder, scratch_initialisation
from exlm_jax.finetune.metrics import is_improvement
from exlm_jax.train import checkpoint, partitioning, reporting, steps, workdir_lock
from exlm_jax.train.divergence import DivergenceGuard
from exlm_jax.train.reporting import note

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The loss module on the one trainer
# ----------------------------------------------------------------------------------------------


def make_setup(config, task: data_lib.Task, init: Initialisation, train: data_lib.Encoded,
               total_steps: int) -> steps.TrainSetup:
  """The TrainSetup of this task's loss module on config.mesh, warm-up as a fraction of total_steps."""
  model = task.loss_model(init.model_config, train)
  return steps.TrainSetup.create(config, partitioning.create_mesh(config.mesh), model,
                                 optimizer_config(config, total_steps))


def predict_split(setup: steps.TrainSetup, params, split: data_lib.Encoded, batch_size: int) -> np.ndarray:
  """(N, ...) float32 model outputs over a whole split (classification heads: (N, C))."""
  outputs = []
  for start in range(0, len(split), batch_size):
    batch = split.batch(np.arange(start, min(start + batch_size, len(split))), batch_size)
    outputs.append(setup.predict(params, steps.process_rows(batch)))
  host = np.concatenate(jax.device_get(outputs)) if outputs else np.zeros((0, 1), np.float32)
  return host[:len(split)]


# ----------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------


def eval_due(config, step: int, step_in_epoch: int, steps_per_epoch: int) -> bool:
  """Every `eval_every` steps, or (eval_every=0) at `evals_per_epoch` evenly spaced points of each epoch."""
  if config.eval_every:
    return step % config.eval_every == 0
  per_epoch = config.evals_per_epoch
  return step_in_epoch in {round(i * steps_per_epoch / per_epoch) for i in range(1, per_epoch + 1)}


def save_best(workdir: pathlib.Path, seed: int, step: int, params) -> None:
  """The best params under seed_<s>/checkpoints/<step> (what exlm_jax.load reads)."""
  manager = checkpoint.make_manager(str(workdir / f"seed_{seed}" / "checkpoints"),
                                    ml_collections.ConfigDict(dict(keep_checkpoints=1, async_checkpointing=False)))
  # Host copies on a single process: Orbax would otherwise compile a slice per replicated shape.
  params = jax.device_get(params) if jax.process_count() == 1 else params
  checkpoint.save(manager, step, {"params": params}, force=True)
  checkpoint.finish(manager)


def train_seed(config, setup: steps.TrainSetup, task: data_lib.Task, encoded: dict[str, data_lib.Encoded],
               init: Initialisation, seed: int, workdir: pathlib.Path) -> dict:
  """Trains one seed with model selection (best params saved under seed_<s>/checkpoints); returns its results."""
  started = time.perf_counter()
  train = encoded["train"]
  steps_per_epoch = math.ceil(len(train) / config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  selection, main_metric = task.selection_split, task.main_metric
  writer = reporting.Writer(str(workdir / "tensorboard" / f"seed_{seed}"))
  window = reporting.LogWindow(config.log_every, reporting.Progress(total_steps, config.batch_size * config.seq_len, 0),
                               writer)
  state = setup.init_state(seed, None if init.encoder is None else {"encoder": init.encoder})
  shuffle = np.random.default_rng(seed)
  best = {"value": None, "step": 0, "epoch": 0, "metrics": {}}
  best_params, best_outputs, history, last_eval, outputs = None, None, [], {}, None
  guard = DivergenceGuard()
  step = 0
  for epoch in range(1, config.num_epochs + 1):
    order = shuffle.permutation(len(train))
    for b in range(steps_per_epoch):
      batch = train.batch(order[b * config.batch_size:(b + 1) * config.batch_size], config.batch_size)
      state, metrics = setup.train_step(state, steps.process_rows(batch), seed)
      step += 1
      guard.add(step, metrics)  # a non-finite step stops the seed before it is logged or kept as the best
      if step % config.log_every == 0 or step == total_steps or eval_due(config, step, b + 1, steps_per_epoch):
        guard.check(state, step, lambda: _divergence_advice(config), f"seed {seed}")
      window.add(step, metrics, context=f"seed {seed} epoch {epoch}")
      if eval_due(config, step, b + 1, steps_per_epoch) or step == total_steps:
        outputs = predict_split(setup, state.params, encoded[selection], config.eval_batch_size)
        last_eval = task.score(selection, outputs)
        history.append({"step": step, "epoch": epoch, **last_eval})
        improved = is_improvement(main_metric, last_eval[main_metric], best["value"])
        if improved:
          best = {"value": last_eval[main_metric], "step": step, "epoch": epoch, "metrics": last_eval}
          best_params, best_outputs = setup.copy_params(state.params), outputs
        window.evaluated(step, last_eval, f"{selection}/",
                         f"seed {seed} eval at step {step} (epoch {epoch}) on {selection}: "
                         f"{results_lib.shown(last_eval)}" + (" (best)" if improved else ""))
  if best_params is None:
    note(f"seed {seed}: {main_metric} was never finite on {selection}; reporting the final params")
    best_params, best_outputs = state.params, outputs
    best.update(step=step, epoch=config.num_epochs, metrics=last_eval)
  report = {}
  for name in task.report_splits:
    if name == selection:
      report[name] = best["metrics"]
      task.write_predictions(workdir / f"seed_{seed}", name, best_outputs)
      continue
    outputs = predict_split(setup, best_params, encoded[name], config.eval_batch_size)
    report[name] = task.score(name, outputs)
    task.write_predictions(workdir / f"seed_{seed}", name, outputs)
    writer.scalars(best["step"], report[name], prefix=f"{name}_at_best/")
    note(f"seed {seed} {name} at best step {best['step']}: {results_lib.shown(report[name])}")
  writer.close()
  if config.finetune.save_checkpoints:
    save_best(workdir, seed, best["step"], best_params)
  return {"seed": seed, "best_step": best["step"], "best_epoch": best["epoch"], "total_steps": total_steps,
          "selection": {selection: best["metrics"]}, "report": report, "last_train": window.last,
          "last_eval": last_eval, "history": history, "wall_time_s": time.perf_counter() - started}


def _divergence_advice(config) -> str:
  advice = f"rerun with a lower --config.learning_rate (now {config.learning_rate:g})"
  advice += (f" or --config.grad_clip_norm (now {config.grad_clip_norm:g})" if config.grad_clip_norm > 0
             else " or set --config.grad_clip_norm (e.g. 1.0)")
  return advice + " (in a fresh --workdir if other seeds finished: they are reused only by the same config)"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def config_fingerprint(config) -> str:
  """Hash of everything but `seeds`: a finished seed is reused only by a run with the same config."""
  values = {k: v for k, v in config.to_dict().items() if k != "seeds"}
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(config) -> tuple[data_lib.Task, Initialisation]:
  """The task and what the encoder starts from (task fields, then init_from are checked first: they fail fastest)."""
  data_lib.validate_task_config(config)
  if config.init_from:
    if config.tokenizer:
      raise ValueError("config.tokenizer is only for init_from='' (scratch runs); a pretrained encoder "
                       "brings its own tokenizer: leave --config.tokenizer empty")
    init = pretrained_encoder(config.init_from, dict(config.model))
    task = data_lib.load_task(config)
  else:
    task = data_lib.load_task(config)
    msg = ("init_from is empty: fine-tuning a RANDOMLY initialised encoder (a from-scratch baseline); "
           "pass --config.init_from=PRETRAINING_WORKDIR to fine-tune a pretrained one")
    log.warning(msg)
    note("WARNING: " + msg)
    init = scratch_initialisation(config, task)
  return task, init


def task_info(config, task: data_lib.Task, init: Initialisation) -> dict:
  """task.json: what exlm_jax.load and a later intermediate-task run need to know about this one."""
  return {**task.info(), "pretrain_objective": init.objective, "init_from": config.init_from,
          "init_step": init.step}


def run(config, workdir: str) -> dict:
  """Fine-tunes every seed (skipping finished ones) and writes results.json / results.md; holds
  workdir/.lock throughout (train/workdir_lock.py: a second run on the workdir is refused)."""
  with workdir_lock.locked(pathlib.Path(workdir).absolute()):
    return _run_locked(config, workdir)


def _run_locked(config, workdir: str) -> dict:
  started = time.perf_counter()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  validate_config(config, jax.device_count())
  task, init = prepare(config)
  config = lengths_lib.resolve_seq_len(config, init)  # seq_len=0: from init_from's run card (finetune/lengths.py)
  task, length_report = task.fit_to_length(init, config)
  note(f"task {task.summary()} | metrics {', '.join(task.metrics)} (selection: {task.main_metric} on "
       f"{task.selection_split}; reported: {', '.join(task.report_splits)})")
  note(f"init: {init.source} ({init.objective or 'no pretraining'}) | encoder {init.model_config.num_layers}x"
       f"{init.model_config.d_model} {init.model_config.positions}, vocab {init.model_config.vocab_size}")

  encoded = task.encode(init.tokenizer, config.seq_len)
  steps_per_epoch = math.ceil(len(encoded["train"]) / config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  setup = make_setup(config, task, init, encoded["train"], total_steps)
  note(f"{total_steps} steps per seed ({config.num_epochs} epochs x {steps_per_epoch}), batch {config.batch_size}, "
       f"lr {config.learning_rate:g}, warm-up {config.warmup_ratio:.0%} | mesh {dict(setup.mesh.shape)}")

  config_out = config.to_dict()
  config_out["model"] = dataclasses.asdict(init.model_config)
  config_out["model_overrides"] = dict(config.model)
  checkpoint.write_json(str(workdir / run_store.CONFIG_FILE), config_out)
  info = task_info(config, task, init)
  checkpoint.write_json(str(workdir / run_store.TASK_FILE), info)
  if jax.process_index() == 0 and not (workdir / "tokenizer").exists():
    init.tokenizer.save(workdir / "tokenizer")

  fingerprint = config_fingerprint(config)
  per_seed, seeds_trained = [], 0
  for seed in config.seeds:
    done = workdir / f"seed_{seed}" / "result.json"
    if done.is_file():
      previous = run_store.read_json(done)
      if previous.get("config_fingerprint") != fingerprint:
        raise ValueError(f"{done} was written with a different config; use a fresh --workdir (or delete "
                         f"{done.parent}) to fine-tune with this one")
      note(f"seed {seed}: already done ({done}); skipping")
      per_seed.append(previous)
      continue
    result = train_seed(config, setup, task, encoded, init, int(seed), workdir)
    seeds_trained += 1
    result["config_fingerprint"] = fingerprint
    checkpoint.write_json(str(done), result)
    per_seed.append(result)

  results = {"task": task.name, "task_type": task.task_type, "main_metric": task.main_metric,
             "selection_split": task.selection_split, "report_splits": list(task.report_splits),
             "init_from": config.init_from, "pretrain_objective": init.objective, "init_step": init.step,
             "split_sizes": info["split_sizes"], **task.results_info(), "lengths": length_report,
             "seeds": [int(s) for s in config.seeds], "per_seed": per_seed,
             "summary": results_lib.summarize(per_seed, task), "best_seed": results_lib.best_seed(per_seed, task)}
  checkpoint.write_json(str(workdir / "results.json"), results)
  wall_time_s = time.perf_counter() - started
  final = results_lib.final_metrics(results, total_steps, wall_time_s)
  checkpoint.write_json(str(workdir / "final_metrics.json"), final)
  if jax.process_index() == 0:
    card_lib.write(workdir, config, init, task, encoded["train"].tokens, per_seed, seeds_trained, wall_time_s)
  markdown = results_lib.results_markdown(results)
  if jax.process_index() == 0:
    (workdir / "results.md").write_text(markdown)
  note(markdown)
  note(f"done: results in {workdir}/results.json and results.md, TensorBoard events in {workdir}/tensorboard, "
       f"best params per seed in {workdir}/seed_<s>/checkpoints (exlm_jax.load('{workdir}'))")
  return results
