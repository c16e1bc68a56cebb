"""SQuAD 1.1 / 2.0 as a fine-tuning task (the `Task` protocol of finetune/data.py), run by finetune/loop.py.

Config: `config.finetune.task` = squad_v1 | squad_v2 and the `config.squad` block (config_lib.squad_config:
sources, articles, doc_stride, max_query_length, n_best, max_answer_length); `config.seq_len` is the window
length. Splits: 'train' (train_sources / train_articles) and 'validation' (eval_sources / eval_articles),
which is both the model-selection and the reported split, as the papers' dev-set numbers. Articles may
not be shared by the two (split by article, never by question). data.max_train_examples /
max_eval_examples subsample questions (seeded by data.split_seed).

Training rows are windows (features.py; training=True skips answerable questions whose answer cannot be
located, counted), the loss module is SquadModel (model.py) whose `predict` gives (W, 2, L) start / end
logits; scoring decodes them per question (decode.py) and applies the official evaluation (evaluate.py).
Model selection: SQuAD 2.0 by best_f1 (F1 at the no-answer threshold chosen on the evaluation set, reported
with best_f1_thresh), 1.1 by f1. Per seed, `write_predictions` leaves seed_<s>/predictions_<split>.json:
{version, answers (qid -> text, "" = no answer at threshold 0), best_spans (qid -> best span), null_odds
(v2: qid -> null score - best span score)}, from which evaluate.evaluate reproduces the reported numbers.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from exlm_jax import config_lib
from exlm_jax.data import paths
from exlm_jax.finetune import lengths as lengths_lib
from exlm_jax.finetune.squad import decode, evaluate, reader
from exlm_jax.finetune.squad.features import FeatureConfig, SquadFeatures, build_features
from exlm_jax.finetune.squad.model import SquadModel
from exlm_jax.train import steps
from exlm_jax.train.reporting import note

VERSIONS = config_lib.SQUAD_VERSIONS  # task name -> SQuAD version
TASK_TYPE = "extractive_qa"
V2_METRICS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact",
              "best_exact_thresh", "best_f1", "best_f1_thresh")
V1_METRICS = ("exact", "f1")


def feature_config(config) -> FeatureConfig:
  return FeatureConfig(config.seq_len, config.squad.doc_stride, config.squad.max_query_length)


def validate_config(config) -> None:
  """One-line errors for the SQuAD fields, before any file is read."""
  if "squad" not in config:
    raise ValueError(f"task {config.finetune.task!r} needs a config.squad block; start from "
                     "configs/finetune_squad.py (or add config_lib.squad_config())")
  squad = config.squad
  feature_config(config).validate()
  for field in ("n_best", "max_answer_length"):
    if squad[field] < 1:
      raise ValueError(f"squad.{field}={squad[field]} must be >= 1")
  for field in ("train_sources", "eval_sources"):
    if not squad[field]:
      raise ValueError(f"squad.{field} is empty; give SQuAD JSON paths ($DATA/...) or tfds:squad/<version>:<split>")


class SquadLoss(SquadModel):
  """SquadModel under the trainer's contract: `__call__(batch, rng)` -> (loss_sum, weight, metrics) (dropout
  from the 'dropout' collection); `predict(batch)` -> (B, 2, L) float32 start / end logits (no p_mask)."""

  def __call__(self, batch: dict, rng: jax.Array | None = None):
    del rng
    return super().__call__(batch)

  def predict(self, batch: dict) -> jax.Array:
    return jnp.stack(self.logits(batch["tokens"]), axis=1)


@dataclasses.dataclass
class SquadTask:
  """The questions of each split and how they are windowed and decoded; `encode` keeps the windows that
  `score` and `write_predictions` map outputs back through."""

  name: str
  version: str
  splits: dict[str, reader.SquadData]
  feature_config: FeatureConfig
  n_best: int = 20
  max_answer_length: int = 30
  features: dict[str, SquadFeatures] = dataclasses.field(default_factory=dict)

  task_type = TASK_TYPE
  selection_split = "validation"
  report_splits = ("validation",)

  @property
  def metrics(self) -> tuple[str, ...]:
    return V2_METRICS if self.version == "v2.0" else V1_METRICS

  @property
  def main_metric(self) -> str:
    return "best_f1" if self.version == "v2.0" else "f1"

  def summary(self) -> str:
    def part(name, data):
      counts = data.counts()["total"]
      return (f"{name}={counts['questions']} questions ({counts['unanswerable']} unanswerable) in "
              f"{len(data.titles)} article(s)")
    return f"{self.name} (SQuAD {self.version}): " + ", ".join(part(k, v) for k, v in self.splits.items())

  def tokenizer_corpus(self) -> tuple[list[str], str]:
    examples = self.splits["train"].examples
    return list(dict.fromkeys(e.context for e in examples)) + [e.question for e in examples], "text"

  def fit_to_length(self, init, config) -> tuple["SquadTask", None]:
    """Nothing to cut or drop: contexts are windowed (doc_stride) and questions cut to max_query_length, both
    counted by `encode`. A learned position table warns when its windows reach past pretraining's longest input."""
    lengths_lib.warn_untrained_window(init, config.seq_len)
    return self, None

  def encode(self, tokenizer, seq_len: int) -> dict[str, SquadFeatures]:
    if not hasattr(tokenizer, "encode_with_offsets"):
      raise ValueError(f"SQuAD needs a tokenizer with character offsets (encode_with_offsets); "
                       f"{type(tokenizer).__name__} has none")
    geometry = dataclasses.replace(self.feature_config, seq_len=seq_len)
    for name, data in self.splits.items():
      features = build_features(data.examples, tokenizer, geometry, training=name == "train")
      shown = ", ".join(f"{k} {v}" for k, v in features.stats.items())
      note(f"{name}: {shown} (seq_len {seq_len}, doc_stride {geometry.doc_stride}, "
           f"max_query_length {geometry.max_query_length})")
      self.features[name] = features
    if len(self.features["train"]) == 0:
      raise ValueError(f"task {self.name} has no training windows (no usable training question)")
    return dict(self.features)

  def loss_model(self, model_config, train: SquadFeatures) -> steps.LossModel:
    return steps.LossModel(lambda deterministic: SquadLoss(model_config, deterministic),
                           train.batch(np.arange(0), 1), rngs=lambda key: (key, key))

  def decoded(self, split: str, outputs: np.ndarray) -> dict[str, decode.Prediction]:
    """Question id -> Prediction from (W, 2, L) window outputs of `split`."""
    if split not in self.features:
      raise ValueError(f"split {split!r} was not encoded; call encode() first")
    outputs = np.asarray(outputs)
    return decode.predict_answers(self.features[split], outputs[:, 0], outputs[:, 1], self.n_best,
                                  self.max_answer_length)

  def score(self, split: str, outputs: np.ndarray) -> dict[str, float]:
    predictions = self.decoded(split, outputs)
    examples = self.features[split].examples
    spans = {q: p.text for q, p in predictions.items()}
    if self.version == "v1.1":
      got = evaluate.evaluate(examples, spans, "v1.1")
    else:
      got = evaluate.evaluate(examples, spans, "v2.0", {q: p.score_diff for q, p in predictions.items()}, 0.0)
    return {m: float(got[m]) for m in self.metrics if m in got}

  def write_predictions(self, directory, split: str, outputs: np.ndarray) -> None:
    predictions = self.decoded(split, outputs)
    threshold = 0.0 if self.version == "v2.0" else None
    payload = {"version": self.version, "null_threshold": threshold,
               "answers": decode.final_answers(predictions, threshold),
               "best_spans": {q: p.text for q, p in predictions.items()}}
    if self.version == "v2.0":
      payload["null_odds"] = {q: p.score_diff for q, p in predictions.items()}
    if jax.process_index() == 0:
      path = pathlib.Path(directory) / f"predictions_{split}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(payload, indent=1))

  def info(self) -> dict:
    return {"name": self.name, "task_type": TASK_TYPE, "version": self.version, "metrics": list(self.metrics),
            "main_metric": self.main_metric, "selection_split": self.selection_split,
            "report_splits": list(self.report_splits), "split_sizes": {k: len(v) for k, v in self.splits.items()},
            **self.results_info()}

  def sources(self) -> list[str]:
    """The SQuAD files as local paths ($DATA/... resolved) and TFDS names, each once."""
    named = dict.fromkeys(s for data in self.splits.values() for s in data.sources)
    return [s if s.startswith("tfds:") else paths.resolve(s) for s in named]

  def head_flops(self, d_model: int, seq_len: int) -> float:
    """Two Linear(D -> 1) scorers (start, end) at every position; 2 FLOPs per multiply-add."""
    return float(2 * 2 * d_model * seq_len)

  def results_info(self) -> dict:
    return {"articles": {k: v.titles for k, v in self.splits.items()},
            "sources": {k: list(v.sources) for k, v in self.splits.items()},
            "features": {k: dict(v.stats) for k, v in self.features.items()}}


def _subsample(data: reader.SquadData, limit: int, seed: int) -> reader.SquadData:
  """At most `limit` questions (seeded, file order kept); -1 = all."""
  if not 0 < limit < len(data):
    return data
  keep = np.sort(np.random.default_rng(seed).choice(len(data), limit, replace=False))
  return dataclasses.replace(data, examples=tuple(data.examples[i] for i in keep))


def read_split(sources, articles, version: str, what: str) -> reader.SquadData:
  data = reader.read_squad(tuple(sources), tuple(articles) or None)
  if data.version != version:
    raise ValueError(f"squad.{what}_sources hold SQuAD {data.version} but the task wants {version}; "
                     f"use task=squad_v{data.version[1]} or other files")
  if data.misaligned_answers or data.duplicate_articles:
    note(f"{what}: {data.misaligned_answers} answer(s) not at their answer_start (kept; counted by the features), "
         f"articles read twice as identical copies (kept once): {list(data.duplicate_articles)}")
  return data


def load(config) -> SquadTask:
  """The SquadTask of `config` (validate_config first)."""
  name, squad = config.finetune.task.lower(), config.squad
  version = VERSIONS[name]
  train = read_split(squad.train_sources, squad.train_articles, version, "train")
  valid = read_split(squad.eval_sources, squad.eval_articles, version, "eval")
  shared = sorted(set(train.titles) & set(valid.titles))
  if shared:
    raise ValueError(f"articles {shared} are in both the training and the evaluation questions; split by "
                     "article (squad.train_articles / squad.eval_articles)")
  seed = config.data.split_seed
  splits = {"train": _subsample(train, config.data.max_train_examples, seed),
            "validation": _subsample(valid, config.data.max_eval_examples, seed)}
  return SquadTask(name, version, splits, feature_config(config), squad.n_best, squad.max_answer_length)
