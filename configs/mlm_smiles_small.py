"""Plain MLM on MOSES SMILES, `small` encoder (4 x 256), the baseline for the SMILES experiments.

  python main.py --config configs/mlm_smiles_small.py --workdir runs/mlm_smiles_small
  python main.py --config configs/mlm_smiles_small.py:size=tiny --config.total_steps=20 --workdir /tmp/x
  python main.py --config configs/mlm_smiles_small.py:budget=equal_flops --workdir runs/mlmpp_smiles_small

Exactly `configs/exlm_smiles_small.py:objective=mlm` (a test asserts it): ExLM's encoder (pre-LN, rope2d with
copy index 0), data, schedule, batch, steps and seed, so MLM vs ExLM differ only in the objective.
`budget=equal_flops` gives MLM++ (ExLM k=4's training FLOPs). Arguments: size=small|tiny, max_examples, budget.
"""

from exlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", max_examples=200_000, budget="steps")
  return config_lib.load(f"configs/exlm_smiles_small.py:size={arg.size},max_examples={arg.max_examples},"
                         f"objective=mlm,budget={arg.budget}")


def get_sweep(arg=None):
  """Mask-ratio robustness sweep (the ExLM paper's claim, docs/design.md §12.4) for the MLM baseline."""
  del arg
  return [{"mask_prob": p} for p in (0.15, 0.3, 0.45, 0.6)]
