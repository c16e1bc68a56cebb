"""What a run tells its user: a progress line, TensorBoard events (tensorboardX, no TensorFlow), and the
log window both training loops (pretraining, fine-tuning) report their train metrics through."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

import jax
import numpy as np


def note(message: str) -> None:
  """One line on stdout from process 0 (every process when `EXLM_LOG_ALL=1`)."""
  if jax.process_index() == 0 or os.environ.get("EXLM_LOG_ALL"):
    print(message, flush=True, file=sys.stdout)


def quiet_library_logs() -> None:
  """A run's screen shows our lines, progress and counts; library chatter is filtered where it is logged.

  - Orbax/Grain log every save at INFO through absl: absl's verbosity is WARNING.
  - Lines that are not the user's business are dropped at their source logger (`_LIBRARY_NOISE`: JAX's
    "Unable to initialize backend 'tpu'", TFDS's "Using custom data configuration: <whole config>" on
    every builder and "Variant folder ... has no dataset_info.json" before a build); other library
    warnings still show.
  - No progress bars when stdout or stderr is not a terminal (TFDS's tqdm bars are carriage returns and
    escape codes in a log file): tqdm's TQDM_DISABLE default, and TFDS's switch if it is imported.
  - Our own warnings (loggers `exlm_jax.*`) are plain `warning: ...` lines through `note`, not absl-formatted.
  Idempotent; call it before JAX starts (main.py) so the backend lines are filtered too.
  """
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in _NOISY_LOGGERS:
    _add_once(logging.getLogger(name).filters, _LibraryNoise, logging.getLogger(name).addFilter)
  _add_once(absl_logging.get_absl_handler().filters, _NotOurs, absl_logging.get_absl_handler().addFilter)
  ours = logging.getLogger("exlm_jax")
  _add_once(ours.handlers, _PlainNotes, ours.addHandler)
  if not (_is_terminal(sys.stdout) and _is_terminal(sys.stderr)):
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "tensorflow_datasets" in sys.modules:
      sys.modules["tensorflow_datasets"].disable_progress_bar()


# (package directory in the record's path, message prefix) of library lines that are not the user's business.
_LIBRARY_NOISE = (
    ("jax", "Unable to initialize backend"),  # JAX probing for a TPU / GPU plugin on a machine without one
    ("tensorflow_datasets", "Using custom data configuration"),  # every corpus is a custom BuilderConfig
    ("tensorflow_datasets", "Variant folder"),  # "... has no dataset_info.json": a build not yet done
)
_NOISY_LOGGERS = ("absl", "jax._src.xla_bridge")  # where those lines are logged (TFDS logs through absl)


class _LibraryNoise:
  """logging filter: drops the `_LIBRARY_NOISE` records."""

  @staticmethod
  def filter(record) -> bool:
    path = record.pathname.replace("\\", "/")
    message = str(record.msg)
    return not any(f"/{package}/" in path and message.startswith(prefix) for package, prefix in _LIBRARY_NOISE)


class _NotOurs:
  """absl handler filter: our loggers' records are shown by `_PlainNotes` instead."""

  @staticmethod
  def filter(record) -> bool:
    return not (record.name == "exlm_jax" or record.name.startswith("exlm_jax."))


class _PlainNotes(logging.Handler):
  """Our WARNING+ records as `warning: <message>` / `error: <message>` note lines."""

  def __init__(self):
    super().__init__(logging.WARNING)

  def emit(self, record) -> None:
    try:
      line = f"{record.levelname.lower()}: {record.getMessage()}"
      if _jax_started():
        note(line)
      else:  # asking JAX for the process index would start it before jax.distributed.initialize
        print(line, flush=True, file=sys.stdout)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def _jax_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return started is None or started()


def _add_once(installed, kind, add) -> None:
  if not any(isinstance(item, kind) for item in installed):
    add(kind())


def _is_terminal(stream) -> bool:
  return bool(getattr(stream, "isatty", None)) and stream.isatty()


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Writer:
  """TensorBoard scalars on process 0; a no-op elsewhere."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict, prefix: str = "") -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      self._writer.add_scalar(f"{prefix}{name}", float(value), step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


# Train-step counts a log window sums (`LossModel.batch_counts`; pretraining: `segments.real_counts`).
REAL_COUNTS = ("real_tokens", "examples")


class Progress:
  """Throughput and ETA over the steps since the last report (compile time excluded).

  tokens_per_s counts slots (batch x seq_len per step, padding included); given the window's summed
  `real_tokens` (and `examples`) counts, also real_tokens_per_s, slot_utilisation (real / all slots),
  real_tokens_per_step and examples_per_step.
  """

  def __init__(self, total_steps: int, tokens_per_step: int, start_step: int):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def restart_clock(self, step: int) -> None:
    """Call after a pause (compile, eval, checkpoint) so it does not count as training time."""
    self._last_step, self._last_time = step, time.perf_counter()

  def report(self, step: int, metrics: dict, counts: dict | None = None, window_steps: int = 1) -> tuple[str, dict]:
    """(progress line, perf); `counts`: REAL_COUNTS summed over the `window_steps` steps of the window.

    Real tokens per step are the window's mean, so a clock restarted inside the window (eval,
    checkpoint) changes only the step time, not what a step holds.
    """
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    step_time = seconds / steps
    perf = {"tokens_per_s": self.tokens_per_step / step_time, "step_time_s": step_time}
    throughput = f"{perf['tokens_per_s']:,.0f} tok/s"
    if counts and "real_tokens" in counts:
      real = counts["real_tokens"] / max(window_steps, 1)
      perf.update(real_tokens_per_s=real / step_time, slot_utilisation=real / self.tokens_per_step,
                  real_tokens_per_step=real)
      if "examples" in counts:
        perf["examples_per_step"] = counts["examples"] / max(window_steps, 1)
      throughput += f" ({perf['real_tokens_per_s']:,.0f} real, {100 * perf['slot_utilisation']:.0f}% of slots)"
    eta = format_duration(step_time * (self.total_steps - step))
    shown = " | ".join(f"{k} {metrics[k]:.4g}" for k in _SHOWN if k in metrics)
    line = f"step {step}/{self.total_steps} | {shown} | {throughput} | {step_time * 1e3:.0f} ms/step | ETA {eta}"
    return line, perf


_SHOWN = ("loss", "accuracy", "perplexity", "grad_norm", "learning_rate")  # in this order


class LogWindow:
  """The train metrics of the steps since the last report, synced to the host once per report.

  `add(step, metrics)` keeps a step's device metrics; every `every` steps and at `total_steps` it fetches
  them (the only host sync of a training loop), averages each over the window (the `summed` counts, e.g.
  REAL_COUNTS, are summed instead and go to `Progress.report` as throughput), adds `derived(means)`,
  raises FloatingPointError on a non-finite loss, prints the progress line (prefixed by `context`, with
  `perf_report`'s text) and writes the means and throughput as `train/` TensorBoard scalars. `last` and
  `perf` hold the latest report (with `real_tokens_seen`: the real tokens of every step this session has
  reported, what the run card sums over sessions); `evaluated` reports an evaluation.
  """

  def __init__(self, every: int, progress: Progress, writer: Writer,
               derived: Callable[[dict], dict] = lambda means: {},
               perf_report: Callable[[dict], tuple[dict, str]] = lambda perf: ({}, ""),
               summed: tuple[str, ...] = ()):
    self.every, self.progress, self.writer = every, progress, writer
    self.derived, self.perf_report, self.summed = derived, perf_report, summed
    self.last, self.perf = {}, {}
    self._window = []
    self._session_counts: dict[str, int] = {}

  def add(self, step: int, metrics: dict, context: str = "") -> bool:
    """True when `step` was a report step."""
    self._window.append(metrics)
    if step % self.every and step != self.progress.total_steps:
      return False
    host, self._window = jax.device_get(self._window), []
    counts = {k: int(np.sum([m[k] for m in host], dtype=np.int64)) for k in self.summed if k in host[0]}
    means = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k not in counts}
    means.update(self.derived(means))
    if not np.isfinite(means["loss"]):
      raise FloatingPointError(f"{context + ': ' if context else ''}loss became {means['loss']} at step {step}; "
                               "lower the learning rate or set grad_clip_norm")
    for key, value in counts.items():
      self._session_counts[key] = self._session_counts.get(key, 0) + value
    line, perf = self.progress.report(step, means, counts, len(host))
    if "real_tokens" in counts:
      perf["real_tokens_seen"] = self._session_counts["real_tokens"]
    extra, text = self.perf_report(perf)
    perf.update(extra)
    note(" | ".join(part for part in (context, line, text) if part))
    self.writer.scalars(step, {**means, **perf}, prefix="train/")
    self.last, self.perf = means, perf
    return True

  def evaluated(self, step: int, metrics: dict, prefix: str, message: str) -> None:
    """An evaluation at `step`: its line and `prefix` TensorBoard scalars; its time is not training time."""
    if metrics:
      note(message)
      self.writer.scalars(step, metrics, prefix=prefix)
    self.progress.restart_clock(step)
