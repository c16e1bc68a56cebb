"""MAE-LM: the encoder never sees masked tokens, gather-only reconstruction, float64 reference loss,
the K_max bound, both position schemes, the ablation knobs, encoder hand-off, configs."""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.models.encoder import Encoder, relative_bucket_table
from exlm_jax.objectives import base, maelm
from exlm_jax.objectives.masking import select_masked_positions

N, V, P = 32, 40, 0.3
LENGTHS = [32, 20, 5, 3, 2, 17, 31, 9]
REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _blocks(lengths, n=N, seed=0):
  rng = np.random.RandomState(seed)
  rows = []
  for length in lengths:
    row = np.full(n, vocab.PAD, np.int32)
    row[:length] = rng.randint(vocab.NUM_SPECIAL, V, length)
    row[0], row[length - 1] = vocab.BOS, vocab.EOS
    rows.append(row)
  return jnp.asarray(np.stack(rows))


def _config(positions="absolute+relbias", **knobs):
  config = config_lib.pretrain_config("maelm", "tiny")
  config.model.update(vocab_size=V, pre_ln=False, positions=positions, embed_layernorm=True, max_positions=64,
                      rel_pos_bins=16, max_rel_pos=24)
  config.seq_len = N
  config.mask_prob = P
  config.maelm = ml_collections.ConfigDict({"decoder_layers": 1, **knobs})
  return config


def _random_params(model, seed=0, scale=0.15):
  """Params of the right structure drawn directly (no init compile); far from the N(0, 0.02) init so a
  reference check is not blind (logits at init are ~uniform). LayerNorm scales around 1."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), base.dummy_tokens(1, N),
                                        jax.random.PRNGKey(0))["params"])
  rng = np.random.RandomState(seed)
  flat = flax.traverse_util.flatten_dict(shapes)
  flat = {path: jnp.asarray(rng.normal(0, scale, s.shape) + (path[-1] == "scale"), jnp.float32)
          for path, s in flat.items()}
  return flax.traverse_util.unflatten_dict(flat)


class _Run(NamedTuple):
  config: object
  model: maelm.MAELMModel
  params: dict
  forward: object  # jitted (params, tokens, rng) -> (loss_sum, weight, metrics, decoder input, is_masked)


@functools.lru_cache(maxsize=None)
def _setup(positions="absolute+relbias", **knobs) -> _Run:
  """One compiled forward per configuration, shared by all tests (compiles dominate the run time)."""
  config = _config(positions, **knobs)
  model = maelm.make_model(config, True)

  def forward(params, tokens, rng):
    loss_sum, weight, metrics, states = model.apply({"params": params}, tokens, rng,
                                                    method=maelm.MAELMModel.loss_and_states)
    return loss_sum, weight, metrics, states["decoder_input"], states["is_masked"]

  return _Run(config, model, _random_params(model), jax.jit(forward))


# ----------------------------------------------------------------------------------------------
# (a) the encoder never sees masked tokens
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["absolute+relbias", "rope2d"])
def test_encoder_outputs_independent_of_masked_token_identities(positions):
  run = _setup(positions)
  tokens, rng = _blocks(LENGTHS), jax.random.PRNGKey(3)
  *_, a, is_masked = run.forward(run.params, tokens, rng)
  other = jnp.asarray(np.random.RandomState(1).randint(0, V, tokens.shape))
  shift = 1 + other % (V - vocab.NUM_SPECIAL - 1)  # never a multiple of the content vocabulary size
  changed = jnp.where(is_masked, (tokens - vocab.NUM_SPECIAL + shift) % (V - vocab.NUM_SPECIAL)
                      + vocab.NUM_SPECIAL, tokens)
  assert bool(jnp.all(jnp.where(is_masked, changed != tokens, True))) and bool(is_masked.any())
  *_, b, is_masked_b = run.forward(run.params, changed, rng)
  np.testing.assert_array_equal(np.asarray(is_masked_b), np.asarray(is_masked))  # same masks
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)
  # Not vacuous: changing one KEPT content token moves the other kept positions' states.
  kept = np.asarray(~is_masked & (tokens != vocab.PAD))
  col = int(np.flatnonzero(kept[0, 1:-1])[0]) + 1
  *_, c, _ = run.forward(run.params, tokens.at[0, col].set(tokens[0, col] % (V - 1) + 1), rng)
  others = kept[0].copy()
  others[col] = False
  assert np.abs(np.asarray(c)[0][others] - np.asarray(a)[0][others]).max(-1).min() > 1e-3


# ----------------------------------------------------------------------------------------------
# (b) gather-only reconstruction == scatter
# ----------------------------------------------------------------------------------------------


def test_gather_reconstruction_equals_numpy_scatter():
  rng = np.random.RandomState(0)
  lengths = [N, 2, 3, 4, 7, 16, 31, N, 12, 5]
  tokens = _blocks(lengths)
  k_max = maelm.max_kept(P, N)

  @jax.jit
  def gather_only(states, tokens, key, mask_row):
    is_masked = select_masked_positions(tokens, key, P).is_masked
    view = maelm.compact_kept(tokens, is_masked, k_max)
    restored = maelm.restore_positions(states, view.inverse)
    blank = tokens == vocab.PAD
    return (maelm.fill_decoder_input(restored, is_masked, blank, mask_row),
            maelm.fill_decoder_input(restored, is_masked, blank, None), is_masked, view)

  for seed in range(6):
    states, mask_row = rng.randn(len(lengths), k_max, 8).astype(np.float32), rng.randn(8).astype(np.float32)
    got, got_no_fill, is_masked, view = jax.tree.map(np.asarray, gather_only(
        states, tokens, jax.random.PRNGKey(seed), mask_row))
    tok = np.asarray(tokens)
    want = np.zeros((len(lengths), N, 8), np.float32)
    for b in range(len(lengths)):
      kept = np.flatnonzero(~is_masked[b] & (tok[b] != vocab.PAD))
      want[b, kept] = states[b, :len(kept)]  # the fairseq boolean-mask scatter
      np.testing.assert_array_equal(view.tokens[b, :len(kept)], tok[b, kept])
      np.testing.assert_array_equal(view.positions[b, :len(kept)], kept)
      assert np.all(view.tokens[b, len(kept):] == vocab.PAD)
      np.testing.assert_array_equal(view.padding[b], np.arange(k_max) >= len(kept))
    np.testing.assert_array_equal(got_no_fill, want)
    want[is_masked] = mask_row
    np.testing.assert_array_equal(got, want)
    assert not view.overflow.any() and is_masked.any()


# ----------------------------------------------------------------------------------------------
# (c) loss == float64 numpy reference (per example, unpadded, fairseq-style)
# ----------------------------------------------------------------------------------------------


def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _layer(x, p, bias):
  """One post-LN block on an unpadded sequence x (L, D); bias (H, L, L) or None."""
  a = p["attention"]
  q, k, v = (np.einsum("ld,dnh->lnh", x, a[name]["kernel"]) + a[name]["bias"] for name in ("query", "key", "value"))
  scores = np.einsum("qnh,knh->nqk", q, k) / math.sqrt(q.shape[-1])
  if bias is not None:
    scores = scores + bias
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = np.einsum("qnh,nhd->qd", np.einsum("nqk,knh->qnh", probs, v), a["out"]["kernel"]) + a["out"]["bias"]
  x = _ln(x + attn, p["ln_attention"])
  mlp = _gelu(x @ p["mlp"]["wi"]["kernel"] + p["mlp"]["wi"]["bias"]) @ p["mlp"]["wo"]["kernel"] + p["mlp"]["wo"]["bias"]
  return _ln(x + mlp, p["ln_mlp"])


def _rel_bias(table, positions, cfg):
  buckets = relative_bucket_table(cfg.max_positions, cfg.rel_pos_bins, cfg.max_rel_pos)[
      positions[None, :] - positions[:, None] + cfg.max_positions - 1]  # [i, j]: key j minus query i
  return np.transpose(table[buckets], (2, 0, 1))


def _np_encoder(p, cfg, tokens, positions):
  x = p["token_embed"]["embedding"][tokens] + p["pos_embed"]["embedding"][positions]
  x = _ln(x, p["embed_ln"])
  bias = _rel_bias(p["rel_bias"], positions, cfg)
  for i in range(cfg.num_layers):
    x = _layer(x, p["stack"][f"layer_{i}"], bias)
  return x


def _np_loss(params, model, knobs, tokens, is_masked):
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  enc_cfg, dec_cfg = model.cfg, model.decoder_cfg
  emb = p["encoder"]["token_embed"]["embedding"]
  loss, count = 0.0, 0
  for t, masked in zip(np.asarray(tokens), np.asarray(is_masked)):
    length = int((t != vocab.PAD).sum())
    t, masked = t[:length], masked[:length]
    if knobs.get("mask_in_encoder"):
      states = _np_encoder(p["encoder"], enc_cfg, np.where(masked, vocab.MASK, t), np.arange(length))
    else:
      keep = np.flatnonzero(~masked)
      positions = np.arange(len(keep)) if knobs.get("no_pos_align") else keep
      states = np.zeros((length, enc_cfg.d_model))
      states[keep] = _np_encoder(p["encoder"], enc_cfg, t[keep], positions)
    states[masked] = 0.0 if knobs.get("no_fill_mask") else emb[vocab.MASK]
    d = p["decoder"]
    if "proj" in d:
      states = states @ d["proj"]["kernel"] + d["proj"]["bias"]
    table = p["encoder"]["pos_embed"]["embedding"] if knobs.get("share_pos_emb") else d["pos_embed"]
    x = _ln(states + table[:length], d["embed_ln"])
    bias = _rel_bias(d["rel_bias"], np.arange(length), dec_cfg) if knobs.get("decoder_rel_pos") else None
    for i in range(dec_cfg.num_layers):
      x = _layer(x, d["stack"][f"layer_{i}"], bias)
    h = p["lm_head"]
    z = _ln(_gelu(x[masked] @ h["dense"]["kernel"] + h["dense"]["bias"]), h["ln"])
    if "embed_linear" in h:
      z = z @ h["embed_linear"]["kernel"]
    logits = z @ emb.T + h["bias"]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss -= logp[np.arange(masked.sum()), t[masked]].sum()
    count += int(masked.sum())
  return loss, count


_OTHER_KNOBS = {"share_pos_emb": True, "decoder_rel_pos": True, "no_pos_align": True, "no_fill_mask": True}


@pytest.mark.parametrize("knobs", [
    {},
    {"decoder_dim": 16, "decoder_heads": 2, "decoder_mlp_dim": 48},
    _OTHER_KNOBS,
    {"mask_in_encoder": True},
], ids=["released", "decoder_width", "shared_pos+dec_relpos+no_pos_align+no_fill", "mask_in_encoder"])
def test_loss_matches_float64_numpy_reference(knobs):
  run = _setup(**knobs)
  tokens, rng = _blocks(LENGTHS, seed=2), jax.random.PRNGKey(7)
  loss_sum, weight, metrics, _, is_masked = run.forward(run.params, tokens, rng)
  want_loss, want_count = _np_loss(run.params, run.model, knobs, tokens, is_masked)
  assert float(weight) == want_count > 0
  assert want_loss / want_count > 0.5  # far from trivial
  np.testing.assert_allclose(float(loss_sum), want_loss, rtol=2e-5)
  assert float(metrics["kept_overflow"][0]) == 0.0


# ----------------------------------------------------------------------------------------------
# (d) the K_max bound
# ----------------------------------------------------------------------------------------------

_MAX_U = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def _count_and_overflow(tokens, key, mask_prob, k_max):
  sel = select_masked_positions(tokens, key, mask_prob)
  return sel.count, maelm.compact_kept(tokens, sel.is_masked, k_max).overflow


@pytest.mark.parametrize("mask_prob,n", [(0.15, 128), (0.15, 512), (0.21, 300)])
def test_kept_bound_holds_for_every_real_length(monkeypatch, mask_prob, n):
  """Exhaustive over real lengths 2..n at both extremes of U (m is non-decreasing in U, so U = 0 is the
  worst case and U -> 1 the other end), through the real masking function with U patched."""
  lengths = np.arange(2, n + 1)
  tokens = _blocks(lengths, n)
  k_max = maelm.max_kept(mask_prob, n)
  uniform = jax.random.uniform
  for u in (0.0, _MAX_U):
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape=(), *a, **kw: (
        jnp.full(shape, u, jnp.float32) if len(shape) == 1 else uniform(key, shape, *a, **kw)))
    # A fresh jit per U, so the patched uniform is traced each time.
    count, overflow = jax.jit(lambda t, k: _count_and_overflow(t, k, mask_prob, k_max))(tokens, jax.random.PRNGKey(0))
    kept = lengths - np.asarray(count)
    assert kept.max() <= k_max and not np.asarray(overflow).any()
    if u == 0.0:
      assert kept.max() == k_max  # tight
  monkeypatch.setattr(jax.random, "uniform", uniform)
  naive = n - math.floor(mask_prob * n)
  if (mask_prob, n) == (0.21, 300):  # float32(0.21) * 300 < 63: the naive bound is one short
    assert k_max == naive + 1
  else:
    assert k_max == naive


def test_special_dense_block_overflows_visibly():
  """The one case outside the bound: more than K_max specials, so too little left to mask."""
  run = _setup()
  tokens = jnp.full((len(LENGTHS), N), vocab.EOS, jnp.int32).at[:, 0].set(vocab.BOS).at[1, 1:4].set(9)
  loss_sum, weight, metrics, dec_in, _ = run.forward(run.params, tokens, jax.random.PRNGKey(0))
  k_max = maelm.max_kept(P, N)
  assert float(weight) == 3 and np.isfinite(float(loss_sum))  # row 1 masks its only 3 maskable tokens
  assert float(metrics["kept_overflow"][0]) == 7 * (N - k_max) + (N - 3 - k_max)
  assert np.all(np.asarray(dec_in)[0, k_max:] == 0)  # overflowed tokens are blanked, never garbage


# ----------------------------------------------------------------------------------------------
# (e) position schemes, knobs, dropout, hand-off, validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rope2d_encoder_trains_and_hands_off_an_encoder():
  """Both schemes run forward in the tests above; gradients here for rope2d (absolute+relbias: the
  sharded-step test). The 'encoder' sub-tree is exactly a fresh Encoder's."""
  run = _setup("rope2d")
  grad_fn = jax.jit(jax.grad(lambda p, t, k: base.apply_loss(maelm.OBJECTIVE, run.config, p, t, k, True)[0]))
  grads = grad_fn(run.params, _blocks(LENGTHS), jax.random.PRNGKey(1))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  for part in ("encoder", "decoder", "lm_head"):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[part])) > 0
  assert "pos_embed" not in run.params["encoder"] and "rel_bias" not in run.params["encoder"]
  for positions in ("rope2d", "absolute+relbias"):
    run = _setup(positions)
    enc = maelm.encoder_params(run.params, run.config)
    fresh = nn.meta.unbox(jax.eval_shape(
        lambda: Encoder(base.model_config(run.config)).init(jax.random.PRNGKey(0), base.dummy_tokens(1, N))))
    assert jax.tree.map(jnp.shape, enc) == jax.tree.map(jnp.shape, fresh["params"])

def test_fill_and_mask_in_encoder_knobs():
  tokens, rng = _blocks(LENGTHS), jax.random.PRNGKey(4)
  pad = np.asarray(tokens == vocab.PAD)
  for knobs in ({}, _OTHER_KNOBS, {"mask_in_encoder": True}):
    run = _setup(**knobs)
    *_, dec_in, is_masked = run.forward(run.params, tokens, rng)
    dec_in, msk = np.asarray(dec_in), np.asarray(is_masked)
    kept = ~msk & ~pad
    mask_row = np.asarray(run.params["encoder"]["token_embed"]["embedding"][vocab.MASK])
    assert np.all(dec_in[pad] == 0)
    if knobs.get("no_fill_mask"):
      assert np.all(dec_in[msk] == 0)
    else:
      np.testing.assert_allclose(dec_in[msk], np.broadcast_to(mask_row, dec_in[msk].shape), atol=1e-7)
    # Moving the [MASK] embedding moves kept-position states only if the encoder sees [MASK]
    # (a random direction: a constant shift would vanish in the embedding LayerNorm).
    moved = jax.tree.map(lambda x: x, run.params)
    moved["encoder"]["token_embed"]["embedding"] = run.params["encoder"]["token_embed"]["embedding"].at[
        vocab.MASK].add(jax.random.normal(jax.random.PRNGKey(9), (32,)))
    diff = np.abs(np.asarray(run.forward(moved, tokens, rng)[3])[kept] - dec_in[kept]).max()
    assert (diff > 1e-3) if knobs.get("mask_in_encoder") else (diff == 0.0)

def test_position_alignment_knob():
  """Kept states = the encoder on the kept tokens at original positions, or at 0..K-1 with no_pos_align."""
  tokens, rng = _blocks(LENGTHS), jax.random.PRNGKey(5)
  for knobs in ({}, _OTHER_KNOBS):
    run = _setup(**knobs)
    *_, dec_in, is_masked = run.forward(run.params, tokens, rng)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), run.params["encoder"])
    for b, (t, msk) in enumerate(zip(np.asarray(tokens), np.asarray(is_masked))):
      keep = np.flatnonzero(~msk & (t != vocab.PAD))
      positions = np.arange(len(keep)) if knobs else keep
      want = _np_encoder(p, run.model.cfg, t[keep], positions)
      np.testing.assert_allclose(np.asarray(dec_in)[b, keep], want, atol=2e-5)

def test_knob_param_layout_and_decoder_has_no_dropout():
  p = _setup(**_OTHER_KNOBS).params
  assert "pos_embed" not in p["decoder"] and p["decoder"]["rel_bias"].shape == (16, 2)
  p = _setup(decoder_dim=16, decoder_heads=2, decoder_mlp_dim=48).params
  assert p["decoder"]["proj"]["kernel"].shape == (32, 16)
  assert p["lm_head"]["embed_linear"]["kernel"].shape == (16, 32)
  assert p["decoder"]["pos_embed"].shape == (64, 16)
  p = _setup().params
  assert "proj" not in p["decoder"] and "rel_bias" not in p["decoder"] and "embed_linear" not in p["lm_head"]
  assert set(p) == {"encoder", "decoder", "lm_head"}
  assert set(p["decoder"]["stack"]) == {"layer_0"}
  train_model = maelm.make_model(_config(), False)
  assert not train_model.deterministic and train_model.cfg.dropout_rate == 0.1
  dec = train_model.decoder_cfg
  assert (dec.dropout_rate, dec.attention_dropout_rate, dec.pre_ln, dec.embed_layernorm) == (0.0, 0.0, False, True)

@pytest.mark.parametrize("overrides,message", [
    ({"maelm.decoder_layer": 3}, "unknown config.maelm keys"),
    ({"maelm.decoder_layers": 0}, "decoder_layers"),
    ({"maelm.decoder_heads": 3}, "not divisible"),
    ({"maelm.share_pos_emb": True, "model.positions": "rope2d"}, "absolute table"),
    ({"maelm.share_pos_emb": True, "maelm.decoder_dim": 16}, "decoder_dim"),
    ({"maelm.mask_in_encoder": True, "maelm.no_pos_align": True}, "no effect"),
    ({"seq_len": 128}, "max_positions"),
    ({"mask_prob": 0.0}, "mask_prob"),
])
def test_validation_rejects_bad_knobs(overrides, message):
  config = _config()
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    maelm.validate(config)


def test_encoder_params_fails_loudly():
  run = _setup()
  config, params = run.config, run.params
  assert maelm.encoder_params(params) is params["encoder"]
  with pytest.raises(KeyError, match="encoder"):
    maelm.encoder_params({"decoder": params["decoder"]})
  broken = dict(params, encoder={k: v for k, v in params["encoder"].items() if k != "rel_bias"})
  with pytest.raises(ValueError, match="missing.*rel_bias"):
    maelm.encoder_params(broken, config)
  extra = dict(params, encoder=dict(params["encoder"], lm_head=params["lm_head"]))
  with pytest.raises(ValueError, match="unexpected.*lm_head"):
    maelm.encoder_params(extra, config)
  with pytest.raises(ValueError, match="unexpected.*lm_head"):
    maelm.encoder_params(extra)
  with pytest.raises(ValueError, match="wrong shapes"):
    maelm.encoder_params(params, _with(config, "model.rel_pos_bins", 8))


def _with(config, key, value):
  config = config.copy_and_resolve_references()
  section, _, name = key.rpartition(".")
  config[section][name] = value
  return config


# ----------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------


def _load_config_module(name):
  return config_lib.load_module(CONFIGS / f"{name}.py")


@pytest.mark.parametrize("name,arg", [
    ("maelm_smiles_small", None), ("maelm_smiles_small", "size=tiny"),
    ("maelm_smiles_small", "size=tiny,positions=rope2d"), ("maelm_text_small", None),
    ("maelm_text_small", "size=tiny"), ("maelm_base", "variant=base"), ("maelm_base", "variant=base++"),
    ("maelm_large", None),
])
def test_config_files_validate(name, arg):
  config = _load_config_module(name).get_config(arg)
  assert config.objective == "maelm" and not config.model.pre_ln and config.model.embed_layernorm
  assert (config.adam_b1, config.adam_b2, config.adam_eps, config.weight_decay, config.grad_clip_norm) == (
      0.9, 0.98, 1e-6, 0.01, 2.0)
  config.model.vocab_size = 64
  maelm.validate(config)
  if name in ("maelm_base", "maelm_large"):
    assert (config.learning_rate, config.warmup_steps, config.seq_len, config.maelm.decoder_layers) == (
        2e-4, 10_000, 512, 4)
  if name == "maelm_large":
    assert (config.model.num_layers, config.model.d_model, config.model.rel_pos_bins) == (24, 1024, 128)
  with pytest.raises(ValueError):
    _load_config_module(name).get_config("nonsense=1")


def test_sweep_overrides_existing_keys():
  module = _load_config_module("maelm_smiles_small")
  config = base.with_defaults(module.get_config("size=tiny"))  # as main.py: every option of config.maelm
  sweep = module.get_sweep(None)
  assert len(sweep) == 8 and {d["maelm.decoder_layers"] for d in sweep} == {1, 2, 4, 6}
  for overrides in sweep:
    for key in overrides:
      section, _, name = key.rpartition(".")
      assert name in config[section]


# ----------------------------------------------------------------------------------------------
# (f) sharded step, (g) CLI on MOSES
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_maelm_step_equals_single_device():
  from exlm_jax.train import partitioning, steps  # pylint: disable=g-import-not-at-top

  config = _config(decoder_dim=16, decoder_heads=2, decoder_mlp_dim=48)
  config.batch_size = 8
  tokens = np.asarray(_blocks(LENGTHS, seed=4))
  setups = [steps.TrainSetup.create(config, partitioning.create_mesh(mesh, jax.devices()[:size]))
            for mesh, size in (({"data": 1, "fsdp": 1, "tensor": 1}, 1), ({"data": 2, "fsdp": 4, "tensor": 1}, 8))]
  params = [s.init_state().params for s in setups]
  for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  (loss1, grads1), (loss8, grads8) = [s.loss_and_grads(p, tokens, 3) for s, p in zip(setups, params)]
  assert np.isfinite(loss1) and float(loss1) > 0
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  # The decoder's own tables are sharded like the encoder's (embed dim over fsdp).
  table = params[1]["decoder"]["pos_embed"]
  assert table.sharding.spec[1] == "fsdp" and table.addressable_shards[0].data.shape[1] == 16 // 4


@pytest.mark.slow
@pytest.mark.data
def test_cli_few_steps_on_moses(shared_data, tmp_path):
  env = {**os.environ, "EXLM_DATA_DIR": str(shared_data), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  cmd = [sys.executable, "main.py", "--config", "configs/maelm_smiles_small.py:size=tiny",
         "--config.total_steps=3", "--config.log_every=1", "--config.eval_every=3", "--config.eval_batches=1",
         "--workdir", str(tmp_path / "run")]
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
  assert final["step"] == 3 and final["objective"] == "maelm"
  assert np.isfinite(final["train"]["loss"]) and np.isfinite(final["eval"]["loss"])
  assert final["train"]["kept_overflow"] == 0
