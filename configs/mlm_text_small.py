"""Plain MLM on AG News text, `small` encoder: the text baseline, matched to configs/exlm_text_small.py.

  python main.py --config configs/mlm_text_small.py --workdir runs/mlm_text_small
  python main.py --config configs/mlm_text_small.py:size=tiny --config.total_steps=20 --workdir /tmp/mlm_text
  python main.py --config configs/mlm_text_small.py:budget=equal_flops --workdir runs/mlmpp_text_small

Exactly `configs/exlm_text_small.py:objective=mlm` (a test asserts it): the same encoder, SentencePiece
tokenizer, data, schedule, batch, steps and seed; `budget=equal_flops` gives MLM++ at ExLM's FLOPs.
For the MAE-LM comparison use `configs/maelm_text_small.py:objective=mlm` (MAE-LM's encoder).
"""

from exlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", budget="steps")
  return config_lib.load(f"configs/exlm_text_small.py:size={arg.size},objective=mlm,budget={arg.budget}")


def get_sweep(arg=None):
  """Mask ratio {0.15, 0.3, 0.45, 0.6}, as for ExLM."""
  del arg
  return [{"mask_prob": p} for p in (0.15, 0.3, 0.45, 0.6)]
