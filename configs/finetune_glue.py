"""Fine-tuning on one GLUE task: `<s>` state -> dropout -> dense -> tanh -> dropout -> linear.

  python main.py --config configs/finetune_glue.py:task=sst2 --config.init_from=runs/maelm_text_small --workdir runs/ft_sst2
  python main.py --config configs/finetune_glue.py:task=rte,validation=dev --config.init_from=runs/exlm_text_small --workdir runs/ft_rte
  python main.py --config configs/finetune_glue.py:task=sst2,quick --config.init_from=runs/maelm_text_small --workdir /tmp/ft_sst2

Arguments: task (cola sst2 mrpc qqp stsb mnli qnli rte wnli), validation=carve|dev, quick (1 seed,
1 epoch, 512 train / 256 eval examples: a smoke run).
Data: SST-2, CoLA and RTE are read offline from the shared data folder; the other tasks come from
TFDS `glue/<task>` (TensorFlow + internet on first use). validation=carve (default) selects on a 10 %
stratified carve of GLUE train and reports GLUE dev as `test`; validation=dev selects on GLUE dev
and reports it, as the papers' "best dev" numbers.
Length: seq_len (default 0) = the pretraining run card's max_example_len (a packed text run: its block
size) rounded up to 8; init_from='' or hf: -> 128. Longer inputs are cut (data.overlong=skip drops them), counted.
Recipe (docs/design.md §9.5): AdamW (0.9, 0.98), eps 1e-6, weight decay 0.1
(ExLM / DinkyTrain; MAE-LM / COCO-LM use 0.01), linear decay after 6 % warm-up, dropout 0.1, no
clipping, validation twice per epoch, 3 seeds (mean ± std). Per-task lr / batch / epochs: `get_sweep`.
"""

from exlm_jax import config_lib

# MNLI, QNLI, QQP, SST-2: COCO-LM's grid skips 10 epochs and 10 % warm-up for them.
LARGE_TASKS = ("mnli", "qnli", "qqp", "sst2")


def _arg(arg):
  return config_lib.parse_arg(arg, task="sst2", validation="carve", quick=False)


def get_config(arg=None):
  arg = _arg(arg)
  task = arg.task.lower().replace("-", "")
  if task not in config_lib.GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {arg.task!r}; choose one of {', '.join(config_lib.GLUE_TASKS)}")
  config = config_lib.finetune_config(task)
  config.data.validation = arg.validation
  config.learning_rate = 2e-5
  config.warmup_ratio = 0.06
  config.weight_decay = 0.1
  config.evals_per_epoch = 2
  if task in LARGE_TASKS:
    config.batch_size, config.num_epochs = 32, 3
  else:
    config.batch_size, config.num_epochs = 16, 10
  config.eval_batch_size = 64
  config.log_every = 50
  if arg.quick:
    config.seeds = (0,)
    config.num_epochs = 1
    config.evals_per_epoch = 2
    config.log_every = 10
    config.data.max_train_examples, config.data.max_eval_examples = 512, 256
  return config


def get_sweep(arg=None):
  """The papers' grid (COCO-LM run_glue.sh; docs/design.md §9.5): lr {1,2,3,4}e-5, batch {16, 32},
  epochs {2, 3, 5, 10}, warm-up {6.25 %, 10 %} (WARMUP=16 | 10); large tasks skip 10 epochs and 10 % warm-up."""
  task = _arg(arg).task.lower().replace("-", "")
  epochs = (2, 3, 5) if task in LARGE_TASKS else (2, 3, 5, 10)
  warmups = (0.0625,) if task in LARGE_TASKS else (0.0625, 0.1)
  return [{"learning_rate": lr, "batch_size": bs, "num_epochs": ep, "warmup_ratio": wu}
          for lr in (1e-5, 2e-5, 3e-5, 4e-5) for bs in (16, 32) for ep in epochs for wu in warmups]
