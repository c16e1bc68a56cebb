"""Config helpers shared by every file in configs/ (big_vision style).

A config file defines `get_config(arg=None)`; `arg` is the text after the colon in
`--config configs/x.py:size=small,k=2`, parsed by `parse_arg` with types taken from the defaults.
Sweeps are `get_sweep(arg)` in the same file, returning a list of `{dotted.key: value}` overrides.
"""

from __future__ import annotations

import ml_collections

# (num_layers, d_model, num_heads, mlp_dim). `tiny` is for tests; `small` for CPU experiments.
MODEL_SIZES = {
    "tiny": (2, 32, 2, 64),
    "small": (4, 256, 4, 1024),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"a=1,b=x,flag"` into a ConfigDict, typing each value like its default.

  A bare word without `=` sets a boolean default to True. Unknown keys are an error so a typo in a
  launch command cannot silently fall back to a default.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value, e.g. {key}={default}")
      result[key] = True
    else:
      result[key] = typed_like(default, value, f"config argument {key}")
  return result


def typed_like(default, text: str, what: str):
  """`text` converted to the type of `default` (bool: true/false/1/0; None or str: the text itself)."""
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{what}={text!r} must be true or false")
    return text.lower() in ("true", "1")
  return type(default)(text) if isinstance(default, (int, float)) else text


def model_config(size: str = "small", **overrides) -> ml_collections.ConfigDict:
  """The shared encoder's hyper-parameters (DESIGN.md §1); sizes from MODEL_SIZES."""
  if size not in MODEL_SIZES:
    raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
  num_layers, d_model, num_heads, mlp_dim = MODEL_SIZES[size]
  cfg = ml_collections.ConfigDict(dict(
      size=size,
      num_layers=num_layers,
      d_model=d_model,
      num_heads=num_heads,
      mlp_dim=mlp_dim,
      vocab_size=-1,  # filled from the tokenizer at run time
      pre_ln=True,  # ExLM: pre-LN + final LN; MAE-LM: post-LN
      positions="rope2d",  # "rope2d" | "absolute+relbias"
      embed_layernorm=False,  # MAE-LM has one; the ExLM encoder does not
      max_positions=512,  # size of the learned absolute table (absolute+relbias)
      rel_pos_bins=64,
      max_rel_pos=128,
      rope_theta=10000.0,
      dropout_rate=0.1,
      attention_dropout_rate=0.1,
      attention_impl="xla",  # fused attention kernel when no attention dropout: "xla" | "cudnn" (GPU, bf16)
      dtype="float32",  # activations; "bfloat16" for the fast path. Params stay float32.
      remat="none",  # "none" | "full" | "dots" (jax.checkpoint_policies.dots_saveable)
      scan_layers=False,
  ))
  cfg.update(overrides)
  return cfg


def data_config(name: str = "smiles", path: str = "", **overrides) -> ml_collections.ConfigDict:
  """Where pretraining data comes from and how it is tokenized (see exlm_jax/data/pipeline.py)."""
  cfg = ml_collections.ConfigDict(dict(
      name=name,  # "smiles" (one molecule per block) | "text" (documents packed into blocks)
      path=path,  # local file, "$DATA/..." (shared data folder), "rdkit:NCI/first_5K.smi", or a URL
      eval_path="",  # held-out file; empty = hold out `eval_fraction` of the records of `path`
      eval_fraction=0.02,
      column="",  # CSV/TSV/JSONL column (header name, or 0-based index for a file without header); "" = auto
      documents="line",  # plain-text files: "line" (one document per line) | "blank_line" (paragraphs)
      tokenizer="smiles_regex" if name == "smiles" else "sentencepiece",  # | "smiles_bpe"
      vocab_size=8000,  # sentencepiece / BPE only
      spm_max_sentences=500_000,  # sentencepiece / BPE: train on at most this many (sampled) records
      max_examples=-1,  # read at most this many records per file (quick runs, tests); -1 = all
      overlong="truncate",  # SMILES longer than a block: "truncate" | "skip" (counted either way)
      validate_smiles=False,  # parse every SMILES with RDKit; unparsable ones are counted and skipped
      tfds_dir="",  # where TFDS builds datasets; empty = $EXLM_TFDS_DIR or ~/tensorflow_datasets
      num_workers=0,  # Grain worker processes (0 = in-process)
      prefetch_batches=4,  # batches Grain reads ahead per process
  ))
  cfg.update(overrides)
  return cfg


def pretrain_config(objective: str = "mlm", size: str = "small", **overrides) -> ml_collections.ConfigDict:
  """Every pretraining config starts here; experiment files override fields like a paper's table."""
  cfg = ml_collections.ConfigDict()
  cfg.objective = objective
  cfg.model = model_config(size)
  cfg.seq_len = 128
  cfg.mask_prob = 0.15
  cfg.batch_size = 64  # global, in sequences
  cfg.grad_accum_steps = 1  # micro-batches per update (batch_size must divide evenly)
  cfg.total_steps = 10_000
  cfg.learning_rate = 5e-4
  cfg.warmup_steps = 600
  cfg.lr_schedule = "linear"  # "linear" | "cosine" decay to 0 after warm-up
  cfg.adam_b1 = 0.9
  cfg.adam_b2 = 0.98
  cfg.adam_eps = 1e-6
  cfg.weight_decay = 0.01
  cfg.grad_clip_norm = 0.0  # 0 = no clipping (both papers' pretraining ExLM; MAE-LM uses 2.0)
  cfg.seed = 0
  cfg.log_every = 10
  cfg.eval_every = 500
  cfg.eval_batches = 8
  cfg.checkpoint_every = 1000
  cfg.keep_checkpoints = 3
  cfg.async_checkpointing = True
  # jax.profiler trace of the updates profile_start_step+1 .. profile_start_step+profile_num_steps into
  # workdir/profile (TensorBoard's profile tab / xprof); -1 = off. Start after compile and warm-up, e.g. 10.
  cfg.profile_start_step = -1
  cfg.profile_num_steps = 3
  # ICI axis sizes (-1 = the rest) and DCN sizes across slices / hosts (hybrid mesh when > 1).
  cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
  cfg.sharding = "fsdp_tp"  # "dp" | "fsdp" | "fsdp_tp" logical-rule presets (same rules; sizes pick)
  cfg.sharding_tolerance = 0.25  # fail if a device holds > (1 + tol) * params / (fsdp * tensor)
  cfg.logical_axis_rules = ()  # non-empty overrides the preset
  cfg.data = data_config()
  cfg.mlm = ml_collections.ConfigDict(dict(bert_corruption=False))
  cfg.update(overrides)
  return cfg
