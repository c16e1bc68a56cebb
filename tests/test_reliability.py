"""Never losing a run: divergence stops before a non-finite state is saved, damaged checkpoints are walked
past (and moved aside), a finished run is left as it is, a changed config is refused before anything is
written, one writer per workdir, and a train step too large for the device ends right after compiling."""

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import exlm_jax
import scaleout_helpers as h
from exlm_jax import run_store
from exlm_jax.data import tokenizers
from exlm_jax.train import checkpoint, divergence, loop, resume, workdir_lock

from test_api import SMILES, make_pretraining_workdir  # pylint: disable=wrong-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]
_fast_compile = pytest.fixture(autouse=True, scope="module")(h.fast_compile)


def config_module(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tree_digest(root: pathlib.Path) -> dict:
  """{relative path: sha256} of every file under `root`: what 'byte-identical' is checked against."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def all_finite(params) -> bool:
  return all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------
# Divergence: the step skips, the guard names the step
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_step():
  """(setup, AOT-compiled train step) of the 1-layer tiny MLM on one device (compiled once)."""
  setup = h.setup("dp", 1)
  return setup, setup.compile_train_step()


def test_a_non_finite_step_keeps_the_old_state_and_the_guard_names_it(compiled_step):
  setup, compiled = compiled_step
  batch = setup.shard_batch(h.tokens(0))
  state, _ = compiled(h.initial_state(setup), batch)  # one good step
  good = jax.device_get(state)
  assert int(good.step) == 1
  guard = divergence.DivergenceGuard()
  guard.add(1, {"finite": jnp.float32(1), "loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0)})
  guard.check(state, 1, lambda: "unused")  # nothing skipped: no error

  poisoned = jax.tree.map(np.copy, good)
  leaf = jax.tree.leaves(poisoned.params)[0]
  leaf.reshape(-1)[0] = np.nan  # one NaN parameter: the next loss and gradient are NaN
  state = jax.device_put(poisoned, setup.state_sharding)
  state, metrics = compiled(state, setup.shard_batch(h.tokens(1)))
  after = jax.device_get(state)
  assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
  assert int(after.step) == 1  # not advanced: the update was skipped ...
  for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(poisoned)):  # ... params and Adam moments as they were
    np.testing.assert_array_equal(got, want)

  guard.add(2, metrics)
  with pytest.raises(FloatingPointError, match=r"^training diverged at step 2: loss nan, grad_norm nan .*; lower it"):
    guard.check(state, 2, lambda: "lower it")


def test_check_memory_ends_in_one_line_against_a_fake_limit(compiled_step):
  setup, compiled = compiled_step
  mem = compiled.memory_analysis()
  need = loop.memory_estimate(mem)
  state_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state()))
  assert need >= state_bytes  # at least the train state it reads
  loop.check_memory(compiled, (need, "a device of exactly that size"))  # fits
  loop.check_memory(compiled, None)  # unknown limit: no check
  with pytest.raises(ValueError, match=r"needs about .* GiB per device .* but a fake 1 KiB device is 0\.000 GiB: lower"):
    loop.check_memory(compiled, (1024, "a fake 1 KiB device"))

  total_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
  limit, what = loop.device_memory_limit(jax.devices("cpu")[0])
  assert limit == pytest.approx(total_kib * 1024 / jax.local_device_count(), rel=1e-3)
  assert f"/ {jax.local_device_count()} CPU device(s)" in what


def _main(workdir, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), EXLM_TFDS_DIR=str(workdir.parent / "tfds"))
  return subprocess.run([sys.executable, str(REPO / "main.py"), "--workdir", str(workdir), *flags],
                        capture_output=True, text=True, env=env, timeout=900, cwd=REPO)


DIVERGING = ["--config.learning_rate=1e6", "--config.lr_schedule=constant", "--config.warmup_steps=0",
             "--config.checkpoint_every=1"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["exlm_smiles_small", "mlm_smiles_small"])
def test_a_diverging_run_stops_naming_the_step_and_keeps_only_finite_checkpoints(shared_data, tmp_path, config):
  del shared_data
  workdir = tmp_path / "run"
  result = _main(workdir, "--config", f"configs/{config}.py:size=tiny", *DIVERGING)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: FloatingPointError: training diverged at step "), result.stderr[-3000:]
  bad = int(last.split("at step ")[1].split(":")[0])
  assert "lower --config.learning_rate" in last and "grad_clip_norm" in last
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) == bad - 1, saved  # every step before the bad one was saved, none after
  assert f"the newest checkpoint, step {bad - 1}" in last
  for step in saved:
    params, _ = run_store.restore_params(workdir / "checkpoints", step)
    assert all_finite(params), step
  assert checkpoint.saved_iterator_states(workdir / "checkpoints" / str(bad - 1) / "data_iter")
  assert not (workdir / ".lock").exists() and not (workdir / "final_metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: walk back, move aside, one line
# ----------------------------------------------------------------------------------------------


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
             key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 3)


def _zero_fill(step_dir):
  path = _largest_array_file(step_dir)
  path.write_bytes(b"\0" * path.stat().st_size)


def _remove_state(step_dir):
  shutil.rmtree(step_dir / "state")


def _truncate_data_iter(step_dir):
  path = next((step_dir / "data_iter").glob("process_*.json"))
  path.write_text(path.read_text()[:5])


CORRUPTIONS = {"truncated array file": _truncate, "zero-filled array file": _zero_fill,
               "missing state/": _remove_state, "truncated data_iter": _truncate_data_iter}


def _iterator():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _saved_run(directory: pathlib.Path, keep: int = 10):
  """Checkpoints 1, 2, 3 of distinguishable states (params + step, iterator at 10 * step); host copies."""
  setup = h.setup("dp", 1)
  base = h.initial_state_host()
  config = h.config(keep_checkpoints=keep, async_checkpointing=False)
  manager = checkpoint.make_manager(str(directory), config)
  states = {}
  for step in (1, 2, 3):
    state = base.replace(step=np.int32(step), params=jax.tree.map(lambda x, s=step: x + s, base.params))
    iterator = _iterator()
    for _ in range(10 * step):
      next(iterator)
    checkpoint.save(manager, step, jax.device_put(state, setup.state_sharding), iterator, force=True)
    states[step] = state
  checkpoint.finish(manager)
  return setup, config, states


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_restore_walks_past_a_damaged_newest_step_and_moves_it_aside(tmp_path, capsys, kind):
  directory = tmp_path / "checkpoints"
  setup, config, states = _saved_run(directory, keep=3)
  CORRUPTIONS[kind](directory / "3")
  before = tree_digest(directory / "3")

  manager = checkpoint.make_manager(str(directory), config)
  iterator = _iterator()
  restored, step = checkpoint.restore(manager, setup.abstract_state(), iterator)
  assert step == 2 and int(restored.step) == 2
  for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(states[2])):
    np.testing.assert_array_equal(got, want)
  assert next(iterator) == 20  # the data position of step 2, not 3's
  lines = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
  assert len(lines) == 1 and "checkpoint step 3 does not restore" in lines[0] and "resuming from step 2" in lines[0]
  moved = list((directory / "corrupt").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("3-") and moved[0].name.endswith("Z")
  assert tree_digest(moved[0]) == before  # moved, not deleted or changed
  assert str(moved[0]) in lines[0]

  # Orbax does not take corrupt/ for a step: saving on rotates 1, 2, 4, 5 with keep 3, corrupt/ stays.
  assert manager.all_steps() == [1, 2] and manager.latest_step() == 2
  for new_step in (4, 5):
    checkpoint.save(manager, new_step, restored, iterator, force=True)
  checkpoint.finish(manager)
  assert sorted(p.name for p in directory.iterdir()) == ["2", "4", "5", "corrupt"]
  assert tree_digest(moved[0]) == before


@pytest.mark.parametrize("kind", ["truncated array file", "missing state/"])
def test_restore_params_reads_the_newest_clean_step_and_moves_nothing(tmp_path, caplog, kind):
  directory = tmp_path / "checkpoints"
  _, _, states = _saved_run(directory)
  CORRUPTIONS[kind](directory / "3")
  params, step = run_store.restore_params(directory)
  assert step == 2
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(states[2].params)):
    np.testing.assert_array_equal(got, want)
  assert f"{directory}/3 does not read" in caplog.text
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]  # reading moves nothing
  with pytest.raises(ValueError, match="^" + re.escape(f"checkpoint {directory}/3 cannot be read (") + ".*is a run"):
    run_store.restore_params(directory, 3)  # an explicit step: no walk


def test_when_no_step_restores_nothing_moves_and_the_error_is_one_line(tmp_path):
  directory = tmp_path / "checkpoints"
  setup, config, _ = _saved_run(directory)
  for step in (1, 2, 3):
    _truncate(directory / str(step))
  before = tree_digest(directory)
  manager = checkpoint.make_manager(str(directory), config)
  with pytest.raises(ValueError) as error:
    checkpoint.restore(manager, setup.abstract_state(), _iterator())
  checkpoint.finish(manager)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"no checkpoint in {directory} restores (steps 3, 2, 1; newest:")
  assert tree_digest(directory) == before
  with pytest.raises(ValueError, match="^" + re.escape(f"checkpoint {directory}/3 cannot be read") + ".*none of its 3"):
    run_store.restore_params(directory)


def test_exlm_jax_load_walks_back_and_fails_in_one_line_naming_the_path(tmp_path):
  workdir = tmp_path / "run"
  make_pretraining_workdir(workdir, "mlm", tokenizers.SmilesRegexTokenizer.build(SMILES), num_layers=1)
  shutil.copytree(workdir / "checkpoints" / "3", workdir / "checkpoints" / "5")  # a newer step ...
  _truncate(workdir / "checkpoints" / "5")  # ... damaged
  model = exlm_jax.load(workdir, devices=jax.local_devices()[:1])
  assert model.step == 3
  _truncate(workdir / "checkpoints" / "3")
  with pytest.raises(ValueError) as error:
    exlm_jax.load(workdir, devices=jax.local_devices()[:1])
  assert "\n" not in str(error.value) and str(workdir / "checkpoints" / "5") in str(error.value)


# ----------------------------------------------------------------------------------------------
# Reruns: finished, changed config, continued
# ----------------------------------------------------------------------------------------------


def tiny_config(tfds_dir="", **overrides):
  """The quickstart (RDKit's 5K SMILES, no download) as a 2-step, 1-layer MLM run."""
  config = config_module("quickstart").get_config("objective=mlm")
  config.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64)
  config.update(dict(batch_size=8, seq_len=48, total_steps=2, log_every=1, eval_every=2, eval_batches=1,
                     checkpoint_every=1, async_checkpointing=False))
  config.data.tfds_dir = str(tfds_dir)
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tfds_dir):
  """A finished 2-step pretraining workdir (copy it before changing anything)."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  final = loop.train_and_evaluate(tiny_config(tfds_dir), str(workdir))
  assert final["step"] == 2 and not final["preempted"]
  return workdir


def _copy(finished, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  return workdir


def test_rerunning_a_finished_run_leaves_it_byte_identical(finished, tfds_dir, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  before = tree_digest(workdir)
  final = loop.train_and_evaluate(tiny_config(tfds_dir, log_every=2), str(workdir))  # also with a resumable change
  assert final == json.loads((workdir / "final_metrics.json").read_text()) and final["step"] == 2
  assert tree_digest(workdir) == before  # final_metrics.json, config.json, tensorboard/, checkpoints/
  assert f"{workdir} already finished at step 2 (total_steps=2); nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("key, value", [("objective", "exlm"), ("model.d_model", 64), ("batch_size", 16),
                                        ("grad_clip_norm", 1.0)])
def test_an_incompatible_config_change_is_refused_before_anything_is_written(finished, tfds_dir, tmp_path, key,
                                                                            value):
  workdir = _copy(finished, tmp_path)
  before = tree_digest(workdir)
  config = tiny_config(tfds_dir, total_steps=4)  # a continuation, so only the config check can refuse it
  parent, _, name = key.rpartition(".")
  (config[parent] if parent else config)[name] = value
  with pytest.raises(ValueError) as error:
    loop.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{workdir} holds a run with another config: {key} ")
  assert "total_steps" not in message  # resumable: not among the refused keys
  assert tree_digest(workdir) == before
  assert not (workdir / ".lock").exists()


def test_config_compatibility_rule():
  saved = run_store.as_json(tiny_config().to_dict())
  saved["model"]["vocab_size"] = 40
  new = tiny_config(total_steps=9, learning_rate=1e-4)
  assert resume.config_changes(saved, run_store.as_json(new.to_dict())) == {  # vocab_size -1: not known yet
      "learning_rate": (1e-3, 1e-4), "total_steps": (2, 9)}
  new.model.vocab_size, new.seed = 41, 3
  changes = resume.config_changes(saved, run_store.as_json(new.to_dict()))
  assert changes["model.vocab_size"] == (40, 41) and changes["seed"] == (0, 3)
  assert resume.config_changes({"a": 1}, {"a": 1, "b": {"c": 2}}) == {"b.c": ("<absent>", 2)}


def test_a_larger_total_steps_continues_and_a_too_large_step_ends_after_compiling(finished, tfds_dir, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = tree_digest(workdir)
  config = tiny_config(tfds_dir, total_steps=3, learning_rate=5e-4)  # a longer run, a lower learning rate
  with pytest.raises(ValueError, match=r"^the train step needs about .* GiB per device .* but a 1 KiB test device"):
    loop.train_and_evaluate(config, str(workdir), memory_limit=(1024, "a 1 KiB test device"))
  assert tree_digest(workdir) == before  # nothing trained, nothing recorded
  final = loop.train_and_evaluate(config, str(workdir))
  assert final["step"] == 3 and final["train"]
  assert (workdir / "checkpoints" / "3").is_dir()
  history = json.loads((workdir / "config_history.json").read_text())
  assert len(history) == 1 and history[0]["resumed_from_step"] == 2 and history[0]["changes"] == {
      "learning_rate": [1e-3, 5e-4], "total_steps": [2, 3]}
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["total_steps"] == 3 and saved["learning_rate"] == 5e-4


# ----------------------------------------------------------------------------------------------
# One writer per workdir
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def live_pid():
  """The pid of a live process of ours (not this one)."""
  process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  yield process.pid
  process.kill()
  process.wait()


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _write_lock(workdir: pathlib.Path, pid: int, host: str | None = None, age_s: float = 0.0) -> pathlib.Path:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / run_store.LOCK_FILE
  path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": "earlier",
                              "command": "main.py"}))
  if age_s:
    os.utime(path, (time.time() - age_s, time.time() - age_s))
  return path


def test_a_second_pretraining_run_on_a_locked_workdir_is_refused(finished, tfds_dir, tmp_path, live_pid):
  workdir = _copy(finished, tmp_path)
  lock = _write_lock(workdir, live_pid)
  before = tree_digest(workdir)
  holder = re.escape(f"{workdir} is in use by pid {live_pid} on {socket.gethostname()}")
  with pytest.raises(FileExistsError, match=f"^{holder}"):
    loop.train_and_evaluate(tiny_config(tfds_dir), str(workdir))
  assert tree_digest(workdir) == before and lock.exists()  # the holder's lock is left alone


def test_a_stale_lock_is_taken_over_with_a_note_and_released(finished, tfds_dir, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  pid = _dead_pid()
  _write_lock(workdir, pid)
  loop.train_and_evaluate(tiny_config(tfds_dir), str(workdir))  # finished: nothing else to do
  out = capsys.readouterr().out
  assert f"took over the stale lock {workdir / '.lock'} of pid {pid}" in out and "no longer running" in out
  assert not (workdir / ".lock").exists()


def test_a_fine_tuning_run_on_a_locked_workdir_is_refused(tmp_path, live_pid):
  from exlm_jax.finetune import loop as finetune_loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "ft"
  _write_lock(workdir, live_pid)
  with pytest.raises(FileExistsError, match="^" + re.escape(f"{workdir} is in use by pid {live_pid}")):
    finetune_loop.run(config_module("finetune_moleculenet").get_config("task=bbbp"), str(workdir))
  assert sorted(p.name for p in workdir.iterdir()) == [".lock"]


def test_lock_rules(tmp_path, live_pid, capsys):
  held = workdir_lock.acquire(tmp_path)
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  with pytest.raises(FileExistsError, match=rf"in use by pid {os.getpid()}"):
    workdir_lock.acquire(tmp_path)  # this very (live) process
  held.release()
  assert not (tmp_path / ".lock").exists()

  cases = [  # (pid, host, age in s) -> taken over?
      (live_pid, None, 10 * 3600, False),  # this host, alive: held however old
      (_dead_pid(), None, 0, True),  # this host, dead
      (live_pid, "elsewhere", 60, False),  # another host, heartbeat a minute ago
      (live_pid, "elsewhere", 2 * 3600, True),  # another host, no heartbeat for 2 h > 1 h
  ]
  for pid, host, age, taken in cases:
    _write_lock(tmp_path, pid, host, age)
    if taken:
      workdir_lock.acquire(tmp_path).release()
      assert "took over the stale lock" in capsys.readouterr().out
    else:
      with pytest.raises(FileExistsError):
        workdir_lock.acquire(tmp_path)
    (tmp_path / ".lock").unlink(missing_ok=True)

  (tmp_path / ".lock").write_text("")  # being written by a run that just created it
  with pytest.raises(FileExistsError, match="unknown process"):
    workdir_lock.acquire(tmp_path)
  os.utime(tmp_path / ".lock", (time.time() - 120, time.time() - 120))  # ... or that died doing so
  workdir_lock.acquire(tmp_path).release()

  with pytest.raises(RuntimeError):  # released on an exception too
    with workdir_lock.locked(tmp_path):
      raise RuntimeError("boom")
  assert not (tmp_path / ".lock").exists()
  lock = workdir_lock.acquire(tmp_path)  # release never removes another holder's lock
  _write_lock(tmp_path, live_pid)
  lock.release()
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == live_pid
