"""Times the DAG log-likelihood: custom_vjp (kept) vs autodiff through the scan, forward and fwd+bwd.

  python bench/dag_loss.py                      # B = 64 and B = 8, k = 4, M = 22 (seq 128), S = k M
  python bench/dag_loss.py --batch 64 --k 4 --targets 22 --repeats 20 --json out.json

Also times `prob_space` (forward as a batched mat-vec with exp(trans) and per-step max rescaling,
autodiff backward), the formulation dag.py explains not adopting. Reports the median wall time of
jitted, warmed-up calls (block_until_ready) and the XLA temp buffer size of the compiled function.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from exlm_jax.objectives import dag


def _prob_space_log_likelihood(emit_logp, trans_logp, num_targets, num_vertices):
  """Probability-space forward: alpha_i = emit_i + m + log(exp(alpha_{i-1} - m) @ exp(trans))."""
  emit, trans = dag._mask_padding(emit_logp, trans_logp, num_targets, num_vertices)
  edges = jnp.exp(trans)

  def step(alpha, emit_i):
    m = jnp.max(alpha, axis=1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    q = jnp.einsum("bv,bvu->bu", jnp.exp(alpha - m), edges)
    alpha = emit_i + jnp.where(q > 0, m + jnp.log(jnp.where(q > 0, q, 1.0)), -jnp.inf)
    return alpha, alpha

  alpha0 = dag._alpha0(emit)
  _, rest = lax.scan(step, alpha0, jnp.swapaxes(emit[:, 1:], 0, 1))
  alphas = jnp.concatenate([alpha0[None], rest], axis=0)
  last_t, last_v = dag._ends(num_targets, num_vertices, emit.shape[1], emit.shape[2])
  ll = dag._read_end(alphas, last_t, last_v)
  return jnp.where(jnp.isfinite(ll), ll, -jnp.inf)


IMPLEMENTATIONS = {
    "custom_vjp": dag.dag_log_likelihood,
    "autodiff": dag.dag_log_likelihood_autodiff,
    "prob_space": _prob_space_log_likelihood,
}


def make_inputs(batch: int, k: int, targets: int, seed: int = 0):
  """ExLM-like ragged batch: M_b in [targets - 4, targets], S_b = k M_b, transitions a softmax over
  later vertices of the row."""
  key_m, key_e, key_t = jax.random.split(jax.random.key(seed), 3)
  s = k * targets
  num_targets = jax.random.randint(key_m, (batch,), max(2, targets - 4), targets + 1)
  num_vertices = k * num_targets
  emit = -jnp.abs(jax.random.normal(key_e, (batch, targets, s))) * 3.0
  valid = jnp.arange(s)[None, :] < num_vertices[:, None]
  allowed = valid[:, :, None] & valid[:, None, :] & (jnp.arange(s)[:, None] < jnp.arange(s)[None, :])
  logits = jnp.where(allowed, jax.random.normal(key_t, (batch, s, s)), -jnp.inf)
  trans = jnp.where(allowed, jax.nn.log_softmax(jnp.where(allowed, logits, -1e9), axis=-1), -jnp.inf)
  return emit, trans, num_targets, num_vertices


def _time(fn, args, repeats: int) -> tuple[float, float]:
  """(median, min) wall time in ms of warmed-up calls."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3, min(times) * 1e3


def bench_one(name: str, inputs, repeats: int) -> dict:
  impl = IMPLEMENTATIONS[name]
  emit, trans, num_targets, num_vertices = inputs
  objective = lambda e, t: impl(e, t, num_targets, num_vertices).sum()
  fwd = jax.jit(objective)
  fwd_bwd = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
  temp = lambda f: f.lower(emit, trans).compile().memory_analysis().temp_size_in_bytes / 2**20
  fwd_ms, fwd_min_ms = _time(fwd, (emit, trans), repeats)
  fwd_bwd_ms, fwd_bwd_min_ms = _time(fwd_bwd, (emit, trans), repeats)
  return {
      "impl": name,
      "fwd_ms": fwd_ms,
      "fwd_min_ms": fwd_min_ms,
      "fwd_bwd_ms": fwd_bwd_ms,
      "fwd_bwd_min_ms": fwd_bwd_min_ms,
      "fwd_temp_mib": temp(fwd),
      "fwd_bwd_temp_mib": temp(fwd_bwd),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, nargs="+", default=[64, 8])
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--targets", type=int, default=22, help="M, padded target count (M_max + 2)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args()

  rows = []
  print(f"{jax.devices()[0].platform}, jax {jax.__version__}, k={args.k}, M={args.targets}, "
        f"S={args.k * args.targets}; ms = median (min) of {args.repeats}; MiB = XLA temp buffers")
  print(f"{'B':>4} {'impl':<11} {'fwd ms':>15} {'fwd+bwd ms':>15} {'fwd MiB':>8} {'fwd+bwd MiB':>12}")
  for batch in args.batch:
    inputs = make_inputs(batch, args.k, args.targets)
    for name in args.impls:
      row = {"batch": batch, "k": args.k, "targets": args.targets, **bench_one(name, inputs, args.repeats)}
      rows.append(row)
      fwd = f"{row['fwd_ms']:.2f} ({row['fwd_min_ms']:.2f})"
      fwd_bwd = f"{row['fwd_bwd_ms']:.2f} ({row['fwd_bwd_min_ms']:.2f})"
      print(f"{batch:>4} {name:<11} {fwd:>15} {fwd_bwd:>15} "
            f"{row['fwd_temp_mib']:>8.2f} {row['fwd_bwd_temp_mib']:>12.2f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"platform": jax.devices()[0].platform, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
