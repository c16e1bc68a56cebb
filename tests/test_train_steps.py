"""Sharded steps: (2,4) mesh == 1 device, grad accumulation == one big batch, optimizer details."""

import jax
import numpy as np
import pytest

from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.train import loop, optim, partitioning, steps


def _config(**kw):
  cfg = config_lib.pretrain_config("mlm", "tiny", seq_len=16, batch_size=8, **kw)
  cfg.model.vocab_size = 40
  return cfg


def _tokens(batch=8, n=16, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(vocab.NUM_SPECIAL, 40, (batch, n)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = vocab.BOS, vocab.EOS
  tokens[1, 9:] = vocab.PAD
  tokens[1, 8] = vocab.EOS
  return tokens


def _setup(cfg, **mesh):
  devices = jax.devices()[: int(np.prod(list(mesh.values())))]
  return steps.TrainSetup.create(cfg, partitioning.create_mesh(mesh, devices))


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


def test_sharded_step_equals_single_device():
  cfg = _config()
  tokens = _tokens()
  one = _setup(cfg, data=1, fsdp=1, tensor=1)
  many = _setup(cfg, data=2, fsdp=4, tensor=1)
  state1, state8 = one.init_state(), many.init_state()
  _assert_trees_close(state1.params, state8.params, 0)
  loss1, grads1 = one.loss_and_grads(state1.params, tokens, 3)
  loss8, grads8 = many.loss_and_grads(state8.params, tokens, 3)
  np.testing.assert_allclose(loss1, loss8, atol=1e-5)
  _assert_trees_close(grads1, grads8, 1e-5)
  # Parameters really are sharded on the (2, 4) mesh (embed dim over fsdp).
  kernel = state8.params["encoder"]["stack"]["layer_0"]["mlp"]["wi"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp" and len(kernel.addressable_shards[0].data) == kernel.shape[0] // 4
  for _ in range(2):
    state1, m1 = one.train_step(state1, tokens)
    state8, m8 = many.train_step(state8, tokens)
    np.testing.assert_allclose(m1["loss"], m8["loss"], atol=1e-5)
  _assert_trees_close(state1.params, state8.params, 1e-5)


def test_gradient_accumulation_equals_one_batch():
  tokens = _tokens()
  full = _setup(_config(), data=2, fsdp=1, tensor=1)
  accum = _setup(_config(grad_accum_steps=2), data=2, fsdp=1, tensor=1)
  params = full.init_state().params
  # Different micro-batch split -> different dropout draws; compare with dropout off.
  for s in (full, accum):
    s.config.model.dropout_rate = s.config.model.attention_dropout_rate = 0.0
  full = _setup(full.config, data=2, fsdp=1, tensor=1)
  accum = _setup(accum.config, data=2, fsdp=1, tensor=1)
  # Masks are drawn per micro-batch from fold_in(step_key, index), so compare against the same
  # masks: run the full batch objective on each micro-batch and add sums by hand.
  loss_a, grads_a = accum.loss_and_grads(params, tokens, 5)
  key = jax.random.fold_in(jax.random.PRNGKey(0), 5)
  micro = tokens.reshape(4, 2, 16).swapaxes(0, 1)
  sums = [full._summed_grads(params, micro[i], jax.random.fold_in(key, i)) for i in range(2)]
  weight = sum(float(s[2]) for s in sums)
  expected_loss = sum(float(s[1]) for s in sums) / weight
  expected_grads = jax.tree.map(lambda a, b: (a + b) / weight, sums[0][0], sums[1][0])
  np.testing.assert_allclose(loss_a, expected_loss, rtol=1e-5)
  _assert_trees_close(grads_a, expected_grads, 1e-6)


def test_schedule_and_weight_decay_mask():
  cfg = _config(learning_rate=1e-3, warmup_steps=10, total_steps=110)
  schedule = optim.learning_rate_schedule(cfg)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)
  tree = {"dense": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}, "ln": {"scale": np.zeros(2)},
          "embed": {"embedding": np.zeros((3, 2))}, "rel_bias": np.zeros((4, 2))}
  assert optim.weight_decay_mask(tree) == jax.tree.map(lambda _: True, tree)  # default: the papers' rule
  assert optim.weight_decay_mask(tree, "bert") == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False},
                                                   "embed": {"embedding": True}, "rel_bias": True}


@pytest.mark.parametrize("rule", optim.WEIGHT_DECAY_RULES)
def test_one_update_is_identical_with_scan_layers_on_and_off(rule):
  """Same params, same batch: the scanned model's update equals the unrolled one's, leaf by leaf (the old
  ndim > 1 rule decayed the scanned model's stacked biases and LayerNorm scales only)."""
  from exlm_jax.export import hf_weights  # numpy-only layer (un)stacking  pylint: disable=g-import-not-at-top

  def config(scan):
    cfg = _config(learning_rate=1e-2, warmup_steps=0, lr_schedule="constant", weight_decay=0.5, adam_eps=1.0,
                  weight_decay_rule=rule)
    cfg.model.update(scan_layers=scan, dropout_rate=0.0, attention_dropout_rate=0.0)
    return cfg

  scanned, unrolled = _setup(config(True), data=1, fsdp=1, tensor=1), _setup(config(False), data=1, fsdp=1, tensor=1)
  params = jax.device_get(scanned.init_state().params)
  params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases, LayerNorm scales != 1
  flat = {**params, "encoder": hf_weights.unstack_layers(params["encoder"])}
  state_s = scanned.init_state(override=params)
  state_u = unrolled.init_state(override=flat)
  tokens = _tokens()
  new_s, _ = scanned.train_step(state_s, tokens)
  new_u, _ = unrolled.train_step(state_u, tokens)
  after_s = jax.device_get(new_s.params)
  after_s = {**after_s, "encoder": hf_weights.unstack_layers(after_s["encoder"])}
  _assert_trees_close(after_s, jax.device_get(new_u.params), 1e-5)  # eps=1 keeps Adam smooth in g
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), after_s, flat)
  assert min(jax.tree.leaves(moved)) > 0  # every leaf was updated (decay or gradient)


@pytest.mark.parametrize("field,value,message", [
    ("mask_prob", 1.5, "mask_prob"),
    ("batch_size", 6, "divisible by data-parallel size 8"),
    ("warmup_steps", -1, "warmup_steps"),
    ("objective", "bert", "unknown objective"),
    ("weight_decay_rule", "none", "weight_decay_rule"),
])
def test_config_validation(field, value, message):
  cfg = _config()
  cfg[field] = value
  with pytest.raises(ValueError, match=message):
    loop.validate_config(cfg, num_devices=8)


def test_mesh_errors():
  with pytest.raises(ValueError, match="slots"):
    partitioning.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  assert partitioning.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
