"""Fine-tuning on a MoleculeNet task, or on any MoleculeNet-style CSV, from a SMILES-pretrained encoder.

  python main.py --config configs/finetune_moleculenet.py:task=bbbp --config.init_from=runs/exlm_smiles_small --workdir runs/ft_bbbp
  python main.py --config configs/finetune_moleculenet.py:task=tox21 --config.init_from=runs/mlm_smiles_small --workdir runs/ft_tox21
  python main.py --config configs/finetune_moleculenet.py --config.init_from=runs/exlm_smiles_small --workdir runs/ft_mine \
      --config.data.path=my.csv --config.data.smiles_column=smiles --config.data.label_columns=A,B \
      --config.data.task_type=multitask_binary

Arguments: task (bbbp bace bace_pic50 clintox tox21 sider esol freesolv), quick (1 seed, 2 epochs,
256 train / 128 eval molecules: a smoke run).
Any CSV: data.path (file or $DATA/...), data.smiles_column, data.label_columns (comma-separated),
data.task_type = multitask_binary (0/1 columns, empty cell = missing label, masked out of the loss;
ROC-AUC) | regression (RMSE/MAE; targets standardised on the training split) | classification (one
column of class ids, softmax; accuracy). Setting data.path overrides `task`.
Length: seq_len (default 0) = the pretraining run's longest molecule (run card max_example_len) rounded up
to 8; longer SMILES are cut (data.overlong=skip drops them), counted per split in results.json / results.md.
Split: DeepChem's deterministic scaffold split 80/10/10 (data.split=random for a seeded random one);
model selection on validation by the main metric, test reported at the best step, mean ± std over
3 seeds (the Uni-Mol protocol the ExLM authors' molecular work follows; docs/design.md §9.5).
"""

from exlm_jax import config_lib


def _arg(arg):
  return config_lib.parse_arg(arg, task="bbbp", quick=False)


def get_config(arg=None):
  arg = _arg(arg)
  task = arg.task.lower()
  if task not in config_lib.MOLECULENET_TASKS and task != "csv":
    raise ValueError(f"unknown MoleculeNet task {arg.task!r}; choose one of {', '.join(config_lib.MOLECULENET_TASKS)}, "
                     "or task=csv with --config.data.path=FILE.csv")
  config = config_lib.finetune_config(task)
  config.data.split = "scaffold"
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 20
  config.learning_rate = 1e-4
  config.warmup_ratio = 0.06
  config.weight_decay = 0.1
  config.evals_per_epoch = 1
  config.log_every = 20
  if arg.quick:
    config.seeds = (0,)
    config.num_epochs = 2
    config.log_every = 5
    config.data.max_train_examples, config.data.max_eval_examples = 256, 128
  return config


def get_sweep(arg=None):
  """Our grid (no paper grid is available for the ExLM/MAE-LM SMILES encoders): lr {3e-5, 1e-4, 3e-4}
  x batch {16, 32} x epochs {10, 20, 40}, 6 % warm-up. It spans the usual range for small molecular
  encoders on these ~1-8k-molecule sets (Uni-Mol-style fine-tuning uses lr 5e-5..4e-4)."""
  del arg
  return [{"learning_rate": lr, "batch_size": bs, "num_epochs": ep}
          for lr in (3e-5, 1e-4, 3e-4) for bs in (16, 32) for ep in (10, 20, 40)]
