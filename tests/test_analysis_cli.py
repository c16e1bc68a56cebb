"""The analysis CLI on tiny MLM / MAE-LM / ExLM workdirs trained for 2 steps (built once per session)."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from exlm_jax import config_lib, run_card, run_store
from exlm_jax.analysis import __main__ as cli
from exlm_jax.analysis import dag_view, entropy, inputs, rank_tool, report
from exlm_jax.data import vocab
from exlm_jax.objectives import base, dag, masking

SMILES_FILE = "rdkit:NCI/first_5K.smi"
OBJECTIVES = ("mlm", "maelm", "exlm")
def _tiny_config(objective: str):
  config = config_lib.load(f"configs/quickstart.py:objective={objective}")
  config.total_steps, config.batch_size, config.seq_len = 2, 8, 48
  config.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64)
  config.eval_batches, config.log_every, config.eval_every, config.checkpoint_every = 1, 1, 2, 2
  config.data.max_examples = 400
  return config


def _random_workdir(path: pathlib.Path, config, tokenizer, seed: int = 0) -> str:
  """What train/loop.py leaves in a workdir, with N(0, 0.02) params filled on the host (no compile)."""
  from exlm_jax.train import checkpoint, loop, partitioning, steps  # pylint: disable=g-import-not-at-top
  config = loop.with_vocab_size(config, tokenizer.vocab_size)
  config.async_checkpointing = False
  abstract = steps.TrainSetup.create(config, partitioning.create_mesh(config.mesh)).abstract_state()
  rng = np.random.default_rng(seed)
  fill = lambda p, x: (np.ones(x.shape, x.dtype) if p[-1].key == "scale"  # noqa: E731
                       else rng.normal(0.0, 0.02, x.shape).astype(x.dtype))
  state = steps.TrainState(step=np.zeros(abstract.step.shape, abstract.step.dtype),
                           params=jax.tree_util.tree_map_with_path(fill, abstract.params),
                           opt_state=jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract.opt_state))
  manager = checkpoint.make_manager(str(path / "checkpoints"), config)
  checkpoint.save(manager, 2, state, force=True)
  manager.wait_until_finished()
  manager.close()
  checkpoint.write_json(str(path / "config.json"), config.to_dict())
  tokenizer.save(path / "tokenizer")
  return str(path)


def _card_summary(card: dict) -> dict:
  """A run card's data section as the data summary build_card reads."""
  data = card["data"]
  return {"source": data["path"], "content_sha256": data["content_sha256"], "tokenizer": data["tokenizer"],
          "vocab_size": data["vocab_size"], "train_records": data["records"],
          "max_example_len": data["max_example_len"]}


def _write_missing_cards(out: dict, tokenizer) -> None:
  """Cards for workdirs that have none (the random ones; the trained one until the trainer writes its own): the
  trained run's data and steps, so the runs differ only where their configs do."""
  reference = run_card.read_card(out["mlm"])
  summary = (_card_summary(reference) if reference else
             {"source": SMILES_FILE, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size})
  steps = reference["steps"] if reference else 2
  for workdir in out.values():
    if run_card.read_card(workdir) is None:
      config = run_store.read_json(os.path.join(workdir, run_store.CONFIG_FILE))
      run_card.write_card(workdir, run_card.build_card("pretrain", config, summary, {"step": steps, "wall_time_s": 1.0},
                                                       "test"))


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
  """{objective: workdir}: MLM trained by train_and_evaluate (2 steps); MAE-LM and ExLM written directly
  with random params in the same layout and the MLM run's tokenizer (training all three costs ~60 s more of
  compiles on 2 cores). MLM and ExLM share the quickstart encoder (matched runs); MAE-LM's is post-LN."""
  pytest.importorskip("rdkit")
  from exlm_jax.train import loop  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("analysis_runs")
  old = os.environ.get("EXLM_TFDS_DIR")
  os.environ["EXLM_TFDS_DIR"] = str(root / "tfds")
  try:
    loop.train_and_evaluate(_tiny_config("mlm"), str(root / "mlm"))
  finally:
    if old is None:
      os.environ.pop("EXLM_TFDS_DIR", None)
    else:
      os.environ["EXLM_TFDS_DIR"] = old
  tokenizer = run_store.load_tokenizer(root / "mlm")
  # The quickstart packs its blocks: the same data resolves the same examples-per-block bound for every run.
  bound = run_store.read_json(root / "mlm" / run_store.CONFIG_FILE)["data"]["max_examples_per_block"]
  out = {"mlm": str(root / "mlm")}
  for objective in ("maelm", "exlm"):
    config = _tiny_config(objective)
    config.data.max_examples_per_block = bound
    out[objective] = _random_workdir(root / objective, config, tokenizer)
  _write_missing_cards(out, tokenizer)
  return out


def _cli(*argv):
  assert cli.main([str(a) for a in argv]) == 0


def _check_outputs(out_dir, name, pngs=None):
  with open(os.path.join(out_dir, f"{name}.json")) as f:
    result = json.load(f)
  for png in pngs or [f"{name}.png"]:
    path = os.path.join(out_dir, png)
    assert os.path.getsize(path) > 1000, path
  return result


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_effective_rank_and_entropy_cli(runs, objective, tmp_path):
  _cli("effective_rank", "--workdir", runs[objective], "--data", SMILES_FILE, "--out", tmp_path,
       "--max_sequences", 40, "--batch_size", 8)
  result = _check_outputs(tmp_path, "effective_rank", ["effective_rank.png", "effective_rank_per_sequence.png"])
  groups = {"mlm": {"masked_input/real", "clean_input/real", "masked_input/mask"},
            "maelm": {"clean_input/real", "encoder_compact/real"}, "exlm": {"clean_input/real"}}[objective]
  assert set(result["corpus"]) == groups == set(result["per_sequence"]) == set(result["corpus_centred"])
  assert result["settings"]["energy"] == 0.9 and result["settings"]["normalisation"] == "layernorm"
  for row in result["corpus"].values():
    assert row["layer"] == [0, 1] and all(1 <= r <= 32 for r in row["rank"])
  if objective == "mlm":
    assert all(0.0 <= v <= 1.0 for v in result["mask_out_of_span"]["mask_out_of_span_energy"])
    assert result["mask_group"]["rows"] >= 20 * 32 or result["warnings"]

  _cli("entropy", "--workdir", runs[objective], "--data", SMILES_FILE, "--out", tmp_path,
       "--max_sequences", 24, "--batch_size", 8, "--mask_ratios", "0.15,0.5")
  result = _check_outputs(tmp_path, "entropy")
  variants = {"masked"} if objective != "exlm" else {"state", "path", "mixture"}
  assert set(result["entropy"]) == variants
  assert result["block_len"] == result["block_len_limit"]  # one length for both ratios
  for values in result["entropy"].values():
    assert len(values) == 2 and all(0.0 < v <= result["log_vocab"] + 1e-4 for v in values)


def _layer_norm(rows):
  """float64 numpy reference: each row standardised over its features."""
  centred = rows - rows.mean(-1, keepdims=True)
  return centred / np.sqrt((centred**2).mean(-1, keepdims=True))


@pytest.mark.parametrize("normalise", ["layernorm", "none"])
def test_effective_rank_equals_direct_svd(runs, tmp_path, normalise):
  run = inputs.load_run(runs["maelm"])
  blocks = inputs.load_data_blocks(SMILES_FILE, run, max_sequences=20)
  result = rank_tool.analyse(run, SMILES_FILE, str(tmp_path), energy=0.9, modes=("corpus",), blocks=blocks,
                                  batch_size=8, normalise=normalise)
  assert result["settings"]["normalisation"] == normalise
  # Independent forward: the encoder on the clean blocks, every layer, real tokens only.
  encoder = run.encoder()
  _, hidden = encoder.apply({"params": run.params["encoder"]}, blocks, padding_mask=blocks == vocab.PAD,
                            return_hidden_states=True)
  real = ~np.isin(blocks, vocab.UNMASKABLE)
  def svd_rank(rows):
    s = np.linalg.svd(rows, compute_uv=False)
    return int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.9 - 1e-12) + 1)

  for layer in (0, 1):
    rows = np.asarray(hidden[layer], np.float64)[real]
    rows = _layer_norm(rows) if normalise == "layernorm" else rows
    assert result["corpus"]["clean_input/real"]["rank"][layer] == svd_rank(rows)
    assert result["corpus_centred"]["clean_input/real"]["rank"][layer] == svd_rank(rows - rows.mean(0))
    assert result["corpus"]["clean_input/real"]["num_rows"][layer] == rows.shape[0]


def test_clean_input_rows_identical_across_objectives(runs):
  """Every objective's encoder is ranked on the same token set: all real tokens of the same clean blocks."""
  blocks = inputs.load_data_blocks(SMILES_FILE, inputs.load_run(runs["mlm"]), max_sequences=20)
  real = ~np.isin(blocks, vocab.UNMASKABLE)
  for objective in OBJECTIVES:
    rows = [r for group, _, r in rank_tool.collect_states(inputs.load_run(runs[objective]), blocks, 8)
            if group == base.CLEAN_INPUT]
    np.testing.assert_array_equal(np.concatenate(rows)[:len(blocks)], real)
    assert np.concatenate(rows)[len(blocks):].sum() == 0  # the last batch's padding rows count for nothing


def test_mask_group_drawn_to_twenty_times_d(runs, tmp_path, capsys):
  run = inputs.load_run(runs["mlm"])
  blocks = inputs.load_data_blocks(SMILES_FILE, run, max_sequences=24)
  result = rank_tool.analyse(run, SMILES_FILE, str(tmp_path), modes=("corpus",), blocks=blocks, batch_size=8)
  # Independent count: the pretraining rule's masks, draw after draw, until 20 x d = 640 rows.
  per_draw, batches = [], list(inputs.batches(blocks, 8))
  while sum(per_draw) < 640:
    per_draw.append(sum(int(inputs.select_masks(t, run.config.mask_prob, 0, len(per_draw) * len(batches) + i)
                            .is_masked.sum()) for i, t in batches))
  assert len(per_draw) > 1  # one draw of 24 molecules is not enough: the test exercises the redraw
  assert result["mask_group"] == {"group": "masked_input/mask", "rows": sum(per_draw), "draws": len(per_draw),
                                  "target_rows": 640}
  assert result["corpus"]["masked_input/mask"]["num_rows"][0] == sum(per_draw)
  assert result["warnings"] == []
  capsys.readouterr()
  few = rank_tool.analyse(run, SMILES_FILE, str(tmp_path), modes=("corpus",), blocks=blocks, batch_size=8,
                               max_mask_draws=1)
  assert few["mask_group"]["rows"] == per_draw[0] and len(few["warnings"]) == 1
  assert capsys.readouterr().err.count("warning: ") == 1 and "< 20 x d = 640" in few["warnings"][0]


def test_dag_view_path_equals_dag_best_path(runs, tmp_path):
  _cli("dag_view", "--workdir", runs["exlm"], "--data", SMILES_FILE, "--index", 3, "--out", tmp_path)
  result = _check_outputs(tmp_path, "dag_view")
  run = inputs.load_run(runs["exlm"])
  tokens, is_masked = dag_view.dag_view_inputs(run, SMILES_FILE, index=3)
  model = run.model()
  forward = jax.jit(lambda p, t, k: model.apply({"params": p}, t, k, method=lambda m, t, k: m.forward(t, k)))
  out = forward(run.params, tokens, is_masked)
  ex = out.expansion
  _, path = jax.jit(dag.dag_best_path)(out.emit_logp, out.trans_logp, ex.num_targets, ex.num_vertices)
  num_states = int(ex.num_vertices[0])
  assert result["path"] == np.asarray(jax.device_get(path))[0, :num_states].tolist()
  assert result["masked_slots"] == np.flatnonzero(is_masked[0]).tolist()
  assert len(result["targets"]) == int(ex.num_targets[0]) == len(result["masked_slots"]) + 2
  assert [s["input_slot"] for s in result["states"] if s["copy"] == 1] == [0, *result["masked_slots"],
                                                                          len(result["input_tokens"]) - 1]
  emitted = [s["emits_token"] for s in result["states"] if s["emits_target"] >= 0]
  assert emitted == result["targets"]  # the path visits each target once, in order

  _cli("dag_view", "--workdir", runs["exlm"], "--smiles", "CCOc1ccccc1", "--mask_positions", "2,4",
       "--out", tmp_path / "smiles")
  result = _check_outputs(tmp_path / "smiles", "dag_view")
  assert result["masked_slots"] == [2, 4] and result["targets"][1:3] == result["input_tokens"][2:5:2]


def test_repeated_mlm_cli(runs, tmp_path):
  _cli("repeated_mlm", "--workdir", runs["mlm"], "--data", SMILES_FILE, "--out", tmp_path, "--fixed", "corrupted",
       "--ratio", "0.2", "--ks", "1,2,4", "--max_sequences", 200)
  result = _check_outputs(tmp_path, "repeated_mlm")
  assert [p["k"] for p in result["points"]] == [1, 2, 4]
  for point in result["points"]:
    assert point["expected_corrupted_ratio"] == pytest.approx(0.2)
    assert point["measured_unreal_ratio"] == pytest.approx(point["p"], abs=0.03)
    assert point["measured_corrupted_ratio"] == pytest.approx(0.2, abs=0.03)


def _exlm_limit(run, ratio, width):
  """Brute force: the longest n <= width with n + (k - 1) (min(ceil(ratio n) + 2, n)) <= the link table."""
  k, table = run.model().num_copies, run.model().max_link_positions
  return max(n for n in range(4, width + 1) if n + (k - 1) * min(masking.max_masked(ratio, n) + 2, n) <= table)


def test_report_cli(runs, tmp_path, capsys):
  _cli("report", "--workdirs", *[runs[o] for o in OBJECTIVES], "--data", SMILES_FILE, "--out", tmp_path,
       "--max_sequences", 8, "--batch_size", 8, "--mask_ratios", "0.15,0.5", "--allow_mismatch")
  printed = capsys.readouterr().out
  result = _check_outputs(tmp_path, "report", ["effective_rank_all.png", "entropy_all.png"])
  text = open(result["report"]).read()
  for objective in OBJECTIVES:
    assert f"| {objective} | {objective} |" in text
    assert os.path.getsize(tmp_path / objective / "effective_rank.png") > 1000
  assert "## Entropy at masked positions" in text and "exlm: mixture" in text and "## Headline" in text
  # The cards side by side, and what differs (MAE-LM's encoder) printed and in the report.
  assert "| field | mlm | maelm | exlm |" in printed and "| objective | mlm | maelm | exlm |" in text
  assert "mismatch: encoder.pre_ln: True (mlm) vs False (maelm)" in printed
  assert "- encoder.positions: rope2d (mlm) vs absolute+relbias (maelm)" in text
  assert not any("(exlm)" in line for line in result["mismatches"])  # ExLM has MLM's encoder, data and budget
  head = result["headline"]
  assert head["exlm"]["entropy_variant"] == "mixture" and head["maelm"]["entropy_variant"] == "masked"
  ranks = result["effective_rank"]["mlm"]
  assert head["mlm"]["rank_last_layer/masked_input/uncentred"] == ranks["corpus"]["masked_input/real"]["rank"][-1]
  assert head["mlm"]["rank_last_layer/clean_input/centred"] == ranks["corpus_centred"]["clean_input/real"]["rank"][-1]
  assert "rank_last_layer/masked_input/centred" not in head["maelm"]
  assert "## Effective rank (corpus, centred)" in text
  assert result["entropy"]["mlm"]["step"] == 2 and result["effective_rank"]["exlm"]["step"] == 2
  # Identical rows and block lengths for every objective.
  rows = {o: result["effective_rank"][o]["per_sequence"]["clean_input/real"]["num_rows"] for o in OBJECTIVES}
  assert rows["mlm"] == rows["maelm"] == rows["exlm"]
  width = result["effective_rank"]["mlm"]["seq_len"]
  exlm_run = inputs.load_run(runs["exlm"])
  expected = min(width, _exlm_limit(exlm_run, 0.15, width), _exlm_limit(exlm_run, 0.5, width))
  assert expected < width  # the ExLM link table really binds at ratio 0.5
  assert {result["entropy"][o]["block_len"] for o in OBJECTIVES} == {expected} == {result["entropy_block_len"]}


def test_entropy_block_len_beyond_the_link_table_is_refused(runs, tmp_path):
  run = inputs.load_run(runs["exlm"])
  blocks = inputs.load_data_blocks(SMILES_FILE, run, max_sequences=8)
  limit = _exlm_limit(run, 0.5, blocks.shape[1])
  assert entropy.block_length_limit(run, [0.15, 0.5], blocks.shape[1]) == limit
  assert entropy.block_length_limit(inputs.load_run(runs["mlm"]), [0.15, 0.5], blocks.shape[1]) == blocks.shape[1]
  with pytest.raises(ValueError, match=f"block length {limit + 1} is longer than exlm can score"):
    entropy.analyse(run, SMILES_FILE, str(tmp_path), [0.5], blocks=blocks, block_len=limit + 1)


def test_report_refuses_unmatched_runs(runs, tmp_path, capsys):
  names, workdirs = ["mlm", "exlm"], [runs["mlm"], runs["exlm"]]
  cards, mismatches = report.check_cards(names, workdirs)
  assert mismatches == [] and cards["exlm"]["encoder_fingerprint"] == cards["mlm"]["encoder_fingerprint"]
  assert cli.main(["report", "--workdirs", runs["mlm"], runs["maelm"], "--data", SMILES_FILE,
                   "--out", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: runs are not matched: encoder.")
  assert "encoder.embed_layernorm: False (mlm) vs True (maelm)" in err and "--allow_mismatch" in err
  assert not (tmp_path / "report.md").exists()  # refused before any analysis
  old = tmp_path / "old_run"
  old.mkdir()
  for item in ("config.json", "tokenizer", "checkpoints"):
    src = pathlib.Path(runs["exlm"]) / item
    (shutil.copytree if src.is_dir() else shutil.copy)(src, old / item)
  assert cli.main(["report", "--workdirs", runs["exlm"], str(old), "--data", SMILES_FILE, "--out", str(tmp_path)]) == 1
  assert "old_run: no run_card.json (a run from before run cards)" in capsys.readouterr().err
  cards, mismatches = report.check_cards(["exlm", "old_run"], [runs["exlm"], str(old)], allow_mismatch=True)
  assert cards["old_run"] is None and len(mismatches) == 1
  assert report.check_cards(["old_run"], [str(old)])[1] == mismatches  # one run: said, not refused


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
  assert cli.main(["dag_view", "--workdir", runs["mlm"], "--smiles", "CCO", "--out", str(tmp_path)]) == 1
  assert "needs an ExLM workdir" in capsys.readouterr().err
  assert cli.main(["entropy", "--workdir", str(tmp_path), "--data", SMILES_FILE, "--out", str(tmp_path)]) == 1
