"""Corpus file readers: where a source lives, its format, and one stripped string per record.

Pure Python (no TFDS): `resolve_source` turns a config path (a file, `$DATA/...`, `rdkit:REL` or an
http(s) URL) into something readable, and `read_records` yields every record of a .smi / .csv / .tsv
(optionally .gz) / .jsonl / plain-text file, with the column auto-detected from SMILES_COLUMNS /
TEXT_COLUMNS when config.data.column is empty. Errors are one line that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import re
import sys
from typing import Callable, Iterator, Sequence

from exlm_jax.data import paths

SMILES_COLUMNS = ("smiles", "smi", "canonical_smiles", "isomeric_smiles", "mol")
TEXT_COLUMNS = ("text", "sentence", "document", "content")
_TABLE = ("csv", "tsv")


def is_url(path: str) -> bool:
  return bool(re.match(r"^https?://", path))


def resolve_source(path: str, what: str = "config.data.path") -> str:
  """Turns a config path into a local absolute path (or returns a URL unchanged).

  Accepts a file path (`~` expanded), `$DATA/...` and `rdkit:REL` (REL under RDKit's data dir).
  """
  if not path:
    raise ValueError(f"{what} is empty; set it to a file, '$DATA/...', 'rdkit:NCI/first_5K.smi' or a URL")
  if is_url(path):
    return path
  if path.startswith("rdkit:"):
    try:
      from rdkit import RDConfig  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise FileNotFoundError(f"{what}={path!r} needs RDKit installed (pip install rdkit)") from None
    local = os.path.join(RDConfig.RDDataDir, path[len("rdkit:"):])
  else:
    local = paths.resolve(path)
  local = os.path.abspath(local)
  if not os.path.exists(local):
    raise FileNotFoundError(f"{what}={path!r}: {local} does not exist; fix the path or set EXLM_DATA_DIR")
  if not os.path.isfile(local):
    raise FileNotFoundError(f"{what}={path!r}: {local} is not a file; point it at one corpus file")
  if not os.access(local, os.R_OK):
    raise FileNotFoundError(f"{what}={path!r}: {local} is not readable; check its permissions")
  return local


def file_format(name: str) -> tuple[str, bool]:
  """(format, gzipped) from a file name or URL: format is 'csv', 'tsv', 'jsonl' or 'lines'."""
  base = name.split("?")[0].lower()
  gz = base.endswith(".gz")
  if gz:
    base = base[:-3]
  ext = os.path.splitext(base)[1].lstrip(".")
  if ext in _TABLE:
    return ext, gz
  if ext in ("jsonl", "json"):
    return "jsonl", gz
  return "lines", gz


@contextlib.contextmanager
def _open_text(path: str, gz: bool):
  """Opens a (possibly gzipped) UTF-8 text file; errors name the file and the cause."""
  try:
    f = gzip.open(path, "rt", encoding="utf-8", newline="") if gz else open(path, encoding="utf-8", newline="")
  except OSError as e:
    raise FileNotFoundError(f"cannot open {path}: {e.strerror or e}; check the path and permissions") from None
  try:
    yield f
  except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
    raise ValueError(f"cannot read {path} as {'gzipped ' if gz else ''}UTF-8 text ({type(e).__name__}); "
                     "check the file is not corrupt and its extension matches its format") from None
  finally:
    f.close()


@contextlib.contextmanager
def _csv_field_limit():
  """Long documents exceed csv's default 128 KiB field limit; raise it while reading only."""
  old = csv.field_size_limit()
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  try:
    yield
  finally:
    csv.field_size_limit(old)


def _pick_column(header: Sequence[str], column: str, candidates: Sequence[str], path: str) -> int:
  """Index of `column` (a header name) in `header`, or auto-detected from `candidates`."""
  lowered = [h.strip().lower() for h in header]
  if column:
    if column in header:
      return list(header).index(column)
    if column.lower() in lowered:
      return lowered.index(column.lower())
    raise ValueError(f"column {column!r} not found in {path}; its columns are {list(header)[:20]}: "
                     "set config.data.column to one of them (or a 0-based index for a file without header)")
  for c in candidates:
    if c in lowered:
      return lowered.index(c)
  raise ValueError(f"no column named like {list(candidates)} in {path}; its first row is {list(header)[:20]}: "
                   "set config.data.column to the header name, or to a 0-based index (e.g. '0') if the file "
                   "has no header row")


def _table_rows(path: str, fmt: str, gz: bool, column: str, candidates: Sequence[str]) -> Iterator[str]:
  """Yields the selected field of every data row of a CSV/TSV file ('' for a short row).

  `column` is a header name (the first row is a header) or a 0-based integer (no header row).
  """
  delimiter = "\t" if fmt == "tsv" else ","
  quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL  # GLUE-style TSVs are not quoted
  with _open_text(path, gz) as f, _csv_field_limit():
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    if column.isdigit():
      index = int(column)
    else:
      header = next(reader, None)
      if header is None:
        return
      index = _pick_column(header, column, candidates, path)
    checked = not column.isdigit()
    for row in reader:
      if not checked and row:
        if index >= len(row):
          raise ValueError(f"column {index} is out of range: {path} has {len(row)} columns (first row "
                           f"{row[:20]}); set config.data.column to a 0-based index below {len(row)}")
        checked = True
      yield row[index] if index < len(row) else ""


def _jsonl_rows(path: str, gz: bool, column: str, candidates: Sequence[str]) -> Iterator[str]:
  """Yields field `column` (or the first of `candidates` present) of every JSON-lines record."""
  with _open_text(path, gz) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        yield ""
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        raise ValueError(f"{path}:{lineno} is not valid JSON; a .jsonl corpus needs one object per line") from None
      key = column or next((c for c in candidates if c in obj), None)
      if key is None or key not in obj:
        raise ValueError(f"{path}:{lineno} has no field {column or list(candidates)}; its fields are "
                         f"{sorted(obj)[:20]}: set config.data.column to one of them")
      value = obj[key]
      yield value if isinstance(value, str) else ""


def _smi_rows(path: str, gz: bool, column: str) -> Iterator[str]:
  """.smi: one molecule per line, SMILES first (or field `column`), whitespace separated.

  A first line whose first field is 'smiles' (any case) is a header and is not a record.
  """
  index = int(column) if column.isdigit() else 0
  with _open_text(path, gz) as f:
    for lineno, line in enumerate(f):
      fields = line.split()
      if lineno == 0 and fields and fields[0].lower() in ("smiles", "smi"):
        continue
      yield fields[index] if index < len(fields) else ""


def _text_lines(path: str, gz: bool, documents: str) -> Iterator[str]:
  """Plain text: one document per line, or documents separated by blank lines (lines joined by \\n)."""
  if documents not in ("line", "blank_line"):
    raise ValueError(f"config.data.documents={documents!r}; choose 'line' or 'blank_line'")
  with _open_text(path, gz) as f:
    if documents == "line":
      for line in f:
        yield line.rstrip("\r\n")
      return
    lines: list[str] = []
    for line in f:
      line = line.rstrip("\r\n")
      if line.strip():
        lines.append(line)
      elif lines:
        yield "\n".join(lines)
        lines = []
    if lines:
      yield "\n".join(lines)


def read_records(path: str, *, kind: str, column: str = "", documents: str = "line",
                 name: str | None = None) -> Iterator[str]:
  """Yields every record of a corpus file as a stripped string ('' for an empty one).

  kind: 'smiles' or 'text'. `name` (default `path`) decides the format by its extension, which
  matters for downloads whose local names differ from the URL.
  """
  fmt, gz = file_format(name or path)
  column = str(column).strip()
  candidates = SMILES_COLUMNS if kind == "smiles" else TEXT_COLUMNS
  if fmt in _TABLE:
    rows = _table_rows(path, fmt, gz, column, candidates)
  elif fmt == "jsonl":
    rows = _jsonl_rows(path, gz, column, candidates)
  elif kind == "smiles":
    rows = _smi_rows(path, gz, column)
  else:
    rows = _text_lines(path, gz, documents)
  for row in rows:
    yield row.strip()


def smiles_validator() -> Callable[[str], bool]:
  """Returns `is_valid(smiles)` that parses with RDKit (its error log silenced while parsing)."""
  try:
    from rdkit import Chem, rdBase  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("config.data.validate_smiles=True needs RDKit: pip install rdkit") from None

  def is_valid(smiles: str) -> bool:
    with rdBase.BlockLogs():
      return Chem.MolFromSmiles(smiles) is not None

  return is_valid
