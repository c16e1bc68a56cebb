"""Encoder: positions (2-D RoPE relative property, MAE-LM buckets), forward vs float64 numpy."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from exlm_jax.models import encoder as enc


def _cfg(**kw):
  base = dict(vocab_size=50, num_layers=2, d_model=32, num_heads=2, mlp_dim=64, dropout_rate=0.0,
              attention_dropout_rate=0.0, max_positions=64, rel_pos_bins=32, max_rel_pos=32)
  base.update(kw)
  return enc.ModelConfig(**base)


def test_rope2d_matches_numpy_and_scores_depend_only_on_offsets():
  rng = np.random.RandomState(0)
  q, k = rng.randn(2, 2, 6, 3, 16).astype(np.float32)
  pos = rng.randint(0, 50, (2, 6))
  copy = rng.randint(0, 5, (2, 6))
  cos, sin = enc.rope2d_angles(jnp.asarray(pos), jnp.asarray(copy), 16)
  np.testing.assert_allclose(enc.apply_rope(jnp.asarray(q), cos, sin), ref.rope2d(q.astype(np.float64), pos, copy),
                             atol=1e-5)

  def scores(shift_pos, shift_copy):
    c, s = enc.rope2d_angles(jnp.asarray(pos + shift_pos), jnp.asarray(copy + shift_copy), 16)
    return np.einsum("blnh,bmnh->bnlm", enc.apply_rope(jnp.asarray(q), c, s), enc.apply_rope(jnp.asarray(k), c, s))

  np.testing.assert_allclose(scores(0, 0), scores(17, 0), atol=2e-4)
  np.testing.assert_allclose(scores(0, 0), scores(0, 3), atol=2e-4)
  assert not np.allclose(scores(0, 0), scores(0, 0) * 0 + scores(0, 0)[..., ::-1], atol=1e-3)


def test_copy_index_zero_leaves_second_half_unrotated():
  x = jnp.asarray(np.random.RandomState(1).randn(1, 4, 2, 16), jnp.float32)
  cos, sin = enc.rope2d_angles(jnp.arange(4)[None] + 5, jnp.zeros((1, 4), jnp.int32), 16)
  np.testing.assert_allclose(enc.apply_rope(x, cos, sin)[..., 8:], x[..., 8:], atol=1e-6)


def test_relative_buckets_match_reference_values():
  base = enc.relative_bucket_table(512, 64, 128)
  at = lambda r: int(base[r + 511])
  expected = {0: 31, 1: 32, -1: 30, 15: 46, 16: 47, 17: 48, 32: 53, 64: 58, 127: 62, 300: 62, -127: 0, -511: 0}
  assert {r: at(r) for r in expected} == expected
  assert set(np.unique(base)) == set(range(63))  # 63 of 64 rows used
  large = enc.relative_bucket_table(512, 128, 256)
  assert large[511] == 63 and large.min() == 0 and large.max() == 126


@pytest.mark.parametrize("scheme", ["rope2d", "absolute+relbias"])
def test_encoder_matches_float64_numpy(scheme):
  pre_ln = scheme == "rope2d"
  cfg = _cfg(positions=scheme, pre_ln=pre_ln, embed_layernorm=not pre_ln)
  rng = np.random.RandomState(2)
  tokens = rng.randint(5, 50, (3, 10))
  padding = np.zeros((3, 10), bool)
  padding[1, 7:] = True
  tokens[padding] = 0
  positions = np.sort(rng.choice(40, (3, 10)), axis=1)  # gaps, as MAE-LM's compacted input
  copy = rng.randint(0, 4, (3, 10)) if scheme == "rope2d" else np.zeros((3, 10), int)
  model = enc.Encoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(tokens))["params"])
  # Non-trivial LayerNorm/bias values so they are checked too.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  out = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(copy),
                    jnp.asarray(padding))
  expected = ref.encoder(params, tokens, cfg, positions, copy, padding)
  np.testing.assert_allclose(np.asarray(out)[~padding], expected[~padding], atol=2e-4, rtol=1e-4)


def test_scan_remat_and_unrolled_agree():
  cfg = _cfg()
  tokens = jnp.asarray(np.random.RandomState(3).randint(5, 50, (2, 8)))
  unrolled = enc.Encoder(cfg)
  params = nn.unbox(unrolled.init(jax.random.key(0), tokens)["params"])
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True, remat="full")
  layers = [params["stack"][f"layer_{i}"] for i in range(cfg.num_layers)]
  scanned_params = {k: v for k, v in params.items() if k != "stack"}
  scanned_params["stack"] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers),
                             "final_ln": params["stack"]["final_ln"]}
  a = unrolled.apply({"params": params}, tokens)
  b = enc.Encoder(scanned_cfg).apply({"params": scanned_params}, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5)
  grads = jax.grad(lambda p: enc.Encoder(scanned_cfg).apply({"params": p}, tokens).sum())(scanned_params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_unfused_dropout_path_equals_fused_attention_at_zero_rate():
  cfg = _cfg(attention_dropout_rate=1e-9)
  tokens = jnp.asarray(np.random.RandomState(4).randint(5, 50, (2, 8)))
  padding = jnp.zeros((2, 8), bool).at[1, 5:].set(True)
  params = nn.unbox(enc.Encoder(cfg).init(jax.random.key(0), tokens)["params"])
  fused = enc.Encoder(cfg, deterministic=True).apply({"params": params}, tokens, padding_mask=padding)
  unfused = enc.Encoder(cfg, deterministic=False).apply({"params": params}, tokens, padding_mask=padding,
                                                        rngs={"dropout": jax.random.key(1)})
  np.testing.assert_allclose(np.asarray(fused)[~np.asarray(padding)], np.asarray(unfused)[~np.asarray(padding)],
                             atol=1e-5)


def test_bfloat16_activations_stay_close_and_params_float32():
  cfg = _cfg(dtype="bfloat16")
  tokens = jnp.asarray(np.random.RandomState(5).randint(5, 50, (2, 8)))
  params = nn.unbox(enc.Encoder(cfg).init(jax.random.key(0), tokens)["params"])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  low = enc.Encoder(cfg).apply({"params": params}, tokens)
  high = enc.Encoder(dataclasses.replace(cfg, dtype="float32")).apply({"params": params}, tokens)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), high, atol=0.1)


def test_config_errors_are_one_line_and_actionable():
  with pytest.raises(ValueError, match="vocab_size"):
    enc.ModelConfig(vocab_size=-1).validate()
  with pytest.raises(ValueError, match="divisible"):
    enc.ModelConfig(vocab_size=10, d_model=30, num_heads=4).validate()
  with pytest.raises(ValueError, match="positions"):
    enc.ModelConfig(vocab_size=10, positions="alibi").validate()


def test_one_segment_per_block_equals_the_padding_mask_and_pad_rows_stay_finite():
  cfg = _cfg(positions="absolute+relbias", pre_ln=False, embed_layernorm=True)
  tokens = np.random.RandomState(6).randint(5, 50, (2, 8))
  tokens[1, 5:] = 0
  tokens = jnp.asarray(tokens)
  segment_ids = (tokens != 0).astype(jnp.int32)
  model = enc.Encoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
  padded = model.apply({"params": params}, tokens, padding_mask=tokens == 0)
  segmented = model.apply({"params": params}, tokens, segment_ids=segment_ids)
  real = np.asarray(segment_ids) > 0
  np.testing.assert_allclose(np.asarray(segmented)[real], np.asarray(padded)[real], atol=1e-6)
  # Padding queries attend to no key: outputs and gradients stay finite.
  grads = jax.grad(lambda p: model.apply({"params": p}, tokens, segment_ids=segment_ids).sum())(params)
  assert np.isfinite(np.asarray(segmented)).all() and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
