"""The deterministic train / eval hold-out: one scan decides every record's fate before anything is written.

A record is held out when a 64-bit hash of its text falls below `eval_fraction` of the hash range, so
the split depends only on the text: duplicates always land in the same split (the hold-out never leaks
a copy of a training record) and rebuilding gives the same split on any machine.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator

import numpy as np

# Fate of each source row.
EMPTY, INVALID, TRAIN, EVAL = 0, 1, 2, 3


def _text_hash(text: str) -> int:
  """64-bit hash of a record's text: decides the hold-out, so duplicates always share a split."""
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def scan_records(records: Iterator[str], *, max_examples: int, eval_fraction: float,
                 validate: Callable[[str], bool] | None = None) -> np.ndarray:
  """(rows read,) uint8 status per row: EMPTY, INVALID (`validate` False), TRAIN or EVAL (hash hold-out).

  Reads at most `max_examples` rows (-1 = all). With eval_fraction > 0 and at least two usable rows,
  the hold-out is never empty: if no row hashes below the fraction, the lowest-hash row is held out.
  """
  status = bytearray()
  lowest = (2**64, -1)
  for index, text in enumerate(records):
    if 0 <= max_examples <= index:
      break
    if not text:
      status.append(EMPTY)
    elif validate is not None and not validate(text):
      status.append(INVALID)
    else:
      h = _text_hash(text)
      status.append(EVAL if h < eval_fraction * 2.0**64 else TRAIN)
      lowest = min(lowest, (h, index))
  out = np.frombuffer(bytes(status), np.uint8).copy()
  usable = np.count_nonzero(out >= TRAIN)
  if eval_fraction > 0 and usable >= 2 and not np.any(out == EVAL):
    out[lowest[1]] = EVAL
  return out


def status_counts(status: np.ndarray) -> dict[str, int]:
  """Counts of a scan: every row read is exactly one of empty / invalid / train / eval."""
  counts = np.bincount(status, minlength=4)
  return dict(records_read=int(len(status)), skipped_empty=int(counts[EMPTY]),
              skipped_invalid=int(counts[INVALID]), train=int(counts[TRAIN]), eval=int(counts[EVAL]))
