"""Pretraining loop: data -> sharded steps -> progress, TensorBoard, eval, checkpoints, resume.

`train_and_evaluate(config, workdir)` is what `main.py` calls. It resumes automatically from the
newest checkpoint in `workdir/checkpoints` that restores cleanly (state, step and data-iterator position),
and ends by writing `final_metrics.json` and printing where everything went. Never losing a run:
  * the workdir is locked for the run (train/workdir_lock.py): a second writer is refused;
  * a rerun is checked before anything is written (train/resume.py): a finished run is left as it is, a
    config change that would not match the checkpoints is refused, other changes are recorded;
  * a diverging step is skipped in the step and stops the run at the next log or save step, before any
    non-finite state is saved (train/divergence.py); damaged checkpoints are moved aside (train/checkpoint.py);
  * a train step whose memory estimate exceeds the device's ends right after compiling (`check_memory`).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exlm_jax import config_lib, objectives, run_card
from exlm_jax.data import vocab
from exlm_jax.train import checkpoint, distributed, divergence, flops, optim, partitioning, reporting, resume, steps
from exlm_jax.train import workdir_lock
from exlm_jax.train.reporting import note


def validate_config(config, num_devices: int, process_count: int = 1) -> None:
  """Every check that needs no data, run before any is read: raises a one-line ValueError naming the bad
  field and how to fix it. The vocabulary size is checked after the tokenizer (`validate_vocabulary`)."""
  objective = objectives.get(config.objective)
  if not 0.0 < config.mask_prob < 1.0:
    raise ValueError(f"mask_prob={config.mask_prob} must lie in (0, 1), e.g. --config.mask_prob=0.15")
  if config.seq_len < vocab.MIN_BLOCK_LEN:
    raise ValueError(f"seq_len={config.seq_len} leaves no room for content between <s> and </s>; "
                     f"use >= {vocab.MIN_BLOCK_LEN}")
  if config.seq_len > config.model.max_positions:
    raise ValueError(f"seq_len={config.seq_len} exceeds model.max_positions={config.model.max_positions} "
                     f"(positions={config.model.positions!r}); raise model.max_positions or shorten seq_len")
  if config.total_steps <= 0:
    raise ValueError(f"total_steps={config.total_steps} must be positive")
  if config.warmup_steps < 0:
    raise ValueError(f"warmup_steps={config.warmup_steps} must be >= 0")
  if config.init_from and not config.init_from.startswith("hf:"):
    raise ValueError(f"init_from={config.init_from!r}: pretraining starts from random init ('') or a Hugging Face "
                     "checkpoint folder, --config.init_from=hf:PATH")
  if config.budget not in config_lib.BUDGETS:
    raise ValueError(f"budget={config.budget!r}; choose one of {', '.join(config_lib.BUDGETS)}")
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate={config.learning_rate} must be positive, e.g. --config.learning_rate=5e-4")
  if config.weight_decay_rule not in optim.WEIGHT_DECAY_RULES:
    raise ValueError(f"weight_decay_rule={config.weight_decay_rule!r}; choose one of "
                     f"{', '.join(optim.WEIGHT_DECAY_RULES)}")
  if config.keep_checkpoints < 1:
    raise ValueError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1 (use a large number to keep all)")
  if config.profile_start_step >= 0 and config.profile_num_steps <= 0:
    raise ValueError(f"profile_num_steps={config.profile_num_steps} must be positive when profiling "
                     f"(profile_start_step={config.profile_start_step}); or set profile_start_step=-1")
  for field in ("batch_size", "log_every", "eval_every", "checkpoint_every", "grad_accum_steps"):
    if config[field] <= 0:
      raise ValueError(f"{field}={config[field]} must be positive")
  dp = partitioning.data_parallel_size(config.mesh, num_devices)
  unit = dp * config.grad_accum_steps
  if config.batch_size % unit:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by data-parallel size {dp} x "
                     f"grad_accum_steps {config.grad_accum_steps} = {unit}")
  if config.data.packing and not objective.packed_batches:
    packs = ", ".join(name for name in objectives.names() if objectives.get(name).packed_batches)
    raise ValueError(f"data.packing=True: objective {config.objective!r} takes one example per block only; "
                     f"set --config.data.packing=false (objectives that pack: {packs})")
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the {process_count} processes")
  # The model's own checks (heads, dtype, remat, ...) and the objective's, with a stand-in vocabulary
  # until the tokenizer gives the real one.
  known = config if config.model.vocab_size > 0 else with_vocab_size(config, vocab.NUM_SPECIAL + 1)
  objectives.base.model_config(known)
  objective.validate(known)


def validate_vocabulary(config) -> None:
  """The check that needs the tokenizer: the vocabulary it gave the model has tokens beyond the specials."""
  if config.model.vocab_size <= vocab.NUM_SPECIAL:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} has no tokens beyond the {vocab.NUM_SPECIAL} "
                     "special ones; check the corpus and config.data.tokenizer")


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


def _memory_analysis(compiled):
  try:
    return compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None


def memory_summary(compiled) -> str:
  mem = _memory_analysis(compiled)
  if mem is None:
    return "memory analysis unavailable on this backend"
  gib = lambda b: f"{b / 2**30:.3f} GiB"
  return (f"per-device memory: arguments {gib(mem.argument_size_in_bytes)}, outputs "
          f"{gib(mem.output_size_in_bytes)}, temporaries {gib(mem.temp_size_in_bytes)}, "
          f"generated code {gib(mem.generated_code_size_in_bytes)}")


def memory_estimate(mem) -> int:
  """Bytes one device needs for a compiled program: XLA's peak where it reports one, else arguments +
  outputs - their aliased (donated) part + temporaries; plus the generated code."""
  peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  return (peak if peak > 0 else total) + mem.generated_code_size_in_bytes


def device_memory_limit(device=None) -> tuple[int, str] | None:
  """(bytes, what they are) one device may use: the backend's `bytes_limit` (GPU, TPU); on CPU, whose
  devices share the host, the host's physical memory / the number of local devices; None when unknown."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"the memory of one {device.device_kind}"
  if device.platform == "cpu" and hasattr(os, "sysconf"):
    count = jax.local_device_count()
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // count,
            f"the host's physical memory / {count} CPU device(s)")
  return None


def check_memory(compiled, limit: tuple[int, str] | None) -> None:
  """A one-line ValueError when the compiled step's per-device estimate exceeds `limit` (bytes, what);
  nothing when either is unknown."""
  mem = _memory_analysis(compiled)
  if mem is None or limit is None:
    return
  need, (available, what) = memory_estimate(mem), limit
  if need > available:
    raise ValueError(
        f"the train step needs about {need / 2**30:.3f} GiB per device ({memory_summary(compiled)}) but "
        f"{what} is {available / 2**30:.3f} GiB: lower batch_size or seq_len, raise grad_accum_steps, set "
        "model.remat=full, or shard the parameters over more devices (mesh.fsdp)")


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
  """(data, config with the vocabulary size, TrainSetup, initial params override) of a pretraining run.

  The override is None (random init) unless `init_from='hf:PATH'` starts the run from a checkpoint.
  """
  from exlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  validate_config(config, jax.device_count(), jax.process_count())  # before minutes of data preparation
  override = None
  if config.init_from:
    from exlm_jax.export import from_hf  # pylint: disable=g-import-not-at-top  (the .[hf] extra's side)
    config, override = from_hf.start_pretraining(config, workdir)
  data = pipeline.load_pretraining_data(config, workdir)
  config = with_vocab_size(config, data.tokenizer.vocab_size)
  if data.packing:  # the bound the pipeline resolved (-1 = auto) sets the objectives' static shapes
    config.data.max_examples_per_block = data.max_examples_per_block
  config = flops.resolve_budget(config)
  validate_vocabulary(config)
  if config.budget != "steps":
    note(f"budget {config.budget}: total_steps={config.total_steps}, the training FLOPs of "
         f"{config.matched_to.objective} at {config.matched_to.total_steps} steps")
  mesh = partitioning.create_mesh(config.mesh)
  setup = steps.TrainSetup.create(config, mesh)
  _check_sharding(setup)  # scale-out
  return data, config, setup, override


def _check_sharding(setup: steps.TrainSetup) -> None:
  """[scale-out] One-line error when FSDP/TP was asked for but parameters stay mostly replicated."""
  partitioning.assert_params_sufficiently_sharded(setup.abstract_state().params, setup.state_sharding.params,
                                                  setup.mesh, setup.config)


def train_and_evaluate(config, workdir: str, memory_limit: tuple[int, str] | None = None) -> dict:
  """Runs (or resumes) pretraining; returns the final metrics written to final_metrics.json (for a
  finished run: those it wrote, untouched). memory_limit: (bytes per device, what they are) for
  `check_memory`; default `device_memory_limit()`."""
  workdir = os.path.abspath(workdir)
  with workdir_lock.locked(workdir):
    return _train(config, workdir, memory_limit or device_memory_limit())


def _train(config, workdir: str, memory_limit) -> dict:
  os.makedirs(workdir, exist_ok=True)
  reporting.quiet_library_logs()
  if not config.init_from:  # a checkpoint's architecture and tokenizer are applied by prepare: checked after it
    resume.check_config(workdir, config)  # before anything is written (again below with the vocabulary size)
  finished = resume.finished_run(workdir, config.total_steps)
  if finished is not None:
    note(f"{workdir} already finished at step {finished['step']} (total_steps={config.total_steps}); nothing to do "
         "(a larger --config.total_steps continues it)")
    return finished
  data, config, setup, initial = prepare(config, workdir)
  changes = resume.check_config(workdir, config)
  note(f"objective {config.objective} | {setup.num_params() / 1e6:.2f}M parameters | "
       f"mesh {dict(setup.mesh.shape)} | {jax.process_count()} process(es), {jax.device_count()} device(s)")
  note("data: " + ", ".join(f"{k} {v}" for k, v in data.summary.items()))

  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config)
  train_iter = data.train_iterator()
  resumed_from = None
  if manager.latest_step() is not None:
    state, start_step = checkpoint.restore(manager, setup.abstract_state(), train_iter)
    resumed_from = start_step
    note(f"resumed from step {start_step} in {manager.directory}"
         + (f"; changed: {resume.shown(changes)} (recorded in config_history.json)" if changes else ""))
  else:
    state, start_step = setup.init_state(override=initial), 0

  started = time.perf_counter()
  compiled = setup.compile_train_step()
  note(f"compiled the train step in {time.perf_counter() - started:.1f}s; {memory_summary(compiled)}")
  check_memory(compiled, memory_limit)
  resume.record_config(workdir, config, changes, resumed_from)

  writer = reporting.Writer(os.path.join(workdir, "tensorboard"))
  progress = reporting.Progress(config.total_steps, config.batch_size * config.seq_len, start_step)
  log = reporting.LogWindow(config.log_every, progress, writer, derived=_perplexity, perf_report=perf_reporter(config),
                            summed=reporting.REAL_COUNTS)
  profile = ProfileWindow(os.path.join(workdir, "profile"), config.get("profile_start_step", -1),
                          config.get("profile_num_steps", 3))
  guard = divergence.DivergenceGuard()
  advice = lambda: _divergence_advice(config, manager)
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
      guard.add(step, metrics)
      if step % config.log_every == 0 or step == config.total_steps:
        guard.check(state, step, advice)
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
        guard.check(state, step, advice)  # never save a state after a skipped (non-finite) step
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
  if jax.process_index() == 0:
    run_card.update_card(workdir, "pretrain", config, data.summary,
                         {"step": step, "wall_time_s": final["wall_time_s"],
                          "real_tokens_seen": log.perf.get("real_tokens_seen")})
  note(f"done: checkpoints in {workdir}/checkpoints, TensorBoard events in {workdir}/tensorboard, "
       f"tokenizer in {workdir}/tokenizer, metrics in {workdir}/final_metrics.json")
  return final


def _divergence_advice(config, manager) -> str:
  """What to change after a divergence, and where the run can go on from."""
  lower = f"a lower --config.learning_rate (now {config.learning_rate:g})"
  if config.grad_clip_norm > 0:
    lower += f" or --config.grad_clip_norm (now {config.grad_clip_norm:g})"
  latest = manager.latest_step()
  if latest is None:
    advice = f"no checkpoint was saved yet: rerun with {lower}"
  else:
    advice = (f"the newest checkpoint, step {latest} in {manager.directory}, was saved before it: rerun with "
              f"{lower} to go on from there")
  if config.grad_clip_norm <= 0:
    advice += ", or start a fresh --workdir with --config.grad_clip_norm=1.0"
  return advice


def compile_only(config, workdir: str) -> str:
  """Lowers and compiles the train step for the configured mesh and reports memory (no training)."""
  if config.model.vocab_size > 0:
    config = with_vocab_size(config, config.model.vocab_size)
    validate_config(config, jax.device_count(), jax.process_count())
    validate_vocabulary(config)
    setup = steps.TrainSetup.create(config, partitioning.create_mesh(config.mesh))
    _check_sharding(setup)  # scale-out
  else:
    _, config, setup, _ = prepare(config, workdir)
  started = time.perf_counter()
  compiled = setup.compile_train_step()
  summary = (f"compiled {config.objective} train step for mesh {dict(setup.mesh.shape)} in "
             f"{time.perf_counter() - started:.1f}s; {setup.num_params() / 1e6:.2f}M parameters; "
             f"{memory_summary(compiled)}")
  note(summary)
  return summary
