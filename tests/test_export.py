"""Export to Hugging Face / PyTorch and back (exlm_jax/export/).

Workdirs are written directly (config.json, tokenizer/, an Orbax checkpoint of random params -- what
main.py leaves, without paying for training), exported with `to_hf`, and reloaded with transformers.
Parity: transformers' hidden states (and masked-LM / task logits) on the exported folder equal
`exlm_jax.load(RUN)`'s at every real slot within 1e-4 (float32), on padded batches of real MOSES /
MoleculeNet SMILES (with <unk>s and inputs longer than seq_len) and AG News text (SentencePiece).
The weights are random but large (N(0, 0.2) kernels, N(0, 1) relative bias), so a wrong transpose,
offset or rotation pairing moves the outputs by O(1).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import pathlib
import shutil

import pytest

torch = pytest.importorskip("torch", reason="the hf extra is not installed (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e '.[hf]')")
pytest.importorskip("safetensors", reason="the hf extra is not installed (pip install -e '.[hf]')")
pytest.importorskip("tokenizers", reason="the hf extra is not installed (pip install -e '.[hf]')")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import exlm_jax  # noqa: E402
from exlm_jax import config_lib, objectives  # noqa: E402
from exlm_jax.data import tokenizers, vocab  # noqa: E402
from exlm_jax.export import __main__ as export_cli  # noqa: E402
from exlm_jax.export import from_hf, hf_tokenizer, hf_weights, modeling_exlm  # noqa: E402
from exlm_jax.export import to_hf  # noqa: E402
from exlm_jax.finetune import model as ft_model  # noqa: E402
from exlm_jax.models.encoder import Encoder, ModelConfig, relative_bucket_table  # noqa: E402
from exlm_jax.models.heads import LMHead  # noqa: E402

TOL = 1e-4
PARITY: dict[str, float] = {}  # case -> max |diff|, printed after the module's tests (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def print_parity_table():
  yield
  if PARITY:
    print("\n" + "\n".join(f"{case:40s} max|diff| {diff:.2e}" for case, diff in sorted(PARITY.items())))


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moses(shared_data) -> list[str]:
  with gzip.open(shared_data / "smiles/moses/test.csv.gz", "rt") as f:
    return [line.strip() for line in f][1:4001]


@pytest.fixture(scope="module")
def moleculenet(shared_data) -> list[str]:
  """BBBP SMILES the atom regex covers: they hold atoms MOSES never has (-> <unk>) and long molecules."""
  with open(shared_data / "moleculenet/BBBP.csv", newline="") as f:
    rows = [r["smiles"] for r in csv.DictReader(f)]
  out = []
  for s in rows:
    try:
      tokenizers.split_smiles(s)
    except tokenizers.UncoveredSmilesError:
      continue
    out.append(s)
  return out


@pytest.fixture(scope="module")
def agnews(shared_data) -> list[str]:
  with open(shared_data / "text/agnews/dev.tsv", newline="", encoding="utf-8") as f:
    return [r[0] for r in csv.reader(f, delimiter="\t")]


@pytest.fixture(scope="module")
def smiles_tok(moses):
  return tokenizers.SmilesRegexTokenizer.build(moses[2000:2300])


@pytest.fixture(scope="module")
def text_tok(agnews):
  return tokenizers.SentencePieceTokenizer.train(agnews[2000:3500], vocab_size=600)


# ----------------------------------------------------------------------------------------------
# Workdirs without training
# ----------------------------------------------------------------------------------------------


def random_tree(abstract, seed: int):
  """Large random values (see the module docstring); LayerNorm scales around 1."""
  rng = np.random.default_rng(seed)
  scale = {"kernel": 0.2, "embedding": 1.0, "rel_bias": 1.0, "bias": 0.1}

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      return (1.0 + rng.normal(0, 0.1, leaf.shape)).astype(np.float32)
    return rng.normal(0, scale.get(name, 0.2), leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract))


def save_checkpoint(directory: pathlib.Path, params, step: int = 7) -> None:
  """The Orbax layout train/checkpoint.py writes: <dir>/<step>/state with the state's 'params'."""
  manager = ocp.CheckpointManager(directory.absolute(), item_handlers={"state": ocp.StandardCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "step": step})))
  manager.wait_until_finished()
  manager.close()


def pretrain_config(objective: str, tokenizer, seq_len: int, **model) -> ml_collections.ConfigDict:
  config = config_lib.pretrain_config(objective, "tiny")
  config.seq_len = seq_len
  config.model.update(vocab_size=tokenizer.vocab_size, max_positions=64, rel_pos_bins=16, max_rel_pos=32, **model)
  config.data = config_lib.data_config("smiles" if tokenizer.kind == "smiles_regex" else "text",
                                       "$DATA/test-only", tokenizer=tokenizer.kind)
  if objective == "maelm":
    config.maelm = ml_collections.ConfigDict(dict(decoder_layers=1))
  if objective == "exlm":
    config.exlm = ml_collections.ConfigDict(dict(num_copies=2))
  return config


def make_pretrain_run(path: pathlib.Path, objective: str, tokenizer, seq_len: int, seed: int, **model):
  config = pretrain_config(objective, tokenizer, seq_len, **model)
  abstract = jax.eval_shape(lambda: objectives.base.init_params(objectives.get(objective), config,
                                                                jax.random.PRNGKey(0)))
  params = random_tree(abstract, seed)
  save_checkpoint(path / "checkpoints", params)
  (path / "config.json").write_text(json.dumps(config.to_dict()))
  tokenizer.save(path / "tokenizer")
  return path


def make_finetune_run(path: pathlib.Path, tokenizer, seq_len: int, seed: int, task: dict, **model):
  """A fine-tuning workdir as finetune/loop.py leaves it (config.json, task.json, seed_0/checkpoints)."""
  model_cfg = ModelConfig(**{**dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_positions=64,
                                    rel_pos_bins=16, max_rel_pos=32), **model, "vocab_size": tokenizer.vocab_size})
  net = ft_model.FinetuneModel(model_cfg, task["num_outputs"])
  abstract = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  save_checkpoint(path / "seed_0" / "checkpoints", random_tree(abstract, seed))
  config = {"finetune": {"pooler_dropout": 0.1}, "model": dataclasses.asdict(model_cfg), "seq_len": seq_len,
            "init_from": "", "data": {"path": "$DATA/moleculenet/delaney-processed.csv"}}
  (path / "config.json").write_text(json.dumps(config))
  (path / "task.json").write_text(json.dumps({**task, "pretrain_objective": "mlm"}))
  tokenizer.save(path / "tokenizer")
  return path


# ----------------------------------------------------------------------------------------------
# The cases: every position scheme x LayerNorm placement, each run kind
# ----------------------------------------------------------------------------------------------

ESOL = {"name": "esol", "task_type": "regression", "num_outputs": 1, "label_names": ["logS"],
        "target_mean": [-3.05], "target_std": [2.1]}
BBBP = {"name": "bbbp", "task_type": "classification", "num_outputs": 2, "label_names": ["0", "1"],
        "target_mean": [0.0, 0.0], "target_std": [1.0, 1.0]}
TOX = {"name": "clintox", "task_type": "multitask_binary", "num_outputs": 2, "label_names": ["FDA", "TOX"],
       "target_mean": [0.0, 0.0], "target_std": [1.0, 1.0]}

# name: (kind, objective or task, data, model overrides, expected transformers class)
CASES = {
    "mlm_absolute_postln_native": ("pretrain", "mlm", "smiles", dict(positions="absolute", pre_ln=False,
                                   embed_layernorm=True), "RobertaForMaskedLM"),
    "mlm_absolute_preln_native": ("pretrain", "mlm", "text", dict(positions="absolute", pre_ln=True,
                                  embed_layernorm=True), "RobertaPreLayerNormForMaskedLM"),
    "maelm_absolute_postln_native_encoder": ("pretrain", "maelm", "text", dict(positions="absolute", pre_ln=False,
                                             embed_layernorm=True), "RobertaModel"),
    "mlm_absolute_no_embed_ln": ("pretrain", "mlm", "smiles", dict(positions="absolute", pre_ln=False,
                                 embed_layernorm=False), "ExlmForMaskedLM"),
    "exlm_rope2d_preln": ("pretrain", "exlm", "smiles", dict(positions="rope2d", pre_ln=True), "ExlmModel"),
    "mlm_rope2d_postln": ("pretrain", "mlm", "text", dict(positions="rope2d", pre_ln=False,
                          embed_layernorm=True), "ExlmForMaskedLM"),
    "maelm_relbias_postln": ("pretrain", "maelm", "text", dict(positions="absolute+relbias", pre_ln=False,
                             embed_layernorm=True), "ExlmModel"),
    "mlm_relbias_preln": ("pretrain", "mlm", "smiles", dict(positions="absolute+relbias", pre_ln=True),
                          "ExlmForMaskedLM"),
    "finetune_regression_rope2d": ("finetune", ESOL, "smiles", dict(positions="rope2d", pre_ln=True),
                                   "ExlmForSequenceClassification"),
    "finetune_classification_native": ("finetune", BBBP, "smiles", dict(positions="absolute", pre_ln=False,
                                       embed_layernorm=True), "RobertaForSequenceClassification"),
    "finetune_multitask_relbias": ("finetune", TOX, "smiles", dict(positions="absolute+relbias", pre_ln=False,
                                   embed_layernorm=True), "ExlmForSequenceClassification"),
}
SEQ_LEN = {"smiles": 40, "text": 48}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smiles_tok, text_tok):
  """case -> (workdir, export dir, Export); built on first use."""
  cache = {}

  def get(case: str):
    if case not in cache:
      kind, what, data, model, _ = CASES[case]
      tok = smiles_tok if data == "smiles" else text_tok
      root = tmp_path_factory.mktemp(case)
      seed = sorted(CASES).index(case)
      if kind == "pretrain":
        run = make_pretrain_run(root / "run", what, tok, SEQ_LEN[data], seed, **model)
      else:
        run = make_finetune_run(root / "run", tok, SEQ_LEN[data], seed, what, **model)
      cache[case] = (run, root / "hf", to_hf(run, root / "hf"))
    return cache[case]

  return get


@pytest.fixture(scope="module")
def inputs(moses, moleculenet, agnews):
  """A padded batch per data kind: short and over-long inputs, <unk>s (MoleculeNet atoms unseen in MOSES)."""
  return {"smiles": moses[:6] + moleculenet[:6] + sorted(moleculenet, key=len)[-2:], "text": agnews[:10]}


def hf_batch(export_dir, texts):
  tok = transformers.AutoTokenizer.from_pretrained(str(export_dir))
  batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
  return batch["input_ids"], batch["attention_mask"]


def load_hf(auto_class, export_dir, remote: bool):
  cls = getattr(transformers, auto_class)
  return cls.from_pretrained(str(export_dir), trust_remote_code=remote).eval()


def max_diff_at_real(a, b, real) -> float:
  real = np.asarray(real, bool)
  return float(np.max(np.abs(np.asarray(a)[real] - np.asarray(b)[real])))


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_matches_exlm_jax(case, exported, inputs):
  kind, what, data, _, expected_class = CASES[case]
  run_dir, export_dir, result = exported(case)
  run = exlm_jax.load(run_dir)
  texts = inputs[data]
  ids, pad = run.tokenize(texts)
  assert (ids == vocab.UNK).any() or data == "text", "the SMILES batch should hold <unk>s"
  assert (~pad).sum(1).max() == SEQ_LEN[data], "some inputs should be cut at seq_len"
  assert pad.any(), "the batch should be padded"
  hf_ids, hf_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(~pad, dtype=torch.long)  # tokenizers: below
  width = ids.shape[1]

  assert result.architecture == expected_class
  native = not expected_class.startswith("Exlm")
  assert result.trust_remote_code == (not native)
  assert (export_dir / "modeling_exlm.py").exists() == (not native)
  real = ~pad[:, :width]
  with torch.no_grad():
    base = load_hf("AutoModel", export_dir, remote=not native)
    assert type(base).__name__ == expected_class.replace("ForMaskedLM", "Model").replace(
        "ForSequenceClassification", "Model")
    hidden = base(input_ids=hf_ids, attention_mask=hf_mask).last_hidden_state.numpy()
  ours = np.asarray(run.encode(ids, pad))[:, :width]
  diffs = {"hidden": max_diff_at_real(hidden, ours, real)}

  if result.head != "encoder":
    with torch.no_grad():
      model = load_hf(result.auto_class, export_dir, remote=not native)
      assert type(model).__name__ == expected_class
      logits = model(input_ids=hf_ids, attention_mask=hf_mask).logits.numpy()
    if result.head == "masked_lm":  # the MLM objective's own LM head at every slot
      net = objectives.get("mlm").make_model(run.config, True)
      slots = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
      reference = np.asarray(jax.jit(lambda p, t, s: net.apply({"params": p}, t, s, method=net.predict))(
          run.params, ids, slots))[:, :width]
      diffs["logits"] = max_diff_at_real(logits, reference, real)
    else:  # fine-tuning: the loop's model on the <s> state
      reference = np.asarray(run.predict_fn(run.params, ids))
      diffs["logits"] = float(np.max(np.abs(logits - reference)))
      assert model.config.num_labels == what["num_outputs"]
      assert list(model.config.id2label.values()) == what["label_names"]
      assert model.config.problem_type == {"regression": "regression", "classification": "single_label_classification",
                                           "multitask_binary": "multi_label_classification"}[what["task_type"]]
      if what["task_type"] == "regression":  # label units: logits * std + mean == exlm_jax's predict()
        np.testing.assert_allclose(logits * np.asarray(model.config.target_std) + np.asarray(model.config.target_mean),
                                   run.predict(texts), atol=1e-3)
  PARITY[case] = max(diffs.values())
  print(f"\nparity {case}: " + ", ".join(f"{k} max|diff| {v:.2e}" for k, v in diffs.items()))
  assert max(diffs.values()) < TOL, diffs
  card = (export_dir / "README.md").read_text()
  assert run.objective in card and str(run.step) in card and expected_class in card


def test_rope2d_port_with_copy_indices(exported, inputs):
  """ExLM's expanded inputs: torch with position_ids / copy_index == our Encoder with positions / copy_index.

  Copy index 0 (the parity cases) leaves the second half of every head unrotated; here both halves turn.
  """
  run_dir, export_dir, _ = exported("exlm_rope2d_preln")
  run = exlm_jax.load(run_dir)
  ids, pad = run.tokenize(inputs["smiles"][:4])
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32) // 2, ids.shape)  # pairs share a position
  copies = (np.arange(ids.size, dtype=np.int32).reshape(ids.shape) % 3)
  encoder = Encoder(run.model_config)
  want = np.asarray(encoder.apply({"params": run.params["encoder"]}, ids, positions, copies, pad))
  model = load_hf("AutoModel", export_dir, remote=True)
  to_torch = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)
  with torch.no_grad():
    got = model(input_ids=to_torch(ids), attention_mask=to_torch(~pad), position_ids=to_torch(positions),
                copy_index=to_torch(copies)).last_hidden_state.numpy()
    plain = model(input_ids=to_torch(ids), attention_mask=to_torch(~pad)).last_hidden_state.numpy()
  assert max_diff_at_real(got, want, ~pad) < TOL
  assert max_diff_at_real(got, plain, ~pad) > 100 * TOL  # the copy index and positions do move the outputs


def test_scanned_layers_unstack_to_the_same_encoder():
  """A scan_layers run exports like an unrolled one: unstack_layers gives the unrolled Encoder's exact tree."""
  cfg = ModelConfig(vocab_size=40, num_layers=3, d_model=16, num_heads=2, mlp_dim=32, scan_layers=True,
                    dropout_rate=0.0, attention_dropout_rate=0.0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 40, (2, 9)), jnp.int32)
  scanned = random_tree(jax.eval_shape(lambda: Encoder(cfg).init(jax.random.PRNGKey(0), tokens)["params"]), 0)
  unrolled = hf_weights.unstack_layers(scanned)
  want = Encoder(cfg).apply({"params": scanned}, tokens)
  got = Encoder(dataclasses.replace(cfg, scan_layers=False)).apply({"params": unrolled}, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  back = hf_weights.flatten(hf_weights.stack_layers(unrolled))
  assert all(np.array_equal(back[k], v) for k, v in hf_weights.flatten(scanned).items()) and len(back) == len(
      hf_weights.flatten(scanned))


def test_relative_bucket_table_is_the_jax_one():
  for args in ((64, 16, 32), (128, 64, 128), (512, 64, 128), (512, 32, 256), (1024, 128, 256)):
    np.testing.assert_array_equal(modeling_exlm.relative_bucket_table(*args).numpy(), relative_bucket_table(*args))


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def assert_same_ids(export_dir, run, texts) -> int:
  """AutoTokenizer(DIR) ids == exlm_jax.load(RUN).tokenize ids, padded batch included; returns the number of rows
  that differ only by an exact Unigram score tie (see below). Inputs are stripped first, as exlm_jax strips
  every record and API input (a transformers tokenizer keeps surrounding whitespace)."""
  texts = [t.strip() for t in texts]
  ours, pad = run.tokenize(texts)
  tok = transformers.AutoTokenizer.from_pretrained(str(export_dir))
  batch = tok(texts, truncation=True, padding=True, return_tensors="np")
  theirs, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
  width = max(theirs.shape[1], ours.shape[1])
  widen = lambda a, fill: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)
  ours, theirs, pad, mask = widen(ours, vocab.PAD), widen(theirs, vocab.PAD), widen(pad, True), widen(mask, False)
  np.testing.assert_array_equal(mask, ~pad)
  ties = 0
  for a, b in zip(ours, theirs):
    if (a != b).any():
      # SentencePiece sums path scores in float32, `tokenizers` in float64: when two segmentations use the
      # same pieces in another order ('00' '0' vs '0' '00'), their scores tie exactly and rounding decides.
      assert sorted(a) == sorted(b) and run.tokenizer.decode(a) == run.tokenizer.decode(b), (a, b)
      ties += 1
  return ties


def test_tokenizer_parity_on_moses_and_agnews(exported, moses, agnews):
  run_dir, export_dir, _ = exported("mlm_absolute_postln_native")  # SMILES regex
  assert assert_same_ids(export_dir, exlm_jax.load(run_dir), moses[:1000]) == 0
  run_dir, export_dir, _ = exported("mlm_absolute_preln_native")  # SentencePiece unigram, byte fallback
  text_run = exlm_jax.load(run_dir)
  unseen = ["  two leading spaces", "tabs\tand\nnewlines", "ünïcödé ✓ 中文 😀",  # byte fallback
            "The [MASK] is [MASK]old", "[MASK] x"]
  ties = assert_same_ids(export_dir, text_run, agnews[:1000] + unseen)
  print(f"\nSentencePiece vs tokenizer.json: {ties} of {1000 + len(unseen)} lines differ by an exact score tie")
  assert ties <= 5
  tok = transformers.AutoTokenizer.from_pretrained(str(export_dir))
  assert tok.mask_token_id == vocab.MASK and tok.pad_token_id == vocab.PAD and tok.model_max_length == 48
  assert tok.decode(tok(agnews[5])["input_ids"], skip_special_tokens=True) == text_run.detokenize(
      text_run.tokenize([agnews[5]], max_length=4096)[0][0])
  pair = tok("first part", "second part")["input_ids"]
  assert pair == text_run.tokenize([("first part", "second part")])[0][0][:len(pair)].tolist()


def test_smiles_bpe_tokenizer_parity(tmp_path, moses):
  bpe = tokenizers.SentencePieceTokenizer.train(moses[2000:4000], vocab_size=300, kind="smiles_bpe")
  bpe.save(tmp_path / "ours")
  assert hf_tokenizer.write_hf_tokenizer(tmp_path / "ours", tmp_path, 64) == bpe.vocab_size
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  theirs = tok(moses[:1000] + ["CC[MASK]O", "[MASK]c1ccccc1"], truncation=True)["input_ids"]
  assert theirs[:-2] == [[vocab.BOS, *bpe.encode(s)[:62], vocab.EOS] for s in moses[:1000]]
  assert theirs[-2:] == [[vocab.BOS, *bpe.encode("CC"), vocab.MASK, *bpe.encode("O"), vocab.EOS],
                         [vocab.BOS, vocab.MASK, *bpe.encode("c1ccccc1"), vocab.EOS]]


# ----------------------------------------------------------------------------------------------
# From Hugging Face: a random RobertaForMaskedLM -> our encoder -> export -> reload
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory, agnews):
  """A RoBERTa checkpoint as transformers saves it: byte-level BPE with fairseq ids (<s>=0 <pad>=1 </s>=2
  <unk>=3, <mask> last), pad_token_id=1 (positions from 2), a random token-type row."""
  import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("roberta")
  bpe = hf_tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(agnews[4000:6000], vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
  bpe.add_special_tokens(["<mask>"])
  bpe.post_processor = hf_tokenizers.processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                              cls_token="<s>", sep_token="</s>", model_max_length=40)
  fast.save_pretrained(str(path))
  config = transformers.RobertaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=42,
                                      type_vocab_size=1, layer_norm_eps=1e-5)
  torch.manual_seed(0)
  model = transformers.RobertaForMaskedLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.2 if "LayerNorm" not in name and "layer_norm" not in name else 0.1)
              + (1.0 if name.endswith("orm.weight") else 0.0))
  model.save_pretrained(str(path))
  return path


def agnews_file(lines, tmp_path) -> pathlib.Path:
  path = tmp_path / "agnews.txt"
  path.write_text("\n".join(lines[:200]) + "\n")
  return path


def test_from_hf_round_trip(roberta_dir, agnews, tmp_path):
  hf = from_hf.load_encoder(roberta_dir)
  assert hf.model["positions"] == "absolute" and hf.model["max_positions"] == 40 and not hf.model["pre_ln"]
  texts = agnews[:8]
  original = transformers.AutoModelForMaskedLM.from_pretrained(str(roberta_dir)).eval()
  their_ids, their_mask = hf_batch(roberta_dir, texts)
  with torch.no_grad():
    out = original(input_ids=their_ids, attention_mask=their_mask, output_hidden_states=True)
  want_hidden, want_logits = out.hidden_states[-1].numpy(), out.logits.numpy()
  their_tok = transformers.AutoTokenizer.from_pretrained(str(roberta_dir))
  specials = {name: getattr(their_tok, f"{name}_token_id") for name in ("pad", "unk", "bos", "eos", "mask")}
  assert specials == {"pad": 1, "unk": 3, "bos": 0, "eos": 2, "mask": len(their_tok) - 1}
  order = np.asarray(hf_tokenizer.our_ids_from(specials, len(their_tok)))  # order[our id] = their id
  # 1. Our encoder and LM head on the renumbered ids == the original (logit columns renumbered alike).
  ids = np.full(their_ids.shape, vocab.PAD, np.int32)
  for b, text in enumerate(texts):
    row = [vocab.BOS, *hf.tokenizer.encode(text)[:38], vocab.EOS]
    ids[b, :len(row)] = row
  np.testing.assert_array_equal(np.where(their_mask.numpy() == 1, order[ids], 1), their_ids.numpy())
  cfg = ModelConfig(**hf.model, dropout_rate=0.0, attention_dropout_rate=0.0)
  hidden = Encoder(cfg).apply({"params": hf.encoder}, jnp.asarray(ids), padding_mask=jnp.asarray(ids == vocab.PAD))
  logits = LMHead(cfg).apply({"params": hf.lm_head}, hidden, jnp.asarray(hf.encoder["token_embed"]["embedding"]))
  real = their_mask.numpy() == 1
  assert max_diff_at_real(hidden, want_hidden, real) < TOL
  assert max_diff_at_real(logits, want_logits[..., order], real) < TOL

  # 2. A real pretraining run started with init_from=hf: (one update at warm-up step 0, i.e. learning rate 0,
  #    so the weights stay the checkpoint's), exported again and reloaded by transformers.
  from exlm_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = config_lib.pretrain_config("mlm", "tiny", seq_len=40, batch_size=8, total_steps=1, warmup_steps=1,
                                      log_every=1, eval_every=1, checkpoint_every=1, eval_batches=1,
                                      async_checkpointing=False, init_from=f"hf:{roberta_dir}")
  config.data = config_lib.data_config("text", str(agnews_file(agnews, tmp_path)), max_examples=200,
                                       eval_fraction=0.1, tfds_dir=str(tmp_path / "tfds"))
  run = tmp_path / "run"
  loop.train_and_evaluate(config, str(run))
  saved = json.loads((run / "config.json").read_text())
  assert saved["model"]["positions"] == "absolute" and saved["data"]["tokenizer"] == "hf_tokenizers"
  restored = exlm_jax.load(run).params
  np.testing.assert_allclose(restored["encoder"]["token_embed"]["embedding"], hf.encoder["token_embed"]["embedding"])
  # Fine-tuning from the same checkpoint hands over exactly its encoder.
  from exlm_jax.finetune import handoff  # pylint: disable=g-import-not-at-top
  init = handoff.pretrained_encoder(f"hf:{roberta_dir}", dict(dropout_rate=0.0))
  assert init.objective == "hf" and init.tokenizer.vocab_size == hf.tokenizer.vocab_size
  for a, b in zip(jax.tree.leaves(init.encoder), jax.tree.leaves(hf.encoder)):
    np.testing.assert_array_equal(a, b)
  result = to_hf(run, tmp_path / "again")
  assert result.architecture == "RobertaForMaskedLM" and not result.trust_remote_code
  again_ids, again_mask = hf_batch(tmp_path / "again", texts)
  np.testing.assert_array_equal(again_ids.numpy()[real], ids[real])
  with torch.no_grad():
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "again")).eval()
    back = reloaded(input_ids=again_ids, attention_mask=again_mask, output_hidden_states=True)
  assert max_diff_at_real(back.hidden_states[-1].numpy(), want_hidden, real) < TOL
  assert max_diff_at_real(back.logits.numpy(), want_logits[..., order], real) < TOL


def test_exported_folder_imports_back_exactly(exported):
  run_dir, export_dir, _ = exported("exlm_rope2d_preln")
  hf = from_hf.load_encoder(export_dir)
  run = exlm_jax.load(run_dir)
  assert {k: v for k, v in hf.model.items()} == {
      k: getattr(run.model_config, k) for k in hf.model}
  want = hf_weights.flatten(jax.tree.map(np.asarray, jax.device_get(run.params["encoder"])))
  got = hf_weights.flatten(hf.encoder)
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path])
  texts = ["CCO", "c1ccccc1N"]
  assert [hf.tokenizer.encode(t) for t in texts] == [run.tokenizer.encode(t) for t in texts]


# ----------------------------------------------------------------------------------------------
# Bad input: one line that names the fix
# ----------------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message and message
  return message


def test_unsupported_architecture_missing_files_and_vocabulary_mismatch(roberta_dir, tmp_path):
  bert = tmp_path / "bert"
  transformers.BertModel(transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=16)).save_pretrained(bert)
  (bert / "tokenizer.json").write_text((roberta_dir / "tokenizer.json").read_text())
  with pytest.raises(ValueError) as e:
    from_hf.load_encoder(bert)
  assert "'bert'" in one_line(e) and "roberta" in one_line(e)

  with pytest.raises(FileNotFoundError) as e:
    from_hf.load_encoder(tmp_path / "nowhere")
  assert "config.json" in one_line(e)
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    (no_weights / name).write_text((roberta_dir / name).read_text())
  (no_weights / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError) as e:
    from_hf.load_encoder(no_weights)
  assert "model.safetensors" in one_line(e) and "save_pretrained" in one_line(e)

  mismatch = tmp_path / "mismatch"
  mismatch.mkdir()
  for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
    (mismatch / name).write_bytes((roberta_dir / name).read_bytes())
  tok = json.loads((roberta_dir / "tokenizer.json").read_text())
  tok["model"]["vocab"].update({f"extra{i}": 1000 + i for i in range(3)})
  (mismatch / "tokenizer.json").write_text(json.dumps(tok))
  with pytest.raises(ValueError) as e:
    from_hf.load_encoder(mismatch)
  assert "vocabulary mismatch" in one_line(e)

  with pytest.raises(ValueError) as e:  # ExLM needs rope2d; a RoBERTa checkpoint has absolute positions
    from_hf.apply_to_config(config_lib.pretrain_config("exlm", "tiny"), from_hf.load_encoder(roberta_dir))
  assert "rope2d" in one_line(e) and str(roberta_dir) in one_line(e)


def test_export_errors_and_cli(exported, tmp_path, capsys, text_tok):
  run_dir, export_dir, _ = exported("exlm_rope2d_preln")
  swapped = tmp_path / "swapped"
  shutil.copytree(run_dir, swapped)
  shutil.rmtree(swapped / "tokenizer")
  text_tok.save(swapped / "tokenizer")
  with pytest.raises(ValueError) as e:
    to_hf(swapped, tmp_path / "out")
  assert "tokenizer" in one_line(e) and str(text_tok.vocab_size) in one_line(e)
  assert not (tmp_path / "out").exists()

  with pytest.raises(FileExistsError) as e:
    to_hf(run_dir, export_dir)
  assert "--overwrite" in one_line(e)
  assert export_cli.main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
  assert export_cli.main(["--workdir", str(run_dir), "--out", str(export_dir), "--overwrite"]) == 0
  assert "trust_remote_code=True" in capsys.readouterr().out
