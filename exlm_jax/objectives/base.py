"""The objective contract and registry.

An objective builds a Linen model whose `__call__(tokens, mask_rng)` takes a batch of token blocks
(B, n) -- `<s> ... </s> <pad>...` -- does its own masking inside the jitted step, and returns
`(loss_sum, weight, metrics)`:
  * loss_sum: scalar float32, the objective summed over the batch (e.g. CE summed over masked tokens);
  * weight: scalar float32, what the loss is normalised by over the GLOBAL batch (e.g. number of
    masked tokens; number of examples for ExLM). The trainer divides sum by weight only after
    summing both over micro-batches and devices, so normalisation is global (maelm-reference §10.9);
  * metrics: dict name -> (sum, count) float32 pairs, reported as sum / count.
The trainer knows nothing else about an objective.

An objective's options live in `config.<name>` and hold only what a config changes; `read_options`
merges them over the objective's `DEFAULTS` (the one place its defaults are stated) and rejects
unknown keys; `with_defaults` writes the merged block back, so the command line can set any option.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.models.encoder import Encoder, ModelConfig

_REGISTRY: dict[str, "Objective"] = {}


@dataclasses.dataclass(frozen=True)
class Objective:
  """A pretraining objective.

  name: registry key, the value of `config.objective`.
  make_model: (config, deterministic) -> Linen module with `__call__(tokens, mask_rng)` as above.
  encoder_params: params -> the encoder sub-tree fine-tuning loads (fails loudly on missing keys).
  validate: config -> None, raises ValueError with a one-line message on a bad objective config.
  options: config -> the `config.<name>` block merged over the objective's defaults (`read_options`).
  """

  name: str
  make_model: Callable[[ml_collections.ConfigDict, bool], nn.Module]
  encoder_params: Callable[[Any], Any] = None
  validate: Callable[[ml_collections.ConfigDict], None] = lambda config: None
  options: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] = lambda config: ml_collections.ConfigDict()

  def __post_init__(self):
    if self.encoder_params is None:
      object.__setattr__(self, "encoder_params", encoder_subtree)


def register(objective: Objective) -> Objective:
  _REGISTRY[objective.name] = objective
  return objective


def get(name: str) -> Objective:
  if name not in _REGISTRY:
    raise ValueError(f"unknown objective {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def read_options(config: ml_collections.ConfigDict, name: str, defaults: dict[str, Any]) -> ml_collections.ConfigDict:
  """`config.<name>` (absent = empty) merged over `defaults`; a key not in `defaults` is a one-line
  ValueError naming the closest known key."""
  given = dict(config.get(name, None) or {})
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"unknown config.{name} keys {unknown}; {config_lib.closest(unknown[0], defaults)}")
  options = ml_collections.ConfigDict(dict(defaults))
  try:
    options.update(given)  # type-checked against the defaults
  except TypeError as e:
    raise ValueError(f"config.{name}: {e}") from None
  return options


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a pretraining config whose objective block holds every option (defaults merged in)."""
  config = ml_collections.ConfigDict(config.to_dict())
  objective = get(config.objective)
  options = objective.options(config)
  if options:
    config[objective.name] = options
  return config


def encoder_subtree(params, key: str = "encoder"):
  """The encoder's parameters inside a full pretraining param tree; raises if absent."""
  if key not in params:
    raise KeyError(f"checkpoint has no {key!r} sub-tree (top-level keys: {sorted(params)}); "
                   "is it a pretraining checkpoint of this codebase?")
  return params[key]


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'a/b/c' -> shape for every leaf of a (possibly boxed) param tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(tree)))
  return {"/".join(map(str, path)): tuple(np.shape(leaf)) for path, leaf in flat.items()}


def encoder_tree_problems(tree, model_cfg: ModelConfig, limit: int = 5) -> list[str]:
  """How `tree` differs from a fresh Encoder(model_cfg)'s params: 'missing [...] (n)', 'unexpected [...] (n)',
  'wrong shapes [...] (n)' (at most `limit` names each); empty when it is exactly an Encoder's params."""
  expected = jax.eval_shape(lambda: Encoder(model_cfg).init(jax.random.PRNGKey(0), dummy_tokens(1, 4))["params"])
  want, have = _flat_shapes(expected), _flat_shapes(tree)
  missing = sorted(want.keys() - have.keys())
  unexpected = sorted(have.keys() - want.keys())
  wrong = sorted(f"{k} {have[k]} != {want[k]}" for k in want.keys() & have.keys() if want[k] != have[k])
  return [f"{label} {items[:limit]}{' ...' if len(items) > limit else ''} ({len(items)})"
          for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if items]


def model_config(config: ml_collections.ConfigDict, **overrides) -> ModelConfig:
  return ModelConfig.from_config(config.model, **overrides)


def dummy_tokens(batch_size: int, seq_len: int) -> jax.Array:
  """A valid block `<s> x ... x </s>` for shape-only initialisation."""
  tokens = jnp.full((batch_size, seq_len), vocab.NUM_SPECIAL, jnp.int32)
  return tokens.at[:, 0].set(vocab.BOS).at[:, -1].set(vocab.EOS)


def init_params(objective: Objective, config, rng: jax.Array, batch_size: int = 1):
  """Parameters (boxed with logical partitioning metadata) for a (batch_size, seq_len) input."""
  model = objective.make_model(config, True)
  tokens = dummy_tokens(batch_size, config.seq_len)
  return model.init({"params": rng, "dropout": rng}, tokens, rng)["params"]


def apply_loss(objective: Objective, config, params, tokens: jax.Array, rng: jax.Array, train: bool):
  """(loss_sum, (weight, metrics)) for one batch: the function the trainer differentiates."""
  mask_rng, dropout_rng = jax.random.split(rng)
  model = objective.make_model(config, not train)
  loss_sum, weight, metrics = model.apply({"params": params}, tokens, mask_rng, rngs={"dropout": dropout_rng})
  return loss_sum, (weight, metrics)
