"""Config helpers shared by every file in configs/ (big_vision style), and the one source of defaults.

A config file defines `get_config(arg=None)`; `arg` is the text after the colon in
`--config configs/x.py:size=small,k=2`, parsed by `parse_arg` with types taken from the defaults.
Sweeps are `get_sweep(arg)` in the same file, returning a list of `{dotted.key: value}` overrides.
`load("configs/x.py:arg")` is how every caller (main.py, launch/sweep.py, tests, configs deriving from
another config) turns such a spec into a ConfigDict; `override` applies `--config.key=value` text.

Configs are data: this module and the config files import only ml_collections and the standard
library (no JAX, no other exlm_jax module), so loading one is cheap anywhere, e.g. on a login node.
An objective's own block (`config.exlm`, `config.maelm`, ...) holds only the keys a config changes;
the objective merges its defaults over it and rejects unknown keys (objectives/base.py `read_options`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import pathlib
import types
from typing import Iterable

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]  # configs/ lives here; relative specs fall back to it

# (num_layers, d_model, num_heads, mlp_dim). `tiny` is for tests; `small` for CPU experiments.
MODEL_SIZES = {
    "tiny": (2, 32, 2, 64),
    "small": (4, 256, 4, 1024),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}
# The sharding fields of a pretraining config and their defaults (train/partitioning.py falls back to
# them for configs without these fields, e.g. fine-tuning).
SHARDING = dict(
    sharding="fsdp_tp",  # "dp" | "fsdp" | "fsdp_tp" logical-rule presets (same rules; sizes pick)
    sharding_tolerance=0.25,  # fail if a device holds > (1 + tol) * params / (fsdp * tensor)
    logical_axis_rules=(),  # non-empty overrides the preset
)
# Task names the fine-tuning configs accept (the registries: exlm_jax/finetune/metrics.py GLUE_TASKS,
# exlm_jax/finetune/tasks.py MOLECULENET; a test keeps them equal).
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
MOLECULENET_TASKS = ("bbbp", "bace", "bace_pic50", "clintox", "tox21", "sider", "esol", "freesolv")
SQUAD_VERSIONS = {"squad_v1": "v1.1", "squad_v2": "v2.0"}  # task name -> SQuAD version (finetune/squad/task.py)
SQUAD_TASKS = tuple(SQUAD_VERSIONS)
# Fine-tuning seq_len=0 without a pretraining run card to read max_example_len from (init_from='' or 'hf:PATH').
FINETUNE_FALLBACK_SEQ_LEN = 128


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
      raise ValueError(f"unknown config argument {key!r}; {closest(key, defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value, e.g. {key}={default}")
      result[key] = True
    else:
      result[key] = typed_like(default, value, f"config argument {key}")
  return result


def typed_like(default, text: str, what: str):
  """`text` read as a value of `default`'s type; `what` names the field in the one-line error.

  bool: true/false/1/0; int, float: their literals; tuple/list: a Python literal ("(0, 1)", "0,1") or
  comma-separated words ("a,b"); None: a Python literal when the text is one, else the text; str: the text.
  """
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{what}={text!r} must be true or false")
    return text.lower() in ("true", "1")
  if isinstance(default, (int, float)):
    try:
      return type(default)(text)
    except ValueError:
      kind = "an integer" if isinstance(default, int) else "a number"
      raise ValueError(f"{what}={text!r} must be {kind}, like its default {default!r}") from None
  if isinstance(default, (tuple, list)):
    value = _literal(text)
    if isinstance(value, str):  # words: "a,b" or "(a,b)"
      words = text.strip()
      words = words[1:-1] if words[:1] + words[-1:] in ("()", "[]") else words
      value = [part.strip() for part in words.split(",") if part.strip()]
    return type(default)(value if isinstance(value, (tuple, list)) else (value,))
  if isinstance(default, ml_collections.ConfigDict):
    raise ValueError(f"{what} is a section, not a value; set its keys ({', '.join(sorted(default))}) one by one")
  return _literal(text) if default is None else text


def _literal(text: str):
  """A Python literal's value, or the text itself when it is not one."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def format_value(value) -> str:
  """A value as `--config.key=` text that `typed_like` (and ml_collections' flags) read back as the same value:
  bools as true / false, tuples and lists as a Python tuple literal, everything else as str()."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def closest(key: str, known: Iterable[str]) -> str:
  """'did you mean X?' for the known key closest to a mistyped `key` (difflib), else the list of known keys."""
  known = sorted(known)
  close = difflib.get_close_matches(key, known, n=1)
  return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"


def override(config: ml_collections.ConfigDict, key: str, text: str, flag: str = "--config.") -> None:
  """Sets the dotted `key` of `config` from command-line `text`, typed like its current value.

  Every part of the key must exist (a typo is a one-line error naming the closest key); `flag` is how
  the caller spells the key in its messages: `--config.` (main.py), `--set ` (bench).
  """
  node, path = config, "config"
  for name in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"{flag}{key}: {path} is a value, not a section")
    if name not in node:
      raise ValueError(f"{flag}{key}: {path} has no key {name!r}; {closest(name, node.keys())}")
    parent, node, path = node, node[name], f"{path}.{name}"
  parent[name] = typed_like(node, text, f"{flag}{key}")


def model_config(size: str = "small", **overrides) -> ml_collections.ConfigDict:
  """The shared encoder's hyper-parameters; sizes from MODEL_SIZES.

  `max_positions` (the longest block; for learned positions also the table size) defaults by the
  `positions` given here, so a config that switches `positions` later sets `max_positions` with it.
  """
  positions = overrides.get("positions", "rope2d")
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
      positions=positions,  # "rope2d" | "absolute+relbias" | "absolute"
      embed_layernorm=False,  # MAE-LM has one; the ExLM encoder does not
      # The longest block (seq_len <= this for every scheme); for learned positions also the table size.
      # RoPE has no table: 2048 as the ExLM reference's --max-positions; learned tables: BERT's 512 rows.
      max_positions=2048 if positions == "rope2d" else 512,
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
      name=name,  # "smiles" (molecules) | "text" (documents)
      path=path,  # local file, "$DATA/..." (shared data folder), "rdkit:NCI/first_5K.smi", or a URL
      eval_path="",  # held-out file; empty = hold out `eval_fraction` of the records of `path`
      eval_fraction=0.02,
      column="",  # CSV/TSV/JSONL column (header name, or 0-based index for a file without header); "" = auto
      documents="line",  # plain-text files: "line" (one document per line) | "blank_line" (paragraphs)
      tokenizer="smiles_regex" if name == "smiles" else "sentencepiece",  # | "smiles_bpe"
      vocab_size=8000,  # sentencepiece / BPE only
      spm_max_sentences=500_000,  # sentencepiece / BPE: train on at most this many (sampled) records
      max_examples=-1,  # read at most this many records per file (quick runs, tests); -1 = all
      overlong="truncate",  # SMILES / documents longer than a block: "truncate" | "skip" (counted either way)
      # text only: "stream" (documents joined by </s>, cut into seq_len windows) | "documents" (each document
      # is one example like a molecule: truncated or skipped by `overlong`, packed with `packing`)
      text_units="stream",
      # Several complete examples per block, each <s> ... </s> with its own segment id and positions from 0;
      # attention, masking and the loss stay per example (fairseq's token-budget batching, without its
      # variable shapes). False = one example per block, padded (text_units='stream' fills blocks anyway).
      packing=False,
      # The most examples one block holds (the objectives' static bounds); a block reaching it is closed
      # early (counted). -1 = the most an uncapped greedy pass over the corpus puts in one block.
      max_examples_per_block=-1,
      validate_smiles=False,  # parse every SMILES with RDKit; unparsable ones are counted and skipped
      tfds_dir="",  # where TFDS builds datasets; empty = $EXLM_TFDS_DIR or ~/tensorflow_datasets
      num_workers=0,  # Grain worker processes (0 = in-process)
      prefetch_batches=4,  # batches Grain reads ahead per process
  ))
  cfg.update(overrides)
  return cfg


BUDGETS = ("steps", "equal_flops")


def matched_baseline(config: ml_collections.ConfigDict, objective: str, budget: str = "steps") -> ml_collections.ConfigDict:
  """`config` with only its objective swapped: the same encoder, tokenizer, data, schedule, batch, steps and seed.

  The method's own block (`config.<method>`) is dropped and recorded in `matched_to` with its objective and
  steps, so `budget='equal_flops'` can later give the baseline the method's training FLOPs.
  `objective` equal to the method's own returns `config` unchanged.
  """
  if budget not in BUDGETS:
    raise ValueError(f"budget={budget!r}; choose one of {', '.join(BUDGETS)}")
  if objective == config.objective:
    if budget != "steps":
      raise ValueError(f"budget={budget!r} matches a baseline to another method; with objective={objective} use steps")
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  method = out.objective
  options = out[method].to_dict() if method in out else {}
  if method in out:
    del out[method]
  out.objective, out.budget = objective, budget
  out.matched_to = ml_collections.ConfigDict(dict(objective=method, options=options, total_steps=out.total_steps))
  return out


def pretrain_config(objective: str = "mlm", size: str = "small", **overrides) -> ml_collections.ConfigDict:
  """Every pretraining config starts here; experiment files override fields like a paper's table."""
  cfg = ml_collections.ConfigDict()
  cfg.objective = objective
  cfg.init_from = ""  # "" = random init; "hf:PATH" = a local RoBERTa-style (or exported) Hugging Face checkpoint
  # "steps": train total_steps; "equal_flops": total_steps resolved (once the vocabulary is known) so that the run
  # spends the training FLOPs of the method in `matched_to` (MLM++ of the ExLM paper; see `matched_baseline`).
  cfg.budget = "steps"
  cfg.matched_to = ml_collections.ConfigDict(dict(objective="", options={}, total_steps=0))
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
  cfg.weight_decay_rule = "all"  # "all": every parameter (both papers' fairseq runs) | "bert": no biases / LayerNorm
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
  cfg.update(SHARDING)
  cfg.data = data_config()
  # The objective's own block, e.g. `cfg.exlm = ml_collections.ConfigDict(dict(num_copies=2))`, holds only
  # what a config changes; absent = the objective's defaults (objectives/<objective>.py DEFAULTS).
  cfg.update(overrides)
  return cfg


def finetune_config(task: str = "sst2") -> ml_collections.ConfigDict:
  """Every fine-tuning config starts here (configs/finetune_*.py override fields); see exlm_jax/finetune/."""
  cfg = ml_collections.ConfigDict()
  cfg.init_from = ""  # pretraining workdir / checkpoints/ / checkpoints/<step>; "" = random init (baseline)
  cfg.tokenizer = ""  # init_from="" only: a tokenizer folder / workdir ("" = built from the training split)
  cfg.finetune = ml_collections.ConfigDict(dict(
      task=task,  # GLUE task (sst2, cola, ...), MoleculeNet task (bbbp, tox21, ...), or "csv" (config.data.path)
      pooler_dropout=0.1,  # the head's two dropouts (both papers: 0.1)
      normalize_targets=True,  # regression: train on (y - mean) / std of the training split; metrics in label units
      save_checkpoints=True,  # best params per seed under seed_<s>/checkpoints (what exlm_jax.load reads)
  ))
  cfg.data = ml_collections.ConfigDict(dict(
      source="auto",  # GLUE: "auto" | "local" (shared data folder) | "tfds"
      validation="carve",  # GLUE: "carve" (valid_fraction of train; GLUE dev = test) | "dev" (select on GLUE dev)
      valid_fraction=0.1,
      path="",  # CSV tasks: file or "$DATA/..."; setting it makes the task a CSV task
      smiles_column="smiles",
      label_columns="",  # comma-separated, e.g. "NR-AR,SR-p53"
      task_type="multitask_binary",  # CSV: multitask_binary (0/1, missing ok, ROC-AUC) | regression | classification
      split="scaffold",  # molecules: "scaffold" (deterministic) | "random"
      fractions=(0.8, 0.1, 0.1),
      split_seed=0,  # data splits and subsampling; model seeds are `seeds`
      max_train_examples=-1,  # subsample the training split (quick runs, tests); -1 = all
      max_eval_examples=-1,  # subsample every other split; -1 = all
      overlong="truncate",  # inputs longer than seq_len: "truncate" (cut at the end) | "skip"; counted per split
  ))
  cfg.model = ml_collections.ConfigDict(dict(dropout_rate=0.1, attention_dropout_rate=0.1, dtype="float32",
                                             remat="none"))  # overrides on the pretrained architecture
  cfg.scratch_size = "small"  # init_from="": a MODEL_SIZES entry
  cfg.scratch_vocab_size = 8000  # init_from="" on text without `tokenizer`: SentencePiece trained on the train split
  cfg.seq_len = 0  # 0: the pretraining run card's max_example_len rounded up to 8 (init_from='' / hf: -> 128 above)
  cfg.batch_size = 32  # global
  cfg.eval_batch_size = 64
  cfg.num_epochs = 3
  cfg.learning_rate = 2e-5
  cfg.warmup_ratio = 0.06  # fraction of all steps
  cfg.lr_schedule = "linear"
  cfg.adam_b1 = 0.9
  cfg.adam_b2 = 0.98
  cfg.adam_eps = 1e-6
  cfg.weight_decay = 0.1  # ExLM (DinkyTrain); MAE-LM / COCO-LM use 0.01
  cfg.weight_decay_rule = "all"  # as pretraining: "all" (fairseq) | "bert" (no biases / LayerNorm)
  cfg.grad_clip_norm = 0.0  # both papers: no clipping
  cfg.seeds = (0, 1, 2)
  cfg.eval_every = 0  # steps between evaluations of the selection split; 0 = `evals_per_epoch` per epoch
  cfg.evals_per_epoch = 1  # with eval_every=0: evenly spaced, the last at the epoch's end (COCO-LM: 2)
  cfg.log_every = 50
  cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  cfg.logical_axis_rules = ()
  return cfg


def squad_config(task: str = "squad_v2") -> ml_collections.ConfigDict:
  """The `config.squad` block of extractive-QA fine-tuning (finetune/squad/): data, windows and decoding.

  Sources: official SQuAD JSON files (paths or `$DATA/...`, several allowed) or TFDS builders
  (`tfds:squad/v2.0:train`); the defaults are the official train / dev sets through TFDS. Articles ()
  = every article of the sources; train and evaluation articles must not overlap (split by article).
  """
  if task not in SQUAD_VERSIONS:
    raise ValueError(f"unknown SQuAD task {task!r}; choose one of {', '.join(SQUAD_TASKS)}")
  version = SQUAD_VERSIONS[task]
  return ml_collections.ConfigDict(dict(
      train_sources=(f"tfds:squad/{version}:train",),
      eval_sources=(f"tfds:squad/{version}:validation",),
      train_articles=(),  # titles, e.g. ("Rhine",); () = all
      eval_articles=(),
      doc_stride=128,  # BERT / COCO-LM: windows of seq_len start every 128 context tokens
      max_query_length=64,  # question tokens kept
      n_best=20,  # decoding: distinct answer texts kept per question
      max_answer_length=30,  # decoding: tokens per answer span
  ))


# ----------------------------------------------------------------------------------------------
# Loading config files
# ----------------------------------------------------------------------------------------------


def load_module(path: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> types.ModuleType:
  """The config file at `path` as a fresh module (configs/ is not a package).

  A relative `path` is looked up in the current directory, then in the repository; with `relative_to`
  (a config deriving from its neighbour passes its `__file__`), next to that file only.
  A missing file is a one-line FileNotFoundError naming the path and where it was looked for.
  """
  path = pathlib.Path(path)
  if relative_to is not None:
    candidates = [pathlib.Path(relative_to).resolve().parent / path]
  else:
    candidates = [path] if path.is_absolute() else [pathlib.Path.cwd() / path, REPO / path]
  found = next((c for c in candidates if c.is_file()), None)
  if found is None:
    where = " or ".join(str(c.parent) for c in dict.fromkeys(candidates))
    raise FileNotFoundError(f"config file {str(path)!r} not found in {where}; give a path like "
                            "configs/quickstart.py")
  spec = importlib.util.spec_from_file_location(f"exlm_config_{found.stem}", found)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:size=tiny' -> ('configs/x.py', 'size=tiny'); no colon -> (spec, None)."""
  path, sep, arg = str(spec).partition(".py:")
  return (path + ".py", arg) if sep else (str(spec), None)


def load(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of `get_config(arg)` for 'path/to/config.py[:arg]' (the path as in `load_module`)."""
  path, arg = split_spec(spec)
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} defines no get_config(arg)")
  config = module.get_config() if arg is None else module.get_config(arg)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{path}: get_config({arg!r}) returned {type(config).__name__}, not a ConfigDict")
  return config
