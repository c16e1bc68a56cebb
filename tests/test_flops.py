"""The analytic FLOPs model against the traced train step, XLA's count, the peak table and MFU.

Tolerances (measured, jax 0.10.2 CPU, one layer of width 128 / FFN 512, seq 32, batch 8, vocab 1000):
  * analytic matmul FLOPs == the dot_general FLOPs of the train step's jaxpr, exactly (rel 1e-9):
    both count 2 per multiply-add at the static padded shapes, 3x forward for training;
  * XLA's `jax.jit(step).lower(...).compile().cost_analysis()['flops']` is 6.8-9.3 % ABOVE the analytic
    total (MLM 1.093, MAE-LM 1.080, ExLM k=4 1.068; 2.8-3.3 % at `small`, seq 128): XLA also counts
    ~1 FLOP per element of every elementwise op and reduction (LayerNorm, GELU, softmax, RoPE, dropout
    masks, masking arithmetic, the AdamW update), which the analytic model leaves out (matmuls, plus the
    small DAG DP). We assert 1.0 <= XLA / analytic <= 1.15.
"""

import dataclasses
import math

import jax
import ml_collections
import pytest

from exlm_jax import config_lib
from exlm_jax.models import flops as model_flops
from exlm_jax.objectives import exlm
from exlm_jax.train import flops, partitioning, steps


def _config(objective: str, size: str = "small", **block):
  config = config_lib.pretrain_config(objective, size)
  config.model.vocab_size = 8000
  config.batch_size, config.seq_len = 8, 128
  if block:
    config[objective] = ml_collections.ConfigDict(block)
  return config


def _cheap_config(objective: str, **block):
  """One layer of `small`-like width: cheap to compile, matmuls still ~90 % of XLA's FLOPs."""
  config = _config(objective, "tiny", **block)
  config.model.update(vocab_size=1000, num_layers=1, d_model=128, num_heads=2, mlp_dim=512)
  config.seq_len = 32
  return config


def _setup(config):
  return steps.TrainSetup.create(config, partitioning.create_mesh(config.mesh, jax.devices()[:1]))


def _traced(setup):
  with setup.context():
    return setup._train.trace(setup.abstract_state(), setup.abstract_batch())  # pylint: disable=protected-access


@pytest.mark.parametrize("objective,block", [("mlm", {}), ("maelm", {"decoder_layers": 1}),
                                             ("exlm", {"num_copies": 4}), ("repeated_mlm", {"num_copies": 2})])
def test_analytic_matches_traced_matmuls_and_compiled_cost_analysis(objective, block):
  config = _cheap_config(objective, **block)
  setup = _setup(config)
  traced = _traced(setup)
  counted = flops.breakdown(config)
  assert flops.dot_flops(traced.jaxpr) == pytest.approx(counted.matmul, rel=1e-9)
  with setup.context():
    xla = flops.xla_flops(traced.lower().compile())
  assert 1.0 <= xla / counted.total <= 1.15, f"XLA {xla:.4g} vs analytic {counted.total:.4g}"


def test_narrow_maelm_decoder_and_remat_counts():
  """Decoder of its own width (input projection + projected head) and remat's recompute (HFU view)."""
  config = _config("maelm", "tiny", decoder_dim=16, decoder_heads=2, decoder_mlp_dim=32, decoder_layers=1)
  config.model.remat = "full"
  traced = _traced(_setup(config))
  assert flops.dot_flops(traced.jaxpr) == pytest.approx(flops.breakdown(config, include_remat=True).matmul,
                                                         rel=1e-9)
  assert flops.breakdown(config).matmul < flops.breakdown(config, include_remat=True).matmul


def _packed(config, max_examples):
  config.data = config_lib.data_config("smiles", "unused")
  config.data.packing, config.data.max_examples_per_block = True, max_examples
  return config


@pytest.mark.parametrize("objective,block", [("mlm", {}), ("maelm", {"decoder_layers": 1}),
                                             ("exlm", {"num_copies": 4}), ("exlm", {"num_copies": 2, "transitions": "ctc"})])
def test_packed_static_count_matches_traced_matmuls(objective, block):
  """With packing the step's static shapes grow with the examples per block X (M_max + X - 1 masked slots;
  ExLM: the block's expanded length and vertices for X examples, X DAG rows of one example's bounds), and the
  analytic count of the packed config is the traced packed step's matmuls."""
  config = _packed(_cheap_config(objective, **block), 5)
  counted = flops.breakdown(config)
  assert flops.dot_flops(_traced(_setup(config)).jaxpr) == pytest.approx(counted.matmul, rel=1e-9)
  assert counted.matmul > flops.breakdown(_cheap_config(objective, **block)).matmul  # one-example bounds
  shapes = dict(counted.shapes)
  assert shapes["masked_max" if objective != "exlm" else "groups_max"] == (
      math.ceil(0.15 * 32) + 5 - 1 + (2 * 5 if objective == "exlm" else 0))


def _exlm_by_hand(length, m, k):
  """Training FLOPs of one ExLM example (DAG transitions) alone in a block of `length` slots, written out:
  G = ceil(0.15 L) + 2 groups, the encoder on L + (k - 1) G slots, LM head and link head on k G vertices, the DP."""
  d, f, v, h, layers = m.d_model, m.mlp_dim, m.vocab_size, m.num_heads, m.num_layers
  groups = min(math.ceil(0.15 * length) + 2, length)
  slots, vertices = length + (k - 1) * groups, k * groups
  encoder = 3 * layers * (slots * (8 * d * d + 4 * d * f) + 4 * slots**2 * d)
  heads = 3 * vertices * (2 * d * d + 2 * d * v) + 3 * (vertices * 2 * 2 * d * (2 * d + h) + 2 * vertices**2 * d)
  return encoder + heads + 12 * (groups - 1) * vertices**2


def _with_seq_len(config, length):
  config = config.copy_and_resolve_references()
  config.seq_len = length
  return config


def _mlm_by_hand(length, m):
  """Training FLOPs of one MLM example alone in a block of `length` slots (the formulas written out)."""
  d, f, v, layers = m.d_model, m.mlp_dim, m.vocab_size, m.num_layers
  encoder = 3 * layers * (length * (8 * d * d + 4 * d * f) + 4 * length**2 * d)
  return encoder + 3 * math.ceil(0.15 * length) * (2 * d * d + 2 * d * v)


@pytest.mark.parametrize("objective,block", [("mlm", {}), ("maelm", {}), ("exlm", {"num_copies": 4}),
                                             ("repeated_mlm", {"num_copies": 2})])
def test_real_flops_are_the_formulas_at_the_actual_lengths(objective, block):
  config = _packed(_config(objective, **block), 4)
  one_per_block = _config(objective, **block)
  batch, n = config.batch_size, config.seq_len
  # Full one-example blocks: real work is the static count of unpacked blocks.
  assert flops.real_train_flops_per_step(config, batch * n, batch) == pytest.approx(
      flops.train_flops_per_step(one_per_block), rel=1e-12)
  # 24 examples of mean length 37.25 in the 8 blocks: 3/4 of the formulas at 37, 1/4 at 38, per example.
  at = lambda length: flops.train_flops_per_step(_with_seq_len(one_per_block, length)) / batch
  expected = 24 * (0.75 * at(37) + 0.25 * at(38))
  assert flops.real_train_flops_per_step(config, 24 * 37.25, 24) == pytest.approx(expected, rel=1e-12)
  assert flops.real_train_flops_per_step(config, 24 * 37.25, 24) < flops.train_flops_per_step(config)
  assert flops.real_breakdown(config, 0, 0).total == 0.0


def test_real_mlm_flops_by_hand():
  config = _packed(_config("mlm"), 4)
  assert flops.real_train_flops_per_step(config, 30 * 37, 30) == pytest.approx(30 * _mlm_by_hand(37, config.model),
                                                                               rel=1e-12)


def test_real_and_static_packed_exlm_flops_by_hand():
  """Packed ExLM (k=4, X=4): real FLOPs are per example at its own length (30 examples of 37 slots); the
  static count is the block's bounds for 4 examples, well above the real work."""
  config = _packed(_config("exlm", num_copies=4), 4)
  m = config.model
  assert flops.real_train_flops_per_step(config, 30 * 37, 30) == pytest.approx(30 * _exlm_by_hand(37, m, 4), rel=1e-12)
  d, f, v, h, layers, n, x = m.d_model, m.mlp_dim, m.vocab_size, m.num_heads, m.num_layers, 128, 4
  groups, row_groups = math.ceil(0.15 * n) + x - 1 + 2 * x, math.ceil(0.15 * n) + 2  # block, one example's DAG
  slots, vertices, row_vertices = n + 3 * groups, 4 * groups, 4 * row_groups
  static = (3 * layers * (slots * (8 * d * d + 4 * d * f) + 4 * slots**2 * d) + 3 * vertices * (2 * d * d + 2 * d * v)
            + x * 3 * (row_vertices * 2 * 2 * d * (2 * d + h) + 2 * row_vertices**2 * d)
            + x * 12 * (row_groups - 1) * row_vertices**2)
  assert flops.breakdown(config).total / config.batch_size == pytest.approx(static, rel=1e-12)
  assert flops.real_train_flops_per_step(config, 30 * 37, 30) < flops.train_flops_per_step(config)


def test_component_formulas():
  d, f, n, layers = 768, 3072, 512, 12
  # 6 N_nonembed + 12 L S d per token (docs/design.md §8.5) with N_nonembed = 12 L d^2 at F = 4d.
  per_token = 3 * model_flops.encoder_forward(n, layers, d, f) / n
  assert per_token == pytest.approx(6 * 12 * layers * d**2 + 12 * layers * n * d)
  assert model_flops.lm_head_forward(10, d, 100) == 10 * (2 * d * d + 2 * d * 100)
  assert exlm.dag_train(1, 50) == 0.0


def test_objective_scaling():
  mlm = flops.breakdown(_config("mlm"))
  ex1 = flops.breakdown(_config("exlm", num_copies=1))
  ex4 = flops.breakdown(_config("exlm", num_copies=4))
  mae = flops.breakdown(_config("maelm"))
  assert ex1.encoder == mlm.encoder  # k = 1: no expansion
  assert dict(ex4.shapes)["expanded_len"] == 128 + 3 * 22 and dict(ex4.shapes)["vertices_max"] == 88
  assert mae.encoder < mlm.encoder and mae.decoder > 0  # encoder on K_max = 109 < 128 slots
  assert flops.breakdown(_config("exlm", num_copies=4, transitions="ctc")).dag == 0.0
  assert flops.train_flops_per_step(_config("mlm")) == mlm.total
  assert dataclasses.replace(mlm).total == mlm.total
  with pytest.raises(ValueError, match="vocab_size"):
    bad = _config("mlm")
    bad.model.vocab_size = -1
    flops.breakdown(bad)


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("cpu", None), ("Some future accelerator", None)])
def test_peak_table(kind, peak):
  assert flops.peak_flops_per_device(kind) == peak


def test_peak_of_cpu_device_is_none():
  assert flops.peak_flops_per_device(jax.devices()[0]) is None


def test_mfu_arithmetic():
  # 989 TFLOP/s peak, 8 devices, 4e15 FLOPs in 1 s -> 500 TFLOP/s/device -> 50.56 %.
  assert flops.mfu(4e15, 1.0, 8, 989e12) == pytest.approx(500e12 / 989e12)
  assert flops.mfu(1e12, 2.0, 1, None) is None
  metrics = flops.perf_metrics(2e12, 0.5, 2, 4e12)
  assert metrics == pytest.approx({"tflops_per_device": 2.0, "mfu": 0.5})
  assert "mfu" not in flops.perf_metrics(2e12, 0.5, 2, None)
  with pytest.raises(ValueError, match="step_time_s"):
    flops.mfu(1.0, 0.0, 1, 1.0)
