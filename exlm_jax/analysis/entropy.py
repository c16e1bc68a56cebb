"""Predictive entropy (nats) of masked-token distributions, and the `entropy` tool.

H(P) = -sum_y P(y) log P(y). An objective with a prediction rule (MLM, MAE-LM): the rule's distribution
averaged over masked positions ('masked'). An objective whose targets are emitted by DAG-aligned states
(ExLM, `Objective.dag`), three views of one batch:
  * per expanded state: H(P_u) averaged over the valid DAG states u;
  * Viterbi path: H(P_u) averaged over the states the best path visits (`path[b, u] >= 0`, the
    target index state u emits, -1 when skipped, as `dag_best_path` returns);
  * posterior mixture: H(sum_u gamma_i(u) P_u) per target i, averaged over valid targets, where
    gamma_i(u) is the posterior that state u emits target i (normalised over u for each i).

Every function takes numpy arrays (computed on the host, float64 by default) or JAX arrays (computed
with jax.numpy, so they can run inside `jax.jit` on the device; float64 there needs jax_enable_x64).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exlm_jax import run_store
from exlm_jax.analysis import inputs
from exlm_jax.data import vocab
from exlm_jax.objectives import base


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def _float(x, dtype):
  """x as a float array: `dtype` if given, else float64 on numpy and >= float32 on JAX."""
  xp = _xp(x)
  if dtype is None:
    dtype = np.float64 if xp is np else jnp.promote_types(x.dtype, jnp.float32)
  return xp.asarray(x, dtype)


def _softmax_parts(logits, axis: int):
  """(probabilities, max-shifted logits, partition sum); rows that are all -inf get probabilities 0."""
  xp = _xp(logits)
  peak = xp.max(logits, axis=axis, keepdims=True)
  shifted = logits - xp.where(xp.isfinite(peak), peak, 0.0)
  unnorm = xp.exp(shifted)
  total = xp.sum(unnorm, axis=axis, keepdims=True)
  probs = unnorm / xp.where(total > 0, total, 1.0)
  return probs, shifted, total


def entropy_from_logits(logits, axis: int = -1, dtype=None):
  """Entropy of softmax(logits) along `axis`: (..., V) -> (...). Stable; -inf logits are allowed."""
  xp = _xp(logits)
  probs, shifted, total = _softmax_parts(_float(logits, dtype), axis)
  # H = log Z - sum_y p_y z_y with z the shifted logits; p_y = 0 terms vanish even where z_y = -inf.
  weighted = probs * xp.where(probs > 0, shifted, 0.0)
  log_total = xp.where(total > 0, xp.log(xp.where(total > 0, total, 1.0)), xp.nan)  # NaN for all -inf rows
  return xp.squeeze(log_total, axis=axis) - xp.sum(weighted, axis=axis)


def entropy_from_probs(probs, axis: int = -1, dtype=None):
  """Entropy of distributions given as probabilities along `axis`: (..., V) -> (...)."""
  xp = _xp(probs)
  probs = _float(probs, dtype)
  positive = probs > 0
  return -xp.sum(probs * xp.log(xp.where(positive, probs, 1.0)), axis=axis)


def masked_sum_count(values, mask):
  """(sum of `values` where `mask`, number of such entries); NaN/inf outside the mask are ignored."""
  xp = _xp(values)
  mask = xp.asarray(mask, bool)
  return xp.sum(xp.where(mask, values, 0.0)), xp.sum(mask)


def masked_mean(values, mask):
  """Mean of `values` over entries where `mask` is true; NaN when there are none."""
  xp = _xp(values)
  total, count = masked_sum_count(values, mask)
  return xp.where(count > 0, total / xp.maximum(count, 1), xp.nan)


def mlm_entropy(logits, mask, dtype=None):
  """Mean entropy over masked positions: `logits` (B, M, V), `mask` (B, M) valid masked slots."""
  return masked_mean(entropy_from_logits(logits, dtype=dtype), mask)


def state_entropy(state_logits, state_valid, dtype=None):
  """ExLM per expanded state: mean H(P_u) over valid states; (B, S, V), (B, S) -> scalar."""
  return masked_mean(entropy_from_logits(state_logits, dtype=dtype), state_valid)


def path_entropy(state_entropies, path):
  """ExLM on the Viterbi path: mean H(P_u) over states with `path` (B, S) >= 0; entropies (B, S)."""
  return masked_mean(state_entropies, path >= 0)


def mixture_distribution(gamma, state_logits, dtype=None):
  """Q_i = sum_u gamma_i(u) P_u: gamma (B, M, S), state_logits (B, S, V) -> (B, M, V) probabilities."""
  xp = _xp(state_logits)
  probs, _, _ = _softmax_parts(_float(state_logits, dtype), -1)  # all -inf (padding) states give zeros
  return xp.einsum("bms,bsv->bmv", xp.asarray(gamma, probs.dtype), probs)


def mixture_entropy(gamma, state_logits, target_valid, dtype=None):
  """ExLM posterior mixture: mean over valid targets (B, M) of H(sum_u gamma_i(u) P_u)."""
  return masked_mean(entropy_from_probs(mixture_distribution(gamma, state_logits, dtype)), target_valid)


def exlm_entropy_sums(state_logits, state_valid, path, gamma, target_valid, dtype=None) -> dict:
  """All three ExLM variants for one batch as {name: (sum, count)}, to stream over many batches.

  Args:
    state_logits: (B, S, V) emission logits of the DAG states; state_valid: (B, S) bool.
    path: (B, S) int target index emitted by each state on the Viterbi path, -1 elsewhere.
    gamma: (B, M, S) posteriors over states per target; target_valid: (B, M) bool.
  """
  per_state = entropy_from_logits(state_logits, dtype=dtype)
  return {
      "state": masked_sum_count(per_state, state_valid),
      "path": masked_sum_count(per_state, (path >= 0) & state_valid),
      "mixture": masked_sum_count(entropy_from_probs(mixture_distribution(gamma, state_logits, dtype)),
                                  target_valid),
  }


class MeanAccumulator:
  """Host-side running mean of (sum, count) pairs, e.g. from `masked_sum_count`."""

  def __init__(self):
    self.total = 0.0
    self.count = 0

  def add(self, total, count) -> None:
    self.total += float(total)
    self.count += int(count)

  @property
  def mean(self) -> float:
    return self.total / self.count if self.count else float("nan")


# ----------------------------------------------------------------------------------------------
# The tool
# ----------------------------------------------------------------------------------------------


def per_token_variant(objective: base.Objective) -> str:
  """The variant that is one predictive distribution per masked token: the posterior mixture of a DAG
  objective's states, else the prediction rule's distribution."""
  return "mixture" if objective.dag is not None else "masked"


def masked_target_sums(alignment: base.Alignment) -> dict:
  """`exlm_entropy_sums` restricted to the masked targets (not <s>, </s>): their states, the path's visits to
  them, and the mixture per masked target of the rows that have a path."""
  a = alignment
  state_valid = a.state_valid & jnp.take_along_axis(a.target_masked, a.state_group, axis=1)
  on_masked = jnp.take_along_axis(a.target_masked, jnp.maximum(a.path, 0), axis=1)
  path = jnp.where((a.path >= 0) & on_masked, a.path, -1)
  target_valid = a.target_masked & jnp.isfinite(a.score)[:, None]
  return exlm_entropy_sums(a.state_logits, state_valid, path, a.posteriors, target_valid)


def _masked_sums_fn(run: inputs.Run):
  """fn(tokens (B, n), selection) -> {'masked': (sum, count)}: H of the prediction rule's distribution at the
  masked slots (MAE-LM: [MASK] slots removed from the encoder, room for every kept token)."""
  log_probs = base.masked_log_probs_fn(run.config)

  def build():
    return jax.jit(lambda params, tokens, is_masked, indices: entropy_from_logits(
        log_probs(params, jnp.where(is_masked, vocab.MASK, tokens), indices)))

  jitted = inputs.cached(run, "masked_entropy", build)

  def sums(tokens, selection):
    values = jax.device_get(jitted(run.params, tokens, selection.is_masked, selection.indices))
    return {"masked": masked_sum_count(np.asarray(values, np.float64), selection.valid)}

  return sums


def _state_sums_fn(run: inputs.Run, mask_ratio: float):
  """fn(tokens, selection) -> {'state' | 'path' | 'mixture': (sum, count)} over the masked targets."""
  dag = run.spec.dag
  model = run.model(mask_prob=float(mask_ratio))

  def body(m, tokens, is_masked):
    sums = masked_target_sums(dag.align(m, tokens, is_masked))
    return {name: (jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32)) for name, (s, c) in sums.items()}

  jitted = inputs.cached(run, "state_entropy", lambda: jax.jit(
      lambda params, t, mk: model.apply({"params": params}, t, mk, method=body)), float(mask_ratio))
  return lambda tokens, selection: jax.device_get(jitted(run.params, tokens, selection.is_masked))


def block_length_limit(run: inputs.Run, mask_ratios: Sequence[float], width: int) -> int:
  """The longest block length <= width the run can score at every ratio: `width` for a prediction rule, the
  objective's `dag.block_length` at each ratio for a DAG objective (ExLM's link table is sized for its
  training mask_prob), minimised over the ratios."""
  for ratio in mask_ratios:
    if not 0.0 < ratio < 1.0:
      raise ValueError(f"mask ratio {ratio} must be in (0, 1)")
  dag = run.spec.dag
  if dag is None:
    return int(width)
  return min(int(dag.block_length(run.model(mask_prob=float(r)), float(r), int(width))) for r in mask_ratios)


def analyse(workdir, data: str, out_dir: str, mask_ratios: Sequence[float] = inputs.DEFAULT_MASK_RATIOS,
            max_sequences: int = 512, batch_size: int = 32, seed: int = 0,
            blocks: np.ndarray | None = None, block_len: int | None = None) -> dict:
  """Mean predictive entropy (nats) at masked positions per mask ratio; writes entropy.json / entropy.png.

  Prediction rule: 'masked'. DAG states, over the [MASK] groups only: 'state' (every expanded state), 'path'
  (states on the Viterbi path), 'mixture' (the posterior-weighted emission mixture per masked target).
  Every ratio is scored on the same blocks cut to ONE length, `block_len` (recorded): by default the longest
  the run can score at every ratio (`block_length_limit`); `report` passes the shortest over its runs, so
  every objective in a report is scored on identical blocks.
  """
  from exlm_jax.analysis import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
  run = inputs.as_run(workdir)
  if run.spec.dag is None and run.spec.masked_log_probs is None:
    raise ValueError(f"entropy does not know objective {run.objective!r} (it has no prediction rule and no DAG)")
  blocks = inputs.load_data_blocks(data, run, max_sequences) if blocks is None else blocks
  limit = block_length_limit(run, mask_ratios, blocks.shape[1])
  if block_len is None:
    block_len = limit
  elif block_len > limit:
    raise ValueError(f"block length {block_len} is longer than {run.name} can score at mask ratios "
                     f"{list(mask_ratios)} ({limit}); use a shorter one")
  blocks = inputs.shorten_blocks(blocks, block_len)
  series: dict[str, list[float]] = {}
  counts: dict[str, list[int]] = {}
  masked_sums = _masked_sums_fn(run) if run.spec.dag is None else None
  for ratio in mask_ratios:
    accs: dict[str, MeanAccumulator] = {}
    sums_fn = masked_sums if masked_sums is not None else _state_sums_fn(run, ratio)
    for index, tokens in inputs.batches(blocks, batch_size):
      for name, (s, c) in sums_fn(tokens, inputs.select_masks(tokens, ratio, seed, index)).items():
        accs.setdefault(name, MeanAccumulator()).add(s, c)
    for name, acc in accs.items():
      series.setdefault(name, []).append(acc.mean)
      counts.setdefault(name, []).append(acc.count)
  vocab_size = int(run.config.model.vocab_size)
  result = {
      "tool": "entropy", "workdir": run.workdir, "objective": run.objective, "step": run.step, "data": data,
      "num_sequences": int(len(blocks)), "seed": seed, "units": "nats", "log_vocab": math.log(vocab_size),
      "train_mask_prob": float(run.config.mask_prob), "mask_ratios": [float(r) for r in mask_ratios],
      "block_len": int(blocks.shape[1]), "block_len_limit": limit, "entropy": series, "count": counts,
  }
  label = lambda name: f"{run.name} ({name})"  # noqa: E731
  result["plots"] = {"entropy": plots.plot_entropy_vs_mask_ratio(
      {label(name): (list(mask_ratios), values) for name, values in series.items()},
      os.path.join(out_dir, "entropy.png"), vocab_size=vocab_size)}
  run_store.write_json(os.path.join(out_dir, "entropy.json"), result)
  return result
