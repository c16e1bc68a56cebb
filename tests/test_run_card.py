"""Run cards (exlm_jax/run_card.py): fields, fingerprints, resumes, comparison and the side-by-side table."""

import hashlib
import json

import ml_collections
import pytest

from exlm_jax import config_lib, run_card, run_store
from exlm_jax.train import flops

SUMMARY = {"source": "$DATA/smiles/moses/train.csv.gz", "content_sha256": "ab" * 32, "tokenizer": "smiles_regex",
           "vocab_size": 40, "train_records": 1000, "eval_records": 20, "max_example_len": 57}


def _config(objective="mlm", **model):
  config = config_lib.pretrain_config(objective, "tiny")
  config.model.update({"vocab_size": 40, **model})
  config.batch_size, config.seq_len = 16, 64
  return config


def _card(config=None, summary=None, step=100, wall=12.5, previous=None, **perf):
  return run_card.build_card("pretrain", config or _config(), summary or SUMMARY,
                             {"step": step, "wall_time_s": wall, **perf}, "8 x cpu (cpu)", previous)


def test_card_fields_from_config_summary_and_perf():
  config = _config()
  card = _card(config, real_tokens_seen=70_000)
  assert list(card) == list(run_card.FIELDS)
  assert card["kind"] == "pretrain" and card["objective"] == "mlm" and card["device"] == "8 x cpu (cpu)"
  assert card["budget"] == "steps" and card["matched_to"] is None  # a config without budget fields
  assert card["data"] == {"path": SUMMARY["source"], "content_sha256": "ab" * 32, "tokenizer": "smiles_regex",
                          "vocab_size": 40, "records": 1000, "max_example_len": 57}
  assert card["steps"] == 100 and card["tokens_seen"] == 100 * 16 * 64
  assert card["real_tokens_seen"] == 70_000 and card["wall_time_s"] == 12.5
  assert card["train_flops"] == pytest.approx(100 * flops.train_flops_per_step(config))
  model = config.model.to_dict()
  assert {k: card["encoder"][k] for k in model if k in card["encoder"]} == {
      k: v for k, v in model.items() if k != "size"}
  # The fingerprint is sha256 of the sorted-key JSON of the architecture fields, computed here by hand.
  arch = {k: v for k, v in model.items() if k not in (
      "size", "dropout_rate", "attention_dropout_rate", "dtype", "remat", "scan_layers", "attention_impl")}
  arch.update({k: v for k, v in card["encoder"].items() if k not in model and k not in run_card.NON_ARCHITECTURE})
  expected = hashlib.sha256(json.dumps(arch, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
  assert card["encoder_fingerprint"] == expected


def test_producers_not_there_yet_give_none():
  summary = {k: v for k, v in SUMMARY.items() if k not in ("content_sha256", "max_example_len")}
  config = _config()
  config.budget = "equal_flops"
  config.matched_to = ml_collections.ConfigDict(dict(objective="exlm", options={"num_copies": 4}, total_steps=100))
  card = _card(config, summary, flops_per_step=2.0)
  assert card["data"]["content_sha256"] is None and card["data"]["max_example_len"] is None
  assert card["real_tokens_seen"] is None and card["train_flops"] == 200.0
  assert card["budget"] == "equal_flops" and card["matched_to"] == {
      "objective": "exlm", "options": {"num_copies": 4}, "total_steps": 100}
  with pytest.raises(ValueError, match="wall_time_s"):
    run_card.build_card("pretrain", config, summary, {"step": 3}, "cpu")
  with pytest.raises(ValueError, match="kind"):
    run_card.build_card("eval", config, summary, {"step": 3, "wall_time_s": 1.0}, "cpu")


@pytest.mark.parametrize("field,value", [("dropout_rate", 0.0), ("attention_dropout_rate", 0.3),
                                         ("dtype", "bfloat16"), ("remat", "full"), ("scan_layers", True),
                                         ("attention_impl", "cudnn")])
def test_encoder_fingerprint_ignores_how_it_computes(field, value):
  assert _card(_config(**{field: value}))["encoder_fingerprint"] == _card()["encoder_fingerprint"]


@pytest.mark.parametrize("field,value", [("d_model", 512), ("pre_ln", False), ("positions", "absolute+relbias"),
                                         ("num_layers", 7), ("vocab_size", 41), ("layernorm_eps", 1e-6)])
def test_encoder_fingerprint_changes_with_the_architecture(field, value):
  card = _card(_config(**{field: value}))
  assert card["encoder_fingerprint"] != _card()["encoder_fingerprint"]
  assert run_card.compare_cards({"a": _card(), "b": card}) == [
      f"encoder.{field}: {_card()['encoder'][field]} (a) vs {value} (b)"]


def test_data_fingerprint_is_the_content_when_known():
  moved = {**SUMMARY, "source": "/elsewhere/train.csv.gz"}
  assert _card(summary=moved)["data_fingerprint"] == _card()["data_fingerprint"]
  unknown = {**SUMMARY, "content_sha256": None}
  assert (_card(summary=unknown)["data_fingerprint"]
          != _card(summary={**unknown, "source": "/elsewhere/train.csv.gz"})["data_fingerprint"])
  fewer = _card(summary={**SUMMARY, "train_records": 999})
  assert run_card.compare_cards([_card(), fewer]) == ["data.records: 1000 (run 0) vs 999 (run 1)"]
  edited = _card(summary={**SUMMARY, "content_sha256": "cd" * 32, "source": "/x.csv"})
  assert run_card.compare_cards([_card(), edited]) == [
      f"data.content_sha256: {'ab' * 32} (run 0) vs {'cd' * 32} (run 1)",
      f"data.path: {SUMMARY['source']} (run 0) vs /x.csv (run 1)"]


def test_resume_sums_wall_time_and_real_tokens():
  first = _card(step=100, wall=10.0, real_tokens_seen=5000)
  second = _card(step=250, wall=4.0, previous=first, real_tokens_seen=7000)
  assert second["wall_time_s"] == 14.0 and second["real_tokens_seen"] == 12_000 and second["steps"] == 250
  assert second["tokens_seen"] == 250 * 16 * 64
  assert _card(step=300, wall=1.0, previous=_card(), real_tokens_seen=10)["real_tokens_seen"] is None


def test_budget_comparison():
  exlm = _card(_config("exlm"), step=1000)
  per_step = flops.train_flops_per_step(_config("exlm")) / flops.train_flops_per_step(_config("mlm"))
  matched_steps = _card(step=1000)
  assert run_card.compare_cards({"exlm": exlm, "mlm": matched_steps}) == []
  plus_config = _config()
  plus_config.budget = "equal_flops"
  plus = _card(plus_config, step=round(1000 * per_step))  # MLM++: the step count with ExLM's FLOPs
  assert run_card.compare_cards({"exlm": exlm, "mlm++": plus}) == []
  short = _card(plus_config, step=round(1000 * per_step) - 2)
  [difference] = run_card.compare_cards({"exlm": exlm, "mlm++": short})
  assert difference.startswith("train_flops: ") and "(budget steps vs equal_flops)" in difference
  assert run_card.compare_cards({"exlm": exlm, "mlm": _card(step=999)}) == [
      "steps: 1000 (exlm) vs 999 (mlm) (budget steps vs steps)",
      f"tokens_seen: {1000 * 16 * 64} (exlm) vs {999 * 16 * 64} (mlm) (budget steps vs steps)"]
  wide = _config()
  wide.batch_size = 32
  assert run_card.compare_cards({"exlm": exlm, "mlm": _card(wide, step=1000)}) == [
      f"tokens_seen: {1000 * 16 * 64} (exlm) vs {1000 * 32 * 64} (mlm) (budget steps vs steps)"]


def test_write_read_update_and_tampering(tmp_path):
  assert run_card.read_card(tmp_path) is None
  card = _card()
  path = run_card.write_card(tmp_path, card)
  assert path == tmp_path / run_store.RUN_CARD_FILE and run_card.read_card(tmp_path) == card
  assert run_store.read_run_card(tmp_path) == card
  config = _config()
  updated = run_card.update_card(tmp_path, "pretrain", config, SUMMARY, {"step": 300, "wall_time_s": 2.5})
  assert updated["wall_time_s"] == card["wall_time_s"] + 2.5 and updated["steps"] == 300
  assert updated["device"] == run_card.describe_devices() and run_card.read_card(tmp_path) == updated
  tampered = {**updated, "encoder": {**updated["encoder"], "d_model": 1}}
  run_store.write_json(path, tampered)
  with pytest.raises(ValueError, match="fingerprint does not match"):
    run_card.read_card(tmp_path)
  run_store.write_json(path, {k: v for k, v in updated.items() if k != "steps"})
  with pytest.raises(ValueError, match=r"missing fields \['steps'\]"):
    run_card.read_card(tmp_path)


def test_cards_side_by_side():
  text = run_card.cards_markdown({"exlm": _card(_config("exlm")), "mlm": _card(), "old_run": None})
  lines = text.splitlines()
  assert lines[0] == "| field | exlm | mlm | old_run |"
  assert "| objective | exlm | mlm | no run card |" in lines
  assert f"| encoder_fingerprint | {_card()['encoder_fingerprint'][:12]} | {_card()['encoder_fingerprint'][:12]} " \
         "| no run card |" in lines
  assert "| encoder.d_model | 32 | 32 | no run card |" in lines
  assert "| data.records | 1000 | 1000 | no run card |" in lines
  assert "| real_tokens_seen | - | - | no run card |" in lines
