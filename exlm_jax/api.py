"""Programmatic access to a trained run: `exlm_jax.load(path)`.

  import exlm_jax
  model = exlm_jax.load("runs/mlm_smiles_small")            # a pretraining or fine-tuning workdir
  vectors = model.embed(["CCO", "c1ccccc1O"])               # (2, D) numpy, mean over non-pad tokens
  model.predict_masked(["CC[MASK]c1ccccc1"], top_k=3)       # [[[('O', 0.41), ('N', 0.22), ('C', 0.1)]]]
  ids, pad = model.tokenize(["CCO"])                        # (1, L) int32 blocks `<s> ... </s> <pad>`
  hidden = model.encode(ids, pad)                           # (1, L, D), jitted
  squad = exlm_jax.load("runs/ft_squad2")                   # a SQuAD fine-tuning workdir
  squad.answer("Who ruled?", "Rollo ruled Normandy.")       # SpanAnswer(text='Rollo', score=.., start=0, end=5)

  # Pure functions (params in, arrays out) compose with your own jax.jit / jax.vmap / jax.grad:
  f = jax.jit(lambda p, t, m: model.encode_fn(p, t, m).mean(1))
  f(model.params, ids, pad)

`path` may be a workdir written by `main.py` (pretraining or fine-tuning), its `checkpoints/` folder,
one `checkpoints/<step>` folder, or a fine-tuning seed folder (`<workdir>/seed_<s>`). A fine-tuning
workdir loads the seed with the best validation score (results.json) unless `seed=` is given.

Parameters are restored with Orbax (only the `params` of the saved state, exlm_jax/run_store.py) and
replicated over a 1-D mesh of the local devices; the bound convenience methods pad the batch to a
multiple of the device count and split it over them. `predict_masked` follows the pretraining objective's
own prediction rule (`Objective.masked_log_probs`; options such as ExLM's `copies` via `predict_options`).

Inputs are stripped of surrounding whitespace, as training strips corpus records ("CCO\n" == "CCO"). One
bad input never fails a batch: `embed` and `predict` give a NaN row for an input that is empty, that the
tokenizer cannot encode, or (SMILES runs: tokenizer smiles_regex / smiles_bpe) that RDKit cannot parse;
`predict_masked` gives None for an input it cannot encode, and None for each [MASK] that falls past the
run's seq_len. Each case is one warning line naming the inputs (logger `exlm_jax.api`). `tokenize` is the
strict low-level step: it raises on an input the tokenizer cannot encode. `answer` (SQuAD runs) strips the
question but not the context, so its character offsets index the context exactly as given.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from exlm_jax.data import readers, vocab
from exlm_jax.models.encoder import Encoder, ModelConfig
from exlm_jax.run_store import (FINETUNE, TASK_FILE, RunLocation, load_tokenizer, model_config_from_run,
                                pretrain_objective, read_json, resolve_run, restore_params, run_config)

log = logging.getLogger(__name__)

MASK_STRING = vocab.SPECIAL_TOKENS[vocab.MASK]  # "[MASK]"
NEVER_PREDICTED = (vocab.PAD, vocab.BOS, vocab.EOS, vocab.MASK)  # never proposed by predict_masked
SMILES_TOKENIZERS = ("smiles_regex", "smiles_bpe")  # runs whose inputs are SMILES (checked with RDKit)
QA_TASK_TYPE = "extractive_qa"  # task.json task_type of SQuAD runs (finetune/squad/task.py TASK_TYPE)
_SHOWN_INPUTS = 5  # inputs named in a warning line


# ----------------------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------------------


def _is_space_piece(tokenizer, token_id: int) -> bool:
  piece = tokenizer.id_to_token(token_id)
  return piece != "" and piece.strip("\u2581 ") == ""


def encode_with_masks(tokenizer, text: str) -> list[int]:
  """Ids of `text` (no specials) with every literal "[MASK]" as vocab.MASK.

  Both tokenizers already map "[MASK]" to id 4 (SMILES: the bracket-atom rule; SentencePiece: a
  user-defined symbol); otherwise the text is split on it. A lone SentencePiece whitespace piece
  right before a [MASK] is dropped: in pretraining a masked slot replaced a whole word piece
  ('\u2581word'), space included.
  """
  count = text.count(MASK_STRING)
  ids = list(tokenizer.encode(text))
  if ids.count(vocab.MASK) != count:
    parts = [tokenizer.encode(part) if part else [] for part in text.split(MASK_STRING)]
    ids = [i for j, part in enumerate(parts) for i in ([*part] if j == 0 else [vocab.MASK, *part])]
  if count:
    ids = [i for j, i in enumerate(ids)
           if not (j + 1 < len(ids) and ids[j + 1] == vocab.MASK and i != vocab.MASK and _is_space_piece(tokenizer, i))]
  return ids


class _MaskAwareTokenizer:
  """Wraps a tokenizer so that `encode` keeps literal "[MASK]" as vocab.MASK (for encode_examples).

  lenient: a text the tokenizer rejects encodes to [] and its reason is kept in `rejected[text]`.
  """

  def __init__(self, tokenizer, lenient: bool = False):
    self._tok = tokenizer
    self._lenient = lenient
    self.vocab_size = tokenizer.vocab_size
    self.rejected: dict[str, str] = {}

  def encode(self, text: str) -> list[int]:
    try:
      return encode_with_masks(self._tok, text)
    except ValueError as e:  # e.g. tokenizers.UncoveredSmilesError
      if not self._lenient:
        raise
      self.rejected[text] = str(e).split(";")[0]
      return []


def clean_inputs(texts) -> list:
  """A string, a pair or a sequence of them -> a list, every string stripped of surrounding whitespace."""
  texts = [texts] if isinstance(texts, (str, tuple)) else list(texts)
  return [tuple(part.strip() for part in t) if isinstance(t, tuple) else t.strip() for t in texts]


def _preview(text) -> str:
  shown = repr(text if isinstance(text, str) else tuple(text))
  return shown if len(shown) <= 60 else shown[:57] + "..."


def warn_inputs(problems: dict[int, str], texts: Sequence, outcome: str) -> None:
  """One warning line naming the inputs in `problems` (index -> reason) and what they get instead."""
  if not problems:
    return
  named = [f"#{i} {_preview(texts[i])} ({why})" for i, why in sorted(problems.items())[:_SHOWN_INPUTS]]
  more = f"; and {len(problems) - _SHOWN_INPUTS} more" if len(problems) > _SHOWN_INPUTS else ""
  log.warning("%d of %d input(s) %s: %s%s", len(problems), len(texts), outcome, "; ".join(named), more)


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


# ----------------------------------------------------------------------------------------------
# Pure forward functions
# ----------------------------------------------------------------------------------------------


def make_encode_fn(model_cfg: ModelConfig):
  """encode_fn(params, token_ids (B, L) int32, padding_mask (B, L) bool) -> (B, L, D) float32.

  `params` is a run's full tree ({'encoder': ..., ...}); copy index 0 everywhere (no expansion).
  """
  encoder = Encoder(model_cfg, deterministic=True)

  def encode_fn(params, token_ids, padding_mask):
    hidden = encoder.apply({"params": params["encoder"]}, token_ids, padding_mask=padding_mask)
    return hidden.astype(jnp.float32)

  return encode_fn


def mean_pool(hidden: jax.Array, padding_mask: jax.Array) -> jax.Array:
  """(B, L, D), (B, L) -> (B, D): mean over non-pad slots (<s> and </s> included)."""
  weights = (~padding_mask).astype(jnp.float32)[..., None]
  return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


# ----------------------------------------------------------------------------------------------
# The loaded model
# ----------------------------------------------------------------------------------------------


class LoadedModel:
  """A restored run: config, tokenizer, params and jitted, reusable functions.

  Attributes: path, kind ('pretrain' | 'finetune'), step, seed (fine-tuning), config (the run's
  config.json as a ConfigDict), objective (the pretraining objective), model_config, tokenizer,
  params (replicated over `mesh`), task (fine-tuning: task.json as a dict, else None).
  Pure functions: encode_fn, embed_fn, masked_logits_fn (pretraining), predict_fn (fine-tuning with a
  `<s>` head), span_logits_fn (SQuAD fine-tuning: (params, ids) -> start, end logits (B, L)).
  """

  def __init__(self, location: RunLocation, devices: Sequence[jax.Device] | None = None,
               predict_options: dict | None = None):
    self.path = location.workdir
    self.kind = location.kind
    self.seed = location.seed
    self.config = run_config(location)
    self.task = read_json(location.workdir / TASK_FILE) if self.kind == FINETUNE else None
    self.objective = pretrain_objective(location)
    self.model_config = model_config_from_run(self.config.to_dict(), dict(dropout_rate=0.0, attention_dropout_rate=0.0))
    self.tokenizer = load_tokenizer(location.workdir)
    self.max_length = int(self.config.get("seq_len", 512))
    devices = list(devices or jax.local_devices())
    self.mesh = Mesh(np.asarray(devices), ("data",))
    self._replicated = NamedSharding(self.mesh, P())
    self.params, self.step = restore_params(location.checkpoint_dir, location.step, self._replicated)
    if "encoder" not in self.params:
      raise ValueError(f"checkpoint in {location.checkpoint_dir} has no 'encoder' params "
                       f"(top-level keys {sorted(self.params)})")

    self.encode_fn = make_encode_fn(self.model_config)
    self.embed_fn = lambda params, ids, mask: mean_pool(self.encode_fn(params, ids, mask), mask)
    self.masked_logits_fn = None
    self.predict_fn = None
    self.span_logits_fn = None
    if self.kind == FINETUNE and self.task["task_type"] == QA_TASK_TYPE:
      from exlm_jax.finetune.squad import predict as squad_predict  # pylint: disable=g-import-not-at-top
      self.span_logits_fn = lambda params, ids: squad_predict.squad_logits(self.model_config, params, ids)
    elif self.kind == FINETUNE:
      from exlm_jax.finetune import model as ft_model  # pylint: disable=g-import-not-at-top
      net = ft_model.FinetuneModel(self.model_config, int(self.task["num_outputs"]), 0.0, True)
      self.predict_fn = lambda params, ids: net.apply({"params": params}, ids)
    else:
      from exlm_jax.objectives import base  # pylint: disable=g-import-not-at-top  (imports every objective)
      self.masked_logits_fn = base.masked_log_probs_fn(self.config, **(predict_options or {}))
    self._jitted = {}

  # -- helpers ------------------------------------------------------------------------------------

  def _jit(self, name: str, fn):
    if name not in self._jitted:
      self._jitted[name] = jax.jit(fn)
    return self._jitted[name]

  def _shard(self, *arrays: np.ndarray) -> tuple[list[jax.Array], int]:
    """Pads the batch dimension to a multiple of the device count and splits it over the mesh."""
    batch = arrays[0].shape[0]
    size = _round_up(batch, self.mesh.size)
    out = []
    for a in arrays:
      a = np.asarray(a)
      if size != batch:
        fill = vocab.PAD if a.dtype.kind in "iu" else (True if a.dtype == bool else 0)
        a = np.concatenate([a, np.full((size - batch, *a.shape[1:]), fill, a.dtype)])
      spec = P("data", *([None] * (a.ndim - 1)))
      out.append(jax.device_put(a, NamedSharding(self.mesh, spec)))
    return out, batch

  # -- tokens ---------------------------------------------------------------------------------------

  def tokenize(self, texts, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Strings (or (A, B) pairs) -> token_ids (B, L) int32 `<s> ... </s> <pad>`, padding_mask (B, L) bool.

    Inputs are stripped of surrounding whitespace. L is the longest row rounded up to a multiple of 8
    (fewer recompilations), at most `max_length` (default: the run's seq_len); longer inputs are cut
    (pairs: longest first). "[MASK]" -> vocab.MASK. Raises ValueError on an input the tokenizer cannot
    encode (embed / predict / predict_masked skip such inputs instead).
    """
    ids, _, truncated = self._encode(clean_inputs(texts), max_length, lenient=False)
    if truncated:
      log.warning("%d of %d input(s) cut to %d tokens", truncated, len(ids), max_length or self.max_length)
    return ids, ids == vocab.PAD

  def _encode(self, texts: list, max_length: int | None, lenient: bool) -> tuple[np.ndarray, dict[int, str], int]:
    """Cleaned inputs -> (ids (B, L) as in `tokenize`, {index: why it cannot be used}, inputs truncated).

    lenient: an input the tokenizer rejects, or an empty one, gets the row `<s> </s>` and an entry in the
    problems; SMILES runs also list SMILES without [MASK] that RDKit cannot parse.
    """
    from exlm_jax.finetune.encoding import encode_examples  # pylint: disable=g-import-not-at-top
    max_length = max_length or self.max_length
    tokenizer = _MaskAwareTokenizer(self.tokenizer, lenient)
    ids, truncated = encode_examples(texts, tokenizer, max_length)
    problems = {}
    if lenient:
      smiles_ok = readers.smiles_validator() if self.tokenizer.kind in SMILES_TOKENIZERS else None
      for i, text in enumerate(texts):
        parts = text if isinstance(text, tuple) else (text,)
        rejected = [tokenizer.rejected[p] for p in parts if p in tokenizer.rejected]
        if rejected:
          problems[i] = f"the tokenizer cannot encode it: {rejected[0]}"
        elif not all(parts):
          problems[i] = "empty"
        elif smiles_ok is not None and MASK_STRING not in text and not smiles_ok(text):
          problems[i] = "RDKit cannot parse it"
    longest = int((ids != vocab.PAD).sum(1).max()) if len(ids) else 1
    return ids[:, :min(_round_up(longest, 8), max_length)], problems, truncated

  def detokenize(self, token_ids):
    """(L,) ids -> str, or (B, L) -> list[str]; <pad>, <s>, </s>, [MASK] are left out."""
    token_ids = np.asarray(token_ids)
    if token_ids.ndim == 1:
      return self.tokenizer.decode(token_ids.tolist())
    return [self.tokenizer.decode(row.tolist()) for row in token_ids]

  # -- bound, jitted --------------------------------------------------------------------------------

  def encode(self, token_ids, padding_mask=None) -> jax.Array:
    """(B, L) ids [, (B, L) padding mask; default ids == <pad>] -> (B, L, D) final hidden states."""
    token_ids = np.asarray(token_ids, np.int32)
    padding_mask = token_ids == vocab.PAD if padding_mask is None else np.asarray(padding_mask, bool)
    (ids, mask), batch = self._shard(token_ids, padding_mask)
    hidden = self._jit("encode", self.encode_fn)(self.params, ids, mask)
    return hidden if hidden.shape[0] == batch else hidden[:batch]

  def _usable_rows(self, texts, what: str) -> tuple[list, np.ndarray, np.ndarray]:
    """(cleaned inputs, ids (b, L) of the usable ones, their (b,) indices); warns about the others."""
    texts = clean_inputs(texts)
    ids, problems, truncated = self._encode(texts, None, lenient=True)
    if truncated:
      log.warning("%d of %d input(s) cut to %d tokens", truncated, len(texts), self.max_length)
    warn_inputs(problems, texts, f"get NaN {what}")
    rows = np.asarray([i for i in range(len(texts)) if i not in problems], np.int64)
    return texts, ids[rows], rows

  def embed(self, texts) -> np.ndarray:
    """Strings (SMILES or sentences, or (A, B) pairs) -> (B, D) float32: mean of the final hidden
    states over the non-pad slots, `<s>` and `</s>` included. NaN rows for unusable inputs (module docstring)."""
    texts, ids, rows = self._usable_rows(texts, "embeddings")
    out = np.full((len(texts), self.model_config.d_model), np.nan, np.float32)
    if len(rows):
      mask = ids == vocab.PAD
      hidden = np.asarray(self.encode(ids, mask))  # reuses encode's compiled function
      out[rows] = np.asarray(mean_pool(hidden, mask))
    return out

  def predict_masked(self, texts, top_k: int = 5) -> list[list[list[tuple[str, float]] | None] | None]:
    """Top-k fillers for every literal "[MASK]" in each string (pretraining runs only).

    Returns, per input, per [MASK] in order, `top_k` (token, probability) pairs; <pad>, <s>, </s> and
    [MASK] are never proposed. Each objective predicts by its own rule (`Objective.masked_log_probs`; ExLM:
    the mixture of the k copies' distributions unless loaded with predict_options={'copies': 'first'}).
    An input without [MASK] gets []; an input the tokenizer cannot encode gets None; a [MASK] past the
    run's seq_len (cut off with the end of the input) gets None in its place. Each case is one warning.
    Any number of [MASK]s up to seq_len - 2 per input is predicted.
    """
    if self.masked_logits_fn is None:
      raise ValueError(f"{self.path} is a fine-tuning run (no LM head); use predict(), or load the "
                       "pretraining workdir for predict_masked")
    texts = clean_inputs(texts)
    if any(isinstance(t, tuple) for t in texts):
      raise ValueError("predict_masked takes strings, not (A, B) pairs")
    written = np.asarray([t.count(MASK_STRING) for t in texts], np.int64)
    if written.sum() == 0:
      raise ValueError(f"no {MASK_STRING} in the input(s); write it literally, e.g. 'CC{MASK_STRING}O'")
    ids, problems, _ = self._encode(texts, None, lenient=True)
    problems = {i: why for i, why in problems.items() if written[i] and why != "RDKit cannot parse it"}
    warn_inputs(problems, texts, "get None (no prediction)")
    is_mask = ids == vocab.MASK
    counts = is_mask.sum(1)
    cut = np.where([i not in problems for i in range(len(texts))], written - counts, 0)
    if cut.sum():
      log.warning("%d [MASK](s) of %d input(s) fall past the run's seq_len=%d and get None: inputs %s",
                  cut.sum(), np.count_nonzero(cut), self.max_length,
                  ", ".join(f"#{i}" for i in np.flatnonzero(cut)[:_SHOWN_INPUTS]) +
                  (" ..." if np.count_nonzero(cut) > _SHOWN_INPUTS else ""))
    logp = np.zeros((len(texts), 0, self.tokenizer.vocab_size), np.float32)
    rows = np.flatnonzero(counts)
    if len(rows):
      num_slots = _round_up(int(counts.max()), 4)
      slots = np.zeros((len(rows), num_slots), np.int32)
      for j, row in enumerate(is_mask[rows]):
        where = np.flatnonzero(row)
        slots[j, :where.size] = where
      (dev_ids, dev_slots), batch = self._shard(ids[rows], slots)
      logp = np.zeros((len(texts), num_slots, self.tokenizer.vocab_size), np.float32)
      logp[rows] = np.array(self._jit("masked", self.masked_logits_fn)(self.params, dev_ids, dev_slots))[:batch]
    logp[..., list(NEVER_PREDICTED)] = -np.inf
    top_k = min(top_k, logp.shape[-1] - len(NEVER_PREDICTED))
    out = []
    for b in range(len(texts)):
      if b in problems:
        out.append(None)
        continue
      per_mask = []
      for j in range(int(counts[b])):
        best = np.argsort(-logp[b, j])[:top_k]
        per_mask.append([(self.tokenizer.id_to_token(int(t)), float(np.exp(logp[b, j, t]))) for t in best])
      out.append(per_mask + [None] * int(cut[b]))
    return out

  def predict(self, texts) -> np.ndarray:
    """Fine-tuning runs: task outputs for strings/pairs. classification: (B, C) class probabilities;
    multitask_binary: (B, T) positive-class probabilities; regression: (B, T) predictions in label units.
    NaN rows for unusable inputs (module docstring)."""
    if self.predict_fn is None:
      what = "a SQuAD run; use answer()" if self.span_logits_fn else "a pretraining run"
      raise ValueError(f"{self.path} is {what}; predict() needs a fine-tuning workdir with a <s> head")
    texts, ids, rows = self._usable_rows(texts, "predictions")
    result = np.full((len(texts), int(self.task["num_outputs"])), np.nan, np.float32)
    if not len(rows):
      return result
    (dev_ids,), batch = self._shard(ids)
    out = np.asarray(self._jit("predict", self.predict_fn)(self.params, dev_ids))[:batch]
    task_type = self.task["task_type"]
    if task_type == "classification":
      out = np.asarray(jax.nn.softmax(out, axis=-1))
    elif task_type == "multitask_binary":
      out = np.asarray(jax.nn.sigmoid(out))
    else:
      out = out * np.asarray(self.task["target_std"], np.float32) + np.asarray(self.task["target_mean"], np.float32)
    result[rows] = out
    return result

  # -- SQuAD ----------------------------------------------------------------------------------------

  @property
  def null_threshold(self) -> float | None:
    """SQuAD 2.0: the loaded seed's best_f1_thresh on the evaluation set (results.json; 0.0 if absent);
    SQuAD 1.1: None (always answer)."""
    if self.task.get("version") != "v2.0":
      return None
    results = self.path / "results.json"
    per_seed = read_json(results)["per_seed"] if results.exists() else []
    for r in per_seed:
      if r["seed"] == self.seed:
        return float(r["selection"][self.task["selection_split"]].get("best_f1_thresh", 0.0))
    return 0.0

  def _span_logits(self, params, token_ids):
    (ids,), batch = self._shard(np.asarray(token_ids, np.int32))
    start, end = self._jit("span_logits", self.span_logits_fn)(params, ids)
    return np.asarray(start)[:batch], np.asarray(end)[:batch]

  def answer(self, question: str, context: str, null_threshold: float | None | str = "selected"):
    """SQuAD runs: the answer to `question` in `context` as SpanAnswer(text, score, start, end), with
    context[start:end] == text (character offsets into `context` as given).

    Decoded as in evaluation (the run's windows, n-best and maximum answer length). SQuAD 2.0 answers
    "" (score = the null score, start = end = 0) when the null score beats the best span by more than
    `null_threshold`: by default the threshold selected on the evaluation set (`self.null_threshold`);
    None never abstains.
    """
    if self.span_logits_fn is None:
      raise ValueError(f"{self.path} is not a SQuAD fine-tuning run; answer() needs one "
                       "(configs/finetune_squad.py)")
    from exlm_jax.finetune.squad import features, predict as squad_predict  # pylint: disable=g-import-not-at-top
    squad = self.config.squad
    geometry = features.FeatureConfig(self.max_length, squad.doc_stride, squad.max_query_length)
    threshold = self.null_threshold if null_threshold == "selected" else null_threshold
    return squad_predict.answer(self.params, self.tokenizer, self.model_config, question.strip(), context,
                                feature_config=geometry, n_best=squad.n_best,
                                max_answer_length=squad.max_answer_length, null_threshold=threshold,
                                logits_fn=self._span_logits, batch_size=_round_up(8, self.mesh.size))

  def __repr__(self) -> str:
    cfg = self.model_config
    what = f"fine-tuned on {self.task['name']} (seed {self.seed})" if self.task else f"{self.objective} pretraining"
    return (f"LoadedModel({self.path}, step {self.step}, {what}, {cfg.num_layers}x{cfg.d_model} "
            f"{cfg.positions}, vocab {cfg.vocab_size}, {self.mesh.size} device(s))")


def load(path, *, seed: int | None = None, devices: Sequence[jax.Device] | None = None,
         predict_options: dict | None = None) -> LoadedModel:
  """Restores a run written by main.py (see the module docstring for the accepted paths).

  seed: fine-tuning workdirs only; default = the best validation seed in results.json.
  devices: where to replicate the params (default: all local devices).
  predict_options: keyword options of the pretraining objective's prediction rule, e.g. for ExLM
    {'copies': 'first'} (how predict_masked reads the k copies of a [MASK]; default 'mixture').
  Raises FileNotFoundError with what to pass when `path` holds no checkpoint.
  """
  return LoadedModel(resolve_run(path, seed), devices, predict_options)
