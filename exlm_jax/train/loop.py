"""Pretraining loop: data -> sharded steps -> progress, TensorBoard, eval, checkpoints, resume.

`train_and_evaluate(config, workdir)` is what `main.py` calls. It resumes automatically from the
newest checkpoint in `workdir/checkpoints` (state, step and data-iterator position), and ends by
writing `final_metrics.json` and printing where everything went.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exlm_jax import objectives
from exlm_jax.train import checkpoint, distributed, flops, partitioning, reporting, steps
from exlm_jax.train.reporting import note


def validate_config(config, num_devices: int, process_count: int = 1) -> None:
  """Raises a one-line ValueError naming the bad field and how to fix it."""
  objective = objectives.get(config.objective)
  if not 0.0 < config.mask_prob < 1.0:
    raise ValueError(f"mask_prob={config.mask_prob} must lie in (0, 1), e.g. --config.mask_prob=0.15")
  if config.seq_len < 4:
    raise ValueError(f"seq_len={config.seq_len} is too short for `<s> x </s>` blocks; use >= 4")
  if config.model.positions != "rope2d" and config.seq_len > config.model.max_positions:
    raise ValueError(f"seq_len={config.seq_len} exceeds model.max_positions={config.model.max_positions} "
                     f"of the learned position table; raise model.max_positions or shorten seq_len")
  if config.total_steps <= 0:
    raise ValueError(f"total_steps={config.total_steps} must be positive")
  if config.warmup_steps < 0:
    raise ValueError(f"warmup_steps={config.warmup_steps} must be >= 0")
  if config.get("profile_start_step", -1) >= 0 and config.get("profile_num_steps", 3) <= 0:
    raise ValueError(f"profile_num_steps={config.profile_num_steps} must be positive when profiling "
                     f"(profile_start_step={config.profile_start_step}); or set profile_start_step=-1")
  for field in ("log_every", "eval_every", "checkpoint_every", "grad_accum_steps"):
    if config[field] <= 0:
      raise ValueError(f"{field}={config[field]} must be positive")
  dp = partitioning.data_parallel_size(config.mesh, num_devices)
  unit = dp * config.grad_accum_steps
  if config.batch_size % unit:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by data-parallel size {dp} x "
                     f"grad_accum_steps {config.grad_accum_steps} = {unit}")
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the {process_count} processes")
  objective.validate(config)


def with_vocab_size(config, vocab_size: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.vocab_size = int(vocab_size)
  return config


def evaluate(setup: steps.TrainSetup, params, batches) -> dict:
  """Objective metrics over a finite list of pipeline eval batches (deterministic masks)."""
  totals = None
  packing = steps.packed(setup.config)
  for index, batch in enumerate(batches):
    out = setup.eval_step(params, steps.pipeline_batch(batch, packing), index)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    return {}
  loss_sum, weight, metrics = jax.device_get(totals)
  result = {name: float(s) / max(float(c), 1e-9) for name, (s, c) in metrics.items()}
  result["loss"] = float(loss_sum) / max(float(weight), 1e-9)
  result.update(_perplexity(result))
  return result


def memory_summary(compiled) -> str:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return "memory analysis unavailable on this backend"
  if mem is None:
    return "memory analysis unavailable on this backend"
  gib = lambda b: f"{b / 2**30:.3f} GiB"
  return (f"per-device memory: arguments {gib(mem.argument_size_in_bytes)}, outputs "
          f"{gib(mem.output_size_in_bytes)}, temporaries {gib(mem.temp_size_in_bytes)}, "
          f"generated code {gib(mem.generated_code_size_in_bytes)}")


class ProfileWindow:
  """Captures a `jax.profiler` trace of updates start+1 .. start+num_steps into `log_dir` (start < 0: off).

  `before(step)` is called before running update step+1 and `after(step)` once `step` updates are done;
  the trace stops after the window's last update has finished on the device (the one extra host sync).
  """

  def __init__(self, log_dir: str, start: int, num_steps: int):
    self.log_dir, self.start, self.stop = log_dir, start, start + max(num_steps, 1)
    self.active = False

  def before(self, step: int) -> None:
    if self.start >= 0 and step == self.start and not self.active:
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after(self, step: int, outputs) -> bool:
    """True when the trace was just written (so the caller can restart its clock)."""
    if not self.active or step < self.stop:
      return False
    jax.block_until_ready(outputs)
    self.close()
    note(f"profile of steps {self.start + 1}-{self.stop} written to {self.log_dir} "
         f"(tensorboard --logdir {self.log_dir})")
    return True

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False

  def __enter__(self) -> "ProfileWindow":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()  # a run that ended (or failed) inside the window
    return False


def perf_reporter(config):
  """(perf dict with step_time_s) -> (extra metrics, text for the progress line): model TFLOP/s per device
  from the analytic FLOPs of `config.objective` (train/flops.py) and MFU against the device's peak
  (omitted where the peak is unknown, e.g. CPU, or the objective has no FLOPs model).

  With the window's real counts (`real_tokens_per_step`, `examples_per_step` from `reporting.Progress`)
  also flops_per_step (static shapes, padding included), real_flops_per_step (the same formulas at the
  batch's actual lengths, `flops.real_breakdown`) and real_tflops_per_device; MFU is then on real FLOPs.
  """
  if not flops.has_model(config.objective):
    return lambda perf: ({}, "")
  flops_per_step = flops.train_flops_per_step(config)
  peak = flops.peak_flops_per_device(jax.devices()[0])
  num_devices = jax.device_count()

  def report(perf: dict) -> tuple[dict, str]:
    real = None
    if "real_tokens_per_step" in perf and "examples_per_step" in perf:
      real = flops.real_train_flops_per_step(config, perf["real_tokens_per_step"], perf["examples_per_step"])
    extra = flops.perf_metrics(flops_per_step, perf["step_time_s"], num_devices, peak, real)
    text = f"{extra['tflops_per_device']:.3g} TFLOP/s/device"
    if real is not None:
      extra.update(flops_per_step=flops_per_step, real_flops_per_step=real)
      text += f" ({extra['real_tflops_per_device']:.3g} real)"
    if "mfu" in extra:
      text += f" | MFU {100 * extra['mfu']:.1f}%"
    return extra, text

  return report


def _perplexity(means: dict) -> dict:
  return {"perplexity": float(np.exp(min(means["loss"], 50.0)))}


def prepare(config, workdir: str):
  """Data, config with the vocabulary size, mesh and TrainSetup for a pretraining run."""
  from exlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data = pipeline.load_pretraining_data(config, workdir)
  config = with_vocab_size(config, data.tokenizer.vocab_size)
  if data.packing:  # the bound the pipeline resolved (-1 = auto) sets the objectives' static shapes
    config.data.max_examples_per_block = data.max_examples_per_block
  validate_config(config, jax.device_count(), jax.process_count())
  mesh = partitioning.create_mesh(config.mesh)
  setup = steps.TrainSetup.create(config, mesh)
  _check_sharding(setup)  # scale-out
  return data, config, setup


def _check_sharding(setup: steps.TrainSetup) -> None:
  """[scale-out] One-line error when FSDP/TP was asked for but parameters stay mostly replicated."""
  partitioning.assert_params_sufficiently_sharded(setup.abstract_state().params, setup.state_sharding.params,
                                                  setup.mesh, setup.config)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) pretraining; returns the final metrics written to final_metrics.json."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  reporting.quiet_library_logs()
  data, config, setup = prepare(config, workdir)
  note(f"objective {config.objective} | {setup.num_params() / 1e6:.2f}M parameters | "
       f"mesh {dict(setup.mesh.shape)} | {jax.process_count()} process(es), {jax.device_count()} device(s)")
  note("data: " + ", ".join(f"{k} {v}" for k, v in data.summary.items()))
  checkpoint.write_json(os.path.join(workdir, "config.json"), config.to_dict())

  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config)
  train_iter = data.train_iterator()
  if manager.latest_step() is not None:
    state, start_step = checkpoint.restore(manager, setup.abstract_state(), train_iter)
    note(f"resumed from step {start_step} in {manager.directory}")
  else:
    state, start_step = setup.init_state(), 0

  started = time.perf_counter()
  compiled = setup.compile_train_step()
  note(f"compiled the train step in {time.perf_counter() - started:.1f}s; {memory_summary(compiled)}")

  writer = reporting.Writer(os.path.join(workdir, "tensorboard"))
  progress = reporting.Progress(config.total_steps, config.batch_size * config.seq_len, start_step)
  log = reporting.LogWindow(config.log_every, progress, writer, derived=_perplexity, perf_report=perf_reporter(config),
                            summed=reporting.REAL_COUNTS)
  profile = ProfileWindow(os.path.join(workdir, "profile"), config.get("profile_start_step", -1),
                          config.get("profile_num_steps", 3))
  eval_batches = None
  last_eval = {}
  step = start_step
  # [scale-out] SIGTERM on any process -> every process saves the same step and stops; in-flight
  # async saves are waited for (and their errors raised) when the block exits, also on an exception.
  with (distributed.PreemptionWatcher(sync_every=config.log_every) as stop, checkpoint.finishing(manager),
        profile):
    while step < config.total_steps:
      batch = setup.shard_batch(steps.pipeline_batch(next(train_iter), data.packing))
      profile.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, metrics = compiled(state, batch)
      step += 1
      log.add(step, metrics)
      if step % config.eval_every == 0 or step == config.total_steps:
        eval_batches = eval_batches if eval_batches is not None else list(data.eval_batches())
        last_eval = evaluate(setup, state.params, eval_batches)
        log.evaluated(step, last_eval, "eval/",
                      f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
      if profile.after(step, (state, metrics)):
        progress.restart_clock(step)  # writing the trace is not training time
      preempted = stop.reached(step)  # every step, on every process
      if step % config.checkpoint_every == 0 or step == config.total_steps or preempted:
        checkpoint.save(manager, step, state, train_iter, force=True)
        progress.restart_clock(step)
      if preempted:
        note(f"preemption (SIGTERM, {stop.mechanism}): saving step {step} and exiting cleanly")
        break
  writer.close()

  final = {"step": step, "train": log.last, "eval": last_eval, "perf": log.perf,
           "num_params": setup.num_params(), "wall_time_s": time.perf_counter() - started,
           "objective": config.objective, "preempted": step < config.total_steps}
  checkpoint.write_json(os.path.join(workdir, "final_metrics.json"), final)
  note(f"done: checkpoints in {workdir}/checkpoints, TensorBoard events in {workdir}/tensorboard, "
       f"tokenizer in {workdir}/tokenizer, metrics in {workdir}/final_metrics.json")
  return final


def compile_only(config, workdir: str) -> str:
  """Lowers and compiles the train step for the configured mesh and reports memory (no training)."""
  if config.model.vocab_size > 0:
    config = with_vocab_size(config, config.model.vocab_size)
    validate_config(config, jax.device_count(), jax.process_count())
    setup = steps.TrainSetup.create(config, partitioning.create_mesh(config.mesh))
    _check_sharding(setup)  # scale-out
  else:
    _, config, setup = prepare(config, workdir)
  started = time.perf_counter()
  compiled = setup.compile_train_step()
  summary = (f"compiled {config.objective} train step for mesh {dict(setup.mesh.shape)} in "
             f"{time.perf_counter() - started:.1f}s; {setup.num_params() / 1e6:.2f}M parameters; "
             f"{memory_summary(compiled)}")
  note(summary)
  return summary
