"""MAE-LM pretraining on text (AG News dev split, documents packed into blocks), CPU-scale encoder.

  python main.py --config configs/maelm_text_small.py --workdir /tmp/maelm_text
  python main.py --config configs/maelm_text_small.py:size=tiny --config.total_steps=3 --workdir /tmp/maelm_text_tiny

Arguments: size=small|tiny, positions=absolute+relbias (the paper's) | rope2d.
AG News is only a quick, offline corpus (10k news snippets); the paper pretrains on Wikipedia + BookCorpus
(configs/maelm_base.py).
Matched baselines (`config_lib.matched_baseline`): `objective=mlm` is MLM with everything else of this config
(encoder, tokenizer, data, schedule, batch, steps, seed); `objective=mlm,budget=equal_flops` is MLM++, trained
for this method's FLOPs (total_steps resolved when the vocabulary is known).
"""

import ml_collections

from exlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", positions="absolute+relbias", objective="maelm", budget="steps")
  config = config_lib.pretrain_config("maelm", arg.size)
  config.model.update(pre_ln=False, positions=arg.positions, embed_layernorm=True,
                      max_positions=512, rel_pos_bins=64, max_rel_pos=128)
  config.maelm = ml_collections.ConfigDict()  # the released recipe: every default
  config.seq_len = 128
  config.mask_prob = 0.15
  config.data = config_lib.data_config("text", "$DATA/text/agnews/dev.tsv", column="0", vocab_size=8000)  # no header
  # MAE-LM's optimiser (docs/design.md §13.5), schedule scaled down for a CPU run.
  config.batch_size = 64
  config.total_steps = 10_000
  config.learning_rate = 5e-4
  config.warmup_steps = 600
  config.lr_schedule = "linear"
  config.adam_b1, config.adam_b2, config.adam_eps = 0.9, 0.98, 1e-6
  config.weight_decay = 0.01
  config.grad_clip_norm = 2.0
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 1_000
  if arg.size == "tiny":
    config.maelm.decoder_layers = 2
    config.data.max_examples = 2_000
    config.data.vocab_size = 1_000
    config.batch_size = 8
    config.total_steps = 20
    config.warmup_steps = 2
    config.log_every = 1
    config.eval_every = 10
    config.eval_batches = 1
    config.checkpoint_every = 10
  return config_lib.matched_baseline(config, arg.objective, arg.budget)
