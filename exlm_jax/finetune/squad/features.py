"""SQuAD questions -> fixed-length windows with span labels, the answer mask and the token -> text map.

Every window is the sentence-pair layout of finetune/encoding.py with the question first:

  <s> question </s> </s> context[doc_start : doc_start + doc_len] </s> <pad> ...

The question keeps at most `max_query_length` tokens; a context longer than the room left is cut into
windows that start every `doc_stride` tokens (BERT's sliding window), so a token can sit in several
windows. Labels are token positions in the window: the first gold answer's start / end token when the
whole answer lies inside the window, else (0, 0), the `<s>` position, which is how "no answer" is
learnt (SQuAD 2.0 unanswerable questions, and windows that miss the answer). `p_mask` is True where an
answer cannot start or end: question, `</s>`, padding; `<s>` stays allowed for the no-answer label.

Tokens are mapped back to context characters with the tokenizer's `encode_with_offsets` spans, so a
predicted span is cut out of the original context text. Counted in `stats` (nothing is dropped silently):
  questions, windows, truncated_questions (question cut to max_query_length), split_contexts (questions
  whose context needed more than one window), answer_outside_window (windows of answerable questions
  labelled (0, 0)), answers_in_no_window (answers longer than every window, so no window holds them),
  inexact_answers (the covering token span's text differs from the answer after SQuAD normalisation: a
  token boundary falls inside the answer, best reachable EM is 0), unrecoverable_answers (the answer
  text is not at its answer_start or covers no token), skipped_questions (training features only:
  answerable questions with an unrecoverable answer get no windows rather than a wrong no-answer label).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from exlm_jax.data import vocab
from exlm_jax.finetune.squad.evaluate import normalize_answer
from exlm_jax.finetune.squad.reader import Answer, SquadExample

NUM_SPECIALS = 4  # <s> </s> </s> ... </s>


class OffsetTokenizer(Protocol):
  """What the features need from a tokenizer (exlm_jax/data/tokenizers.py): ids without specials and spans."""

  def encode(self, text: str) -> list[int]: ...

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """Window geometry (BERT / COCO-LM SQuAD defaults: 384 tokens, stride 128, questions <= 64 tokens)."""

  seq_len: int = 384
  doc_stride: int = 128
  max_query_length: int = 64

  def validate(self) -> None:
    if self.max_query_length < 1 or self.doc_stride < 1:
      raise ValueError(f"max_query_length={self.max_query_length} and doc_stride={self.doc_stride} must be >= 1")
    if self.seq_len - self.max_query_length - NUM_SPECIALS < 1:
      raise ValueError(f"seq_len={self.seq_len} leaves no room for context after a {self.max_query_length}-token "
                       f"question and {NUM_SPECIALS} special tokens; raise seq_len or lower max_query_length")


@dataclasses.dataclass
class SquadFeatures:
  """W windows over the questions of `examples`. Shapes: W windows, L = seq_len, T_e context tokens.

  tokens (W, L) int32; p_mask (W, L) bool (True = cannot be an answer token); start, end (W,) int32
  labels; example_index (W,) int32 row of `examples`; doc_start, doc_len (W,) int32: the window holds
  context tokens doc_start .. doc_start + doc_len - 1 at positions context_offset .. (W,) int32;
  context_spans: per example a (T_e, 2) int32 array of each context token's character span.
  """

  tokens: np.ndarray
  p_mask: np.ndarray
  start: np.ndarray
  end: np.ndarray
  example_index: np.ndarray
  doc_start: np.ndarray
  doc_len: np.ndarray
  context_offset: np.ndarray
  examples: tuple[SquadExample, ...]
  context_spans: tuple[np.ndarray, ...]
  stats: dict[str, int]

  def __len__(self) -> int:
    return len(self.tokens)

  def windows_of(self, example: int) -> np.ndarray:
    """Window rows of example `example`, in context order (windows are stored example by example)."""
    first, end = np.searchsorted(self.example_index, [example, example + 1])
    return np.arange(first, end)

  def batch(self, indices: Sequence[int], batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Windows `indices` as the model's batch dict, padded to `batch_size` rows with `mask` False.

    Keys: tokens (B, L) int32, start / end (B,) int32, p_mask (B, L) bool, mask (B,) bool (False = filler).
    """
    indices = np.asarray(indices, np.int64)
    fill = (batch_size or len(indices)) - len(indices)
    if fill < 0:
      raise ValueError(f"{len(indices)} windows do not fit a batch of {batch_size}")
    seq_len = self.tokens.shape[1]
    filler = np.full((fill, seq_len), vocab.PAD, np.int32)
    filler[:, 0], filler[:, 1] = vocab.BOS, vocab.EOS
    filler_mask = np.ones((fill, seq_len), bool)
    filler_mask[:, 0] = False
    zeros = np.zeros(fill, np.int32)
    return dict(tokens=np.concatenate([self.tokens[indices], filler]),
                start=np.concatenate([self.start[indices], zeros]),
                end=np.concatenate([self.end[indices], zeros]),
                p_mask=np.concatenate([self.p_mask[indices], filler_mask]),
                mask=np.concatenate([np.ones(len(indices), bool), np.zeros(fill, bool)]))


def window_starts(num_tokens: int, room: int, doc_stride: int) -> list[tuple[int, int]]:
  """(doc_start, doc_len) of the windows over `num_tokens` context tokens: BERT's sliding window."""
  spans, start = [], 0
  while True:
    length = min(num_tokens - start, room)
    spans.append((start, length))
    if start + length >= num_tokens:
      return spans
    start += min(length, doc_stride)


def max_context_mask(doc_start: Sequence[int], doc_len: Sequence[int]) -> list[np.ndarray]:
  """Per window, (doc_len,) bool: True where this window gives the token its most context.

  A token in several windows is scored min(left, right context) + 0.01 * window length (BERT); the first
  best window owns it. Decoding only starts spans at owned tokens, so a span is scored in one window.
  """
  num_tokens = max(s + n for s, n in zip(doc_start, doc_len))
  best = np.full(num_tokens, -np.inf)
  owner = np.full(num_tokens, -1)
  for w, (s, n) in enumerate(zip(doc_start, doc_len)):
    positions = np.arange(s, s + n)
    score = np.minimum(positions - s, s + n - 1 - positions) + 0.01 * n
    better = score > best[positions]
    best[positions[better]] = score[better]
    owner[positions[better]] = w
  return [owner[s:s + n] == w for w, (s, n) in enumerate(zip(doc_start, doc_len))]


def answer_token_span(spans: np.ndarray, answer: Answer, context: str) -> tuple[int, int] | None:
  """First and last context token overlapping the answer's characters (outer whitespace ignored).

  spans: (T, 2) character spans of the context tokens. None when the answer text is not at its
  answer_start in `context` or overlaps no token.
  """
  if context[answer.start:answer.end] != answer.text or not answer.text.strip():
    return None
  begin = answer.start + len(answer.text) - len(answer.text.lstrip())
  end = answer.end - (len(answer.text) - len(answer.text.rstrip()))
  overlapping = np.flatnonzero((spans[:, 0] < end) & (spans[:, 1] > begin))
  if not len(overlapping):
    return None
  return int(overlapping[0]), int(overlapping[-1])


def span_text(context: str, spans: np.ndarray, first: int, last: int) -> str:
  """The original context text of context tokens first..last."""
  return context[spans[first, 0]:spans[last, 1]]


def build_features(examples: Sequence[SquadExample], tokenizer: OffsetTokenizer,
                   config: FeatureConfig = FeatureConfig(), training: bool = False) -> SquadFeatures:
  """Windows, labels and maps for `examples` (see the module docstring). `training` skips questions whose
  answer cannot be located (counted) instead of labelling them no-answer."""
  config.validate()
  stats = dict.fromkeys(("questions", "windows", "truncated_questions", "split_contexts", "answer_outside_window",
                         "answers_in_no_window", "inexact_answers", "unrecoverable_answers", "skipped_questions"), 0)
  rows, kept, context_spans = [], [], []
  contexts: dict[str, tuple[list[int], np.ndarray]] = {}  # many questions share a context: tokenise it once
  for example in examples:
    if example.context not in contexts:
      ids, spans = tokenizer.encode_with_offsets(example.context)
      contexts[example.context] = ids, np.asarray(spans, np.int32).reshape(-1, 2)
    context_ids, spans = contexts[example.context]
    label = None
    if example.answers:
      label = answer_token_span(spans, example.answers[0], example.context)
      if label is None:
        stats["unrecoverable_answers"] += 1
        if training:
          stats["skipped_questions"] += 1
          continue
      elif normalize_answer(span_text(example.context, spans, *label)) != normalize_answer(example.answers[0].text):
        stats["inexact_answers"] += 1
    question_ids = tokenizer.encode(example.question)
    stats["truncated_questions"] += len(question_ids) > config.max_query_length
    question_ids = question_ids[:config.max_query_length]
    offset = len(question_ids) + 3
    windows = window_starts(len(context_ids), config.seq_len - len(question_ids) - NUM_SPECIALS, config.doc_stride)
    stats["split_contexts"] += len(windows) > 1
    held = False
    for doc_start, doc_len in windows:
      start = end = 0
      if label is not None and doc_start <= label[0] and label[1] < doc_start + doc_len:
        start, end = offset + label[0] - doc_start, offset + label[1] - doc_start
        held = True
      elif example.answers:
        stats["answer_outside_window"] += 1
      row = [vocab.BOS, *question_ids, vocab.EOS, vocab.EOS, *context_ids[doc_start:doc_start + doc_len], vocab.EOS]
      rows.append((row, start, end, len(kept), doc_start, doc_len, offset))
    stats["answers_in_no_window"] += label is not None and not held
    kept.append(example)
    context_spans.append(spans)
  stats["questions"], stats["windows"] = len(kept), len(rows)
  return _pack(rows, config.seq_len, tuple(kept), tuple(context_spans), stats)


def _pack(rows, seq_len: int, examples, context_spans, stats) -> SquadFeatures:
  tokens = np.full((len(rows), seq_len), vocab.PAD, np.int32)
  p_mask = np.ones((len(rows), seq_len), bool)
  p_mask[:, 0] = False
  columns = np.zeros((len(rows), 6), np.int32)
  for i, (row, start, end, example, doc_start, doc_len, offset) in enumerate(rows):
    tokens[i, :len(row)] = row
    p_mask[i, offset:offset + doc_len] = False
    columns[i] = start, end, example, doc_start, doc_len, offset
  start, end, example_index, doc_start, doc_len, context_offset = map(np.ascontiguousarray, columns.T)
  return SquadFeatures(tokens, p_mask, start, end, example_index, doc_start, doc_len, context_offset,
                       examples, context_spans, stats)
