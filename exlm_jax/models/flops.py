"""Analytic FLOPs of the shared building blocks; every objective sums them into a `Breakdown` (its `flops`).

Conventions (the usual "model FLOPs", as MaxText and the PaLM paper count them):
  * one multiply-add = 2 FLOPs; every matmul costs 3x its forward in training (forward, d input,
    d weight). Rematerialised recompute is NOT model FLOPs (pass `include_remat=True` for the
    hardware-FLOPs view);
  * bidirectional attention is counted in full (no causal halving): per layer and sequence of L
    slots, 8 L D^2 (Q, K, V, out projections) + 4 L D F (FFN) + 4 L^2 D (scores + weighted values);
  * padded static shapes are what runs, so lengths are the static bounds (M_max, K_max, L_max, S_max)
    -- the same counts XLA sees;
  * elementwise work (LayerNorm, GELU, softmax, RoPE, dropout, the optimizer) is not counted, except
    where an objective adds a quadratic elementwise programme of its own (ExLM's DAG);
  * embedding lookups are gathers (0 FLOPs); the tied output projection counts 2 D V per position
    where logits are computed (masked positions / DAG vertices only).
Per-step totals, device peaks and MFU: exlm_jax/train/flops.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Breakdown:
  """Training FLOPs by component (of one sequence from an objective; of one step from train/flops.py)."""

  encoder: float = 0.0
  decoder: float = 0.0
  lm_head: float = 0.0
  transition_head: float = 0.0
  dag: float = 0.0
  shapes: tuple = ()  # (name, value) pairs of the static sizes used, for reports

  @property
  def matmul(self) -> float:
    return self.encoder + self.decoder + self.lm_head + self.transition_head

  @property
  def total(self) -> float:
    return self.matmul + self.dag

  def scaled(self, factor: float) -> "Breakdown":
    """Every component times `factor` (e.g. the batch size); shapes unchanged."""
    return dataclasses.replace(self, **{f.name: getattr(self, f.name) * factor
                                        for f in dataclasses.fields(self) if f.name != "shapes"})

  def as_dict(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "shapes"}
    out.update(matmul=self.matmul, total=self.total, **dict(self.shapes))
    return out


def encoder_forward(length: int, num_layers: int, d_model: int, mlp_dim: int) -> float:
  """Forward FLOPs of a bidirectional Transformer stack on one sequence of `length` slots."""
  return _dense_forward(length, num_layers, d_model, mlp_dim) + _attention_forward(length, num_layers, d_model)


def _dense_forward(length, num_layers, d_model, mlp_dim) -> float:
  """Projections and FFN: 8 D^2 + 4 D F per token and layer."""
  return float(num_layers * length * (8 * d_model**2 + 4 * d_model * mlp_dim))


def _attention_forward(length, num_layers, d_model) -> float:
  """Scores and weighted values: 4 L D per token and layer (bidirectional, full L x L)."""
  return float(num_layers * 4 * length**2 * d_model)


def encoder_train(length: int, num_layers: int, d_model: int, mlp_dim: int, remat: str = "none",
                  include_remat: bool = False, pre_ln: bool = True) -> float:
  """Training FLOPs of the stack: 3x forward, plus the recomputed matmuls of `remat` if asked.

  Recompute per policy: 'full' redoes every block forward except, in pre-LN blocks, the FFN output
  projection (its output only feeds the residual sum, which the backward pass does not need, so
  JAX's partial evaluation drops it); 'dots_no_batch' redoes the batched attention dots only;
  'dots' and 'none' redo no matmul.
  """
  dense = _dense_forward(length, num_layers, d_model, mlp_dim)
  attention = _attention_forward(length, num_layers, d_model)
  total = 3 * (dense + attention)
  if include_remat and remat == "full":
    total += dense + attention - (2.0 * num_layers * length * d_model * mlp_dim if pre_ln else 0.0)
  elif include_remat and remat == "dots_no_batch":
    total += attention
  return total


def model_encoder_train(model, length: int, include_remat: bool) -> float:
  """`encoder_train` of the encoder described by a config's `model` section on `length` slots."""
  return encoder_train(length, model.num_layers, model.d_model, model.mlp_dim, model.get("remat", "none"),
                       include_remat, model.pre_ln)


def lm_head_forward(positions: int, d_model: int, vocab_size: int, tied_dim: int | None = None) -> float:
  """Forward FLOPs of Dense(D->D) -> GELU -> LN -> [Linear(D->C)] -> E^T at `positions` slots.

  tied_dim: width C of the tied embedding when it differs from D (MAE-LM's narrow decoder).
  """
  per_position = 2 * d_model**2 + 2 * (tied_dim or d_model) * vocab_size
  if tied_dim is not None:
    per_position += 2 * d_model * tied_dim
  return float(positions * per_position)
