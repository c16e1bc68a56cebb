"""ExLM pretraining on AG News text (documents packed into blocks), CPU-scale encoder.

  python main.py --config configs/exlm_text_small.py --workdir runs/exlm_text_small
  python main.py --config configs/exlm_text_small.py:size=tiny --config.total_steps=3 --workdir /tmp/exlm_text_tiny

Arguments: size=small|tiny, k, transitions=dag|ctc, positions=rope2d|rope1d_shared.
Every block ends with </s> (docs/design.md §4.1); </s> tokens between packed documents stay ordinary
tokens: only <s>, the masked slots and the final </s> are expanded.
Matched baselines (`config_lib.matched_baseline`): `objective=mlm` is MLM with everything else of this config
(encoder, tokenizer, data, schedule, batch, steps, seed); `objective=mlm,budget=equal_flops` is MLM++, trained
for this method's FLOPs (total_steps resolved when the vocabulary is known).
"""

import ml_collections

from exlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", k=4, transitions="dag", positions="rope2d", objective="exlm",
                             budget="steps")
  config = config_lib.pretrain_config("exlm", arg.size)
  config.exlm = ml_collections.ConfigDict(dict(num_copies=arg.k, transitions=arg.transitions, positions=arg.positions))
  config.data = config_lib.data_config("text", "$DATA/text/agnews/dev.tsv", vocab_size=8000,
                                       eval_path="$DATA/text/agnews/test.tsv", column="0")  # no header
  config.seq_len = 128
  config.mask_prob = 0.15
  config.batch_size = 64
  config.total_steps = 5000
  config.warmup_steps = 300
  config.learning_rate = 5e-4
  config.adam_b1, config.adam_b2, config.adam_eps = 0.9, 0.98, 1e-6
  config.weight_decay = 0.01
  config.grad_clip_norm = 0.0
  config.eval_every = 500
  config.checkpoint_every = 1000
  if arg.size == "tiny":
    config.batch_size, config.seq_len = 8, 64
    config.data.update(vocab_size=1000, max_examples=2000)
    config.total_steps, config.warmup_steps, config.log_every, config.eval_every = 20, 2, 5, 10
    config.eval_batches = 2
  return config_lib.matched_baseline(config, arg.objective, arg.budget)
