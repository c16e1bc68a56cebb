"""The run store without checkpoints: path forms of resolve_run on a fine-tuning layout, and write_json.

(Restoring params from real Orbax checkpoints is covered by test_api.py and test_finetune_loop.py.)
"""

import json

import numpy as np
import pytest

from exlm_jax import run_store


def _finetune_workdir(root, seeds=(0, 1, 2), best=None):
  """config.json with a 'finetune' section and seed_<s>/checkpoints/<step> folders (empty: only the layout)."""
  (root / run_store.CONFIG_FILE).parent.mkdir(parents=True, exist_ok=True)
  (root / run_store.CONFIG_FILE).write_text(json.dumps({"finetune": {}, "model": {}}))
  for seed in seeds:
    (run_store.seed_dir(root, seed) / run_store.CHECKPOINTS_DIR / str(10 + seed)).mkdir(parents=True)
  if best is not None:
    (root / run_store.RESULTS_FILE).write_text(json.dumps({"best_seed": best}))
  return root


def test_resolve_finetune_path_forms(tmp_path):
  root = _finetune_workdir(tmp_path / "ft", best=1)
  location = run_store.resolve_run(root)
  assert (location.kind, location.seed, location.step) == (run_store.FINETUNE, 1, None)
  assert location.checkpoint_dir == root / "seed_1" / "checkpoints"
  assert run_store.resolve_run(root, seed=2).seed == 2
  assert run_store.resolve_run(root / "seed_0").seed == 0
  at_step = run_store.resolve_run(root / "seed_2" / "checkpoints" / "12")
  assert (at_step.workdir, at_step.seed, at_step.step) == (root, 2, 12)
  with pytest.raises(FileNotFoundError, match="no checkpoint for seed 7"):
    run_store.resolve_run(root, seed=7)
  # Without results.json: the first seed with a checkpoint.
  assert run_store.resolve_run(_finetune_workdir(tmp_path / "ft2", seeds=(3, 5))).seed == 3


def test_write_json_is_atomic_sorted_and_numpy_aware(tmp_path):
  path = tmp_path / "sub" / "result.json"
  path.parent.mkdir()
  path.write_text("old")
  run_store.write_json(path, {"b": np.float32(0.5), "a": np.arange(3), "c": {"z": np.int64(2)}})
  assert json.loads(path.read_text()) == {"a": [0, 1, 2], "b": 0.5, "c": {"z": 2}}
  assert path.read_text().index('"a"') < path.read_text().index('"b"')
  assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temporary file left


def test_write_json_keeps_the_old_file_when_encoding_fails(tmp_path):
  path = tmp_path / "result.json"
  path.write_text('{"kept": true}')

  class Unprintable:
    def __str__(self):
      raise RuntimeError("no text")

  with pytest.raises(RuntimeError):
    run_store.write_json(path, {"x": Unprintable()})
  assert json.loads(path.read_text()) == {"kept": True}
  assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_write_json_only_on_process_zero(tmp_path, monkeypatch):
  monkeypatch.setattr(run_store.jax, "process_index", lambda: 1)
  run_store.write_json(tmp_path / "x.json", {"a": 1})
  assert not (tmp_path / "x.json").exists()


def test_a_run_saved_before_a_data_key_existed_reads_as_it_was_trained(tmp_path):
  """config.json written before data.packing / max_examples_per_block / text_units: those keys read as their
  defaults (blocks of one molecule), so loading and resuming such a run see no change."""
  from exlm_jax import config_lib  # pylint: disable=g-import-not-at-top
  from exlm_jax.train import resume  # pylint: disable=g-import-not-at-top
  config = config_lib.load("configs/exlm_smiles_small.py:size=tiny")
  config.data.packing, config.data.max_examples_per_block = False, -1  # as every run of that time
  old = config.to_dict()
  for key in ("packing", "max_examples_per_block", "text_units"):
    del old["data"][key]
  (tmp_path / run_store.CONFIG_FILE).write_text(json.dumps(old))
  (tmp_path / run_store.CHECKPOINTS_DIR / "5").mkdir(parents=True)
  read = run_store.read_config(tmp_path)
  assert read["data"] == config.to_dict()["data"]
  assert resume.check_config(tmp_path, config) == {}
  config.data.packing = True  # a real change is still refused
  with pytest.raises(ValueError, match="data.packing"):
    resume.check_config(tmp_path, config)
