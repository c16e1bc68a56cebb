"""Fine-tuning loop shared by every task (GLUE, MoleculeNet, any MoleculeNet-style CSV).

  python main.py --config configs/finetune_glue.py:task=sst2 --config.init_from=runs/mlm_text --workdir runs/ft_sst2
  python main.py --config configs/finetune_moleculenet.py:task=bbbp --config.init_from=runs/exlm_smiles --workdir runs/ft_bbbp

`run(config, workdir)` (called by main.py for configs with a `finetune` section):
  1. restores the pretraining params of `config.init_from` (a workdir, its checkpoints/ folder or one
     checkpoints/<step> folder) and hands over the encoder with `objectives.get(objective).encoder_params`,
     checked leaf by leaf against the fine-tuning encoder (built from that run's config.json `model`
     section; copy index 0 everywhere, i.e. ExLM without expansion). init_from='' trains from scratch;
  2. loads the task (exlm_jax/finetune/tasks.py), tokenizes it with the pretraining run's tokenizer
     into `<s> A </s> </s> B </s>` blocks of `seq_len` slots;
  3. for every seed in `config.seeds`: trains for `num_epochs` (AdamW, linear warm-up over
     `warmup_ratio` of the steps then linear decay to 0; the trainer's optimizer and mesh/sharding
     pieces), evaluates the selection split every `eval_every` steps (0: `evals_per_epoch` times per
     epoch), keeps the best params by the task's main metric, scores the report splits (test) with
     them and saves them (Orbax, `seed_<s>/checkpoints/<best step>`);
  4. writes results.json (per seed and mean ± sample std over seeds), results.md, final_metrics.json
     (seed means, in the pretraining loop's shape for launch/sweep.py), TensorBoard events under
     tensorboard/seed_<s>/, config.json, task.json and tokenizer/ (so `exlm_jax.load` works on it).
A seed whose seed_<s>/result.json exists is not run again (delete it, or the workdir, to redo it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from exlm_jax import api, config_lib, objectives
from exlm_jax.data import vocab
from exlm_jax.finetune import model as model_lib
from exlm_jax.finetune import tasks as tasks_lib
from exlm_jax.finetune.encoding import encode_examples
from exlm_jax.finetune.metrics import compute_metrics, is_improvement
from exlm_jax.models.encoder import ModelConfig
from exlm_jax.train import checkpoint, optim, partitioning, reporting, steps
from exlm_jax.train.reporting import note

log = logging.getLogger(__name__)

# Model fields a fine-tuning config may change on top of the pretrained architecture.
MODEL_OVERRIDES = ("dropout_rate", "attention_dropout_rate", "dtype", "remat")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def default_config(task: str = "sst2") -> ml_collections.ConfigDict:
  """Every fine-tuning config starts here (configs/finetune_*.py override fields)."""
  cfg = ml_collections.ConfigDict()
  cfg.init_from = ""  # pretraining workdir / checkpoints/ / checkpoints/<step>; "" = random init (baseline)
  cfg.tokenizer = ""  # init_from="" only: a tokenizer folder / workdir ("" = built from the training split)
  cfg.finetune = ml_collections.ConfigDict(dict(
      task=task,  # GLUE task (sst2, cola, ...), MoleculeNet task (bbbp, tox21, ...), or "csv" (config.data.path)
      pooler_dropout=0.1,  # the head's two dropouts (both papers: 0.1)
      normalize_targets=True,  # regression: train on (y - mean) / std of the training split; metrics in label units
      save_checkpoints=True,  # best params per seed under seed_<s>/checkpoints (what exlm_jax.load reads)
  ))
  cfg.data = ml_collections.ConfigDict(dict(
      source="auto",  # GLUE: "auto" | "local" (shared data folder) | "tfds"
      validation="carve",  # GLUE: "carve" (valid_fraction of train; GLUE dev = test) | "dev" (select on GLUE dev)
      valid_fraction=0.1,
      path="",  # CSV tasks: file or "$DATA/..."; setting it makes the task a CSV task
      smiles_column="smiles",
      label_columns="",  # comma-separated, e.g. "NR-AR,SR-p53"
      task_type="multitask_binary",  # CSV: multitask_binary (0/1, missing ok, ROC-AUC) | regression | classification
      split="scaffold",  # molecules: "scaffold" (deterministic) | "random"
      fractions=(0.8, 0.1, 0.1),
      split_seed=0,  # data splits and subsampling; model seeds are `seeds`
      max_train_examples=-1,  # subsample the training split (quick runs, tests); -1 = all
      max_eval_examples=-1,  # subsample every other split; -1 = all
  ))
  cfg.model = ml_collections.ConfigDict(dict(dropout_rate=0.1, attention_dropout_rate=0.1, dtype="float32",
                                             remat="none"))  # overrides on the pretrained architecture
  cfg.scratch_size = "small"  # init_from="": config_lib.MODEL_SIZES entry
  cfg.scratch_vocab_size = 8000  # init_from="" on text without `tokenizer`: SentencePiece trained on the train split
  cfg.seq_len = 128
  cfg.batch_size = 32  # global
  cfg.eval_batch_size = 64
  cfg.num_epochs = 3
  cfg.learning_rate = 2e-5
  cfg.warmup_ratio = 0.06  # fraction of all steps
  cfg.lr_schedule = "linear"
  cfg.adam_b1 = 0.9
  cfg.adam_b2 = 0.98
  cfg.adam_eps = 1e-6
  cfg.weight_decay = 0.1  # ExLM (DinkyTrain); MAE-LM / COCO-LM use 0.01
  cfg.grad_clip_norm = 0.0  # both papers: no clipping
  cfg.seeds = (0, 1, 2)
  cfg.eval_every = 0  # steps between evaluations of the selection split; 0 = `evals_per_epoch` per epoch
  cfg.evals_per_epoch = 1  # with eval_every=0: evenly spaced, the last at the epoch's end (COCO-LM: 2)
  cfg.log_every = 50
  cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  cfg.logical_axis_rules = ()
  return cfg


def label_columns(value) -> list[str]:
  """'A,B' (or a list) -> ['A', 'B']."""
  if isinstance(value, str):
    return [c.strip() for c in value.split(",") if c.strip()]
  return [str(c) for c in value]


def validate_config(config, num_devices: int) -> None:
  """Raises a one-line ValueError naming the bad field and how to fix it."""
  for field in ("batch_size", "eval_batch_size", "num_epochs", "log_every"):
    if config[field] <= 0:
      raise ValueError(f"{field}={config[field]} must be positive")
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate={config.learning_rate} must be positive, e.g. --config.learning_rate=2e-5")
  if not 0.0 <= config.warmup_ratio < 1.0:
    raise ValueError(f"warmup_ratio={config.warmup_ratio} must lie in [0, 1), e.g. 0.06")
  if config.eval_every < 0:
    raise ValueError(f"eval_every={config.eval_every} must be >= 0 (0 = evals_per_epoch per epoch)")
  if config.evals_per_epoch < 1:
    raise ValueError(f"evals_per_epoch={config.evals_per_epoch} must be >= 1")
  if not config.seeds:
    raise ValueError("seeds is empty; give at least one, e.g. --config.seeds='(0,)'")
  if config.seq_len < 4:
    raise ValueError(f"seq_len={config.seq_len} leaves no room for text; use >= 4")
  unknown = sorted(set(config.model.keys()) - set(MODEL_OVERRIDES))
  if unknown:
    raise ValueError(f"config.model may only override {MODEL_OVERRIDES} of the pretrained encoder, got {unknown}")
  dp = partitioning.data_parallel_size(config.mesh, num_devices)
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % (dp * jax.process_count()):
      raise ValueError(f"{field}={config[field]} must be divisible by the data-parallel size {dp} "
                       f"(and by {jax.process_count()} processes)")
  if config.data.path and not label_columns(config.data.label_columns):
    raise ValueError("data.path is set but data.label_columns is empty; e.g. --config.data.label_columns=A,B")


def optimizer_config(config, total_steps: int) -> ml_collections.ConfigDict:
  """The fields `train/optim.py` reads, with warm-up as a fraction of the run's steps."""
  return ml_collections.ConfigDict(dict(
      learning_rate=config.learning_rate, total_steps=total_steps,
      warmup_steps=int(round(config.warmup_ratio * total_steps)), lr_schedule=config.lr_schedule,
      adam_b1=config.adam_b1, adam_b2=config.adam_b2, adam_eps=config.adam_eps,
      weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm))


# ----------------------------------------------------------------------------------------------
# Task data
# ----------------------------------------------------------------------------------------------


def load_task_data(config) -> tasks_lib.TaskData:
  """The TaskData named by config.finetune.task (or the CSV in config.data.path), subsampled as asked."""
  data = config.data
  if data.path or config.finetune.task == "csv":
    if not data.path:
      raise ValueError("finetune.task='csv' needs --config.data.path=FILE.csv")
    task = tasks_lib.load_molecule_csv(data.path, data.smiles_column, label_columns(data.label_columns),
                                       data.task_type, split=data.split, fractions=tuple(data.fractions),
                                       seed=data.split_seed)
  else:
    name = config.finetune.task.lower()
    if name.replace("-", "") in tasks_lib.GLUE_TASKS:
      task = tasks_lib.load_glue(name, source=data.source, validation=data.validation,
                                 valid_fraction=data.valid_fraction, seed=data.split_seed)
    else:
      task = tasks_lib.load_moleculenet(name, split=data.split, fractions=tuple(data.fractions), seed=data.split_seed)
  return subsample(task, data.max_train_examples, data.max_eval_examples, data.split_seed)


def subsample(task: tasks_lib.TaskData, max_train: int, max_eval: int, seed: int) -> tasks_lib.TaskData:
  """At most max_train training / max_eval other examples per split (seeded, order kept); -1 = all."""
  rng = np.random.default_rng(seed)
  splits = {}
  for name, split in task.splits.items():
    limit = max_train if name == "train" else max_eval
    if 0 < limit < len(split):
      keep = np.sort(rng.choice(len(split), limit, replace=False))
      split = split.take(keep, f"{split.derivation}; subsample of {limit} (seed {seed})")
    splits[name] = split
  return dataclasses.replace(task, splits=splits)


@dataclasses.dataclass
class EncodedSplit:
  """tokens (N, L) int32; labels (N,) int32 or (N, T) float32; mask like labels (bool)."""

  tokens: np.ndarray
  labels: np.ndarray
  mask: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)


def target_stats(task: tasks_lib.TaskData, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) per target over the labelled training cells (regression), else zeros/ones."""
  width = task.num_outputs
  if task.task_type != "regression" or not normalize:
    return np.zeros(width, np.float32), np.ones(width, np.float32)
  train = task.splits["train"]
  labels = np.where(train.label_mask, train.labels, np.nan).astype(np.float64)
  mean, std = np.nanmean(labels, 0), np.nanstd(labels, 0)
  std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
  return np.nan_to_num(mean).astype(np.float32), std.astype(np.float32)


def encode_split(split: tasks_lib.Split, tokenizer, seq_len: int, task_type: str, mean, std) -> tuple[EncodedSplit, int]:
  """(EncodedSplit, number truncated). Regression labels are normalised with (mean, std)."""
  tokens, truncated = encode_examples(split.texts, tokenizer, seq_len)
  labels, mask = np.asarray(split.labels), np.asarray(split.label_mask, bool)
  if task_type == "classification":
    labels = labels.astype(np.int32)
  else:
    labels = labels.astype(np.float32).reshape(len(split), -1)
    mask = mask.reshape(labels.shape)
    labels = np.where(mask, (labels - mean) / std, 0.0).astype(np.float32)
  return EncodedSplit(tokens, labels, mask), truncated


# ----------------------------------------------------------------------------------------------
# Encoder hand-off
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Initialisation:
  """What a fine-tuning run starts from. encoder None = random init (from scratch)."""

  model_config: ModelConfig
  tokenizer: Any
  encoder: Any = None
  objective: str = ""
  step: int | None = None
  source: str = ""


def check_encoder_tree(encoder, model_config: ModelConfig, source: str) -> None:
  """Fails loudly unless `encoder` has exactly the leaves and shapes of an Encoder(model_config)."""
  problems = objectives.base.encoder_tree_problems(encoder, model_config)
  if problems:
    raise ValueError(f"the encoder of {source} does not match the fine-tuning encoder: " + "; ".join(problems) +
                     " -- is init_from a checkpoint of the same model size/positions as its config.json?")


def pretrained_encoder(init_from: str, overrides: dict | None = None) -> Initialisation:
  """Restores `init_from` and returns its encoder params, architecture and tokenizer.

  Pretraining runs hand over `objectives.get(objective).encoder_params(params)`; fine-tuning runs
  (intermediate-task training) their 'encoder' sub-tree. Raises ValueError on a tree mismatch.
  """
  location = api.resolve_run(init_from)
  raw = api.read_json(location.workdir / api.CONFIG_FILE)
  params, step = api.restore_params(location.checkpoint_dir, location.step)
  if location.kind == "finetune":
    objective = api.read_json(location.workdir / api.TASK_FILE)["pretrain_objective"]
    encoder = objectives.base.encoder_subtree(params)
  else:
    objective = raw.get("objective", "")
    encoder = objectives.get(objective).encoder_params(params)
  model_config = api.model_config_from_run(raw, overrides)
  source = f"{location.checkpoint_dir}/{step}"
  check_encoder_tree(encoder, model_config, source)
  return Initialisation(model_config, api.load_tokenizer(location.workdir), encoder, objective, step, source)


def _tokenizer_from(path: str):
  from exlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).expanduser()
  return tokenizers.load(path / "tokenizer" if (path / "tokenizer").is_dir() else path)


def scratch_initialisation(config, task: tasks_lib.TaskData) -> Initialisation:
  """Random encoder of size `scratch_size`, tokenizer from `config.tokenizer` or built on the train split."""
  from exlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  if config.tokenizer:
    tokenizer = _tokenizer_from(config.tokenizer)
  else:
    texts = task.splits["train"].texts
    flat = [t for pair in texts for t in (pair if isinstance(pair, tuple) else (pair,))]
    if task.name in tasks_lib.GLUE_TASKS:
      try:
        tokenizer = tokenizers.SentencePieceTokenizer.train(flat, vocab_size=config.scratch_vocab_size)
      except ValueError as e:
        raise ValueError(f"scratch tokenizer for {task.name}: {e}; the field here is config.scratch_vocab_size "
                         "(or pass --config.tokenizer=DIR)") from None
    else:
      tokenizer = tokenizers.SmilesRegexTokenizer.build(flat)
  model = config_lib.model_config(config.scratch_size, vocab_size=tokenizer.vocab_size, **dict(config.model))
  return Initialisation(ModelConfig.from_config(model), tokenizer, source="random init")


# ----------------------------------------------------------------------------------------------
# Jitted steps
# ----------------------------------------------------------------------------------------------


class FinetuneSetup:
  """Mesh, shardings and the jitted init / train / predict functions for one task and model."""

  def __init__(self, config, model_config: ModelConfig, task_type: str, num_outputs: int, total_steps: int):
    self.config = config
    self.task_type = task_type
    self.mesh = partitioning.create_mesh(config.mesh)
    self.rules = partitioning.logical_rules(config)
    self.train_model = model_lib.FinetuneModel(model_config, num_outputs, config.finetune.pooler_dropout, False)
    self.eval_model = model_lib.FinetuneModel(model_config, num_outputs, config.finetune.pooler_dropout, True)
    opt_config = optimizer_config(config, total_steps)
    self.optimizer = optim.make_optimizer(opt_config)
    self.schedule = optim.learning_rate_schedule(opt_config)
    with self.context():
      boxed = jax.eval_shape(self._boxed_state, jax.random.PRNGKey(0))
      self.state_sharding = partitioning.shardings_from_boxed(boxed, self.mesh, self.rules)
    replicated = partitioning.replicated(self.mesh)
    self._init = jax.jit(self._init_state, out_shardings=self.state_sharding)
    self._init_from = jax.jit(self._init_state_from, in_shardings=(None, self.state_sharding.params["encoder"]),
                              out_shardings=self.state_sharding)
    self._train = jax.jit(self._train_step, in_shardings=(self.state_sharding, None, replicated),
                          out_shardings=(self.state_sharding, replicated), donate_argnums=0)
    self._predict = jax.jit(self._predict_step, in_shardings=(self.state_sharding.params, None),
                            out_shardings=replicated)
    self._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), in_shardings=(self.state_sharding.params,),
                         out_shardings=self.state_sharding.params)

  def context(self):
    """The mesh and logical-axis rules every traced function runs under."""
    return partitioning.mesh_context(self.mesh, self.rules)

  # -- traced ----------------------------------------------------------------------------------

  def _boxed_state(self, rng) -> steps.TrainState:
    tokens = objectives.base.dummy_tokens(1, 8)
    params = self.eval_model.init({"params": rng, "dropout": rng}, tokens)["params"]
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

  def _init_state(self, rng) -> steps.TrainState:
    return nn.meta.unbox(self._boxed_state(rng))

  def _init_state_from(self, rng, encoder) -> steps.TrainState:
    """Pretrained encoder + a fresh head (initialised on its own: no encoder forward to compile)."""
    head_module = model_lib.ClassificationHead(self.eval_model.cfg, self.eval_model.num_outputs)
    head = nn.meta.unbox(head_module.init(rng, jnp.zeros((1, self.eval_model.cfg.d_model))))["params"]
    params = {"encoder": jax.tree.map(lambda x: x.astype(jnp.float32), encoder), "head": head}
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

  def _loss(self, params, batch, rng):
    outputs = self.train_model.apply({"params": params}, batch["tokens"], rngs={"dropout": rng})
    loss_sum, weight, metrics = model_lib.task_loss(self.task_type, outputs, batch["labels"], batch["mask"])
    return loss_sum, (weight, metrics)

  def _train_step(self, state: steps.TrainState, batch, key):
    rng = jax.random.fold_in(key, state.step)
    (loss_sum, (weight, metrics)), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, batch, rng)
    scale = 1.0 / jnp.maximum(weight, 1e-9)  # normalised over the global batch
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {name: s / jnp.maximum(c, 1e-9) for name, (s, c) in metrics.items()}
    out.update(grad_norm=optax.tree.norm(grads), learning_rate=self.schedule(state.step), weight=weight)
    return steps.TrainState(step=state.step + 1, params=params, opt_state=opt_state), out

  def _predict_step(self, params, tokens):
    return self.eval_model.apply({"params": params}, tokens)

  # -- public ------------------------------------------------------------------------------------

  def init_state(self, seed: int, encoder=None) -> steps.TrainState:
    """Head (and, without `encoder`, the encoder) randomly initialised from `seed`."""
    rng = jax.random.PRNGKey(seed)
    with self.context():
      if encoder is None:
        return self._init(rng)
      return self._init_from(rng, encoder)

  def put(self, batch: dict) -> dict:
    """Global numpy batch -> arrays split over the batch axes (each process feeds its own rows)."""
    out = {}
    for name, value in batch.items():
      sharding = NamedSharding(self.mesh, P(partitioning.BATCH_AXES, *([None] * (value.ndim - 1))))
      rows = len(value) // jax.process_count()
      local = value[jax.process_index() * rows:(jax.process_index() + 1) * rows]
      out[name] = jax.make_array_from_process_local_data(sharding, local, value.shape)
    return out

  def train_step(self, state, batch: dict, key):
    with self.context():
      return self._train(state, self.put(batch), key)

  def predict(self, params, tokens: np.ndarray) -> jax.Array:
    with self.context():
      return self._predict(params, self.put({"tokens": tokens})["tokens"])

  def copy_params(self, params):
    with self.context():
      return self._copy(params)


def _filler_tokens(rows: int, seq_len: int) -> np.ndarray:
  """`<s> </s> <pad>...` rows that pad a batch (their labels are masked out)."""
  tokens = np.full((rows, seq_len), vocab.PAD, np.int32)
  tokens[:, 0], tokens[:, 1] = vocab.BOS, vocab.EOS
  return tokens


def make_batch(split: EncodedSplit, indices: np.ndarray, batch_size: int) -> dict:
  """Rows `indices` of `split`, padded to batch_size with filler rows whose label mask is False."""
  fill = batch_size - len(indices)
  tokens, labels, mask = split.tokens[indices], split.labels[indices], split.mask[indices]
  if fill:
    tokens = np.concatenate([tokens, _filler_tokens(fill, tokens.shape[1])])
    labels = np.concatenate([labels, np.zeros((fill, *labels.shape[1:]), labels.dtype)])
    mask = np.concatenate([mask, np.zeros((fill, *mask.shape[1:]), bool)])
  return {"tokens": tokens, "labels": labels, "mask": mask}


def predict_split(setup: FinetuneSetup, params, split: EncodedSplit, batch_size: int) -> np.ndarray:
  """(N, C) float32 model outputs over a whole split."""
  outputs = []
  for start in range(0, len(split), batch_size):
    rows = split.tokens[start:start + batch_size]
    if len(rows) < batch_size:
      rows = np.concatenate([rows, _filler_tokens(batch_size - len(rows), rows.shape[1])])
    outputs.append(setup.predict(params, rows))
  host = np.concatenate(jax.device_get(outputs)) if outputs else np.zeros((0, 1), np.float32)
  return host[:len(split)]


def score(task: tasks_lib.TaskData, split_name: str, outputs: np.ndarray, mean, std) -> dict[str, float]:
  """Task metrics of (N, C) outputs on a split (regression outputs mapped back to label units)."""
  split = task.splits[split_name]
  if task.task_type == "regression":
    outputs = outputs * std + mean
  return compute_metrics(task.metrics, task.task_type, outputs, split.labels, split.label_mask,
                         task.label_names)


# ----------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------

_HIDDEN = ("roc_auc_tasks_skipped",)  # kept in results.json, left out of progress lines and tables


def eval_due(config, step: int, step_in_epoch: int, steps_per_epoch: int) -> bool:
  """Every `eval_every` steps, or (eval_every=0) at `evals_per_epoch` evenly spaced points of each epoch."""
  if config.eval_every:
    return step % config.eval_every == 0
  per_epoch = config.evals_per_epoch
  return step_in_epoch in {round(i * steps_per_epoch / per_epoch) for i in range(1, per_epoch + 1)}


def shown(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in _HIDDEN)


def train_seed(config, setup: FinetuneSetup, task: tasks_lib.TaskData, encoded: dict[str, EncodedSplit],
               init: Initialisation, seed: int, workdir: pathlib.Path, stats) -> dict:
  """Trains one seed with model selection (best params saved under seed_<s>/checkpoints); returns its results."""
  started = time.perf_counter()
  train = encoded["train"]
  steps_per_epoch = math.ceil(len(train) / config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  selection = task.selection_split
  main_metric = task.main_metric
  writer = reporting.Writer(str(workdir / "tensorboard" / f"seed_{seed}"))
  progress = reporting.Progress(total_steps, config.batch_size * config.seq_len, 0)
  state = setup.init_state(seed, init.encoder)
  key = jax.random.PRNGKey(seed)
  shuffle = np.random.default_rng(seed)
  best = {"value": None, "step": 0, "epoch": 0, "metrics": {}}
  best_params, window, history, last_train, last_eval = None, [], [], {}, {}
  step = 0
  for epoch in range(1, config.num_epochs + 1):
    order = shuffle.permutation(len(train))
    for b in range(steps_per_epoch):
      batch = make_batch(train, order[b * config.batch_size:(b + 1) * config.batch_size], config.batch_size)
      state, metrics = setup.train_step(state, batch, key)
      step += 1
      window.append(metrics)
      if step % config.log_every == 0 or step == total_steps:
        host = jax.device_get(window)
        window = []
        last_train = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        if not np.isfinite(last_train["loss"]):
          raise FloatingPointError(f"seed {seed}: loss became {last_train['loss']} at step {step}; lower "
                                   "learning_rate or set grad_clip_norm")
        line, perf = progress.report(step, last_train)
        note(f"seed {seed} epoch {epoch} | {line}")
        writer.scalars(step, {**last_train, **perf}, prefix="train/")
      if eval_due(config, step, b + 1, steps_per_epoch) or step == total_steps:
        outputs = predict_split(setup, state.params, encoded[selection], config.eval_batch_size)
        last_eval = score(task, selection, outputs, *stats)
        history.append({"step": step, "epoch": epoch, **last_eval})
        writer.scalars(step, last_eval, prefix=f"{selection}/")
        improved = is_improvement(main_metric, last_eval[main_metric], best["value"])
        if improved:
          best = {"value": last_eval[main_metric], "step": step, "epoch": epoch, "metrics": last_eval}
          best_params = setup.copy_params(state.params)
        note(f"seed {seed} eval at step {step} (epoch {epoch}) on {selection}: {shown(last_eval)}"
             + (" (best)" if improved else ""))
        progress.restart_clock(step)
  if best_params is None:
    note(f"seed {seed}: {main_metric} was never finite on {selection}; reporting the final params")
    best_params = state.params
    best.update(step=step, epoch=config.num_epochs, metrics=last_eval)
  report = {}
  for name in task.report_splits:
    if name == selection:
      report[name] = best["metrics"]
      continue
    report[name] = score(task, name, predict_split(setup, best_params, encoded[name], config.eval_batch_size),
                         *stats)
    writer.scalars(best["step"], report[name], prefix=f"{name}_at_best/")
    note(f"seed {seed} {name} at best step {best['step']}: {shown(report[name])}")
  writer.close()
  if config.finetune.save_checkpoints:
    manager = checkpoint.make_manager(str(workdir / f"seed_{seed}" / "checkpoints"),
                                      ml_collections.ConfigDict(dict(keep_checkpoints=1, async_checkpointing=False)))
    # Host copies on a single process: Orbax would otherwise compile a slice per replicated shape.
    params = jax.device_get(best_params) if jax.process_count() == 1 else best_params
    checkpoint.save(manager, best["step"], {"params": params}, force=True)
    checkpoint.finish(manager)
  return {"seed": seed, "best_step": best["step"], "best_epoch": best["epoch"], "total_steps": total_steps,
          "selection": {selection: best["metrics"]}, "report": report, "last_train": last_train,
          "last_eval": last_eval, "history": history, "wall_time_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def invalid_smiles(task: tasks_lib.TaskData) -> list[list]:
  """[row, SMILES] of every input RDKit could not parse (left out of all splits); [] for text tasks."""
  return [list(x) for x in task.splits["train"].provenance.invalid_smiles]


def mean_std(values) -> dict:
  """Mean and sample standard deviation (ddof=1; 0.0 for one value) over seeds."""
  values = [float(v) for v in values]
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std, "values": values}


def summarize(per_seed: list[dict], task: tasks_lib.TaskData) -> dict:
  """{split: {metric: {mean, std, values}}} over seeds, for the selection split and the report splits."""
  summary = {}
  selection = task.selection_split
  for split in dict.fromkeys([selection, *task.report_splits]):
    key = "selection" if split == selection else "report"
    metrics = per_seed[0][key][split].keys()
    summary[split] = {m: mean_std([r[key][split][m] for r in per_seed]) for m in metrics}
  return summary


def best_seed(per_seed: list[dict], task: tasks_lib.TaskData) -> int:
  best, value = per_seed[0]["seed"], None
  for r in per_seed:
    v = r["selection"][task.selection_split][task.main_metric]
    if is_improvement(task.main_metric, v, value):
      best, value = r["seed"], v
  return best


def final_metrics(results: dict, total_steps: int, wall_time_s: float) -> dict:
  """The pretraining loop's final_metrics.json shape (what launch/sweep.py tabulates): seed means of the
  selection split under 'eval' and of the first other report split under 'test'."""
  means = lambda split: {m: v["mean"] for m, v in results["summary"][split].items()}
  others = [s for s in results["report_splits"] if s != results["selection_split"]]
  return {"step": total_steps, "eval": means(results["selection_split"]),
          "test": means(others[0]) if others else {}, "main_metric": results["main_metric"],
          "task": results["task"], "num_seeds": len(results["seeds"]), "wall_time_s": wall_time_s,
          "preempted": False}


def results_markdown(results: dict) -> str:
  """A Markdown table: one row per seed, then mean ± std; columns = selection + report split metrics."""
  selection, report = results["selection_split"], results["report_splits"]
  columns = [(selection, "selection", m) for m in results["summary"][selection] if m not in _HIDDEN]
  columns += [(s, "report", m) for s in report if s != selection for m in results["summary"][s] if m not in _HIDDEN]
  header = ["seed", "best step"] + [f"{s} {m}" for s, _, m in columns]
  lines = [f"# Fine-tuning: {results['task']} ({results['task_type']})", "",
           f"init_from: `{results['init_from'] or 'random init'}` ({results['pretrain_objective'] or '-'}, "
           f"step {results['init_step']}); model selection on `{selection}` by {results['main_metric']}; "
           f"{len(results['seeds'])} seed(s); mean ± sample std.",
           f"splits: {results['split_sizes']}" + ("" if results["task"] in tasks_lib.GLUE_TASKS else
                                                  f"; invalid SMILES left out: {len(results['invalid_smiles'])}"), "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results["per_seed"]:
    cells = [str(r["seed"]), str(r["best_step"])] + [f"{r[kind][s][m]:.4f}" for s, kind, m in columns]
    lines.append("| " + " | ".join(cells) + " |")
  cells = ["mean ± std", ""] + [f"{results['summary'][s][m]['mean']:.4f} ± {results['summary'][s][m]['std']:.4f}"
                                for s, _, m in columns]
  lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def config_fingerprint(config) -> str:
  """Hash of everything but `seeds`: a finished seed is reused only by a run with the same config."""
  values = {k: v for k, v in config.to_dict().items() if k != "seeds"}
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(config) -> tuple[tasks_lib.TaskData, Initialisation]:
  """The task data and what the encoder starts from (init_from is checked first: it fails fastest)."""
  if config.init_from:
    if config.tokenizer:
      raise ValueError("config.tokenizer is only for init_from='' (scratch runs); a pretrained encoder "
                       "brings its own tokenizer: leave --config.tokenizer empty")
    init = pretrained_encoder(config.init_from, dict(config.model))
    task = load_task_data(config)
  else:
    task = load_task_data(config)
    msg = ("init_from is empty: fine-tuning a RANDOMLY initialised encoder (a from-scratch baseline); "
           "pass --config.init_from=PRETRAINING_WORKDIR to fine-tune a pretrained one")
    log.warning(msg)
    note("WARNING: " + msg)
    init = scratch_initialisation(config, task)
  cfg = init.model_config
  if cfg.positions != "rope2d" and config.seq_len > cfg.max_positions:
    raise ValueError(f"seq_len={config.seq_len} exceeds the encoder's max_positions={cfg.max_positions}")
  return task, init


def run(config, workdir: str) -> dict:
  """Fine-tunes every seed (skipping finished ones) and writes results.json / results.md."""
  started = time.perf_counter()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  validate_config(config, jax.device_count())
  task, init = prepare(config)
  note(f"task {task.summary()} | metrics {', '.join(task.metrics)} (selection: {task.main_metric} on "
       f"{task.selection_split}; reported: {', '.join(task.report_splits)})")
  note(f"init: {init.source} ({init.objective or 'no pretraining'}) | encoder {init.model_config.num_layers}x"
       f"{init.model_config.d_model} {init.model_config.positions}, vocab {init.model_config.vocab_size}")

  stats = target_stats(task, config.finetune.normalize_targets)
  encoded = {}
  for name, split in task.splits.items():
    encoded[name], truncated = encode_split(split, init.tokenizer, config.seq_len, task.task_type, *stats)
    unk = float(np.mean(encoded[name].tokens[encoded[name].tokens != vocab.PAD] == vocab.UNK))
    note(f"{name}: {len(split)} examples, {truncated} truncated to seq_len={config.seq_len}, "
         f"{unk:.2%} <unk> tokens")
  if len(encoded["train"]) == 0:
    raise ValueError(f"task {task.name} has an empty training split")

  steps_per_epoch = math.ceil(len(encoded["train"]) / config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  setup = FinetuneSetup(config, init.model_config, task.task_type, task.num_outputs, total_steps)
  note(f"{total_steps} steps per seed ({config.num_epochs} epochs x {steps_per_epoch}), batch {config.batch_size}, "
       f"lr {config.learning_rate:g}, warm-up {config.warmup_ratio:.0%} | mesh {dict(setup.mesh.shape)}")

  config_out = config.to_dict()
  config_out["model"] = dataclasses.asdict(init.model_config)
  config_out["model_overrides"] = dict(config.model)
  checkpoint.write_json(str(workdir / api.CONFIG_FILE), config_out)
  task_info = {"name": task.name, "task_type": task.task_type, "num_outputs": task.num_outputs,
               "label_names": list(task.label_names), "metrics": list(task.metrics), "main_metric": task.main_metric,
               "selection_split": task.selection_split, "report_splits": list(task.report_splits),
               "split_sizes": {k: len(v) for k, v in task.splits.items()}, "invalid_smiles": invalid_smiles(task),
               "target_mean": stats[0].tolist(), "target_std": stats[1].tolist(),
               "pretrain_objective": init.objective, "init_from": config.init_from, "init_step": init.step}
  checkpoint.write_json(str(workdir / api.TASK_FILE), task_info)
  if jax.process_index() == 0 and not (workdir / "tokenizer").exists():
    init.tokenizer.save(workdir / "tokenizer")

  fingerprint = config_fingerprint(config)
  per_seed = []
  for seed in config.seeds:
    done = workdir / f"seed_{seed}" / "result.json"
    if done.is_file():
      previous = api.read_json(done)
      if previous.get("config_fingerprint") != fingerprint:
        raise ValueError(f"{done} was written with a different config; use a fresh --workdir (or delete "
                         f"{done.parent}) to fine-tune with this one")
      note(f"seed {seed}: already done ({done}); skipping")
      per_seed.append(previous)
      continue
    result = train_seed(config, setup, task, encoded, init, int(seed), workdir, stats)
    result["config_fingerprint"] = fingerprint
    checkpoint.write_json(str(done), result)
    per_seed.append(result)

  results = {"task": task.name, "task_type": task.task_type, "main_metric": task.main_metric,
             "selection_split": task.selection_split, "report_splits": list(task.report_splits),
             "init_from": config.init_from, "pretrain_objective": init.objective, "init_step": init.step,
             "split_sizes": task_info["split_sizes"], "invalid_smiles": task_info["invalid_smiles"],
             "seeds": [int(s) for s in config.seeds], "per_seed": per_seed, "summary": summarize(per_seed, task),
             "best_seed": best_seed(per_seed, task)}
  checkpoint.write_json(str(workdir / "results.json"), results)
  checkpoint.write_json(str(workdir / "final_metrics.json"), final_metrics(results, total_steps,
                                                                           time.perf_counter() - started))
  markdown = results_markdown(results)
  if jax.process_index() == 0:
    (workdir / "results.md").write_text(markdown)
  note(markdown)
  note(f"done: results in {workdir}/results.json and results.md, TensorBoard events in {workdir}/tensorboard, "
       f"best params per seed in {workdir}/seed_<s>/checkpoints (exlm_jax.load('{workdir}'))")
  return results
