"""The trainer's performance logging: model TFLOP/s per device and MFU from the analytic FLOPs model
(train/flops.py), and the `profile_start_step` window writing a jax.profiler trace (one tiny run)."""

import glob
import json
import os

import jax
import ml_collections
import pytest

from exlm_jax import config_lib
from exlm_jax.train import flops
from exlm_jax.train import loop

def _tiny_config():
  config = config_lib.load("configs/quickstart.py:objective=mlm")
  config.total_steps, config.batch_size, config.seq_len = 4, 8, 32
  config.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64)
  config.eval_batches, config.log_every, config.eval_every, config.checkpoint_every = 1, 2, 4, 4
  config.async_checkpointing = False
  config.data.max_examples = 200
  config.profile_start_step, config.profile_num_steps = 1, 2
  return config


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
  assert perf["mfu"] == pytest.approx(perf["tflops_per_device"] * 1e12 / 2e12, rel=1e-9)
  out = capsys.readouterr().out
  assert "TFLOP/s/device" in out and "MFU" in out and "profile of steps 2-3 written" in out
  assert os.path.isdir(workdir / "tensorboard")


def test_perf_reporter_without_peak_or_flops_model():
  config = _tiny_config()
  config.model.vocab_size = 100
  extra, text = loop.perf_reporter(config)({"step_time_s": 0.5})  # CPU: no peak -> no MFU
  assert set(extra) == {"tflops_per_device"} and "MFU" not in text
  config.objective = "not_modelled"
  assert loop.perf_reporter(config)({"step_time_s": 0.5}) == ({}, "")


def test_profile_window_validation():
  config = _tiny_config()
  config.profile_num_steps = 0
  with pytest.raises(ValueError, match="profile_num_steps"):
    loop.validate_config(config, num_devices=1)
