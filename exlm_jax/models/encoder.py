"""The shared Transformer encoder (docs/design.md §1.1), Flax Linen.

One encoder serves all three objectives. What differs between the papers is configuration:
  * ExLM: pre-LN blocks + final LayerNorm, no embedding LayerNorm, `rope2d` positions
    (first half of each head rotated by the original position, second half by the copy index);
  * MAE-LM: post-LN blocks, embedding LayerNorm, `absolute+relbias` positions (learned absolute
    table indexed by ORIGINAL position + bucketed relative bias from original positions).

Shapes: B batch, L length, D model width, N heads, Dh = D / N head width.
Every parameter and the main activations carry logical axis names; `configs/` maps them to mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
POSITION_SCHEMES = ("rope2d", "absolute+relbias", "absolute")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static (hashable) encoder hyper-parameters; built from the `model` ConfigDict."""

  vocab_size: int
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  mlp_dim: int = 1024
  pre_ln: bool = True
  positions: str = "rope2d"
  embed_layernorm: bool = False
  max_positions: int = 512
  rel_pos_bins: int = 64
  max_rel_pos: int = 128
  rope_theta: float = 10000.0
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  attention_impl: str = "xla"
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  layernorm_eps: float = 1e-5

  @classmethod
  def from_config(cls, cfg, **overrides) -> "ModelConfig":
    """Builds from an ml_collections ConfigDict (unknown keys such as `size` are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(cfg).items() if k in names}
    values.update(overrides)
    config = cls(**values)
    config.validate()
    return config

  def validate(self) -> None:
    if self.vocab_size <= 0:
      raise ValueError(f"model.vocab_size={self.vocab_size}: set it from the tokenizer before building the model")
    if self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}")
    if self.positions not in POSITION_SCHEMES:
      raise ValueError(f"model.positions={self.positions!r}; choose one of {POSITION_SCHEMES}")
    if self.positions == "rope2d" and self.head_dim % 4:
      raise ValueError(f"rope2d needs a head width divisible by 4, got {self.head_dim}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r}; choose one of {tuple(_DTYPES)}")
    if self.attention_impl not in ("xla", "cudnn"):
      raise ValueError(f"model.attention_impl={self.attention_impl!r}; choose 'xla' or 'cudnn' (GPU, bf16/fp16)")
    if self.remat != "none" and self.remat not in _REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r}; choose 'none' or one of {tuple(_REMAT_POLICIES)}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def activation_dtype(self):
    return _DTYPES[self.dtype]


def bert_init(stddev: float = 0.02):
  return nn.initializers.normal(stddev=stddev)


class Projection(nn.Module):
  """Linear map contracting the last `contract` input dims into `features`, with bias.

  Kernel shape is (*input_dims, *features) created directly at that shape (flax's DenseGeneral
  initialises a flattened 2-D kernel, which breaks rank-3 logical partitioning annotations).
  """

  features: tuple[int, ...]
  axes: tuple[str, ...]
  cfg: ModelConfig
  contract: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_dims = x.shape[x.ndim - self.contract:]
    kernel = self.param("kernel", nn.with_logical_partitioning(bert_init(), self.axes),
                        (*in_dims, *self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           self.axes[self.contract:]),
                      self.features, jnp.float32)
    dtype = self.cfg.activation_dtype
    y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=self.contract)
    return y + bias.astype(dtype)


def _dense(features, axes, cfg: ModelConfig, name: str, contract: int = 1) -> nn.Module:
  return Projection(tuple(np.atleast_1d(features).tolist()), tuple(axes), cfg, contract, name=name)


def _layernorm(cfg: ModelConfig, name: str) -> nn.Module:
  return nn.LayerNorm(
      epsilon=cfg.layernorm_eps,
      dtype=cfg.activation_dtype,
      param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      name=name,
  )


def constrain(x: Array, *names: str) -> Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, names)


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------


def rope2d_angles(positions: Array, copy_index: Array, head_dim: int, theta: float = 10000.0):
  """cos/sin tables for 2-D rotary embedding, each (B, L, 1, Dh), float32.

  Dims [0, Dh/2) are rotated by `positions`, dims [Dh/2, Dh) by `copy_index`; inside each half the
  GPT-NeoX "rotate-half" pairing (j, j + Dh/4) with frequencies theta^(-2j/(Dh/2)) (docs/design.md §1.1).
  Copy index 0 leaves the second half unrotated (ordinary tokens).
  """
  half = head_dim // 2
  freqs = theta ** (-jnp.arange(0, half // 2, dtype=jnp.float32) * 2.0 / half)  # (Dh/4,)
  ang_pos = positions.astype(jnp.float32)[..., None] * freqs  # (B, L, Dh/4)
  ang_copy = copy_index.astype(jnp.float32)[..., None] * freqs
  angles = jnp.concatenate([ang_pos, ang_pos, ang_copy, ang_copy], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates x (B, L, N, Dh) with tables from `rope2d_angles` (each half rotated separately)."""
  *lead, dh = x.shape
  quarters = x.reshape(*lead, 2, 2, dh // 4)  # [half, part, j]
  rotated = jnp.stack([-quarters[..., 1, :], quarters[..., 0, :]], axis=-2).reshape(x.shape)
  out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x.dtype)


@functools.lru_cache(maxsize=16)
def relative_bucket_table(max_positions: int, num_bins: int, max_distance: int) -> np.ndarray:
  """Bucket id for every signed distance r = j - i in [-(P-1), P-1]; index the result with r + P - 1.

  MAE-LM / COCO-LM's function (docs/design.md §1.1), computed once in float64 on the host: signed
  symmetric buckets, exact below nb/2, log-spaced with ceil above, shifted so ids lie in [0, 2nb-2].
  """
  nb = num_bins // 2
  exact = nb // 2
  log_slots = nb - 1 - exact
  r = np.arange(-(max_positions - 1), max_positions, dtype=np.int64)
  n = np.abs(r)
  with np.errstate(divide="ignore"):
    log_part = exact + np.ceil(
        np.log(np.maximum(n, 1) / exact) / np.log((max_distance - 1) / exact) * log_slots)
  magnitude = np.where(n < exact, n, np.minimum(nb - 1, log_part)).astype(np.int64)
  return (np.sign(r) * magnitude + (nb - 1)).astype(np.int32)


def relative_position_buckets(positions: Array, max_positions: int, num_bins: int, max_distance: int) -> Array:
  """(B, L) original positions -> (B, L, L) bucket ids of key-minus-query distances."""
  table = jnp.asarray(relative_bucket_table(max_positions, num_bins, max_distance))
  distance = positions[:, None, :] - positions[:, :, None]
  return table[jnp.clip(distance + max_positions - 1, 0, 2 * max_positions - 2)]


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
  """Multi-head self-attention with biases on q/k/v/o; fused `jax.nn.dot_product_attention`.

  Attention-probability dropout is not supported by the fused kernel, so when it is active
  (training with attention_dropout_rate > 0) the same math runs unfused with dropout.
  """

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array | None, rope: tuple[Array, Array] | None) -> Array:
    cfg = self.cfg
    qkv_shape = (cfg.num_heads, cfg.head_dim)
    q = _dense(qkv_shape, ("embed", "heads", "kv"), cfg, "query")(x)
    k = _dense(qkv_shape, ("embed", "heads", "kv"), cfg, "key")(x)
    v = _dense(qkv_shape, ("embed", "heads", "kv"), cfg, "value")(x)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = constrain(q, "activation_batch", "activation_length", "activation_heads", "activation_kv")
    k = constrain(k, "activation_batch", "activation_length", "activation_heads", "activation_kv")
    if self.deterministic or cfg.attention_dropout_rate == 0.0:
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=cfg.attention_impl)
    else:
      out = self._attention_with_dropout(q, k, v, mask, bias)
    return _dense(cfg.d_model, ("heads", "kv", "embed"), cfg, "out", contract=2)(out)

  def _attention_with_dropout(self, q, k, v, mask, bias):
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.cfg.head_dim)
    if bias is not None:
      scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(self.cfg.attention_dropout_rate)(probs, deterministic=False)
    return jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)


class MlpBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _dense(self.cfg.mlp_dim, ("embed", "mlp"), self.cfg, "wi")(x)
    h = nn.gelu(h, approximate=False)
    h = constrain(h, "activation_batch", "activation_length", "activation_mlp")
    return _dense(self.cfg.d_model, ("mlp", "embed"), self.cfg, "wo")(h)


class EncoderBlock(nn.Module):
  """Pre-LN: x + Drop(Attn(LN(x))), x + Drop(FFN(LN(x))). Post-LN: LN(x + Drop(Attn(x))), LN(h + ...)."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array | None, rope) -> tuple[Array, None]:
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    attn = Attention(cfg, self.deterministic, name="attention")
    mlp = MlpBlock(cfg, name="mlp")
    if cfg.pre_ln:
      x = x + drop(attn(_layernorm(cfg, "ln_attention")(x), mask, bias, rope))
      x = x + drop(mlp(_layernorm(cfg, "ln_mlp")(x)))
    else:
      x = _layernorm(cfg, "ln_attention")(x + drop(attn(x, mask, bias, rope)))
      x = _layernorm(cfg, "ln_mlp")(x + drop(mlp(x)))
    x = constrain(x, "activation_batch", "activation_length", "activation_embed")
    return x, None


class TransformerStack(nn.Module):
  """`num_layers` blocks (optionally remat'ed and/or scanned) + the final LayerNorm of pre-LN models.

  Returns the last hidden states (B, L, D) and, if asked, all layer inputs/outputs as a tuple of
  num_layers + 1 arrays (index 0 = the stack's input) for the analysis tools.
  """

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, bias=None, rope=None, return_hidden_states: bool = False):
    cfg = self.cfg
    block_cls = EncoderBlock
    if cfg.remat != "none":
      block_cls = nn.remat(EncoderBlock, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    hidden = [x]
    if cfg.scan_layers:
      def body(module, carry, mask, bias, rope):
        out, _ = module(carry, mask, bias, rope)
        return out, (out if return_hidden_states else None)

      scanned = nn.scan(
          body,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, stacked = scanned(block_cls(cfg, self.deterministic, name="layers"), x, mask, bias, rope)
      if return_hidden_states:
        hidden.extend(stacked[i] for i in range(cfg.num_layers))
    else:
      for i in range(cfg.num_layers):
        x, _ = block_cls(cfg, self.deterministic, name=f"layer_{i}")(x, mask, bias, rope)
        hidden.append(x)
    if cfg.pre_ln:
      x = _layernorm(cfg, "final_ln")(x)
      if return_hidden_states:
        hidden[-1] = x
    return (x, tuple(hidden)) if return_hidden_states else x


class Encoder(nn.Module):
  """Token embedding + positions + TransformerStack.

  Call: `(tokens, positions=None, copy_index=None, padding_mask=None, segment_ids=None) -> (B, L, D)`
    tokens (B, L) int32; positions (B, L) original positions (default 0..L-1; per example in packed
    blocks, so rope, the absolute table and the relative bias see each example as if it were alone);
    copy_index (B, L) ExLM copy index (default 0, "not expanded"); padding_mask (B, L) True at <pad>
    (default: segment_ids == 0 when segment ids are given, else nothing padded);
    segment_ids (B, L) int32 packed blocks (objectives/segments.py): a slot attends only to non-padded
    slots of its own segment. None = one example per block: exactly the key-padding mask alone.
  `embed(tokens)` gives raw embedding rows (MAE-LM's [MASK] fill); `embedding` is the tied matrix.

  Masks and jax.nn.dot_product_attention: the key-padding mask is (B, 1, 1, L), the segment mask
  (B, 1, L, L), both boolean `mask=`. implementation='xla' applies `mask` as a select on the logits
  (any broadcastable shape). implementation='cudnn' stays the fused cuDNN kernel: a boolean mask is
  turned into an additive bias (0 / large negative) and added to the relative bias. Its
  `query_seq_lengths` / `key_value_seq_lengths` express one padded sequence per row only (no
  segments); cuDNN's packed layout (per-segment offsets) is not exposed by the public function, so
  segments go through `mask=` on both implementations. The unfused dropout path takes the same mask.
  A padding query has no allowed key; its (ignored) output stays finite.
  """

  cfg: ModelConfig
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    self.token_embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(bert_init(), ("vocab", "embed")), name="token_embed")
    if cfg.positions in ("absolute+relbias", "absolute"):
      self.pos_embed = nn.Embed(
          cfg.max_positions, cfg.d_model, param_dtype=jnp.float32,
          embedding_init=nn.with_logical_partitioning(bert_init(), ("positions", "embed")), name="pos_embed")
    if cfg.positions == "absolute+relbias":
      self.rel_bias = self.param(
          "rel_bias", nn.with_logical_partitioning(bert_init(), ("rel_buckets", "heads")),
          (cfg.rel_pos_bins, cfg.num_heads), jnp.float32)
    if cfg.embed_layernorm:
      self.embed_ln = _layernorm(cfg, "embed_ln")
    self.embed_dropout = nn.Dropout(cfg.dropout_rate)
    self.stack = TransformerStack(cfg, self.deterministic, name="stack")

  @property
  def embedding(self) -> Array:
    """The (V, D) token-embedding matrix, shared with every LM head."""
    return self.token_embed.embedding

  def embed(self, tokens: Array) -> Array:
    return self.token_embed(tokens)

  def __call__(self, tokens, positions=None, copy_index=None, padding_mask=None, segment_ids=None,
               return_hidden_states=False):
    cfg = self.cfg
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if copy_index is None:
      copy_index = jnp.zeros_like(positions)
    if padding_mask is None:
      padding_mask = jnp.zeros((batch, length), bool) if segment_ids is None else segment_ids == 0
    x = self.token_embed(tokens)
    bias = rope = None
    if cfg.positions in ("absolute+relbias", "absolute"):
      x = x + self.pos_embed(jnp.clip(positions, 0, cfg.max_positions - 1))
    if cfg.positions == "absolute+relbias":
      buckets = relative_position_buckets(positions, cfg.max_positions, cfg.rel_pos_bins, cfg.max_rel_pos)
      bias = jnp.transpose(self.rel_bias[buckets], (0, 3, 1, 2)).astype(cfg.activation_dtype)  # (B, N, L, L)
    if cfg.positions == "rope2d":
      rope = rope2d_angles(positions, copy_index, cfg.head_dim, cfg.rope_theta)
    if cfg.embed_layernorm:
      x = self.embed_ln(x)
    x = self.embed_dropout(x, deterministic=self.deterministic)
    x = (x * (~padding_mask)[..., None]).astype(cfg.activation_dtype)
    x = constrain(x, "activation_batch", "activation_length", "activation_embed")
    key_mask = (~padding_mask)[:, None, None, :]  # (B, 1, 1, L): True = may attend
    if segment_ids is not None:
      key_mask = key_mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # (B, 1, L, L)
    return self.stack(x, key_mask, bias, rope, return_hidden_states=return_hidden_states)


def attend(x: Array, embedding: Array) -> Array:
  """Tied output projection x (..., D) @ E^T -> (..., V) logits in float32."""
  return jnp.einsum("...d,vd->...v", x, embedding.astype(x.dtype), preferred_element_type=jnp.float32)


def logical_axis_rules_default() -> tuple[tuple[str, Any], ...]:
  """Rules for a (data, fsdp, tensor) mesh; with fsdp = tensor = 1 this is pure data parallel."""
  return (
      ("activation_batch", ("data", "fsdp")),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_heads", "tensor"),
      ("activation_kv", None),
      ("activation_mlp", "tensor"),
      ("activation_vocab", "tensor"),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("positions", None),
      ("rel_buckets", None),
      ("layers", None),
  )
