"""ExLM: expansion indices (the worked example of docs/design.md §4.2), copies differ only by the copy index,
normalised transitions, emissions only at the DAG vertices, float64 numpy reference of the loss
(brute-force path enumeration), k = 1, the CTC ablation, padded rows, encoder hand-off, configs,
the sharded step and a short CLI run on MOSES."""

import functools
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import numpy_reference as ref
from exlm_jax import config_lib
from exlm_jax.data import vocab
from exlm_jax.objectives import base, exlm
from exlm_jax.objectives.masking import select_masked_positions

N, V, P, K = 10, 24, 0.2, 3  # M_max = 2, G_max = 4, S_max = 12, L_max = 18
REPO = pathlib.Path(__file__).resolve().parents[1]
S, B, M = vocab.BOS, vocab.EOS, vocab.MASK


def _config(**knobs):
  config = config_lib.pretrain_config("exlm", "tiny", seq_len=N, mask_prob=P)
  config.model.update(vocab_size=V, num_layers=1, dropout_rate=0.0, attention_dropout_rate=0.0)
  config.exlm = ml_collections.ConfigDict({"num_copies": K, "max_link_positions": 32, **knobs})
  return config


def _batch():
  """Rows: a full block (adjacent masks), a shorter one, one with no mask, an all-<pad> row."""
  rng = np.random.RandomState(0)
  tokens = np.full((4, N), vocab.PAD, np.int32)
  is_masked = np.zeros((4, N), bool)
  for row, (length, masked) in enumerate([(10, (4, 5)), (7, (1, 3)), (4, ())]):
    tokens[row, :length] = rng.randint(vocab.NUM_SPECIAL, V, length)
    tokens[row, 0], tokens[row, length - 1] = S, B
    is_masked[row, list(masked)] = True
  return tokens, is_masked


@pytest.fixture(scope="module")
def params():
  """k = 3 'dag' params (a superset of every variant's), drawn N(0, 0.2) (LayerNorm scales around 1)
  so the checks are not blind; shapes from `eval_shape`, values from numpy (no init compile)."""
  model = exlm.make_model(_config(), True)
  shapes = jax.eval_shape(lambda key: nn.unbox(model.init(key, base.dummy_tokens(1, N), key)["params"]),
                          jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  draw = lambda path, x: (float(path[-1].key == "scale") + 0.2 * rng.normal(size=x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(lambda path, x: jnp.asarray(draw(path, x)), shapes)


@functools.lru_cache(maxsize=None)
def _jitted(knobs, method):
  model = exlm.make_model(_config(**dict(knobs)), True)
  return jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=method))


def _forward(params, tokens, is_masked, method=exlm.ExLMModel.forward, **knobs):
  """A `_config(**knobs)` model's method on one fixed mask; compiled once per (knobs, method)."""
  fn = _jitted(tuple(sorted(knobs.items())), method)
  return jax.device_get(fn(params, jnp.asarray(tokens), jnp.asarray(is_masked)))


@pytest.fixture(scope="module")
def dag_run(params):
  """Forward + Viterbi alignment of the default model on `_batch()` (one compile shared by tests)."""
  tokens, is_masked = _batch()
  return _forward(params, tokens, is_masked, exlm.ExLMModel.best_alignment)


# ----------------------------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------------------------


def _expand_reference(tokens, is_masked, k):
  """Per-slot (token, orig, copy, is_ext) lists and targets, by the rule of docs/design.md §4.2."""
  rows = []
  for tok, mask in zip(tokens, is_masked):
    length = int((tok != vocab.PAD).sum())
    slots, targets = [], []
    for i in range(length):
      if mask[i] or i == 0 or i == length - 1:
        targets.append(tok[i])
        slots += [(M if mask[i] else tok[i], i, c + 1, 1) for c in range(k)]
      else:
        slots.append((tok[i], i, 0, 0))
    rows.append((slots, targets))
  return rows


def _transitions_reference(states, slots, valid, p, num_heads, max_jump=-1):
  """Gated multi-head link head (docs/design.md §4.4) in float64 with explicit loops over A(u)."""
  p = ref.f64(p)
  z = np.concatenate([states, p["position_embed"]["embedding"][slots]], axis=-1)
  q, k, gate = ref.dense(z, p["query"]), ref.dense(z, p["key"]), ref.dense(z, p["gate"])
  scores = np.einsum("buhd,bvhd->bhuv", q, k) / math.sqrt(q.shape[-1])
  out = np.full(scores.shape[:1] + scores.shape[2:], -np.inf)
  for b, u in itertools.product(range(out.shape[0]), range(out.shape[1])):
    succ = [v for v in range(u + 1, out.shape[2])
            if valid[b, u] and valid[b, v] and (max_jump < 0 or v - u <= max_jump)]
    if not succ:
      continue
    g = np.exp(gate[b, u] - gate[b, u].max())
    g /= g.sum()
    mix = 0.0
    for c in range(num_heads):
      e = np.exp(scores[b, c, u, succ] - scores[b, c, u, succ].max())
      mix = mix + g[c] * e / e.sum()
    out[b, u, succ] = np.log(mix)
  return out


def _dag_brute_force(emit, trans, num_targets, num_vertices):
  """log sum over every path 0 = a_0 < ... < a_{M-1} = S-1 of emissions + transitions."""
  scores = []
  for inner in itertools.combinations(range(1, num_vertices - 1), num_targets - 2):
    path = (0,) + inner + (num_vertices - 1,)
    scores.append(sum(emit[i, a] for i, a in enumerate(path)) + sum(trans[a, b] for a, b in zip(path, path[1:])))
  scores = np.asarray(scores)
  return scores.max() + np.log(np.exp(scores - scores.max()).sum())


# ----------------------------------------------------------------------------------------------
# expansion
# ----------------------------------------------------------------------------------------------


def test_expansion_reproduces_worked_example():
  # docs/design.md §4.2: k = 3, `<s> a M b M M c </s>`; plus a padded row whose interior </s> (packed
  # documents) stays an ordinary token, and an all-<pad> row.
  a, b_, c = 10, 11, 12
  tokens = np.array([[S, a, 20, b_, 21, 22, c, B, vocab.PAD, vocab.PAD],
                     [S, a, 20, B, b_, B] + [vocab.PAD] * 4,
                     [vocab.PAD] * 10], np.int32)
  is_masked = np.zeros_like(tokens, bool)
  is_masked[0, [2, 4, 5]] = is_masked[1, 2] = True
  ex = jax.device_get(jax.jit(lambda t, m: exlm.expand(t, m, 3, 5))(tokens, is_masked))
  assert ex.tokens.shape == (3, 10 + 2 * 5) and ex.vertex_slot.shape == (3, 15)
  row = slice(0, 18)
  np.testing.assert_array_equal(ex.tokens[0, row], [S, S, S, a, M, M, M, b_, M, M, M, M, M, M, c, B, B, B])
  np.testing.assert_array_equal(ex.positions[0, row], [0, 0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 5, 5, 6, 7, 7, 7])
  np.testing.assert_array_equal(ex.copy_index[0, row], [1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_array_equal(ex.is_ext[0, row], [1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(ex.targets[0], [S, 20, 21, 22, B])
  np.testing.assert_array_equal(ex.vertex_slot[0], [0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 15, 16, 17])
  assert (ex.num_targets.tolist(), ex.num_vertices.tolist(), ex.length.tolist()) == ([5, 3, 0], [15, 9, 0], [18, 12, 0])
  # Row 0 has two real <pad> slots after </s>; everything from the real expanded length on is <pad>.
  np.testing.assert_array_equal(ex.padding_mask.sum(-1), [2, 8, 20])
  np.testing.assert_array_equal(ex.tokens[1, :12], [S, S, S, a, M, M, M, B, b_, B, B, B])
  np.testing.assert_array_equal(ex.copy_index[1, :12], [1, 2, 3, 0, 1, 2, 3, 0, 0, 1, 2, 3])
  np.testing.assert_array_equal(ex.targets[1], [S, 20, B, vocab.PAD, vocab.PAD])
  _check_expansion(ex, tokens, is_masked, 3)


def _check_expansion(ex, tokens, is_masked, k):
  for b, (slots, targets) in enumerate(_expand_reference(tokens, is_masked, k)):
    got = list(zip(ex.tokens[b], ex.positions[b], ex.copy_index[b], ex.is_ext[b].astype(int)))[:len(slots)]
    assert got == slots
    np.testing.assert_array_equal(ex.targets[b, :len(targets)], targets)
    assert (ex.targets[b, len(targets):] == vocab.PAD).all() and ex.target_valid[b].sum() == len(targets)
    # The DAG vertices are exactly the expanded slots, in order; copies carry the same token id.
    np.testing.assert_array_equal(ex.vertex_slot[b, :ex.num_vertices[b]], np.flatnonzero(ex.is_ext[b]))
    groups = ex.tokens[b, ex.vertex_slot[b, :ex.num_vertices[b]]].reshape(-1, k)
    assert (groups == groups[:, :1]).all()
    assert not ex.is_ext[b][ex.padding_mask[b]].any() and (ex.tokens[b][ex.padding_mask[b]] == vocab.PAD).all()


def test_static_bounds():
  assert exlm.max_groups(0.15, 128) == 22 and exlm.max_expanded_length(0.15, 128, 4) == 128 + 3 * 22
  assert exlm.max_expanded_length(P, N, K) == 18 and exlm.max_expanded_length(P, N, 1) == N


# ----------------------------------------------------------------------------------------------
# model: copies, transitions, emissions, loss
# ----------------------------------------------------------------------------------------------


def test_copies_differ_only_through_the_copy_index(params, dag_run):
  tokens, is_masked = _batch()
  shared = _forward(params, tokens, is_masked, positions="rope1d_shared")
  out = dag_run[0]
  ex = out.expansion
  for b in range(3):
    slots = ex.vertex_slot[b, :ex.num_vertices[b]].reshape(-1, K)
    assert (ex.tokens[b][slots] == ex.tokens[b][slots[:, :1]]).all()  # same input embedding
    copies = shared.hidden[b][slots]  # (E, k, D)
    np.testing.assert_allclose(copies, np.broadcast_to(copies[:, :1], copies.shape), atol=1e-5)
    spread = np.abs(out.hidden[b][slots] - out.hidden[b][slots[:, :1]]).max(axis=(1, 2))
    assert (spread > 1e-2).all()  # 2-D RoPE tells the copies apart


def test_transition_rows_are_normalised_over_allowed_successors(dag_run):
  out = dag_run[0]
  trans, valid, count = out.trans_logp, out.expansion.vertex_valid, out.expansion.num_vertices
  probs = np.exp(trans.astype(np.float64))
  upper = np.triu(np.ones(trans.shape[1:], bool), 1)
  for b in range(4):
    allowed = upper & valid[b][:, None] & valid[b][None, :]
    live = np.arange(trans.shape[1]) < count[b] - 1  # valid vertices but the last
    np.testing.assert_array_equal(allowed.any(-1), live)
    np.testing.assert_allclose(probs[b].sum(-1)[live], 1.0, atol=1e-5)
    assert (probs[b][allowed] > 0).all() and (probs[b][~allowed] == 0).all()


@pytest.mark.parametrize("max_jump", [-1, 5])
def test_transition_mixture_is_a_distribution_and_respects_the_band(max_jump):
  rng = np.random.RandomState(0)
  valid = jnp.asarray(np.arange(9)[None, :] < np.array([[9], [6]]))
  scores = (rng.normal(size=(2, 3, 9, 9)) * 3).astype(np.float32)
  gates = rng.normal(size=(2, 9, 3)).astype(np.float32)
  mix = jax.jit(lambda s, g: exlm.mix_transition_heads(s, g, exlm.allowed_transitions(valid, max_jump)))
  logp = np.asarray(mix(scores, gates), np.float64)
  for b, n in enumerate((9, 6)):
    for u in range(9):
      succ = [v for v in range(u + 1, n) if max_jump < 0 or v - u <= max_jump]
      assert set(np.flatnonzero(np.isfinite(logp[b, u]))) == set(succ)
      if succ:
        g = np.exp(gates[b, u]) / np.exp(gates[b, u]).sum()
        heads = np.exp(scores[b][:, u][:, succ])
        heads /= heads.sum(-1, keepdims=True)  # (H, |A(u)|)
        np.testing.assert_allclose(np.exp(logp[b, u, succ]), g @ heads, rtol=1e-5)


def test_emissions_equal_full_vocab_computation_at_the_states(params, dag_run):
  out = dag_run[0]
  ex = out.expansion
  assert out.logits.shape == (4, K * exlm.max_groups(P, N), V)  # logits only at the DAG vertices
  full = ref.log_softmax(ref.lm_head(out.hidden.astype(np.float64), params["lm_head"],
                                     params["encoder"]["token_embed"]["embedding"]))  # (B, L, V)
  for b in range(3):
    expected = full[b][ex.vertex_slot[b]][:, ex.targets[b]].T  # (G, S)
    np.testing.assert_allclose(out.emit_logp[b], expected, atol=2e-5)


def test_loss_equals_float64_numpy_reference(params, dag_run):
  tokens, is_masked = _batch()
  out = dag_run[0]
  ex = out.expansion
  model_cfg = base.model_config(_config())
  hidden = ref.encoder(params["encoder"], ex.tokens[:3], model_cfg, ex.positions[:3], ex.copy_index[:3],
                       ex.padding_mask[:3])
  keep = ~ex.padding_mask[:3]
  np.testing.assert_allclose(out.hidden[:3][keep], hidden[keep], atol=1e-4)
  states = np.take_along_axis(hidden, ex.vertex_slot[:3, :, None], axis=1)
  emit = ref.log_softmax(ref.lm_head(states, params["lm_head"], params["encoder"]["token_embed"]["embedding"]))
  trans = _transitions_reference(states, ex.vertex_slot[:3], ex.vertex_valid[:3], params["transition_head"],
                                 model_cfg.num_heads)
  expected = []
  for b in range(3):
    m, s = int(ex.num_targets[b]), int(ex.num_vertices[b])
    emit_b = emit[b][:, ex.targets[b]].T  # (G, S)
    expected.append(-_dag_brute_force(emit_b, trans[b], m, s) / m)
  assert ex.num_targets[:3].tolist() == [4, 4, 2]
  np.testing.assert_allclose(out.per_example_loss, expected + [0.0], rtol=2e-5)
  # Viterbi twin: a monotone path from the first <s> copy to the last </s> copy, each target once.
  _, score, path = dag_run
  for b in range(3):
    m, s = int(ex.num_targets[b]), int(ex.num_vertices[b])
    emitted = path[b][path[b] >= 0]
    np.testing.assert_array_equal(emitted, np.arange(m))
    assert path[b, 0] == 0 and path[b, s - 1] == m - 1 and score[b] <= -expected[b] * m + 1e-4
  assert (path[3] == -1).all()


def test_k1_is_forced_along_the_identity(params):
  tokens, is_masked = _batch()
  out = _forward(params, tokens, is_masked, num_copies=1)
  ex = out.expansion
  np.testing.assert_array_equal(ex.num_vertices, ex.num_targets)
  assert ex.tokens.shape[1] == N and (ex.copy_index[ex.is_ext] == 1).all()
  for b in range(3):
    m = int(ex.num_targets[b])
    ll = np.trace(out.emit_logp[b, :m, :m].astype(np.float64)) + np.diagonal(out.trans_logp[b], 1)[:m - 1].sum()
    np.testing.assert_allclose(out.per_example_loss[b], -ll / m, rtol=1e-5)
  assert out.per_example_loss[3] == 0


def _ctc_reference(logp, target):
  """Sum over all k-frame strings over {target, blank} that collapse to [target] (one run of target)."""
  k = logp.shape[0]
  total = 0.0
  for frames in itertools.product((0, 1), repeat=k):
    ones = np.flatnonzero(frames)
    if len(ones) and ones[-1] - ones[0] + 1 == len(ones):
      total += np.exp(sum(logp[t, target] if f else logp[t, exlm.CTC_BLANK] for t, f in enumerate(frames)))
  return np.log(total)


def test_ctc_ablation_equals_per_group_reference(params):
  tokens, is_masked = _batch()
  out = _forward(params, tokens, is_masked, transitions="ctc")
  assert out.trans_logp is None
  ex = out.expansion
  logp = ref.log_softmax(out.logits.astype(np.float64))
  for b in range(3):
    m = int(ex.num_targets[b])
    ll = sum(_ctc_reference(logp[b, g * K:(g + 1) * K], ex.targets[b, g]) for g in range(m))
    np.testing.assert_allclose(out.per_example_loss[b], -ll / m, rtol=1e-5)
  assert out.per_example_loss[3] == 0


def test_padded_rows_contribute_nothing(params, dag_run):
  config = _config()
  model = exlm.make_model(config, True)
  def loss(p, t, key):
    loss_sum, weight, metrics = model.apply({"params": p}, t, key)
    return loss_sum, (weight, metrics)

  loss_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  tokens = jnp.asarray(_batch()[0])
  key = jax.random.PRNGKey(3)
  (loss_sum, (weight, metrics)), grads = loss_fn(params, tokens, key)
  assert float(weight) == 3 and float(metrics["loss"][1]) == 3
  # The model's own masks: <s> / </s> never masked, E = m + 2, expansion by the numpy rule.
  sel = jax.device_get(select_masked_positions(tokens, key, P))
  out = _forward(params, tokens, sel.is_masked, exlm.ExLMModel.best_alignment)[0]
  assert not sel.is_masked[np.isin(_batch()[0], vocab.UNMASKABLE)].any()
  np.testing.assert_array_equal(out.expansion.num_targets, np.where(np.arange(4) < 3, sel.count + 2, 0))
  _check_expansion(out.expansion, _batch()[0], sel.is_masked, K)
  expected = out.per_example_loss
  assert expected[3] == 0
  np.testing.assert_allclose(loss_sum, expected.sum(), rtol=1e-6)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert np.abs(np.asarray(grads["transition_head"]["query"]["kernel"])).max() > 0
  (loss_sum, (weight, metrics)), grads = loss_fn(params, jnp.full_like(tokens, vocab.PAD), key)
  assert float(loss_sum) == 0 and float(weight) == 0
  assert all((np.asarray(g) == 0).all() for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------------------------
# plumbing: validation, encoder hand-off, config files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,message", [
    ("exlm.num_copies", 0, "num_copies"),
    ("exlm.transitions", "linear", "transitions"),
    ("exlm.positions", "rope1d", "exlm.positions"),
    ("model.positions", "absolute+relbias", "model.positions"),
    ("exlm.max_transition_length", 4, "2k-1"),
    ("exlm.max_link_positions", 12, "max_link_positions"),
    ("mask_prob", 0.0, "mask_prob"),
])
def test_validation_errors_are_one_line(key, value, message):
  config = _config()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message) as err:
    exlm.validate(config)
  assert "\n" not in str(err.value)


def test_unknown_knob_is_rejected():
  config = _config()
  config.exlm.copies = 2
  with pytest.raises(ValueError, match="unknown config.exlm keys"):
    exlm.validate(config)
  del config["exlm"]
  exlm.validate(config)  # absent section = defaults


def test_encoder_params_is_exactly_an_encoder(params):
  tree = exlm.encoder_params(params)
  assert set(tree) == {"token_embed", "stack"}
  assert exlm.encoder_params(params, _config()) is tree
  assert base.get("exlm").encoder_params is exlm.encoder_params
  broken = {**params, "encoder": {**params["encoder"], "link": {"w": np.zeros(2)}}}
  with pytest.raises(ValueError, match="unexpected.*link"):
    exlm.encoder_params(broken)
  stack = dict(params["encoder"]["stack"])
  del stack["final_ln"]
  with pytest.raises(ValueError, match="missing.*final_ln"):
    exlm.encoder_params({**params, "encoder": {**params["encoder"], "stack": stack}}, _config())
  with pytest.raises(KeyError, match="no 'encoder'"):
    exlm.encoder_params({"transition_head": params["transition_head"]})
  with pytest.raises(ValueError, match="cannot read an Encoder"):
    exlm.encoder_params({"encoder": {"stack": stack}})


def _config_module(name):
  return config_lib.load_module(f"configs/{name}.py")


@pytest.mark.parametrize("name,arg", [
    ("exlm_base", None), ("exlm_base", "size=large,k=2"), ("exlm_smiles_small", None),
    ("exlm_smiles_small", "size=tiny"), ("exlm_smiles_small", "k=1,transitions=ctc,positions=rope1d_shared"),
    ("exlm_text_small", None), ("exlm_text_small", "size=tiny"),
])
def test_config_files_validate(name, arg):
  config = _config_module(name).get_config(arg)
  config.model.vocab_size = 64
  exlm.validate(config)
  assert config.objective == "exlm" and config.model.pre_ln and config.model.positions == "rope2d"
  assert (config.adam_b1, config.adam_b2, config.adam_eps, config.weight_decay, config.grad_clip_norm) == (
      0.9, 0.98, 1e-6, 0.01, 0.0)
  if name == "exlm_base":
    assert (config.learning_rate, config.warmup_steps, config.total_steps, config.batch_size, config.seq_len,
            config.mask_prob) == (2e-3, 1380, 23_000, 4096, 128, 0.15)
    assert config.batch_size % config.grad_accum_steps == 0
  with pytest.raises(ValueError):
    _config_module(name).get_config("nonsense=1")


def test_sweeps_override_existing_keys():
  module = _config_module("exlm_smiles_small")
  config = base.with_defaults(module.get_config("size=tiny"))  # as main.py: every option of config.exlm
  assert [d["exlm.num_copies"] for d in module.get_sweep(None)] == [2, 4, 8]
  assert [d["mask_prob"] for d in module.get_sweep("sweep=mask")] == [0.15, 0.3, 0.45, 0.6]
  ablations = module.get_sweep("sweep=ablations")
  assert len(ablations) == 4
  for overrides in module.get_sweep(None) + module.get_sweep("sweep=mask") + ablations:
    variant = config.copy_and_resolve_references()
    for key, value in overrides.items():
      section, _, name = key.rpartition(".")
      target = variant[section] if section else variant
      assert name in target
      target[name] = value
    variant.model.vocab_size = 64
    exlm.validate(variant)


# ----------------------------------------------------------------------------------------------
# trainer integration
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_exlm_step_equals_single_device():
  from exlm_jax.train import partitioning, steps  # pylint: disable=g-import-not-at-top

  config = config_lib.pretrain_config("exlm", "tiny", seq_len=16, batch_size=8)
  config.model.update(vocab_size=40, num_layers=1)
  config.exlm = ml_collections.ConfigDict(dict(num_copies=2))
  rng = np.random.RandomState(0)
  tokens = rng.randint(vocab.NUM_SPECIAL, 40, (8, 16)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = S, B
  tokens[1, 9:], tokens[1, 8] = vocab.PAD, B
  tokens[5] = vocab.PAD
  setups = [steps.TrainSetup.create(config, partitioning.create_mesh(mesh, jax.devices()[:size]))
            for mesh, size in (({"data": 1, "fsdp": 1, "tensor": 1}, 1), ({"data": 2, "fsdp": 4, "tensor": 1}, 8))]
  params = [s.init_state().params for s in setups]
  (loss1, grads1), (loss8, grads8) = [s.loss_and_grads(p, tokens, 3) for s, p in zip(setups, params)]
  assert np.isfinite(loss1)
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.slow
@pytest.mark.data
def test_cli_few_steps_on_moses(shared_data, tmp_path):
  env = {**os.environ, "EXLM_DATA_DIR": str(shared_data), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  cmd = [sys.executable, "main.py", "--config", "configs/exlm_smiles_small.py:size=tiny",
         "--config.total_steps=3", "--config.log_every=1", "--config.eval_every=3", "--config.eval_batches=1",
         "--config.exlm.num_copies=2", "--workdir", str(tmp_path / "run")]
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  errors = [line for line in result.stderr.splitlines() if line[:1] not in ("I", "W")]  # drop absl info lines
  assert result.returncode == 0, "\n".join(errors)[-4000:]
  final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
  assert final["step"] == 3 and final["objective"] == "exlm"
  assert np.isfinite(final["train"]["loss"]) and np.isfinite(final["eval"]["loss"])
  assert final["train"]["expanded_length"] > final["train"]["length"]
