"""Multi-process start-up and preemption handling (docs/design.md §8.4).

`initialize(...)` must run before anything asks JAX for devices: it decides whether this process is
one of many (TPU VM pod, SLURM, Open MPI, or explicit coordinator flags), calls
`jax.distributed.initialize` accordingly, and returns a one-line description that every process
prints first, so a hang at start-up shows which process never arrived.

`PreemptionWatcher` turns SIGTERM into "save at one step, on every process, then stop":
  * with the JAX distributed runtime, its preemption sync manager catches SIGTERM on whichever
    process gets it and all processes agree on the step (`reached_preemption_sync_point`);
  * in a single process, a Python SIGTERM handler sets a flag;
  * multi-process without the preemption service, the flag is all-gathered every `sync_every` steps.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import signal

import jax
import numpy as np

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass
class DistributedArgs:
  """What main.py's flags (or the environment) say about the process group."""

  mode: str = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: str | None = None  # "0,1,2,3"; default: JAX's choice (all on TPU, per-GPU on SLURM)
  initialization_timeout: int = 300

  @classmethod
  def from_env(cls, **flags) -> "DistributedArgs":
    """Flags win; unset ones fall back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
    args = cls(**{k: v for k, v in flags.items() if v is not None})
    args.coordinator_address = args.coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if args.num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
      args.num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if args.process_id is None and os.environ.get(ENV_PROCESS_ID):
      args.process_id = int(os.environ[ENV_PROCESS_ID])
    return args

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0") or 0)
  except ValueError:
    return 0


def detect_cluster() -> str | None:
  """'tpu' | 'slurm' | 'openmpi' when the environment is a multi-process job JAX can self-configure."""
  if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if importlib.util.find_spec("libtpu") is not None and (
      os.path.exists("/dev/accel0") or glob.glob("/dev/vfio/[0-9]*")):
    return "tpu"  # a Cloud TPU VM: jax.distributed.initialize() reads the topology from metadata
  if os.environ.get("SLURM_STEP_NODELIST") and _int_env("SLURM_NTASKS") > 1:
    return "slurm"  # inside `srun` with several tasks (a bare `python` in an allocation stays single)
  if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  return None


def initialize(args: DistributedArgs) -> str:
  """Starts the JAX distributed runtime when `args` / the environment call for it; returns how.

  Raises a one-line RuntimeError when the process group cannot be formed.
  """
  if args.mode not in MODES:
    raise ValueError(f"--distributed={args.mode!r}; choose one of {', '.join(MODES)}")
  if args.mode == "off":
    return "off"
  cluster = detect_cluster()
  if args.mode == "auto" and not args.explicit and cluster is None:
    return "single process"
  how = "explicit coordinator" if args.explicit else (cluster or "auto-detect")
  kwargs = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                process_id=args.process_id, initialization_timeout=args.initialization_timeout)
  if args.local_device_ids:
    kwargs["local_device_ids"] = [int(i) for i in str(args.local_device_ids).split(",")]
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise RuntimeError(
        f"jax.distributed.initialize failed ({how}): {first} -- outside TPU VMs/SLURM/Open MPI pass "
        f"--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or {ENV_COORDINATOR}, "
        f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}) on every process, or --distributed=off") from e
  return how


def describe(how: str) -> str:
  """'process 0/2 | 2 local / 4 global cpu devices | distributed: explicit coordinator'."""
  return (f"process {jax.process_index()}/{jax.process_count()} | {jax.local_device_count()} local / "
          f"{jax.device_count()} global {jax.devices()[0].platform} devices | distributed: {how}")


def is_initialized() -> bool:
  from jax._src import distributed as _distributed  # pylint: disable=g-import-not-at-top
  return _distributed.global_state.client is not None


def _sync_manager_available() -> bool:
  from jax._src import distributed as _distributed  # pylint: disable=g-import-not-at-top
  return is_initialized() and getattr(_distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatcher:
  """`with PreemptionWatcher() as stop:` ... `if stop.reached(step): save; break`.

  `reached(step)` must be called once per step by every process (the JAX protocol needs it); it
  returns True on all processes at the same step after any of them got SIGTERM.
  """

  def __init__(self, sync_every: int = 10):
    self.sync_every = max(1, int(sync_every))
    self.signalled = False  # this process saw SIGTERM (Python handler only)
    self.stopped_at: int | None = None
    self._previous = None
    self._use_jax = False

  @property
  def mechanism(self) -> str:
    if self._use_jax:
      return "jax preemption sync manager"
    return "SIGTERM handler" + (f", all-gathered every {self.sync_every} steps" if jax.process_count() > 1 else "")

  def __enter__(self) -> "PreemptionWatcher":
    self._use_jax = _sync_manager_available()
    if not self._use_jax:  # the JAX service has its own SIGTERM handler; don't replace it
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: rely on the default action
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    """True when every process should save at `step` and stop."""
    if self.stopped_at is not None:
      return True
    if self._use_jax:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      hit = multihost_utils.reached_preemption_sync_point(int(step))
    elif jax.process_count() == 1:
      hit = self.signalled
    elif step % self.sync_every == 0:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      hit = bool(np.any(multihost_utils.process_allgather(np.int32(self.signalled))))
    else:
      hit = False
    if hit:
      self.stopped_at = int(step)
    return hit

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False
