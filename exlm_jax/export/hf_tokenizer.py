"""Our tokenizers as Hugging Face `tokenizers` files, and Hugging Face tokenizers as ours.

Export (`write_hf_tokenizer`): a tokenizer folder saved by exlm_jax (tokenizer/ of a run) becomes
`tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`, which
`AutoTokenizer.from_pretrained(DIR)` loads without trust_remote_code, with exactly our ids (specials
<pad>=0 <unk>=1 <s>=2 </s>=3 [MASK]=4) and our block layout `<s> A </s>` / `<s> A </s> </s> B </s>`:
  * smiles_regex  -> WordLevel over the atom-regex pieces (Split pre-tokenizer with SMILES_REGEX);
  * sentencepiece -> Unigram, smiles_bpe -> BPE (merges read off the piece scores), both with byte
                     fallback, SentencePiece's whitespace escaping ("\u2581") and dummy prefix, and no
                     pre-splitting (SentencePiece runs on the whole string);
  * hf_tokenizers -> the wrapped tokenizer itself (a run started from a Hugging Face checkpoint).
A literal "[MASK]" is id 4 and swallows one space before it, as `exlm_jax.load(...).tokenize` does.

Import (`HFTokenizer`): a Hugging Face tokenizer.json with its ids renumbered so that its five specials
take ids 0..4 (`our_ids_from`), wrapped in our Tokenizer protocol (kind 'hf_tokenizers').
"""

from __future__ import annotations

import hashlib
import json
import pathlib

from exlm_jax.data import tokenizers as our_tokenizers
from exlm_jax.data import vocab

HF_FILE = "hf_tokenizer.json"  # inside one of our tokenizer folders (ours is tokenizer.json)
SPACE = "\u2581"
PAD, UNK, BOS, EOS, MASK = vocab.SPECIAL_TOKENS


def require_tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("the Hugging Face export needs the `tokenizers` package: pip install -e '.[hf]'") from None
  return tokenizers


# ----------------------------------------------------------------------------------------------
# Our folders -> a `tokenizers.Tokenizer` with our ids
# ----------------------------------------------------------------------------------------------


def _spm_proto(path: pathlib.Path):
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(path.read_bytes())
  return proto


def _bpe_merges(pieces: list[str], scores: list[float], normal: list[bool]) -> list[tuple[str, str]]:
  """SentencePiece BPE merges in priority order: every split (a, b) of a piece into two pieces, ranked by the
  merged piece's score (SentencePiece merges the adjacent pair whose concatenation scores highest)."""
  ids = {p: i for i, p in enumerate(pieces)}
  merges = []
  for i in sorted(range(len(pieces)), key=lambda i: (-scores[i], i)):
    piece = pieces[i]
    if not normal[i] or len(piece) < 2:
      continue
    merges.extend((piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids)
  return merges


def _from_sentencepiece(model_path: pathlib.Path):
  tk = require_tokenizers()
  proto = _spm_proto(model_path)
  pieces = [p.piece for p in proto.pieces]
  scores = [p.score for p in proto.pieces]
  normal = [p.type == p.NORMAL for p in proto.pieces]
  byte_fallback = bool(proto.trainer_spec.byte_fallback)
  if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
    model = tk.models.Unigram(list(zip(pieces, scores)), unk_id=vocab.UNK, byte_fallback=byte_fallback)
  elif proto.trainer_spec.model_type == proto.trainer_spec.BPE:
    model = tk.models.BPE({p: i for i, p in enumerate(pieces)}, _bpe_merges(pieces, scores, normal),
                          unk_token=UNK, fuse_unk=True, byte_fallback=byte_fallback)
  else:
    raise ValueError(f"{model_path}: SentencePiece model type {proto.trainer_spec.model_type} is neither "
                     "unigram nor BPE; only those two are exported")
  if proto.normalizer_spec.remove_extra_whitespaces or proto.normalizer_spec.name not in ("identity", ""):
    raise ValueError(f"{model_path} normalises text ({proto.normalizer_spec.name}, remove_extra_whitespaces="
                     f"{proto.normalizer_spec.remove_extra_whitespaces}); only identity models (ours) are exported")
  tokenizer = tk.Tokenizer(model)
  steps = [tk.normalizers.Replace(" ", SPACE)]
  if proto.normalizer_spec.add_dummy_prefix:
    steps.append(tk.normalizers.Prepend(SPACE))
  # [MASK] is matched after this normalizer (see with_our_specials) and takes the escaped space before it.
  steps.append(tk.normalizers.Replace(SPACE + MASK, MASK))
  tokenizer.normalizer = tk.normalizers.Sequence(steps)
  decode = [tk.decoders.Replace(SPACE, " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
  if proto.normalizer_spec.add_dummy_prefix:
    decode.append(tk.decoders.Strip(" ", 1, 0))
  tokenizer.decoder = tk.decoders.Sequence(decode)
  return tokenizer


def _from_smiles_regex(config: dict):
  tk = require_tokenizers()
  if config.get("regex", our_tokenizers.SMILES_REGEX) != our_tokenizers.SMILES_REGEX:
    raise ValueError("the SMILES tokenizer was saved with another regex; rebuild it with this exlm_jax")
  tokens = config["tokens"]
  tokenizer = tk.Tokenizer(tk.models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
  tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(our_tokenizers.SMILES_REGEX), behavior="isolated")
  tokenizer.decoder = tk.decoders.Fuse()
  return tokenizer


def load_as_hf(directory):
  """A `tokenizers.Tokenizer` with our ids for one of our saved tokenizer folders (no specials added yet)."""
  tk = require_tokenizers()
  directory = pathlib.Path(directory)
  config_path = directory / our_tokenizers.CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"no {our_tokenizers.CONFIG_FILE} in {directory}; pass a tokenizer folder saved by exlm_jax")
  config = json.loads(config_path.read_text())
  kind = config.get("kind")
  if kind == "smiles_regex":
    return _from_smiles_regex(config)
  if kind in ("sentencepiece", "smiles_bpe"):
    return _from_sentencepiece(directory / config["model_file"])
  if kind == HFTokenizer.kind:
    return tk.Tokenizer.from_file(str(directory / config["model_file"]))
  raise ValueError(f"{config_path}: tokenizer kind {kind!r} has no Hugging Face export")


# ----------------------------------------------------------------------------------------------
# Specials, block layout, the files transformers reads
# ----------------------------------------------------------------------------------------------


def with_our_specials(tokenizer):
  """Adds ids 0..4 as special tokens and the `<s> A </s>` post-processor.

  [MASK] takes one space before it, as `exlm_jax.load(...).tokenize` drops a lone space piece there: with a
  normalizer (SentencePiece) it is matched in the normalised text, after the "\u2581[MASK]" -> "[MASK]" rule;
  without one it strips the whitespace on its left.
  """
  tk = require_tokenizers()
  for i, token in enumerate(vocab.SPECIAL_TOKENS):
    if tokenizer.token_to_id(token) != i:
      raise ValueError(f"the tokenizer has {token!r} at id {tokenizer.token_to_id(token)}, not {i}; "
                       "exlm_jax tokenizers keep the specials at ids 0..4")
  specials = [tk.AddedToken(t, special=True, normalized=False) for t in vocab.SPECIAL_TOKENS]
  normalized = tokenizer.normalizer is not None
  specials[vocab.MASK] = tk.AddedToken(MASK, special=True, normalized=normalized, lstrip=not normalized)
  tokenizer.add_special_tokens(specials)
  tokenizer.post_processor = tk.processors.TemplateProcessing(
      single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
      special_tokens=[(BOS, vocab.BOS), (EOS, vocab.EOS)])
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def write_hf_tokenizer(tokenizer_dir, out_dir, model_max_length: int) -> int:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir; returns the
  vocabulary size. `model_max_length` is the run's seq_len (what `truncation=True` cuts to)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer = with_our_specials(load_as_hf(tokenizer_dir))
  tokenizer.save(str(out_dir / "tokenizer.json"))
  special_map = {"pad_token": PAD, "unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "cls_token": BOS,
                 "sep_token": EOS, "mask_token": MASK}
  (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map, "model_max_length": int(model_max_length),
            "padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"]}
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return tokenizer.get_vocab_size(with_added_tokens=True)


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizers as ours
# ----------------------------------------------------------------------------------------------


def our_ids_from(hf_special_ids: dict[str, int], vocab_size: int) -> list[int]:
  """`order[our_id] = their_id`: their <pad> <unk> <s> </s> <mask> first, then every other id ascending."""
  roles = ("pad", "unk", "bos", "eos", "mask")
  head = [hf_special_ids[name] for name in roles]
  if len(set(head)) != len(head):
    raise ValueError(f"the tokenizer's special tokens share ids ({dict(zip(roles, head))}); "
                     "each of pad, unk, bos, eos and mask needs its own id")
  taken = set(head)
  return head + [i for i in range(vocab_size) if i not in taken]


def renumber(tokenizer_json: dict, order: list[int], names: dict[str, str]) -> dict:
  """A tokenizer.json dict with id `order[k]` renamed k, the specials renamed to ours, no post-processor.

  names: their special token strings -> ours (e.g. '<mask>' -> '[MASK]').
  """
  new_id = {old: new for new, old in enumerate(order)}
  rename = lambda token: names.get(token, token)
  data = json.loads(json.dumps(tokenizer_json))
  model = data["model"]
  # Added tokens outside the model's vocabulary (e.g. RoBERTa's <mask>) join it at their id: on loading,
  # `tokenizers` numbers such tokens after the model's vocabulary, whatever id the file gives them.
  for token in sorted(data.get("added_tokens") or [], key=lambda t: t["id"]):
    if isinstance(model.get("vocab"), dict):
      model["vocab"].setdefault(token["content"], token["id"])
    elif isinstance(model.get("vocab"), list) and token["id"] >= len(model["vocab"]):
      model["vocab"].append([token["content"], 0.0])
  if model["type"] in ("BPE", "WordLevel", "WordPiece"):
    model["vocab"] = {rename(t): new_id[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: new_id[kv[1]])}
    if model.get("unk_token") is not None:
      model["unk_token"] = rename(model["unk_token"])
    if model["type"] == "BPE":
      model["merges"] = [[rename(a), rename(b)] for a, b in (m.split(" ", 1) if isinstance(m, str) else m
                                                             for m in model["merges"])]
  elif model["type"] == "Unigram":
    model["vocab"] = [[rename(model["vocab"][old][0]), model["vocab"][old][1]] for old in order]
    if model.get("unk_id") is not None:
      model["unk_id"] = new_id[model["unk_id"]]
  else:
    raise ValueError(f"tokenizer model type {model['type']!r} is not supported; expected BPE, WordLevel, "
                     "WordPiece or Unigram")
  for token in data.get("added_tokens") or []:
    token["id"] = new_id[token["id"]]
    token["content"] = rename(token["content"])
  data["post_processor"] = None  # we add <s> ... </s> ourselves
  return data


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` whose ids are already ours (our Tokenizer protocol)."""

  kind = "hf_tokenizers"

  def __init__(self, tokenizer_json: str, source: str = ""):
    tk = require_tokenizers()
    self._json = tokenizer_json
    self._tok = tk.Tokenizer.from_str(tokenizer_json)
    self.source = source
    for i, token in enumerate(vocab.SPECIAL_TOKENS):
      if self._tok.token_to_id(token) != i:
        raise ValueError(f"renumbered tokenizer has {token!r} at {self._tok.token_to_id(token)}, expected {i}")

  @classmethod
  def load(cls, directory) -> "HFTokenizer":
    """Reloads a folder written by `save` (its tokenizer.json names kind 'hf_tokenizers')."""
    directory = pathlib.Path(directory)
    config = json.loads((directory / our_tokenizers.CONFIG_FILE).read_text())
    if config.get("kind") != cls.kind:
      raise ValueError(f"{directory} holds a {config.get('kind')!r} tokenizer, not {cls.kind!r}")
    return cls((directory / config["model_file"]).read_text(), config.get("source", ""))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    skip = (vocab.PAD, vocab.BOS, vocab.EOS, vocab.MASK)
    return self._tok.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def token_to_id(self, token: str) -> int:
    found = self._tok.token_to_id(token)
    return vocab.UNK if found is None else found

  def save(self, directory) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HF_FILE).write_text(self._json)
    config = {"kind": self.kind, "model_file": HF_FILE, "source": self.source}
    (directory / our_tokenizers.CONFIG_FILE).write_text(json.dumps(config, indent=1))

  def fingerprint(self) -> str:
    return hashlib.sha256(self.kind.encode() + self._json.encode()).hexdigest()[:16]
