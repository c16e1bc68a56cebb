"""MAE-LM: masked positions are removed from the encoder input (docs/design.md §3).

Per example, inside the jitted step:
  1. select the masked positions (masking.py: same rule as MLM, specials never masked);
  2. compact the K kept tokens (everything neither masked nor <pad>) into a (B, K_max) array with
     their ORIGINAL positions, so both the absolute table and the relative bias see the gaps;
  3. run the encoder on it and put its outputs back at their original positions with a gather through
     the inverse index; masked positions get the raw [MASK] row of the shared token embedding, padding
     gets zeros (docs/design.md §3.2: gathers only, identical to fairseq's boolean-mask scatter);
  4. a shallow post-LN decoder (4 layers, no dropout, own absolute positions 0..n-1, own embedding
     LayerNorm, no relative bias) runs on the full block;
  5. the tied LM head is applied only at the M_max gathered masked positions.
Loss = cross-entropy summed over valid masked tokens; weight = their number (normalised globally).

A batch is a token array (B, n) or a packed-block dict {'tokens', 'segment_ids', 'positions'}
(objectives/segments.py). Packed, every step is per example: masks are drawn per example (bound set by
`max_examples`, the data's `max_examples_per_block`); compaction carries each kept token's segment and
per-example position; encoder and decoder attend only within an example and see its positions (the
decoder's 0..L_e-1), so a packed batch computes what its examples compute one per block
(tests/test_packing_maelm.py). K_max (`max_kept`) is the kept-token bound over such blocks.

Params: {'encoder': <exactly an Encoder's params>, 'decoder': ..., 'lm_head': ...}; fine-tuning keeps
only 'encoder' (`encoder_params`). Ablation knobs of the official code live in `config.maelm`
(see `DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import functools
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
from exlm_jax.objectives.masking import MaskSelection, max_masked, select_masked_positions
from exlm_jax.objectives.mlm import masked_token_metrics
from exlm_jax.objectives.segments import split_batch


# `config.maelm`: the released recipe, plus the ablation knobs that run in the official code. A config
# writes only what it changes; `options(config)` merges these defaults over it.
DEFAULTS = dict(
    decoder_layers=4,  # --gen-decoder-layers
    decoder_dim=-1,  # decoder width; -1 = encoder width. Otherwise Linear(C_enc -> C_dec) on the decoder input
    decoder_heads=-1,  # -1 = encoder heads
    decoder_mlp_dim=-1,  # -1 = encoder mlp_dim
    share_pos_emb=False,  # decoder reuses the encoder's absolute table (same width only)
    decoder_rel_pos=False,  # relative bias in the decoder too (its own table, positions 0..n-1)
    no_pos_align=False,  # encoder positions 0..K-1 instead of the original ones ("token deletion")
    no_fill_mask=False,  # zeros instead of the [MASK] embedding at masked decoder inputs
    mask_in_encoder=False,  # control: [MASK] goes INTO the encoder, same decoder on top
)


@dataclasses.dataclass(frozen=True)
class Options:
  """Static view of `config.maelm` (hashable, so it can be a Linen attribute)."""

  share_pos_emb: bool = False
  decoder_rel_pos: bool = False
  no_pos_align: bool = False
  no_fill_mask: bool = False
  mask_in_encoder: bool = False


@functools.lru_cache(maxsize=64)
def max_kept(mask_prob: float, seq_len: int, max_examples: int = 1) -> int:
  """K_max: the most tokens one block of `seq_len` slots holding <= `max_examples` examples keeps in the encoder.

  An example of L slots (its own <s> ... </s>) keeps L - m with m = min(floor(p * L + U), L - 2) (masking.py:
  per example, at most its maskable slots). m is non-decreasing in U, so U = 0 is the worst case:
  h(L) = L - min(floor(p * L), L - 2), and K_max = max sum_e h(L_e) over at most E examples with L_e >= 2 and
  sum_e L_e <= n (the row's cap at M_max never binds at U = 0: sum_e floor(p L_e) <= M_max), so the bound is
  exact and attained. It is the E-fold (max, +) convolution of the one-example bound, by squaring.
  One example: n - floor(p * n) in exact arithmetic (h is non-decreasing), unchanged from one example per
  block wherever that is >= 2. Here p * L is evaluated exactly as the masking rule does -- float32 --
  because for some (p, n) the float32 product falls just below an integer (e.g. p = 0.21, n = 300:
  n - floor(p n) = 237 but 238 are kept). E examples keep at most E - 1 more than one (each floor drops
  < 1), or more where examples are so short that their <s>, </s> exceed what p would mask.
  The only blocks outside the bound are malformed: an example holding specials (<s>/</s>, never masked)
  beyond its own two, or a row holding more than `max_examples` examples (masked as one, masking.py).
  Their last kept tokens are dropped from the encoder (zeros in the decoder input) and counted in the
  `kept_overflow` metric.
  """
  lengths = np.arange(seq_len + 1)
  masked = np.floor(np.float32(mask_prob) * lengths.astype(np.float32)).astype(np.int64)
  kept = np.where(lengths >= 2, lengths - np.minimum(masked, lengths - 2), 0)  # h(L); an example has >= 2 slots
  one = np.maximum.accumulate(kept)  # one[s]: the most at most one example keeps in s slots
  best, power, count = np.zeros_like(one), one, min(max_examples, seq_len // 2)
  while count:  # best = one (+) one ... count times, by squaring in the (max, +) algebra
    if count & 1:
      best = _max_plus(best, power)
    power, count = _max_plus(power, power), count >> 1
  return int(best[-1])


def _max_plus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """c[s] = max_t a[t] + b[s - t]: the most two groups of examples keep in s slots together."""
  out = a + b[0]
  for t in range(1, len(a)):
    np.maximum(out[t:], a[:len(a) - t] + b[t], out=out[t:])
  return out


class Compaction(NamedTuple):
  """The encoder's view of a masked block; K = K_max slots, n = block length."""

  tokens: jax.Array  # (B, K) int32 kept tokens in original order, <pad> after them
  positions: jax.Array  # (B, K) int32 their original positions (per example when packed), 0 at padding slots
  padding: jax.Array  # (B, K) bool
  inverse: jax.Array  # (B, n) int32 slot of each kept position in the compacted array (0 elsewhere)
  overflow: jax.Array  # (B, n) bool kept positions that did not fit in K_max (see `max_kept`)
  segment_ids: jax.Array | None = None  # (B, K) int32 their segments, 0 at padding; None: one example per block


def compact_kept(tokens: jax.Array, is_masked: jax.Array, k_max: int, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> Compaction:
  """Gathers the kept tokens of (B, n) blocks into (B, K_max) with their original positions.

  Packed blocks pass their `segment_ids` and `positions` (B, n) (objectives/segments.py): padding is then
  segment 0, and every kept token carries its segment and its per-example position. Without them <pad> is
  padding and a token's position is its slot (one example per block).
  """
  kept = ~is_masked & ~padding_of(tokens, segment_ids)
  order = jnp.argsort(~kept, axis=-1, stable=True)[:, :k_max].astype(jnp.int32)  # kept slots first, in order
  valid = jnp.arange(k_max)[None, :] < jnp.sum(kept, axis=-1, keepdims=True)
  slot = jnp.cumsum(kept, axis=-1, dtype=jnp.int32) - 1
  overflow = kept & (slot >= k_max)
  gather = lambda x: jnp.take_along_axis(x, order, axis=1)
  return Compaction(
      tokens=jnp.where(valid, gather(tokens), vocab.PAD),
      positions=jnp.where(valid, order if positions is None else gather(positions), 0),
      padding=~valid,
      inverse=jnp.where(kept & ~overflow, slot, 0),
      overflow=overflow,
      segment_ids=None if segment_ids is None else jnp.where(valid, gather(segment_ids), 0),
  )


def padding_of(tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """(B, n) bool padding slots: segment 0 of a packed block, else <pad>."""
  return tokens == vocab.PAD if segment_ids is None else segment_ids == 0


def deletion_positions(view: Compaction) -> jax.Array:
  """`no_pos_align` (token deletion): each example's kept tokens at 0..K_e-1 instead of their original positions.

  (B, K) int32; one example per block: 0..K-1.
  """
  index = jnp.broadcast_to(jnp.arange(view.positions.shape[1], dtype=jnp.int32), view.positions.shape)
  if view.segment_ids is None:
    return index
  # Kept tokens of an example are contiguous in the compacted array: subtract the index of its first one.
  starts = jnp.concatenate([jnp.ones_like(view.padding[:, :1]), view.segment_ids[:, 1:] != view.segment_ids[:, :-1]],
                           axis=1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


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
  """Shallow bidirectional decoder over the full block (docs/design.md §3.3).

  (B, n, C_enc) input -> [Linear to C_dec] -> + positions 0..n-1 -> embedding LN -> zero padding ->
  post-LN TransformerStack without dropout (and without relative bias unless `rel_pos`).
  `pos_table` (P, C_dec), if given, replaces the decoder's own table (share_pos_emb).
  Packed blocks pass per-example `positions` (B, n) (they replace 0..n-1 in the table and the relative
  bias) and `segment_ids` (B, n): a slot attends only to non-padded slots of its own example.
  """

  cfg: ModelConfig
  project: bool = False
  rel_pos: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array, pos_table: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    length = x.shape[1]
    if self.project:
      x = _dense(cfg.d_model, ("embed", "mlp"), cfg, "proj")(x)
    if pos_table is None:
      pos_table = self.param("pos_embed", nn.with_logical_partitioning(bert_init(), ("positions", "embed")),
                             (cfg.max_positions, cfg.d_model), jnp.float32)
    x = x + (pos_table[:length] if positions is None else pos_table[positions]).astype(jnp.float32)
    x = _layernorm(cfg, "embed_ln")(x)
    x = (x * (~padding_mask)[..., None]).astype(cfg.activation_dtype)
    bias = None
    if self.rel_pos:
      rel_bias = self.param("rel_bias", nn.with_logical_partitioning(bert_init(), ("rel_buckets", "heads")),
                            (cfg.rel_pos_bins, cfg.num_heads), jnp.float32)
      # (1, n, n) the same for every row of one example per block; (B, n, n) per example when packed.
      buckets = relative_position_buckets(jnp.arange(length)[None] if positions is None else positions,
                                          cfg.max_positions, cfg.rel_pos_bins, cfg.max_rel_pos)
      bias = jnp.transpose(rel_bias[buckets], (0, 3, 1, 2)).astype(cfg.activation_dtype)
    key_mask = (~padding_mask)[:, None, None, :]
    if segment_ids is not None:
      key_mask = key_mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # (B, 1, n, n)
    return TransformerStack(cfg, deterministic=True, name="stack")(x, key_mask, bias)


class ProjectedLMHead(nn.Module):
  """LMHead at decoder width C_dec tied to a (V, C_enc) embedding: Dense -> GELU -> LN -> Linear(C_dec ->
  C_enc, no bias) -> E^T + bias, as the official AELMHead with `embed_linear` when the widths differ."""

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

  `__call__(batch (B, n) tokens or packed dict, mask_rng) -> (loss_sum, weight, metrics)`
  = `select_masks` + `loss_given_masks`. max_examples: the most examples one block holds (1 = one example
  per block); sets the static mask and kept bounds.
  """

  cfg: ModelConfig  # encoder
  decoder_cfg: ModelConfig
  mask_prob: float
  options: Options = Options()
  deterministic: bool = True
  max_examples: int = 1

  def setup(self):
    self.encoder = Encoder(self.cfg, self.deterministic, name="encoder")
    widths_differ = self.decoder_cfg.d_model != self.cfg.d_model
    self.decoder = Decoder(self.decoder_cfg, project=widths_differ, rel_pos=self.options.decoder_rel_pos,
                           name="decoder")
    head_cls = ProjectedLMHead if widths_differ else LMHead
    self.lm_head = head_cls(self.decoder_cfg, name="lm_head")

  def decoder_input(self, batch, is_masked: jax.Array, capacity: int | None = None):
    """(B, n, C_enc) decoder input and the (B, n) overflow mask, for a given selection.

    At kept positions it holds the encoder's outputs, which never depend on masked tokens' identities.
    `capacity` is the compacted encoder length: `max_kept` (training's bound) by default; inference,
    which may mask fewer slots than training, passes n.
    """
    opts = self.options
    tokens, segment_ids, positions = split_batch(batch)
    is_pad = padding_of(tokens, segment_ids)
    if opts.mask_in_encoder:
      states = self.encoder(jnp.where(is_masked, vocab.MASK, tokens), positions=positions, padding_mask=is_pad,
                            segment_ids=segment_ids)
      overflow = jnp.zeros_like(is_masked)
    else:
      capacity = capacity or max_kept(self.mask_prob, tokens.shape[1], self.max_examples)
      view = compact_kept(tokens, is_masked, capacity, segment_ids, positions)
      compact_states = self.encoder(view.tokens, positions=deletion_positions(view) if opts.no_pos_align
                                    else view.positions, padding_mask=view.padding, segment_ids=view.segment_ids)
      states, overflow = restore_positions(compact_states, view.inverse), view.overflow
    mask_row = None if opts.no_fill_mask else self.encoder.embed(jnp.asarray(vocab.MASK))
    return fill_decoder_input(states, is_masked, is_pad | overflow, mask_row), overflow

  def decode(self, decoder_input: jax.Array, is_pad: jax.Array, segment_ids: jax.Array | None = None,
             positions: jax.Array | None = None) -> jax.Array:
    """(B, n, C_dec) decoder states over the full block (its own positions, or the encoder's if shared).

    Packed blocks pass their segment_ids and per-example positions (B, n).
    """
    pos_table = self.encoder.pos_embed.embedding if self.options.share_pos_emb else None
    return self.decoder(decoder_input, is_pad, pos_table, positions, segment_ids)

  def predict(self, inputs, positions_to_predict):
    """Logits (B, P, V) at given positions of an input (token array or packed dict) with [MASK] there.

    For the API / analyses. Inference may mask fewer slots than training, so the encoder keeps room for
    every token (capacity n).
    """
    tokens, segment_ids, positions = split_batch(inputs)
    dec_in, _ = self.decoder_input(inputs, tokens == vocab.MASK, capacity=tokens.shape[1])
    hidden = self.decode(dec_in, padding_of(tokens, segment_ids), segment_ids, positions)
    gathered = jnp.take_along_axis(hidden, positions_to_predict[..., None], axis=1)
    return self.lm_head(gathered, self.encoder.embedding)

  def __call__(self, batch, mask_rng):
    return self.loss_and_states(batch, mask_rng)[:3]

  def select_masks(self, batch, rng) -> MaskSelection:
    """The positions to predict, per example (masking.py)."""
    tokens, segment_ids, _ = split_batch(batch)
    return select_masked_positions(tokens, rng, self.mask_prob, segment_ids, self.max_examples)

  def loss_given_masks(self, batch, selection: MaskSelection):
    """(loss_sum, weight, metrics) for a given selection (equivalence tests)."""
    return self.loss_and_states(batch, None, selection)[:3]

  def loss_and_states(self, batch, mask_rng, selection: MaskSelection | None = None):
    """`__call__`'s (loss_sum, weight, metrics) plus {'decoder_input': (B, n, C_enc), 'is_masked': (B, n)}.

    `selection` given: used instead of drawing one from mask_rng.
    """
    if selection is None:
      selection = self.select_masks(batch, mask_rng)
    tokens, segment_ids, positions = split_batch(batch)
    dec_in, overflow = self.decoder_input(batch, selection.is_masked)
    hidden = self.decode(dec_in, padding_of(tokens, segment_ids), segment_ids, positions)
    gathered = jnp.take_along_axis(hidden, selection.indices[..., None], axis=1)  # (B, M_max, C_dec)
    logits = self.lm_head(gathered, self.encoder.embedding)
    targets = jnp.take_along_axis(tokens, selection.indices, axis=1)
    loss_sum, count, metrics = masked_token_metrics(logits, targets, selection.valid)
    # Kept tokens that did not fit in K_max, per example (a bare block array: per row): 0 unless a block is
    # malformed (see `max_kept`).
    examples = tokens.shape[0] if segment_ids is None else jnp.sum(jnp.max(segment_ids, axis=1))
    metrics["kept_overflow"] = (jnp.sum(overflow).astype(jnp.float32), jnp.float32(examples))
    return loss_sum, count, metrics, {"decoder_input": dec_in, "is_masked": selection.is_masked}


# ----------------------------------------------------------------------------------------------
# Config -> model, validation, encoder hand-off
# ----------------------------------------------------------------------------------------------


def options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.maelm` merged over `DEFAULTS`; unknown keys are an error."""
  return base.read_options(config, "maelm", DEFAULTS)


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
  knobs = options(config)
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
    raise ValueError("maelm.share_pos_emb needs decoder_dim == encoder d_model (the release ignores it otherwise)")
  if knobs.mask_in_encoder and knobs.no_pos_align:
    raise ValueError("maelm.no_pos_align has no effect with maelm.mask_in_encoder (nothing is removed)")


def make_model(config: ml_collections.ConfigDict, deterministic: bool) -> MAELMModel:
  validate(config)
  knobs = options(config)
  enc = base.model_config(config)
  flags = Options(**{f.name: bool(knobs[f.name]) for f in dataclasses.fields(Options)})
  return MAELMModel(enc, decoder_config(enc, knobs), float(config.mask_prob), flags, deterministic,
                    base.max_examples_per_block(config))


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
  knobs = options(config)
  dec = decoder_config(base.model_config(config), knobs)
  examples = base.max_examples_per_block(config)
  m_max = max_masked(config.mask_prob, n, examples)
  k_max = n if knobs.mask_in_encoder else max_kept(config.mask_prob, n, examples)
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
    options=options, flops=train_flops, masked_log_probs=masked_log_probs, packed_batches=True,
    rank_groups=base.RankGroups(rank_groups),
    export_note=("MAE-LM predicts masked tokens with its decoder on top of this encoder; the decoder and LM head "
                 "are not exported, so this folder gives encoder states (for fine-tuning / features), not mask "
                 "filling.")))
