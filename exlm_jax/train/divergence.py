"""Divergence: stop at the first non-finite step, before anything non-finite can be saved.

The train step (train/steps.py `_train_step`) skips an update whose loss or gradient norm is not finite:
params, optimizer state and `state.step` (updates applied) stay as they were, and `metrics['finite']` is 0.
So after `step` loop steps a state with `state.step != step` has skipped one; reading that one scalar is
the whole cost of a check. Both training loops check at every log step and before every save (and
fine-tuning before it keeps a best copy), so a non-finite state is never written and the last good
checkpoint is never rotated out by bad ones.
"""

from __future__ import annotations

from typing import Callable

import jax


class DivergenceGuard:
  """`add(step, metrics)` after every train step (keeps references, no host sync); `check(state, step)`
  raises a one-line FloatingPointError naming the first skipped step since the last check."""

  def __init__(self):
    self._pending = []  # (step, device metrics) since the last check

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def check(self, state, step: int, advice: Callable[[], str], context: str = "") -> None:
    """`state` after `step` loop steps; `advice()`: what to change, for the message (called on failure only)."""
    pending, self._pending = self._pending, []
    if int(jax.device_get(state.step)) == step:
      return
    host = jax.device_get([(s, {k: m[k] for k in ("finite", "loss", "grad_norm")}) for s, m in pending])
    skipped = [(s, m) for s, m in host if not m["finite"]]
    where = (f"step {skipped[0][0]}: loss {float(skipped[0][1]['loss']):.4g}, grad_norm "
             f"{float(skipped[0][1]['grad_norm']):.4g}") if skipped else f"or before step {step}"
    raise FloatingPointError(f"{context + ': ' if context else ''}training diverged at {where} (not finite; that "
                             f"update was skipped and nothing after it was saved); {advice()}")
