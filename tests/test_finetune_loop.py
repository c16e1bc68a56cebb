"""Fine-tuning: masked multi-task BCE, the steps of the one trainer against a direct computation,
end-to-end runs on real BBBP and SST-2 from tiny pretraining checkpoints (MLM on SMILES, MAE-LM on
text), the encoder hand-off's loud failures, configs and sweeps."""

import ast
import hashlib
import pathlib
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
import pytest

import exlm_jax
from exlm_jax import config_lib, run_card, run_store
from exlm_jax.data import tokenizers, vocab
from exlm_jax.finetune import config as ft_config
from exlm_jax.finetune import data as ft_data
from exlm_jax.finetune import handoff, loop
from exlm_jax.finetune import model as model_lib
from exlm_jax.finetune import results as ft_results
from exlm_jax.finetune.encoding import encode_examples
from exlm_jax.finetune.tasks import GLUE_TASKS, MOLECULENET
from exlm_jax.models.encoder import ModelConfig
from exlm_jax.objectives import exlm, maelm
from exlm_jax.train import optim, partitioning, steps

from test_api import make_pretraining_workdir  # pylint: disable=wrong-import-order

def load_config_module(name: str):
  return config_lib.load_module(f"configs/{name}.py")


# ----------------------------------------------------------------------------------------------
# Missing labels
# ----------------------------------------------------------------------------------------------


def tox21_labels(shared_data, rows: int = 32) -> np.ndarray:
  """(rows, 12) float64 labels with NaN at missing cells, straight from tox21.csv."""
  spec = MOLECULENET["tox21"]
  frame = pd.read_csv(shared_data / spec.path, nrows=rows)
  return frame[list(spec.label_columns)].to_numpy(np.float64)


def numpy_masked_bce(logits, labels, mask):
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
  p = 1.0 / (1.0 + np.exp(-logits))
  cells = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  return cells[mask].sum(), mask.sum()


def test_missing_tox21_labels_add_zero_loss_and_zero_gradient(shared_data):
  raw = tox21_labels(shared_data)
  mask = ~np.isnan(raw)
  assert 0 < mask.sum() < mask.size, "the first tox21 rows should contain missing labels"
  logits = np.random.default_rng(0).normal(0, 2.0, raw.shape).astype(np.float32)
  filled = np.where(mask, raw, 0.0).astype(np.float32)
  loss_sum, count = model_lib.masked_bce_loss(jnp.asarray(logits), jnp.asarray(filled), jnp.asarray(mask))
  want_sum, want_count = numpy_masked_bce(logits, filled, mask)
  np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5)
  assert float(count) == want_count

  # Whatever a missing cell holds (0, 1, NaN), loss and gradient are the same; its own gradient is 0.
  grad = jax.grad(lambda x, y: model_lib.masked_bce_loss(x, y, jnp.asarray(mask))[0])
  grads = [np.asarray(grad(jnp.asarray(logits), jnp.asarray(np.where(mask, raw, fill).astype(np.float32))))
           for fill in (0.0, 1.0, np.nan)]
  for g in grads[1:]:
    np.testing.assert_array_equal(g, grads[0])
  assert np.all(grads[0][~mask] == 0.0) and np.all(np.isfinite(grads[0]))
  sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
  np.testing.assert_allclose(grads[0][mask], (sigmoid - filled)[mask], rtol=1e-4, atol=1e-6)

  # The train step's loss (task_loss) gives the same total and gradient whatever missing cells hold.
  def step_loss(x, y):
    total, weight, _ = model_lib.task_loss("multitask_binary", x, y, jnp.asarray(mask))
    return total / weight
  values = [jax.value_and_grad(step_loss)(jnp.asarray(logits), jnp.asarray(np.where(mask, raw, fill), jnp.float32))
            for fill in (0.0, np.nan)]
  assert float(values[0][0]) == float(values[1][0]) == pytest.approx(want_sum / want_count, rel=1e-5)
  np.testing.assert_array_equal(np.asarray(values[0][1]), np.asarray(values[1][1]))


def test_other_losses_match_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 1, 0, 2], np.int32)
  mask = np.array([1, 1, 1, 0, 1, 0], bool)
  total, count, correct = model_lib.classification_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(total), -logp[np.arange(6), labels][mask].sum(), rtol=1e-5)
  assert float(count) == 4 and float(correct) == (logits.argmax(-1) == labels)[mask].sum()
  preds, targets = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
  cells = rng.random((5, 2)) > 0.3
  total, count = model_lib.regression_loss(jnp.asarray(preds), jnp.asarray(targets), jnp.asarray(cells))
  np.testing.assert_allclose(float(total), ((preds - targets) ** 2)[cells].sum(), rtol=1e-5)
  assert float(count) == cells.sum()


# ----------------------------------------------------------------------------------------------
# The one trainer
# ----------------------------------------------------------------------------------------------


def _multitask_split(rows: int = 8, seq_len: int = 16, tasks: int = 3) -> ft_data.EncodedSplit:
  rng = np.random.default_rng(3)
  tokens = rng.integers(vocab.NUM_SPECIAL, 40, (rows, seq_len)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = vocab.BOS, vocab.EOS
  tokens[2, 6:], tokens[2, 5] = vocab.PAD, vocab.EOS
  mask = rng.random((rows, tasks)) > 0.3
  return ft_data.EncodedSplit(tokens, (rng.random((rows, tasks)) > 0.5).astype(np.float32), mask)


def test_finetuning_steps_through_the_one_trainer_equal_a_direct_computation():
  """TrainSetup on a sharded (data=2, fsdp=4) mesh == an unsharded value_and_grad of FinetuneModel + the
  task loss with dropout key fold_in(PRNGKey(seed), step), followed by the optax update; the pretrained
  encoder is put in place exactly and the head is ClassificationHead.init(PRNGKey(seed))."""
  config = config_lib.finetune_config("bbbp")
  config.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1))
  model_cfg = ModelConfig.from_config(config_lib.model_config("tiny", vocab_size=40, num_layers=1))
  split, seed, total_steps = _multitask_split(), 4, 10
  batch = ft_data.make_batch(split, np.array([5, 0, 2, 7, 1, 3]), 8)  # 2 filler rows
  model = ft_data.loss_model(model_cfg, "multitask_binary", 3, 0.1, ft_data.make_batch(split, np.arange(0), 1))
  setup = steps.TrainSetup.create(config, partitioning.create_mesh(config.mesh), model,
                                  ft_config.optimizer_config(config, total_steps))
  encoder = model_lib.FinetuneModel(model_cfg, 3).init(jax.random.PRNGKey(9), jnp.asarray(split.tokens))["params"]
  encoder = jax.device_get(nn.meta.unbox(encoder)["encoder"])
  state = setup.init_state(seed, {"encoder": encoder})
  params = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, params["encoder"], encoder)
  head = jax.jit(model_lib.ClassificationHead(model_cfg, 3).init)(jax.random.PRNGKey(seed),
                                                                  jnp.zeros((1, model_cfg.d_model)))["params"]
  jax.tree.map(np.testing.assert_array_equal, params["head"], jax.device_get(nn.meta.unbox(head)))

  train_model = model_lib.FinetuneModel(model_cfg, 3, 0.1, deterministic=False)

  def mean_loss(p, step):
    outputs = train_model.apply({"params": p}, jnp.asarray(batch["tokens"]),
                                rngs={"dropout": jax.random.fold_in(jax.random.PRNGKey(seed), step)})
    total, weight, _ = model_lib.task_loss("multitask_binary", outputs, jnp.asarray(batch["labels"]),
                                           jnp.asarray(batch["mask"]))
    return total / weight

  optimizer = optim.make_optimizer(ft_config.optimizer_config(config, total_steps))
  want, opt_state = params, optimizer.init(params)
  for step in range(2):
    loss, grads = jax.value_and_grad(mean_loss)(want, step)
    updates, opt_state = optimizer.update(grads, opt_state, want)
    want = optax.apply_updates(want, updates)
    state, metrics = setup.train_step(state, batch, seed)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    assert float(metrics["weight"]) == batch["mask"].sum()
  assert int(state.step) == 2
  for got, expected in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, atol=2e-6)
  predicted = setup.predict(state.params, batch)
  direct = model_lib.FinetuneModel(model_cfg, 3).apply({"params": want}, jnp.asarray(batch["tokens"]))
  np.testing.assert_allclose(np.asarray(predicted), np.asarray(direct), atol=1e-5)


def test_nothing_under_finetune_builds_its_own_jit_eval_shape_or_shardings():
  """The one trainer (train/steps.py) owns jit, eval_shape and batch/param shardings."""
  forbidden = {"jit", "pjit", "eval_shape", "sharding", "NamedSharding", "PartitionSpec", "device_put",
               "make_array_from_process_local_data", "shard_map"}
  root = pathlib.Path(loop.__file__).parent
  found = []
  for path in sorted(root.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute) and node.attr in forbidden:
        found.append(f"{path.name}:{node.lineno} .{node.attr}")
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jax"):
        found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                  if a.name in forbidden or (node.module or "").startswith("jax.sharding")]
  assert len(list(root.glob("*.py"))) >= 8 and not found, found


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def quick(config, **overrides):
  config.update(dict(num_epochs=1, batch_size=16, eval_batch_size=32, seq_len=48, log_every=2, evals_per_epoch=2))
  config.update(overrides)
  return config


def test_bbbp_end_to_end_from_an_mlm_checkpoint(shared_data, tmp_path):
  config = load_config_module("finetune_moleculenet").get_config("task=bbbp")
  config = quick(config, seeds=(0, 1))
  config.data.max_train_examples, config.data.max_eval_examples = 64, 48
  smiles = pd.read_csv(shared_data / MOLECULENET["bbbp"].path)["smiles"].tolist()
  make_pretraining_workdir(tmp_path / "pretrain", "mlm", tokenizers.SmilesRegexTokenizer.build(smiles), num_layers=1)
  config.init_from = str(tmp_path / "pretrain")
  workdir = tmp_path / "ft"
  results = loop.run(config, str(workdir))

  assert results["task"] == "bbbp" and results["main_metric"] == "roc_auc" and results["init_step"] == 3
  assert results["pretrain_objective"] == "mlm" and results["seeds"] == [0, 1]
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["summary"]["test"]["roc_auc"]["values"] == [r["report"]["test"]["roc_auc"] for r in saved["per_seed"]]
  for split in ("validation", "test"):
    stats = saved["summary"][split]["roc_auc"]
    assert 0.0 <= stats["mean"] <= 1.0 and stats["std"] == pytest.approx(np.std(stats["values"], ddof=1))
  for r in saved["per_seed"]:
    assert 1 <= r["best_step"] <= r["total_steps"] == 4  # 64 examples / batch 16, evaluated at steps 2 and 4
    assert [h["step"] for h in r["history"]] == [2, 4]
    assert (workdir / f"seed_{r['seed']}" / "checkpoints" / str(r["best_step"])).is_dir()
    assert list((workdir / "tensorboard" / f"seed_{r['seed']}").glob("events.out.tfevents.*"))
  final = json.loads((workdir / "final_metrics.json").read_text())  # what launch/sweep.py tabulates
  assert final["eval"]["roc_auc"] == saved["summary"]["validation"]["roc_auc"]["mean"]
  assert final["test"]["roc_auc"] == saved["summary"]["test"]["roc_auc"]["mean"]
  table = (workdir / "results.md").read_text()
  assert "| seed | best step | validation roc_auc | test roc_auc |" in table and "mean ± std" in table
  # Unparsable SMILES are counted and reported (RDKit, independently of the task reader).
  from rdkit import Chem, RDLogger  # pylint: disable=g-import-not-at-top
  RDLogger.DisableLog("rdApp.*")
  unparsable = [i for i, s in enumerate(smiles) if Chem.MolFromSmiles(s) is None]
  assert [row for row, _ in saved["invalid_smiles"]] == unparsable and len(unparsable) > 0
  assert f"invalid SMILES left out: {len(unparsable)}" in table
  # Inputs over seq_len, per split, as a direct tokenization of each split's SMILES counts them.
  tok = run_store.load_tokenizer(tmp_path / "pretrain")
  task = ft_data.load_task_data(config)
  raw = {name: np.array([len(tok.encode(t)) + 2 for t in split.texts]) for name, split in task.splits.items()}
  for name, counts in saved["lengths"]["splits"].items():
    assert counts["truncated"] == (raw[name] > 48).sum() and counts["examples"] == len(raw[name])
  assert saved["lengths"]["seq_len"] == 48 and "seq_len 48 (pretraining's max_example_len: -)" in table
  # The run card: kind finetune, the pretraining objective and architecture, the task file's bytes.
  card = run_card.read_card(workdir)
  assert card["kind"] == "finetune" and card["objective"] == "mlm" and card["budget"] == "steps"
  pretrained = json.loads((tmp_path / "pretrain" / "config.json").read_text())["model"]
  assert card["encoder_fingerprint"] == run_card.fingerprint(run_card.architecture(run_card.encoder_fields(pretrained)))
  csv_path = (shared_data / MOLECULENET["bbbp"].path).resolve()
  assert card["data"]["content_sha256"] == hashlib.sha256(csv_path.read_bytes()).hexdigest()
  assert pathlib.Path(card["data"]["path"]).resolve() == csv_path and card["data"]["records"] == 64
  kept = np.minimum(raw["train"], 48)
  assert card["data"]["max_example_len"] == kept.max() and card["data"]["tokenizer"] == "smiles_regex"
  assert card["steps"] == 8 and card["tokens_seen"] == 8 * 16 * 48  # 2 seeds x 4 steps of 16 x 48 slots
  assert card["real_tokens_seen"] == 2 * kept.sum()  # 2 seeds x 1 epoch over the training split
  d, f, c = pretrained["d_model"], pretrained["mlp_dim"], 1
  per_example = 3 * (48 * (8 * d * d + 4 * d * f) + 4 * 48 * 48 * d) + 3 * (2 * d * d + 2 * d * c)  # 1 layer + head
  assert card["train_flops"] == pytest.approx(8 * 16 * per_example)
  assert card["wall_time_s"] == pytest.approx(final["wall_time_s"])

  model = exlm_jax.load(workdir, devices=jax.local_devices()[:1])  # best validation seed
  assert model.kind == "finetune" and model.seed == saved["best_seed"]
  probs = model.predict(["CCO", "c1ccccc1O"])
  assert probs.shape == (2, 1) and np.all((probs > 0) & (probs < 1))


def test_sst2_end_to_end_from_a_maelm_checkpoint_and_resume(shared_data, tmp_path):
  config = load_config_module("finetune_sst2").get_config("quick")
  config = quick(config, seeds=(0,))
  config.data.max_train_examples, config.data.max_eval_examples = 48, 32
  task = ft_data.load_task_data(config)
  assert task.name == "sst2" and task.report_splits == ("test",)  # GLUE dev reported as test
  sentences = [t for s in task.splits.values() for t in s.texts]
  tok = tokenizers.SentencePieceTokenizer.train(sentences, vocab_size=400)
  make_pretraining_workdir(tmp_path / "pretrain", "maelm", tok, num_layers=1)
  config.init_from = str(tmp_path / "pretrain" / "checkpoints")  # the checkpoints/ folder works too
  workdir = tmp_path / "ft"
  results = loop.run(config, str(workdir))
  assert results["pretrain_objective"] == "maelm" and results["main_metric"] == "accuracy"
  accuracy = results["summary"]["test"]["accuracy"]
  assert 0.0 <= accuracy["mean"] <= 1.0 and accuracy["std"] == 0.0 and len(accuracy["values"]) == 1
  task_info = json.loads((workdir / "task.json").read_text())
  assert task_info["split_sizes"] == {"train": 48, "validation": 32, "test": 32}
  assert "| seed | best step | validation accuracy | test accuracy |" in (workdir / "results.md").read_text()

  first_card = run_card.read_card(workdir)
  again = loop.run(config, str(workdir))  # finished seeds are not trained again
  assert again["per_seed"] == json.loads(json.dumps(results["per_seed"]))
  card = run_card.read_card(workdir)  # wall time summed over the two sessions; nothing trained in the second
  session = json.loads((workdir / "final_metrics.json").read_text())["wall_time_s"]
  assert card["wall_time_s"] == pytest.approx(first_card["wall_time_s"] + session) and session > 0
  assert card["steps"] == first_card["steps"] == 3 and card["real_tokens_seen"] == first_card["real_tokens_seen"]
  config.learning_rate *= 2  # ... but only for the config that produced them
  with pytest.raises(ValueError, match="different config"):
    loop.run(config, str(workdir))


# ----------------------------------------------------------------------------------------------
# Encoder hand-off and scratch baselines
# ----------------------------------------------------------------------------------------------


def test_encoder_handoff_fails_loudly_on_a_mismatched_tree(tmp_path):
  tok = tokenizers.SmilesRegexTokenizer.build(["CCO", "c1ccccc1N"])
  config, params = make_pretraining_workdir(tmp_path, "mlm", tok)
  init = handoff.pretrained_encoder(str(tmp_path))
  assert init.objective == "mlm" and init.step == 3 and init.model_config.d_model == config.model.d_model
  np.testing.assert_array_equal(np.asarray(init.encoder["token_embed"]["embedding"]),
                                params["encoder"]["token_embed"]["embedding"])

  with pytest.raises(ValueError, match=r"wrong shapes .*token_embed/embedding"):
    handoff.check_encoder_tree(init.encoder, ModelConfig.from_config(config.model, vocab_size=tok.vocab_size + 1),
                            "ckpt")
  broken = {**init.encoder, "stack": {k: v for k, v in init.encoder["stack"].items() if k != "layer_1"}}
  with pytest.raises(ValueError, match=r"missing \['stack/layer_1/"):
    handoff.check_encoder_tree(broken, init.model_config, "ckpt")
  # A config.json that disagrees with the checkpoint (here: one layer more) fails at the hand-off.
  edited = json.loads((tmp_path / "config.json").read_text())
  edited["model"]["num_layers"] += 1
  (tmp_path / "config.json").write_text(json.dumps(edited))
  with pytest.raises(ValueError, match=r"does not match the fine-tuning encoder: missing \['stack/layer_2/"):
    handoff.pretrained_encoder(str(tmp_path))
  with pytest.raises(ValueError, match="may only override"):
    cfg = config_lib.finetune_config()
    cfg.model.d_model = 64
    ft_config.validate_config(cfg, 8)


@pytest.mark.parametrize("objective", ["maelm", "exlm"])
def test_maelm_exlm_encoders_hand_off_and_the_head_is_the_papers(tmp_path, objective):
  """The hand-off keeps exactly the pretrained encoder; FinetuneModel = that encoder run as in pretraining
  without masks (ExLM: no expansion, copy index 0) + <s> -> dense -> tanh -> linear (dropout off)."""
  tok = tokenizers.SmilesRegexTokenizer.build(["CCO", "c1ccccc1N", "CC(=O)O"])
  config, saved = make_pretraining_workdir(tmp_path, objective, tok, num_layers=1)
  init = handoff.pretrained_encoder(str(tmp_path))
  assert init.objective == objective and init.step == 3
  jax.tree.map(np.testing.assert_array_equal, init.encoder, saved["encoder"])

  tokens, _ = encode_examples(["CCO", "c1ccccc1N"], tok, 16)
  net = {"maelm": maelm, "exlm": exlm}[objective].make_model(config, True)
  hidden = net.apply({"params": saved}, jnp.asarray(tokens),
                     method=lambda m, t: m.encoder(t, padding_mask=t == vocab.PAD))  # copy index 0 by default
  head = model_lib.ClassificationHead(init.model_config, 3)
  head_params = head.init(jax.random.PRNGKey(1), jnp.zeros((1, config.model.d_model)))["params"]
  head_params = jax.tree.map(np.asarray, nn.meta.unbox(head_params))
  model = model_lib.FinetuneModel(init.model_config, 3, pooler_dropout=0.1, deterministic=True)
  got = model.apply({"params": {"encoder": init.encoder, "head": head_params}}, jnp.asarray(tokens))
  cls = np.asarray(hidden, np.float64)[:, 0]
  want = np.tanh(cls @ head_params["dense"]["kernel"] + head_params["dense"]["bias"])
  want = want @ head_params["out"]["kernel"] + head_params["out"]["bias"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_scratch_baseline_warns_and_builds_a_tokenizer(shared_data, caplog):
  config = load_config_module("finetune_glue").get_config("task=rte")
  config.data.max_train_examples, config.data.max_eval_examples = 64, 16
  config.scratch_size, config.scratch_vocab_size = "tiny", 400
  with caplog.at_level(logging.WARNING):
    task, init = loop.prepare(config)
  assert "RANDOMLY initialised" in caplog.text and init.encoder is None
  assert init.model_config.vocab_size == init.tokenizer.vocab_size == 400 and task.name == "rte"
  assert init.model_config.dropout_rate == config.model.dropout_rate


# ----------------------------------------------------------------------------------------------
# Configs and sweeps
# ----------------------------------------------------------------------------------------------


def test_configs_cover_every_task_and_sweeps_override_existing_fields():
  glue = load_config_module("finetune_glue")
  for task in GLUE_TASKS:
    config = glue.get_config(f"task={task}")
    ft_config.validate_config(config, 8)
    assert config.finetune.task == task
    sweep = glue.get_sweep(f"task={task}")
    assert len(sweep) == (24 if task in glue.LARGE_TASKS else 64)
    assert {d["learning_rate"] for d in sweep} == {1e-5, 2e-5, 3e-5, 4e-5}
    assert all(key in config for d in sweep for key in d)
  molecules = load_config_module("finetune_moleculenet")
  for task in MOLECULENET:
    ft_config.validate_config(molecules.get_config(f"task={task}"), 8)
  assert len(molecules.get_sweep(None)) == 18
  assert load_config_module("finetune_sst2").get_config("quick").finetune.task == "sst2"
  assert load_config_module("finetune_bbbp").get_config().finetune.task == "bbbp"
  with pytest.raises(ValueError, match="unknown GLUE task"):
    glue.get_config("task=imdb")  # not GLUE (SQuAD is configs/finetune_squad.py)
  assert ft_config.label_columns("NR-AR, SR-p53,") == ["NR-AR", "SR-p53"]
  bad = molecules.get_config("task=bbbp")
  bad.batch_size = 12
  with pytest.raises(ValueError, match="divisible by the data-parallel size 8"):
    ft_config.validate_config(bad, 8)


def test_csv_task_from_config_fields(shared_data):
  config = load_config_module("finetune_moleculenet").get_config()
  config.data.path = "$DATA/moleculenet/clintox.csv"
  config.data.label_columns = "FDA_APPROVED,CT_TOX"
  config.data.max_train_examples = 50
  task = ft_data.load_task_data(config)
  assert task.name == "clintox" and task.num_outputs == 2 and task.task_type == "multitask_binary"
  assert len(task.splits["train"]) == 50 and task.report_splits == ("test",)


def test_regression_targets_are_standardised_and_scored_in_label_units(shared_data):
  config = load_config_module("finetune_moleculenet").get_config("task=esol")
  config.data.max_train_examples = 200
  task = ft_data.load_task_data(config)
  mean, std = ft_data.target_stats(task, normalize=True)
  train_labels = task.splits["train"].labels[:, 0]
  np.testing.assert_allclose([mean[0], std[0]], [train_labels.mean(), train_labels.std()], rtol=1e-5)
  tokenizer = tokenizers.SmilesRegexTokenizer.build(task.splits["train"].texts)
  encoded, _ = ft_data.encode_split(task.splits["test"], tokenizer, 64, task.task_type, mean, std)
  np.testing.assert_allclose(encoded.labels * std + mean, task.splits["test"].labels, rtol=1e-5, atol=1e-5)
  perfect = ft_results.score(task, "test", encoded.labels, mean, std)  # outputs in the normalised space
  assert perfect["rmse"] == pytest.approx(0.0, abs=1e-5) and task.main_metric == "rmse"
