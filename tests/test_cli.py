"""main.py end to end: a few steps of the quickstart config, then a resumed run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.batch_size=8", "--config.seq_len=48",
        "--config.log_every=2", "--config.eval_every=4", "--config.checkpoint_every=2", "--config.eval_batches=1"]


def _main(workdir, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             EXLM_TFDS_DIR=str(workdir.parent / "tfds"))
  result = subprocess.run([sys.executable, str(REPO / "main.py"), "--workdir", str(workdir), *flags],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_quickstart_cli_trains_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  out = _main(workdir, "--config", "configs/quickstart.py", "--config.total_steps=4", *TINY)
  assert "step 2/4 | loss" in out and "tok/s" in out and "ETA" in out
  assert "eval at step 4" in out and "done: checkpoints in" in out
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["step"] == 4 and final["eval"]["loss"] > 0
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == "4"
  assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
  assert (workdir / "tokenizer").is_dir() and (workdir / "config.json").is_file()

  out = _main(workdir, "--config", "configs/quickstart.py", "--config.total_steps=6", *TINY)
  assert "resumed from step 4" in out and "step 6/6" in out


def test_cli_reports_bad_config_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(REPO / "main.py"), "--workdir", str(tmp_path),
                           "--config", "configs/quickstart.py", "--config.mask_prob=1.5"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: ") and "mask_prob=1.5 must lie in (0, 1)" in last_line, last_line
