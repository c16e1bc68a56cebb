"""Tokenizers: an atom-level SMILES regex and SentencePiece (unigram for text, BPE for SMILES).

Every tokenizer reserves ids 0..4 for vocab.SPECIAL_TOKENS (<pad> <unk> <s> </s> [MASK]), adds no
specials in `encode` (the pipeline writes <s> / </s> around blocks) and skips the structural ones in
`decode`. A tokenizer is saved as a directory holding `tokenizer.json` (which names its `kind`) plus
any model file, so a workdir can reload exactly the tokenizer a run was trained with.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
from etils import epath

from exlm_jax.data import caches
from exlm_jax.data import vocab

log = logging.getLogger(__name__)

CONFIG_FILE = "tokenizer.json"
SPM_MODEL_FILE = "spm.model"
KINDS = ("smiles_regex", "sentencepiece", "smiles_bpe")
FROM_CHECKPOINT = "hf_tokenizers"  # a Hugging Face checkpoint's own tokenizer (init_from=hf:PATH), never built here

# Ids `decode` leaves out. <unk> is kept (rendered by the tokenizer) so decoded text shows where
# information was lost instead of hiding it.
_DECODE_SKIP = frozenset((vocab.PAD, vocab.BOS, vocab.EOS, vocab.MASK))

# The atom-level SMILES regex of Schwaller et al. (Molecular Transformer), also used by SMILES-BERT
# and smi-editor: bracket atoms, two-letter halogens, organic-subset and aromatic atoms, bonds,
# branches, ring-closure digits and %nn two-digit ring closures.
SMILES_REGEX = (
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$|\%[0-9]{2}|[0-9])")
_SMILES_RE = re.compile(SMILES_REGEX)


class Tokenizer(Protocol):
  """What the pipeline, the trainer and the analysis code rely on."""

  kind: str

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def id_to_token(self, i: int) -> str: ...

  def save(self, directory: str | os.PathLike) -> None: ...

  def fingerprint(self) -> str: ...


class UncoveredSmilesError(ValueError):
  """A SMILES string contains characters the atom regex does not match (they would be dropped)."""


def split_smiles(smiles: str) -> list[str]:
  """Splits one SMILES string into atom-level tokens; raises UncoveredSmilesError on any gap.

  The regex alone silently skips characters it does not match (e.g. a space or an unbracketed
  'Na'); joining the pieces back and comparing is the cheap check that nothing was dropped.
  """
  pieces = _SMILES_RE.findall(smiles)
  if "".join(pieces) != smiles:
    covered = np.zeros(len(smiles), bool)
    for match in _SMILES_RE.finditer(smiles):
      covered[match.start():match.end()] = True
    gaps = sorted({smiles[i] for i in np.flatnonzero(~covered)})
    raise UncoveredSmilesError(
        f"SMILES {smiles[:80]!r} has characters the atom regex does not cover: {gaps}; "
        "fix or drop that record (or use tokenizer='smiles_bpe')")
  return pieces


class SmilesRegexTokenizer:
  """Atom-level SMILES tokenizer: SMILES_REGEX pieces looked up in a corpus-built vocabulary.

  Ids 0..4 are the specials, then corpus tokens by decreasing count (ties by token), so the same
  corpus always gives the same ids. Tokens not in the vocabulary encode to <unk>.
  """

  kind = "smiles_regex"

  def __init__(self, tokens: Sequence[str], build_stats: dict[str, int] | None = None):
    tokens = list(tokens)
    if tuple(tokens[:vocab.NUM_SPECIAL]) != vocab.SPECIAL_TOKENS:
      raise ValueError(f"a SMILES vocabulary must start with {vocab.SPECIAL_TOKENS}, got {tokens[:5]}")
    if len(set(tokens)) != len(tokens):
      raise ValueError("SMILES vocabulary has duplicate tokens; rebuild it with SmilesRegexTokenizer.build")
    self._tokens = tokens
    self._ids = {t: i for i, t in enumerate(tokens)}
    self.build_stats = dict(build_stats or {})

  @classmethod
  def build(cls, smiles: Iterable[str], min_count: int = 1) -> "SmilesRegexTokenizer":
    """Builds the vocabulary from a corpus; strings the regex cannot fully split are counted.

    `build_stats` reports strings seen, strings skipped as uncovered (never partially counted),
    distinct tokens and tokens dropped by `min_count` (those encode to <unk> later).
    """
    counts: collections.Counter[str] = collections.Counter()
    seen = uncovered = 0
    for s in smiles:
      seen += 1
      try:
        counts.update(split_smiles(s))
      except UncoveredSmilesError:
        uncovered += 1
    kept = sorted((t for t, c in counts.items() if c >= min_count and t not in vocab.SPECIAL_TOKENS),
                  key=lambda t: (-counts[t], t))
    if not kept:
      raise ValueError(f"no SMILES tokens found in {seen} strings ({uncovered} uncovered); check the corpus")
    if uncovered:
      log.warning("SMILES vocabulary: %d of %d strings have characters the regex does not cover",
                      uncovered, seen)
    stats = dict(strings=seen, uncovered=uncovered, distinct_tokens=len(counts),
                 below_min_count=len(counts) - len(kept), min_count=min_count)
    return cls(vocab.SPECIAL_TOKENS + tuple(kept), stats)

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  def encode(self, text: str) -> list[int]:
    """SMILES -> ids (no specials). Raises UncoveredSmilesError rather than dropping characters."""
    return list(map(self._ids.get, split_smiles(text), itertools.repeat(vocab.UNK)))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` plus each token's (char_start, char_end) span in `text` (the regex match)."""
    split_smiles(text)  # raises on characters the regex would skip
    matches = list(_SMILES_RE.finditer(text))
    ids = [self._ids.get(m.group(), vocab.UNK) for m in matches]
    return ids, [m.span() for m in matches]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> SMILES, skipping <pad> <s> </s> [MASK]; <unk> appears as '<unk>'."""
    return "".join(self._tokens[int(i)] for i in ids if int(i) not in _DECODE_SKIP)

  def id_to_token(self, i: int) -> str:
    return self._tokens[int(i)]

  def token_to_id(self, token: str) -> int:
    return self._ids.get(token, vocab.UNK)

  def _config(self) -> dict[str, Any]:
    return dict(kind=self.kind, regex=SMILES_REGEX, tokens=self._tokens, build_stats=self.build_stats)

  def save(self, directory: str | os.PathLike) -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(self._config(), indent=1))

  def fingerprint(self) -> str:
    """Short hash of the vocabulary: names caches of token ids made with this tokenizer."""
    blob = json.dumps(dict(kind=self.kind, regex=SMILES_REGEX, tokens=self._tokens)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class SentencePieceTokenizer:
  """SentencePiece model with ids 0..4 = <pad> <unk> <s> </s> [MASK] (checked on load).

  Trained losslessly: identity normalization, whitespace kept, byte fallback for unseen characters,
  so decode(encode(s)) == s for any string.
  """

  def __init__(self, model_proto: bytes, kind: str = "sentencepiece", train_stats: dict | None = None):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if kind not in ("sentencepiece", "smiles_bpe"):
      raise ValueError(f"SentencePieceTokenizer kind must be 'sentencepiece' or 'smiles_bpe', got {kind!r}")
    self.kind = kind
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.train_stats = dict(train_stats or {})
    _check_special_ids(self._sp)

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int, kind: str = "sentencepiece",
            num_threads: int | None = None) -> "SentencePieceTokenizer":
    """Trains unigram (kind='sentencepiece', text) or BPE (kind='smiles_bpe') from strings in memory.

    The caller caps how many strings it passes (config.data.spm_max_sentences). SentencePiece skips
    training sentences over 4192 bytes, so documents are fed line by line and long lines in pieces
    of at most _SPM_PIECE_CHARS characters cut at spaces (training only; encoding is unaffected).
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    is_smiles = kind == "smiles_bpe"
    counter = {"n": 0}

    def counted(it):
      for t in it:
        for piece in _training_pieces(t):
          counter["n"] += 1
          yield piece

    model = io.BytesIO()
    options = dict(
        model_type="bpe" if is_smiles else "unigram",
        vocab_size=vocab_size,
        pad_id=vocab.PAD, unk_id=vocab.UNK, bos_id=vocab.BOS, eos_id=vocab.EOS,
        pad_piece=vocab.SPECIAL_TOKENS[vocab.PAD], unk_piece=vocab.SPECIAL_TOKENS[vocab.UNK],
        bos_piece=vocab.SPECIAL_TOKENS[vocab.BOS], eos_piece=vocab.SPECIAL_TOKENS[vocab.EOS],
        user_defined_symbols=[vocab.SPECIAL_TOKENS[vocab.MASK]],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        character_coverage=1.0 if is_smiles else 0.9995,
        add_dummy_prefix=not is_smiles,
        split_by_unicode_script=not is_smiles,
        split_by_number=not is_smiles,
        num_threads=num_threads or max(1, min(16, os.cpu_count() or 1)),
        minloglevel=2,
    )
    try:
      spm.SentencePieceTrainer.train(sentence_iterator=counted(texts), model_writer=model, **options)
    except RuntimeError as e:
      msg = str(e).splitlines()[0] if str(e) else repr(e)
      raise ValueError(f"SentencePiece training failed ({msg}); for a small corpus lower "
                       f"config.data.vocab_size (now {vocab_size})") from None
    if counter["n"] == 0:
      raise ValueError("SentencePiece got no non-empty strings to train on; check the corpus")
    return cls(model.getvalue(), kind=kind, train_stats=dict(sentences=counter["n"]))

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` plus each token's (char_start, char_end) span in `text`, for mapping tokens back to text.

    Spans exclude the whitespace SentencePiece folds into a piece's '▁' (a lone '▁' gets an empty span
    where its space ends), and every byte-fallback piece of a character gets that character's span, so
    `text[start_of_token_i:end_of_token_j]` is exactly the text tokens i..j stand for, without outer spaces.
    """
    ids, spans = _spm_ids_and_char_spans(self._sp, text)
    spans = _share_byte_fallback_spans(spans, [self._sp.IsByte(i) for i in ids])
    return ids, [_strip_span(text, begin, end) for begin, end in spans]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> string, skipping <pad> <s> </s> [MASK]; <unk> is rendered by SentencePiece (' ⁇ ')."""
    return self._sp.decode([int(i) for i in ids if int(i) not in _DECODE_SKIP])

  def id_to_token(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def token_to_id(self, token: str) -> int:
    return self._sp.piece_to_id(token)

  def save(self, directory: str | os.PathLike) -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPM_MODEL_FILE).write_bytes(self._proto)
    config = dict(kind=self.kind, model_file=SPM_MODEL_FILE, train_stats=self.train_stats)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))

  def fingerprint(self) -> str:
    return hashlib.sha256(self.kind.encode() + self._proto).hexdigest()[:16]


def _spm_ids_and_char_spans(sp, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Ids and raw per-piece character spans from SentencePiece (byte-fallback pieces before a character's last
  one get an empty span). sentencepiece >= 0.2.2 reports character offsets ('offset_mapping'); 0.2.0-0.2.1 only
  the byte offsets of its 'immutable_proto', converted here."""
  try:
    out = sp.encode(text, return_type="offset_mapping")
    return list(out["ids"]), [tuple(span) for span in out["offsets"]]
  except (TypeError, ValueError):  # sentencepiece < 0.2.2: no return_type / no 'offset_mapping'
    pieces = sp.encode(text, out_type="immutable_proto").pieces
    return [p.id for p in pieces], byte_to_char_spans(text, [(p.begin, p.end) for p in pieces])


def byte_to_char_spans(text: str, byte_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """UTF-8 byte (begin, end) spans of `text` -> character spans; a span ending inside a character ends before it."""
  char_at_byte = np.zeros(len(text.encode("utf-8")) + 1, np.int64)
  position = 0
  for i, ch in enumerate(text):
    width = len(ch.encode("utf-8"))
    char_at_byte[position:position + width] = i  # bytes inside a character map to its start
    position += width
  char_at_byte[position] = len(text)
  return [(int(char_at_byte[b]), int(char_at_byte[e])) for b, e in byte_spans]


def _share_byte_fallback_spans(spans: Sequence[tuple[int, int]], is_byte: Sequence[bool]) -> list[tuple[int, int]]:
  """Gives the empty-span byte pieces that precede a character's last byte piece that character's span."""
  out = list(spans)
  for i in range(len(out) - 2, -1, -1):
    begin, end = out[i]
    if is_byte[i] and is_byte[i + 1] and begin == end and out[i + 1][0] == begin:
      out[i] = out[i + 1]
  return out


def _strip_span(text: str, begin: int, end: int) -> tuple[int, int]:
  """(begin, end) narrowed to exclude leading / trailing whitespace; all-whitespace -> (end, end)."""
  while begin < end and text[begin].isspace():
    begin += 1
  while end > begin and text[end - 1].isspace():
    end -= 1
  return begin, end


_SPM_PIECE_CHARS = 1000  # well under SentencePiece's 4192-byte training limit, even for 4-byte UTF-8


def _training_pieces(text: str) -> Iterable[str]:
  """Non-empty lines of `text`, long ones cut at a space (or hard) into <= _SPM_PIECE_CHARS chars."""
  for line in text.splitlines():
    while len(line) > _SPM_PIECE_CHARS:
      cut = line.rfind(" ", 0, _SPM_PIECE_CHARS)
      cut = cut if cut > 0 else _SPM_PIECE_CHARS
      if line[:cut].strip():
        yield line[:cut]
      line = line[cut:]
    if line.strip():
      yield line


def _check_special_ids(sp) -> None:
  """Raises if a SentencePiece model does not put the five specials at ids 0..4."""
  got = tuple(sp.id_to_piece(i) for i in range(min(vocab.NUM_SPECIAL, sp.get_piece_size())))
  if got != vocab.SPECIAL_TOKENS:
    raise ValueError(f"SentencePiece model has specials {got}, expected {vocab.SPECIAL_TOKENS} at ids 0..4; "
                     "retrain it with SentencePieceTokenizer.train")


def load(directory: str | os.PathLike) -> Tokenizer:
  """Reloads a tokenizer saved with `.save(directory)` (the kind is read from tokenizer.json)."""
  directory = epath.Path(directory)
  config_path = directory / CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}; save a tokenizer there first")
  config = json.loads(config_path.read_text())
  kind = config.get("kind")
  if kind == "smiles_regex":
    if config.get("regex", SMILES_REGEX) != SMILES_REGEX:
      raise ValueError(f"{config_path} was saved with a different SMILES regex; rebuild the tokenizer")
    return SmilesRegexTokenizer(config["tokens"], config.get("build_stats"))
  if kind in ("sentencepiece", "smiles_bpe"):
    proto = (directory / config["model_file"]).read_bytes()
    return SentencePieceTokenizer(proto, kind=kind, train_stats=config.get("train_stats"))
  if kind == "hf_tokenizers":  # a run started from a Hugging Face checkpoint (init_from=hf:...; the .[hf] extra)
    from exlm_jax.export import hf_tokenizer  # pylint: disable=g-import-not-at-top
    return hf_tokenizer.HFTokenizer.load(directory)
  raise ValueError(f"{config_path} names unknown tokenizer kind {kind!r}; expected one of {KINDS}")


def _sample(records: Iterable[str], limit: int, seed: int = 0) -> Iterable[str]:
  """At most `limit` records: a seeded uniform sample when `records` has len/getitem, else a prefix."""
  if limit <= 0:
    return records
  if hasattr(records, "__len__") and hasattr(records, "__getitem__"):
    n = len(records)
    if n > limit:
      idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
      return (records[int(i)] for i in idx)
    return records
  return itertools.islice(records, limit)


def build_tokenizer(data_cfg, records: Iterable[str], cache_dir: str | os.PathLike | None) -> Tokenizer:
  """Builds the tokenizer named by data_cfg.tokenizer from `records`, reusing `cache_dir` if filled.

  data_cfg fields used: tokenizer ('smiles_regex' | 'sentencepiece' | 'smiles_bpe'), vocab_size and
  spm_max_sentences (SentencePiece only). `records` are raw strings (SMILES or documents), best a
  Sequence so SentencePiece can sample them uniformly. A cached tokenizer of another kind is an error.
  """
  kind = data_cfg.tokenizer
  if kind not in KINDS:
    raise ValueError(f"unknown config.data.tokenizer {kind!r}; choose one of {', '.join(KINDS)}")

  def build() -> Tokenizer:
    if kind == "smiles_regex":
      return SmilesRegexTokenizer.build(records)
    max_sentences = int(data_cfg.get("spm_max_sentences", 500_000))
    return SentencePieceTokenizer.train(_sample(records, max_sentences), vocab_size=int(data_cfg.vocab_size),
                                        kind=kind)

  if cache_dir is None:
    return build()
  if "://" in str(cache_dir):  # remote: no locks or atomic renames
    if not (epath.Path(cache_dir) / CONFIG_FILE).exists():
      build().save(cache_dir)
  else:  # one process builds (under a lock, into a renamed temporary; caches.py), the others wait
    caches.build_once(os.fspath(cache_dir), CONFIG_FILE, lambda tmp: build().save(tmp))
  tok = load(cache_dir)
  if tok.kind != kind:
    raise ValueError(f"{cache_dir} holds a {tok.kind!r} tokenizer but config.data.tokenizer={kind!r}; "
                     "delete that directory or use another workdir")
  return tok


def save_atomic(tok: Tokenizer, directory: str | os.PathLike) -> None:
  """Saves into a temporary sibling then renames, so a crash never leaves a half-written tokenizer."""
  directory = epath.Path(directory)
  if "://" in str(directory):
    tok.save(directory)  # remote filesystems: no cheap atomic rename
    return
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=directory.name + ".tmp", dir=directory.parent)
  try:
    tok.save(tmp)
    try:
      os.rename(tmp, directory)
    except OSError:  # another process got there first: keep theirs (same inputs, same tokenizer)
      if not (directory / CONFIG_FILE).exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
