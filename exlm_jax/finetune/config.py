"""Fine-tuning configuration: the defaults every configs/finetune_*.py starts from, their validation
(one-line errors before any data work) and the optimizer fields train/optim.py reads."""

from __future__ import annotations

import jax
import ml_collections

from exlm_jax.train import partitioning

# Model fields a fine-tuning config may change on top of the pretrained architecture.
MODEL_OVERRIDES = ("dropout_rate", "attention_dropout_rate", "dtype", "remat")


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
