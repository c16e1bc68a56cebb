"""BBBP fine-tuning: configs/finetune_moleculenet.py with task=bbbp (other arguments pass through, e.g. `:quick`).

  python main.py --config configs/finetune_bbbp.py --config.init_from=runs/exlm_smiles_small --workdir runs/ft_bbbp
  python main.py --config configs/finetune_bbbp.py:quick --config.init_from=runs/mlm_smiles_small --workdir /tmp/ft_bbbp
"""

import importlib.util
import pathlib


def _moleculenet():
  path = pathlib.Path(__file__).with_name("finetune_moleculenet.py")
  spec = importlib.util.spec_from_file_location("finetune_moleculenet", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _arg(arg):
  return ",".join(["task=bbbp", *([arg] if arg else [])])


def get_config(arg=None):
  return _moleculenet().get_config(_arg(arg))


def get_sweep(arg=None):
  return _moleculenet().get_sweep(_arg(arg))
