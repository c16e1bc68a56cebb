"""The one trainer: jitted train, eval and predict steps of any loss module over a device mesh.

`TrainSetup.create(config, mesh, model=None, optimizer_config=None)` takes a `LossModel` (default: the
pretraining objective `config.objective`, `objective_loss`), derives parameter shardings from the
logical axis names, and jits:
  * `init_state(seed, override)` -> TrainState, born sharded; `override` (a partial params tree, e.g. a
    pretrained encoder) replaces part of the freshly initialised params;
  * `train_step(state, batch, seed)` -> (state, metrics), state donated;
  * `eval_step(params, batch, index)` -> (loss_sum, weight, metric sums);
  * `predict(params, batch)` -> the module's `predict(batch)` outputs (evaluation by host-side metrics);
  * `loss_and_grads(params, batch, step)` for tests and tools.
A batch is a pytree of (B, ...) arrays with the structure of the model's example batch: for the pretraining
objectives the (B, n) token array, or with `data.packing` the packed-block dict {tokens, segment_ids,
positions} (objectives/segments.py); {tokens, labels, mask} for fine-tuning.
Metrics of `train_step`: the loss module's means, loss, grad_norm, learning_rate, weight, and the loss
model's `batch_counts` (pretraining: real tokens and examples of the global batch, counted on device).
Randomness: the step key is `fold_in(PRNGKey(seed), step)` (`seed` defaults to `config.seed`), split by
`LossModel.rngs` (pretraining: into masking and dropout keys), so a resumed run sees exactly the masks of
an uninterrupted one.
Loss normalisation: grads and loss are summed over micro-batches (and, by jit, over devices) and
divided by the summed weight once, so the loss is normalised over the global batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from exlm_jax import objectives
from exlm_jax.objectives import base, segments
from exlm_jax.train import optim, partitioning

_EVAL_SALT = 0x5EED


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any


def _sum_trees(a, b):
  return jax.tree.map(jnp.add, a, b)


def split_rngs(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(the `rng` argument of the module, the dropout key): the two halves of `key`."""
  rng, dropout = jax.random.split(key)
  return rng, dropout


def replace_subtrees(params, override, rng=None):
  """`params` with the sub-trees of the nested dict `override` put in place (cast to the params' dtypes)."""
  del rng
  if isinstance(override, Mapping):
    return {**params, **{k: replace_subtrees(params[k], v) for k, v in override.items()}}
  return jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), override, params)


def _select(tree, override):
  """The parts of `tree` at the paths of the nested dict `override` (e.g. their shardings)."""
  if isinstance(override, Mapping):
    return {k: _select(tree[k], v) for k, v in override.items()}
  return tree


@dataclasses.dataclass(frozen=True)
class LossModel:
  """A Linen loss module, as TrainSetup trains it.

  make(deterministic) -> a Linen module whose `__call__(batch, rng)`, with dropout drawn from the
    'dropout' rng collection, returns (loss_sum, weight, metrics): the objective contract of
    objectives/base.py (metrics name -> (sum, count)). Optionally the module has `predict(batch)` ->
    (B, ...) outputs, which `TrainSetup.predict` jits in deterministic mode.
  example_batch: a batch of one row; `make(True).init` traces it (only its structure, shapes and
    dtypes matter) and every batch has its structure.
  rngs: a (micro-)batch key -> (the `rng` argument, the dropout key).
  init_override: (fresh params, override, init rng) -> the initial params when `init_state` is given an
    override; default: the override's sub-trees replace the fresh ones.
  batch_counts: batch -> {name: int32 scalar} added to the train step's metrics, counts a log window
    sums rather than averages (pretraining: `segments.real_counts`); None = none.
  """

  make: Callable[[bool], nn.Module]
  example_batch: Any
  rngs: Callable[[jax.Array], tuple[jax.Array, jax.Array]] = split_rngs
  init_override: Callable[[Any, Any, jax.Array], Any] = replace_subtrees
  batch_counts: Callable[[Any], dict] | None = None


def objective_loss(config) -> LossModel:
  """The pretraining objective `config.objective` over (B, seq_len) token blocks: the bare token array, or
  the packed-block dict with `config.data.packing` (what `pipeline_batch` makes of the pipeline's batches)."""
  objective = objectives.get(config.objective)
  tokens = base.dummy_tokens(1, config.seq_len)
  if packed(config):
    segment_ids, positions = segments.default_segments(tokens)
    example = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
  else:
    example = tokens
  return LossModel(lambda deterministic: objective.make_model(config, deterministic), example,
                   batch_counts=segments.real_counts)


def packed(config) -> bool:
  """Whether a pretraining config's batches are packed-block dicts (`config.data.packing`)."""
  return bool(config.data.packing)


def pipeline_batch(batch: Mapping[str, Any], packing: bool):
  """A pretraining pipeline batch as the objectives take it: the whole dict when packed, else its bare
  (B, n) token array (the unpacked path stays the one-example-per-block computation)."""
  return batch if packing else batch["tokens"]


def batch_leaf_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """A (B, ...) batch array: rows split over every data-parallel axis."""
  return NamedSharding(mesh, P(partitioning.BATCH_AXES, *[None] * (ndim - 1)))


def process_rows(batch):
  """This process's rows of a global host batch (every process holds the same one; rows go in process order)."""
  index, count = jax.process_index(), jax.process_count()
  return jax.tree.map(lambda x: np.asarray(x)[index * len(x) // count:(index + 1) * len(x) // count], batch)


@dataclasses.dataclass
class TrainSetup:
  """Everything needed to run one loss module's steps on one mesh."""

  config: Any
  mesh: Mesh
  model: LossModel
  rules: tuple
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  state_sharding: Any
  batch_sharding: Any  # the example batch's structure, one NamedSharding per array
  state_shapes: Any = None  # TrainState of ShapeDtypeStructs with their shardings (see abstract_state)

  @classmethod
  def create(cls, config, mesh: Mesh, model: LossModel | None = None, optimizer_config=None) -> "TrainSetup":
    """model None: `objective_loss(config)`; optimizer_config None: `config` (train/optim.py's fields)."""
    model = objective_loss(config) if model is None else model
    optimizer_config = config if optimizer_config is None else optimizer_config
    batch_sharding = jax.tree.map(lambda x: batch_leaf_sharding(mesh, np.ndim(x)), model.example_batch)
    setup = cls(config, mesh, model, partitioning.logical_rules(config), optim.make_optimizer(optimizer_config),
                optim.learning_rate_schedule(optimizer_config), None, batch_sharding)
    with setup.context():
      boxed = jax.eval_shape(setup._boxed_state, jax.random.PRNGKey(0))
      setup.state_sharding = partitioning.shardings_from_boxed(boxed, mesh, setup.rules)
    setup.state_shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      nn.meta.unbox(boxed), setup.state_sharding)
    params_sharding, replicated = setup.state_sharding.params, partitioning.replicated(mesh)
    setup._init = jax.jit(setup._init_state, out_shardings=setup.state_sharding)
    setup._init_with = {}  # override tree structure -> jitted init (see init_state)
    train = dict(out_shardings=(setup.state_sharding, replicated), donate_argnums=0)
    setup._train = jax.jit(setup._train_step, in_shardings=(setup.state_sharding, batch_sharding), **train)
    setup._train_seeded = jax.jit(setup._train_step, in_shardings=(setup.state_sharding, batch_sharding, replicated),
                                  **train)
    setup._eval = jax.jit(setup._eval_step, in_shardings=(params_sharding, batch_sharding, None),
                          out_shardings=replicated)
    setup._grads = jax.jit(setup._loss_and_grads, in_shardings=(params_sharding, batch_sharding, None),
                           out_shardings=(replicated, params_sharding))
    setup._predict = jax.jit(setup._predict_step, in_shardings=(params_sharding, batch_sharding),
                             out_shardings=replicated)
    setup._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), in_shardings=(params_sharding,),
                          out_shardings=params_sharding)
    return setup

  # -- context ---------------------------------------------------------------------------------

  def context(self):
    """Mesh + logical rules, active while tracing and calling the jitted functions."""
    return partitioning.mesh_context(self.mesh, self.rules)

  @property
  def base_key(self) -> jax.Array:
    return jax.random.PRNGKey(self.config.seed)

  # -- pure functions (traced under jit) ---------------------------------------------------------

  def _fresh_params(self, rng):
    """Params (boxed with logical partitioning metadata) traced on the example batch."""
    return self.model.make(True).init({"params": rng, "dropout": rng}, self.model.example_batch, rng)["params"]

  def _boxed_state(self, rng) -> TrainState:
    params = self._fresh_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

  def _init_state(self, rng, override=None) -> TrainState:
    params = nn.meta.unbox(self._fresh_params(rng))
    if override is not None:
      params = self.model.init_override(params, override, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

  def _apply_loss(self, params, batch, key, train: bool):
    """(loss_sum, (weight, metrics)) for one batch: the function the trainer differentiates."""
    rng, dropout = self.model.rngs(key)
    loss_sum, weight, metrics = self.model.make(not train).apply({"params": params}, batch, rng,
                                                                 rngs={"dropout": dropout})
    return loss_sum, (weight, metrics)

  def _micro_batches(self, batch):
    """(B, ...) -> (A, B/A, ...), micro-batch a = rows a, a+A, ... so no rows move between devices."""
    accum = self.config.get("grad_accum_steps", 1)

    def split(x):
      micro = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      spec = P(None, partitioning.BATCH_AXES, *[None] * (x.ndim - 1))
      return jax.lax.with_sharding_constraint(micro, NamedSharding(self.mesh, spec))

    return jax.tree.map(split, batch)

  def _summed_grads(self, params, batch, key):
    """Gradients of the loss SUM, with loss_sum, weight and metric sums, over all micro-batches."""
    value_and_grad = jax.value_and_grad(lambda p, b, k: self._apply_loss(p, b, k, True), has_aux=True)
    if self.config.get("grad_accum_steps", 1) == 1:
      (loss_sum, (weight, metrics)), grads = value_and_grad(params, batch, key)
      return grads, loss_sum, weight, metrics

    def body(carry, inputs):
      index, micro_batch = inputs
      (loss_sum, (weight, metrics)), grads = value_and_grad(params, micro_batch, jax.random.fold_in(key, index))
      return _sum_trees(carry, (grads, loss_sum, weight, metrics)), None

    micro = self._micro_batches(batch)
    first = jax.tree.map(lambda m: m[0], micro)
    (loss0, (weight0, metrics0)), grads0 = jax.eval_shape(lambda: value_and_grad(params, first, key))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads0, loss0, weight0, metrics0))
    num_micro = jax.tree.leaves(micro)[0].shape[0]
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
    return total

  def _loss_and_grads(self, params, batch, step):
    key = jax.random.fold_in(self.base_key, step)
    grads, loss_sum, weight, _ = self._summed_grads(params, batch, key)
    scale = 1.0 / jnp.maximum(weight, 1e-9)
    return loss_sum * scale, jax.tree.map(lambda g: g * scale, grads)

  def _train_step(self, state: TrainState, batch, base_key=None):
    """One update; a step whose loss or gradient norm is not finite is skipped (metrics['finite'] 0)."""
    key = jax.random.fold_in(self.base_key if base_key is None else base_key, state.step)
    grads, loss_sum, weight, metrics = self._summed_grads(state.params, batch, key)
    scale = 1.0 / jnp.maximum(weight, 1e-9)
    grads = jax.tree.map(lambda g: g * scale, grads)
    loss, grad_norm = loss_sum * scale, optax.tree.norm(grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Skipped: the old params and optimizer state go on and `step` (updates applied) does not advance,
    # so a loop learns of any skip since its last look from one scalar (train/divergence.py).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                     (state.params, state.opt_state))
    out = {name: s / jnp.maximum(c, 1e-9) for name, (s, c) in metrics.items()}
    out.update(loss=loss, grad_norm=grad_norm, learning_rate=self.schedule(state.step), weight=weight,
               finite=finite.astype(jnp.float32))
    out.update(self.model.batch_counts(batch) if self.model.batch_counts else {})
    step = state.step + finite.astype(state.step.dtype)
    return TrainState(step=step, params=params, opt_state=opt_state), out

  def _eval_step(self, params, batch, index):
    key = jax.random.fold_in(jax.random.fold_in(self.base_key, _EVAL_SALT), index)
    loss_sum, (weight, metrics) = self._apply_loss(params, batch, key, False)
    return loss_sum, weight, metrics

  def _predict_step(self, params, batch):
    return self.model.make(True).apply({"params": params}, batch, method="predict")

  # -- public, jitted --------------------------------------------------------------------------

  def init_state(self, seed: int | None = None, override=None) -> TrainState:
    """Fresh state from PRNGKey(seed) (default config.seed); `override`: a partial params tree (host or
    device arrays, e.g. {'encoder': pretrained}) put in place by `LossModel.init_override`."""
    rng = jax.random.PRNGKey(self.config.seed if seed is None else seed)
    with self.context():
      if override is None:
        return self._init(rng)
      structure = jax.tree.structure(override)
      if structure not in self._init_with:
        self._init_with[structure] = jax.jit(
            self._init_state, in_shardings=(None, _select(self.state_sharding.params, override)),
            out_shardings=self.state_sharding)
      return self._init_with[structure](rng, override)

  def train_step(self, state: TrainState, batch, seed: int | None = None) -> tuple[TrainState, dict]:
    """One update; the step key is fold_in(PRNGKey(seed), state.step), seed None = config.seed."""
    with self.context():
      if seed is None:
        return self._train(state, self.shard_batch(batch))
      return self._train_seeded(state, self.shard_batch(batch), jax.random.PRNGKey(seed))

  def eval_step(self, params, batch, index: int):
    with self.context():
      return self._eval(params, self.shard_batch(batch), index)

  def loss_and_grads(self, params, batch, step: int = 0):
    with self.context():
      return self._grads(params, self.shard_batch(batch), step)

  def predict(self, params, batch):
    """The module's `predict(batch)` outputs (deterministic), replicated."""
    with self.context():
      return self._predict(params, self.shard_batch(batch))

  def copy_params(self, params):
    """A copy on the same shardings (keeps, e.g., the best params while train_step donates the state)."""
    with self.context():
      return self._copy(params)

  def shard_batch(self, batch):
    """A process-local host batch (or global jax.Arrays) -> global arrays on the batch sharding."""

    def place(x, sharding):
      if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(place, batch, self.batch_sharding)

  def abstract_state(self) -> TrainState:
    """Shapes/dtypes/shardings of the state, for restoring checkpoints onto this mesh."""
    return self.state_shapes

  def abstract_batch(self):
    """Shapes/dtypes/shardings of a global batch of config.batch_size rows."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct((self.config.batch_size, *np.shape(x)[1:]), x.dtype,
                                                            sharding=sh), self.model.example_batch, self.batch_sharding)

  def compile_train_step(self):
    """AOT-lowers and compiles the train step for this mesh (no data, no device memory for state)."""
    with self.context():
      return self._train.lower(self.abstract_state(), self.abstract_batch()).compile()

  def num_params(self) -> int:
    shapes = self.abstract_state().params
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))
