"""Analysis core: effective rank (exact spectra, streaming, per-sequence), entropy, Repeated-MLM, plots."""

import csv
import gzip
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from exlm_jax.analysis import effective_rank as er
from exlm_jax.analysis import entropy as ent
from exlm_jax.analysis import plots
from exlm_jax import config_lib, objectives
from exlm_jax.analysis import repeated_mlm as rep
from exlm_jax.objectives import repeated_mlm as repeated_mlm_objective
from exlm_jax.data import vocab

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _orthonormal(rng, rows, cols):
  q, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
  return q


def _with_spectrum(rng, singular, n=50, d=8):
  """H (n, d) = U diag(s) V^T with the given singular values."""
  r = len(singular)
  return _orthonormal(rng, n, r) @ np.diag(singular) @ _orthonormal(rng, d, r).T


# ---------------------------------------------------------------------------------------------
# Effective rank


def test_effective_rank_exact_spectrum_and_boundaries():
  s = np.array([4.0, 3.0, 2.0, 1.0])  # squared: 16, 9, 4, 1 (total 30); linear: 4, 3, 2, 1 (total 10)
  assert er.effective_rank(s, 0.5) == 1  # 16/30 = 0.533
  assert er.effective_rank(s, 25 / 30) == 2  # exactly at the boundary
  assert er.effective_rank(s, 25 / 30 + 1e-9) == 3
  assert er.effective_rank(s, 0.9) == 3  # 29/30 = 0.967
  assert er.effective_rank(s, 0.97) == 4
  assert er.effective_rank(s, 1.0) == 4
  assert er.effective_rank(s, 0.7, kind="linear") == 2  # 7/10, at the boundary
  assert er.effective_rank(s, 0.9, kind="linear") == 3  # 9/10, at the boundary
  assert er.effective_rank(s, 0.91, kind="linear") == 4
  assert er.effective_rank(s[::-1], 0.9) == 3  # order does not matter
  assert er.effective_rank(s**2, 25 / 30, spectrum="gram") == 2
  assert er.effective_rank(s**2, 0.7, kind="linear", spectrum="gram") == 2
  assert er.effective_rank(np.zeros(5)) == 0
  np.testing.assert_array_equal(er.effective_rank(np.stack([s, [1.0, 1, 1, 1]]), 0.5), [1, 2])
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="energy"):
      er.effective_rank(s, bad)
  with pytest.raises(ValueError, match="kind"):
    er.effective_rank(s, 0.9, kind="log")


def test_gram_accumulator_on_constructed_matrix():
  rng = np.random.default_rng(0)
  h = _with_spectrum(rng, [4.0, 3.0, 2.0, 1.0], n=50, d=8)
  acc = er.GramAccumulator(8).update(h)
  np.testing.assert_allclose(acc.eigenvalues()[:5], [16, 9, 4, 1, 0], atol=1e-10)
  assert (acc.eigenvalues() >= 0).all()
  result = acc.rank(0.9)
  assert (result.rank, result.energy, result.kind, result.mode, result.num_rows, result.dim) == (
      3, 0.9, "squared", er.CORPUS, 50, 8)
  assert acc.rank(25 / 30).rank == 2 and acc.rank(1.0).rank == 4
  assert acc.rank(0.9, kind="linear").rank == 3
  assert acc.basis(energy=0.9).shape == (8, 3)


@pytest.mark.parametrize("center", [False, True])
def test_streaming_and_merge_equal_one_shot_svd(center):
  rng = np.random.default_rng(1)
  d, n = 16, 640
  h = rng.normal(size=(n, d)) * np.geomspace(5.0, 0.05, d) + 3.0 * rng.normal(size=d)  # anisotropic + mean
  states = h.reshape(8, 80, d)
  mask = rng.random((8, 80)) < 0.7
  a, b = er.GramAccumulator(d), er.GramAccumulator(d)
  for i in range(8):
    (a if i % 2 else b).update(states[i], mask[i])
  acc = a.merge(b)
  rows = states[mask]
  assert acc.count == rows.shape[0]
  reference = rows - rows.mean(axis=0) if center else rows
  singular = np.linalg.svd(reference, compute_uv=False)
  np.testing.assert_allclose(acc.eigenvalues(center), singular**2, rtol=1e-9, atol=1e-9 * singular[0] ** 2)
  for energy in (0.5, 0.8, 0.9, 0.99):
    for kind in er.KINDS:
      assert acc.rank(energy, center, kind).rank == er.effective_rank(singular, energy, kind)
  # The basis spans the top right singular vectors.
  _, _, vt = np.linalg.svd(reference, full_matrices=False)
  basis = acc.basis(k=3, center=center)
  np.testing.assert_allclose(np.abs(basis.T @ vt[:3].T), np.eye(3), atol=1e-8)
  # Same through the (group, layer) collector.
  collector = er.RankCollector()
  collector.add_layers("g", [states, 2 * states], mask)
  results = collector.results(0.9, center)
  assert results[("g", 0)].rank == results[("g", 1)].rank == er.effective_rank(singular, 0.9)
  layers, ranks = er.rank_curves(results)["g"]
  np.testing.assert_array_equal(layers, [0, 1])


def test_collector_merge_and_groups():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(2, 30, 6)), rng.normal(size=(2, 30, 6))
  whole, left, right = er.RankCollector(), er.RankCollector(), er.RankCollector()
  whole.add_layers("real", [x, y])
  whole.add("mask", 0, x[:, :5])
  left.add_layers("real", [x[:1], y[:1]])
  right.add_layers("real", [x[1:], y[1:]])
  right.add("mask", 0, x[:, :5])
  merged = left.merge(right)
  assert set(merged.accumulators) == {("real", 0), ("real", 1), ("mask", 0)}
  for key, acc in whole.accumulators.items():
    np.testing.assert_allclose(merged.accumulators[key].gram, acc.gram)


def test_per_sequence_mode():
  rng = np.random.default_rng(3)
  d = 6
  basis = _orthonormal(rng, d, d).T  # rows: orthonormal directions
  seqs = np.zeros((4, 10, d))
  seqs[0, :5] = basis[0]
  seqs[0, 5:] = basis[1]  # two directions, equal energy -> rank 2 at 0.9
  seqs[1] = np.outer(rng.normal(size=10), basis[2])  # rank one
  seqs[2, :4] = basis[3] * 2.0  # constant rows: rank 1 uncentred, 0 centred
  seqs[2, 4:] = basis[4] * 100.0  # masked out below
  seqs[3] = rng.normal(size=(10, d))  # no valid rows
  mask = np.ones((4, 10), bool)
  mask[2, 4:] = False
  mask[3] = False
  np.testing.assert_array_equal(er.per_sequence_ranks(seqs, mask, 0.9), [2, 1, 1, -1])
  np.testing.assert_array_equal(er.per_sequence_ranks(seqs, mask, 0.9, center=True)[2], 0)
  collector = er.PerSequenceRankCollector(energy=0.9)
  collector.add("real", 0, seqs, mask)
  collector.add("real", 0, seqs[:2], mask[:2])
  result = collector.results()[("real", 0)]
  assert result.mode == er.PER_SEQUENCE and result.num_sequences == 5
  assert result.rank == pytest.approx((2 + 1 + 1 + 2 + 1) / 5)
  assert result.num_rows == mask.sum() + mask[:2].sum()
  # Versus the corpus rank of the same rows: all the directions together.
  assert er.GramAccumulator(d).update(seqs[:3], mask[:3]).rank(0.99).rank == 4


def test_identical_rows_have_centred_rank_zero():
  """A centred Gram of identical rows is all cancellation round-off: rank 0 in both modes, not noise."""
  h = np.random.default_rng(4).normal(size=16) * 3.7
  assert er.GramAccumulator(16).update(np.tile(h, (2700, 1))).rank(0.9, center=True).rank == 0
  assert er.GramAccumulator(16).update(np.tile(h, (2700, 1))).rank(0.9, kind="linear").rank == 1
  np.testing.assert_array_equal(er.per_sequence_ranks(np.tile(h, (2, 7, 1)), None, 0.9, center=True), [0, 0])


def test_layernorm_normalisation_makes_the_rank_blind_to_token_scale_and_offset():
  """A residual stream whose token states grow in norm and drift in offset (a pre-LN intermediate layer) has
  the rank of its normalised states: the tool's stated normalisation, checked against scipy's z-score."""
  rng = np.random.default_rng(11)
  d = 16
  states = rng.normal(size=(6, 40, 5)) @ rng.normal(size=(5, d)) + 0.1 * rng.normal(size=(6, 40, d))
  scale = np.exp(rng.normal(0.0, 1.5, size=(6, 40, 1)))  # per-token norms over ~2 orders of magnitude
  stream = scale * states + rng.normal(size=(6, 40, 1))  # plus a per-token offset on every feature
  normalised = er.normalise_layers([states, stream], "layernorm")
  np.testing.assert_allclose(normalised[0], scipy.stats.zscore(states, axis=-1), atol=1e-12)
  np.testing.assert_allclose(normalised[1], normalised[0], atol=1e-9)
  for center in (False, True):
    ranks = {name: er.GramAccumulator(d).update(h).rank(0.9, center).rank
             for name, h in (("raw", states), ("raw stream", stream), ("normalised", normalised[0]),
                             ("normalised stream", normalised[1]))}
    assert ranks["normalised"] == ranks["normalised stream"]
    assert ranks["raw"] != ranks["raw stream"]  # without it, the scales decide
  np.testing.assert_array_equal(er.per_sequence_ranks(normalised[1], None, 0.9),
                                er.per_sequence_ranks(normalised[0], None, 0.9))
  assert er.normalise_layers([stream], "none")[0] is stream
  np.testing.assert_array_equal(er.layer_norm_rows(np.ones((2, 3))), np.zeros((2, 3)))  # constant rows stay 0
  with pytest.raises(ValueError, match="normalise"):
    er.normalise_layers([states], "rms")


def test_out_of_span_energy_and_principal_angles():
  rng = np.random.default_rng(4)
  d = 10
  q = _orthonormal(rng, d, d)
  inside, outside = q[:, :3], q[:, 3:]
  real = rng.normal(size=(200, 3)) * [3.0, 2.0, 1.0] @ inside.T
  real_acc = er.GramAccumulator(d).update(real)
  span = real_acc.basis(k=3)
  mask_in = rng.normal(size=(40, 3)) @ inside.T
  mask_out = rng.normal(size=(40, 7)) @ outside.T
  assert er.out_of_span_energy(mask_in, span) == pytest.approx(0.0, abs=1e-12)
  assert er.out_of_span_energy(mask_out, span) == pytest.approx(1.0, abs=1e-12)
  mixed = 3.0 * np.outer(rng.choice([-1, 1], 50), q[:, 0]) + 1.0 * np.outer(rng.choice([-1, 1], 50), q[:, 5])
  assert er.out_of_span_energy(mixed, span) == pytest.approx(1 / 10)
  assert er.out_of_span_energy(mixed.T @ mixed, span, gram=True) == pytest.approx(1 / 10)
  assert er.out_of_span_energy(er.GramAccumulator(d).update(mixed), span) == pytest.approx(1 / 10)
  np.testing.assert_allclose(er.principal_angles(inside, span), 0.0, atol=1e-6)
  np.testing.assert_allclose(er.principal_angles(inside, outside[:, :2]), np.pi / 2)
  theta = 0.3
  line = np.cos(theta) * q[:, :1] + np.sin(theta) * q[:, 5:6]
  np.testing.assert_allclose(er.principal_angles(q[:, :2], line), [theta])
  diag = er.mask_subspace_diagnostics(real_acc, er.GramAccumulator(d).update(mask_out),
                                      masked_real=real_acc, energy=0.999)
  assert diag["real_rank"] == 3 and diag["mask_out_of_span_energy"] == pytest.approx(1.0)
  np.testing.assert_allclose(diag["principal_angles_masked_real_vs_mask"], np.pi / 2)


# ---------------------------------------------------------------------------------------------
# Entropy


def test_entropy_of_known_distributions():
  v = 7
  np.testing.assert_allclose(ent.entropy_from_logits(np.zeros((3, v))), np.log(v))
  one_hot = np.full((2, v), -np.inf)
  one_hot[:, 2] = 0.0
  np.testing.assert_allclose(ent.entropy_from_logits(one_hot), 0.0)
  np.testing.assert_allclose(ent.entropy_from_logits(np.array([[1000.0, 0.0, -1000.0]])), 0.0, atol=1e-12)
  logits = np.random.default_rng(5).normal(size=(4, 5, v)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(ent.entropy_from_logits(logits), scipy.stats.entropy(probs, axis=-1), rtol=1e-12)
  np.testing.assert_allclose(ent.entropy_from_probs(probs), scipy.stats.entropy(probs, axis=-1), rtol=1e-12)
  on_device = ent.entropy_from_logits(jnp.asarray(logits, jnp.float32))
  assert isinstance(on_device, jax.Array)
  np.testing.assert_allclose(np.asarray(on_device), scipy.stats.entropy(probs, axis=-1), rtol=1e-5)


def test_masked_mean_and_mlm_entropy():
  values = np.array([[1.0, 2.0], [3.0, np.nan]])
  mask = np.array([[True, True], [False, False]])
  assert ent.masked_mean(values, mask) == pytest.approx(1.5)
  assert np.isnan(ent.masked_mean(values, np.zeros_like(mask)))
  logits = np.zeros((2, 3, 4))
  logits[0, 0] = [0, -np.inf, -np.inf, -np.inf]  # entropy 0
  mask = np.array([[True, True, False], [False, False, False]])
  assert ent.mlm_entropy(logits, mask) == pytest.approx(np.log(4) / 2)
  acc = ent.MeanAccumulator()
  acc.add(*ent.masked_sum_count(ent.entropy_from_logits(logits), mask))
  acc.add(*ent.masked_sum_count(np.array([np.log(4)]), np.array([True])))
  assert acc.mean == pytest.approx(2 * np.log(4) / 3)


def test_exlm_entropy_variants_against_numpy():
  rng = np.random.default_rng(6)
  b, m, s, v = 2, 3, 5, 6
  logits = rng.normal(size=(b, s, v)) * 2
  state_valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  path = np.array([[0, -1, 1, 2, -1], [0, 1, -1, -1, 2]])
  gamma = rng.random((b, m, s)) * state_valid[:, None, :]
  gamma /= gamma.sum(-1, keepdims=True)
  target_valid = np.array([[1, 1, 1], [1, 1, 0]], bool)

  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  per_state = -(probs * np.log(probs)).sum(-1)
  assert ent.state_entropy(logits, state_valid) == pytest.approx(per_state[state_valid].mean())
  assert ent.path_entropy(per_state, path) == pytest.approx(per_state[path >= 0].mean())
  mix = []
  for bi in range(b):
    for i in range(m):
      if target_valid[bi, i]:
        q = sum(gamma[bi, i, u] * probs[bi, u] for u in range(s))
        mix.append(-(q * np.log(q)).sum())
  assert ent.mixture_entropy(gamma, logits, target_valid) == pytest.approx(np.mean(mix))

  sums = ent.exlm_entropy_sums(logits, state_valid, path, gamma, target_valid)
  assert sums["state"][0] / sums["state"][1] == pytest.approx(per_state[state_valid].mean())
  assert sums["path"][1] == 6 and sums["mixture"][1] == 5
  jitted = jax.jit(ent.exlm_entropy_sums)(*map(jnp.asarray, (logits, state_valid, path, gamma, target_valid)))
  for name, (total, count) in sums.items():
    assert float(jitted[name][0]) == pytest.approx(total, rel=1e-5) and int(jitted[name][1]) == count


def test_mixture_of_two_one_hots_has_entropy_log_two():
  logits = np.full((1, 2, 3), -np.inf)
  logits[0, 0, 0] = logits[0, 1, 2] = 0.0
  gamma = np.full((1, 1, 2), 0.5)
  assert ent.mixture_entropy(gamma, logits, np.ones((1, 1), bool)) == pytest.approx(np.log(2))


# ---------------------------------------------------------------------------------------------
# Repeated-MLM

_SMILES_TOKEN = re.compile(
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%\d{2}|\d)")


@pytest.fixture(scope="module")
def smiles_sequences(request):
  """A few thousand MOSES test SMILES as <s> atom-level ids </s> (local regex tokenizer)."""
  root = request.getfixturevalue("shared_data")
  with gzip.open(root / "smiles" / "moses" / "test.csv.gz", "rt") as f:
    smiles = [row["SMILES"] for _, row in zip(range(3000), csv.DictReader(f))]
  ids: dict[str, int] = {}
  seqs = []
  for s in smiles:
    tokens = _SMILES_TOKEN.findall(s)
    assert "".join(tokens) == s
    body = [ids.setdefault(t, vocab.NUM_SPECIAL + len(ids)) for t in tokens]
    seqs.append(np.array([vocab.BOS, *body, vocab.EOS], np.int32))
  return seqs


def _within_binomial(measured, expected, trials, sigmas=4.5):
  return abs(measured - expected) <= sigmas * math.sqrt(expected * (1 - expected) / trials) + 1e-12


@pytest.mark.data
@pytest.mark.parametrize("p,k", [(0.15, 1), (0.3, 2), (0.5, 3), (0.7, 4), (0.8, 2)])
def test_repeated_mlm_ratios_on_smiles(smiles_sequences, p, k):
  rng = np.random.default_rng(int(p * 100) * 10 + k)
  samples = [rep.repeat_and_mask(s, k, p, rng) for s in smiles_sequences]
  content_tokens = sum(len(s) - 2 for s in smiles_sequences)
  assert _within_binomial(rep.unreal_token_ratio(samples), p, k * content_tokens)
  assert _within_binomial(rep.corrupted_semantics_ratio(samples), p**k, content_tokens)


@pytest.mark.data
def test_repeat_and_mask_structure(smiles_sequences):
  rng = np.random.default_rng(7)
  k = 3
  for seq in smiles_sequences[:50]:
    padded = np.concatenate([seq, np.full(5, vocab.PAD, np.int32)])
    out = rep.repeat_and_mask(padded, k, 0.6, rng)
    n_content = len(seq) - 2
    assert out.tokens.size == 2 + k * n_content
    assert out.tokens[0] == vocab.BOS and out.tokens[-1] == vocab.EOS
    assert not out.mask[~out.content].any() and (out.tokens[out.mask] == vocab.MASK).all()
    np.testing.assert_array_equal(out.tokens[~out.mask], out.targets[~out.mask])
    np.testing.assert_array_equal(out.targets[out.content].reshape(-1, k), np.repeat(seq[1:-1, None], k, 1))
    np.testing.assert_array_equal(out.positions[out.content].reshape(-1, k),
                                  np.repeat(np.arange(1, len(seq) - 1)[:, None], k, 1))
    np.testing.assert_array_equal(out.copy_index[out.content].reshape(-1, k)[0], np.arange(1, k + 1))
    assert out.all_masked.shape == padded.shape and not out.all_masked[[0, len(seq) - 1]].any()
    lost = out.mask[out.content].reshape(-1, k).all(axis=1)
    np.testing.assert_array_equal(out.all_masked[1:len(seq) - 1], lost)


@pytest.mark.data
def test_repeat_and_mask_blocks_fixed_length(smiles_sequences):
  n, k, p = 64, 2, 0.4
  blocks = np.full((len(smiles_sequences), n), vocab.PAD, np.int32)
  for row, seq in zip(blocks, smiles_sequences):
    row[:min(len(seq), n)] = seq[:n]
    row[min(len(seq), n) - 1] = vocab.EOS
  out = rep.repeat_and_mask_batch(blocks, k, p, np.random.default_rng(8))
  assert out.tokens.shape == out.positions.shape == (len(blocks), n) and out.all_masked.shape == blocks.shape
  truncated = 0
  for b, block in enumerate(blocks):
    real = out.targets[b][out.targets[b] != vocab.PAD]
    assert real[0] == vocab.BOS and real[-1] == vocab.EOS
    content = block[1:np.flatnonzero(block == vocab.EOS)[0]]
    kept = real[1:-1:k]
    np.testing.assert_array_equal(kept, content[:kept.size])  # a prefix of the original content
    if kept.size < content.size:
      truncated += 1
      assert 2 + k * (kept.size + 1) > n  # one more token would not have fit
  assert truncated > 0
  assert _within_binomial(rep.unreal_token_ratio(out), p, int(out.content.sum()))
  assert _within_binomial(rep.corrupted_semantics_ratio(out), p**k, int(out.source_content.sum()))
  element = rep.grain_transform(k, p).random_map({"tokens": blocks[0]}, np.random.default_rng(0))
  assert element["tokens"].shape == (n,) and element["all_masked"].shape == (n,)


def _moses_blocks(smiles_sequences, n=64):
  blocks = np.full((len(smiles_sequences), n), vocab.PAD, np.int32)
  for row, seq in zip(blocks, smiles_sequences):
    row[:len(seq)] = seq  # MOSES molecules are <= 51 tokens
  return blocks


@pytest.mark.data
def test_jax_repeat_tokens_equals_numpy_transform(smiles_sequences):
  blocks = _moses_blocks(smiles_sequences[:200])
  k = 3
  out = jax.device_get(jax.jit(repeated_mlm_objective.repeat_tokens, static_argnums=1)(jnp.asarray(blocks), k))
  assert out.tokens.shape == (len(blocks), repeated_mlm_objective.repeated_length(64, k))
  for b, block in enumerate(blocks):
    ref = rep.repeat_and_mask(block, k, 0.0, np.random.default_rng(0))
    t = ref.targets.size
    np.testing.assert_array_equal(out.tokens[b, :t], ref.targets)
    np.testing.assert_array_equal(out.positions[b, :t], ref.positions)
    np.testing.assert_array_equal(out.copy_index[b, :t], ref.copy_index)
    np.testing.assert_array_equal(out.content[b, :t], ref.content)
    assert (out.tokens[b, t:] == vocab.PAD).all()


@pytest.mark.data
def test_repeated_mlm_objective_measures_p_and_p_to_the_k(smiles_sequences):
  """The pretraining objective (configs/repeated_mlm_smiles_small.py) on real MOSES blocks: its measured
  unreal-token ratio is p and its corrupted-semantics ratio p^k."""
  module = config_lib.load_module("configs/repeated_mlm_smiles_small.py")
  config = module.get_config("size=tiny,k=3,fixed=corrupted,ratio=0.125")
  assert config.mask_prob == pytest.approx(0.5) and config.seq_len == 64
  assert [(d["repeated_mlm.num_copies"], round(d["mask_prob"], 4)) for d in module.get_sweep("ratio=0.25")] == [
      (1, 0.25), (2, 0.5), (4, round(0.25**0.25, 4))]
  config.model.update(vocab_size=64, num_layers=1)
  objective = objectives.get("repeated_mlm")
  objective.validate(config)
  num = 400
  blocks = jnp.asarray(_moses_blocks(smiles_sequences[:num]))
  params = jax.jit(lambda rng: objectives.base.init_params(objective, config, rng))(jax.random.PRNGKey(0))
  model = objective.make_model(config, True)
  loss, weight, metrics = jax.jit(model.apply)({"params": params}, blocks, jax.random.PRNGKey(1))
  ratio = lambda name: float(metrics[name][0] / metrics[name][1])  # noqa: E731
  content_tokens = sum(len(s) - 2 for s in smiles_sequences[:num])
  assert float(metrics["corrupted_ratio"][1]) == content_tokens
  assert _within_binomial(ratio("unreal_ratio"), 0.5, 3 * content_tokens)
  assert _within_binomial(ratio("corrupted_ratio"), 0.125, content_tokens)
  assert float(weight) == float(metrics["unreal_ratio"][0]) and float(metrics["overflow"][0]) == 0
  assert np.isfinite(float(loss)) and float(loss) > 0
  config.repeated_mlm.loss = "lost"
  _, weight_lost, metrics = jax.jit(objective.make_model(config, True).apply)(
      {"params": params}, blocks[:32], jax.random.PRNGKey(1))
  assert float(weight_lost) == 3 * float(metrics["corrupted_ratio"][0])  # every copy of each lost token
  config.repeated_mlm.loss = "some"
  with pytest.raises(ValueError, match="repeated_mlm.loss"):
    objective.validate(config)


def test_solve_and_grid():
  for r in (0.01, 0.1, 0.3):
    for k in range(1, 9):
      p = rep.solve_p(r, k)
      assert p**k == pytest.approx(r) and rep.solve_k(r, p) == pytest.approx(k)
  assert rep.solve_k(0.125, 0.5) == pytest.approx(3.0)
  fixed_r = rep.pk_grid(corrupted=0.1, ks=(1, 2, 4))
  assert [g.k for g in fixed_r] == [1, 2, 4]
  assert all(g.corrupted_ratio == pytest.approx(0.1) and g.unreal_ratio == g.p for g in fixed_r)
  assert fixed_r[0].p == pytest.approx(0.1) and fixed_r[1].p == pytest.approx(math.sqrt(0.1))
  fixed_p = rep.pk_grid(unreal=0.5, ks=(1, 2, 3))
  assert [g.corrupted_ratio for g in fixed_p] == [0.5, 0.25, 0.125]
  targeted = rep.pk_grid(unreal=0.5, corrupted_targets=(0.1, 0.3, 0.9))
  assert [(g.k, g.corrupted_ratio) for g in targeted] == [(3, 0.125), (2, 0.25), (1, 0.5)]
  with pytest.raises(ValueError, match="exactly one"):
    rep.pk_grid(unreal=0.5, corrupted=0.1)


# ---------------------------------------------------------------------------------------------
# Plots


def test_plots_write_png(tmp_path):
  rng = np.random.default_rng(9)
  collector = er.RankCollector()
  for group in ("mlm/masked_real", "mlm/clean_real", "mlm/mask"):
    collector.add_layers(group, rng.normal(size=(4, 2, 30, 8)) * np.geomspace(1, 0.1, 8))
  out = plots.plot_rank_vs_layer(collector.results(0.9), tmp_path / "rank.png")
  mixed = {**collector.results(0.9), ("other", 0): collector.results(0.5)[("mlm/mask", 0)]}
  with pytest.raises(ValueError, match="mix settings"):
    plots.plot_rank_vs_layer(mixed, tmp_path / "bad.png")
  out2 = plots.plot_entropy_vs_mask_ratio(
      {"MLM": ([0.15, 0.3, 0.5], [2.1, 2.4, 2.9]), "ExLM": ([0.5, 0.15, 0.3], [2.0, 1.2, 1.5])},
      tmp_path / "sub" / "entropy.png", vocab_size=40)
  s = 12
  trans = np.triu(rng.random((s, s)), 1)
  trans /= np.maximum(trans.sum(-1, keepdims=True), 1e-9)
  path = np.array([0, -1, -1, 1, -1, 2, -1, -1, 3, -1, -1, 4])
  with np.errstate(divide="ignore"):
    log_trans = np.log(trans)
  out3 = plots.plot_dag_alignment(log_trans, path, ["<s>", "C", "(", "=O", "</s>"], tmp_path / "dag.png",
                                  state_labels=[f"g{u // 3}c{u % 3 + 1}" for u in range(s)], log_probs=True)
  for written in (out, out2, out3):
    assert written.endswith(".png") and pathlib.Path(written).stat().st_size > 1000
