"""A local RoBERTa-style checkpoint as our encoder: `load_encoder(path) -> HFEncoder` (for init_from=hf:PATH).

Accepted: transformers' `roberta` (post-LN) and `roberta-prelayernorm` (pre-LN) checkpoints -- base
models or their MaskedLM / task variants -- and folders written by `exlm_jax.export` (model_type
`exlm`). PATH needs config.json, model.safetensors (or a sharded model.safetensors.index.json) and a
fast-tokenizer tokenizer.json (+ tokenizer_config.json / special_tokens_map.json naming the specials).

Ids: our specials are fixed at <pad>=0 <unk>=1 <s>=2 </s>=3 [MASK]=4, so the checkpoint's token ids are
renumbered -- its pad/unk/bos/eos/mask first, then every other id in order (`hf_tokenizer.our_ids_from`)
-- consistently in the tokenizer (`HFTokenizer`, kind 'hf_tokenizers'), the embedding rows and the LM
head bias. Hidden states for the same text are unchanged. Positions: RoBERTa's table starts at
pad_token_id + 1, our max_positions = max_position_embeddings - pad_token_id - 1; row 0 of the token-type
table is folded into the position rows. Dropped, and listed in `HFEncoder.notes`: a pooler, token-type
rows > 0 (segment ids other than 0), embedding rows beyond the tokenizer's vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_collections
import numpy as np

from exlm_jax.data import vocab
from exlm_jax.export import hf_tokenizer, hf_weights

SUPPORTED_MODEL_TYPES = ("roberta", "roberta-prelayernorm", "exlm_jax")
_SPECIAL_KEYS = {"pad": ("pad_token",), "unk": ("unk_token",), "bos": ("bos_token", "cls_token"),
                 "eos": ("eos_token", "sep_token"), "mask": ("mask_token",)}


@dataclasses.dataclass(frozen=True)
class HFEncoder:
  """A checkpoint mapped into exlm_jax terms.

  model: ModelConfig fields for `config.model` (architecture only: sizes, pre_ln, positions, ...);
  encoder: our Encoder param tree (numpy float32, unscanned: stack/layer_i; `hf_weights.stack_layers`
    gives the scan_layers form); lm_head: our LMHead tree when the checkpoint has a masked-LM head, else None;
  tokenizer: the renumbered tokenizer (our Tokenizer protocol); notes: what was folded or dropped.
  """

  path: pathlib.Path
  model: dict
  encoder: dict
  lm_head: dict | None
  tokenizer: hf_tokenizer.HFTokenizer
  notes: tuple[str, ...]


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


def read_state(path: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors (or its shards) as numpy arrays."""
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("init_from=hf: needs `safetensors` and `tokenizers`: pip install -e '.[hf]'") from None
  index = path / "model.safetensors.index.json"
  files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
  if not all((path / f).is_file() for f in files):
    other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = (f" (it has {', '.join(other)}: load it in transformers and save_pretrained() it again, which "
            "writes safetensors)") if other else ""
    raise FileNotFoundError(f"{path} has no model.safetensors{hint}")
  state = {}
  for f in files:
    state.update(st_numpy.load_file(str(path / f)))
  return state


def _special_ids(path: pathlib.Path, tokenizer_json: dict, config: dict) -> tuple[dict[str, int], dict[str, str]]:
  """Ids and strings of the checkpoint's pad/unk/bos/eos/mask, from the tokenizer files (config.json ids as fallback)."""
  declared = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
  ids_by_token = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens") or []}
  model_vocab = tokenizer_json["model"].get("vocab")
  if isinstance(model_vocab, dict):
    ids_by_token = {**model_vocab, **ids_by_token}
  elif isinstance(model_vocab, list):
    ids_by_token = {**{piece: i for i, (piece, _) in enumerate(model_vocab)}, **ids_by_token}
  ids, names = {}, {}
  for role, keys in _SPECIAL_KEYS.items():
    token = next((declared[k] for k in keys if declared.get(k)), None)
    token = token.get("content") if isinstance(token, dict) else token
    if token in ids_by_token:
      ids[role], names[token] = ids_by_token[token], vocab.SPECIAL_TOKENS[list(_SPECIAL_KEYS).index(role)]
    elif isinstance(config.get(f"{role}_token_id"), int):
      ids[role] = config[f"{role}_token_id"]
      names[_token_of(tokenizer_json, ids[role])] = vocab.SPECIAL_TOKENS[list(_SPECIAL_KEYS).index(role)]
    else:
      raise ValueError(f"{path}: the tokenizer names no {role} token ({' / '.join(keys)} in tokenizer_config.json); "
                       "exlm_jax needs pad, unk, bos, eos and mask tokens")
  return ids, names


def _token_of(tokenizer_json: dict, token_id: int) -> str:
  for t in tokenizer_json.get("added_tokens") or []:
    if t["id"] == token_id:
      return t["content"]
  model_vocab = tokenizer_json["model"]["vocab"]
  if isinstance(model_vocab, list):
    return model_vocab[token_id][0]
  return next(t for t, i in model_vocab.items() if i == token_id)


def _vocab_size(tokenizer_json: dict) -> int:
  model_vocab = tokenizer_json["model"]["vocab"]
  ids = list(model_vocab.values()) if isinstance(model_vocab, dict) else list(range(len(model_vocab)))
  ids += [t["id"] for t in tokenizer_json.get("added_tokens") or []]
  return max(ids) + 1


def model_fields(config: dict, path: pathlib.Path) -> tuple[dict, str]:
  """(ModelConfig fields except vocab_size, layout) from a checkpoint's config.json; refuses what does not map."""
  model_type = config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{path} is a {model_type!r} checkpoint; init_from=hf: takes RoBERTa-style checkpoints "
                     f"(model_type {', '.join(SUPPORTED_MODEL_TYPES[:2])}) or folders written by exlm_jax.export")
  common = dict(num_layers=int(config["num_hidden_layers"]), d_model=int(config["hidden_size"]),
                num_heads=int(config["num_attention_heads"]), mlp_dim=int(config["intermediate_size"]),
                layernorm_eps=float(config.get("layer_norm_eps", 1e-12)))
  if model_type == "exlm_jax":
    return dict(common, pre_ln=bool(config["pre_layer_norm"]), positions=config["position_scheme"],
                embed_layernorm=bool(config["embedding_layer_norm"]), max_positions=int(config["max_positions"]),
                rel_pos_bins=int(config["relative_position_bins"]),
                max_rel_pos=int(config["max_relative_distance"]), rope_theta=float(config["rope2d_theta"])), "exlm_jax"
  problems = []
  if config.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={config['hidden_act']!r} (our encoder uses the exact 'gelu')")
  if config.get("position_embedding_type", "absolute") != "absolute":
    problems.append(f"position_embedding_type={config['position_embedding_type']!r} (only 'absolute' maps)")
  if config.get("is_decoder") or config.get("add_cross_attention"):
    problems.append("a decoder / cross-attention")
  if problems:
    raise ValueError(f"{path}: {'; '.join(problems)} has no counterpart in exlm_jax's encoder")
  offset = hf_weights.roberta_position_offset(int(config.get("pad_token_id", 1)))
  return dict(common, pre_ln=model_type == "roberta-prelayernorm", positions="absolute", embed_layernorm=True,
              max_positions=int(config["max_position_embeddings"]) - offset), model_type


def _expected_encoder_shapes(fields: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from exlm_jax.models.encoder import Encoder, ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(**fields)
  cfg.validate()
  tokens = jnp.full((1, 4), vocab.NUM_SPECIAL, jnp.int32)
  abstract = jax.eval_shape(lambda: Encoder(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
  return {p: tuple(a.shape) for p, a in hf_weights.flatten(nn.meta.unbox(abstract)).items()}


def load_encoder(path) -> HFEncoder:
  """Reads a local checkpoint folder into our encoder's params, config fields and a renumbered tokenizer."""
  path = pathlib.Path(path).expanduser().absolute()
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path} has no config.json; init_from=hf:PATH takes a local folder written by "
                            "transformers' save_pretrained (or exlm_jax.export)")
  if not (path / "tokenizer.json").is_file():
    raise FileNotFoundError(f"{path} has no tokenizer.json; save the fast tokenizer there with "
                            "AutoTokenizer.from_pretrained(...).save_pretrained(PATH)")
  config = _read_json(path / "config.json")
  fields, layout = model_fields(config, path)
  state = read_state(path)
  tokenizer_json = _read_json(path / "tokenizer.json")
  special_ids, names = _special_ids(path, tokenizer_json, config)
  num_tokens = _vocab_size(tokenizer_json)
  prefix = hf_weights.BASE_PREFIX[layout] + "."
  prefix = prefix if any(k.startswith(prefix) for k in state) else ""
  embed_key = prefix + hf_weights.hf_name(("token_embed", "embedding"), layout)
  rows = state[embed_key].shape[0] if embed_key in state else None
  if rows is None:
    raise ValueError(f"{path}/model.safetensors has no {embed_key!r}; is it a {layout} checkpoint?")
  notes = []
  if num_tokens > rows:
    raise ValueError(f"vocabulary mismatch in {path}: tokenizer.json has {num_tokens} tokens but the embedding "
                     f"{rows} rows; use the tokenizer the checkpoint was trained with")
  if num_tokens < rows:
    notes.append(f"embedding rows {num_tokens}..{rows - 1} belong to no token of tokenizer.json: dropped")

  order = np.asarray(hf_tokenizer.our_ids_from(special_ids, num_tokens))
  state[embed_key] = state[embed_key][order]  # row k = our id k
  if hf_weights.LM_HEAD[("bias",)] in state:
    state[hf_weights.LM_HEAD[("bias",)]] = state[hf_weights.LM_HEAD[("bias",)]][order]
  fields = dict(fields, vocab_size=num_tokens)
  encoder, used = hf_weights.encoder_tree_from_state(state, _expected_encoder_shapes(fields), layout, prefix,
                                                     int(config.get("pad_token_id", vocab.PAD)))
  lm_head = hf_weights.head_tree_from_state(state, hf_weights.LM_HEAD)
  if lm_head is not None:
    used.update(hf_weights.LM_HEAD.values())
  token_type = state.get(prefix + hf_weights.ROBERTA_TOKEN_TYPE)
  if token_type is not None and token_type.shape[0] > 1:
    notes.append(f"token-type rows 1..{token_type.shape[0] - 1} dropped (our encoder has no segment ids; "
                 "row 0 is folded into the positions)")
  unused = sorted(k for k in state if k not in used and not k.startswith("lm_head.decoder."))
  if unused:
    notes.append(f"{len(unused)} tensor(s) not mapped: {', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}")
  renumbered = hf_tokenizer.renumber(tokenizer_json, order.tolist(), names)
  tokenizer = hf_tokenizer.HFTokenizer(json.dumps(renumbered), source=str(path))
  return HFEncoder(path, fields, encoder, lm_head, tokenizer, tuple(notes))


def apply_to_config(config: ml_collections.ConfigDict, hf: HFEncoder) -> ml_collections.ConfigDict:
  """A copy of a pretraining or fine-tuning config whose `model` architecture is the checkpoint's.

  Runs the objective's own validation on it, so an objective the checkpoint cannot serve (ExLM needs
  rope2d positions, a RoBERTa checkpoint has absolute ones) is refused in one line naming PATH.
  """
  from exlm_jax import objectives  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.update(hf.model)
  objective = out.get("objective") if "finetune" not in out else None
  if objective:
    try:
      objectives.get(objective).validate(out)
    except ValueError as e:
      raise ValueError(f"init_from=hf:{hf.path} cannot start {objective} pretraining: {e}") from None
  return out


HF_PREFIX = "hf:"


def checkpoint_path(init_from: str) -> str | None:
  """PATH of `init_from='hf:PATH'`, else None (a workdir, or '' for random init)."""
  return init_from[len(HF_PREFIX):] if init_from.startswith(HF_PREFIX) else None


def initial_params(hf: HFEncoder, config) -> dict:
  """The params override a run starting from `hf` begins with: the encoder (stacked for scan_layers) and,
  for an objective that is a plain masked LM (`Objective.exports_masked_lm`), the checkpoint's LM head."""
  from exlm_jax import objectives  # pylint: disable=g-import-not-at-top
  encoder = hf_weights.stack_layers(hf.encoder) if config.model.get("scan_layers", False) else hf.encoder
  override = {"encoder": encoder}
  if hf.lm_head is not None and objectives.get(config.objective).exports_masked_lm:
    override["lm_head"] = hf.lm_head
  return override


def start_pretraining(config, workdir: str):
  """(config, params override) of a pretraining run with `init_from='hf:PATH'`.

  The config takes the checkpoint's architecture and tokenizer (`data.tokenizer='hf_tokenizers'`), the
  renumbered tokenizer is saved as the run's own (workdir/tokenizer, kept on resume), and the override puts
  the encoder (and MLM's head) in place of the random init. The notes of the mapping are printed.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from exlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  hf = load_encoder(checkpoint_path(config.init_from))
  config = apply_to_config(config, hf)
  config.data.tokenizer = hf.tokenizer.kind
  run_tokenizer = pathlib.Path(workdir) / "tokenizer"
  if jax.process_index() == 0 and not (run_tokenizer / tokenizers.CONFIG_FILE).exists():
    tokenizers.save_atomic(hf.tokenizer, run_tokenizer)
  for note in hf.notes:
    print(f"init_from={config.init_from}: {note}", flush=True)
  return config, initial_params(hf, config)
