"""Fine-tuning length (finetune/lengths.py): seq_len defaults to the pretraining run's longest example rounded up
to 8, over-long inputs are truncated or skipped and counted per split, and a learned position table asked for
positions pretraining never trained warns. The pretraining run is a real one (1 step of train_and_evaluate)."""

import dataclasses
import logging
import math

import numpy as np
import pandas as pd
import pytest

from exlm_jax import config_lib, run_card, run_store
from exlm_jax.data import readers
from exlm_jax.finetune import config as ft_config
from exlm_jax.finetune import encoding, handoff, lengths, loop
from exlm_jax.finetune.tasks import MOLECULENET

PRETRAIN_SEQ_LEN = 128  # longer than every molecule read, so max_example_len is not the block size


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
  """A 1-step MLM run on MAE-LM's encoder (learned absolute+relbias positions), with its run card."""
  pytest.importorskip("rdkit")
  from exlm_jax.train import loop as train_loop  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("length_pretrain")
  config = config_lib.load("configs/quickstart.py:method=maelm,objective=mlm")
  config.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64)
  config.total_steps, config.batch_size, config.seq_len = 1, 8, PRETRAIN_SEQ_LEN
  config.eval_batches, config.log_every, config.eval_every, config.checkpoint_every = 1, 1, 1, 1
  config.data.max_examples, config.data.tfds_dir = 300, str(root / "tfds")
  train_loop.train_and_evaluate(config, str(root / "run"))
  return root / "run"


def bbbp_config(init_from, **data):
  config = config_lib.load("configs/finetune_moleculenet.py:task=bbbp")
  config.init_from = str(init_from)
  config.data.max_train_examples, config.data.max_eval_examples = 160, 80
  config.data.update(data)
  return config


def raw_lengths(shared_data, split, tokenizer) -> np.ndarray:
  """Slots of each example of `split` (+2 for <s> </s>), re-read from the CSV by the split's row indices."""
  smiles = pd.read_csv(shared_data / MOLECULENET["bbbp"].path)["smiles"].str.strip().to_numpy()
  return np.array([len(tokenizer.encode(s)) + 2 for s in smiles[split.rows]])


def test_default_seq_len_is_the_pretraining_runs_longest_example_rounded_up_to_8(pretrain_run, shared_data):
  card = run_card.read_card(pretrain_run)
  longest = card["data"]["max_example_len"]
  tokenizer = run_store.load_tokenizer(pretrain_run)
  source = readers.resolve_source(config_lib.load("configs/quickstart.py").data.path)
  with open(source) as f:  # the records the run read (max_examples=300): "SMILES<tab>id" lines
    molecules = [line.split()[0] for _, line in zip(range(300), f)]
  assert 2 < longest <= max(len(tokenizer.encode(s)) + 2 for s in molecules) < PRETRAIN_SEQ_LEN
  config = bbbp_config(pretrain_run)
  assert config.seq_len == lengths.FROM_PRETRAINING
  _, init = loop.prepare(config)
  assert init.max_example_len == longest
  resolved = lengths.resolve_seq_len(config, init)
  assert resolved.seq_len == math.ceil(longest / 8) * 8 and config.seq_len == 0  # a copy; the input is kept
  config.seq_len = 40  # an explicit length wins
  assert lengths.resolve_seq_len(config, init).seq_len == 40

  scratch = dataclasses.replace(init, max_example_len=None)
  config.seq_len, config.init_from = 0, ""
  assert lengths.resolve_seq_len(config, scratch).seq_len == config_lib.FINETUNE_FALLBACK_SEQ_LEN
  config.init_from = str(pretrain_run)  # a run without a card: a one-line error, not a silent 128
  with pytest.raises(ValueError, match=r"has no run_card.json .*--config.seq_len=N"):
    lengths.resolve_seq_len(config, scratch)


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_overlong_inputs_are_counted_per_split_as_in_the_raw_data(pretrain_run, shared_data, overlong, capsys):
  config = bbbp_config(pretrain_run, overlong=overlong)
  task, init = loop.prepare(config)
  config = lengths.resolve_seq_len(config, init)
  fitted, report = task.fit_to_length(init, config)  # the Task protocol's entry, as the loop calls it
  seq_len = config.seq_len
  for name, split in task.data.splits.items():
    raw = raw_lengths(shared_data, split, init.tokenizer)
    counts = report["splits"][name]
    assert counts["examples"] == len(split) and counts["longest"] == raw.max()
    assert counts["overlong"] == (raw > seq_len).sum() and counts["overlong_share"] == pytest.approx((raw > seq_len).mean())
    _, cut = encoding.encode_examples(split.texts, init.tokenizer, seq_len)  # the encoder's own count
    assert cut == counts["overlong"]
    if overlong == "truncate":
      assert counts["truncated"] == counts["overlong"] and counts["skipped"] == 0 and fitted.data.splits[name] is split
      kept = np.minimum(raw, seq_len)
    else:
      assert counts["skipped"] == counts["overlong"] and counts["truncated"] == 0
      kept = raw[raw <= seq_len]
      left = fitted.data.splits[name]
      np.testing.assert_array_equal(left.rows, split.rows[raw <= seq_len])  # the same molecules, labels aligned
      np.testing.assert_array_equal(left.labels, split.labels[raw <= seq_len])
      assert (raw_lengths(shared_data, left, init.tokenizer) <= seq_len).all()
    assert counts["beyond_pretraining"] == (kept > init.max_example_len).sum()
  assert sum(c["overlong"] for c in report["splits"].values()) > 0  # BBBP has molecules longer than NCI's
  out = capsys.readouterr().out
  assert f"inputs over seq_len={seq_len} ({overlong}): train {report['splits']['train']['overlong']}/160" in out


def test_learned_positions_beyond_pretraining_warn_and_rope2d_does_not(pretrain_run, caplog, capsys):
  config = bbbp_config(pretrain_run)
  task, init = loop.prepare(config)
  task = task.data
  assert init.model_config.positions == "absolute+relbias"
  config = lengths.resolve_seq_len(config, init)
  with caplog.at_level(logging.WARNING):
    _, report = lengths.fit_to_length(task, init, config)
  beyond = {n: c["beyond_pretraining"] for n, c in report["splits"].items() if c["beyond_pretraining"]}
  assert beyond  # seq_len is max_example_len rounded up and longer molecules are truncated to it
  warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: learned positions")]
  assert len(warnings) == 1 and f"at most {init.max_example_len} slots" in warnings[0]
  assert all(f"{n} {k}" in warnings[0] for n, k in beyond.items()) and "learned positions" in caplog.text

  rope = dataclasses.replace(init, model_config=dataclasses.replace(init.model_config, positions="rope2d"))
  lengths.fit_to_length(task, rope, config)
  assert "WARNING" not in capsys.readouterr().out
  config.seq_len = init.max_example_len  # within what pretraining trained: truncation, and no warning
  _, report = lengths.fit_to_length(task, init, config)
  assert "WARNING" not in capsys.readouterr().out and sum(c["truncated"] for c in report["splits"].values()) > 0


def test_bad_length_settings_are_one_line_errors(pretrain_run):
  config = bbbp_config(pretrain_run, overlong="drop")
  with pytest.raises(ValueError, match=r"data.overlong='drop'; choose 'truncate'"):
    ft_config.validate_config(config, 8)
  config.data.overlong, config.seq_len = "truncate", 2
  with pytest.raises(ValueError, match=r"seq_len=2 leaves no room"):
    ft_config.validate_config(config, 8)
  init = handoff.pretrained_encoder(str(pretrain_run))
  config.seq_len = init.model_config.max_positions + 8
  with pytest.raises(ValueError, match="exceeds the encoder's max_positions"):
    lengths.resolve_seq_len(config, init)


def test_windowed_tasks_warn_when_their_windows_pass_the_pretrained_positions(pretrain_run, capsys):
  """SQuAD's rows are full windows of seq_len slots: a learned table warns once seq_len > max_example_len."""
  _, init = loop.prepare(bbbp_config(pretrain_run))
  assert lengths.warn_untrained_window(init, init.max_example_len) is None
  message = lengths.warn_untrained_window(init, init.max_example_len + 1)
  assert message and f"positions up to {init.max_example_len}" in message
  assert capsys.readouterr().out.count("WARNING: learned positions") == 1
  rope = dataclasses.replace(init, model_config=dataclasses.replace(init.model_config, positions="rope2d"))
  assert lengths.warn_untrained_window(rope, 4 * init.max_example_len) is None
