"""MAE-LM base / base++ (docs/design.md §13.5): 12-layer 768-wide post-LN encoder, 4-layer decoder.

  python main.py --config configs/maelm_base.py:variant=base --config.data.path=/data/wikibooks.txt \
      --workdir gs://bucket/maelm_base
  python main.py --config configs/maelm_base.py:variant=base++ --config.data.path=/data/roberta160g.txt \
      --workdir gs://bucket/maelm_base_pp

Variants: base (16 GB BERT corpus: Wikipedia + BookCorpus) and base++ (160 GB RoBERTa corpus). They share
the architecture and the released run script's optimisation; they differ in corpus and vocabulary.
The corpora are not shipped: set --config.data.path. Values marked "inferred" are not in the released code
(vocabulary: the COCO-LM lineage's 32k uncased / 64k cased BPE); the paper's per-setting step counts are
not retrieved, so `total_steps` is the run script's 2M-update horizon of the linear decay -- override it.
Matched baselines (`config_lib.matched_baseline`): `objective=mlm` is MLM with everything else of this config
(encoder, tokenizer, data, schedule, batch, steps, seed); `objective=mlm,budget=equal_flops` is MLM++, trained
for this method's FLOPs (total_steps resolved when the vocabulary is known).
"""

import ml_collections

from exlm_jax import config_lib

_VARIANTS = {
    # name: (sentencepiece vocabulary size (inferred), description)
    "base": (32_768, "16 GB: Wikipedia + BookCorpus"),
    "base++": (64_000, "160 GB: RoBERTa corpus"),
}


def reference_config(size: str, vocab_size: int, rel_pos_bins: int, max_rel_pos: int):
  """The released recipe (run_pretrain.sh) at a given encoder size."""
  config = config_lib.pretrain_config("maelm", size)
  config.model.update(pre_ln=False, positions="absolute+relbias", embed_layernorm=True, max_positions=512,
                      rel_pos_bins=rel_pos_bins, max_rel_pos=max_rel_pos, dropout_rate=0.1,
                      attention_dropout_rate=0.1, dtype="bfloat16")
  config.maelm = ml_collections.ConfigDict(dict(decoder_layers=4))
  config.seq_len = 512
  config.mask_prob = 0.15
  config.data = config_lib.data_config("text", "", vocab_size=vocab_size)
  config.batch_size = 2048  # --max-tokens 16384 x 64 GPUs, full 512-token blocks
  config.total_steps = 2_000_000  # --total-num-update (linear decay horizon)
  config.learning_rate = 2e-4
  config.warmup_steps = 10_000
  config.lr_schedule = "linear"
  config.adam_b1, config.adam_b2, config.adam_eps = 0.9, 0.98, 1e-6
  config.weight_decay = 0.01
  config.grad_clip_norm = 2.0
  config.seed = 100
  config.log_every = 100
  config.eval_every = 10_000
  config.checkpoint_every = 10_000
  return config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="base", objective="maelm", budget="steps")
  if arg.variant not in _VARIANTS:
    raise ValueError(f"unknown variant {arg.variant!r}; choose one of {', '.join(_VARIANTS)}")
  vocab_size, _ = _VARIANTS[arg.variant]
  config = reference_config("base", vocab_size, rel_pos_bins=64, max_rel_pos=128)
  return config_lib.matched_baseline(config, arg.objective, arg.budget)
