"""SST-2 fine-tuning: configs/finetune_glue.py with task=sst2 (other arguments pass through, e.g. `:quick`).

  python main.py --config configs/finetune_sst2.py --config.init_from=runs/maelm_text_small --workdir runs/ft_sst2
  python main.py --config configs/finetune_sst2.py:quick --config.init_from=runs/maelm_text_small --workdir /tmp/ft_sst2
"""

from exlm_jax import config_lib


def _glue():
  return config_lib.load_module("finetune_glue.py", relative_to=__file__)


def _arg(arg):
  return ",".join(["task=sst2", *([arg] if arg else [])])


def get_config(arg=None):
  return _glue().get_config(_arg(arg))


def get_sweep(arg=None):
  return _glue().get_sweep(_arg(arg))
