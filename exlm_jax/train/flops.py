"""Training FLOPs per step, per-device peak FLOP/s and MFU; counting what a traced program does.

`breakdown(config)` asks `config.objective`'s FLOPs model (`Objective.flops`, built from the blocks and
conventions of exlm_jax/models/flops.py) for one sequence and scales it to the global batch
(`config.batch_size` sequences); divide by the number of devices for per-device numbers (`perf_metrics`).
That is the static-shape count: what the compiled step runs, padding included (budgets, XLA checks).
`real_breakdown(config, real_tokens, examples)` is the same formulas at a batch's actual lengths -- the
work of its real tokens, padding excluded -- which MFU is reported on.
`dot_flops(jaxpr)` counts the matmul FLOPs of a traced program exactly, and tests/test_flops.py checks it
equals the analytic matmul count; XLA's `cost_analysis()['flops']` of the compiled step is larger by the
elementwise ops it also counts (see `xla_flops`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections

from exlm_jax import objectives
from exlm_jax.models.flops import Breakdown

# Dense bf16 peak FLOP/s per device (vendor specs). Matched in order against
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
# Per step, through the objective registry
# ----------------------------------------------------------------------------------------------


def breakdown(config, include_remat: bool = False) -> Breakdown:
  """Training FLOPs of one step of `config` (global batch), by component.

  include_remat: add the matmuls `model.remat` recomputes in the backward pass (hardware FLOPs,
  what the device executes; MFU uses the default, model FLOPs).
  """
  if not has_model(config.objective):
    modelled = [name for name in objectives.names() if has_model(name)]
    raise ValueError(f"no FLOPs model for objective {config.objective!r}; known: {', '.join(modelled)}")
  if config.model.vocab_size <= 0:
    raise ValueError(f"model.vocab_size={config.model.vocab_size}: set it (from the tokenizer) before counting FLOPs")
  return objectives.get(config.objective).flops(config, include_remat).scaled(config.batch_size)


def train_flops_per_step(config, include_remat: bool = False) -> float:
  """Model FLOPs of one optimizer step over the global batch (all micro-batches, all devices)."""
  return breakdown(config, include_remat).total


def real_breakdown(config, real_tokens: float, examples: float, include_remat: bool = False) -> Breakdown:
  """Training FLOPs of a batch's real work: `examples` examples of the batch's mean length
  L = real_tokens / examples, each counted by the objective's formulas as if alone in a block of exactly
  its length (`seq_len` = L, one example per block, so no padding slots and per-example bounds).

  Approximation: every example is taken at the mean length (a non-integer L interpolates linearly between
  the formulas at floor(L) and floor(L) + 1), so terms quadratic in L -- attention's 4 L^2 D, ExLM's DAG --
  are low by var(L) / L^2 of those terms (about 3 % of attention, < 0.1 % of the step, on MOSES).
  Full one-example blocks (real_tokens = batch x seq_len, examples = batch) give `breakdown(config)`.
  """
  if not has_model(config.objective):
    raise ValueError(f"no FLOPs model for objective {config.objective!r}")
  if examples <= 0:
    return Breakdown()
  mean = real_tokens / examples
  low = max(int(math.floor(mean)), 3)
  weight = min(max(mean - low, 0.0), 1.0)
  one = lambda length: objectives.get(config.objective).flops(_one_example_blocks(config, length), include_remat)
  counted = one(low).scaled(1.0 - weight)
  if weight > 0:
    counted = _add(counted, one(low + 1).scaled(weight))
  return dataclasses.replace(counted.scaled(examples), shapes=(("mean_example_len", mean), ("examples", examples)))


def real_train_flops_per_step(config, real_tokens: float, examples: float, include_remat: bool = False) -> float:
  """Model FLOPs of one step's real tokens (`real_breakdown`); MFU is reported on this."""
  return real_breakdown(config, real_tokens, examples, include_remat).total


def _one_example_blocks(config, length: int):
  """`config` with blocks of `length` slots holding one example each."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.seq_len = int(length)
  config.data.packing = False
  return config


def _add(a: Breakdown, b: Breakdown) -> Breakdown:
  return dataclasses.replace(a, **{f.name: getattr(a, f.name) + getattr(b, f.name)
                                   for f in dataclasses.fields(a) if f.name != "shapes"})


def has_model(objective: str) -> bool:
  """Whether `breakdown` knows `objective` (the trainer omits TFLOP/s and MFU for one it does not)."""
  return objective in objectives.names() and objectives.get(objective).flops is not None


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


def perf_metrics(flops_per_step: float, step_time_s: float, num_devices: int, peak: float | None,
                 real_flops_per_step: float | None = None) -> dict:
  """{'tflops_per_device', ['real_tflops_per_device'], ['mfu']} for a progress line / TensorBoard.

  tflops_per_device is the static-shape rate (what the device runs, padding included); with
  `real_flops_per_step` also the rate of real work, and MFU is taken on it (else on the static count).
  """
  out = {"tflops_per_device": flops_per_step / step_time_s / num_devices / 1e12}
  if real_flops_per_step is not None:
    out["real_tflops_per_device"] = real_flops_per_step / step_time_s / num_devices / 1e12
  useful = flops_per_step if real_flops_per_step is None else real_flops_per_step
  value = mfu(useful, step_time_s, num_devices, peak)
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


# ----------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------


def method_config(config):
  """The config of the method a baseline is matched to (`config.matched_to`): its objective and block back."""
  out = ml_collections.ConfigDict(config.to_dict())
  matched = out.matched_to
  out.objective = matched.objective
  out[matched.objective] = ml_collections.ConfigDict(dict(matched.options))
  out.total_steps = int(matched.total_steps)
  return out


def resolve_budget(config):
  """`budget='equal_flops'`: total_steps = round(F_method * steps_method / F_baseline) with F the static-shape
  training FLOPs per step (`train_flops_per_step`, the count checked against XLA); needs model.vocab_size.
  The resolved value replaces total_steps (warm-up keeps its steps); 'steps' returns the config unchanged."""
  if config.get("budget", "steps") == "steps":
    return config
  matched = config.matched_to
  if not matched.objective:
    raise ValueError("budget=equal_flops needs the method it matches (matched_to); start from a method config's "
                     "objective=<baseline> argument, e.g. configs/exlm_smiles_small.py:objective=mlm,budget=equal_flops")
  method = method_config(config)
  steps = round(train_flops_per_step(method) * int(matched.total_steps) / train_flops_per_step(config))
  out = ml_collections.ConfigDict(config.to_dict())
  out.total_steps = max(int(steps), 1)
  return out
