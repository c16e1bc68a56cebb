"""SQuAD on the one fine-tuning loop: a tiny end-to-end fine-tune on the real articles (train on Rhine +
Computational complexity theory, evaluate on Normans) from a tiny MLM text checkpoint, its results table
against the official evaluation recomputed from the written prediction files and against the API's
answer() on the saved best params, resume / rerun, the config, registry and validation errors."""

import hashlib
import json
import math
import pathlib

import jax
import numpy as np
import pytest

import exlm_jax
from exlm_jax import config_lib
from exlm_jax.data import tokenizers
from exlm_jax.finetune import card as ft_card
from exlm_jax.finetune import config as ft_config
from exlm_jax.finetune import data as ft_data
from exlm_jax.finetune import loop
from exlm_jax.finetune.squad import evaluate, reader
from exlm_jax.finetune.squad import task as squad_task
from exlm_jax.models.encoder import ModelConfig

from test_api import make_pretraining_workdir  # pylint: disable=wrong-import-order

SOURCES = ("$DATA/squad/dev-v2.0.json", "$DATA/squad/train-v2.0.json")


def quick_config(**overrides):
  """configs/finetune_squad.py:quick made small: short windows, a question subsample, 1 epoch."""
  config = config_lib.load("configs/finetune_squad.py:quick")
  config.update(dict(seq_len=64, batch_size=16, eval_batch_size=64, num_epochs=1, evals_per_epoch=2, log_every=4,
                     seeds=(0, 1)))
  config.squad.update(dict(doc_stride=32, max_query_length=24))
  config.data.max_train_examples, config.data.max_eval_examples = 48, 60
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def spm(shared_data):
  data = reader.read_squad(SOURCES)
  texts = list(dict.fromkeys(e.context for e in data.examples)) + [e.question for e in data.examples]
  return tokenizers.SentencePieceTokenizer.train(texts, vocab_size=600, num_threads=1)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, spm):
  root = tmp_path_factory.mktemp("squad")
  make_pretraining_workdir(root / "pretrain", "mlm", spm, num_layers=1)
  config = quick_config(init_from=str(root / "pretrain"))
  results = loop.run(config, str(root / "ft"))
  return config, root / "ft", results


def normans_by_id(shared_data):
  return {e.qid: e for e in reader.read_squad(SOURCES, ["Normans"]).examples}


def test_results_equal_the_official_metric_on_the_written_predictions(shared_data, finetuned):
  config, workdir, results = finetuned
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["task"] == "squad_v2" and saved["main_metric"] == "best_f1" and saved["pretrain_objective"] == "mlm"
  assert saved["split_sizes"] == {"train": 48, "validation": 60} and saved["articles"]["validation"] == ["Normans"]
  assert sorted(saved["articles"]["train"]) == ["Computational_complexity_theory", "Rhine"]
  normans = normans_by_id(shared_data)
  for r in saved["per_seed"]:
    assert [h["step"] for h in r["history"]] == [r["total_steps"] // 2, r["total_steps"]]
    written = json.loads((workdir / f"seed_{r['seed']}" / "predictions_validation.json").read_text())
    assert len(written["best_spans"]) == 60 and set(written["best_spans"]) <= set(normans)
    examples = [normans[q] for q in written["best_spans"]]
    got = evaluate.evaluate(examples, written["best_spans"], "v2.0", written["null_odds"], 0.0)
    table = r["report"]["validation"]
    assert set(table) == set(squad_task.V2_METRICS)
    for name, value in table.items():
      assert math.isclose(value, got[name], abs_tol=1e-9), name
    # second path: the thresholded answers file scored as plain predictions gives the same EM / F1
    assert all(a == ("" if written["null_odds"][q] > 0 else written["best_spans"][q])
               for q, a in written["answers"].items())
    plain = evaluate.evaluate(examples, written["answers"], "v2.0")
    for name in ("exact", "f1", "HasAns_f1", "NoAns_f1"):
      assert math.isclose(plain[name], table[name], abs_tol=1e-9), name
    # best_f1 can always fall back to answering nothing
    nothing = 100.0 * sum(e.is_impossible for e in examples) / len(examples)
    assert table["best_f1"] >= nothing - 1e-9 and table["NoAns_f1"] <= 100.0
  for name, stats in saved["summary"]["validation"].items():
    values = [r["report"]["validation"][name] for r in saved["per_seed"]]
    assert stats["values"] == values and math.isclose(stats["mean"], np.mean(values))
    assert math.isclose(stats["std"], np.std(values, ddof=1), abs_tol=1e-12)
  table = (workdir / "results.md").read_text()
  assert "| seed | best step | validation exact | validation f1 |" in table and "validation best_f1_thresh" in table
  assert "mean ± std" in table and "invalid SMILES" not in table
  task_json = json.loads((workdir / "task.json").read_text())
  assert task_json["task_type"] == "extractive_qa" and task_json["version"] == "v2.0"
  assert task_json["features"]["train"]["questions"] <= 48 <= task_json["features"]["train"]["windows"]


def test_answer_uses_the_best_params_and_the_selected_threshold(shared_data, finetuned):
  config, workdir, results = finetuned
  model = exlm_jax.load(workdir, devices=jax.local_devices()[:2])
  best = next(r for r in results["per_seed"] if r["seed"] == results["best_seed"])
  assert model.seed == results["best_seed"]
  assert model.null_threshold == best["selection"]["validation"]["best_f1_thresh"]
  written = json.loads((workdir / f"seed_{model.seed}" / "predictions_validation.json").read_text())
  normans = normans_by_id(shared_data)
  for qid in list(written["best_spans"])[:4]:  # the checkpoint + API path gives the loop's spans
    e = normans[qid]
    text, score, start, end = model.answer(e.question, e.context, null_threshold=None)
    assert text == written["best_spans"][qid] and e.context[start:end] == text and text
    selected = model.answer(e.question, e.context)
    assert selected.text == ("" if written["null_odds"][qid] > model.null_threshold else text)
    empty = model.answer(e.question, e.context, null_threshold=-1e30)
    assert (empty.text, empty.start, empty.end) == ("", 0, 0) and math.isclose(empty.score, score + written[
        "null_odds"][qid], rel_tol=1e-4, abs_tol=1e-4)
  context = "  " + normans[qid].context  # offsets index the context as given
  got = model.answer(normans[qid].question, context, null_threshold=None)
  assert context[got.start:got.end] == got.text and got.start >= 2
  with pytest.raises(ValueError, match="use answer"):
    model.predict(["a"])


def test_rerun_skips_finished_seeds_and_refuses_another_config(finetuned):
  config, workdir, results = finetuned
  again = loop.run(config, str(workdir))
  assert again["per_seed"] == json.loads(json.dumps(results["per_seed"]))
  changed = config.copy_and_resolve_references()
  changed.squad.n_best = 5
  with pytest.raises(ValueError, match="different config"):
    loop.run(changed, str(workdir))


def test_scratch_run_builds_a_sentencepiece_tokenizer_on_the_training_articles(shared_data):
  config = quick_config(scratch_size="tiny", scratch_vocab_size=500)
  task, init = loop.prepare(config)
  assert isinstance(task, squad_task.SquadTask) and init.encoder is None
  assert init.tokenizer.kind == "sentencepiece" and init.model_config.vocab_size == 500
  encoded = task.encode(init.tokenizer, config.seq_len)
  assert set(encoded) == {"train", "validation"} and encoded["validation"].stats["questions"] == 60


def test_config_sweep_and_registry():
  module = config_lib.load_module("configs/finetune_squad.py")
  for task in config_lib.SQUAD_TASKS:
    config = module.get_config(f"task={task}")
    ft_config.validate_config(config, 8)
    ft_data.validate_task_config(config)
    assert config.finetune.task == task and config.squad.train_sources[0].startswith(f"tfds:squad/")
    assert squad_task.VERSIONS[task] in reader.VERSIONS
  defaults = config_lib.squad_config()
  assert (defaults.doc_stride, defaults.max_query_length, defaults.n_best, defaults.max_answer_length) == (
      128, 64, 20, 30)
  config = module.get_config()
  assert (config.seq_len, config.batch_size, config.learning_rate, config.warmup_ratio) == (384, 32, 2e-5, 0.0625)
  sweep = module.get_sweep()
  assert len(sweep) == 6 and all(key in config for d in sweep for key in d)
  with pytest.raises(ValueError, match="unknown SQuAD task"):
    module.get_config("task=squad")
  with pytest.raises(ValueError, match="use task=squad_v2 with quick"):
    module.get_config("task=squad_v1,quick")
  bad = config_lib.finetune_config("squad_v3")
  with pytest.raises(ValueError, match="unknown fine-tuning task 'squad_v3'.*squad_v2"):
    ft_data.validate_task_config(bad)
  with pytest.raises(ValueError, match="needs a config.squad block"):
    ft_data.validate_task_config(config_lib.finetune_config("squad_v2"))


@pytest.mark.parametrize("field, value, message", [
    ("seq_len", 40, "no room for context"), ("squad.doc_stride", 0, "doc_stride=0"),
    ("squad.n_best", 0, "squad.n_best=0"), ("squad.eval_sources", (), "squad.eval_sources is empty")])
def test_bad_squad_fields_fail_in_one_line(field, value, message):
  config = config_lib.load("configs/finetune_squad.py:quick")
  config_lib.override(config, field, str(value) if not isinstance(value, tuple) else "()")
  with pytest.raises(ValueError, match=message):
    ft_data.validate_task_config(config)


def test_overlapping_articles_and_wrong_versions_are_refused(shared_data):
  config = config_lib.load("configs/finetune_squad.py:quick")
  config.squad.eval_articles = ("Normans", "Rhine")
  with pytest.raises(ValueError, match=r"articles \['Rhine'\] are in both"):
    ft_data.load_task(config)
  config = config_lib.load("configs/finetune_squad.py:task=squad_v1")
  config.squad.train_sources = config.squad.eval_sources = SOURCES
  with pytest.raises(ValueError, match="hold SQuAD v2.0 but the task wants v1.1; use task=squad_v2"):
    ft_data.load_task(config)


def test_run_card_fingerprints_the_squad_files_and_counts_the_span_head(shared_data, finetuned):
  config, workdir, results = finetuned
  card = json.loads((workdir / "run_card.json").read_text())
  sources = ft_data.load_task(config).sources()
  digest = hashlib.sha256(b"".join(pathlib.Path(s).read_bytes() for s in sources)).hexdigest()
  assert card["kind"] == "finetune" and card["objective"] == "mlm" and card["data"]["content_sha256"] == digest
  steps = sum(r["total_steps"] for r in results["per_seed"])
  assert card["steps"] == steps
  d, seq_len = card["encoder"]["d_model"], config.seq_len
  encoder = card["train_flops"] / steps / config.batch_size - 3 * 2 * 2 * d * seq_len  # two D -> 1 scorers per slot
  assert encoder == pytest.approx(ft_card.flops_per_step(
      ModelConfig(**card["encoder"]), 1, seq_len, 0.0), rel=1e-9)
