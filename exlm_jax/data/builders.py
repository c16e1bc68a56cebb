"""Building and opening the pretraining corpus for config.data: TFDS array_record builds, read without TensorFlow.

One build stores one raw string per record (feature `text`), so it serves every tokenizer
(tokenization happens in pipeline.py); SMILES corpora hold one molecule per record, text corpora one
document per record. The pieces, one concern each:
- `readers`: the source (a local path, `$DATA/...`, `rdkit:NCI/first_5K.smi` or an http(s) URL fetched
  by the TFDS download manager) and its records (.smi / .csv / .tsv / .jsonl / plain text, optionally .gz);
- `holdout`: the deterministic hold-out of `eval_fraction` of the records, chosen by a hash of the
  record's text (used when data_cfg.eval_path names no eval file);
- `tfds_corpus`: the TFDS builder classes (`exlm_smiles_corpus`, `exlm_text_corpus`) that write the
  splits `train` and `eval` (from the eval file or the hold-out);
- here: the BuilderConfig for a data config, `build_corpus` and the `Strings` view of a split.
Each source gets its own BuilderConfig named `<file>-<hash of (source, its content, max_examples, column, ...)>`,
so different files or limits never collide, and a file edited in place (same size, same mtime even) is
a new corpus: the config holds the SHA-256 of each local file's bytes (caches.file_sha256), and the
token cache and tokenizer cache are named after the config (pipeline.py), so they follow. A URL is
keyed on the URL; its download's SHA-256 is recorded in the build. The summary reports the hashes
(`content_sha256`, and `eval_content_sha256` for an eval file). A build runs under a lock, once per
config even when processes share a tfds_dir; TFDS's temporaries (`incomplete.*`) left by a crashed build
of the same config are removed first.

Every record read is accounted for: train + eval + skipped_empty + skipped_invalid == records_read,
kept in the dataset's metadata.json and returned as `Corpus.summary`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Iterator, Sequence

from exlm_jax.data import caches
from exlm_jax.data.readers import is_url, read_records, resolve_source

log = logging.getLogger(__name__)


def tfds_data_dir(data_cfg) -> str:
  """Where TFDS builds: data_cfg.tfds_dir, else $EXLM_TFDS_DIR, else ~/tensorflow_datasets."""
  root = data_cfg.tfds_dir or os.environ.get("EXLM_TFDS_DIR", "") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(root))


def _config_fields(data_cfg) -> dict[str, Any]:
  """The builder-relevant part of data_cfg, with sources resolved (errors for missing files here)."""
  kind = data_cfg.name
  if kind not in ("smiles", "text"):
    raise ValueError(f"config.data.name={kind!r}; choose 'smiles' or 'text'")
  eval_path = data_cfg.eval_path or ""
  fraction = float(data_cfg.eval_fraction)
  if not eval_path and not 0.0 <= fraction < 1.0:
    raise ValueError(f"config.data.eval_fraction={fraction} must be in [0, 1)")
  source = resolve_source(data_cfg.path, "config.data.path")
  eval_source = resolve_source(eval_path, "config.data.eval_path") if eval_path else ""
  return dict(
      kind=kind,
      source=source,
      eval_source=eval_source,
      source_sha256=_content_key(source),
      eval_source_sha256=_content_key(eval_source),
      eval_fraction=0.0 if eval_path else fraction,
      column=str(data_cfg.column or ""),
      max_examples=int(data_cfg.max_examples),
      validate_smiles=bool(data_cfg.validate_smiles) and kind == "smiles",
      documents=str(data_cfg.documents) if kind == "text" else "",
  )


def _content_key(source: str) -> str:
  """SHA-256 of a local file's bytes; '' for no file or a URL (keyed on the URL, hashed when downloaded)."""
  return caches.file_sha256(source) if source and not is_url(source) else ""


def _config_name(fields: dict[str, Any], version: str) -> str:
  """`<file stem>-<12 hex>`: the hash covers every field (the local files' content hashes included) and the
  builder version."""
  keyed = dict(fields, build_version=version)
  digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
  stem = os.path.basename(fields["source"].split("?")[0].rstrip("/")) or "corpus"
  stem = re.sub(r"[^\w.+-]", "_", stem)[:40]
  return f"{stem}-{digest}"


def builder_config(data_cfg):
  """The `tfds_corpus.CorpusConfig` (a tfds BuilderConfig) for config.data; raises on missing files."""
  from exlm_jax.data import tfds_corpus  # pylint: disable=g-import-not-at-top  (imports TFDS, ~3 s)
  fields = _config_fields(data_cfg)
  return tfds_corpus.CorpusConfig(name=_config_name(fields, tfds_corpus.VERSION), version=tfds_corpus.VERSION,
                                  description=json.dumps(fields), **fields)


class Strings(Sequence[str]):
  """Random-access view of one split as Python strings.

  Reads the serialized tf.Example bytes (DeserializeMethod.RAW_BYTES) and pulls out the one `text`
  field with the protobuf parser directly: ~10x faster than TFDS's generic NumPy decoding, which
  matters when tokenizing millions of records.
  """

  def __init__(self, source):
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    self._source = source
    self._parse = tf_example_pb2.Example.FromString

  def _decode(self, raw: bytes) -> str:
    return self._parse(raw).features.feature["text"].bytes_list.value[0].decode("utf-8")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    return self._decode(self._source[index])

  def chunks(self, size: int = 8192) -> Iterator[list[str]]:
    """Consecutive lists of up to `size` strings in order: a sequential scan of the split's files.

    Range reads straight from the array_record shards are ~5x faster than keyed random access,
    which matters when a whole corpus is tokenized.
    """
    instructions = self._file_instructions()
    if instructions is None:
      n = len(self)
      for start in range(0, n, size):
        records = self._source.__getitems__(list(range(start, min(n, start + size))))
        yield [self._decode(r) for r in records]
      return
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    for fi in instructions:
      reader = array_record_module.ArrayRecordReader(os.fspath(fi.filename))
      try:
        for start in range(fi.skip, fi.skip + fi.take, size):
          yield [self._decode(r) for r in reader.read(start, min(fi.skip + fi.take, start + size))]
      finally:
        reader.close()

  def _file_instructions(self):
    """The split's array_record shards and ranges, or None for sources that are not TFDS splits."""
    info, split = getattr(self._source, "dataset_info", None), getattr(self._source, "split", None)
    if info is None or split is None:
      return None
    instructions = info.splits[split].file_instructions
    if sum(fi.take for fi in instructions) != len(self):
      return None
    return instructions

  def __iter__(self) -> Iterator[str]:
    for chunk in self.chunks():
      yield from chunk


@dataclasses.dataclass
class Corpus:
  """A built corpus: `train` / `eval` strings, the counts, and where it lives."""
  train: Strings
  eval: Strings
  summary: dict[str, Any]
  name: str  # "<builder>/<config name>", stable across processes and runs
  data_dir: str  # the TFDS root it was built in


def build_corpus(data_cfg) -> Corpus:
  """Builds (once) and opens the corpus for config.data; returns its splits and counts.

  One process builds a config (holding a lock on `<tfds_dir>/<builder>/<config>/`), the others wait and then
  read it; the holder first removes the `incomplete.*` folders a crashed build of it left. Without file
  locks the deterministic builds race harmlessly (TFDS writes to a temporary directory and renames).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (~3 s; only to build or read)
  from exlm_jax.data import tfds_corpus  # pylint: disable=g-import-not-at-top
  config = builder_config(data_cfg)
  data_dir = tfds_data_dir(data_cfg)
  cls, file_format = tfds_corpus.BUILDERS[config.kind], tfds.core.FileFormat.ARRAY_RECORD
  builder = cls(config=config, data_dir=data_dir, file_format=file_format)
  if not builder.is_prepared():
    _precheck(config)
    config_dir = os.path.dirname(builder.data_dir)  # <tfds_dir>/<builder>/<config>; data_dir adds /<version>
    with caches.exclusive(config_dir) as locked:
      builder = cls(config=config, data_dir=data_dir, file_format=file_format)
      if not builder.is_prepared():  # else built by the process we waited for
        if locked:
          caches.remove_stale(config_dir, "incomplete.")
        builder.download_and_prepare(file_format=file_format)
    builder = cls(config=config, data_dir=data_dir, file_format=file_format)  # reads the info the build wrote
  splits = [split for split in ("train", "eval") if split in builder.info.splits]
  sources = builder.as_data_source(split=splits, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  by_split = dict(zip(splits, sources))
  train, evals = Strings(by_split["train"]), Strings(by_split.get("eval", ()))
  summary = corpus_summary(builder.info.metadata, config)
  summary.update(train_records=len(train), eval_records=len(evals))
  log.info("corpus %s/%s: %s", builder.name, config.name, summary)
  return Corpus(train=train, eval=evals, summary=summary, name=f"{builder.name}/{config.name}", data_dir=data_dir)


def _precheck(config) -> None:
  """Reads the first record of each local source so bad columns fail fast, before TFDS starts."""
  for source in (config.source, config.eval_source):
    if source and not is_url(source):
      next(read_records(source, kind=config.kind, column=config.column, documents=config.documents), None)


def corpus_summary(metadata, config) -> dict[str, Any]:
  """Totals over the source (and eval file) scans: records_read = train + eval + empty + invalid; the
  content hashes of the file(s) read (content_sha256, and eval_content_sha256 with an eval file)."""
  scans = [dict(metadata[key]) for key in ("source", "eval_source") if key in metadata]
  total = lambda key: sum(scan.get(key, 0) for scan in scans)  # noqa: E731
  downloaded = dict(metadata.get("content_sha256", {}))  # URL sources, hashed by the build
  summary = dict(
      source=config.source,
      eval_source=config.eval_source or f"hold-out {config.eval_fraction:g} of source",
      content_sha256=config.source_sha256 or downloaded.get("source", ""),
      records_read=total("records_read"),
      skipped_empty=total("skipped_empty"),
      skipped_invalid=total("skipped_invalid"),
  )
  if config.eval_source:
    summary["eval_content_sha256"] = config.eval_source_sha256 or downloaded.get("eval_source", "")
  return summary
