"""Extractive question answering (SQuAD 2.0 / 1.1): encoder states -> two Linear(D->1) span scorers.

  python main.py --config configs/finetune_squad.py:task=squad_v2 --config.init_from=runs/maelm_text_small --workdir runs/ft_squad2
  python main.py --config configs/finetune_squad.py:task=squad_v1 --config.init_from=runs/exlm_text_small --workdir runs/ft_squad1
  python main.py --config configs/finetune_squad.py:quick --config.init_from=runs/mlm_text_small --workdir /tmp/ft_squad

Arguments: task (squad_v2 | squad_v1), quick (a smoke run on the three SQuAD 2.0 dev articles of the
shared data folder: train on Rhine + Computational_complexity_theory, evaluate on Normans; 1 seed).
Data: the official train / dev sets through TFDS `squad/<version>` (TensorFlow + internet on first
use), or official JSON files: --config.squad.train_sources=$DATA/squad/train-v2.0.json etc. (see
config_lib.squad_config for the block's fields). The dev set is both the selection and the reported
split (the papers' dev numbers); SQuAD 2.0 selects by best_f1 and reports EM / F1, HasAns / NoAns and
the no-answer threshold (best_f1_thresh) that `exlm_jax.load(workdir).answer` then uses.
Recipe (COCO-LM's SQuAD fine-tuning, as MAE-LM): windows of 384 tokens, document stride 128, questions
<= 64 tokens, batch 32, lr 2e-5, 3 epochs, 6.25 % warm-up then linear decay, AdamW (0.9, 0.98), eps 1e-6,
weight decay 0.1 as the GLUE config (COCO-LM: 0.01), no clipping; decoding n-best 20, answers <= 30
tokens. The grid: `get_sweep`.
"""

from exlm_jax import config_lib

QUICK_SOURCES = ("$DATA/squad/dev-v2.0.json", "$DATA/squad/train-v2.0.json")


def _arg(arg):
  return config_lib.parse_arg(arg, task="squad_v2", quick=False)


def get_config(arg=None):
  arg = _arg(arg)
  task = arg.task.lower()
  if task not in config_lib.SQUAD_TASKS:
    raise ValueError(f"unknown SQuAD task {arg.task!r}; choose one of {', '.join(config_lib.SQUAD_TASKS)}")
  config = config_lib.finetune_config(task)
  config.squad = config_lib.squad_config(task)
  config.seq_len = 384
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 3
  config.learning_rate = 2e-5
  config.warmup_ratio = 0.0625
  config.weight_decay = 0.1
  config.evals_per_epoch = 1
  config.log_every = 50
  if arg.quick:
    if task != "squad_v2":
      raise ValueError("quick runs on the shared SQuAD 2.0 articles; use task=squad_v2 with quick")
    config.squad.train_sources = config.squad.eval_sources = QUICK_SOURCES
    config.squad.train_articles = ("Rhine", "Computational_complexity_theory")
    config.squad.eval_articles = ("Normans",)
    config.seeds = (0,)
    config.num_epochs = 2
    config.seq_len = 256
    config.log_every = 10
  return config


def get_sweep(arg=None):
  """Our grid around the recipe (the papers give the recipe, not a SQuAD grid): lr {2, 3, 4}e-5 x epochs
  {2, 3}, batch 32 and 6.25 % warm-up fixed."""
  del arg
  return [{"learning_rate": lr, "num_epochs": ep} for lr in (2e-5, 3e-5, 4e-5) for ep in (2, 3)]
