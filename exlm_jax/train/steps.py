"""The jitted train and eval steps over a device mesh; objective-agnostic.

`TrainSetup.create(config, mesh)` looks the objective up by name, derives parameter shardings from
the logical axis names, and jits:
  * `init_state(seed)`          -> TrainState, born sharded (`jax.jit(init, out_shardings=...)`);
  * `train_step(state, tokens)` -> (state, metrics), state donated;
  * `eval_step(params, tokens, index)` -> (loss_sum, weight, metric sums);
  * `loss_and_grads(params, tokens, step)` for tests and tools.
Randomness: the step key is `fold_in(PRNGKey(seed), step)`, split by the objective into masking and
dropout keys, so a resumed run sees exactly the masks of an uninterrupted one.
Loss normalisation: grads and loss are summed over micro-batches (and, by jit, over devices) and
divided by the summed weight once, so the objective is normalised over the global batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from exlm_jax import objectives
from exlm_jax.objectives import base
from exlm_jax.train import optim, partitioning

_EVAL_SALT = 0x5EED


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any


def _sum_trees(a, b):
  return jax.tree.map(jnp.add, a, b)


@dataclasses.dataclass
class TrainSetup:
  """Everything needed to run one objective's steps on one mesh."""

  config: Any
  mesh: Mesh
  objective: base.Objective
  rules: tuple
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  state_sharding: Any
  batch_sharding: NamedSharding
  state_shapes: Any = None  # TrainState of ShapeDtypeStructs with their shardings (see abstract_state)

  @classmethod
  def create(cls, config, mesh: Mesh) -> "TrainSetup":
    objective = objectives.get(config.objective)
    rules = partitioning.logical_rules(config)
    optimizer = optim.make_optimizer(config)
    setup = cls(config, mesh, objective, rules, optimizer, optim.learning_rate_schedule(config),
                None, partitioning.batch_sharding(mesh))
    with setup.context():
      boxed = jax.eval_shape(setup._boxed_state, jax.random.PRNGKey(0))
      setup.state_sharding = partitioning.shardings_from_boxed(boxed, mesh, rules)
    setup.state_shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      nn.meta.unbox(boxed), setup.state_sharding)
    setup._init = jax.jit(setup._init_state, out_shardings=setup.state_sharding)
    setup._train = jax.jit(setup._train_step, in_shardings=(setup.state_sharding, setup.batch_sharding),
                           out_shardings=(setup.state_sharding, partitioning.replicated(mesh)),
                           donate_argnums=0)
    setup._eval = jax.jit(setup._eval_step,
                          in_shardings=(setup.state_sharding.params, setup.batch_sharding, None),
                          out_shardings=partitioning.replicated(mesh))
    setup._grads = jax.jit(setup._loss_and_grads,
                           in_shardings=(setup.state_sharding.params, setup.batch_sharding, None),
                           out_shardings=(partitioning.replicated(mesh), setup.state_sharding.params))
    return setup

  # -- context ---------------------------------------------------------------------------------

  def context(self):
    """Mesh + logical rules, active while tracing and calling the jitted functions."""
    return partitioning.mesh_context(self.mesh, self.rules)

  @property
  def base_key(self) -> jax.Array:
    return jax.random.PRNGKey(self.config.seed)

  # -- pure functions (traced under jit) ---------------------------------------------------------

  def _boxed_state(self, rng) -> TrainState:
    params = base.init_params(self.objective, self.config, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

  def _init_state(self, rng) -> TrainState:
    return nn.meta.unbox(self._boxed_state(rng))

  def _micro_batches(self, tokens):
    """(B, n) -> (A, B/A, n), micro-batch a = rows a, a+A, ... so no rows move between devices."""
    accum = self.config.grad_accum_steps
    batch, seq_len = tokens.shape
    micro = tokens.reshape(batch // accum, accum, seq_len).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        micro, NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, partitioning.BATCH_AXES, None)))

  def _summed_grads(self, params, tokens, key):
    """Gradients of the loss SUM, with loss_sum, weight and metric sums, over all micro-batches."""
    value_and_grad = jax.value_and_grad(
        lambda p, t, k: base.apply_loss(self.objective, self.config, p, t, k, True), has_aux=True)
    if self.config.grad_accum_steps == 1:
      (loss_sum, (weight, metrics)), grads = value_and_grad(params, tokens, key)
      return grads, loss_sum, weight, metrics

    def body(carry, inputs):
      index, micro_tokens = inputs
      (loss_sum, (weight, metrics)), grads = value_and_grad(params, micro_tokens, jax.random.fold_in(key, index))
      return _sum_trees(carry, (grads, loss_sum, weight, metrics)), None

    micro = self._micro_batches(tokens)
    shapes = jax.eval_shape(lambda: value_and_grad(params, micro[0], key))
    (loss0, (weight0, metrics0)), grads0 = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads0, loss0, weight0, metrics0))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(micro.shape[0]), micro))
    return total

  def _loss_and_grads(self, params, tokens, step):
    key = jax.random.fold_in(self.base_key, step)
    grads, loss_sum, weight, _ = self._summed_grads(params, tokens, key)
    scale = 1.0 / jnp.maximum(weight, 1e-9)
    return loss_sum * scale, jax.tree.map(lambda g: g * scale, grads)

  def _train_step(self, state: TrainState, tokens):
    key = jax.random.fold_in(self.base_key, state.step)
    grads, loss_sum, weight, metrics = self._summed_grads(state.params, tokens, key)
    scale = 1.0 / jnp.maximum(weight, 1e-9)
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {name: s / jnp.maximum(c, 1e-9) for name, (s, c) in metrics.items()}
    out.update(loss=loss_sum * scale, grad_norm=optax.tree.norm(grads),
               learning_rate=self.schedule(state.step), weight=weight)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), out

  def _eval_step(self, params, tokens, index):
    key = jax.random.fold_in(jax.random.fold_in(self.base_key, _EVAL_SALT), index)
    loss_sum, (weight, metrics) = base.apply_loss(self.objective, self.config, params, tokens, key, False)
    return loss_sum, weight, metrics

  # -- public, jitted --------------------------------------------------------------------------

  def init_state(self, seed: int | None = None) -> TrainState:
    with self.context():
      return self._init(jax.random.PRNGKey(self.config.seed if seed is None else seed))

  def train_step(self, state: TrainState, tokens) -> tuple[TrainState, dict]:
    with self.context():
      return self._train(state, self.shard_batch(tokens))

  def eval_step(self, params, tokens, index: int):
    with self.context():
      return self._eval(params, self.shard_batch(tokens), index)

  def loss_and_grads(self, params, tokens, step: int = 0):
    with self.context():
      return self._grads(params, self.shard_batch(tokens), step)

  def shard_batch(self, tokens):
    """A process-local numpy batch (or a global jax.Array) -> global array on the batch sharding."""
    if isinstance(tokens, jax.Array) and tokens.sharding == self.batch_sharding:
      return tokens
    return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(tokens))

  def abstract_state(self) -> TrainState:
    """Shapes/dtypes/shardings of the state, for restoring checkpoints onto this mesh."""
    return self.state_shapes

  def compile_train_step(self):
    """AOT-lowers and compiles the train step for this mesh (no data, no device memory for state)."""
    tokens = jax.ShapeDtypeStruct((self.config.batch_size, self.config.seq_len), jnp.int32,
                                  sharding=self.batch_sharding)
    with self.context():
      return self._train.lower(self.abstract_state(), tokens).compile()

  def num_params(self) -> int:
    shapes = self.abstract_state().params
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))
