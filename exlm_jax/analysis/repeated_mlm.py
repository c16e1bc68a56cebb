"""The Repeated-MLM pilot: repeat every token k times, then mask each slot w.p. p; the `repeated_mlm` tool.

The unreal-token ratio (fraction of content slots that are [MASK]) is then p and the
corrupted-semantics ratio (fraction of original tokens whose k copies are all masked) is p^k,
so (p, k) pairs can hold one fixed while the other varies.

Choices (the paper leaves them open):
  * `<pad>` slots are dropped; the other `specials` (`<s>`, `</s>`) are kept ONCE, never repeated
    and never masked, so both ratios are over content tokens only (`<unk>` is content);
  * masks are independent Bernoulli(p) draws per slot (no fixed count, no 80/10/10): masked slots
    hold [MASK];
  * every copy keeps its ORIGINAL position (`positions`, for the 1-D shared-position RoPE) and
    gets a copy index 1..k (0 for specials and padding), should a 2-D RoPE be wanted instead;
  * the loss target is not fixed here: `mask` marks every masked copy, `all_masked` the original
    tokens whose information is gone; `targets` holds the uncorrupted repeated sequence.
Fixed-length blocks (`repeat_and_mask_block`): a block `<s> x_1..x_L </s> <pad>..` of n slots grows
to 2 + k L slots; when that exceeds the output length the content is cut to its longest prefix that
still fits with a closing `</s>`, and the result is padded back to the output length.

The pilot as a pretraining objective is exlm_jax/objectives/repeated_mlm.py (the same transform in
JAX inside the jitted step; config configs/repeated_mlm_smiles_small.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from exlm_jax import run_store
from exlm_jax.analysis import inputs
from exlm_jax.data import vocab
from exlm_jax.objectives.repeated_mlm import repeated_length


class RepeatedSample(NamedTuple):
  """One repeated-and-masked sequence (T slots) or a batch of them (leading B axis)."""

  tokens: np.ndarray  # (T,) int32 corrupted input: [MASK] at masked slots
  targets: np.ndarray  # (T,) int32 the uncorrupted repeated sequence
  mask: np.ndarray  # (T,) bool masked slots
  positions: np.ndarray  # (T,) int32 original position of each slot, shared by the k copies
  copy_index: np.ndarray  # (T,) int32 1..k for copies of a content token, 0 for specials / padding
  content: np.ndarray  # (T,) bool copies of content tokens (the maskable slots)
  all_masked: np.ndarray  # (n,) bool per SOURCE slot: a content token whose k copies are all masked
  source_content: np.ndarray  # (n,) bool per SOURCE slot: a content token present in the output


def _check(k: int, p: float) -> None:
  if int(k) != k or k < 1:
    raise ValueError(f"k={k} must be a positive integer (copies per token)")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p={p} must be a probability in [0, 1]")


def repeat_and_mask(tokens, k: int, p: float, rng: np.random.Generator,
                    specials: Sequence[int] = vocab.UNMASKABLE) -> RepeatedSample:
  """Repeats each content token of `tokens` (n,) k times and masks every copy w.p. p.

  Returns a RepeatedSample with T = (#specials kept) + k * (#content tokens) slots; `all_masked` and
  `source_content` are aligned with the n input slots (False at specials and `<pad>`).
  """
  _check(k, p)
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D (n,), got shape {tokens.shape}; use repeat_and_mask_batch")
  kept = np.flatnonzero(tokens != vocab.PAD)
  is_content = ~np.isin(tokens, specials) & (tokens != vocab.PAD)
  copies = np.where(is_content[kept], k, 1)
  origin = np.repeat(kept, copies)
  content = is_content[origin]
  group_start = np.repeat(np.cumsum(copies) - copies, copies)
  copy_index = np.where(content, np.arange(origin.size) - group_start + 1, 0)
  mask = content & (rng.random(origin.size) < p)
  masked_copies = np.bincount(origin, weights=mask.astype(np.float64), minlength=tokens.size)
  targets = tokens[origin].astype(np.int32)
  return RepeatedSample(
      tokens=np.where(mask, vocab.MASK, targets).astype(np.int32),
      targets=targets,
      mask=mask,
      positions=origin.astype(np.int32),
      copy_index=copy_index.astype(np.int32),
      content=content,
      all_masked=is_content & (masked_copies == k),
      source_content=is_content,
  )


def truncate_to_fit(block, k: int, length: int, specials: Sequence[int] = vocab.UNMASKABLE) -> np.ndarray:
  """The block (n,) cut so that its repetition fits `length` slots, ending in `</s>`; pads kept.

  Content costs k slots, a special 1. If the whole block fits it is returned unchanged; otherwise
  the longest prefix that fits with one slot to spare is kept and a `</s>` is put after it (unless
  the prefix already ends in one). Returned with the input's length, padded with `<pad>`.
  """
  block = np.asarray(block)
  kept = np.flatnonzero(block != vocab.PAD)
  cost = np.where(np.isin(block[kept], specials), 1, k)
  used = np.cumsum(cost)
  if used.size == 0 or used[-1] <= length:
    return block.copy()
  prefix = kept[used <= length - 1]
  out = np.full_like(block, vocab.PAD)
  out[prefix] = block[prefix]
  if prefix.size == 0 or block[prefix[-1]] != vocab.EOS:
    out[prefix[-1] + 1 if prefix.size else 0] = vocab.EOS
  return out


def _pad_to(sample: RepeatedSample, length: int) -> RepeatedSample:
  """Pads the slot fields (not the per-source ones) of `sample` to `length` slots."""
  extra = length - sample.tokens.size
  if extra < 0:
    raise ValueError(f"repeated sequence has {sample.tokens.size} slots > length {length}")
  pad = lambda x, value: np.concatenate([x, np.full(extra, value, x.dtype)])  # noqa: E731
  return sample._replace(
      tokens=pad(sample.tokens, vocab.PAD), targets=pad(sample.targets, vocab.PAD),
      mask=pad(sample.mask, False), positions=pad(sample.positions, 0),
      copy_index=pad(sample.copy_index, 0), content=pad(sample.content, False))


def repeat_and_mask_block(block, k: int, p: float, rng: np.random.Generator, length: int | None = None,
                          specials: Sequence[int] = vocab.UNMASKABLE) -> RepeatedSample:
  """Fixed-shape version for pretraining: block (n,) -> slot fields (length,), source fields (n,).

  `length` defaults to n (the pretraining block size), so long blocks are truncated (see module doc).
  """
  block = np.asarray(block)
  length = block.size if length is None else length
  return _pad_to(repeat_and_mask(truncate_to_fit(block, k, length, specials), k, p, rng, specials), length)


def repeat_and_mask_batch(blocks, k: int, p: float, rng: np.random.Generator, length: int | None = None,
                          specials: Sequence[int] = vocab.UNMASKABLE) -> RepeatedSample:
  """Batched `repeat_and_mask_block`: blocks (B, n) -> slot fields (B, length), source fields (B, n)."""
  blocks = np.asarray(blocks)
  rows = [repeat_and_mask_block(row, k, p, rng, length, specials) for row in blocks]
  return RepeatedSample(*(np.stack(field) for field in zip(*rows)))


def grain_transform(k: int, p: float, length: int | None = None, key: str = "tokens",
                    specials: Sequence[int] = vocab.UNMASKABLE):
  """A grain RandomMapTransform: element {key: (n,) block, ...} -> element plus the sample's fields.

  The sample's `tokens` replace element[key]; the other fields are added under their own names.
  """
  import grain.python as grain  # noqa: PLC0415 (grain is slow to import; only pipelines need it)

  class RepeatAndMask(grain.RandomMapTransform):

    def random_map(self, element, rng: np.random.Generator):
      sample = repeat_and_mask_block(element[key], k, p, rng, length, specials)
      return {**element, **sample._asdict(), key: sample.tokens}

  _check(k, p)
  return RepeatAndMask()


def _samples(samples) -> list[RepeatedSample]:
  return [samples] if isinstance(samples, RepeatedSample) else list(samples)


def unreal_token_ratio(samples: RepeatedSample | Iterable[RepeatedSample]) -> float:
  """Measured fraction of content slots that hold [MASK] (expected: p)."""
  samples = _samples(samples)
  masked = sum(int(np.sum(s.mask)) for s in samples)
  slots = sum(int(np.sum(s.content)) for s in samples)
  return masked / slots if slots else float("nan")


def corrupted_semantics_ratio(samples: RepeatedSample | Iterable[RepeatedSample]) -> float:
  """Measured fraction of original content tokens whose copies are all masked (expected: p^k)."""
  samples = _samples(samples)
  lost = sum(int(np.sum(s.all_masked)) for s in samples)
  tokens = sum(int(np.sum(s.source_content)) for s in samples)
  return lost / tokens if tokens else float("nan")


def solve_p(corrupted_ratio: float, k: int) -> float:
  """Mask probability giving corrupted-semantics ratio r with k copies: p = r^(1/k)."""
  if not 0.0 < corrupted_ratio < 1.0:
    raise ValueError(f"corrupted_ratio={corrupted_ratio} must be in (0, 1)")
  _check(k, 0.0)
  return corrupted_ratio ** (1.0 / k)


def solve_k(corrupted_ratio: float, p: float) -> float:
  """Copies giving corrupted-semantics ratio r at mask probability p: k = ln r / ln p (real-valued)."""
  if not 0.0 < corrupted_ratio < 1.0 or not 0.0 < p < 1.0:
    raise ValueError(f"need 0 < corrupted_ratio, p < 1; got corrupted_ratio={corrupted_ratio}, p={p}")
  return math.log(corrupted_ratio) / math.log(p)


class GridPoint(NamedTuple):
  p: float  # mask probability = unreal-token ratio
  k: int
  unreal_ratio: float
  corrupted_ratio: float  # achieved p^k
  target: float | None = None  # the requested corrupted ratio, when one was asked for


def pk_grid(*, unreal: float | None = None, corrupted: float | None = None,
            ks: Iterable[int] = (1, 2, 3, 4, 6, 8),
            corrupted_targets: Iterable[float] | None = None) -> list[GridPoint]:
  """(p, k) pairs holding one ratio fixed.

  * `corrupted=r`: for each k in `ks`, p = r^(1/k) (exact; the unreal ratio varies).
  * `unreal=p`: for each k in `ks`, corrupted = p^k; or, with `corrupted_targets`, for each target r
    the integer k nearest ln r / ln p (at least 1) and the corrupted ratio it actually achieves.
  """
  if (unreal is None) == (corrupted is None):
    raise ValueError("give exactly one of unreal= (fixed mask ratio) or corrupted= (fixed corrupted ratio)")
  if corrupted is not None:
    ps = [(solve_p(corrupted, k), k) for k in ks]
    return [GridPoint(p, k, p, p**k, corrupted) for p, k in ps]
  _check(1, unreal)
  if corrupted_targets is None:
    return [GridPoint(unreal, k, unreal, unreal**k) for k in ks]
  points = []
  for target in corrupted_targets:
    k = max(1, round(solve_k(target, unreal)))
    points.append(GridPoint(unreal, k, unreal, unreal**k, target))
  return points


# ----------------------------------------------------------------------------------------------
# The tool
# ----------------------------------------------------------------------------------------------


def analyse(workdir, data: str, out_dir: str, fixed: str = "corrupted", ratio: float = 0.15,
            ks: Sequence[int] = (1, 2, 3, 4, 6, 8), max_sequences: int = 512, seed: int = 0) -> dict:
  """Applies "repeat x k, then Bernoulli(p) mask" to `data` over a (p, k) grid holding one ratio fixed.

  fixed='corrupted': p = ratio^(1/k) (corrupted-semantics ratio fixed, unreal ratio varies);
  fixed='unreal': p = ratio (unreal ratio fixed, corrupted = p^k varies). `data` is read with the
  workdir's tokenizer, data kind and seq_len; blocks grow to 2 + k (n - 2) slots, so nothing is
  truncated. Writes repeated_mlm.json / repeated_mlm.png.
  """
  from exlm_jax.analysis import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
  if fixed not in ("corrupted", "unreal"):
    raise ValueError(f"fixed={fixed!r}; use 'corrupted' or 'unreal'")
  run = inputs.as_run(workdir)
  blocks = inputs.load_data_blocks(data, run, max_sequences)
  grid = pk_grid(corrupted=ratio, ks=ks) if fixed == "corrupted" else pk_grid(unreal=ratio, ks=ks)
  rng = np.random.default_rng(seed)
  points = []
  for point in grid:
    length = repeated_length(blocks.shape[1], point.k)
    sample = repeat_and_mask_batch(blocks, point.k, point.p, rng, length)
    points.append({
        "k": int(point.k), "p": float(point.p), "expected_unreal_ratio": float(point.unreal_ratio),
        "expected_corrupted_ratio": float(point.corrupted_ratio),
        "measured_unreal_ratio": unreal_token_ratio(sample),
        "measured_corrupted_ratio": corrupted_semantics_ratio(sample),
        "content_slots": int(sample.content.sum()), "source_tokens": int(sample.source_content.sum()),
        "repeated_len": int(length)})
  result = {"tool": "repeated_mlm", "workdir": run.workdir, "data": data, "fixed": fixed, "ratio": ratio, "seed": seed,
            "num_sequences": int(len(blocks)), "points": points}
  result["plots"] = {"repeated_mlm": plots.plot_repeated_mlm(
      points, os.path.join(out_dir, "repeated_mlm.png"), f"Repeated-MLM grid, {fixed} ratio fixed at {ratio:g}")}
  run_store.write_json(os.path.join(out_dir, "repeated_mlm.json"), result)
  return result
