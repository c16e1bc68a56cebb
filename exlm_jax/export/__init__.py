"""Export a trained run to a Hugging Face / PyTorch folder: `to_hf(workdir, out_dir)` or
`python -m exlm_jax.export --workdir RUN --out DIR`.

DIR gets config.json, model.safetensors (float32, written from NumPy), the tokenizer files
(hf_tokenizer.py) and a README.md model card. What it loads as:
  * positions='absolute' + embedding LayerNorm: the native classes, no remote code -- post-LN
    RobertaModel / RobertaForMaskedLM / RobertaForSequenceClassification, pre-LN the RobertaPreLayerNorm*
    classes;
  * every other encoder (rope2d, absolute+relbias, no embedding LayerNorm): modeling_exlm.py, copied into
    DIR and named in config.json's `auto_map` (load with trust_remote_code=True).
Per run kind:
  * MLM pretraining -> ...ForMaskedLM (encoder + the tied LM head);
  * other objectives (MAE-LM, ExLM, ...) -> the encoder only (AutoModel): their prediction rule needs the
    MAE-LM decoder / the ExLM expansion, which transformers has no place for;
  * fine-tuning -> ...ForSequenceClassification (encoder + the `<s>` head); regression outputs stay in the
    standardised units the head was trained in, config.json carries target_mean / target_std.
The reverse mapping (a RoBERTa checkpoint into our encoder) is from_hf.py.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile

import numpy as np

from exlm_jax import objectives
from exlm_jax.data import vocab
from exlm_jax.export import hf_tokenizer, hf_weights, model_card

MODELING_FILE = "modeling_exlm.py"
WEIGHTS_FILE = "model.safetensors"
TASK_PROBLEM_TYPES = {"classification": "single_label_classification", "regression": "regression",
                      "multitask_binary": "multi_label_classification"}

_NATIVE_CLASS_PREFIX = {"roberta": "Roberta", "roberta-prelayernorm": "RobertaPreLayerNorm", "exlm_jax": "Exlm"}
_HEAD_SUFFIX = {"encoder": "Model", "masked_lm": "ForMaskedLM", "sequence_classification": "ForSequenceClassification"}
_AUTO_CLASS = {"encoder": "AutoModel", "masked_lm": "AutoModelForMaskedLM",
               "sequence_classification": "AutoModelForSequenceClassification"}


@dataclasses.dataclass(frozen=True)
class Export:
  """What `to_hf` wrote. head: 'encoder' | 'masked_lm' | 'sequence_classification'."""

  out_dir: pathlib.Path
  layout: str  # hf_weights.LAYOUTS
  head: str
  architecture: str  # e.g. 'RobertaForMaskedLM', 'ExlmModel'
  auto_class: str  # e.g. 'AutoModelForMaskedLM'
  trust_remote_code: bool
  num_tensors: int


def _require_safetensors():
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("the Hugging Face export needs `safetensors` and `tokenizers`: pip install -e '.[hf]'") from None
  return st_numpy


def head_for(kind: str, objective: str | None) -> str:
  if kind == "finetune":
    return "sequence_classification"
  return "masked_lm" if objective and objectives.get(objective).exports_masked_lm else "encoder"


def hf_config(model_cfg, layout: str, head: str, dropout: float, attention_dropout: float) -> dict:
  """config.json fields for the encoder (the task fields are added by `task_fields`)."""
  common = dict(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model,
                num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
                intermediate_size=model_cfg.mlp_dim, layer_norm_eps=model_cfg.layernorm_eps,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout, initializer_range=0.02,
                pad_token_id=vocab.PAD, bos_token_id=vocab.BOS, eos_token_id=vocab.EOS, dtype="float32")
  architecture = _NATIVE_CLASS_PREFIX[layout] + _HEAD_SUFFIX[head]
  if layout in hf_weights.NATIVE_LAYOUTS:
    return dict(architectures=[architecture], model_type=layout, **common, hidden_act="gelu",
                max_position_embeddings=model_cfg.max_positions + hf_weights.roberta_position_offset(vocab.PAD),
                type_vocab_size=1, tie_word_embeddings=True, is_decoder=False, add_cross_attention=False)
  auto_map = {"AutoConfig": "modeling_exlm.ExlmConfig", "AutoModel": "modeling_exlm.ExlmModel"}
  if head != "encoder":
    auto_map[_AUTO_CLASS[head]] = f"modeling_exlm.{architecture}"
  return dict(architectures=[architecture], model_type="exlm_jax", auto_map=auto_map, **common,
              pre_layer_norm=model_cfg.pre_ln, embedding_layer_norm=model_cfg.embed_layernorm,
              position_scheme=model_cfg.positions, max_positions=model_cfg.max_positions,
              relative_position_bins=model_cfg.rel_pos_bins, max_relative_distance=model_cfg.max_rel_pos,
              rope2d_theta=model_cfg.rope_theta, tie_word_embeddings=False)


def task_fields(task: dict, pooler_dropout: float) -> dict:
  """num_labels / id2label / problem_type (+ regression's target_mean, target_std) for a fine-tuning run."""
  names = list(task.get("label_names") or [str(i) for i in range(task["num_outputs"])])
  if len(names) != task["num_outputs"]:
    names = [str(i) for i in range(task["num_outputs"])]
  fields = dict(id2label={i: n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
                problem_type=TASK_PROBLEM_TYPES[task["task_type"]], classifier_dropout=pooler_dropout)
  if task["task_type"] == "regression":
    fields.update(target_mean=list(task["target_mean"]), target_std=list(task["target_std"]))
  return fields


def state_dict(params: dict, layout: str, head: str) -> dict[str, np.ndarray]:
  """The run's params -> the state dict of the exported class (encoder keys prefixed inside task models)."""
  prefix = "" if head == "encoder" else hf_weights.BASE_PREFIX[layout] + "."
  state = hf_weights.encoder_state_dict(params["encoder"], layout, prefix, vocab.PAD)
  if head == "masked_lm":
    state.update(hf_weights.head_state_dict(params["lm_head"], hf_weights.LM_HEAD))
  elif head == "sequence_classification":
    state.update(hf_weights.head_state_dict(params["head"], hf_weights.CLASSIFIER))
  return state


def _check_out_dir(out_dir, overwrite: bool) -> pathlib.Path:
  out_dir = pathlib.Path(out_dir).expanduser().absolute()
  if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass another --out, or --overwrite to replace it")
  return out_dir


def to_hf(workdir, out_dir, *, seed: int | None = None, overwrite: bool = False) -> Export:
  """Writes `out_dir` (see the module docstring) from a run written by main.py; returns what it wrote.

  workdir: any path `exlm_jax.load` accepts; seed: fine-tuning only (default: the best seed).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import exlm_jax  # pylint: disable=g-import-not-at-top

  st_numpy = _require_safetensors()
  hf_tokenizer.require_tokenizers()
  run = exlm_jax.load(workdir, seed=seed, devices=jax.local_devices()[:1])
  model_cfg = run.model_config
  if run.tokenizer.vocab_size != model_cfg.vocab_size:
    raise ValueError(f"{run.path}: the tokenizer has {run.tokenizer.vocab_size} tokens but the model "
                     f"{model_cfg.vocab_size} embedding rows; was tokenizer/ replaced after training?")
  layout = hf_weights.layout_for(model_cfg)
  head = head_for(run.kind, run.objective)
  params = jax.tree.map(np.asarray, jax.device_get(run.params))
  model_section = dict(run.config.model)
  config = hf_config(model_cfg, layout, head, float(model_section.get("dropout_rate", 0.1)),
                     float(model_section.get("attention_dropout_rate", 0.1)))
  if head == "sequence_classification":
    finetune = dict(run.config.get("finetune", {}))
    config.update(task_fields(run.task, float(finetune.get("pooler_dropout", 0.1))))
  config["exlm_jax"] = {"objective": run.objective, "kind": run.kind, "step": int(run.step),
                        "positions": model_cfg.positions, "pre_ln": model_cfg.pre_ln}

  out_dir = _check_out_dir(out_dir, overwrite)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  remote = layout not in hf_weights.NATIVE_LAYOUTS
  state = state_dict(params, layout, head)
  result = Export(out_dir, layout, head, config["architectures"][0], _AUTO_CLASS[head], remote, len(state))
  with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=out_dir.name + ".tmp") as tmp:
    staging = pathlib.Path(tmp)  # written completely, then moved into place: no half-written folder
    run.tokenizer.save(staging / "exlm_tokenizer")
    vocab_size = hf_tokenizer.write_hf_tokenizer(staging / "exlm_tokenizer", staging / "hf",
                                                 int(run.config.get("seq_len", 512)))
    if vocab_size != model_cfg.vocab_size:
      raise ValueError(f"the exported tokenizer has {vocab_size} tokens, the model {model_cfg.vocab_size}")
    st_numpy.save_file(state, str(staging / "hf" / WEIGHTS_FILE), metadata={"format": "pt"})
    (staging / "hf" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if remote:
      shutil.copyfile(pathlib.Path(__file__).with_name(MODELING_FILE), staging / "hf" / MODELING_FILE)
    workdir = pathlib.Path(getattr(run, "path", workdir))  # the run's root, whichever path form was given
    (staging / "hf" / "README.md").write_text(model_card.render(run, result, workdir))
    if out_dir.exists():
      shutil.rmtree(out_dir)
    (staging / "hf").rename(out_dir)
  return result
