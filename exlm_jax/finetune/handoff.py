"""What fine-tuning starts from: a pretraining (or fine-tuning) run's encoder, architecture and tokenizer,
checked leaf by leaf against the fine-tuning encoder, or a randomly initialised encoder (a baseline)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from exlm_jax import config_lib, objectives, run_store
from exlm_jax.models.encoder import ModelConfig


@dataclasses.dataclass
class Initialisation:
  """What a fine-tuning run starts from. encoder None = random init (from scratch).

  max_example_len: the longest example (slots, <s> and </s> included) `init_from` trained on, from its run card
    (the default fine-tuning seq_len and the positions a learned table has seen); None without a card.
  """

  model_config: ModelConfig
  tokenizer: Any
  encoder: Any = None
  objective: str = ""
  step: int | None = None
  source: str = ""
  max_example_len: int | None = None


def check_encoder_tree(encoder, model_config: ModelConfig, source: str) -> None:
  """Fails loudly unless `encoder` has exactly the leaves and shapes of an Encoder(model_config)."""
  problems = objectives.base.encoder_tree_problems(encoder, model_config)
  if problems:
    raise ValueError(f"the encoder of {source} does not match the fine-tuning encoder: " + "; ".join(problems) +
                     " -- is init_from a checkpoint of the same model size/positions as its config.json?")


def pretrained_encoder(init_from: str, overrides: dict | None = None) -> Initialisation:
  """Restores `init_from` and returns its encoder params, architecture and tokenizer.

  Pretraining runs hand over `objectives.get(objective).encoder_params(params)`; fine-tuning runs
  (intermediate-task training) their 'encoder' sub-tree; `hf:PATH` a Hugging Face checkpoint's encoder and
  tokenizer (exlm_jax/export/from_hf.py). Raises ValueError on a tree mismatch.
  """
  if init_from.startswith("hf:"):
    return hf_encoder(init_from, overrides)
  location = run_store.resolve_run(init_from)
  raw = run_store.read_json(location.workdir / run_store.CONFIG_FILE)
  params, step = run_store.restore_params(location.checkpoint_dir, location.step)
  if location.kind == "finetune":
    objective = run_store.read_json(location.workdir / run_store.TASK_FILE)["pretrain_objective"]
    encoder = objectives.base.encoder_subtree(params)
  else:
    objective = raw.get("objective", "")
    encoder = objectives.get(objective).encoder_params(params)
  model_config = run_store.model_config_from_run(raw, overrides)
  source = f"{location.checkpoint_dir}/{step}"
  check_encoder_tree(encoder, model_config, source)
  card = run_store.read_run_card(location.workdir) or {}
  return Initialisation(model_config, run_store.load_tokenizer(location.workdir), encoder, objective, step, source,
                        card.get("data", {}).get("max_example_len"))


def hf_encoder(init_from: str, overrides: dict | None = None) -> Initialisation:
  """`init_from='hf:PATH'`: the checkpoint's encoder (its pooler / LM head dropped) and renumbered tokenizer."""
  from exlm_jax.export import from_hf  # pylint: disable=g-import-not-at-top  (the .[hf] extra's side)
  hf = from_hf.load_encoder(from_hf.checkpoint_path(init_from))
  model_config = ModelConfig.from_config(hf.model, **(overrides or {}))
  check_encoder_tree(hf.encoder, model_config, init_from)
  return Initialisation(model_config, hf.tokenizer, hf.encoder, "hf", None, init_from)


def _tokenizer_from(path: str):
  from exlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).expanduser()
  return tokenizers.load(path / "tokenizer" if (path / "tokenizer").is_dir() else path)


def scratch_initialisation(config, task) -> Initialisation:
  """Random encoder of size `scratch_size`, tokenizer from `config.tokenizer` or built on the task's
  `tokenizer_corpus()` (a finetune/data.py Task: SentencePiece on text, the SMILES regex on molecules)."""
  from exlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  if config.tokenizer:
    tokenizer = _tokenizer_from(config.tokenizer)
  else:
    flat, kind = task.tokenizer_corpus()
    if kind == "text":
      try:
        tokenizer = tokenizers.SentencePieceTokenizer.train(flat, vocab_size=config.scratch_vocab_size)
      except ValueError as e:
        raise ValueError(f"scratch tokenizer for {task.name}: {e}; the field here is config.scratch_vocab_size "
                         "(or pass --config.tokenizer=DIR)") from None
    else:
      tokenizer = tokenizers.SmilesRegexTokenizer.build(flat)
  model = config_lib.model_config(config.scratch_size, vocab_size=tokenizer.vocab_size, **dict(config.model))
  return Initialisation(ModelConfig.from_config(model), tokenizer, source="random init")
