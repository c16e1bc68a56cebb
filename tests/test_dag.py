"""DAG loss: log-likelihood, gradients and Viterbi path against brute-force path enumeration."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from exlm_jax.objectives import dag

IMPLEMENTATIONS = {"custom_vjp": dag.dag_log_likelihood, "autodiff": dag.dag_log_likelihood_autodiff}

M_PAD, S_PAD = 6, 10
# (M_b, S_b) per row of the main batch, padded to M_PAD, S_PAD.
FEASIBLE = [(6, 10), (4, 8), (2, 2), (3, 9), (1, 1), (5, 5), (2, 10), (6, 7), (4, 10)]
PEAKY = [(6, 10), (5, 10), (4, 7)]  # path scores spread over hundreds of nats; jumps of at most 3
SPREAD = [(3, 4)]  # see `_batch`
# No path: M > S; M = 1 with S > 1; no targets; no edges at all; every route cut; all -inf emissions.
INFEASIBLE = [(5, 4), (1, 3), (0, 0), (4, 8), (3, 6), (5, 8)]
ROWS = FEASIBLE + PEAKY + SPREAD + INFEASIBLE
NUM_FEASIBLE = len(ROWS) - len(INFEASIBLE)
IDENTITY_ROWS = [r for r, (m_b, s_b) in enumerate(FEASIBLE) if m_b == s_b]


def _random_trans(rng, s_b, s_pad, max_jump=None, drop=0.3):
  """(S, S) log transition matrix: rows are log-distributions over allowed successors of a valid
  vertex; edge v -> v+1 always allowed, others dropped at random or beyond `max_jump`; -inf elsewhere."""
  trans = np.full((s_pad, s_pad), -np.inf)
  for v in range(s_b - 1):
    allowed = np.arange(v + 1, s_b)
    keep = rng.random(len(allowed)) > drop
    keep[0] = True
    if max_jump is not None:
      keep &= allowed - v <= max_jump
    logits = rng.normal(size=keep.sum()) * 2.0
    trans[v, allowed[keep]] = logits - np.log(np.exp(logits).sum())
  return trans


def _case(seed, rows, m_pad=M_PAD, s_pad=S_PAD, scale=2.0, max_jump=None, drop=0.3, garbage=True):
  """Random batch in float64 numpy; padding holds NaN / +-inf / big garbage to prove it is ignored."""
  rng = np.random.default_rng(seed)
  emit = -np.abs(rng.normal(size=(len(rows), m_pad, s_pad))) * scale - 0.1
  trans = np.stack([_random_trans(rng, s_b, s_pad, max_jump, drop) for _, s_b in rows])
  for r, (m_b, s_b) in enumerate(rows):
    if garbage:
      emit[r, m_b:, :] = rng.choice([np.nan, 1e30, -1e30, np.inf], size=emit[r, m_b:, :].shape)
      emit[r, :, s_b:] = np.nan
      pad = np.ones((s_pad, s_pad), bool)
      pad[:s_b, :s_b] = False
      trans[r][pad] = rng.choice([np.nan, 50.0, np.inf], size=pad.sum())
      trans[r][np.tril_indices(s_pad)] = 7.0  # backward/self edges: finite garbage, must be ignored
  num_targets = np.array([m for m, _ in rows], np.int32)
  num_vertices = np.array([s for _, s in rows], np.int32)
  return emit, trans, num_targets, num_vertices


def _batch():
  """The main test batch: every kind of row above in one (B, M_PAD, S_PAD) batch."""
  emit, trans, nt, nv = _case(0, ROWS)
  r = len(FEASIBLE)
  peaky = slice(r, r + len(PEAKY))
  emit[peaky], trans[peaky] = _case(1, PEAKY, scale=40.0, max_jump=3, drop=0.0)[:2]
  # SPREAD: target 1 fits only at live vertices 1, 2 (log-prob -100); vertex 3, which must emit the
  # last target, emits it at 0. A probability-space DP rescaled by the per-step max underflows here.
  r += len(PEAKY)
  emit[r, :3, :4] = -1.0
  emit[r, 1, 1:3], emit[r, 1, 3] = -100.0, 0.0
  trans[r, :4, :4] = np.where(np.triu(np.ones((4, 4), bool), 1), -np.log([[3], [2], [1], [1]]), -np.inf)
  r += len(SPREAD)
  trans[r + 3, :8, :8] = np.where(np.triu(np.ones((8, 8), bool), 1), -np.inf, trans[r + 3, :8, :8])
  trans[r + 4, 0:3, 3:6] = -np.inf  # paths are 0 -> a -> 5 with a in 1..4: all cut
  emit[r + 5, :5, :8] = -np.inf
  return emit, trans, nt, nv


def _paths(m_b, s_b):
  if m_b < 1 or s_b < 1:
    return []
  if m_b == 1:
    return [(0,)] if s_b == 1 else []
  if s_b < 2:
    return []
  return [(0,) + mid + (s_b - 1,) for mid in itertools.combinations(range(1, s_b - 1), m_b - 2)]


def _path_score(emit, trans, path):
  score = sum(emit[i, u] for i, u in enumerate(path))
  return score + sum(trans[v, u] for v, u in zip(path[:-1], path[1:]))


def _brute(emit, trans, m_b, s_b):
  """float64 log Z, posterior counts (= d log Z / d emit, d log Z / d trans), best score, scores."""
  grad_emit, grad_trans = np.zeros_like(emit), np.zeros_like(trans)
  paths = _paths(m_b, s_b)
  scores = np.array([_path_score(emit, trans, p) for p in paths])
  if not len(paths) or not np.isfinite(scores).any():
    return -np.inf, grad_emit, grad_trans, -np.inf, paths, scores
  top = scores.max()
  log_z = top + np.log(np.exp(scores - top).sum())
  for p, sc in zip(paths, scores):
    w = np.exp(sc - log_z)
    for i, u in enumerate(p):
      grad_emit[i, u] += w
    for v, u in zip(p[:-1], p[1:]):
      grad_trans[v, u] += w
  return log_z, grad_emit, grad_trans, top, paths, scores


@functools.partial(jax.jit, static_argnums=0)
def _ll_vjp(impl, emit, trans, num_targets, num_vertices, cotangent):
  ll, vjp = jax.vjp(lambda e, t: IMPLEMENTATIONS[impl](e, t, num_targets, num_vertices), emit, trans)
  return ll, vjp(cotangent)


def _ll_and_grads(impl, emit, trans, nt, nv, cotangent):
  """float32 log-likelihood (B,) and its vjp with `cotangent` w.r.t. emit and trans, as numpy."""
  ll, (ge, gt) = _ll_vjp(impl, jnp.asarray(emit, jnp.float32), jnp.asarray(trans, jnp.float32),
                         jnp.asarray(nt), jnp.asarray(nv), jnp.asarray(cotangent, jnp.float32))
  return np.asarray(ll), np.asarray(ge), np.asarray(gt)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_log_likelihood_and_gradients_match_brute_force(impl):
  """Ragged rows with garbage padding, sparse DAGs, peaky and float32-spread rows, infeasible rows."""
  emit, trans, nt, nv = _batch()
  cot = np.random.default_rng(1).uniform(0.5, 2.0, size=len(nt))
  ll, ge, gt = _ll_and_grads(impl, emit, trans, nt, nv, cot)
  assert ll.dtype == np.float32
  assert np.isfinite(ge).all() and np.isfinite(gt).all()
  for r, (m_b, s_b) in enumerate(zip(nt, nv)):
    log_z, b_ge, b_gt, _, _, _ = _brute(emit[r], trans[r], m_b, s_b)
    if r < NUM_FEASIBLE:
      assert np.isfinite(log_z)
      np.testing.assert_allclose(ll[r], log_z, rtol=2e-6, atol=2e-5, err_msg=f"row {r}")
    else:
      assert ll[r] == -np.inf and log_z == -np.inf, f"row {r}"
    # d log Z / d input = posterior counts; exactly 0 on padding and on infeasible rows.
    np.testing.assert_allclose(ge[r], cot[r] * b_ge, atol=1e-4, err_msg=f"row {r}")
    np.testing.assert_allclose(gt[r], cot[r] * b_gt, atol=1e-4, err_msg=f"row {r}")
    assert not ge[r][b_ge == 0].any() and not gt[r][b_gt == 0].any(), f"row {r}"


def test_identity_alignment_when_graph_size_equals_target_count():
  emit, trans, nt, nv = _batch()
  ll, _, _ = _ll_and_grads("custom_vjp", emit, trans, nt, nv, np.ones(len(nt)))
  assert IDENTITY_ROWS
  for r in IDENTITY_ROWS:
    idx = np.arange(nt[r])
    expected = emit[r, idx, idx].sum() + trans[r, idx[:-1], idx[1:]].sum()
    np.testing.assert_allclose(ll[r], expected, rtol=1e-6)


def test_custom_vjp_matches_autodiff_at_exlm_shape():
  # k = 4 expansion: S = 4 M, ragged rows, including an infeasible one (M > S).
  rows = [(12, 48), (9, 36), (12, 40), (5, 20), (7, 6)]
  emit, trans, nt, nv = _case(3, rows, m_pad=12, s_pad=48, garbage=False)
  cot = np.random.default_rng(4).normal(size=len(rows))
  ll_c, ge_c, gt_c = _ll_and_grads("custom_vjp", emit, trans, nt, nv, cot)
  ll_a, ge_a, gt_a = _ll_and_grads("autodiff", emit, trans, nt, nv, cot)
  np.testing.assert_allclose(ll_c, ll_a, rtol=1e-6)
  assert ll_c[-1] == -np.inf
  np.testing.assert_allclose(ge_c, ge_a, atol=1e-5)
  np.testing.assert_allclose(gt_c, gt_a, atol=1e-5)


def test_custom_vjp_finite_differences_float64():
  emit, trans, nt, nv = _case(5, [(4, 7), (3, 5), (2, 4)], m_pad=4, s_pad=7, garbage=False)
  with jax.enable_x64(True):
    nt_j, nv_j = jnp.asarray(nt), jnp.asarray(nv)
    # Perturb only finite entries: forbidden edges stay -inf.
    finite = jnp.asarray(np.isfinite(trans))
    base = jnp.asarray(np.where(np.isfinite(trans), trans, 0.0))

    @jax.jit
    def f(e, t):
      return dag.dag_log_likelihood(e, jnp.where(finite, t, -jnp.inf), nt_j, nv_j)

    assert f(jnp.asarray(emit), base).dtype == jnp.float64
    test_util.check_grads(f, (jnp.asarray(emit), base), order=1, modes=["rev"], eps=1e-6)


def test_viterbi_matches_enumeration():
  emit, trans, nt, nv = _batch()
  score, path = jax.jit(dag.dag_best_path)(
      jnp.asarray(emit, jnp.float32), jnp.asarray(trans, jnp.float32), jnp.asarray(nt), jnp.asarray(nv))
  score, path = np.asarray(score), np.asarray(path)
  assert path.dtype == np.int32 and path.shape == (len(nt), S_PAD)
  for r, (m_b, s_b) in enumerate(zip(nt, nv)):
    _, _, _, top, _, _ = _brute(emit[r], trans[r], m_b, s_b)
    if not np.isfinite(top):
      assert score[r] == -np.inf and (path[r] == -1).all(), f"row {r}"
      continue
    np.testing.assert_allclose(score[r], top, rtol=1e-6, err_msg=f"row {r}")
    assert (path[r, s_b:] == -1).all()
    used = np.flatnonzero(path[r] >= 0)
    np.testing.assert_array_equal(path[r, used], np.arange(m_b))  # monotone, every target once
    assert used[0] == 0 and used[-1] == s_b - 1
    np.testing.assert_allclose(_path_score(emit[r], trans[r], tuple(used)), top, rtol=1e-6)


@jax.jit
def _loss_and_grads(emit, trans, num_targets, num_vertices):
  loss_fn = lambda e, t: dag.dag_loss(e, t, num_targets, num_vertices)
  return loss_fn(emit, trans), jax.grad(lambda e, t: loss_fn(e, t).sum(), (0, 1))(emit, trans)


def test_loss_is_per_target_and_zero_for_infeasible_rows():
  emit, trans, nt, nv = _batch()
  loss, (ge, gt) = _loss_and_grads(
      jnp.asarray(emit, jnp.float32), jnp.asarray(trans, jnp.float32), jnp.asarray(nt), jnp.asarray(nv))
  loss, ge, gt = np.asarray(loss), np.asarray(ge), np.asarray(gt)
  assert np.isfinite(loss).all() and np.isfinite(ge).all() and np.isfinite(gt).all()
  for r, (m_b, s_b) in enumerate(zip(nt, nv)):
    log_z = _brute(emit[r], trans[r], m_b, s_b)[0]
    expected = -log_z / m_b if np.isfinite(log_z) else 0.0
    np.testing.assert_allclose(loss[r], expected, rtol=2e-6, err_msg=f"row {r}")
  assert not ge[NUM_FEASIBLE:].any() and not gt[NUM_FEASIBLE:].any()


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_nan_inside_a_row_is_a_nan_loss_not_an_infeasible_row(impl):
  """Diverged parameters (NaN emissions or transitions inside the valid region) must surface as a NaN
  loss, never as the 0 of an infeasible row; NaN in the padding still changes nothing."""
  emit, trans, nt, nv = _case(5, FEASIBLE[:3])
  emit[0, 1, 2] = np.nan  # inside row 0's valid region
  trans[1, 0, 1] = np.nan  # a valid forward edge of row 1
  fn = functools.partial(dag.dag_loss, log_likelihood_fn=IMPLEMENTATIONS[impl])
  loss = np.asarray(fn(jnp.asarray(emit, jnp.float32), jnp.asarray(trans, jnp.float32), jnp.asarray(nt),
                       jnp.asarray(nv)))
  assert np.isnan(loss[0]) and np.isnan(loss[1])
  clean = _case(5, FEASIBLE[:3])
  np.testing.assert_allclose(loss[2], -_brute(clean[0][2], clean[1][2], nt[2], nv[2])[0] / nt[2], rtol=2e-6)
