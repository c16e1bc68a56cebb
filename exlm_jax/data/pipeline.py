"""Grain input pipeline: corpus -> tokenizer -> token cache -> fixed blocks -> sharded batches.

Every row the trainer sees is exactly `seq_len` slots. Without packing (data.packing=False) a row is
one example `<s> ... </s>` then `<pad>` (docs/design.md §2) and a batch is {'tokens': (B, n) int32}:
- SMILES (data.name='smiles'): one molecule per block. A molecule longer than seq_len - 2 tokens is
  truncated (keeping <s> at 0 and </s> last) or skipped, by data.overlong; counted either way.
- Text (data.name='text', data.text_units='stream'): documents are tokenized, joined into one stream
  with </s> between documents, and cut into consecutive blocks of seq_len - 2 content tokens wrapped as
  <s> ... </s> (the last block is padded). Blocks are addressed by index, so they are deterministic.
- Text with data.text_units='documents': each document is a record like a molecule (truncated or
  skipped by data.overlong when longer than seq_len - 2 tokens).

Packing (data.packing=True): records (molecules, or documents with text_units='documents') are put
several to a block, each keeping its own `<s> ... </s>`, and a batch is the dict of
objectives/segments.py: tokens, segment_ids (0 = padding, 1..E the examples in order) and positions
(0 at each example's <s>). The pack is greedy in record order: a record that does not fit closes the
block and opens the next; a block that already holds data.max_examples_per_block records is closed
early (counted). max_examples_per_block=-1 uses the most the uncapped greedy pass puts in one block
of either split (the bound the objectives' static shapes need: PretrainingData.max_examples_per_block).
The pack is computed once per (token cache, seq_len, max_examples_per_block, overlong) and saved as a
pack table beside the token cache (`packs/<key>/{split}.records.npy` record ids in block order and
`{split}.starts.npy`: block b holds records[starts[b]:starts[b + 1]]). Text stream windows already
fill their blocks; with packing on they come as one segment each in the same dict form.
The summary counts examples_per_block, slot_utilisation (real slots / all slots, train split),
closed_early and the max_examples_per_block used; eval batches are packed the same way.

Tokenization runs once per (corpus, tokenizer) and is cached as flat token files under
`<tfds_dir>/exlm_token_cache/`, memory-mapped afterwards. Training batches come from a Grain
MapDataset whose element t is this process's slice of global batch t (TrainBatches): every block once
per epoch in a fresh seeded permutation, rows assembled with one vectorized gather. The iterator's
state is one integer (`get_state()` -> {'next_index': t}; with data.num_workers > 0 Grain's
multiprocess state), so resume is exact and the state fits in JSON or Orbax's grain checkpoint
handler. Process p of P takes rows p*B/P .. (p+1)*B/P - 1 of each global batch, so the union over
processes of batch t is the same set of blocks for any P.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
from etils import epath

from exlm_jax.data import builders
from exlm_jax.data.blocks import (  # noqa: F401  (re-exported: pipeline.X is the public path)
    Blocks, PackedBlocks, PackTable, RecordBlocks, TextBlocks, TrainBatches, _read_meta, greedy_pack,
    make_blocks, make_packed_blocks, one_segment_rows, pack_key, pack_tables, records_keep)
from exlm_jax.data import caches
from exlm_jax.data import tokenizers
from exlm_jax.data import vocab

CACHE_VERSION = 1
_CHUNK = 8192
EVAL_ORDER_SEED = 0  # eval rows come in a fixed order, the same for every run and objective

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Token cache: flat token ids per split, written once, memory-mapped afterwards
# ----------------------------------------------------------------------------------------------

def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def _encode_chunk(tok: tokenizers.Tokenizer, texts: list[str]) -> tuple[list[list[int]], int]:
  """Encodes strings; a string the tokenizer rejects (uncovered SMILES) becomes [] and is counted."""
  try:
    return tok.encode_batch(texts), 0
  except tokenizers.UncoveredSmilesError:
    out, bad = [], 0
    for t in texts:
      try:
        out.append(tok.encode(t))
      except tokenizers.UncoveredSmilesError:
        out.append([])
        bad += 1
    return out, bad


def write_token_cache(strings: Sequence[str], tok: tokenizers.Tokenizer, directory: str, split: str,
                      mode: str) -> dict[str, int]:
  """Tokenizes one split into `directory/{split}.tokens` (+ `.offsets.npy` for SMILES).

  mode 'records' (SMILES): tokens of record r are tokens[offsets[r]:offsets[r+1]]; a record that
  could not be tokenized has length 0. mode 'stream' (text): documents joined by </s> (empty
  documents left out), no offsets. Returns the split's counts, also saved as `{split}.json`.
  """
  dtype = _token_dtype(tok.vocab_size)
  chunks = strings.chunks(_CHUNK) if hasattr(strings, "chunks") else (
      list(strings[i:i + _CHUNK]) for i in range(0, len(strings), _CHUNK))
  offsets = [0]
  meta = dict(records=0, untokenizable=0, empty=0, tokens=0, unk_tokens=0, max_len=0)
  with open(os.path.join(directory, f"{split}.tokens"), "wb") as f:
    for texts in chunks:
      ids, bad = _encode_chunk(tok, texts)
      meta["records"] += len(texts)
      meta["untokenizable"] += bad
      pieces = []
      for seq in ids:
        if mode == "records":
          pieces.append(seq)
          offsets.append(offsets[-1] + len(seq))
        elif seq:
          if meta["tokens"] or pieces:
            pieces.append([vocab.EOS])
          pieces.append(seq)
        else:
          meta["empty"] += 1
        meta["max_len"] = max(meta["max_len"], len(seq))
      flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64,
                         count=sum(len(p) for p in pieces))
      meta["tokens"] += len(flat)
      meta["unk_tokens"] += int(np.count_nonzero(flat == vocab.UNK))
      f.write(flat.astype(dtype).tobytes())
  if mode == "records":
    np.save(os.path.join(directory, f"{split}.offsets.npy"), np.asarray(offsets, np.int64))
  meta.update(dtype=dtype.name, mode=mode)
  with open(os.path.join(directory, f"{split}.json"), "w") as f:
    json.dump(meta, f)
  return meta


def token_cache(corpus: builders.Corpus, tok: tokenizers.Tokenizer, mode: str) -> str:
  """Returns the cache directory for (corpus, tokenizer), tokenizing both splits if it is missing.

  Keyed on the corpus name (which carries the corpus file's content hash, builders.py) and the
  tokenizer's fingerprint; built once under a lock and renamed into place (caches.build_once), so a
  crashed run never leaves a partial cache and its temporaries are removed by the next build.
  """
  key = f"{tok.kind}-{tok.fingerprint()}-{mode}-v{CACHE_VERSION}"
  directory = os.path.join(corpus.data_dir, "exlm_token_cache", corpus.name.replace("/", "__"), key)

  def write(tmp: str) -> None:
    for split, strings in (("train", corpus.train), ("eval", corpus.eval)):
      meta = write_token_cache(strings, tok, tmp, split, mode)
      log.info("tokenized %s/%s: %s", corpus.name, split, meta)

  caches.build_once(directory, "eval.json", write)
  return directory


# ----------------------------------------------------------------------------------------------
# The trainer-facing object
# ----------------------------------------------------------------------------------------------

def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside an absl app (tests, notebooks) use defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return process_index, process_count


@dataclasses.dataclass
class PretrainingData:
  """Tokenizer, training stream, eval batches and counts for one pretraining run."""

  tokenizer: tokenizers.Tokenizer
  train_blocks: Blocks  # block i -> {'tokens': (seq_len,)} (+ segment_ids, positions when packed); .rows(ids)
  eval_blocks: Blocks
  summary: dict[str, Any]
  seq_len: int
  batch_size: int  # global
  seed: int
  num_eval_batches: int
  num_workers: int = 0
  prefetch_batches: int = 4
  packing: bool = False  # batches are {'tokens', 'segment_ids', 'positions'} (objectives/segments.py)
  max_examples_per_block: int = 1  # the most examples one block holds: the objectives' static mask bound

  def local_batch_size(self, process_count: int) -> int:
    if self.batch_size % process_count:
      raise ValueError(f"config.batch_size={self.batch_size} must be divisible by the "
                       f"{process_count} processes; pick a multiple of {process_count}")
    return self.batch_size // process_count

  def train_dataset(self, process_index: int | None = None, process_count: int | None = None):
    """The infinite grain MapDataset of this process's batches (before conversion to an iterator)."""
    import grain  # pylint: disable=g-import-not-at-top
    p, count = _process(process_index, process_count)
    self.local_batch_size(count)  # validates divisibility
    return grain.MapDataset.source(TrainBatches(self.train_blocks, self.batch_size, p, count, self.seed))

  def train_iterator(self, process_index: int | None = None, process_count: int | None = None):
    """Infinite shuffled iterator of {'tokens': (batch_size // P, seq_len) int32} for this process
    (+ 'segment_ids', 'positions' of the same shape with packing).

    A grain DatasetIterator: `get_state()` / `set_state(state)` save and restore the position exactly
    (save with JSON or orbax's grain checkpoint handler). Defaults to jax.process_index()/count().
    """
    import grain  # pylint: disable=g-import-not-at-top
    ds = self.train_dataset(process_index, process_count)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=self.prefetch_batches))
    if self.num_workers > 0:
      _ensure_absl_flags_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return iter(it_ds)

  def eval_batches(self, process_index: int | None = None,
                   process_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """At most config.eval_batches batches over the eval split, in a fixed order; same on every run.

    Global batch t holds eval rows t*B .. t*B + B - 1 (of a fixed permutation); process p takes its
    contiguous slice of batch_size // P rows. Past the end of the split rows are all <pad> (segment 0),
    which the objectives ignore, so every process yields the same number of batches and nothing is dropped.
    """
    p, count = _process(process_index, process_count)
    local = self.local_batch_size(count)
    n = len(self.eval_blocks)
    num = math.ceil(n / self.batch_size)
    if self.num_eval_batches > 0:
      num = min(num, self.num_eval_batches)
    order = np.random.default_rng(EVAL_ORDER_SEED).permutation(n)
    batches = []
    for t in range(num):
      positions = t * self.batch_size + p * local + np.arange(local)
      real = positions < n
      blocks = self.eval_blocks.rows(order[positions[real]])
      batch = {name: np.zeros((local, self.seq_len), np.int32) for name in blocks}
      batch["tokens"][:] = vocab.PAD
      for name, value in blocks.items():
        batch[name][real] = value
      batches.append(batch)
    return batches


def _tokenizer_for_run(data_cfg, corpus: builders.Corpus, workdir: str | None) -> tokenizers.Tokenizer:
  """workdir/tokenizer when present (resume), else built (or reused from the data-side cache) and saved there.

  The data-side cache `exlm_tokenizers/<corpus name>/<spec>` is keyed on the corpus name, which carries
  the corpus file's content hash (builders.py): an edited corpus gets a new vocabulary.
  """
  kind = data_cfg.tokenizer
  run_dir = epath.Path(workdir) / "tokenizer" if workdir else None  # epath: workdirs may be remote
  if run_dir and (run_dir / tokenizers.CONFIG_FILE).exists():
    tok = tokenizers.load(run_dir)
    if tok.kind != kind:
      raise ValueError(f"{run_dir} holds a {tok.kind!r} tokenizer but config.data.tokenizer={kind!r}; "
                       "use a fresh workdir (or delete that directory) to change tokenizer")
    return tok
  if kind == tokenizers.FROM_CHECKPOINT:
    raise ValueError(f"config.data.tokenizer={kind!r} is a checkpoint's tokenizer and {run_dir} has none; it "
                     "comes with --config.init_from=hf:PATH (or choose one of " + ", ".join(tokenizers.KINDS) + ")")
  spec = kind if kind == "smiles_regex" else (
      f"{kind}-v{int(data_cfg.vocab_size)}-n{int(data_cfg.get('spm_max_sentences', 500_000))}")
  cache_dir = os.path.join(corpus.data_dir, "exlm_tokenizers", corpus.name.replace("/", "__"), spec)
  tok = tokenizers.build_tokenizer(data_cfg, corpus.train, cache_dir)
  if run_dir:
    tokenizers.save_atomic(tok, run_dir)
  return tok


def _check_data_config(data_cfg) -> None:
  """Fails fast, before any build, on settings that cannot work together."""
  if data_cfg.name not in ("smiles", "text"):
    raise ValueError(f"config.data.name={data_cfg.name!r}; choose 'smiles' or 'text'")
  if data_cfg.tokenizer not in (*tokenizers.KINDS, tokenizers.FROM_CHECKPOINT):
    raise ValueError(f"unknown config.data.tokenizer {data_cfg.tokenizer!r}; "
                     f"choose one of {', '.join(tokenizers.KINDS)}")
  if data_cfg.tokenizer == "smiles_regex" and data_cfg.name != "smiles":
    raise ValueError("tokenizer 'smiles_regex' reads SMILES only; for data.name='text' use 'sentencepiece'")
  if data_cfg.name == "text" and data_cfg.text_units not in ("stream", "documents"):
    raise ValueError(f"config.data.text_units={data_cfg.text_units!r}; choose 'stream' (windows of the "
                     "document stream) or 'documents' (one document per example)")
  if _token_mode(data_cfg) == "records" and data_cfg.get("overlong", "truncate") not in ("truncate", "skip"):
    raise ValueError(f"config.data.overlong={data_cfg.overlong!r}; choose 'truncate' or 'skip'")
  max_examples = data_cfg.max_examples_per_block
  if isinstance(max_examples, bool) or not isinstance(max_examples, int) or not (max_examples == -1 or
                                                                                 max_examples >= 1):
    raise ValueError(f"config.data.max_examples_per_block={max_examples!r}; use an integer >= 1, or -1 for "
                     "the most a greedy pass over the corpus puts in one block")


def _token_mode(data_cfg) -> str:
  """'records' (one token span per molecule / document) or 'stream' (text documents joined by </s>)."""
  if data_cfg.name == "smiles" or data_cfg.text_units == "documents":
    return "records"
  return "stream"


def load_pretraining_data(config, workdir: str | None) -> PretrainingData:
  """Builds/opens the corpus, the tokenizer (saved under workdir/tokenizer) and the block sources.

  Uses config.data.*, config.seq_len, config.batch_size (global), config.seed, config.eval_batches.
  `summary` counts: records_read, skipped_empty / skipped_invalid (build), train/eval records and
  blocks, skipped_untokenizable, truncated_overlong / skipped_overlong (both splits), vocab_size,
  eval_rows_used (eval rows that config.eval_batches covers; the rest are never evaluated),
  slot_utilisation (real slots / all slots of the train blocks), packing; with packing also
  train/eval_examples, examples_per_block (train mean), closed_early (both splits) and the
  max_examples_per_block used.
  """
  data_cfg = config.data
  seq_len = int(config.seq_len)
  if seq_len < vocab.MIN_BLOCK_LEN:
    raise ValueError(f"config.seq_len={seq_len} leaves no room for content between <s> and </s>; "
                     f"use >= {vocab.MIN_BLOCK_LEN}")
  _check_data_config(data_cfg)
  packing = bool(data_cfg.packing)
  corpus = builders.build_corpus(data_cfg)
  tok = _tokenizer_for_run(data_cfg, corpus, workdir)
  mode = _token_mode(data_cfg)
  directory = token_cache(corpus, tok, mode)
  summary = dict(corpus.summary)
  summary.update(vocab_size=tok.vocab_size, tokenizer=tok.kind, seq_len=seq_len, token_cache=directory,
                 skipped_untokenizable=0, truncated_overlong=0, skipped_overlong=0, packing=packing)
  if data_cfg.name == "text":
    summary["text_units"] = data_cfg.text_units
  splits = ("train", "eval")
  blocks, keep, sizes = {}, {}, {}
  for split in splits:
    meta = _read_meta(directory, split)
    summary[f"{split}_tokens"] = meta["tokens"]
    if split == "train":  # the longest example trained on, <s> and </s> included (not the block size)
      summary["max_example_len"] = min(meta["max_len"] + 2, seq_len) if mode == "records" else seq_len
    summary["unk_tokens"] = summary.get("unk_tokens", 0) + meta["unk_tokens"]
    if mode == "records":
      offsets = np.load(os.path.join(directory, f"{split}.offsets.npy"))
      keep[split], counts = records_keep(offsets, seq_len, data_cfg.overlong)
      sizes[split] = np.minimum(np.diff(offsets)[keep[split]], seq_len - 2) + 2
      for key, value in counts.items():
        summary[key] += value
      if not packing:
        blocks[split] = RecordBlocks(directory, split, seq_len, keep[split])
    else:
      summary["skipped_untokenizable"] += meta["empty"]  # documents that tokenized to nothing
      blocks[split] = TextBlocks(directory, split, seq_len, with_segments=packing)
  max_examples = 1
  if packing and mode == "records":
    tables, info = pack_tables(directory, keep, sizes, seq_len, int(data_cfg.max_examples_per_block),
                               data_cfg.overlong)
    max_examples = info["max_examples_per_block"]
    for split in splits:
      blocks[split] = PackedBlocks(directory, split, seq_len, tables[split])
      summary[f"{split}_examples"] = info[split]["examples"]
    summary.update(max_examples_per_block=max_examples,
                   closed_early=sum(info[split]["closed_early"] for split in splits))
  for split in splits:
    summary[f"{split}_blocks"] = len(blocks[split])
  num_eval_batches = int(config.eval_batches)
  summary["eval_rows_used"] = (summary["eval_blocks"] if num_eval_batches <= 0 else
                               min(summary["eval_blocks"], num_eval_batches * int(config.batch_size)))
  if summary["train_blocks"] == 0:
    raise ValueError(f"no training blocks from {corpus.summary['source']} ({summary}); "
                     "check config.data.overlong / seq_len and the corpus")
  real_slots = int(sizes["train"].sum()) if mode == "records" else summary["train_tokens"] + 2 * summary["train_blocks"]
  summary["slot_utilisation"] = round(real_slots / (summary["train_blocks"] * seq_len), 4)
  if packing and mode == "records":
    summary["examples_per_block"] = round(summary["train_examples"] / summary["train_blocks"], 3)
  if summary["eval_blocks"] == 0:
    log.warning("eval split of %s is empty; raise config.data.eval_fraction or set data.eval_path", corpus.name)
  log.info("pretraining data: %s", summary)
  return PretrainingData(
      tokenizer=tok, train_blocks=blocks["train"], eval_blocks=blocks["eval"], summary=summary,
      seq_len=seq_len, batch_size=int(config.batch_size), seed=int(config.seed),
      num_eval_batches=num_eval_batches,
      num_workers=int(data_cfg.get("num_workers", 0)),
      prefetch_batches=int(data_cfg.get("prefetch_batches", 4)),
      packing=packing, max_examples_per_block=max_examples)


def iterator_state_json(iterator) -> str:
  """The iterator's position as JSON (for trainers that checkpoint it beside the model)."""
  return json.dumps(iterator.get_state())


def restore_iterator_state(iterator, state_json: str) -> None:
  iterator.set_state(json.loads(state_json))


def first_batches(iterator: Iterator[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
  """The next `n` batches as a list (tests and debugging)."""
  return [next(iterator) for _ in range(n)]
