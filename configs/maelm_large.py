"""MAE-LM large++ (docs/design.md §13.5): 24-layer 1024-wide post-LN encoder, 4-layer decoder of the same
width, relative bias 128 bins / max distance 256, 160 GB RoBERTa corpus (set --config.data.path).

  python main.py --config configs/maelm_large.py --config.data.path=/data/roberta160g.txt \
      --config.mesh.fsdp=8 --workdir gs://bucket/maelm_large_pp

Optimisation follows the released base run script (the large++ schedule is not retrieved; see
configs/maelm_base.py). The vocabulary size (64k cased BPE) is inferred, not released.
Matched baselines (`config_lib.matched_baseline`): `objective=mlm` is MLM with everything else of this config
(encoder, tokenizer, data, schedule, batch, steps, seed); `objective=mlm,budget=equal_flops` is MLM++, trained
for this method's FLOPs (total_steps resolved when the vocabulary is known).
"""

from exlm_jax import config_lib


def _recipe():
  """configs/maelm_base.py's `reference_config` (configs/ is not a package: loaded by path)."""
  return config_lib.load_module("maelm_base.py", relative_to=__file__).reference_config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, objective="maelm", budget="steps")
  config = _recipe()("large", 64_000, rel_pos_bins=128, max_rel_pos=256)
  config.model.remat = "dots"  # 24 layers x 512 tokens x 2048 sequences: keep activations in check
  return config_lib.matched_baseline(config, arg.objective, arg.budget)
