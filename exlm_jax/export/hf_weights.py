"""Parameter mapping between our Encoder (Flax tree) and PyTorch state dicts, in both directions.

Three layouts:
  * 'roberta'              -- transformers' RobertaModel: post-LN blocks, embedding LayerNorm, learned
                              absolute positions (positions=absolute, embed_layernorm=True, pre_ln=False);
  * 'roberta-prelayernorm' -- transformers' RobertaPreLayerNormModel: the same with pre-LN blocks and a final
                              LayerNorm (pre_ln=True);
  * 'exlm_jax'              -- the modeling file shipped in every exported folder (modeling_exlm.py), whose
                              module names mirror our tree, for every other encoder (rope2d, absolute+relbias,
                              no embedding LayerNorm).

Conventions (numpy only, no torch): a Projection kernel (*in_dims, *out_dims) is a torch Linear weight
(prod(out_dims), prod(in_dims)); biases are flattened; LayerNorm scale is torch's `weight`. RoBERTa's
position table starts at padding_idx + 1 (`roberta_position_offset`): our row i is its row i + offset, the
rows before are zero, and its one-row token-type table is zero on export and folded into the position
rows on import (every token adds row 0 of it, exactly like a position row).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

NATIVE_LAYOUTS = ("roberta", "roberta-prelayernorm")
LAYOUTS = (*NATIVE_LAYOUTS, "exlm_jax")
# The attribute that holds the encoder inside transformers' task models (`base_model_prefix`).
BASE_PREFIX = {"roberta": "roberta", "roberta-prelayernorm": "roberta_prelayernorm", "exlm_jax": "exlm_jax"}


def layout_for(model_cfg) -> str:
  """'roberta' / 'roberta-prelayernorm' when the encoder is exactly that transformers class, else 'exlm_jax'."""
  if model_cfg.positions == "absolute" and model_cfg.embed_layernorm:
    return "roberta-prelayernorm" if model_cfg.pre_ln else "roberta"
  return "exlm_jax"


def roberta_position_offset(pad_token_id: int) -> int:
  """RoBERTa numbers real tokens from padding_idx + 1 (fairseq's make_positions)."""
  return pad_token_id + 1


# ----------------------------------------------------------------------------------------------
# Leaf transforms
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Linear:
  """Projection kernel (*in, *out) <-> torch Linear weight (out, in); `n_in` leading dims are inputs."""

  n_in: int = 1

  def to_hf(self, a: np.ndarray) -> np.ndarray:
    return a.reshape(math.prod(a.shape[:self.n_in]), -1).T

  def hf_shape(self, shape) -> tuple[int, ...]:
    return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

  def from_hf(self, w: np.ndarray, shape) -> np.ndarray:
    return w.T.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Same:
  """Embedding tables, LayerNorm vectors, biases (flattened: a (N, Dh) q/k/v bias is torch's (N * Dh,))."""

  flatten: bool = False

  def to_hf(self, a: np.ndarray) -> np.ndarray:
    return a.reshape(-1) if self.flatten else a

  def hf_shape(self, shape) -> tuple[int, ...]:
    return (math.prod(shape),) if self.flatten else tuple(shape)

  def from_hf(self, w: np.ndarray, shape) -> np.ndarray:
    return w.reshape(shape)


@dataclasses.dataclass(frozen=True)
class OffsetRows:
  """Our position table (P, D) <-> RoBERTa's (offset + P, D), whose first `offset` rows are never read."""

  offset: int

  def to_hf(self, a: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((self.offset, a.shape[1]), a.dtype), a])

  def hf_shape(self, shape) -> tuple[int, ...]:
    return (self.offset + shape[0], shape[1])

  def from_hf(self, w: np.ndarray, shape) -> np.ndarray:
    return w[self.offset:self.offset + shape[0]]


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_ROBERTA_BLOCK = {
    # ours (inside stack/layer_i) -> (post-LN name, pre-LN name)
    ("attention", "query"): ("attention.self.query",) * 2,
    ("attention", "key"): ("attention.self.key",) * 2,
    ("attention", "value"): ("attention.self.value",) * 2,
    ("attention", "out"): ("attention.output.dense",) * 2,
    ("ln_attention",): ("attention.output.LayerNorm", "attention.LayerNorm"),
    ("mlp", "wi"): ("intermediate.dense",) * 2,
    ("mlp", "wo"): ("output.dense",) * 2,
    ("ln_mlp",): ("output.LayerNorm", "intermediate.LayerNorm"),
}
_ROBERTA_TOP = {
    ("token_embed",): "embeddings.word_embeddings",
    ("pos_embed",): "embeddings.position_embeddings",
    ("embed_ln",): "embeddings.LayerNorm",
    ("stack", "final_ln"): "LayerNorm",
}
ROBERTA_TOKEN_TYPE = "embeddings.token_type_embeddings.weight"


def _transform(path: tuple[str, ...], layout: str, pad_token_id: int):
  leaf = path[-1]
  if leaf == "kernel":
    return Linear(2 if path[-2] == "out" else 1)
  if path[0] == "pos_embed" and layout in NATIVE_LAYOUTS:
    return OffsetRows(roberta_position_offset(pad_token_id))
  return Same(flatten=leaf == "bias")


def hf_name(path: tuple[str, ...], layout: str) -> str:
  """Our Encoder-tree path (e.g. ('stack', 'layer_0', 'mlp', 'wi', 'kernel')) -> its state-dict key."""
  if path == ("rel_bias",):
    if layout != "exlm_jax":
      raise ValueError("a relative position bias has no place in a RoBERTa state dict")
    return "rel_bias"
  module, leaf = path[:-1], _LEAF[path[-1]]
  if layout == "exlm_jax":  # modeling_exlm.py mirrors our tree: stack/layer_i/... -> layers.i....
    if module[:1] == ("stack",):
      module = module[1:]
      if module[0].startswith("layer_"):
        module = ("layers", module[0][len("layer_"):], *module[1:])
    return ".".join((*module, leaf))
  if module in _ROBERTA_TOP:
    return f"{_ROBERTA_TOP[module]}.{leaf}"
  match = re.fullmatch(r"layer_(\d+)", module[1]) if module[:1] == ("stack",) else None
  if match and module[2:] in _ROBERTA_BLOCK:
    name = _ROBERTA_BLOCK[module[2:]][layout == "roberta-prelayernorm"]
    return f"encoder.layer.{match.group(1)}.{name}.{leaf}"
  raise ValueError(f"encoder parameter {'/'.join(path)} has no {layout} counterpart")


# ----------------------------------------------------------------------------------------------
# Trees <-> state dicts
# ----------------------------------------------------------------------------------------------


def flatten(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
  """Nested dicts -> {path tuple: leaf}."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, (*prefix, str(key))))
  return out


def unflatten(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def unstack_layers(encoder_tree: dict) -> dict:
  """A `scan_layers` tree (stack/layers/... with a leading layer axis) -> stack/layer_i/... (unchanged otherwise)."""
  stack = encoder_tree["stack"]
  if "layers" not in stack:
    return encoder_tree
  flat = flatten(stack["layers"])
  num_layers = next(iter(flat.values())).shape[0]
  layers = {f"layer_{i}": unflatten({p: np.asarray(a)[i] for p, a in flat.items()}) for i in range(num_layers)}
  rest = {k: v for k, v in stack.items() if k != "layers"}
  return {**encoder_tree, "stack": {**layers, **rest}}


def stack_layers(encoder_tree: dict) -> dict:
  """The inverse of `unstack_layers`: stack/layer_i/... -> stack/layers/... (for a scan_layers config)."""
  stack = encoder_tree["stack"]
  names = sorted((k for k in stack if k.startswith("layer_")), key=lambda k: int(k[len("layer_"):]))
  if not names:
    return encoder_tree
  flats = [flatten(stack[n]) for n in names]
  layers = unflatten({p: np.stack([np.asarray(f[p]) for f in flats]) for p in flats[0]})
  rest = {k: v for k, v in stack.items() if k not in names}
  return {**encoder_tree, "stack": {"layers": layers, **rest}}


def encoder_state_dict(encoder_tree: dict, layout: str, prefix: str = "", pad_token_id: int = 0) -> dict:
  """Our Encoder params -> {state-dict key: float32 array} for `layout` (keys start with `prefix`)."""
  flat = flatten(unstack_layers(encoder_tree))
  state = {}
  for path, leaf in flat.items():
    state[prefix + hf_name(path, layout)] = np.ascontiguousarray(
        _transform(path, layout, pad_token_id).to_hf(np.asarray(leaf, np.float32)))
  if layout in NATIVE_LAYOUTS:
    d_model = flat[("token_embed", "embedding")].shape[1]
    state[prefix + ROBERTA_TOKEN_TYPE] = np.zeros((1, d_model), np.float32)
  return state


def encoder_tree_from_state(state: dict, expected_shapes: dict[tuple[str, ...], tuple[int, ...]], layout: str,
                            prefix: str = "", pad_token_id: int = 0) -> tuple[dict, set[str]]:
  """{key: array} -> (our Encoder tree with exactly `expected_shapes` (unscanned), keys it used).

  Native layouts: row 0 of the token-type table is added to every position row (our encoder has no
  segment embedding; transformers adds that row to every token when token_type_ids are zero).
  Raises ValueError naming the first missing key or mismatched shape.
  """
  tree, used = {}, set()
  for path, shape in expected_shapes.items():
    key = prefix + hf_name(path, layout)
    if key not in state:
      raise ValueError(f"state dict has no {key!r} (needed for our {'/'.join(path)}); is it a {layout} checkpoint?")
    value = np.asarray(state[key], np.float32)
    transform = _transform(path, layout, pad_token_id)
    if value.shape != transform.hf_shape(tuple(shape)):
      raise ValueError(f"{key} has shape {value.shape}, which does not give our {'/'.join(path)} {tuple(shape)}")
    tree[path] = transform.from_hf(value, shape)
    used.add(key)
  if layout in NATIVE_LAYOUTS:
    key = prefix + ROBERTA_TOKEN_TYPE
    if key in state:
      tree[("pos_embed", "embedding")] = tree[("pos_embed", "embedding")] + np.asarray(state[key], np.float32)[0]
      used.add(key)
  return unflatten(tree), used


# ----------------------------------------------------------------------------------------------
# Heads: the same names in RoBERTa and in modeling_exlm.py
# ----------------------------------------------------------------------------------------------

LM_HEAD = {("dense", "kernel"): "lm_head.dense.weight", ("dense", "bias"): "lm_head.dense.bias",
           ("ln", "scale"): "lm_head.layer_norm.weight", ("ln", "bias"): "lm_head.layer_norm.bias",
           ("bias",): "lm_head.bias"}
CLASSIFIER = {("dense", "kernel"): "classifier.dense.weight", ("dense", "bias"): "classifier.dense.bias",
              ("out", "kernel"): "classifier.out_proj.weight", ("out", "bias"): "classifier.out_proj.bias"}


def head_state_dict(head_tree: dict, names: dict) -> dict:
  """Our LMHead / ClassificationHead params -> state-dict entries (the LM decoder is tied to the embedding)."""
  flat = flatten(head_tree)
  if set(flat) != set(names):
    raise ValueError(f"head params {sorted('/'.join(p) for p in flat)} are not the expected "
                     f"{sorted('/'.join(p) for p in names)}")
  return {names[p]: np.ascontiguousarray((Linear() if p[-1] == "kernel" else Same()).to_hf(
      np.asarray(a, np.float32))) for p, a in flat.items()}


def head_tree_from_state(state: dict, names: dict) -> dict | None:
  """The inverse of `head_state_dict`; None when the state dict has no such head."""
  if not all(n in state for n in names.values()):
    return None
  flat = {}
  for path, name in names.items():
    w = np.asarray(state[name], np.float32)
    flat[path] = w.T if path[-1] == "kernel" else w
  return unflatten(flat)
