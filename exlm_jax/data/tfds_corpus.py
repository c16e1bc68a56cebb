"""The TFDS builder classes for pretraining corpora: one raw string per record, written as array_record.

Two `GeneratorBasedBuilder`s share one implementation and differ only in their `KIND` class attribute:
`ExlmSmilesCorpus` (TFDS name `exlm_smiles_corpus`) and `ExlmTextCorpus` (`exlm_text_corpus`). They have
no predefined BUILDER_CONFIGS: every source gets its own `CorpusConfig` (built by
`builders.builder_config`), whose fields say which file(s) to read and how, and whose name is a hash of
them. Importing this module imports tensorflow_datasets (~3 s), so `builders` imports it only to build
or open a corpus.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from exlm_jax.data import caches
from exlm_jax.data import holdout
from exlm_jax.data import readers

log = logging.getLogger(__name__)

# The builders' TFDS version: part of every build's path and of every config's hash.
VERSION = "1.0.0"


@dataclasses.dataclass(eq=False, kw_only=True)
class CorpusConfig(tfds.core.BuilderConfig):
  """Which file(s) to read and how (fields as in config.data); `name` is a hash of all of it."""
  kind: str  # "smiles" | "text"
  source: str  # resolved local path or URL
  eval_source: str  # "" = hold out eval_fraction of `source`
  source_sha256: str  # SHA-256 of the local file's bytes ("" for a URL): the content key
  eval_source_sha256: str
  eval_fraction: float
  column: str
  max_examples: int
  validate_smiles: bool
  documents: str


class _CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: read, split, validate, count; records are {'text': str}."""

  VERSION = tfds.core.Version(VERSION)
  KIND = ""
  # No checksums.tsv / README beside this module: a None code path stops TFDS from looking for them
  # (that lookup also needs the optional `importlib_resources` package).
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Raw {self.KIND} records for exlm_jax pretraining (one string per record).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # keep source order; the Grain pipeline shuffles
    )

  def _local(self, source: str, dl_manager) -> str:
    return os.fspath(dl_manager.download(source)) if readers.is_url(source) else source

  # TFDS announces a build with two bold lines on stdout; one plain line says what is built from what.
  def _log_download_bytes(self) -> None:
    cfg = self.builder_config
    print(f"building corpus {self.name}/{cfg.name} from {cfg.source}"
          f"{' + ' + cfg.eval_source if cfg.eval_source else ''} (once per file content and data options)",
          flush=True)

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager):
    """Scans the source(s) once to decide every row's fate, then writes `train` (and `eval`).

    Knowing the counts before writing lets an empty corpus fail with a clear message and an empty
    hold-out be left out (TFDS cannot write an empty split).
    """
    cfg = self.builder_config
    if cfg.kind != self.KIND:
      raise ValueError(f"{type(self).__name__} builds '{self.KIND}' corpora, got config kind {cfg.kind!r}")
    validate = readers.smiles_validator() if cfg.validate_smiles else None
    read = lambda path, name: readers.read_records(path, kind=cfg.kind, column=cfg.column,  # noqa: E731
                                                   documents=cfg.documents, name=name)
    train_file = (self._local(cfg.source, dl_manager), cfg.source)
    train_status = holdout.scan_records(read(*train_file), max_examples=cfg.max_examples,
                                        eval_fraction=0.0 if cfg.eval_source else cfg.eval_fraction,
                                        validate=validate)
    metadata = {"source": holdout.status_counts(train_status)}
    splits = {"train": (train_file, train_status, holdout.TRAIN)}
    local_files = {"source": train_file}
    if cfg.eval_source:
      eval_file = (self._local(cfg.eval_source, dl_manager), cfg.eval_source)
      local_files["eval_source"] = eval_file
      eval_status = holdout.scan_records(read(*eval_file), max_examples=cfg.max_examples, eval_fraction=0.0,
                                         validate=validate)
      metadata["eval_source"] = holdout.status_counts(eval_status)
      splits["eval"] = (eval_file, eval_status, holdout.TRAIN)
      if metadata["eval_source"]["train"] == 0:
        raise ValueError(f"config.data.eval_path={cfg.eval_source!r} has no usable records "
                         f"({metadata['eval_source']}); check the file and config.data.column")
    elif metadata["source"]["eval"]:
      splits["eval"] = (train_file, train_status, holdout.EVAL)
    counts = metadata["source"]
    if counts["train"] == 0:
      raise ValueError(f"empty corpus: {cfg.source} gave no usable records ({counts['records_read']} read, "
                       f"{counts['skipped_empty']} empty, {counts['skipped_invalid']} invalid); "
                       "check config.data.path / column / max_examples")
    for key, value in metadata.items():
      if value["skipped_invalid"]:
        log.warning("%s: skipped %d of %d SMILES that RDKit cannot parse", key, value["skipped_invalid"],
                  value["records_read"])
      self.info.metadata[key] = value
    downloaded = {key: caches.file_sha256(local) for key, (local, name) in local_files.items() if readers.is_url(name)}
    if downloaded:  # local files are keyed on their content in the config already
      self.info.metadata["content_sha256"] = downloaded
    return {split: self._generate_examples(read(*file), status, keep)
            for split, (file, status, keep) in splits.items()}

  def _generate_examples(self, records: Iterator[str], status: np.ndarray, keep: int):
    """Yields (row index, {'text': record}) for the rows whose scan status is `keep`."""
    for index, text in enumerate(records):
      if index >= len(status):
        break
      if status[index] == keep:
        yield index, {"text": text}


class ExlmSmilesCorpus(_CorpusBuilder):
  """One SMILES string per record (.smi / .csv / .tsv / .jsonl, optionally gzipped)."""
  KIND = "smiles"


class ExlmTextCorpus(_CorpusBuilder):
  """One document per record (plain text lines / blank-line paragraphs, or a table column)."""
  KIND = "text"


BUILDERS: dict[str, type[_CorpusBuilder]] = {cls.KIND: cls for cls in (ExlmSmilesCorpus, ExlmTextCorpus)}
