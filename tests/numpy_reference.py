"""An independent float64 numpy forward of the encoder and LM head, for checking the JAX code.

Written from the papers' formulas (docs/design.md §1.1, §1.3) rather than from the Flax code:
explicit per-pair RoPE rotation, explicit bucket lookup, explicit softmax.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from exlm_jax.models.encoder import relative_bucket_table


def f64(tree):
  if isinstance(tree, dict):
    return {k: f64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def layernorm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def rotate_half_rope(u, pos, theta):
  """GPT-NeoX rotate-half RoPE of one half-vector u (..., d) at integer positions pos (...)."""
  d = u.shape[-1]
  out = np.empty_like(u)
  for j in range(d // 2):
    angle = pos * theta ** (-2.0 * j / d)
    c, s = np.cos(angle), np.sin(angle)
    out[..., j] = u[..., j] * c - u[..., j + d // 2] * s
    out[..., j + d // 2] = u[..., j + d // 2] * c + u[..., j] * s
  return out


def rope2d(x, positions, copy_index, theta=10000.0):
  """x (B, L, N, Dh): first half rotated by positions, second half by copy_index."""
  half = x.shape[-1] // 2
  pos = positions[:, :, None].astype(np.float64)
  cp = copy_index[:, :, None].astype(np.float64)
  return np.concatenate([rotate_half_rope(x[..., :half], pos, theta),
                         rotate_half_rope(x[..., half:], cp, theta)], axis=-1)


def dense(x, p, contract=1):
  return np.tensordot(x, p["kernel"], axes=contract) + p["bias"]


def attention(x, p, key_valid, bias, rope_args, num_heads):
  q, k, v = dense(x, p["query"]), dense(x, p["key"]), dense(x, p["value"])
  if rope_args is not None:
    q, k = rope2d(q, *rope_args), rope2d(k, *rope_args)
  dh = q.shape[-1]
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(dh)
  if bias is not None:
    scores = scores + bias
  scores = np.where(key_valid[:, None, None, :], scores, -np.inf)
  scores = scores - scores.max(-1, keepdims=True)
  probs = np.exp(scores)
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bnqk,bknh->bqnh", probs, v)
  return dense(out, p["out"], contract=2)


def block(x, p, key_valid, bias, rope_args, num_heads, pre_ln):
  if pre_ln:
    x = x + attention(layernorm(x, p["ln_attention"]), p["attention"], key_valid, bias, rope_args, num_heads)
    return x + dense(gelu(dense(layernorm(x, p["ln_mlp"]), p["mlp"]["wi"])), p["mlp"]["wo"])
  x = layernorm(x + attention(x, p["attention"], key_valid, bias, rope_args, num_heads), p["ln_attention"])
  return layernorm(x + dense(gelu(dense(x, p["mlp"]["wi"])), p["mlp"]["wo"]), p["ln_mlp"])


def encoder(params, tokens, cfg, positions=None, copy_index=None, padding_mask=None):
  """Deterministic (no dropout) encoder forward; params is an Encoder's param tree."""
  p = f64(params)
  batch, length = tokens.shape
  positions = np.broadcast_to(np.arange(length), (batch, length)) if positions is None else positions
  copy_index = np.zeros((batch, length), np.int64) if copy_index is None else copy_index
  padding_mask = np.zeros((batch, length), bool) if padding_mask is None else padding_mask
  x = p["token_embed"]["embedding"][tokens]
  bias = rope_args = None
  if cfg.positions in ("absolute", "absolute+relbias"):
    x = x + p["pos_embed"]["embedding"][positions]
  if cfg.positions == "absolute+relbias":
    table = relative_bucket_table(cfg.max_positions, cfg.rel_pos_bins, cfg.max_rel_pos)
    buckets = table[positions[:, None, :] - positions[:, :, None] + cfg.max_positions - 1]
    bias = np.transpose(p["rel_bias"][buckets], (0, 3, 1, 2))
  if cfg.positions == "rope2d":
    rope_args = (positions, copy_index, cfg.rope_theta)
  if cfg.embed_layernorm:
    x = layernorm(x, p["embed_ln"])
  x = x * (~padding_mask)[..., None]
  stack = p["stack"]
  for i in range(cfg.num_layers):
    x = block(x, stack[f"layer_{i}"], ~padding_mask, bias, rope_args, cfg.num_heads, cfg.pre_ln)
  if cfg.pre_ln:
    x = layernorm(x, stack["final_ln"])
  return x


def lm_head(h, p, embedding):
  p = f64(p)
  h = layernorm(gelu(dense(h, p["dense"])), p["ln"])
  return h @ np.asarray(embedding, np.float64).T + p["bias"]


def log_softmax(logits):
  logits = logits - logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))
