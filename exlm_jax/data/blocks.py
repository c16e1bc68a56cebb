"""Block sources over a token cache: index -> one block of `seq_len` slots, and the training batch stream.

One example per block (`RecordBlocks`: `<s> record </s> <pad>...`; `TextBlocks`: windows of a document stream),
or packed blocks (`PackedBlocks`): several complete examples per block, each its own `<s> ... </s>`, with
`segment_ids` (0 = padding, 1..E) and per-example `positions`, laid out once by a greedy pass in record order
(`greedy_pack`, cached beside the token cache as a `PackTable`, keyed by seq_len, max_examples_per_block and
the over-long rule). `TrainBatches` is the Grain source: batch t is a function of (seed, t) only
(docs/design.md §6). exlm_jax/data/pipeline.py builds these from a config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
from typing import Any

import numpy as np

from exlm_jax.data import caches
from exlm_jax.data import vocab

PACK_VERSION = 1


def _read_meta(directory: str, split: str) -> dict[str, Any]:
  with open(os.path.join(directory, f"{split}.json")) as f:
    return json.load(f)



# ----------------------------------------------------------------------------------------------
# Block sources: random access, index -> {'tokens': (seq_len,) int32} (+ segment_ids, positions)
# ----------------------------------------------------------------------------------------------

class _CachedTokens:
  """Opens the memory-mapped token file lazily, so sources pickle cheaply to Grain workers."""

  def __init__(self, directory: str, split: str):
    self._directory, self._split = directory, split
    self._meta = _read_meta(directory, split)
    self._tokens = None

  @property
  def tokens(self) -> np.ndarray:
    if self._tokens is None:
      path = os.path.join(self._directory, f"{self._split}.tokens")
      dtype = np.dtype(self._meta["dtype"])
      self._tokens = (np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path)
                      else np.zeros((0,), dtype))
    return self._tokens

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tokens"] = None
    return state


def make_blocks(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """(R, seq_len) int32 rows `<s> tokens[start:start+length] </s> <pad>...`, one gather for all rows.

  lengths must be in [0, seq_len - 2]. Vectorized because per-row Python is the pipeline's hot path.
  """
  rows = len(starts)
  span = np.arange(seq_len - 2)
  inside = span[None, :] < lengths[:, None]
  positions = np.where(inside, starts[:, None] + span[None, :], 0)
  out = np.full((rows, seq_len), vocab.PAD, np.int32)
  out[:, 0] = vocab.BOS
  if tokens.size:
    out[:, 1:-1] = np.where(inside, tokens[positions.ravel()].reshape(positions.shape), vocab.PAD)
  out[np.arange(rows), 1 + lengths] = vocab.EOS
  return out


def make_packed_blocks(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
                       num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """Packed rows {'tokens', 'segment_ids', 'positions'}, each (num_rows, seq_len) int32, one scatter.

  Example i, `<s> tokens[starts[i]:starts[i] + lengths[i]] </s>`, goes to row rows[i] after that row's
  earlier examples; rows must be non-decreasing, lengths in [0, seq_len - 2] and every row's
  sum(lengths + 2) <= seq_len. segment_ids count 1, 2, ... inside a row; positions restart at 0 at
  each <s>; padding is <pad> / segment 0 / position 0.
  """
  out = {name: np.zeros((num_rows, seq_len), np.int32) for name in ("tokens", "segment_ids", "positions")}
  out["tokens"][:] = vocab.PAD
  if not len(lengths):
    return out
  sizes = np.asarray(lengths, np.int64) + 2
  end = np.cumsum(sizes)
  begin = end - sizes  # slot offset of every example in the concatenation of all rows
  index = np.arange(len(sizes))
  new_row = np.r_[True, rows[1:] != rows[:-1]]
  column = begin - np.maximum.accumulate(np.where(new_row, begin, 0))
  segment = index - np.maximum.accumulate(np.where(new_row, index, 0)) + 1
  example = np.repeat(index, sizes)  # per filled slot
  offset = np.arange(end[-1]) - begin[example]  # 0 at <s>
  source = np.clip(starts[example] + offset - 1, 0, max(tokens.size - 1, 0))
  content = tokens[source] if tokens.size else np.zeros_like(source)
  values = np.where(offset == 0, vocab.BOS, np.where(offset == sizes[example] - 1, vocab.EOS, content))
  at = (rows[example], column[example] + offset)
  out["tokens"][at] = values
  out["segment_ids"][at] = segment[example]
  out["positions"][at] = offset
  return out


def one_segment_rows(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """The packed-batch form of one-example rows: segment 1 on the real slots, positions 0.. (0 at padding)."""
  real = tokens != vocab.PAD
  positions = np.where(real, np.arange(tokens.shape[1], dtype=np.int32)[None, :], 0).astype(np.int32)
  return {"tokens": tokens, "segment_ids": real.astype(np.int32), "positions": positions}


class Blocks(_CachedTokens):
  """Random access to blocks: `.rows(ids)` -> the batch dict of those blocks, `[i]` -> one block's dict,
  `.batch(ids)` -> tokens only, (len(ids), seq_len).

  with_segments: rows also carry segment_ids / positions (data.packing), one segment per block here.
  """

  with_segments = False

  def _spans(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _check_ids(self, ids) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
      raise IndexError(f"block index out of range [0, {len(self)})")
    return ids

  def batch(self, ids: np.ndarray) -> np.ndarray:
    starts, lengths = self._spans(self._check_ids(ids))
    return make_blocks(self.tokens, starts, lengths, self._seq_len)

  def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    tokens = self.batch(ids)
    return one_segment_rows(tokens) if self.with_segments else {"tokens": tokens}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {name: value[0] for name, value in self.rows(np.asarray([index])).items()}


class RecordBlocks(Blocks):
  """One record (molecule, or document with text_units='documents') per block: block i -> record keep[i].

  Content longer than seq_len - 2 is truncated here; 'skip' mode is applied by leaving such records
  out of `keep` (see records_keep).
  """

  def __init__(self, directory: str, split: str, seq_len: int, keep: np.ndarray):
    super().__init__(directory, split)
    self._offsets = np.load(os.path.join(directory, f"{split}.offsets.npy"))
    self._keep = np.asarray(keep, np.int64)
    self._seq_len = seq_len

  def __len__(self) -> int:
    return len(self._keep)

  def _spans(self, ids):
    records = self._keep[ids]
    starts = self._offsets[records]
    return starts, np.minimum(self._offsets[records + 1] - starts, self._seq_len - 2)


def records_keep(offsets: np.ndarray, seq_len: int, overlong: str) -> tuple[np.ndarray, dict[str, int]]:
  """Records that become examples, and the counts: untokenizable (length 0) and over-long ones.

  overlong: 'truncate' keeps over-long records (cut at seq_len - 2 content tokens), 'skip' drops them.
  """
  if overlong not in ("truncate", "skip"):
    raise ValueError(f"config.data.overlong={overlong!r}; choose 'truncate' or 'skip'")
  lengths = np.diff(offsets)
  too_long = lengths > seq_len - 2
  ok = lengths > 0
  if overlong == "skip":
    ok &= ~too_long
  counts = dict(skipped_untokenizable=int(np.count_nonzero(lengths == 0)),
                truncated_overlong=int(np.count_nonzero(too_long)) if overlong == "truncate" else 0,
                skipped_overlong=int(np.count_nonzero(too_long)) if overlong == "skip" else 0)
  return np.flatnonzero(ok), counts


def greedy_pack(sizes: np.ndarray, seq_len: int, max_examples: int) -> tuple[np.ndarray, int]:
  """Greedy packing in order: (starts (num_blocks + 1,) int64, closed_early).

  sizes (R,): slots each example takes (<= seq_len). Block b holds examples starts[b]:starts[b + 1]. An
  example that does not fit closes the block; a block holding max_examples examples (<= 0: no cap) is
  closed before the next example even if it would fit -- counted in closed_early.
  """
  starts, used, count, closed_early = [0], 0, 0, 0
  cap = max_examples if max_examples > 0 else len(sizes) + 1
  for i, size in enumerate(np.asarray(sizes, np.int64).tolist()):
    if count and (used + size > seq_len or count == cap):
      closed_early += int(used + size <= seq_len)
      starts.append(i)
      used = count = 0
    used += size
    count += 1
  if count:
    starts.append(len(sizes))
  return np.asarray(starts, np.int64), closed_early


@dataclasses.dataclass(frozen=True)
class PackTable:
  """Block b holds records[starts[b]:starts[b + 1]] (record ids of the token cache, in corpus order)."""

  records: np.ndarray  # (R,) int64
  starts: np.ndarray  # (num_blocks + 1,) int64

  def __len__(self) -> int:
    return len(self.starts) - 1


def pack_key(seq_len: int, max_examples: int, overlong: str) -> str:
  """The pack table's cache key: everything that decides which records share a block."""
  return f"n{seq_len}-e{max_examples if max_examples > 0 else 'auto'}-{overlong}-v{PACK_VERSION}"


def pack_tables(directory: str, keep: dict[str, np.ndarray], sizes: dict[str, np.ndarray], seq_len: int,
                max_examples: int, overlong: str) -> tuple[dict[str, PackTable], dict[str, Any]]:
  """The pack table of every split (greedy, in record order), built once and saved under `directory/packs`.

  keep[split]: record ids that become examples; sizes[split]: their slots (truncated length + 2).
  max_examples -1: the most the uncapped pass puts in one block of any split. Returns the tables and
  {'max_examples_per_block': E, split: {'blocks', 'examples', 'closed_early', 'most_examples'}}.
  """
  target = os.path.join(directory, "packs", pack_key(seq_len, max_examples, overlong))

  def write(tmp: str) -> None:
    info: dict[str, Any] = {}
    for split in keep:
      starts, closed_early = greedy_pack(sizes[split], seq_len, max_examples)
      np.save(os.path.join(tmp, f"{split}.records.npy"), np.asarray(keep[split], np.int64))
      np.save(os.path.join(tmp, f"{split}.starts.npy"), starts)
      info[split] = dict(blocks=len(starts) - 1, examples=len(keep[split]), closed_early=closed_early,
                         most_examples=int(np.diff(starts).max(initial=0)))
    info["max_examples_per_block"] = (max_examples if max_examples > 0 else
                                      max(1, *(info[split]["most_examples"] for split in keep)))
    with open(os.path.join(tmp, "packs.json"), "w") as f:
      json.dump(info, f)

  caches.build_once(target, "packs.json", write)
  with open(os.path.join(target, "packs.json")) as f:
    info = json.load(f)
  tables = {split: PackTable(np.load(os.path.join(target, f"{split}.records.npy")),
                             np.load(os.path.join(target, f"{split}.starts.npy"))) for split in keep}
  return tables, info


class PackedBlocks(Blocks):
  """Several records per block, by a PackTable; rows carry segment_ids and per-example positions."""

  with_segments = True

  def __init__(self, directory: str, split: str, seq_len: int, table: PackTable):
    super().__init__(directory, split)
    self._offsets = np.load(os.path.join(directory, f"{split}.offsets.npy"))
    self._table = table
    self._seq_len = seq_len

  def __len__(self) -> int:
    return len(self._table)

  def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = self._check_ids(ids)
    first = self._table.starts[ids]
    counts = self._table.starts[ids + 1] - first
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # 0.. inside each block
    records = self._table.records[np.repeat(first, counts) + within]
    starts = self._offsets[records]
    lengths = np.minimum(self._offsets[records + 1] - starts, self._seq_len - 2)
    return make_packed_blocks(self.tokens, starts, lengths, np.repeat(np.arange(len(ids)), counts), len(ids),
                              self._seq_len)

  def batch(self, ids: np.ndarray) -> np.ndarray:
    return self.rows(ids)["tokens"]


class TextBlocks(Blocks):
  """Consecutive windows of seq_len - 2 tokens of the document stream, each wrapped <s> ... </s>."""

  def __init__(self, directory: str, split: str, seq_len: int, with_segments: bool = False):
    super().__init__(directory, split)
    self._seq_len = seq_len
    self._content = seq_len - 2
    self.with_segments = with_segments

  def __len__(self) -> int:
    return math.ceil(self._meta["tokens"] / self._content)

  def _spans(self, ids):
    starts = ids * self._content
    return starts, np.clip(self._meta["tokens"] - starts, 0, self._content)


class TrainBatches:
  """Grain source: index t -> this process's rows of global training batch t (infinite).

  The global stream is every block once per epoch in a fresh seeded permutation per epoch
  (numpy, keyed by (seed, epoch)); global batch t is stream positions t*B .. t*B + B - 1 and
  process p takes its contiguous slice of B // P rows. So batches depend only on (seed, t): resume
  is exact and the union over processes does not depend on the process count.
  """

  def __init__(self, blocks: Blocks, global_batch: int, process_index: int, process_count: int, seed: int):
    self._blocks = blocks
    self._n = len(blocks)
    self._global = global_batch
    self._local = global_batch // process_count
    self._first = process_index * self._local
    self._seed = seed
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) >= 2:  # batches straddle at most two epochs
          self._perms.pop(min(self._perms))
        dtype = np.int32 if self._n < 2**31 else np.int64
        self._perms[epoch] = np.random.default_rng([self._seed, epoch]).permutation(self._n).astype(dtype)
      return self._perms[epoch]

  def block_ids(self, t: int) -> np.ndarray:
    """(B // P,) indices into the block source for this process's part of global batch t."""
    positions = int(t) * self._global + self._first + np.arange(self._local)
    epochs, within = np.divmod(positions, self._n)
    ids = np.empty(self._local, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      ids[sel] = self._permutation(int(epoch))[within[sel]]
    return ids

  def __getitem__(self, t: int) -> dict[str, np.ndarray]:
    return self._blocks.rows(self.block_ids(t))

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_perms"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


