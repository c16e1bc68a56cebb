"""Plain MLM on MOSES SMILES, `small` encoder (4 x 256), the baseline for the SMILES experiments.

  python main.py --config configs/mlm_smiles_small.py --workdir runs/mlm_smiles_small
  python main.py --config configs/mlm_smiles_small.py:size=tiny --config.total_steps=20 --workdir /tmp/x

Encoder as ExLM's (pre-LN, rope2d with copy index 0), so MLM vs ExLM differ only in the objective.
"""

from exlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", max_examples=200_000)
  config = config_lib.pretrain_config("mlm", arg.size)
  config.data = config_lib.data_config(
      "smiles", "$DATA/smiles/moses/train.csv.gz", column="SMILES", max_examples=arg.max_examples,
      eval_path="$DATA/smiles/moses/test.csv.gz")
  config.seq_len = 128
  config.batch_size = 64
  config.total_steps = 5000
  config.warmup_steps = 300
  config.learning_rate = 5e-4
  config.eval_every = 500
  config.checkpoint_every = 1000
  if arg.size == "tiny":
    config.batch_size, config.seq_len, config.data.max_examples = 8, 64, 2000
    config.total_steps, config.warmup_steps, config.log_every, config.eval_every = 20, 2, 5, 10
    config.eval_batches = 2
  return config


def get_sweep(arg=None):
  """Mask-ratio robustness sweep (the ExLM paper's claim, docs/design.md §12.4) for the MLM baseline."""
  del arg
  return [{"mask_prob": p} for p in (0.15, 0.3, 0.45, 0.6)]
