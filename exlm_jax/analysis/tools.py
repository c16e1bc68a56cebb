"""The papers' analyses as tools that run on any pretraining workdir (CLI: `python -m exlm_jax.analysis`).

Every tool is a function returning a JSON-able dict and writing `<tool>.json` and `<tool>.png` into
`out_dir`:
  effective_rank(workdir, data, out_dir)  rank_eps of every layer's token states (MAE-LM reference §8.2)
  entropy(workdir, data, out_dir)         predictive entropy at masked positions vs mask ratio (ExLM §8.2)
  repeated_mlm(workdir, data, out_dir)   measured unreal / corrupted ratios of the Repeated-MLM grid (ExLM §8.1)
  dag_view(workdir, out_dir, ...)         Viterbi alignment + transition matrix of one input (ExLM §8.5)
  report(workdirs, data, out_dir)         effective_rank + entropy per workdir and one Markdown comparison

Token groups of `effective_rank` (real = not <s>, </s>, <pad>; masks drawn with the pretraining rule at
the run's mask_prob, always replaced by [MASK], seeded):
  mlm:   'masked_input/real' real unmasked tokens of the masked input (group 1), 'clean_input/real' the
         same positions on the clean input (group 2), 'masked_input/mask' the [MASK] states (group 3);
  maelm: 'encoder_clean/real' encoder on the clean input (group 4), 'encoder_compact/real' encoder on the
         compacted masked input with original positions, as seen in pretraining;
  exlm:  'encoder_clean/real' encoder on the clean input with copy index 0 (no expansion).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exlm_jax.analysis import effective_rank as er
from exlm_jax.analysis import entropy as ent
from exlm_jax.analysis import plots
from exlm_jax.analysis import repeated_mlm as rmlm
from exlm_jax.data import vocab
from exlm_jax.objectives import repeated_mlm as repeated_mlm_objective

DEFAULT_MASK_RATIOS = (0.15, 0.3, 0.45, 0.6)


# ----------------------------------------------------------------------------------------------
# Loading a workdir and the analysis data
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A restored pretraining workdir."""

  workdir: str
  config: ml_collections.ConfigDict
  tokenizer: Any
  params: Any
  step: int
  jitted: dict = dataclasses.field(default_factory=dict, repr=False)  # (tool fn, extra) -> jitted fn

  @property
  def objective(self) -> str:
    return self.config.objective

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))

  def model(self, **overrides):
    """The objective's Linen module (deterministic), attributes replaced by `overrides`."""
    from exlm_jax import objectives  # pylint: disable=g-import-not-at-top  (registers all objectives)
    module = objectives.get(self.objective).make_model(self.config, True)
    return module.clone(**overrides) if overrides else module

  def encoder(self):
    from exlm_jax.models.encoder import Encoder, ModelConfig  # pylint: disable=g-import-not-at-top
    return Encoder(ModelConfig.from_config(self.config.model), deterministic=True)


def load_run(workdir: str) -> Run:
  """Config, tokenizer and latest params (only the params: no optimizer state) of a pretraining run."""
  from exlm_jax import api  # pylint: disable=g-import-not-at-top
  location = api.resolve_run(workdir)
  if location.kind == "finetune":
    raise ValueError(f"{location.workdir} is a fine-tuning run; the analyses need a pretraining workdir")
  config = ml_collections.ConfigDict(api.read_json(location.workdir / api.CONFIG_FILE))
  params, step = api.restore_params(location.checkpoint_dir, location.step)
  return Run(str(location.workdir), config, api.load_tokenizer(location.workdir), params, int(step))


def _as_run(run) -> Run:
  return run if isinstance(run, Run) else load_run(run)


def encode_records(records: Sequence[str], tokenizer) -> list[list[int]]:
  """Token ids per record; a record the tokenizer rejects becomes [] (dropped later)."""
  from exlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline._encode_chunk(tokenizer, list(records))[0]  # pylint: disable=protected-access


def make_analysis_blocks(ids: Sequence[Sequence[int]], kind: str, seq_len: int) -> np.ndarray:
  """(R, seq_len) int32 blocks like the pretraining pipeline: SMILES one record per block (truncated),
  text as a </s>-joined stream cut into windows of seq_len - 2. Empty records are dropped."""
  from exlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ids = [list(x) for x in ids if len(x)]
  if not ids:
    raise ValueError("no tokenizable record in --data; check the file and that it matches the run's tokenizer")
  if kind == "smiles":
    lengths = np.asarray([len(x) for x in ids], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.concatenate([np.asarray(x, np.int64) for x in ids])
    return pipeline.make_blocks(flat, starts, np.minimum(lengths, seq_len - 2), seq_len)
  stream = []
  for x in ids:
    stream.extend(([vocab.EOS] if stream else []) + x)
  flat = np.asarray(stream, np.int64)
  content = seq_len - 2
  starts = np.arange(0, flat.size, content)
  return pipeline.make_blocks(flat, starts, np.minimum(flat.size - starts, content), seq_len)


def load_data_blocks(path: str, run: Run, max_sequences: int = 512) -> np.ndarray:
  """Reads `path` (SMILES or text, any format the pipeline reads) into <= max_sequences (R, n) blocks with
  the run's tokenizer, data kind and seq_len, all-<pad> trailing columns removed (n <= seq_len)."""
  from exlm_jax.data import builders  # pylint: disable=g-import-not-at-top
  kind = run.config.data.name
  local = builders.resolve_source(path, "--data")
  records = []
  for record in builders.read_records(local, kind=kind, column=str(run.config.data.get("column", "")),
                                      documents=run.config.data.get("documents", "line")):
    if record:
      records.append(record)
    if kind == "smiles" and len(records) >= max_sequences:
      break
    if kind == "text" and len(records) >= 50 * max_sequences:
      break
  blocks = make_analysis_blocks(encode_records(records, run.tokenizer), kind, run.config.seq_len)
  return trim_padding(blocks[:max_sequences])


def trim_padding(blocks: np.ndarray) -> np.ndarray:
  """(R, n) -> (R, n') without the trailing columns that are <pad> in every row (SMILES blocks are mostly
  padding); the model's outputs at the kept slots do not change, the work shrinks."""
  used = np.flatnonzero((blocks != vocab.PAD).any(axis=0))
  return blocks[:, :used[-1] + 1] if used.size else blocks


def batches(blocks: np.ndarray, batch_size: int):
  """Yields (index, (b, n) block batch); the last one is padded with all-<pad> rows to batch_size."""
  for index, start in enumerate(range(0, len(blocks), batch_size)):
    chunk = blocks[start:start + batch_size]
    if len(chunk) < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
    yield index, chunk


def select_masks(tokens: np.ndarray, mask_prob: float, seed: int, index: int):
  """The pretraining mask rule (objectives/masking.py), seeded per batch: MaskSelection of numpy arrays."""
  from exlm_jax.objectives.masking import select_masked_positions  # pylint: disable=g-import-not-at-top
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), index)
  return jax.device_get(select_masked_positions(jnp.asarray(tokens), rng, float(mask_prob)))


def real_tokens(tokens) -> np.ndarray:
  """(B, n) bool: content slots (not <s>, </s>, <pad>)."""
  return ~np.isin(np.asarray(tokens), vocab.UNMASKABLE)


def _write_json(path: str, payload: dict) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=_jsonable)
  return path


def _jsonable(x):
  """numpy scalars and arrays as Python values (json.dump's `default`)."""
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  raise TypeError(f"cannot write {type(x).__name__} to JSON")


# ----------------------------------------------------------------------------------------------
# effective_rank
# ----------------------------------------------------------------------------------------------


def _cached(run: Run, name: str, build, *extra):
  """One jitted function per (tool function, extra) on `run`, so repeated tool calls (report) skip compiles."""
  key = (name, *extra)
  if key not in run.jitted:
    run.jitted[key] = build()
  return run.jitted[key]


def _hidden_fn(run: Run):
  """fn(tokens (B, L), positions (B, L) | None, padding (B, L)) -> tuple of L+1 float32 (B, L, D) states."""
  encoder = run.encoder()

  def build():
    def hidden(params, tokens, positions, padding):
      _, states = encoder.apply({"params": params}, tokens, positions=positions, padding_mask=padding,
                                return_hidden_states=True)
      return tuple(h.astype(jnp.float32) for h in states)
    return jax.jit(hidden)

  jitted = _cached(run, "hidden", build)
  return lambda tokens, positions, padding: jitted(run.params["encoder"], tokens, positions, padding)


def collect_states(run: Run, blocks: np.ndarray, batch_size: int = 32, seed: int = 0):
  """Yields (group, layers: tuple of (B, n, D) numpy arrays, rows (B, n) bool) per batch and group."""
  hidden = _hidden_fn(run)
  mask_prob = float(run.config.mask_prob)
  for index, tokens in batches(blocks, batch_size):
    padding = tokens == vocab.PAD
    real = real_tokens(tokens)
    clean = jax.device_get(hidden(tokens, None, padding))
    if run.objective == "mlm":
      sel = select_masks(tokens, mask_prob, seed, index)
      masked = jax.device_get(hidden(np.where(sel.is_masked, vocab.MASK, tokens), None, padding))
      yield "masked_input/real", masked, real & ~sel.is_masked
      yield "clean_input/real", clean, real & ~sel.is_masked
      yield "masked_input/mask", masked, sel.is_masked
    elif run.objective == "maelm":
      from exlm_jax.objectives import maelm  # pylint: disable=g-import-not-at-top
      yield "encoder_clean/real", clean, real
      sel = select_masks(tokens, mask_prob, seed, index)
      view = jax.device_get(maelm.compact_kept(jnp.asarray(tokens), jnp.asarray(sel.is_masked), tokens.shape[1]))
      compact = jax.device_get(hidden(view.tokens, view.positions, view.padding))
      yield "encoder_compact/real", compact, real_tokens(view.tokens)
    elif run.objective == "exlm":
      yield "encoder_clean/real", clean, real
    else:
      raise ValueError(f"effective_rank does not know objective {run.objective!r} (mlm, maelm, exlm)")


def _rank_table(results: dict) -> dict[str, dict[str, list]]:
  """{(group, layer): RankResult} -> {group: {'layer': [...], 'rank': [...], 'num_rows': [...], ...}}."""
  table: dict[str, dict[str, list]] = {}
  for (group, layer), result in sorted(results.items()):
    row = table.setdefault(group, {"layer": [], "rank": [], "num_rows": []})
    row["layer"].append(layer)
    row["rank"].append(result.rank)
    row["num_rows"].append(result.num_rows)
    if result.mode == er.PER_SEQUENCE:
      row.setdefault("rank_std", []).append(result.rank_std)
      row.setdefault("num_sequences", []).append(result.num_sequences)
  return table


def effective_rank(workdir, data: str, out_dir: str, energy: float = 0.9, center: bool = False,
                   kind: str = "squared", modes: Sequence[str] = ("corpus", "per_sequence"),
                   max_sequences: int = 512, batch_size: int = 32, seed: int = 0,
                   out_of_span: bool = True, blocks: np.ndarray | None = None) -> dict:
  """Per-layer effective rank of each token group; writes effective_rank.json and effective_rank.png
  (+ effective_rank_per_sequence.png). `blocks` (R, n) replaces reading `data` (tests, report)."""
  run = _as_run(workdir)
  for mode in modes:
    if mode not in ("corpus", "per_sequence"):
      raise ValueError(f"mode {mode!r}; use 'corpus' and/or 'per_sequence'")
  blocks = load_data_blocks(data, run, max_sequences) if blocks is None else blocks
  corpus = er.RankCollector()
  per_seq = er.PerSequenceRankCollector(energy, center, kind)
  for group, layers, rows in collect_states(run, blocks, batch_size, seed):
    if "corpus" in modes:
      corpus.add_layers(group, layers, rows)
    if "per_sequence" in modes:
      per_seq.add_layers(group, layers, rows)
  result = {
      "tool": "effective_rank", "workdir": run.workdir, "objective": run.objective, "step": run.step,
      "data": data, "num_sequences": int(len(blocks)), "seq_len": int(blocks.shape[1]),
      "d_model": int(run.config.model.d_model), "mask_prob": float(run.config.mask_prob), "seed": seed,
      "settings": {"energy": energy, "kind": kind, "centered": center,
                   "definition": "min k: sum_{i<=k} w_i >= energy * sum_i w_i, w_i = s_i^2 (squared) or s_i"},
  }
  pngs = {}
  if "corpus" in modes:
    corpus_results = corpus.results(energy, center, kind)
    result["corpus"] = _rank_table(corpus_results)
    # The other centring costs nothing from the same Gram matrices; anisotropy (one large mean
    # direction) can change the answer, so both are always reported (MAE-LM reference §8.2).
    result[corpus_key(not center)] = _rank_table(corpus.results(energy, not center, kind))
    pngs["corpus"] = plots.plot_rank_vs_layer(corpus_results, os.path.join(out_dir, "effective_rank.png"),
                                              title=f"Effective rank: {run.name} ({run.objective})")
    if out_of_span and run.objective == "mlm":
      result["mask_out_of_span"] = _out_of_span(corpus, energy, center)
  if "per_sequence" in modes:
    seq_results = per_seq.results()
    result["per_sequence"] = _rank_table(seq_results)
    pngs["per_sequence"] = plots.plot_rank_vs_layer(
        seq_results, os.path.join(out_dir, "effective_rank_per_sequence.png"),
        title=f"Per-sequence effective rank (mean): {run.name} ({run.objective})")
  result["plots"] = pngs
  _write_json(os.path.join(out_dir, "effective_rank.json"), result)
  return result


def corpus_key(centered: bool) -> str:
  """Key of the corpus-mode table at the centring that was NOT requested: 'corpus_centred' / 'corpus_uncentred'."""
  return "corpus_centred" if centered else "corpus_uncentred"


def corpus_table(result: dict, centered: bool) -> dict:
  """An effective_rank result's corpus table at the given centring, whichever was requested."""
  return result["corpus"] if result["settings"]["centered"] == centered else result[corpus_key(centered)]


def _out_of_span(corpus: er.RankCollector, energy: float, center: bool) -> dict[str, list]:
  """Per layer: energy fraction of the [MASK] states outside the clean-real rank_eps basis, and angles."""
  acc = corpus.accumulators
  layers = sorted(layer for group, layer in acc if group == "masked_input/mask")
  out = {"layer": [], "mask_out_of_span_energy": [], "real_rank": [], "mean_principal_angle_deg": []}
  for layer in layers:
    diag = er.mask_subspace_diagnostics(acc[("clean_input/real", layer)], acc[("masked_input/mask", layer)],
                                        acc[("masked_input/real", layer)], energy, center)
    out["layer"].append(layer)
    out["mask_out_of_span_energy"].append(diag["mask_out_of_span_energy"])
    out["real_rank"].append(diag["real_rank"])
    angles = diag["principal_angles_masked_real_vs_mask"]
    out["mean_principal_angle_deg"].append(float(np.degrees(angles).mean()) if angles.size else float("nan"))
  return out


# ----------------------------------------------------------------------------------------------
# entropy
# ----------------------------------------------------------------------------------------------


def exlm_block_length(model, mask_ratio: float, seq_len: int) -> int:
  """Longest block n' <= seq_len whose expanded length at `mask_ratio` fits the link head's slot table."""
  from exlm_jax.objectives import exlm  # pylint: disable=g-import-not-at-top
  if model.transitions != "dag":
    return seq_len
  for n in range(seq_len, 3, -1):
    if exlm.max_expanded_length(mask_ratio, n, model.num_copies) <= model.max_link_positions:
      return n
  raise ValueError(f"mask ratio {mask_ratio} expands even a 4-slot block past the link table "
                   f"({model.max_link_positions}); use a lower --mask_ratios")


def shorten_blocks(blocks: np.ndarray, length: int) -> np.ndarray:
  """(R, n) blocks cut to (R, length), content truncated so every row still ends in </s>."""
  if length >= blocks.shape[1]:
    return blocks
  return np.stack([rmlm.truncate_to_fit(row, 1, length)[:length] for row in blocks])


def _masked_entropy_fn(run: Run):
  """MLM / MAE-LM: fn(tokens (B, n), is_masked (B, n), indices (B, M)) -> (B, M) entropies of the model's
  distribution at the masked slots, predicted as `api.make_masked_logits_fn` does (MAE-LM: [MASK] slots
  removed from the encoder, room for every kept token)."""
  from exlm_jax import api  # pylint: disable=g-import-not-at-top
  log_probs = api.make_masked_logits_fn(run.objective, run.config)

  def build():
    return jax.jit(lambda params, tokens, is_masked, indices: ent.entropy_from_logits(
        log_probs(params, jnp.where(is_masked, vocab.MASK, tokens), indices)))

  jitted = _cached(run, "masked_entropy", build)
  return lambda tokens, is_masked, indices: jitted(run.params, tokens, is_masked, indices)


def exlm_analysis_body(m, tokens, is_masked):
  """ExLM, one fixed mask: (outputs, Viterbi path (B, S), posteriors gamma (B, G, S), score (B,))."""
  from exlm_jax.objectives import dag  # pylint: disable=g-import-not-at-top
  out, score, path = m.best_alignment(tokens, is_masked)
  ex = out.expansion
  num_targets = jnp.maximum(ex.num_targets, 1)
  num_vertices = jnp.where(ex.num_targets > 0, ex.num_vertices, 1)

  def total_ll(emit):
    ll = dag.dag_log_likelihood(emit, out.trans_logp, num_targets, num_vertices)
    return jnp.sum(jnp.where(jnp.isfinite(ll), ll, 0.0))

  return out, path, jax.grad(total_ll)(out.emit_logp), score


def _exlm_entropy_fn(run: Run, mask_ratio: float):
  """Sums and counts of the three ExLM variants, restricted to the [MASK] groups (not <s> / </s>)."""
  model = run.model(mask_prob=float(mask_ratio))
  if model.transitions != "dag":
    raise ValueError("ExLM entropy needs exlm.transitions='dag' (the CTC ablation has no DAG posteriors)")
  k = model.num_copies

  def body(m, tokens, is_masked):
    out, path, gamma, score = exlm_analysis_body(m, tokens, is_masked)
    ex = out.expansion
    ok = jnp.isfinite(score)[:, None]
    last = ex.num_targets[:, None] - 1
    group = jnp.arange(out.logits.shape[1])[None, :] // k
    state_ok = ex.vertex_valid & (group >= 1) & (group < last)
    target_index = jnp.arange(ex.targets.shape[1])[None, :]
    target_ok = ex.target_valid & (target_index >= 1) & (target_index < last) & ok
    path_masked = jnp.where((path >= 1) & (path < last), path, -1)
    sums = ent.exlm_entropy_sums(out.logits, state_ok, path_masked, gamma, target_ok)
    return {name: (jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32)) for name, (s, c) in sums.items()}

  return model, _cached(run, "exlm_entropy", lambda: jax.jit(
      lambda params, t, mk: model.apply({"params": params}, t, mk, method=body)), float(mask_ratio))


def entropy(workdir, data: str, out_dir: str, mask_ratios: Sequence[float] = DEFAULT_MASK_RATIOS,
            max_sequences: int = 512, batch_size: int = 32, seed: int = 0,
            blocks: np.ndarray | None = None) -> dict:
  """Mean predictive entropy (nats) at masked positions per mask ratio; writes entropy.json / entropy.png.

  MLM / MAE-LM: 'masked' (H of the model's distribution at each masked slot). ExLM, over the [MASK]
  groups only: 'state' (every expanded state), 'path' (states on the Viterbi path), 'mixture' (the
  posterior-weighted emission mixture per masked target). For ExLM the blocks are shortened where a
  ratio would expand them past the link head's slot table (`block_len` per ratio).
  """
  run = _as_run(workdir)
  blocks = load_data_blocks(data, run, max_sequences) if blocks is None else blocks
  series: dict[str, list[float]] = {}
  counts: dict[str, list[int]] = {}
  block_lens = []
  if run.objective not in ("mlm", "maelm", "exlm"):
    raise ValueError(f"entropy does not know objective {run.objective!r} (mlm, maelm, exlm)")
  masked_entropy = _masked_entropy_fn(run) if run.objective != "exlm" else None
  for ratio in mask_ratios:
    if not 0.0 < ratio < 1.0:
      raise ValueError(f"mask ratio {ratio} must be in (0, 1)")
    accs: dict[str, ent.MeanAccumulator] = {}
    ratio_blocks = blocks
    if run.objective == "exlm":
      model, fn_ratio = _exlm_entropy_fn(run, ratio)
      ratio_blocks = shorten_blocks(blocks, exlm_block_length(model, ratio, blocks.shape[1]))
    block_lens.append(int(ratio_blocks.shape[1]))
    for index, tokens in batches(ratio_blocks, batch_size):
      sel = select_masks(tokens, ratio, seed, index)
      if run.objective == "exlm":
        sums = jax.device_get(fn_ratio(run.params, tokens, sel.is_masked))
      else:
        values = np.asarray(jax.device_get(masked_entropy(tokens, sel.is_masked, sel.indices)), np.float64)
        sums = {"masked": ent.masked_sum_count(values, sel.valid)}
      for name, (s, c) in sums.items():
        accs.setdefault(name, ent.MeanAccumulator()).add(s, c)
    for name, acc in accs.items():
      series.setdefault(name, []).append(acc.mean)
      counts.setdefault(name, []).append(acc.count)
  vocab_size = int(run.config.model.vocab_size)
  result = {
      "tool": "entropy", "workdir": run.workdir, "objective": run.objective, "step": run.step, "data": data,
      "num_sequences": int(len(blocks)), "seed": seed, "units": "nats", "log_vocab": math.log(vocab_size),
      "train_mask_prob": float(run.config.mask_prob), "mask_ratios": [float(r) for r in mask_ratios],
      "block_len": block_lens, "entropy": series, "count": counts,
  }
  label = lambda name: f"{run.name} ({name})"  # noqa: E731
  result["plots"] = {"entropy": plots.plot_entropy_vs_mask_ratio(
      {label(name): (list(mask_ratios), values) for name, values in series.items()},
      os.path.join(out_dir, "entropy.png"), vocab_size=vocab_size)}
  _write_json(os.path.join(out_dir, "entropy.json"), result)
  return result


# ----------------------------------------------------------------------------------------------
# repeated_mlm
# ----------------------------------------------------------------------------------------------


def repeated_mlm(workdir, data: str, out_dir: str, fixed: str = "corrupted", ratio: float = 0.15,
                 ks: Sequence[int] = (1, 2, 3, 4, 6, 8), max_sequences: int = 512, seed: int = 0) -> dict:
  """Applies "repeat x k, then Bernoulli(p) mask" to `data` over a (p, k) grid holding one ratio fixed.

  fixed='corrupted': p = ratio^(1/k) (corrupted-semantics ratio fixed, unreal ratio varies);
  fixed='unreal': p = ratio (unreal ratio fixed, corrupted = p^k varies). `data` is read with the
  workdir's tokenizer, data kind and seq_len; blocks grow to 2 + k (n - 2) slots, so nothing is
  truncated. Writes repeated_mlm.json / repeated_mlm.png.
  """
  if fixed not in ("corrupted", "unreal"):
    raise ValueError(f"fixed={fixed!r}; use 'corrupted' or 'unreal'")
  run = _as_run(workdir)
  blocks = load_data_blocks(data, run, max_sequences)
  grid = rmlm.pk_grid(corrupted=ratio, ks=ks) if fixed == "corrupted" else rmlm.pk_grid(unreal=ratio, ks=ks)
  rng = np.random.default_rng(seed)
  points = []
  for point in grid:
    length = repeated_mlm_objective.repeated_length(blocks.shape[1], point.k)
    sample = rmlm.repeat_and_mask_batch(blocks, point.k, point.p, rng, length)
    points.append({
        "k": int(point.k), "p": float(point.p), "expected_unreal_ratio": float(point.unreal_ratio),
        "expected_corrupted_ratio": float(point.corrupted_ratio),
        "measured_unreal_ratio": rmlm.unreal_token_ratio(sample),
        "measured_corrupted_ratio": rmlm.corrupted_semantics_ratio(sample),
        "content_slots": int(sample.content.sum()), "source_tokens": int(sample.source_content.sum()),
        "repeated_len": int(length)})
  result = {"tool": "repeated_mlm", "workdir": run.workdir, "data": data, "fixed": fixed, "ratio": ratio, "seed": seed,
            "num_sequences": int(len(blocks)), "points": points}
  result["plots"] = {"repeated_mlm": plots.plot_repeated_mlm(
      points, os.path.join(out_dir, "repeated_mlm.png"), f"Repeated-MLM grid, {fixed} ratio fixed at {ratio:g}")}
  _write_json(os.path.join(out_dir, "repeated_mlm.json"), result)
  return result


# ----------------------------------------------------------------------------------------------
# dag_view
# ----------------------------------------------------------------------------------------------


def dag_view_inputs(run: Run, data: str | None = None, index: int = 0, smiles: str | None = None,
                    mask_positions: Sequence[int] | None = None, mask_ratio: float | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (1, n), is_masked (1, n)) for one example: block `index` of `data` or the string `smiles`,
  masked at `mask_positions` (slot indices) or by the pretraining rule at `mask_ratio` (default the run's)."""
  if smiles is not None:
    ids = encode_records([smiles], run.tokenizer)
    block = make_analysis_blocks(ids, run.config.data.name, run.config.seq_len)[:1]
  elif data is not None:
    blocks = load_data_blocks(data, run, max_sequences=index + 1)
    if index >= len(blocks):
      raise IndexError(f"--index {index} but --data has only {len(blocks)} blocks")
    block = blocks[index:index + 1]
  else:
    raise ValueError("dag_view needs --smiles or --data (with --index)")
  if mask_positions is not None:
    is_masked = np.zeros(block.shape, bool)
    positions = np.asarray(mask_positions, int)
    if np.any(~real_tokens(block)[0, positions]):
      raise ValueError(f"mask positions {list(positions)} include <s>, </s> or <pad> slots; pick content slots")
    is_masked[0, positions] = True
  else:
    ratio = float(run.config.mask_prob if mask_ratio is None else mask_ratio)
    is_masked = np.asarray(select_masks(block, ratio, seed, 0).is_masked)
  return block, is_masked


def dag_view(workdir, out_dir: str, data: str | None = None, index: int = 0, smiles: str | None = None,
             mask_positions: Sequence[int] | None = None, mask_ratio: float | None = None, seed: int = 0) -> dict:
  """Viterbi path, transition matrix and which copy emits which token for one input of an ExLM run;
  writes dag_view.json / dag_view.png."""
  run = _as_run(workdir)
  if run.objective != "exlm":
    raise ValueError(f"dag_view needs an ExLM workdir; {run.workdir} is {run.objective!r}")
  tokens, is_masked = dag_view_inputs(run, data, index, smiles, mask_positions, mask_ratio, seed)
  ratio = max(float(run.config.mask_prob), float(is_masked.sum()) / tokens.shape[1])
  model = run.model(mask_prob=ratio)
  if model.transitions != "dag":
    raise ValueError("dag_view needs exlm.transitions='dag' (the CTC ablation has no transitions)")
  exlm_block_length(model, ratio, tokens.shape[1])  # fails clearly when the link table is too short
  fn = _cached(run, "dag_view", lambda: jax.jit(
      lambda p, t, m: model.apply({"params": p}, t, m, method=exlm_analysis_body)), ratio)
  out, path, gamma, score = jax.device_get(fn(run.params, tokens, is_masked))
  ex = out.expansion
  num_targets, num_states, k = int(ex.num_targets[0]), int(ex.num_vertices[0]), model.num_copies
  targets = [int(t) for t in ex.targets[0, :num_targets]]
  target_tokens = [run.tokenizer.id_to_token(t) for t in targets]
  path_row = np.asarray(path[0, :num_states])
  trans = np.exp(np.asarray(out.trans_logp[0, :num_states, :num_states], np.float64))
  labels = [f"g{u // k}c{u % k + 1}" for u in range(num_states)]
  states = []
  for u in range(num_states):
    emitted = int(path_row[u])
    slot = ex.vertex_slot[0, u]
    states.append({"state": u, "group": u // k, "copy": u % k + 1, "input_slot": int(ex.positions[0, slot]),
                   "input_token": run.tokenizer.id_to_token(int(ex.tokens[0, slot])),
                   "group_target": target_tokens[u // k],
                   "emits_target": emitted, "emits_token": target_tokens[emitted] if emitted >= 0 else None,
                   "emit_prob_of_emitted": float(np.exp(out.emit_logp[0, emitted, u])) if emitted >= 0 else None,
                   "posterior_max_target": int(np.argmax(gamma[0, :num_targets, u]))})
  real = int((tokens[0] != vocab.PAD).sum())
  result = {
      "tool": "dag_view", "workdir": run.workdir, "step": run.step, "num_copies": k,
      "input": run.tokenizer.decode([int(t) for t in tokens[0, 1:real - 1]]),
      "input_tokens": [run.tokenizer.id_to_token(int(t)) for t in tokens[0, :real]],
      "masked_slots": [int(i) for i in np.flatnonzero(is_masked[0])],
      "targets": target_tokens, "num_states": num_states, "viterbi_score": float(score[0]),
      "path": [int(x) for x in path_row], "states": states, "transitions": trans.tolist(),
  }
  result["plots"] = {"dag_view": plots.plot_dag_alignment(
      trans, path_row, target_tokens, os.path.join(out_dir, "dag_view.png"), state_labels=labels)}
  _write_json(os.path.join(out_dir, "dag_view.json"), result)
  return result


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _fmt(x) -> str:
  """A table cell: floats to 3 significant digits, None / NaN as 'nan'."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "nan"
  return f"{x:.3g}" if isinstance(x, float) else str(x)


def _unique_names(workdirs: Sequence[str]) -> list[str]:
  names = []
  for i, w in enumerate(workdirs):
    name = os.path.basename(os.path.normpath(w)) or f"run{i}"
    names.append(name if name not in names else f"{name}_{i}")
  return names


# The real-token group on clean input per objective, and the entropy variant that is one predictive
# distribution per masked token (ExLM: the posterior-weighted mixture of its states).
CLEAN_REAL_GROUP = {"mlm": "clean_input/real", "maelm": "encoder_clean/real", "exlm": "encoder_clean/real"}
PER_TOKEN_ENTROPY = {"mlm": "masked", "maelm": "masked", "exlm": "mixture"}


def headline(rank_result: dict, entropy_result: dict) -> dict:
  """The two numbers the papers argue from, for one run: last-layer corpus rank of the real tokens on clean
  input (MLM: also on the masked input), uncentred and centred, and the per-masked-token entropy per ratio."""
  objective = rank_result["objective"]
  groups = {"clean_input": CLEAN_REAL_GROUP[objective]}
  if objective == "mlm":
    groups["masked_input"] = "masked_input/real"
  variant = PER_TOKEN_ENTROPY[objective]
  out = {"objective": objective, "entropy_variant": variant, "mask_ratios": entropy_result["mask_ratios"],
         "entropy": entropy_result["entropy"][variant]}
  for name, group in groups.items():
    for centred, suffix in ((False, "uncentred"), (True, "centred")):
      out[f"rank_last_layer/{name}/{suffix}"] = corpus_table(rank_result, centred)[group]["rank"][-1]
  return out


def report(workdirs: Sequence[str], data: str, out_dir: str, energy: float = 0.9, center: bool = False,
           mask_ratios: Sequence[float] = DEFAULT_MASK_RATIOS, max_sequences: int = 512, batch_size: int = 32,
           seed: int = 0) -> dict:
  """effective_rank + entropy for every workdir into out_dir/<name>/, combined plots and report.md."""
  if not workdirs:
    raise ValueError("report needs at least one --workdirs entry")
  names = _unique_names(workdirs)
  ranks, entropies, runs = {}, {}, {}
  for name, workdir in zip(names, workdirs):
    run = load_run(workdir)
    sub = os.path.join(out_dir, name)
    blocks = load_data_blocks(data, run, max_sequences)
    ranks[name] = effective_rank(run, data, sub, energy, center, modes=("corpus", "per_sequence"),
                                 batch_size=batch_size, seed=seed, blocks=blocks)
    entropies[name] = entropy(run, data, sub, mask_ratios, batch_size=batch_size, seed=seed, blocks=blocks)
    runs[name] = run
  combined_rank = {}
  for name, res in ranks.items():
    for group, row in res["corpus"].items():
      for layer, rank, rows in zip(row["layer"], row["rank"], row["num_rows"]):
        combined_rank[(f"{name}: {group}", layer)] = er.RankResult(rank, energy, "squared", center, er.CORPUS, rows,
                                                                   res["d_model"])
  dims = {res["d_model"] for res in ranks.values()}
  rank_png = plots.plot_rank_vs_layer(combined_rank, os.path.join(out_dir, "effective_rank_all.png"),
                                      title="Effective rank, all runs", show_dim=len(dims) == 1)
  series = {f"{name}: {variant}": (res["mask_ratios"], values)
            for name, res in entropies.items() for variant, values in res["entropy"].items()}
  entropy_png = plots.plot_entropy_vs_mask_ratio(series, os.path.join(out_dir, "entropy_all.png"))
  md = _report_markdown(names, runs, ranks, entropies, data, energy, center, rank_png, entropy_png, out_dir)
  md_path = os.path.join(out_dir, "report.md")
  with open(md_path, "w") as f:
    f.write(md)
  result = {"tool": "report", "workdirs": list(workdirs), "names": names, "data": data, "report": md_path,
            "headline": {name: headline(ranks[name], entropies[name]) for name in names},
            "effective_rank": ranks, "entropy": entropies,
            "plots": {"effective_rank_all": rank_png, "entropy_all": entropy_png}}
  _write_json(os.path.join(out_dir, "report.json"), result)
  return result


def _report_markdown(names, runs, ranks, entropies, data, energy, center, rank_png, entropy_png, out_dir) -> str:
  rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
  lines = ["# Analysis report", "", f"Data: `{data}`; effective rank at {energy:g} of the squared singular-value "
           f"energy, {'centred' if center else 'uncentred'}; entropies in nats.", "",
           "| run | objective | step | d_model | layers | sequences |", "|---|---|---|---|---|---|"]
  for name in names:
    cfg = runs[name].config
    lines.append(f"| {name} | {cfg.objective} | {runs[name].step} | {cfg.model.d_model} | {cfg.model.num_layers} "
                 f"| {ranks[name]['num_sequences']} |")
  ratios = sorted({r for res in entropies.values() for r in res["mask_ratios"]})
  lines += ["", "## Headline", "", "Last-layer corpus effective rank of real tokens on clean input (MLM: also on "
            "the masked input, the paper's with-[MASK] group), uncentred / centred; entropy (nats) of the "
            "predictive distribution per masked token (ExLM: posterior-weighted mixture) at each mask ratio.", "",
            "| run | objective | rank, clean input | rank, MLM masked input | "
            + " | ".join(f"H @ {r:g}" for r in ratios) + " |", "|---|---|---|---|" + "---|" * len(ratios)]
  for name in names:
    head = headline(ranks[name], entropies[name])
    rank = lambda which: " / ".join(str(head.get(f"rank_last_layer/{which}/{c}", "-"))  # noqa: E731
                                    for c in ("uncentred", "centred"))
    by_ratio = dict(zip(head["mask_ratios"], head["entropy"]))
    lines.append(f"| {name} | {head['objective']} | {rank('clean_input')} | {rank('masked_input')} | "
                 + " | ".join(_fmt(by_ratio.get(r)) for r in ratios) + " |")
  tables = (("corpus", f"Effective rank (corpus, {'centred' if center else 'uncentred'})"),
            (corpus_key(not center), f"Effective rank (corpus, {'uncentred' if center else 'centred'})"),
            ("per_sequence", f"Effective rank (per-sequence mean, {'centred' if center else 'uncentred'})"))
  for mode, title in tables:
    num_layers = max(len(row["layer"]) for res in ranks.values() for row in res[mode].values())
    lines += ["", f"## {title}", "", "| run: group | " + " | ".join(f"L{i}" for i in range(num_layers)) + " |",
              "|---|" + "---|" * num_layers]
    for name in names:
      for group, row in ranks[name][mode].items():
        lines.append(f"| {name}: {group} | " + " | ".join(_fmt(float(r)) for r in row["rank"]) + " |")
  span = {n: ranks[n]["mask_out_of_span"] for n in names if "mask_out_of_span" in ranks[n]}
  if span:
    lines += ["", "[MASK]-state energy outside the clean real-token rank_eps subspace, per layer:", ""]
    for name, row in span.items():
      lines.append(f"- {name}: " + ", ".join(f"L{l}: {_fmt(v)}" for l, v in
                                             zip(row["layer"], row["mask_out_of_span_energy"])))
  lines += ["", "## Entropy at masked positions", "", "| run: variant | " + " | ".join(f"{r:g}" for r in ratios)
            + " |", "|---|" + "---|" * len(ratios)]
  for name in names:
    res = entropies[name]
    for variant, values in res["entropy"].items():
      by_ratio = dict(zip(res["mask_ratios"], values))
      lines.append(f"| {name}: {variant} | " + " | ".join(_fmt(by_ratio.get(r)) for r in ratios) + " |")
  lines += ["", "## Plots", "", "| effective rank | entropy |", "|---|---|",
            f"| ![rank]({rel(rank_png)}) | ![entropy]({rel(entropy_png)}) |"]
  for name in names:
    lines.append(f"| ![{name} rank]({rel(ranks[name]['plots']['corpus'])}) | "
                 f"![{name} entropy]({rel(entropies[name]['plots']['entropy'])}) |")
  return "\n".join(lines) + "\n"
