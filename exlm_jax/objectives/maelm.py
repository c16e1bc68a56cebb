"""MAE-LM: masked positions are removed from the encoder input (maelm-reference.md §2-§4).

Per example, inside the jitted step:
  1. select the masked positions (masking.py: same rule as MLM, specials never masked);
  2. compact the K kept tokens (everything neither masked nor <pad>) into a (B, K_max) array with
     their ORIGINAL positions, so both the absolute table and the relative bias see the gaps;
  3. run the encoder on it and put its outputs back at their original positions with a gather through
     the inverse index; masked positions get the raw [MASK] row of the shared token embedding, padding
     gets zeros (reference §3.4: gathers only, identical to fairseq's boolean-mask scatter);
  4. a shallow post-LN decoder (4 layers, no dropout, own absolute positions 0..n-1, own embedding
     LayerNorm, no relative bias) runs on the full block;
  5. the tied LM head is applied only at the M_max gathered masked positions.
Loss = cross-entropy summed over valid masked tokens; weight = their number (normalised globally).

Params: {'encoder': <exactly an Encoder's params>, 'decoder': ..., 'lm_head': ...}; fine-tuning keeps
only 'encoder' (`encoder_params`). Ablation knobs of the official code live in `config.maelm`
(see `default_config`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exlm_jax.data import vocab
from exlm_jax.models import flops
from exlm_jax.models.encoder import (Encoder, ModelConfig, TransformerStack, _dense, _layernorm, attend, bert_init,
                                     relative_position_buckets)
from exlm_jax.models.heads import LMHead
from exlm_jax.objectives import base
from exlm_jax.objectives.masking import max_masked, select_masked_positions
from exlm_jax.objectives.mlm import masked_token_metrics


def default_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.maelm` block: the released recipe, plus the ablation knobs that run in the official code."""
  cfg = ml_collections.ConfigDict(dict(
      decoder_layers=4,  # --gen-decoder-layers
      decoder_dim=-1,  # decoder width; -1 = encoder width. Otherwise Linear(C_enc -> C_dec) on the decoder input
      decoder_heads=-1,  # -1 = encoder heads
      decoder_mlp_dim=-1,  # -1 = encoder mlp_dim
      share_pos_emb=False,  # decoder reuses the encoder's absolute table (same width only)
      decoder_rel_pos=False,  # relative bias in the decoder too (its own table, positions 0..n-1)
      no_pos_align=False,  # encoder positions 0..K-1 instead of the original ones ("token deletion")
      no_fill_mask=False,  # zeros instead of the [MASK] embedding at masked decoder inputs
      mask_in_encoder=False,  # control: [MASK] goes INTO the encoder, same decoder on top
  ))
  cfg.update(overrides)
  return cfg


@dataclasses.dataclass(frozen=True)
class Options:
  """Static view of `config.maelm` (hashable, so it can be a Linen attribute)."""

  share_pos_emb: bool = False
  decoder_rel_pos: bool = False
  no_pos_align: bool = False
  no_fill_mask: bool = False
  mask_in_encoder: bool = False


def max_kept(mask_prob: float, seq_len: int) -> int:
  """K_max: the most tokens one block of `seq_len` slots keeps in the encoder.

  Kept = L - m with m = floor(p * L + U) (masking.py) for a block of L real slots, as long as the
  block has at least m maskable slots. U = 0 is the worst case, so K_max = max_L (L - floor(p * L)).
  In exact arithmetic this is n - floor(p * n) (L - floor(p L) is non-decreasing for p <= 1); here p * L
  is evaluated exactly as the masking rule does -- float32 -- because for some (p, n) the float32
  product falls just below an integer (e.g. p = 0.21, n = 300: n - floor(p n) = 237 but 238 are kept).
  The only blocks outside the bound hold more than K_max specials (<s>/</s>, never masked), leaving too
  little to mask; their last kept tokens are dropped from the encoder (zeros in the decoder input) and
  counted in the `kept_overflow` metric.
  """
  lengths = np.arange(seq_len + 1, dtype=np.float32)
  masked = np.floor(np.float32(mask_prob) * lengths)
  return int(np.max(lengths - masked))


class Compaction(NamedTuple):
  """The encoder's view of a masked block; K = K_max slots, n = block length."""

  tokens: jax.Array  # (B, K) int32 kept tokens in original order, <pad> after them
  positions: jax.Array  # (B, K) int32 their original positions, 0 at padding slots
  padding: jax.Array  # (B, K) bool
  inverse: jax.Array  # (B, n) int32 slot of each kept position in the compacted array (0 elsewhere)
  overflow: jax.Array  # (B, n) bool kept positions that did not fit in K_max (see `max_kept`)


def compact_kept(tokens: jax.Array, is_masked: jax.Array, k_max: int) -> Compaction:
  """Gathers the kept tokens of (B, n) blocks into (B, K_max) with their original positions."""
  kept = ~is_masked & (tokens != vocab.PAD)
  order = jnp.argsort(~kept, axis=-1, stable=True)[:, :k_max].astype(jnp.int32)  # kept slots first, in order
  valid = jnp.arange(k_max)[None, :] < jnp.sum(kept, axis=-1, keepdims=True)
  slot = jnp.cumsum(kept, axis=-1, dtype=jnp.int32) - 1
  overflow = kept & (slot >= k_max)
  return Compaction(
      tokens=jnp.where(valid, jnp.take_along_axis(tokens, order, axis=1), vocab.PAD),
      positions=jnp.where(valid, order, 0),
      padding=~valid,
      inverse=jnp.where(kept & ~overflow, slot, 0),
      overflow=overflow,
  )


def restore_positions(compact_states: jax.Array, inverse: jax.Array) -> jax.Array:
  """(B, K, D) compacted states -> (B, n, D) at their original positions (a gather, no scatter)."""
  return jnp.take_along_axis(compact_states, inverse[..., None], axis=1)


def fill_decoder_input(states: jax.Array, is_masked: jax.Array, blank: jax.Array, mask_row: jax.Array | None):
  """The decoder input (B, n, D): `states` where kept, `mask_row` (D,) at masked slots, zeros where `blank`.

  mask_row None leaves the masked slots as zeros (`no_fill_mask`).
  """
  if mask_row is not None:
    states = jnp.where(is_masked[..., None], mask_row.astype(states.dtype), states)
  else:
    states = jnp.where(is_masked[..., None], 0, states)
  return jnp.where(blank[..., None], 0, states)


class Decoder(nn.Module):
  """Shallow bidirectional decoder over the full block (reference §2.1 step 4).

  (B, n, C_enc) input -> [Linear to C_dec] -> + positions 0..n-1 -> embedding LN -> zero padding ->
  post-LN TransformerStack without dropout (and without relative bias unless `rel_pos`).
  `pos_table` (P, C_dec), if given, replaces the decoder's own table (share_pos_emb).
  """

  cfg: ModelConfig
  project: bool = False
  rel_pos: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array, pos_table: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    length = x.shape[1]
    if self.project:
      x = _dense(cfg.d_model, ("embed", "mlp"), cfg, "proj")(x)
    if pos_table is None:
      pos_table = self.param("pos_embed", nn.with_logical_partitioning(bert_init(), ("positions", "embed")),
                             (cfg.max_positions, cfg.d_model), jnp.float32)
    x = x + pos_table[:length].astype(jnp.float32)
    x = _layernorm(cfg, "embed_ln")(x)
    x = (x * (~padding_mask)[..., None]).astype(cfg.activation_dtype)
    bias = None
    if self.rel_pos:
      rel_bias = self.param("rel_bias", nn.with_logical_partitioning(bert_init(), ("rel_buckets", "heads")),
                            (cfg.rel_pos_bins, cfg.num_heads), jnp.float32)
      buckets = relative_position_buckets(jnp.arange(length)[None], cfg.max_positions, cfg.rel_pos_bins,
                                          cfg.max_rel_pos)  # (1, n, n): the same for every example
      bias = jnp.transpose(rel_bias[buckets], (0, 3, 1, 2)).astype(cfg.activation_dtype)
    key_mask = (~padding_mask)[:, None, None, :]
    return TransformerStack(cfg, deterministic=True, name="stack")(x, key_mask, bias)


class ProjectedLMHead(nn.Module):
  """LMHead at decoder width C_dec tied to a (V, C_enc) embedding: Dense -> GELU -> LN -> Linear(C_dec ->
  C_enc, no bias) -> E^T + bias, as the reference's AELMHead with `embed_linear` when the widths differ."""

  cfg: ModelConfig  # the decoder's

  @nn.compact
  def __call__(self, h: jax.Array, embedding: jax.Array) -> jax.Array:
    h = _dense(self.cfg.d_model, ("embed", "mlp"), self.cfg, "dense")(h)
    h = nn.gelu(h, approximate=False)
    h = _layernorm(self.cfg, "ln")(h)
    h = nn.DenseGeneral(embedding.shape[-1], use_bias=False, dtype=self.cfg.activation_dtype,
                        param_dtype=jnp.float32,
                        kernel_init=nn.with_logical_partitioning(bert_init(), ("mlp", "embed")),
                        name="embed_linear")(h)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                      (self.cfg.vocab_size,), jnp.float32)
    return attend(h, embedding) + bias


class MAELMModel(nn.Module):
  """Encoder on kept tokens + decoder on the full block + tied head at masked positions.

  `__call__(tokens (B, n), mask_rng) -> (loss_sum, weight, metrics)`.
  """

  cfg: ModelConfig  # encoder
  decoder_cfg: ModelConfig
  mask_prob: float
  options: Options = Options()
  deterministic: bool = True

  def setup(self):
    self.encoder = Encoder(self.cfg, self.deterministic, name="encoder")
    widths_differ = self.decoder_cfg.d_model != self.cfg.d_model
    self.decoder = Decoder(self.decoder_cfg, project=widths_differ, rel_pos=self.options.decoder_rel_pos,
                           name="decoder")
    head_cls = ProjectedLMHead if widths_differ else LMHead
    self.lm_head = head_cls(self.decoder_cfg, name="lm_head")

  def decoder_input(self, tokens: jax.Array, is_masked: jax.Array, capacity: int | None = None):
    """(B, n, C_enc) decoder input and the (B, n) overflow mask, for a given selection.

    At kept positions it holds the encoder's outputs, which never depend on masked tokens' identities.
    `capacity` is the compacted encoder length: `max_kept` (training's bound) by default; inference,
    which may mask fewer slots than training, passes n.
    """
    opts = self.options
    is_pad = tokens == vocab.PAD
    if opts.mask_in_encoder:
      states = self.encoder(jnp.where(is_masked, vocab.MASK, tokens), padding_mask=is_pad)
      overflow = jnp.zeros_like(is_masked)
    else:
      capacity = capacity or max_kept(self.mask_prob, tokens.shape[1])
      view = compact_kept(tokens, is_masked, capacity)
      positions = view.positions
      if opts.no_pos_align:
        positions = jnp.broadcast_to(jnp.arange(positions.shape[1], dtype=jnp.int32), positions.shape)
      compact_states = self.encoder(view.tokens, positions=positions, padding_mask=view.padding)
      states, overflow = restore_positions(compact_states, view.inverse), view.overflow
    mask_row = None if opts.no_fill_mask else self.encoder.embed(jnp.asarray(vocab.MASK))
    return fill_decoder_input(states, is_masked, is_pad | overflow, mask_row), overflow

  def decode(self, decoder_input: jax.Array, is_pad: jax.Array) -> jax.Array:
    """(B, n, C_dec) decoder states over the full block (its own positions, or the encoder's if shared)."""
    pos_table = self.encoder.pos_embed.embedding if self.options.share_pos_emb else None
    return self.decoder(decoder_input, is_pad, pos_table)

  def predict(self, inputs, positions_to_predict):
    """Logits (B, P, V) at given positions of an input with [MASK] there (for the API / analyses).

    Inference may mask fewer slots than training, so the encoder keeps room for every token (capacity n).
    """
    dec_in, _ = self.decoder_input(inputs, inputs == vocab.MASK, capacity=inputs.shape[1])
    hidden = self.decode(dec_in, inputs == vocab.PAD)
    gathered = jnp.take_along_axis(hidden, positions_to_predict[..., None], axis=1)
    return self.lm_head(gathered, self.encoder.embedding)

  def __call__(self, tokens, mask_rng):
    return self.loss_and_states(tokens, mask_rng)[:3]

  def loss_and_states(self, tokens, mask_rng):
    """`__call__`'s (loss_sum, weight, metrics) plus {'decoder_input': (B, n, C_enc), 'is_masked': (B, n)}."""
    selection = select_masked_positions(tokens, mask_rng, self.mask_prob)
    dec_in, overflow = self.decoder_input(tokens, selection.is_masked)
    hidden = self.decode(dec_in, tokens == vocab.PAD)
    gathered = jnp.take_along_axis(hidden, selection.indices[..., None], axis=1)  # (B, M_max, C_dec)
    logits = self.lm_head(gathered, self.encoder.embedding)
    targets = jnp.take_along_axis(tokens, selection.indices, axis=1)
    loss_sum, count, metrics = masked_token_metrics(logits, targets, selection.valid)
    # Tokens that did not fit in K_max: 0 unless a block is nearly all specials (see `max_kept`).
    metrics["kept_overflow"] = (jnp.sum(overflow).astype(jnp.float32), jnp.float32(tokens.shape[0]))
    return loss_sum, count, metrics, {"decoder_input": dec_in, "is_masked": selection.is_masked}


# ----------------------------------------------------------------------------------------------
# Config -> model, validation, encoder hand-off
# ----------------------------------------------------------------------------------------------


def _knobs(config) -> ml_collections.ConfigDict:
  knobs = default_config()
  given = config.get("maelm", None)
  if given is not None:
    unknown = sorted(set(given.keys()) - set(knobs.keys()))
    if unknown:
      raise ValueError(f"unknown config.maelm keys {unknown}; known: {', '.join(sorted(knobs.keys()))}")
    knobs.update(dict(given))
  return knobs


def decoder_config(enc: ModelConfig, knobs) -> ModelConfig:
  """The decoder's ModelConfig: post-LN, no dropout, absolute positions, its own width if asked."""
  pick = lambda value, default: default if value == -1 else int(value)
  return dataclasses.replace(
      enc,
      num_layers=int(knobs.decoder_layers),
      d_model=pick(knobs.decoder_dim, enc.d_model),
      num_heads=pick(knobs.decoder_heads, enc.num_heads),
      mlp_dim=pick(knobs.decoder_mlp_dim, enc.mlp_dim),
      pre_ln=False,
      embed_layernorm=True,
      positions="absolute",
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
  )


def validate(config: ml_collections.ConfigDict) -> None:
  knobs = _knobs(config)
  enc = base.model_config(config)
  if not 0.0 < config.mask_prob < 1.0:
    raise ValueError(f"mask_prob={config.mask_prob} must be in (0, 1) for MAE-LM")
  if int(knobs.decoder_layers) < 1:
    raise ValueError(f"maelm.decoder_layers={knobs.decoder_layers} must be >= 1")
  for key in ("decoder_dim", "decoder_heads", "decoder_mlp_dim"):
    if knobs[key] != -1 and knobs[key] < 1:
      raise ValueError(f"maelm.{key}={knobs[key]} must be -1 (= encoder's) or >= 1")
  dec = decoder_config(enc, knobs)
  if dec.d_model % dec.num_heads:
    raise ValueError(f"decoder width {dec.d_model} is not divisible by maelm.decoder_heads={dec.num_heads}")
  if config.seq_len > enc.max_positions:
    raise ValueError(f"seq_len={config.seq_len} exceeds model.max_positions={enc.max_positions} (decoder table)")
  if knobs.share_pos_emb and enc.positions not in ("absolute+relbias", "absolute"):
    raise ValueError(f"maelm.share_pos_emb needs an encoder with an absolute table, not positions={enc.positions!r}")
  if knobs.share_pos_emb and dec.d_model != enc.d_model:
    raise ValueError("maelm.share_pos_emb needs decoder_dim == encoder d_model (the reference ignores it otherwise)")
  if knobs.mask_in_encoder and knobs.no_pos_align:
    raise ValueError("maelm.no_pos_align has no effect with maelm.mask_in_encoder (nothing is removed)")


def make_model(config: ml_collections.ConfigDict, deterministic: bool) -> MAELMModel:
  validate(config)
  knobs = _knobs(config)
  enc = base.model_config(config)
  options = Options(**{f.name: bool(knobs[f.name]) for f in dataclasses.fields(Options)})
  return MAELMModel(enc, decoder_config(enc, knobs), float(config.mask_prob), options, deterministic)


_ENCODER_KEYS = ("token_embed", "pos_embed", "rel_bias", "embed_ln", "stack")


def encoder_params(params, config: ml_collections.ConfigDict | None = None):
  """The 'encoder' sub-tree of a MAE-LM param tree, checked to be exactly an Encoder's parameters.

  With `config`, the key paths and shapes must equal those of a freshly initialised Encoder; without
  it, only the top-level keys are checked. Raises ValueError listing missing / unexpected keys.
  """
  tree = base.encoder_subtree(params)
  if config is None:
    names = set(tree)
    problems = [f"missing {sorted({'token_embed', 'stack'} - names)}"] if {"token_embed", "stack"} - names else []
    if names - set(_ENCODER_KEYS):
      problems.append(f"unexpected {sorted(names - set(_ENCODER_KEYS))}")
  else:
    problems = base.encoder_tree_problems(tree, base.model_config(config))
  if problems:
    raise ValueError("MAE-LM 'encoder' sub-tree is not an Encoder's params: " + "; ".join(problems))
  return tree


# ----------------------------------------------------------------------------------------------
# Prediction, FLOPs, analyses
# ----------------------------------------------------------------------------------------------


def masked_log_probs():
  """predict_masked's rule: [MASK] slots removed from the encoder (kept tokens keep their original
  positions), the decoder on the full block with the [MASK] embedding there, the LM head at the slots."""
  return MAELMModel.predict


def train_flops(config: ml_collections.ConfigDict, include_remat: bool) -> flops.Breakdown:
  """One sequence: the encoder on the K_max kept slots (n with mask_in_encoder), the decoder (its own depth and
  width, post-LN, the encoder's remat) on n slots, the LM head at the M_max masked positions."""
  m, n = config.model, config.seq_len
  knobs = _knobs(config)
  dec = decoder_config(base.model_config(config), knobs)
  m_max = max_masked(config.mask_prob, n)
  k_max = n if knobs.mask_in_encoder else max_kept(config.mask_prob, n)
  decoder = flops.encoder_train(n, dec.num_layers, dec.d_model, dec.mlp_dim, m.get("remat", "none"), include_remat,
                                False)
  if dec.d_model != m.d_model:
    decoder += 3 * 2 * n * m.d_model * dec.d_model  # Linear(C_enc -> C_dec) on the decoder input
  return flops.Breakdown(
      encoder=flops.model_encoder_train(m, k_max, include_remat),
      decoder=decoder,
      lm_head=3 * flops.lm_head_forward(m_max, dec.d_model, m.vocab_size,
                                        None if dec.d_model == m.d_model else m.d_model),
      shapes=(("seq_len", n), ("kept_max", k_max), ("masked_max", m_max)))


def rank_groups(hidden_states, tokens: np.ndarray, selection) -> dict:
  """effective_rank's view beyond the shared clean input (base.CLEAN_INPUT): 'encoder_compact/real' the
  encoder on the compacted masked input with original positions, as seen in pretraining."""
  view = jax.device_get(compact_kept(jnp.asarray(tokens), jnp.asarray(selection.is_masked), tokens.shape[1]))
  compact = hidden_states(view.tokens, view.positions, view.padding)
  return {"encoder_compact/real": (compact, base.content_slots(view.tokens))}


OBJECTIVE = base.register(base.Objective(
    name="maelm", title="MAE-LM", make_model=make_model, encoder_params=encoder_params, validate=validate,
    default_config=default_config, flops=train_flops, masked_log_probs=masked_log_probs,
    rank_groups=base.RankGroups(rank_groups)))
