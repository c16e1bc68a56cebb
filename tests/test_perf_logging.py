"""The trainer's performance logging: model TFLOP/s per device and MFU from the analytic FLOPs model
(train/flops.py), and the `profile_start_step` window writing a jax.profiler trace (one tiny run)."""

import glob
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from exlm_jax import config_lib
from exlm_jax.train import flops
from exlm_jax.train import loop
from exlm_jax.train import reporting

def _tiny_config():
  config = config_lib.load("configs/quickstart.py:objective=mlm")
  config.total_steps, config.batch_size, config.seq_len = 4, 8, 32
  config.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64)
  config.eval_batches, config.log_every, config.eval_every, config.checkpoint_every = 1, 2, 4, 4
  config.async_checkpointing = False
  config.data.max_examples = 200
  config.profile_start_step, config.profile_num_steps = 1, 2
  return config


def _real_tokens_of_the_first_batches(config, steps: int) -> int:
  """Non-<pad> slots of the first `steps` training batches, read again from the (cached) pipeline in numpy."""
  from exlm_jax.data import pipeline, vocab  # pylint: disable=g-import-not-at-top
  iterator = pipeline.load_pretraining_data(config, None).train_iterator()
  return int(sum(np.sum(np.asarray(next(iterator)["tokens"]) != vocab.PAD) for _ in range(steps)))


def test_trainer_logs_tflops_mfu_and_writes_profile(tmp_path, monkeypatch, capsys):
  pytest.importorskip("rdkit")
  monkeypatch.setenv("EXLM_TFDS_DIR", str(tmp_path / "tfds"))
  monkeypatch.setattr(flops, "peak_flops_per_device", lambda device: 2e12)  # CPU has none: pretend
  workdir = tmp_path / "run"
  final = loop.train_and_evaluate(_tiny_config(), str(workdir))

  traces = glob.glob(str(workdir / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, f"no trace under {workdir / 'profile'}"
  with open(workdir / "config.json") as f:
    config = ml_collections.ConfigDict(json.load(f))  # with the tokenizer's vocabulary size
  perf = final["perf"]
  expected = flops.train_flops_per_step(config) / perf["step_time_s"] / jax.device_count() / 1e12
  assert perf["tflops_per_device"] == pytest.approx(expected, rel=1e-9)
  # MFU is on the real work: the same formulas at the window's real tokens and examples (packed blocks here,
  # the quickstart's default: at least one example per block).
  real = flops.real_train_flops_per_step(config, perf["real_tokens_per_step"], perf["examples_per_step"])
  assert perf["real_flops_per_step"] == real < perf["flops_per_step"] == flops.train_flops_per_step(config)
  assert perf["mfu"] == pytest.approx(real / perf["step_time_s"] / jax.device_count() / 2e12, rel=1e-9)
  assert perf["real_tokens_per_s"] == pytest.approx(perf["tokens_per_s"] * perf["slot_utilisation"], rel=1e-9)
  assert config.data.packing and config.data.max_examples_per_block >= 1  # the bound the run resolved
  assert 0 < perf["slot_utilisation"] < 1 and perf["examples_per_step"] >= config.batch_size
  out = capsys.readouterr().out
  assert "TFLOP/s/device" in out and "MFU" in out and "profile of steps 2-3 written" in out
  assert "real, " in out and "% of slots" in out
  # The run card counts every real token trained on: the same batches again, from the pipeline.
  card = json.loads((workdir / "run_card.json").read_text())
  assert card["real_tokens_seen"] == _real_tokens_of_the_first_batches(config, config.total_steps)
  assert os.path.isdir(workdir / "tensorboard")


def test_perf_reporter_without_peak_or_flops_model():
  config = _tiny_config()
  config.model.vocab_size = 100
  config.data.max_examples_per_block = 2  # what the run resolves from the data before reporting
  extra, text = loop.perf_reporter(config)({"step_time_s": 0.5})  # CPU: no peak -> no MFU
  assert set(extra) == {"tflops_per_device"} and "MFU" not in text
  config.objective = "not_modelled"
  assert loop.perf_reporter(config)({"step_time_s": 0.5}) == ({}, "")


def test_profile_window_validation():
  config = _tiny_config()
  config.profile_num_steps = 0
  with pytest.raises(ValueError, match="profile_num_steps"):
    loop.validate_config(config, num_devices=1)


class _Recorder:
  def __init__(self):
    self.written = []

  def scalars(self, step, values, prefix=""):
    self.written.append((step, prefix, dict(values)))


def test_log_window_sums_real_counts_and_averages_the_rest():
  recorder = _Recorder()
  progress = reporting.Progress(total_steps=4, tokens_per_step=100, start_step=0)
  window = reporting.LogWindow(2, progress, recorder, summed=reporting.REAL_COUNTS)
  steps = [dict(loss=np.float32(2.0), real_tokens=np.int32(60), examples=np.int32(3)),
           dict(loss=np.float32(4.0), real_tokens=np.int32(80), examples=np.int32(5))]
  assert not window.add(1, steps[0])
  assert window.add(2, steps[1])
  assert window.last == {"loss": 3.0}  # counts are throughput, not averaged metrics
  perf = window.perf
  assert perf["real_tokens_per_step"] == 70 and perf["examples_per_step"] == 4
  assert perf["slot_utilisation"] == pytest.approx(0.7)
  assert perf["real_tokens_per_s"] == pytest.approx(70 / perf["step_time_s"])
  assert perf["tokens_per_s"] == pytest.approx(100 / perf["step_time_s"])
  assert recorder.written[-1][1] == "train/" and "real_tokens_per_s" in recorder.written[-1][2]
  assert perf["real_tokens_seen"] == 140
  window.add(3, dict(loss=np.float32(1.0), real_tokens=np.int32(50), examples=np.int32(2)))
  window.add(4, dict(loss=np.float32(1.0), real_tokens=np.int32(40), examples=np.int32(2)))
  assert window.perf["real_tokens_seen"] == 60 + 80 + 50 + 40  # the session so far, not the last window
  # Without counts (e.g. fine-tuning) the window reports slot throughput only.
  plain = reporting.LogWindow(1, reporting.Progress(1, 100, 0), _Recorder())
  plain.add(1, dict(loss=np.float32(1.0), real_tokens=np.int32(5)))
  assert "real_tokens_per_s" not in plain.perf and plain.last["real_tokens"] == 5
