"""Shared by test_scaleout.py and test_checkpoint.py: a 1-layer MLM config, batches, and TrainSetups
cached per (sharding preset, mesh) so each jitted program compiles once per pytest session."""

import functools

import jax
import numpy as np

from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.train import partitioning, steps

VOCAB = 40


def config(sharding: str = "dp", **overrides):
  cfg = config_lib.pretrain_config("mlm", "tiny", seq_len=16, batch_size=8, total_steps=10, warmup_steps=2,
                                   **overrides)
  cfg.model.vocab_size = VOCAB
  cfg.model.num_layers = 1  # smaller programs: every mesh below compiles its own
  cfg.sharding = sharding
  return cfg


def tokens(seed: int = 0, batch: int = 8, n: int = 16) -> np.ndarray:
  rng = np.random.RandomState(seed)
  out = rng.randint(vocab.NUM_SPECIAL, VOCAB, (batch, n)).astype(np.int32)
  out[:, 0], out[:, -1] = vocab.BOS, vocab.EOS
  out[1, 9:] = vocab.PAD
  out[1, 8] = vocab.EOS
  return out


@functools.lru_cache(maxsize=None)
def setup(sharding: str, data: int, fsdp: int = 1, tensor: int = 1) -> steps.TrainSetup:
  mesh_cfg = {"data": data, "fsdp": fsdp, "tensor": tensor}
  devices = jax.devices()[: data * fsdp * tensor]
  return steps.TrainSetup.create(config(sharding), partitioning.create_mesh(mesh_cfg, devices))


@functools.lru_cache(maxsize=None)
def initial_state_host():
  """The initial train state as numpy (same for every mesh: init is sharding-independent)."""
  return jax.device_get(setup("dp", 8).init_state())


def initial_state(s: steps.TrainSetup):
  """The initial state placed on `s`'s shardings without compiling another init program."""
  return jax.device_put(initial_state_host(), s.state_sharding)


def fast_compile():
  """Module fixture body: compile with most XLA optimizations off (3x faster; same numerics everywhere)."""
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def assert_trees_close(a, b, atol: float) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)
