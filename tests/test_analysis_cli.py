"""The analysis CLI on tiny MLM / MAE-LM / ExLM workdirs trained for 2 steps (built once per session)."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from exlm_jax import config_lib
from exlm_jax.analysis import __main__ as cli
from exlm_jax.analysis import dag_view, effective_rank, inputs
from exlm_jax.data import vocab
from exlm_jax.objectives import dag

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


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
  """{objective: workdir}: MLM trained by train_and_evaluate (2 steps); MAE-LM and ExLM written directly
  with random params in the same layout (training all three costs ~60 s more of compiles on 2 cores)."""
  pytest.importorskip("rdkit")
  from exlm_jax.data import builders, tokenizers  # pylint: disable=g-import-not-at-top
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
  records = builders.read_records(builders.resolve_source(SMILES_FILE), kind="smiles")
  tokenizer = tokenizers.SmilesRegexTokenizer.build([r for r, _ in zip(records, range(1000))])
  out = {"mlm": str(root / "mlm")}
  for objective in ("maelm", "exlm"):
    out[objective] = _random_workdir(root / objective, _tiny_config(objective), tokenizer)
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
            "maelm": {"encoder_clean/real", "encoder_compact/real"}, "exlm": {"encoder_clean/real"}}[objective]
  assert set(result["corpus"]) == groups == set(result["per_sequence"]) == set(result["corpus_centred"])
  assert result["settings"]["energy"] == 0.9
  for row in result["corpus"].values():
    assert row["layer"] == [0, 1] and all(1 <= r <= 32 for r in row["rank"])
  if objective == "mlm":
    assert all(0.0 <= v <= 1.0 for v in result["mask_out_of_span"]["mask_out_of_span_energy"])

  _cli("entropy", "--workdir", runs[objective], "--data", SMILES_FILE, "--out", tmp_path,
       "--max_sequences", 24, "--batch_size", 8, "--mask_ratios", "0.15,0.5")
  result = _check_outputs(tmp_path, "entropy")
  variants = {"masked"} if objective != "exlm" else {"state", "path", "mixture"}
  assert set(result["entropy"]) == variants
  for values in result["entropy"].values():
    assert len(values) == 2 and all(0.0 < v <= result["log_vocab"] + 1e-4 for v in values)


def test_effective_rank_equals_direct_svd(runs, tmp_path):
  run = inputs.load_run(runs["maelm"])
  blocks = inputs.load_data_blocks(SMILES_FILE, run, max_sequences=20)
  result = effective_rank.analyse(run, SMILES_FILE, str(tmp_path), energy=0.9, modes=("corpus",), blocks=blocks,
                                  batch_size=8)
  # Independent forward: the encoder on the clean blocks, layer 1, real tokens only.
  encoder = run.encoder()
  _, hidden = encoder.apply({"params": run.params["encoder"]}, blocks, padding_mask=blocks == vocab.PAD,
                            return_hidden_states=True)
  real = ~np.isin(blocks, vocab.UNMASKABLE)
  def svd_rank(rows):
    s = np.linalg.svd(rows, compute_uv=False)
    return int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.9 - 1e-12) + 1)

  for layer in (0, 1):
    rows = np.asarray(hidden[layer], np.float64)[real]
    assert result["corpus"]["encoder_clean/real"]["rank"][layer] == svd_rank(rows)
    assert result["corpus_centred"]["encoder_clean/real"]["rank"][layer] == svd_rank(rows - rows.mean(0))
    assert result["corpus"]["encoder_clean/real"]["num_rows"][layer] == rows.shape[0]


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


def test_report_cli(runs, tmp_path):
  _cli("report", "--workdirs", *[runs[o] for o in OBJECTIVES], "--data", SMILES_FILE, "--out", tmp_path,
       "--max_sequences", 8, "--batch_size", 8, "--mask_ratios", "0.15")
  result = _check_outputs(tmp_path, "report", ["effective_rank_all.png", "entropy_all.png"])
  text = open(result["report"]).read()
  for objective in OBJECTIVES:
    assert f"| {objective} | {objective} |" in text
    assert os.path.getsize(tmp_path / objective / "effective_rank.png") > 1000
  assert "## Entropy at masked positions" in text and "exlm: mixture" in text and "## Headline" in text
  head = result["headline"]
  assert head["exlm"]["entropy_variant"] == "mixture" and head["maelm"]["entropy_variant"] == "masked"
  ranks = result["effective_rank"]["mlm"]
  assert head["mlm"]["rank_last_layer/masked_input/uncentred"] == ranks["corpus"]["masked_input/real"]["rank"][-1]
  assert head["mlm"]["rank_last_layer/clean_input/centred"] == ranks["corpus_centred"]["clean_input/real"]["rank"][-1]
  assert "rank_last_layer/masked_input/centred" not in head["maelm"]
  assert "## Effective rank (corpus, centred)" in text
  assert result["entropy"]["mlm"]["step"] == 2 and result["effective_rank"]["exlm"]["step"] == 2


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
  assert cli.main(["dag_view", "--workdir", runs["mlm"], "--smiles", "CCO", "--out", str(tmp_path)]) == 1
  assert "needs an ExLM workdir" in capsys.readouterr().err
  assert cli.main(["entropy", "--workdir", str(tmp_path), "--data", SMILES_FILE, "--out", str(tmp_path)]) == 1
