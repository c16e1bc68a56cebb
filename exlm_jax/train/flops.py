"""Analytic training FLOPs per step, per-device peak FLOP/s and MFU (anchors.md §5-§6).

Conventions (the usual "model FLOPs", as MaxText and the PaLM paper count them):
  * one multiply-add = 2 FLOPs; every matmul costs 3x its forward in training (forward, d input,
    d weight). Rematerialised recompute is NOT model FLOPs (pass `include_remat=True` for the
    hardware-FLOPs view);
  * bidirectional attention is counted in full (no causal halving): per layer and sequence of L
    slots, 8 L D^2 (Q, K, V, out projections) + 4 L D F (FFN) + 4 L^2 D (scores + weighted values);
  * padded static shapes are what runs, so lengths are the static bounds (M_max, K_max, L_max, S_max)
    -- the same counts XLA sees;
  * elementwise work (LayerNorm, GELU, softmax, RoPE, dropout, the optimizer) is not counted, except
    the ExLM DAG dynamic programme, which is elementwise but quadratic in the vertex count;
  * embedding lookups are gathers (0 FLOPs); the tied output projection counts 2 D V per position
    where logits are computed (masked positions / DAG vertices only).

`train_flops_per_step(config)` is for the global batch (`config.batch_size` sequences); divide by
the number of devices for per-device numbers (`perf_metrics`). `dot_flops(jaxpr)` counts the matmul
FLOPs of a traced program exactly, and tests/test_flops.py checks it equals the analytic matmul count;
XLA's `cost_analysis()['flops']` of the compiled step is larger by the elementwise ops it also counts
(see `xla_flops`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

# Dense bf16 peak FLOP/s per device (vendor specs; anchors.md §6). Matched in order against
# `device.device_kind`, case-insensitively, so more specific names come first.
PEAK_FLOPS = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium) reports "TPU v6 lite"
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("h100 pcie", 756e12),  # PCIe card: lower clocks than SXM
    ("h100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
)


# ----------------------------------------------------------------------------------------------
# Building blocks (forward FLOPs of ONE sequence)
# ----------------------------------------------------------------------------------------------


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


def lm_head_forward(positions: int, d_model: int, vocab_size: int, tied_dim: int | None = None) -> float:
  """Forward FLOPs of Dense(D->D) -> GELU -> LN -> [Linear(D->C)] -> E^T at `positions` slots.

  tied_dim: width C of the tied embedding when it differs from D (MAE-LM's narrow decoder).
  """
  per_position = 2 * d_model**2 + 2 * (tied_dim or d_model) * vocab_size
  if tied_dim is not None:
    per_position += 2 * d_model * tied_dim
  return float(positions * per_position)


def transition_head_forward(num_vertices: int, d_model: int, num_heads: int) -> float:
  """Forward FLOPs of ExLM's link head on S vertices: Q, K (2D -> D), gate (2D -> H), S^2 D scores."""
  projections = 2 * (2 * d_model) * (2 * d_model + num_heads)
  return float(num_vertices * projections + 2 * num_vertices**2 * d_model)


def dag_train(num_targets: int, num_vertices: int) -> float:
  """FLOPs of the DAG forward + custom backward on one example (elementwise, ~4 + 8 per S^2 cell per
  target step: add, max, exp, sum forward; add, add, exp, sum, scale, accumulate backward)."""
  return float(12 * max(num_targets - 1, 0) * num_vertices**2)


# ----------------------------------------------------------------------------------------------
# Per objective
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Breakdown:
  """Training FLOPs of one step for the global batch, by component; `total` is their sum."""

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

  def as_dict(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "shapes"}
    out.update(matmul=self.matmul, total=self.total, **dict(self.shapes))
    return out


def _model(config):
  m = config.model
  if m.vocab_size <= 0:
    raise ValueError(f"model.vocab_size={m.vocab_size}: set it (from the tokenizer) before counting FLOPs")
  return m


def _mlm(config, remat: tuple) -> Breakdown:
  from exlm_jax.objectives import masking  # pylint: disable=g-import-not-at-top
  m, n = _model(config), config.seq_len
  m_max = masking.max_masked(config.mask_prob, n)
  return Breakdown(
      encoder=encoder_train(n, m.num_layers, m.d_model, m.mlp_dim, *remat, m.pre_ln),
      lm_head=3 * lm_head_forward(m_max, m.d_model, m.vocab_size),
      shapes=(("seq_len", n), ("masked_max", m_max)))


def _maelm(config, remat: tuple) -> Breakdown:
  from exlm_jax.objectives import maelm, masking  # pylint: disable=g-import-not-at-top
  m, n = _model(config), config.seq_len
  knobs = maelm.options(config)
  pick = lambda value, default: default if value == -1 else int(value)
  dec_d = pick(knobs.decoder_dim, m.d_model)
  dec_ffn = pick(knobs.decoder_mlp_dim, m.mlp_dim)
  m_max = masking.max_masked(config.mask_prob, n)
  k_max = n if knobs.mask_in_encoder else maelm.max_kept(config.mask_prob, n)
  decoder = encoder_train(n, int(knobs.decoder_layers), dec_d, dec_ffn, *remat, False)  # post-LN; inherits remat
  if dec_d != m.d_model:
    decoder += 3 * 2 * n * m.d_model * dec_d  # Linear(C_enc -> C_dec) on the decoder input
  return Breakdown(
      encoder=encoder_train(k_max, m.num_layers, m.d_model, m.mlp_dim, *remat, m.pre_ln),
      decoder=decoder,
      lm_head=3 * lm_head_forward(m_max, dec_d, m.vocab_size, None if dec_d == m.d_model else m.d_model),
      shapes=(("seq_len", n), ("kept_max", k_max), ("masked_max", m_max)))


def _exlm(config, remat: tuple) -> Breakdown:
  from exlm_jax.objectives import exlm  # pylint: disable=g-import-not-at-top
  m, n = _model(config), config.seq_len
  opts = exlm.options(config)
  k = int(opts.num_copies)
  groups = exlm.max_groups(config.mask_prob, n)
  length = exlm.max_expanded_length(config.mask_prob, n, k)
  vertices = k * groups
  dag = opts.transitions == "dag"
  return Breakdown(
      encoder=encoder_train(length, m.num_layers, m.d_model, m.mlp_dim, *remat, m.pre_ln),
      lm_head=3 * lm_head_forward(vertices, m.d_model, m.vocab_size),
      transition_head=3 * transition_head_forward(vertices, m.d_model, m.num_heads) if dag else 0.0,
      dag=dag_train(groups, vertices) if dag else 0.0,
      shapes=(("seq_len", n), ("expanded_len", length), ("groups_max", groups), ("vertices_max", vertices)))


_OBJECTIVES = {"mlm": _mlm, "maelm": _maelm, "exlm": _exlm}


def breakdown(config, include_remat: bool = False) -> Breakdown:
  """Training FLOPs of one step of `config` (global batch), by component.

  include_remat: add the matmuls `model.remat` recomputes in the backward pass (hardware FLOPs,
  what the device executes; MFU uses the default, model FLOPs).
  """
  if config.objective not in _OBJECTIVES:
    raise ValueError(f"no FLOPs model for objective {config.objective!r}; known: {', '.join(_OBJECTIVES)}")
  per_sequence = _OBJECTIVES[config.objective](config, (config.model.get("remat", "none"), include_remat))
  scale = lambda x: x * config.batch_size
  return dataclasses.replace(
      per_sequence, encoder=scale(per_sequence.encoder), decoder=scale(per_sequence.decoder),
      lm_head=scale(per_sequence.lm_head), transition_head=scale(per_sequence.transition_head),
      dag=scale(per_sequence.dag))


def train_flops_per_step(config, include_remat: bool = False) -> float:
  """Model FLOPs of one optimizer step over the global batch (all micro-batches, all devices)."""
  return breakdown(config, include_remat).total


def has_model(objective: str) -> bool:
  """Whether `breakdown` knows `objective` (the trainer omits TFLOP/s and MFU for one it does not)."""
  return objective in _OBJECTIVES


# ----------------------------------------------------------------------------------------------
# Peaks and utilisation
# ----------------------------------------------------------------------------------------------


def peak_flops_per_device(device) -> float | None:
  """Dense bf16 peak FLOP/s of a jax Device (or a `device_kind` string); None when unknown (CPU)."""
  kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
  platform = "" if isinstance(device, str) else getattr(device, "platform", "")
  if platform == "cpu" or kind.lower() == "cpu":
    return None
  kind = kind.lower()
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak
  return None


def mfu(flops_per_step: float, step_time_s: float, num_devices: int, peak: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1]: achieved FLOP/s per device over the device's peak."""
  if peak is None or peak <= 0:
    return None
  if step_time_s <= 0 or num_devices <= 0:
    raise ValueError(f"step_time_s={step_time_s} and num_devices={num_devices} must be positive")
  return flops_per_step / step_time_s / num_devices / peak


def perf_metrics(flops_per_step: float, step_time_s: float, num_devices: int, peak: float | None) -> dict:
  """{'tflops_per_device': ..., ['mfu': ...]} for a progress line / TensorBoard."""
  out = {"tflops_per_device": flops_per_step / step_time_s / num_devices / 1e12}
  value = mfu(flops_per_step, step_time_s, num_devices, peak)
  if value is not None:
    out["mfu"] = value
  return out


# ----------------------------------------------------------------------------------------------
# Counting what a program actually does
# ----------------------------------------------------------------------------------------------


def xla_flops(lowered_or_compiled) -> float | None:
  """`cost_analysis()['flops']` of a jax Lowered/Compiled (None where the backend gives none).

  XLA's HloCostAnalysis counts 2 per multiply-add in dots and ALSO ~1 per element of every
  elementwise op / reduction, so it exceeds `train_flops_per_step` by the non-matmul work.
  """
  analysis = lowered_or_compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def _dot_general_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  contracted = math.prod(lhs_shape[d] for d in lhs_contract)
  return 2.0 * contracted * math.prod(eqn.outvars[0].aval.shape)


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def dot_flops(jaxpr) -> float:
  """Matmul FLOPs (2 per multiply-add) of every dot_general in a (Closed)Jaxpr, scans unrolled.

  While-loops are counted once per body (trip counts are not static); cond branches by their max.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
      continue
    if name == "cond":
      total += max((dot_flops(b) for b in eqn.params["branches"]), default=0.0)
      continue
    inner = sum(dot_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))
    total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total
