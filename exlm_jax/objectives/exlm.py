"""ExLM: [MASK] positions expanded into k states, trained with a DAG marginal likelihood.

docs/design.md §2, §4, §5. Per example, inside the jitted step:
  1. select m positions (masking.py; <s>, </s>, <pad> never selected) and replace them by [MASK];
  2. expand E = m + 2 groups -- <s> (slot 0), every masked slot, the final </s> (last real slot) --
     into k consecutive slots carrying the same token id; the rotary coordinates are (original
     position, copy index) with copy index 1..k inside a group and 0 for ordinary tokens;
  3. run the encoder on the expanded sequence, padded to L_max = n + (k - 1) G_max (G_max = M_max + 2);
  4. gather the k E expanded states into a compact DAG (padded to S_max = k G_max vertices), vertex
     j = g k + c being copy c of group g; emissions log P_u(y_i) of the targets
     Y = [<s>, masked tokens in order, </s>] (logits only at the S_max states) and transitions from
     the gated multi-head link head (docs/design.md §4.4);
  5. per-example loss -log sum_paths P(Y, path) / E (objectives/dag.py); the batch loss is the mean
     over examples, so `weight` = number of non-empty rows.
Ablations (`config.exlm`): `num_copies` k; `transitions="ctc"` (w/o transitions: every group explains
its own target by CTC over its k states, docs/design.md §4.5); `positions="rope1d_shared"` (w/o 2-D RoPE:
copies share the original position, copy index 0 everywhere); `max_transition_length` (sparse DAG).
Fine-tuning uses only the encoder, without expansion (copy index 0): `encoder_params`.

Packed blocks (a batch dict with segment_ids / positions, objectives/segments.py; at most X =
data.max_examples_per_block examples per block): masks are drawn per example; each example expands its
own <s>, masked slots and final </s> at its own positions and keeps its segment id, so the encoder
attends inside the example; the block is padded to L_max = n + (k - 1) G_max(X) with G_max(X) = M_max(X)
+ 2 X. Each example is its own DAG: row b X + j of a (B X, G1, S1) batch (G1 = G_max(1), S1 = k G1, the
one-example bounds), gathered from the block's LM logits at its k G_max(X) expanded states, so no
transition crosses examples. The link head's slot table is indexed by the slot inside the example's own
expanded sequence (0 at its first <s> copy), as if it were alone: the table keeps the one-example size
L_max(1) and a packed batch computes the loss, weight (= examples) and gradients of the same examples one
per block. An example past the bounds stays unexpanded context, is not scored and is counted in the
`overflow_examples` metric. Bare token arrays run the one-example-per-block computation unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from exlm_jax.data import vocab
from exlm_jax.models import flops
from exlm_jax.models.encoder import Encoder, ModelConfig, _dense, bert_init
from exlm_jax.models.heads import LMHead
from exlm_jax.objectives import base, dag
from exlm_jax.objectives.masking import MaskSelection, max_masked, select_masked_positions
from exlm_jax.objectives.segments import split_batch

Array = jax.Array

TRANSITIONS = ("dag", "ctc")
POSITIONS = ("rope2d", "rope1d_shared")
PREDICT_COPIES = ("mixture", "first")  # predict_masked: the mixture of a [MASK]'s k copies, or its first copy
CTC_BLANK = vocab.UNK  # the official CTC variant's blank is <unk>


# `config.exlm`: a config writes only what it changes; `options(config)` merges these defaults over it.
DEFAULTS = dict(
    num_copies=4,  # k: states per expanded group (`--ext-state-num`); 1 = one state per target
    transitions="dag",  # "dag" | "ctc" (ablation "w/o transitions")
    positions="rope2d",  # "rope2d" | "rope1d_shared" (ablation "w/o 2D RoPE": copy index 0)
    max_transition_length=-1,  # largest vertex-index jump u -> v (sparse DAG); -1 = unlimited
    max_link_positions=-1,  # rows of the link head's slot table; -1 = the expanded-length bound
)


def options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.exlm` merged over `DEFAULTS`; unknown keys are an error."""
  return base.read_options(config, "exlm", DEFAULTS)


# ----------------------------------------------------------------------------------------------
# Static sizes and index construction
# ----------------------------------------------------------------------------------------------


def max_groups(mask_prob: float, seq_len: int, max_examples: int = 1) -> int:
  """G_max: expanded groups (= targets) of one block of `seq_len` slots holding <= max_examples examples:
  its M_max masked slots (masking.max_masked) + every example's <s> and final </s>; at most seq_len."""
  return min(max_masked(mask_prob, seq_len, max_examples) + 2 * max_examples, seq_len)


def max_expanded_length(mask_prob: float, seq_len: int, num_copies: int, max_examples: int = 1) -> int:
  """L_max = n + (k - 1) G_max, the static length of a block's expanded sequence.

  With max_examples = 1 it also bounds one example's own expanded length inside a packed block (an
  example has at most n slots and max_groups(p, n) groups): the size of the link head's slot table.
  """
  return seq_len + (num_copies - 1) * max_groups(mask_prob, seq_len, max_examples)


def max_vertices(mask_prob: float, seq_len: int, num_copies: int, max_examples: int = 1) -> int:
  """S_max = k G_max: expanded states of one block, where the LM head runs.

  Each example's own DAG is one row of max_vertices(mask_prob, seq_len, num_copies) vertices (the
  one-example bound); a block holding <= max_examples examples has max_examples such rows.
  """
  return num_copies * max_groups(mask_prob, seq_len, max_examples)


class ExampleRows(NamedTuple):
  """Each example's own DAG as one row: row r = b X + j holds example j + 1 of block b (R = B X rows,
  X = max_examples; X = 1: row b is block b). Indices point into the block's groups / vertices, so
  per-example arrays are gathers of block-level ones; G1 = S1 / k is the one-example group bound."""

  block: Array  # (R,) int32 block row of the example
  groups: Array  # (R, G1) int32 index of the example's i-th target in its block's groups; 0 when invalid
  vertices: Array  # (R, S1) int32 index of its u-th vertex in its block's vertices; 0 when invalid
  target_valid: Array  # (R, G1) bool
  vertex_valid: Array  # (R, S1) bool
  num_targets: Array  # (R,) int32 E = m + 2 (0 for an empty row)
  num_vertices: Array  # (R,) int32 k E
  num_tokens: Array  # (R,) int32 the example's slots (<s> ... </s>)
  length: Array  # (R,) int32 its expanded length: num_tokens + (k - 1) E


class Expansion(NamedTuple):
  """Index arrays of one expanded batch: L = n + (k - 1) G slots, S = k G vertices per block."""

  tokens: Array  # (B, L) int32 encoder input: [MASK] at masked groups, <pad> in the tail
  positions: Array  # (B, L) int32 orig(p), the first rotary coordinate (per example in packed blocks)
  copy_index: Array  # (B, L) int32 1..k inside expanded groups, 0 elsewhere
  is_ext: Array  # (B, L) bool, slot belongs to an expanded group
  padding_mask: Array  # (B, L) bool, True at <pad>
  length: Array  # (B,) int32 real expanded length: real tokens + (k - 1) E
  vertex_slot: Array  # (B, S) int32 slot of vertex g k + c (copy c of group g); 0 when invalid
  vertex_valid: Array  # (B, S) bool
  targets: Array  # (B, G) int32 original token of group g: [<s>, masked tokens, </s>] per example; <pad> after
  target_valid: Array  # (B, G) bool
  num_targets: Array  # (B,) int32 E = m + 2 (0 for an all-<pad> row); the sum over a packed block's examples
  num_vertices: Array  # (B,) int32 k E
  segment_ids: Array  # (B, L) int32 example of each expanded slot (1..X), 0 at <pad>
  link_slot: Array  # (B, S) int32 vertex slot inside its own example's expanded sequence (link-table row)
  examples: ExampleRows  # each example's own DAG
  num_examples: Array  # (B,) int32 examples in the block (its largest segment id)
  num_dropped: Array  # (B,) int32 of those, examples not expanded: past max_examples or the group bounds


def segment_edges(segment_ids: Array) -> tuple[Array, Array]:
  """(first, last) (B, n) bool: each example's first and last slot (segment 0 = padding has none)."""
  before = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
  after = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
  real = segment_ids > 0
  return real & (segment_ids != before), real & (segment_ids != after)


def expanded_slots(tokens: Array, is_masked: Array, segment_ids: Array | None = None) -> Array:
  """(B, n) bool: slots expanded into k copies -- every example's first slot (<s>), its masked slots and
  its last slot (</s>). segment_ids None: one example per block, slot 0 and the last real slot."""
  if segment_ids is not None:
    first, last = segment_edges(segment_ids)
    return (segment_ids > 0) & (is_masked | first | last)
  real = tokens != vocab.PAD
  last = jnp.sum(real, axis=-1) - 1
  slot = jnp.arange(tokens.shape[1])
  return real & (is_masked | (slot == 0)[None, :] | (slot[None, :] == last[:, None]))


def scored_examples(tokens: Array, is_masked: Array, segment_ids: Array, max_examples: int, num_groups_max: int,
                    example_groups_max: int) -> tuple[Array, Array, Array]:
  """The examples of packed blocks that are expanded and scored: 1..X, in order, while they fit the bounds
  (at most example_groups_max groups each, num_groups_max in the block). Returns (scored (B, n) int32: the
  slot's segment id if its example is scored, else 0; groups (B, X); slots (B, X)), 0 for unscored examples."""
  example = jnp.where(segment_ids <= max_examples, segment_ids, 0)
  member = example[..., None] == jnp.arange(1, max_examples + 1)  # (B, n, X)
  groups = jnp.sum(member & expanded_slots(tokens, is_masked, example)[..., None], axis=1, dtype=jnp.int32)
  kept = (groups <= example_groups_max) & (jnp.cumsum(groups, axis=1) <= num_groups_max)
  scored = jnp.where(jnp.take_along_axis(kept, jnp.maximum(example, 1) - 1, axis=1), example, 0)
  return scored, groups * kept, jnp.sum(member, axis=1, dtype=jnp.int32) * kept


def expand(tokens: Array, is_masked: Array, num_copies: int, num_groups_max: int, segment_ids: Array | None = None,
           positions: Array | None = None, max_examples: int = 1, example_groups_max: int | None = None) -> Expansion:
  """Builds the expanded sequence and its DAGs from token blocks (B, n) and the mask (B, n).

  Widths w_i = 1 + (k - 1) e_i, offsets s_i = sum_{j<i} w_j; slot p belongs to the i with
  s_i <= p < s_i + w_i and is copy p - s_i + 1 of it if e_i. Gathers only, no scatter.

  Packed blocks (objectives/segments.py): segment_ids / positions (B, n), padding only after the last
  example. Every example expands its own <s>, masked slots and </s>; expanded slots keep their example's
  segment id and per-example position. `examples` lays each example's groups out as its own row of
  example_groups_max groups (G1; num_groups_max when max_examples = 1). An example past `max_examples`,
  with more than G1 groups, or whose groups would pass the block's num_groups_max stays in the sequence
  unexpanded (its own segment, no targets) and is counted in `num_dropped`: the static shapes hold and
  nothing is lost silently. segment_ids None: one example per block, the original index construction
  (max_examples and example_groups_max unused; row b of `examples` is block b).
  """
  batch, seq_len = tokens.shape
  k, num_x = num_copies, max_examples
  g1 = num_groups_max if num_x == 1 or example_groups_max is None else example_groups_max  # unused when bare
  length_max = seq_len + (k - 1) * num_groups_max
  packed = segment_ids is not None
  if packed:
    real = segment_ids > 0
    scored, groups, num_tokens = scored_examples(tokens, is_masked, segment_ids, num_x, num_groups_max, g1)
    ext = expanded_slots(tokens, is_masked, scored)
    num_examples = jnp.max(segment_ids, axis=-1).astype(jnp.int32)
  else:
    real = tokens != vocab.PAD
    ext = expanded_slots(tokens, is_masked)
  width = 1 + (k - 1) * ext.astype(jnp.int32)
  ends = jnp.cumsum(width, axis=-1)
  starts = ends - width
  num_groups = jnp.sum(ext, axis=-1, dtype=jnp.int32)
  length = jnp.sum(real, axis=-1, dtype=jnp.int32) + (k - 1) * num_groups

  slot = jnp.arange(length_max, dtype=jnp.int32)
  orig = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)  # #{i : ends_i <= p}
  orig = jnp.minimum(orig, seq_len - 1).astype(jnp.int32)
  pad = slot[None, :] >= length[:, None]
  at_orig = lambda a: jnp.take_along_axis(a, orig, axis=1)
  is_ext = at_orig(ext) & ~pad
  copy_index = jnp.where(is_ext, slot[None, :] - at_orig(starts) + 1, 0)
  inputs = jnp.where(is_masked, vocab.MASK, tokens)

  # Groups in slot order: a stable argsort puts the expanded slots first.
  group_slot = jnp.argsort(~ext, axis=-1, stable=True)[:, :num_groups_max]
  target_valid = jnp.arange(num_groups_max)[None, :] < num_groups[:, None]
  targets = jnp.where(target_valid, jnp.take_along_axis(tokens, group_slot, axis=1), vocab.PAD)
  group_start = jnp.take_along_axis(starts, group_slot, axis=1)
  vertex_slot = (group_start[:, :, None] + jnp.arange(k)).reshape(batch, k * num_groups_max)
  vertex_valid = jnp.repeat(target_valid, k, axis=1)
  if packed:
    # The expanded slot where each slot's example starts (starts grow along the row: a running max).
    example_start = jax.lax.cummax(jnp.where(segment_edges(segment_ids)[0], starts, 0), axis=1)
    link_slot = vertex_slot - jnp.repeat(jnp.take_along_axis(example_start, group_slot, axis=1), k, axis=1)
    examples = example_rows(groups, num_tokens, k, g1)
    num_dropped = num_examples - jnp.sum(groups > 0, axis=1, dtype=jnp.int32)
  else:  # one example per block: its row is the block
    link_slot = vertex_slot
    examples = ExampleRows(
        block=jnp.arange(batch, dtype=jnp.int32),
        groups=jnp.where(target_valid, jnp.arange(num_groups_max, dtype=jnp.int32), 0),
        vertices=jnp.where(vertex_valid, jnp.arange(k * num_groups_max, dtype=jnp.int32), 0),
        target_valid=target_valid, vertex_valid=vertex_valid, num_targets=num_groups, num_vertices=k * num_groups,
        num_tokens=jnp.sum(real, axis=-1, dtype=jnp.int32), length=length)
    num_examples = jnp.any(real, axis=-1).astype(jnp.int32)
    num_dropped = jnp.zeros_like(num_examples)
  return Expansion(
      tokens=jnp.where(pad, vocab.PAD, at_orig(inputs)),
      positions=jnp.where(pad, 0, orig if positions is None else at_orig(positions)),
      copy_index=copy_index.astype(jnp.int32),
      is_ext=is_ext,
      padding_mask=pad,
      length=length,
      vertex_slot=jnp.where(vertex_valid, vertex_slot, 0).astype(jnp.int32),
      vertex_valid=vertex_valid,
      targets=targets.astype(jnp.int32),
      target_valid=target_valid,
      num_targets=num_groups,
      num_vertices=k * num_groups,
      segment_ids=jnp.where(pad, 0, at_orig(segment_ids if packed else real.astype(jnp.int32))).astype(jnp.int32),
      link_slot=jnp.where(vertex_valid, link_slot, 0).astype(jnp.int32),
      examples=examples,
      num_examples=num_examples,
      num_dropped=num_dropped,
  )


def example_rows(groups: Array, num_tokens: Array, num_copies: int, example_groups_max: int) -> ExampleRows:
  """Each example's own row from its groups (B, X) and slots (B, X): its targets are the consecutive block
  groups from its offset sum_{j<e} groups_j on, its vertices their k copies."""
  batch, num_x = groups.shape
  k, g1, num_rows = num_copies, example_groups_max, batch * num_x
  target_valid = (jnp.arange(g1)[None, None, :] < groups[..., None]).reshape(num_rows, g1)
  offset = (jnp.cumsum(groups, axis=1) - groups).reshape(num_rows, 1)
  row_groups = jnp.where(target_valid, offset + jnp.arange(g1), 0)
  vertex_valid = jnp.repeat(target_valid, k, axis=1)
  vertices = (row_groups[..., None] * k + jnp.arange(k)).reshape(num_rows, k * g1)
  num_targets, num_tokens = groups.reshape(num_rows), num_tokens.reshape(num_rows)
  return ExampleRows(
      block=jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_x),
      groups=row_groups.astype(jnp.int32),
      vertices=jnp.where(vertex_valid, vertices, 0).astype(jnp.int32),
      target_valid=target_valid, vertex_valid=vertex_valid, num_targets=num_targets, num_vertices=k * num_targets,
      num_tokens=num_tokens, length=num_tokens + (k - 1) * num_targets)


def gather_rows(block_array: Array, index: Array) -> Array:
  """Per-example rows of a block-level array: (B, A, ...) at index (B X, A') -> (B X, A', ...), row r reading
  block r // X only (a gather inside each block, so a batch-sharded array stays local to its devices)."""
  batch, num_rows, width = block_array.shape[0], index.shape[0], index.shape[1]
  flat = index.reshape((batch, num_rows // batch * width) + (1,) * (block_array.ndim - 2))
  picked = jnp.take_along_axis(block_array, flat, axis=1)
  return picked.reshape((num_rows, width) + block_array.shape[2:])


# ----------------------------------------------------------------------------------------------
# Emissions and transitions
# ----------------------------------------------------------------------------------------------


def target_emissions(logits: Array, targets: Array) -> Array:
  """emit_logp[b, i, u] = log softmax(logits[b, u])[targets[b, i]]: (B, S, V), (B, G) -> (B, G, S)."""
  batch, num_vertices, _ = logits.shape
  index = jnp.broadcast_to(targets[:, None, :], (batch, num_vertices, targets.shape[1]))
  picked = jnp.take_along_axis(logits, index, axis=-1)  # (B, S, G)
  logp = picked - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return jnp.swapaxes(logp, 1, 2)


def allowed_transitions(vertex_valid: Array, max_transition_length: int = -1) -> Array:
  """A(u) as a (B, S, S) bool: v > u, both valid, v - u <= max_transition_length (if > 0)."""
  size = vertex_valid.shape[1]
  u = jnp.arange(size)[:, None]
  v = jnp.arange(size)[None, :]
  forward = v > u
  if max_transition_length > 0:
    forward &= v - u <= max_transition_length
  return forward[None] & vertex_valid[:, :, None] & vertex_valid[:, None, :]


def mix_transition_heads(scores: Array, gate_logits: Array, allowed: Array) -> Array:
  """log E_uv = logsumexp_c [log softmax(G_u)_c + log softmax_{v in A(u)}(s^c_u.)_v].

  scores (B, H, S, S) float32, gate_logits (B, S, H), allowed (B, S, S) -> (B, S, S) float32 with
  -inf outside A(u); rows with an empty A(u) are all -inf. Masked entries are computed on finite
  fillers and replaced afterwards, so no NaN reaches values or gradients.
  """
  allowed_heads = allowed[:, None]
  per_head = jax.nn.log_softmax(jnp.where(allowed_heads, scores, jnp.finfo(jnp.float32).min), axis=-1)
  per_head = jnp.where(allowed_heads, per_head, 0.0)
  log_gate = jax.nn.log_softmax(gate_logits.astype(jnp.float32), axis=-1)
  mixed = jax.nn.logsumexp(jnp.swapaxes(log_gate, 1, 2)[..., None] + per_head, axis=1)
  return jnp.where(allowed, mixed, -jnp.inf)


class TransitionHead(nn.Module):
  """DA-Transformer's gated multi-head link head (docs/design.md §4.4), float32 throughout.

  z_u = [h_u ; P(slot_u)] (P: learned table over expanded-sequence slots), Q = z W_Q + b and
  K = z W_K + b split into H chunks of Dh, gate logits z W_G + b (H), per-chunk scores
  <Q_u, K_v> / sqrt(Dh). Call: h (B, S, D), slots (B, S), allowed (B, S, S) -> log E (B, S, S).
  """

  cfg: ModelConfig
  num_positions: int

  @nn.compact
  def __call__(self, h: Array, slots: Array, allowed: Array) -> Array:
    cfg = dataclasses.replace(self.cfg, dtype="float32")
    table = nn.Embed(self.num_positions, cfg.d_model, param_dtype=jnp.float32,
                     embedding_init=nn.with_logical_partitioning(bert_init(), ("positions", "embed")),
                     name="position_embed")
    z = jnp.concatenate([h.astype(jnp.float32), table(slots)], axis=-1)  # (B, S, 2D)
    chunks = (cfg.num_heads, cfg.head_dim)
    q = _dense(chunks, ("embed", "heads", "kv"), cfg, "query")(z)
    k = _dense(chunks, ("embed", "heads", "kv"), cfg, "key")(z)
    gate_logits = _dense(cfg.num_heads, ("embed", "heads"), cfg, "gate")(z)
    scores = jnp.einsum("buhd,bvhd->bhuv", q, k, preferred_element_type=jnp.float32)
    return mix_transition_heads(scores / math.sqrt(cfg.head_dim), gate_logits, allowed)


def group_ctc_log_likelihood(target_logp: Array, blank_logp: Array) -> Array:
  """CTC of one label over the k states of each group: log sum over blank^a y^b blank^c, b >= 1.

  target_logp, blank_logp (B, G, k) -> (B, G). Enumerates the k (k + 1) / 2 runs [first, last] of
  the label. A target equal to the blank is scored by the same formula (P(blank) in both roles).
  """
  k = target_logp.shape[-1]
  t = jnp.arange(k)
  first, last = t[:, None, None], t[None, :, None]
  in_run = (first <= t) & (t <= last)  # (first, last, frame)
  frames = jnp.where(in_run, target_logp[..., None, None, :], blank_logp[..., None, None, :])
  runs = jnp.where(first[..., 0] <= last[..., 0], jnp.sum(frames, axis=-1), -jnp.inf)
  return jax.nn.logsumexp(runs, axis=(-2, -1))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class ExLMOutputs(NamedTuple):
  """R = B X rows, one per example (Expansion.examples); R = B for one example per block."""

  expansion: Expansion
  hidden: Array  # (B, L, D) encoder output on the expanded sequence
  logits: Array  # (B, S, V) float32 LM logits at the block's DAG vertices only
  emit_logp: Array  # (R, G1, S1) log P_u(y_i) of each example's own DAG
  trans_logp: Array | None  # (R, S1, S1) log E_uv ("dag"); None for "ctc"
  per_example_loss: Array  # (R,) -log-likelihood / E; 0 for empty or infeasible rows


class ExLMModel(nn.Module):
  """Encoder + tied LM head + link head; `__call__(batch, mask_rng) -> (loss_sum, weight, metrics)`.

  batch: token blocks (B, n), one example per block (exactly the original computation), or a packed
  batch dict {'tokens', 'segment_ids', 'positions'} (objectives/segments.py) of <= max_examples
  examples per block (data.max_examples_per_block). `__call__` = `select_masks` + `loss_given_masks`.
  Packed, each example is expanded, attended and scored as if it were alone: the encoder attends inside
  its segment at its own positions, and it is its own DAG row whose link-table slots restart at 0 at its
  first <s> copy -- so the link table is sized by the one-example expanded length and a packed batch gives
  the loss, weight, metrics and gradients of the same examples one per block (tests/test_packing_exlm.py).
  """

  cfg: ModelConfig
  mask_prob: float
  num_copies: int = 4
  transitions: str = "dag"
  positions: str = "rope2d"
  max_transition_length: int = -1
  max_link_positions: int = -1
  deterministic: bool = True
  max_examples: int = 1

  def setup(self):
    self.encoder = Encoder(self.cfg, self.deterministic, name="encoder")
    self.lm_head = LMHead(self.cfg, name="lm_head")
    if self.transitions == "dag":
      self.transition_head = TransitionHead(self.cfg, self.max_link_positions, name="transition_head")

  def examples_per_block(self, segment_ids: Array | None) -> int:
    """X: 1 for a bare token array (one example per block), else max_examples."""
    return 1 if segment_ids is None else self.max_examples

  def expanded_logits(self, tokens, is_masked: Array, num_groups: int):
    """Expansion of (B, n) blocks (or a packed batch dict) into `num_groups` padded groups of k copies per
    block, the encoder's (B, L', D) states, the (B, S, D) states at the S = k * num_groups vertices and
    their (B, S, V) vocabulary logits. Packed: examples' rows of max_groups(mask_prob, n) groups each."""
    tokens, segment_ids, positions = split_batch(tokens)
    num_x = self.examples_per_block(segment_ids)
    example_groups = num_groups if num_x == 1 else max_groups(self.mask_prob, tokens.shape[1])
    ex = expand(tokens, is_masked, self.num_copies, num_groups, segment_ids, positions, num_x, example_groups)
    copy_index = ex.copy_index if self.positions == "rope2d" else jnp.zeros_like(ex.copy_index)
    hidden = self.encoder(ex.tokens, ex.positions, copy_index, ex.padding_mask,
                          segment_ids=None if segment_ids is None else ex.segment_ids)
    states = jnp.take_along_axis(hidden, ex.vertex_slot[..., None], axis=1)
    return ex, hidden, states, self.lm_head(states, self.encoder.embedding)

  def forward(self, tokens, is_masked: Array) -> ExLMOutputs:
    """Everything for one fixed mask: tokens (B, n) original blocks or a packed batch dict, is_masked (B, n)."""
    block_tokens, segment_ids, _ = split_batch(tokens)
    seq_len = block_tokens.shape[1]
    num_x = self.examples_per_block(segment_ids)
    length_max = max_expanded_length(self.mask_prob, seq_len, self.num_copies)  # one example's, the link table's
    if self.transitions == "dag" and self.max_link_positions < length_max:
      raise ValueError(f"exlm.max_link_positions={self.max_link_positions} < expanded length {length_max}")
    ex, hidden, states, logits = self.expanded_logits(tokens, is_masked, max_groups(self.mask_prob, seq_len, num_x))
    rows = ex.examples
    # One example per block: its row is the block (no gathers, the original computation).
    per_example = (lambda a, index: a) if num_x == 1 else gather_rows
    emit_logp = target_emissions(logits, ex.targets)  # (B, G, S)
    if num_x > 1:
      emit_logp = jnp.take_along_axis(gather_rows(emit_logp, rows.groups), rows.vertices[:, None, :], axis=2)
    # Empty rows get a 1-target, 1-vertex problem so everything stays finite; weighted 0 below.
    num_targets = jnp.maximum(rows.num_targets, 1)
    if self.transitions == "dag":
      allowed = allowed_transitions(rows.vertex_valid, self.max_transition_length)
      link_slot = jnp.where(rows.vertex_valid, per_example(ex.link_slot, rows.vertices), 0)
      trans_logp = self.transition_head(per_example(states, rows.vertices), link_slot, allowed)
      num_vertices = jnp.where(rows.num_targets > 0, rows.num_vertices, 1)
      loss = dag.dag_loss(emit_logp, trans_logp, num_targets, num_vertices)
    else:
      trans_logp = None
      loss = self._ctc_loss(logits, ex, num_targets, per_example)
    loss = jnp.where(rows.num_targets > 0, loss, 0.0)
    return ExLMOutputs(ex, hidden, logits, emit_logp, trans_logp, loss)

  def _ctc_loss(self, logits: Array, ex: Expansion, num_targets: Array, per_example) -> Array:
    """Per-example -sum_g log CTC(y_g | group g) / E (docs/design.md §4.5); groups scored at block level."""
    batch, num_vertices, _ = logits.shape
    k = self.num_copies
    lse = jax.nn.logsumexp(logits, axis=-1)
    vertex_targets = jnp.repeat(ex.targets, k, axis=1)
    target_logp = jnp.take_along_axis(logits, vertex_targets[..., None], axis=-1)[..., 0] - lse
    blank_logp = logits[..., CTC_BLANK] - lse
    grouped = lambda x: x.reshape(batch, num_vertices // k, k)
    group_ll = per_example(group_ctc_log_likelihood(grouped(target_logp), grouped(blank_logp)), ex.examples.groups)
    return -jnp.sum(jnp.where(ex.examples.target_valid, group_ll, 0.0), axis=-1) / num_targets

  def best_alignment(self, tokens, is_masked: Array):
    """Viterbi alignment ("dag" only): (outputs, score (R,), path (R, S1)) per example row; path[r, u] = index
    of the target vertex u emits, -1 if skipped (objectives/dag.py `dag_best_path`)."""
    if self.transitions != "dag":
      raise ValueError(f"best_alignment needs exlm.transitions='dag', not {self.transitions!r}")
    out = self.forward(tokens, is_masked)
    rows = out.expansion.examples
    num_vertices = jnp.where(rows.num_targets > 0, rows.num_vertices, 1)
    score, path = dag.dag_best_path(out.emit_logp, out.trans_logp, jnp.maximum(rows.num_targets, 1), num_vertices)
    path = jnp.where(rows.vertex_valid, path, -1)
    return out, jnp.where(rows.num_targets > 0, score, -jnp.inf), path

  def alignment(self, tokens: Array, is_masked: Array) -> base.Alignment:
    """The analyses' view of one fixed mask ("dag" only): Viterbi path and posteriors gamma_i(u) (the
    gradient of the total log-likelihood with respect to the emissions) over the k copies of every group."""
    out, score, path = self.best_alignment(tokens, is_masked)
    ex = out.expansion
    num_targets = jnp.maximum(ex.num_targets, 1)
    num_vertices = jnp.where(ex.num_targets > 0, ex.num_vertices, 1)

    def total_ll(emit):
      ll = dag.dag_log_likelihood(emit, out.trans_logp, num_targets, num_vertices)
      return jnp.sum(jnp.where(jnp.isfinite(ll), ll, 0.0))

    k, size = self.num_copies, ex.vertex_slot.shape[1]
    at_vertices = lambda a: jnp.take_along_axis(a, ex.vertex_slot, axis=1)  # noqa: E731
    target_index = jnp.arange(ex.targets.shape[1])[None, :]
    return base.Alignment(
        state_logits=out.logits, state_valid=ex.vertex_valid,
        state_group=jnp.broadcast_to(jnp.arange(size) // k, ex.vertex_slot.shape).astype(jnp.int32),
        state_copy=jnp.broadcast_to(jnp.arange(size) % k + 1, ex.vertex_slot.shape).astype(jnp.int32),
        state_slot=at_vertices(ex.positions), state_token=at_vertices(ex.tokens),
        targets=ex.targets, target_valid=ex.target_valid,
        target_masked=ex.target_valid & (target_index >= 1) & (target_index < ex.num_targets[:, None] - 1),
        emit_logp=out.emit_logp, transitions=out.trans_logp, path=path,
        posteriors=jax.grad(total_ll)(out.emit_logp), score=score, num_targets=ex.num_targets,
        num_states=ex.num_vertices)

  def __call__(self, batch, mask_rng: Array):
    return self.loss_given_masks(batch, self.select_masks(batch, mask_rng))

  def select_masks(self, batch, rng: Array) -> MaskSelection:
    """The positions to expand as [MASK] groups, per example (masking.py)."""
    tokens, segment_ids, _ = split_batch(batch)
    return select_masked_positions(tokens, rng, self.mask_prob, segment_ids, self.examples_per_block(segment_ids))

  def loss_given_masks(self, batch, selection: MaskSelection):
    """(loss_sum, weight = examples scored, metrics) for a given selection. Packed batches also report
    overflow_examples: the fraction of examples not scored because a block held more than the bounds."""
    out = self.forward(batch, selection.is_masked)
    ex = out.expansion
    rows = ex.examples
    scored = (rows.num_targets > 0).astype(jnp.float32)
    num_rows = jnp.sum(scored)
    loss_sum = jnp.sum(out.per_example_loss)
    metrics = {
        "loss": (loss_sum, num_rows),
        "num_targets": (jnp.sum(rows.num_targets.astype(jnp.float32)), num_rows),
        "expanded_length": (jnp.sum(rows.length.astype(jnp.float32) * scored), num_rows),
        "length": (jnp.sum(rows.num_tokens.astype(jnp.float32)), num_rows),
    }
    if split_batch(batch)[1] is not None:
      metrics["overflow_examples"] = (jnp.sum(ex.num_dropped.astype(jnp.float32)),
                                      jnp.sum(ex.num_examples.astype(jnp.float32)))
    return loss_sum, num_rows, metrics


# ----------------------------------------------------------------------------------------------
# Objective plumbing
# ----------------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for an ExLM config that cannot work."""
  opts = options(config)
  k = opts.num_copies
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"exlm.num_copies={k!r}: need an integer k >= 1")
  if opts.transitions not in TRANSITIONS:
    raise ValueError(f"exlm.transitions={opts.transitions!r}; choose one of {TRANSITIONS}")
  if opts.positions not in POSITIONS:
    raise ValueError(f"exlm.positions={opts.positions!r}; choose one of {POSITIONS}")
  if config.model.positions != "rope2d":
    raise ValueError(f"model.positions={config.model.positions!r}: ExLM needs 'rope2d' (copies differ only by "
                     "the copy-index rotation); use exlm.positions='rope1d_shared' for the no-2D-RoPE ablation")
  if not 0.0 < config.mask_prob < 1.0:
    raise ValueError(f"mask_prob={config.mask_prob}: need 0 < mask_prob < 1")
  jump = opts.max_transition_length
  if jump != -1 and jump < 2 * k - 1:
    raise ValueError(f"exlm.max_transition_length={jump}: need -1 (unlimited) or >= 2k-1 = {2 * k - 1}, "
                     "else a row without masks has no path from the first <s> copy to the last </s> copy")
  length_max = max_expanded_length(config.mask_prob, config.seq_len, k)
  if opts.max_link_positions != -1 and opts.max_link_positions < length_max:
    raise ValueError(f"exlm.max_link_positions={opts.max_link_positions} < the expanded length bound "
                     f"{length_max} (seq_len={config.seq_len}, k={k}); use -1 to size it automatically")


def make_model(config: ml_collections.ConfigDict, deterministic: bool) -> ExLMModel:
  validate(config)
  opts = options(config)
  link_positions = opts.max_link_positions
  if link_positions == -1:
    link_positions = max_expanded_length(config.mask_prob, config.seq_len, opts.num_copies)
  return ExLMModel(
      cfg=base.model_config(config),
      mask_prob=config.mask_prob,
      num_copies=opts.num_copies,
      transitions=opts.transitions,
      positions=opts.positions,
      max_transition_length=opts.max_transition_length,
      max_link_positions=link_positions,
      deterministic=deterministic,
      max_examples=base.max_examples_per_block(config),
  )


def infer_model_config(encoder_tree) -> ModelConfig:
  """The ModelConfig an Encoder param tree was built with, read off its parameter shapes."""
  tree = nn.unbox(encoder_tree)
  try:
    vocab_size, d_model = tree["token_embed"]["embedding"].shape
    stack = tree["stack"]
    scanned = "layers" in stack
    block = stack["layers"] if scanned else stack["layer_0"]
    lead = 1 if scanned else 0  # scanned blocks stack their params on a leading layer axis
    num_layers = block["mlp"]["wi"]["kernel"].shape[0] if scanned else sum(n.startswith("layer_") for n in stack)
    num_heads = block["attention"]["query"]["kernel"].shape[lead + 1]
    mlp_dim = block["mlp"]["wi"]["kernel"].shape[-1]
  except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
    raise ValueError(f"cannot read an Encoder's shape off these params ({type(e).__name__}: {e}); "
                     "pass config= to encoder_params") from None
  extra = {}
  positions = "rope2d"
  if "pos_embed" in tree:
    positions = "absolute+relbias" if "rel_bias" in tree else "absolute"
    extra["max_positions"] = tree["pos_embed"]["embedding"].shape[0]
  if "rel_bias" in tree:
    extra["rel_pos_bins"] = tree["rel_bias"].shape[0]
  return ModelConfig(vocab_size=vocab_size, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                     mlp_dim=mlp_dim, pre_ln="final_ln" in stack, positions=positions,
                     embed_layernorm="embed_ln" in tree, scan_layers=scanned, **extra)


def encoder_params(params, config: ml_collections.ConfigDict | None = None):
  """The 'encoder' sub-tree of ExLM pretraining params, checked against a fresh Encoder's params.

  The link head and LM head are left behind; fine-tuning runs the encoder without expansion (copy
  index 0). With `config`, the expected structure comes from `config.model`; without, from the
  sub-tree's own shapes. Raises ValueError listing missing / unexpected / mis-shaped entries.
  """
  tree = base.encoder_subtree(params)
  model_cfg = base.model_config(config) if config is not None else infer_model_config(tree)
  problems = base.encoder_tree_problems(tree, model_cfg)
  if problems:
    raise ValueError("'encoder' params do not match an Encoder: " + "; ".join(problems))
  return tree


# ----------------------------------------------------------------------------------------------
# Prediction, FLOPs, analyses
# ----------------------------------------------------------------------------------------------


def masked_log_probs(copies: str = "mixture"):
  """predict_masked's rule: every [MASK] (and <s>, the final </s>) expanded into k copies with copy index
  1..k, the LM head at the copies; per [MASK] the uniform mixture of its k copies' distributions
  (copies='mixture') or the first copy's (copies='first')."""
  if copies not in PREDICT_COPIES:
    raise ValueError(f"copies={copies!r}; choose one of {PREDICT_COPIES}")

  def body(m: ExLMModel, tokens, slots):
    batch, num_slots = slots.shape
    groups = num_slots + 2  # <s>, up to num_slots [MASK]s, the final </s>
    # expand() takes its `groups` from the block's slots: a block of mostly [MASK]s (B, n < G) gets <pad> slots.
    tokens = jnp.pad(tokens, ((0, 0), (0, max(0, groups - tokens.shape[1]))), constant_values=vocab.PAD)
    _, _, _, logits = m.expanded_logits(tokens, tokens == vocab.MASK, groups)  # (B, k G, V)
    logp = jax.nn.log_softmax(logits.reshape(batch, groups, m.num_copies, -1)[:, 1:-1], axis=-1)  # masks only
    if copies == "first":
      return logp[:, :, 0]
    return jax.nn.logsumexp(logp, axis=2) - math.log(m.num_copies)

  return body


def transition_head_forward(num_vertices: int, d_model: int, num_heads: int) -> float:
  """Forward FLOPs of the link head on S vertices: Q, K (2D -> D), gate (2D -> H), S^2 D scores."""
  projections = 2 * (2 * d_model) * (2 * d_model + num_heads)
  return float(num_vertices * projections + 2 * num_vertices**2 * d_model)


def dag_train(num_targets: int, num_vertices: int) -> float:
  """FLOPs of the DAG forward + custom backward on one example (elementwise, ~4 + 8 per S^2 cell per
  target step: add, max, exp, sum forward; add, add, exp, sum, scale, accumulate backward)."""
  return float(12 * max(num_targets - 1, 0) * num_vertices**2)


def train_flops(config: ml_collections.ConfigDict, include_remat: bool) -> flops.Breakdown:
  """One block, at the static bounds the model allocates for X = base.max_examples_per_block examples
  (X = 1 unpacked): the encoder on L_max(X) = n + (k - 1) G_max(X) expanded slots, the LM head at the block's
  S_max(X) = k G_max(X) vertices and, with transitions='dag', X per-example DAG rows of the one-example bounds
  G1 = G_max(1), S1 = k G1: the link head on each row's S1 vertices plus its DAG dynamic programme
  (elementwise, quadratic in S1)."""
  m, n, p = config.model, config.seq_len, config.mask_prob
  opts = options(config)
  k = int(opts.num_copies)
  examples = base.max_examples_per_block(config)
  groups = max_groups(p, n, examples)
  length = max_expanded_length(p, n, k, examples)
  vertices = max_vertices(p, n, k, examples)
  row_groups, row_vertices = max_groups(p, n), max_vertices(p, n, k)  # each example's own DAG row
  with_dag = opts.transitions == "dag"
  return flops.Breakdown(
      encoder=flops.model_encoder_train(m, length, include_remat),
      lm_head=3 * flops.lm_head_forward(vertices, m.d_model, m.vocab_size),
      transition_head=examples * 3 * transition_head_forward(row_vertices, m.d_model, m.num_heads) if with_dag else 0.0,
      dag=examples * dag_train(row_groups, row_vertices) if with_dag else 0.0,
      shapes=(("seq_len", n), ("examples_max", examples), ("expanded_len", length), ("groups_max", groups),
              ("vertices_max", vertices), ("dag_rows", examples), ("dag_groups", row_groups),
              ("dag_vertices", row_vertices)))


def analysis_block_length(model: ExLMModel, mask_ratio: float, seq_len: int) -> int:
  """Longest block n' <= seq_len whose expanded length at `mask_ratio` fits the link head's slot table
  (sized for the training mask_prob)."""
  if model.transitions != "dag":
    return seq_len
  for n in range(seq_len, 3, -1):
    if max_expanded_length(mask_ratio, n, model.num_copies) <= model.max_link_positions:
      return n
  raise ValueError(f"mask ratio {mask_ratio} expands even a 4-slot block past the link table "
                   f"({model.max_link_positions}); use a lower --mask_ratios")


OBJECTIVE = base.register(base.Objective(
    name="exlm", title="ExLM", make_model=make_model, encoder_params=encoder_params, validate=validate,
    options=options, copies_option="num_copies", flops=train_flops, packed_batches=True,
    masked_log_probs=masked_log_probs,
    rank_groups=base.RankGroups(),  # the shared clean-input group only: ExLM's encoder without expansion
    dag=base.DagAnalysis(align=ExLMModel.alignment, block_length=analysis_block_length),
    export_note=("ExLM predicts a [MASK] by expanding it into k copies (2-D RoPE copy index) and reading them "
                 "with its LM and transition heads; those heads are not exported. The encoder runs with copy "
                 "index 0 (no expansion), exactly as exlm_jax fine-tunes it.")))
