"""BBBP fine-tuning: configs/finetune_moleculenet.py with task=bbbp (other arguments pass through, e.g. `:quick`).

  python main.py --config configs/finetune_bbbp.py --config.init_from=runs/exlm_smiles_small --workdir runs/ft_bbbp
  python main.py --config configs/finetune_bbbp.py:quick --config.init_from=runs/mlm_smiles_small --workdir /tmp/ft_bbbp
"""

from exlm_jax import config_lib


def _moleculenet():
  return config_lib.load_module("finetune_moleculenet.py", relative_to=__file__)


def _arg(arg):
  return ",".join(["task=bbbp", *([arg] if arg else [])])


def get_config(arg=None):
  return _moleculenet().get_config(_arg(arg))


def get_sweep(arg=None):
  return _moleculenet().get_sweep(_arg(arg))
