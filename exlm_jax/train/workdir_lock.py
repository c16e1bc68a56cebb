"""One writer per workdir: `WORKDIR/.lock`, taken by pretraining and fine-tuning for their whole run.

The lock file is created with O_CREAT | O_EXCL (so of two runs exactly one gets it) and holds the
holder's host, pid, start time and command as JSON. While held, a daemon thread touches it every
minute (the heartbeat: its modification time); it is deleted on the way out, also on an exception or
a SIGTERM stop; a run killed with -9 leaves it behind. A lock is STALE, and a new run takes it over
with a note, when
  * it was written on this host and its pid is no longer alive (checked, whatever its age), or
  * it was written on another host (whose pids cannot be checked) and has had no heartbeat for
    `EXLM_LOCK_STALE_HOURS` hours (default 1), or
  * it is unreadable (a writer that died between creating and filling it) and older than a minute.
Otherwise a second writer is refused in one line naming the holder. With several processes only process
0 takes the lock; the others learn its outcome from a broadcast, so all of them stop together.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import threading
import time

import jax
import numpy as np

from exlm_jax.run_store import LOCK_FILE
from exlm_jax.train.reporting import note

DEFAULT_STALE_HOURS = 1.0
HEARTBEAT_S = 60.0
_UNREADABLE_GRACE_S = 60.0


def stale_hours() -> float:
  return float(os.environ.get("EXLM_LOCK_STALE_HOURS", DEFAULT_STALE_HOURS))


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def describe(holder: dict | None) -> str:
  if not holder:
    return "an unknown process (unreadable lock file)"
  return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def _read(path: pathlib.Path) -> dict | None:
  try:
    holder = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def stale_reason(holder: dict | None, age_s: float) -> str | None:
  """Why a lock with this content, last touched `age_s` seconds ago, may be taken over; None: it is held."""
  if holder is None:
    return "unreadable and older than a minute" if age_s > _UNREADABLE_GRACE_S else None
  if holder.get("host") == socket.gethostname():
    return None if _pid_alive(int(holder.get("pid", -1))) else "that process is no longer running"
  if age_s > stale_hours() * 3600:
    return f"no heartbeat for {age_s / 3600:.1f} h (> EXLM_LOCK_STALE_HOURS={stale_hours():g})"
  return None


class WorkdirLock:
  """A held lock: heartbeats until `release()`, which removes the file if it is still ours."""

  def __init__(self, path: pathlib.Path, holder: dict):
    self.path, self.holder = path, holder
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="exlm-workdir-lock", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    if _read(self.path) == self.holder:
      self.path.unlink(missing_ok=True)


def acquire(workdir) -> WorkdirLock:
  """Takes `workdir/.lock` (creating the workdir); FileExistsError in one line when another run holds it."""
  path = pathlib.Path(workdir) / LOCK_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  holder = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
  for _ in range(3):  # a lost race against another run taking over the same stale lock: look again
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      other = _read(path)
      try:
        age = time.time() - path.stat().st_mtime
      except FileNotFoundError:
        continue  # released meanwhile
      reason = stale_reason(other, age)
      if reason is None:
        raise FileExistsError(
            f"{path.parent} is in use by {describe(other)}: another run is writing it; wait for it to finish or "
            f"use another --workdir (if that run is gone, delete {path})") from None
      if _read(path) == other:  # still the stale one (not a lock another run just took over)
        path.unlink(missing_ok=True)
        note(f"note: took over the stale lock {path} of {describe(other)}: {reason}")
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(holder, f)
    return WorkdirLock(path, holder)
  raise FileExistsError(f"could not take {path}: other runs keep taking it; is the workdir shared by several jobs?")


@contextlib.contextmanager
def locked(workdir):
  """`with locked(workdir) as lock:` the lock for the block (lock None on processes other than 0)."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except FileExistsError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      error = FileExistsError(f"process 0 could not lock {workdir} (see its output)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
