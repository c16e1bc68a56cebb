"""The objective contract and registry.

An objective builds a Linen model whose `__call__(tokens, mask_rng)` takes a batch of token blocks
(B, n) -- `<s> ... </s> <pad>...` -- does its own masking inside the jitted step, and returns
`(loss_sum, weight, metrics)`:
  * loss_sum: scalar float32, the objective summed over the batch (e.g. CE summed over masked tokens);
  * weight: scalar float32, what the loss is normalised by over the GLOBAL batch (e.g. number of
    masked tokens; number of examples for ExLM). The trainer divides sum by weight only after
    summing both over micro-batches and devices, so normalisation is global;
  * metrics: dict name -> (sum, count) float32 pairs, reported as sum / count.
The trainer knows nothing else about an objective. Everything else objective-specific -- its FLOPs model,
the rule behind `exlm_jax.load(...).predict_masked`, what the analyses measure on it -- is a field of its
`Objective`; an objective without a feature leaves the field None and callers say so in one line.
An objective's options live in `config.<name>` and hold only what a config changes; `read_options`
merges them over the objective's `DEFAULTS` (the one place its defaults are stated) and rejects
unknown keys; `with_defaults` writes the merged block back, so the command line can set any option.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.models.encoder import Encoder, ModelConfig
from exlm_jax.models.flops import Breakdown

_REGISTRY: dict[str, "Objective"] = {}


class Alignment(NamedTuple):
  """One batch aligned by a DAG objective: B rows, S states, G targets, V vocabulary (see DagAnalysis)."""

  state_logits: jax.Array  # (B, S, V) emission logits of the states
  state_valid: jax.Array  # (B, S) bool
  state_group: jax.Array  # (B, S) int32 the target group a state belongs to
  state_copy: jax.Array  # (B, S) int32 its copy index 1..k inside the group
  state_slot: jax.Array  # (B, S) int32 the input slot (original position) the state stands for
  state_token: jax.Array  # (B, S) int32 the input token there ([MASK] for masked groups)
  targets: jax.Array  # (B, G) int32 target tokens in order
  target_valid: jax.Array  # (B, G) bool
  target_masked: jax.Array  # (B, G) bool targets that are masked tokens (not <s>, </s>)
  emit_logp: jax.Array  # (B, G, S) log P_u(y_i)
  transitions: jax.Array  # (B, S, S) log transition probabilities
  path: jax.Array  # (B, S) int32 target each state emits on the Viterbi path, -1 when skipped
  posteriors: jax.Array  # (B, G, S) posterior that state u emits target i (normalised over u)
  score: jax.Array  # (B,) Viterbi log-score; -inf for an empty row
  num_targets: jax.Array  # (B,) int32
  num_states: jax.Array  # (B,) int32


CLEAN_INPUT = "clean_input/real"  # effective_rank's group for every objective: the clean input, every real token


@dataclasses.dataclass(frozen=True)
class RankGroups:
  """The token groups `effective_rank` measures on an objective's encoder (exlm_jax/analysis/rank_tool.py).

  Every objective is measured on the same rows: CLEAN_INPUT, the encoder on the clean blocks at every real
  (content) token, computed by the tool itself. An objective adds the views its pretraining shows the encoder:
  collect: (hidden_states, tokens (B, n) int numpy, selection) -> {group: (states, rows)}: `selection` is the
    pretraining mask rule at the run's mask_prob (a MaskSelection of numpy arrays), `hidden_states(tokens,
    positions | None, padding)` returns the encoder's L + 1 hidden states (numpy (B, n', D) each), `states` is
    such a tuple and `rows` (B, n') bool the token states of the group; None = no view beyond CLEAN_INPUT.
  headline: report column -> group, beyond 'clean_input' (always CLEAN_INPUT), e.g. 'masked_input'.
  mask_subspace: (clean real, [MASK], masked real) groups of the [MASK]-subspace diagnostic; None when the
    encoder never sees [MASK]. The tool draws masks until the [MASK] group holds >= 20 d rows.
  """

  collect: Callable[[Callable, np.ndarray, Any], dict] | None = None
  headline: Mapping[str, str] = dataclasses.field(default_factory=dict)
  mask_subspace: tuple[str, str, str] | None = None


@dataclasses.dataclass(frozen=True)
class DagAnalysis:
  """An objective whose targets are emitted by states aligned through a DAG: entropy per state / on the
  Viterbi path / of the posterior mixture, and dag_view.

  align: Linen method body (model, tokens (B, n), is_masked (B, n)) -> Alignment, for a fixed mask.
  block_length: (model, mask_ratio, seq_len) -> the longest block n' <= seq_len the model can align at
    mask_ratio (ValueError when none can); the entropy tool cuts every run's blocks in one report to the
    shortest such length over its runs and ratios, so all objectives are scored on the same blocks.
  """

  align: Callable[[nn.Module, jax.Array, jax.Array], Alignment]
  block_length: Callable[[nn.Module, float, int], int]


@dataclasses.dataclass(frozen=True)
class Objective:
  """A pretraining objective.

  name: registry key, the value of `config.objective`; its options live in `config.<name>`.
  title: how text names it ('ExLM').
  make_model: (config, deterministic) -> Linen module with `__call__(tokens, mask_rng)` as above.
  encoder_params: params -> the encoder sub-tree fine-tuning loads (fails loudly on missing keys).
  validate: config -> None, raises ValueError with a one-line message on a bad objective config.
  options: config -> the `config.<name>` block merged over the objective's defaults (`read_options`).
  copies_option: the option of that block holding the copies per token k (bench --k); None = no such option.
  flops: (config, include_remat) -> training FLOPs of ONE sequence by component; None = no FLOPs model.
  masked_log_probs: (**options) -> method body (model, token_ids (B, L) with [MASK] at the slots to fill,
    mask_slots (B, P)) -> (B, P, V) logits of the fillers (`masked_log_probs_fn`); None = no prediction rule.
  rank_groups: what effective_rank measures; None = not supported.
  dag: the DAG analyses; None = the objective has no aligned states.
  exports_masked_lm: its prediction rule is a plain masked-LM head on the encoder (exported as
    `...ForMaskedLM`); False = the encoder is exported alone and `export_note` says what is left out.
  export_note: the model card's sentence on what the exported encoder cannot do without this objective.
  packed_batches: its model also takes the packed-block dict (objectives/segments.py, `data.packing`) and
    computes every example as if alone; False = bare (B, n) token arrays only (packing is refused up front).
  """

  name: str
  make_model: Callable[[ml_collections.ConfigDict, bool], nn.Module]
  encoder_params: Callable[[Any], Any] = None
  validate: Callable[[ml_collections.ConfigDict], None] = lambda config: None
  title: str = ""
  options: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] = lambda config: ml_collections.ConfigDict()
  copies_option: str | None = None
  flops: Callable[[ml_collections.ConfigDict, bool], Breakdown] | None = None
  masked_log_probs: Callable[..., Callable] | None = None
  rank_groups: RankGroups | None = None
  dag: DagAnalysis | None = None
  exports_masked_lm: bool = False
  export_note: str = ""
  packed_batches: bool = False

  def __post_init__(self):
    if self.encoder_params is None:
      object.__setattr__(self, "encoder_params", encoder_subtree)
    if not self.title:
      object.__setattr__(self, "title", self.name)


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


def max_examples_per_block(config: ml_collections.ConfigDict) -> int:
  """The most examples one block holds (the static bound of per-example masking, compaction and expansion):
  `data.max_examples_per_block` with `data.packing` on, else 1."""
  if not config.data.packing:
    return 1
  value = config.data.max_examples_per_block
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"config.data.max_examples_per_block={value!r} with data.packing on: the model needs the "
                     "resolved bound (an integer >= 1); load the data first (it writes the value back) or set it")
  return int(value)


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


def masked_log_probs_fn(config: ml_collections.ConfigDict, **options):
  """fn(params, token_ids (B, L), mask_slots (B, P)) -> (B, P, V) float32 log-probabilities of the fillers.

  token_ids carry vocab.MASK at the slots to fill; mask_slots lists them (pad with 0, ignored by the
  caller). The prediction rule is `config.objective`'s `masked_log_probs(**options)`.
  """
  objective = get(config.objective)
  if objective.masked_log_probs is None:
    raise ValueError(f"objective {objective.name!r} has no prediction rule for masked tokens (predict_masked)")
  try:
    body = objective.masked_log_probs(**options)
  except TypeError as e:
    raise ValueError(f"prediction options {options} do not fit objective {objective.name!r}: {e}") from None
  module = objective.make_model(config, True)

  def masked_logits_fn(params, token_ids, mask_slots):
    out = module.apply({"params": params}, token_ids, mask_slots, method=body)
    return jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)

  return masked_logits_fn


def content_slots(tokens) -> np.ndarray:
  """(B, n) bool numpy: slots holding content tokens (not <s>, </s>, <pad>), e.g. for the analyses' rows."""
  return ~np.isin(np.asarray(tokens), vocab.UNMASKABLE)
