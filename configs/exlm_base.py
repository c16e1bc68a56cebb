"""ExLM base / large: the official README recipe (docs/design.md §12.5), pre-LN encoder, 2-D RoPE.

  python main.py --config configs/exlm_base.py --config.data.path=/data/wikibooks.txt --workdir gs://bucket/exlm_base
  python main.py --config configs/exlm_base.py:size=large --config.data.path=... --workdir gs://bucket/exlm_large
  python main.py --config configs/exlm_base.py:k=2,accum=16 --config.data.path=... --workdir runs/exlm_k2

Arguments: size=base|large, k (states per expanded group), accum (micro-batches per update: the global
batch of 4096 sequences = 64/GPU x update-freq 32 x 2 GPUs in the official command; choose accum so that
4096 / accum sequences fit the mesh). The corpus (Wikipedia + BookCorpus in the paper) is not shipped:
set --config.data.path. The official recipe's GPT-2 BPE (50,265 entries) is replaced by a SentencePiece model
of the same size trained on the corpus; the 23k-update budget is the README's, which may be
shorter than the paper's headline runs (docs/design.md §12.5).
Matched baselines (`config_lib.matched_baseline`): `objective=mlm` is MLM with everything else of this config
(encoder, tokenizer, data, schedule, batch, steps, seed); `objective=mlm,budget=equal_flops` is MLM++, trained
for this method's FLOPs (total_steps resolved when the vocabulary is known).
"""

import ml_collections

from exlm_jax import config_lib


def reference_config(size: str = "base", k: int = 4, accum: int = 32):
  """The README's pretraining command at a given encoder size."""
  config = config_lib.pretrain_config("exlm", size)
  # Encoder (docs/design.md §12.5): pre-LN + final LN, no embedding LN, 2-D RoPE the only position signal.
  config.model.update(pre_ln=True, positions="rope2d", embed_layernorm=False, dropout_rate=0.1,
                      attention_dropout_rate=0.1, dtype="bfloat16")  # official: fp16 + loss scaling
  # --max-positions 2048 only sizes the link head's slot table (docs/design.md §12.3); rows past the
  # expanded-length bound (128 + 3 x 22 = 194) are never indexed.
  config.exlm = ml_collections.ConfigDict(dict(num_copies=k, max_link_positions=2048))
  config.seq_len = 128  # --tokens-per-sample 128
  config.mask_prob = 0.15  # 100 % [MASK]: --leave-unmasked-prob 0 --random-token-prob 0
  config.data = config_lib.data_config("text", "", vocab_size=50_265)
  config.batch_size = 4096
  config.grad_accum_steps = accum
  config.total_steps = 23_000
  config.learning_rate = 2e-3
  config.warmup_steps = 1_380  # 6 %
  config.lr_schedule = "linear"
  config.adam_b1, config.adam_b2, config.adam_eps = 0.9, 0.98, 1e-6
  config.weight_decay = 0.01
  config.grad_clip_norm = 0.0  # --clip-norm 0
  config.seed = 1
  config.log_every = 100
  config.eval_every = 1_000
  config.checkpoint_every = 1_000
  return config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", k=4, accum=32, objective="exlm", budget="steps")
  if arg.size not in ("base", "large"):
    raise ValueError(f"exlm_base size={arg.size!r}; choose base or large (small/tiny: exlm_text_small.py)")
  return config_lib.matched_baseline(reference_config(arg.size, arg.k, arg.accum), arg.objective, arg.budget)
