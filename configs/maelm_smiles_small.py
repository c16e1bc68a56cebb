"""MAE-LM pretraining on MOSES SMILES (packed blocks: several molecules per block), CPU-scale encoder.

  python main.py --config configs/maelm_smiles_small.py --workdir /tmp/maelm_smiles
  python main.py --config configs/maelm_smiles_small.py:size=tiny --config.total_steps=3 --workdir /tmp/maelm_tiny
  python main.py --config configs/maelm_smiles_small.py:positions=rope2d --workdir /tmp/maelm_smiles_rope

Arguments: size=small|tiny (tiny: 2-layer width-32 encoder, 2-layer decoder, 2000 molecules: for tests),
positions=absolute+relbias (the paper's) | rope2d, max_examples (rows read from MOSES).
The sweep (`get_sweep`) varies the decoder depth and the position alignment of the encoder.
Matched baselines (`config_lib.matched_baseline`): `objective=mlm` is MLM with everything else of this config
(encoder, tokenizer, data, schedule, batch, steps, seed); `objective=mlm,budget=equal_flops` is MLM++, trained
for this method's FLOPs (total_steps resolved when the vocabulary is known).
"""

import itertools

import ml_collections

from exlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", positions="absolute+relbias", max_examples=200_000, objective="maelm",
                             budget="steps")
  config = config_lib.pretrain_config("maelm", arg.size)
  # MAE-LM's encoder (docs/design.md §13.1): post-LN, embedding LayerNorm, absolute + relative positions.
  config.model.update(pre_ln=False, positions=arg.positions, embed_layernorm=True,
                      max_positions=128, rel_pos_bins=64, max_rel_pos=128)
  config.maelm = ml_collections.ConfigDict()  # the released recipe: every default
  # Packed blocks of 128 slots: ~3 MOSES molecules (<= 53 tokens with <s> and </s>) per block, 0.87 of the slots
  # real (0.61 at 64 slots); each is compacted, encoded and decoded as if alone. data.packing=false: one per block.
  config.seq_len = 128
  config.mask_prob = 0.15
  config.data = config_lib.data_config(
      "smiles", "$DATA/smiles/moses/train.csv.gz", column="SMILES", max_examples=arg.max_examples,
      eval_path="$DATA/smiles/moses/test.csv.gz", packing=True, max_examples_per_block=4)  # as exlm_smiles_small
  # MAE-LM's optimiser (docs/design.md §13.5): Adam (0.9, 0.98), eps 1e-6, decoupled wd 0.01, clip 2.0, linear decay;
  # peak LR / warm-up / horizon scaled down from 2e-4 / 10k / 2M at 2048 x 512 tokens.
  config.batch_size = 128
  config.total_steps = 20_000
  config.learning_rate = 5e-4
  config.warmup_steps = 1_000
  config.lr_schedule = "linear"
  config.adam_b1, config.adam_b2, config.adam_eps = 0.9, 0.98, 1e-6
  config.weight_decay = 0.01
  config.grad_clip_norm = 2.0
  config.log_every = 50
  config.eval_every = 1_000
  config.checkpoint_every = 2_000
  if arg.size == "tiny":
    config.maelm.decoder_layers = 2
    config.data.max_examples = 2_000
    config.batch_size = 8
    config.total_steps = 20
    config.warmup_steps = 2
    config.log_every = 1
    config.eval_every = 10
    config.eval_batches = 1
    config.checkpoint_every = 10
  return config_lib.matched_baseline(config, arg.objective, arg.budget)


def get_sweep(arg=None):
  """Decoder depth x position alignment (official --gen-decoder-layers, --no-pos-align; docs/design.md §13.6)."""
  del arg
  return [{"maelm.decoder_layers": layers, "maelm.no_pos_align": no_pos_align}
          for layers, no_pos_align in itertools.product((1, 2, 4, 6), (False, True))]
