"""The data layer's on-disk caches: keyed on file content, built by one process at a time, no leftovers.

Every cache the data layer writes under the TFDS root (corpus builds, token caches, pack tables,
tokenizers) is named by what it was made from; the corpus part of every name is the corpus file's
content (`file_sha256`), so a file edited in place -- even to the same size, even with its mtime put
back -- gets a new build, a new vocabulary and new token ids.

Content key: the SHA-256 of the file's bytes, streamed in 1 MiB reads. Measured ~350 MB/s on one CPU
core (the 10 MB MOSES train.csv.gz in ~30 ms; ~3 s per GB), cheap next to reading the corpus, so the
whole file is hashed rather than a prefix/suffix sample that could miss an edit in the middle. The
stat fields (size, mtime_ns, ctime_ns, inode) only memoize the hash within a process: every run
hashes again, so neither a kept mtime nor a copied file can serve stale data.

Builds: `build_once(target, done_file, write)` writes into a temporary sibling `<target>.tmp*` and
renames it, holding an exclusive lock on the parent directory meanwhile (fcntl.flock on the directory
itself, so caches hold no lock files; the kernel releases it when its holder dies). Only the lock
holder builds, so processes sharing a cache wait instead of building twice, and any `<target>.tmp*`
the holder finds was left by a build that crashed: it is removed. On a filesystem without locks the
builders race harmlessly (the rename is atomic) and no temporary is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from typing import Callable, Iterator

log = logging.getLogger(__name__)

_READ = 1 << 20


def file_sha256(path: str) -> str:
  """Hex SHA-256 of the file's bytes (memoized per process on its size, mtime_ns, ctime_ns and inode)."""
  st = os.stat(path)
  return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:  # pylint: disable=unused-argument
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_READ), b""):
      digest.update(block)
  return digest.hexdigest()


@contextlib.contextmanager
def exclusive(directory: str) -> Iterator[bool]:
  """Holds an exclusive lock on `directory` (created if missing) inside the block, waiting for any holder.

  Yields True when locked, False on a filesystem without flock on directories (the caller must then
  not assume it is the only builder).
  """
  os.makedirs(directory, exist_ok=True)
  fd = os.open(directory, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      log.warning("another process is building in %s; waiting for it", directory)
      fcntl.flock(fd, fcntl.LOCK_EX)
      locked = True
    except OSError:  # no locks on this filesystem
      locked = False
    yield locked
  finally:
    os.close(fd)  # releases the lock


def remove_stale(parent: str, prefix: str) -> list[str]:
  """Removes the entries of `parent` whose names start with `prefix`; returns their paths.

  Only for temporaries of a build whose lock the caller holds: nobody else can be writing them.
  """
  try:
    names = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
  except FileNotFoundError:
    return []
  removed = []
  for name in names:
    path = os.path.join(parent, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    removed.append(path)
  if removed:
    log.info("removed %d temporary folder(s) of crashed builds: %s", len(removed), ", ".join(removed))
  return removed


def build_once(target: str, done_file: str, write: Callable[[str], None]) -> bool:
  """Makes directory `target` with `write(tmp_dir)` unless `target/done_file` exists; True if this call built it.

  `write` fills a fresh temporary sibling, renamed to `target` when it returns, so `target` is never
  partial. Under the lock, stale `<target>.tmp*` siblings and a `target` without `done_file` (not
  written by this function) are removed first. The lock is the parent directory's: builds into one
  parent take turns.
  """
  if os.path.exists(os.path.join(target, done_file)):
    return False
  parent, name = os.path.split(target)
  with exclusive(parent) as locked:
    if os.path.exists(os.path.join(target, done_file)):  # built by the process we waited for
      return False
    if locked:
      remove_stale(parent, name + ".tmp")
      if os.path.isdir(target):
        shutil.rmtree(target)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp", dir=parent)
    try:
      write(tmp)
      try:
        os.rename(tmp, target)
      except OSError:  # no lock here and another process finished first; its cache is identical
        if not os.path.exists(os.path.join(target, done_file)):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return True
