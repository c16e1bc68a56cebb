"""Checkpoints: restore onto another mesh / device count and continue identically; data-iterator
state across process counts; async-save errors are not lost."""

import json

import jax
import numpy as np
import pytest

import scaleout_helpers as h
from exlm_jax.train import checkpoint

_fast_compile = pytest.fixture(autouse=True, scope="module")(h.fast_compile)


def test_restore_onto_other_meshes_continues_identically(tmp_path):
  """Save on 8 devices as data=8; restore as (data=2, fsdp=4) with FSDP and on 1 device; same next step."""
  src = h.setup("dp", 8)
  state, _ = src.train_step(h.initial_state(src), h.tokens(0))
  manager = checkpoint.make_manager(str(tmp_path / "ckpt"), h.config())
  checkpoint.save(manager, 1, state, force=True)
  checkpoint.finish(manager)
  expected_state, expected = src.train_step(state, h.tokens(1))
  expected_params = jax.device_get(expected_state.params)

  for dst in (h.setup("fsdp", 2, 4), h.setup("dp", 1)):
    manager = checkpoint.make_manager(str(tmp_path / "ckpt"), h.config())
    restored, step = checkpoint.restore(manager, dst.abstract_state())
    checkpoint.finish(manager)
    assert step == 1 and int(restored.step) == 1
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(dst.state_sharding)):
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim)  # landed on the TARGET mesh's shardings
    new_state, metrics = dst.train_step(restored, h.tokens(1))
    np.testing.assert_allclose(float(metrics["loss"]), float(expected["loss"]), atol=1e-5)
    h.assert_trees_close(jax.device_get(new_state.params), expected_params, 1e-5)


def _write_states(directory, states):
  directory.mkdir(parents=True, exist_ok=True)
  for name, state in states.items():
    (directory / name).write_text(json.dumps(state))


def test_iterator_state_maps_across_process_counts(tmp_path):
  same = tmp_path / "same"
  _write_states(same, {"process_0-of-2.json": {"next_index": 7}, "process_1-of-2.json": {"next_index": 7}})
  assert checkpoint.iterator_state_for_process(same, 0, 2) == {"next_index": 7}  # own file
  assert checkpoint.iterator_state_for_process(same, 0, 1) == {"next_index": 7}  # 2 -> 1 process
  assert checkpoint.iterator_state_for_process(same, 3, 4) == {"next_index": 7}  # 2 -> 4 processes

  differ = tmp_path / "differ"
  _write_states(differ, {"process_0-of-2.json": {"workers": [1, 2]}, "process_1-of-2.json": {"workers": [3, 4]}})
  assert checkpoint.iterator_state_for_process(differ, 1, 2) == {"workers": [3, 4]}
  with pytest.raises(ValueError, match=r"saved by 2 process\(es\) and this run has 1;.*resume with the saved"):
    checkpoint.iterator_state_for_process(differ, 0, 1)
  with pytest.raises(FileNotFoundError, match="no data-iterator state"):
    checkpoint.iterator_state_for_process(tmp_path / "empty", 0, 1)


class _FailingManager:
  """Stands in for an Orbax manager whose background save failed."""

  def __init__(self):
    self.closed = False

  def wait_until_finished(self):
    raise OSError("disk full (background save)")

  def check_for_errors(self):
    pass

  def close(self):
    self.closed = True


def test_async_save_errors_surface_and_manager_closes():
  manager = _FailingManager()
  with pytest.raises(OSError, match="disk full"):
    with checkpoint.finishing(manager):
      pass
  assert manager.closed
  manager = _FailingManager()
  with pytest.raises(KeyError, match="the loop's own error"):  # the loop's exception wins
    with checkpoint.finishing(manager):
      raise KeyError("the loop's own error")
  assert manager.closed
