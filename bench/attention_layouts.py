"""Attention-block layouts on this host: the encoder's separate q / k / v projections against one fused (D, 3D)
projection (with the einsum attention, and with jax.nn.dot_product_attention), gradient of one layer's block.

  python bench/attention_layouts.py        # `small` width (d 256, 4 heads), batch 32 x 128, float32

Why: the CPU profile in bench/README.md puts 16 % of a step in layout copies around attention; fusing q / k / v
into one larger matmul is the usual remedy. This measures whether it would pay here before the parameter layout
(checkpoints, the Hugging Face export) is changed for it. Median of 7 rounds, timed round-robin.
"""

import statistics
import time

import jax
import jax.numpy as jnp

BATCH, LENGTH, D_MODEL, HEADS = 32, 128, 256, 4
HEAD_DIM = D_MODEL // HEADS
ROUNDS = 7


def attend(q, k, v):
  """(B, L, H, Dh) x 3 -> (B, L, H, Dh): softmax attention as the encoder's einsum path computes it."""
  logits = jnp.einsum("blhd,bmhd->bhlm", q, k) / jnp.sqrt(HEAD_DIM)
  return jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(logits, -1), v)


def separate(kernels, x):
  """Three (D, H, Dh) projections, as models/encoder.py."""
  q, k, v = (jnp.einsum("bld,dhe->blhe", x, w) for w in kernels)
  return jnp.sum(attend(q, k, v) ** 2)


def _split_fused(kernel, x):
  qkv = (x @ kernel).reshape(BATCH, LENGTH, 3, HEADS, HEAD_DIM)
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def fused(kernel, x):
  """One (D, 3D) projection, then the einsum attention."""
  return jnp.sum(attend(*_split_fused(kernel, x)) ** 2)


def fused_sdpa(kernel, x):
  """One (D, 3D) projection, then jax.nn.dot_product_attention."""
  return jnp.sum(jax.nn.dot_product_attention(*_split_fused(kernel, x)) ** 2)


def main():
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (BATCH, LENGTH, D_MODEL))
  kernels = tuple(jax.random.normal(jax.random.fold_in(key, i), (D_MODEL, HEADS, HEAD_DIM)) * 0.05 for i in range(3))
  kernel = jnp.concatenate([w.reshape(D_MODEL, D_MODEL) for w in kernels], axis=1)
  cases = {"separate q/k/v": (jax.jit(jax.grad(separate)), kernels),
           "fused (D,3D)": (jax.jit(jax.grad(fused)), kernel),
           "fused + dot_product_attention": (jax.jit(jax.grad(fused_sdpa)), kernel)}
  for grad, params in cases.values():
    jax.block_until_ready(grad(params, x))  # compile
  times = {name: [] for name in cases}
  for _ in range(ROUNDS):
    for name, (grad, params) in cases.items():
      started = time.perf_counter()
      jax.block_until_ready(grad(params, x))
      times[name].append(time.perf_counter() - started)
  print(f"{jax.devices()[0].platform} | d {D_MODEL}, {HEADS} heads, batch {BATCH} x {LENGTH}, float32 | "
        f"median of {ROUNDS}, round-robin")
  for name, seconds in times.items():
    print(f"{name:32s} {1e3 * statistics.median(seconds):7.1f} ms (one layer's attention block, forward + backward)")


if __name__ == "__main__":
  main()
