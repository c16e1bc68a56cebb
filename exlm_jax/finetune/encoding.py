"""Token blocks for fine-tuning, in the RoBERTa/fairseq `sentence_prediction` layout.

  single sentence: <s> A </s> <pad> ...
  sentence pair:   <s> A </s> </s> B </s> <pad> ...

Over-long inputs are cut at the end; for pairs the longer segment loses a token first (ties: B),
i.e. HuggingFace's 'longest_first' strategy. `example_lengths` says which inputs that cuts, before encoding
(finetune/lengths.py counts them per split, or drops them with data.overlong='skip').
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from exlm_jax.data import vocab


class Tokenizer(Protocol):
  """What encoding needs from a tokenizer (exlm_jax/data/tokenizers.py): ids without special tokens.

  `encode_batch(texts) -> list[list[int]]` is used instead of `encode` when the tokenizer has it.
  """

  vocab_size: int

  def encode(self, text: str) -> list[int]:
    ...


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths kept from A and B when at most `budget` tokens fit, trimming the longer one first."""
  if len_a + len_b <= budget:
    return len_a, len_b
  short = min(len_a, len_b)
  if short <= budget - short:  # only the longer segment needs trimming
    return (budget - len_b, len_b) if len_a > len_b else (len_a, budget - len_a)
  return (budget + 1) // 2, budget // 2


def example_lengths(texts: Sequence[str | tuple[str, str]], tokenizer: Tokenizer) -> np.ndarray:
  """(N,) int64: the slots each example fills untruncated, special tokens included (+2 single, +4 pair).

  An example is cut by `encode_examples(texts, tokenizer, seq_len)` exactly when its length exceeds seq_len.
  """
  if not texts:
    return np.zeros((0,), np.int64)
  encode = getattr(tokenizer, "encode_batch", None) or (lambda batch: [tokenizer.encode(t) for t in batch])
  if isinstance(texts[0], str):
    return np.array([len(a) + 2 for a in encode(list(texts))], np.int64)
  firsts, seconds = encode([t[0] for t in texts]), encode([t[1] for t in texts])
  return np.array([len(a) + len(b) + 4 for a, b in zip(firsts, seconds)], np.int64)


def encode_examples(texts: Sequence[str | tuple[str, str]], tokenizer: Tokenizer,
                    seq_len: int) -> tuple[np.ndarray, int]:
  """Tokenises examples into padded blocks.

  texts: N strings, or N (A, B) pairs (all of one kind).
  Returns tokens (N, seq_len) int32 and how many examples were truncated.
  """
  if not texts:
    return np.zeros((0, seq_len), np.int32), 0
  is_pair = not isinstance(texts[0], str)
  if any(isinstance(t, str) == is_pair for t in texts):
    raise ValueError("encode_examples got a mix of single sentences and sentence pairs; encode one kind per call")
  specials = 4 if is_pair else 2
  if seq_len <= specials:
    raise ValueError(f"seq_len={seq_len} leaves no room for text after {specials} special tokens")
  budget = seq_len - specials
  encode = getattr(tokenizer, "encode_batch", None) or (lambda batch: [tokenizer.encode(t) for t in batch])
  tokens = np.full((len(texts), seq_len), vocab.PAD, np.int32)
  truncated = 0
  if is_pair:
    for i, (a, b) in enumerate(zip(encode([t[0] for t in texts]), encode([t[1] for t in texts]))):
      keep_a, keep_b = truncate_pair(len(a), len(b), budget)
      row = [vocab.BOS, *a[:keep_a], vocab.EOS, vocab.EOS, *b[:keep_b], vocab.EOS]
      tokens[i, : len(row)] = row
      truncated += (keep_a, keep_b) != (len(a), len(b))
  else:
    for i, a in enumerate(encode(list(texts))):
      row = [vocab.BOS, *a[:budget], vocab.EOS]
      tokens[i, : len(row)] = row
      truncated += len(a) > budget
  return tokens, int(truncated)
