"""Predictive entropy (nats) of masked-token distributions (ExLM reference §8.2).

H(P) = -sum_y P(y) log P(y). MLM: averaged over masked positions. ExLM, three views of one batch:
  * per expanded state: H(P_u) averaged over the valid DAG states u;
  * Viterbi path: H(P_u) averaged over the states the best path visits (`path[b, u] >= 0`, the
    target index state u emits, -1 when skipped, as `dag_best_path` returns);
  * posterior mixture: H(sum_u gamma_i(u) P_u) per target i, averaged over valid targets, where
    gamma_i(u) is the posterior that state u emits target i (normalised over u for each i).

Every function takes numpy arrays (computed on the host, float64 by default) or JAX arrays (computed
with jax.numpy, so they can run inside `jax.jit` on the device; float64 there needs jax_enable_x64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
