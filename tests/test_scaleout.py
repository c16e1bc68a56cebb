"""Scale-out: meshes (ICI x DCN), sharding presets and their check, jax.distributed start-up,
preemption, launch scripts, sweeps -- and real multi-process training on CPU.

MULTI-PROCESS / SUBPROCESS tests (marked `slow` + `data`, names start with test_multiprocess_ or
test_local_sweep / test_compile_only): they start `tests/multiprocess_worker.py` (= main.py with
per-step losses recorded) as separate processes on 127.0.0.1 with fake CPU devices, sharing an XLA
compilation cache (EXLM_TEST_XLA_CACHE, default a temp dir) so each program compiles once. Every
subprocess has a deadline and is killed (with its process group) if it overruns.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import scaleout_helpers as h
from exlm_jax.train import distributed, partitioning, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
SWEEP = os.path.join(REPO, "launch", "sweep.py")
TOTAL_STEPS = 10
# One training program for every single-process run below (same shapes, schedule, seed, 4 devices),
# so the XLA cache compiles it once; only the step count at which runs stop differs.
COMMON = [f"--config.total_steps={TOTAL_STEPS}", "--config.log_every=1", "--config.checkpoint_every=2",
          f"--config.eval_every={TOTAL_STEPS}", "--config.eval_batches=1", "--config.keep_checkpoints=20"]
TINY = "configs/mlm_smiles_small.py:size=tiny"


_fast_compile = pytest.fixture(autouse=True, scope="module")(h.fast_compile)


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------

def test_mesh_shape_ici_times_dcn():
  assert partitioning.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  cfg = {"data": 1, "fsdp": -1, "tensor": 2, "dcn_data": 2}
  assert partitioning.mesh_shapes(cfg, 16) == ((1, 4, 2), (2, 1, 1))
  assert partitioning.mesh_shape(cfg, 16) == (2, 4, 2)
  assert partitioning.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1, "dcn_fsdp": -1}, 8, num_slices=4) == (2, 4, 1)
  with pytest.raises(ValueError, match="tensor parallelism must stay inside a slice"):
    partitioning.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1, "dcn_tensor": 2}, 8)
  with pytest.raises(ValueError, match="do not split evenly"):
    partitioning.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 3}, 8)


def _fake_devices(n, per_process):
  return [types.SimpleNamespace(id=i, process_index=i // per_process, platform="cpu", device_kind="cpu")
          for i in range(n)]


def test_hybrid_mesh_keeps_dcn_axis_across_processes():
  devices = _fake_devices(8, per_process=4)
  grid = partitioning.device_grid({"data": -1, "fsdp": 2, "tensor": 1, "dcn_data": 2}, devices)
  assert grid.shape == (4, 2, 1)
  procs = np.vectorize(lambda d: d.process_index)(grid)
  np.testing.assert_array_equal(procs[:2], 0)  # the dcn half of `data` is the process boundary;
  np.testing.assert_array_equal(procs[2:], 1)  # fsdp stays inside a process
  with pytest.raises(ValueError, match="needs 4 slices but the devices form 2"):
    partitioning.device_grid({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 4}, devices)
  mesh = partitioning.create_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


# ----------------------------------------------------------------------------------------------
# Sharding presets and the "sufficiently sharded" check
# ----------------------------------------------------------------------------------------------

def _specs(setup):
  params = setup.state_sharding.params
  enc = params["encoder"]
  return {"wi": enc["stack"]["layer_0"]["mlp"]["wi"]["kernel"].spec,
          "query": enc["stack"]["layer_0"]["attention"]["query"]["kernel"].spec,
          "embedding": enc["token_embed"]["embedding"].spec,
          "all": [s.spec for s in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "spec"))]}


def test_presets_shard_what_they_claim_and_match_data_parallel():
  dp, fsdp, fsdp_tp = h.setup("dp", 8), h.setup("fsdp", 2, 4), h.setup("fsdp_tp", 2, 2, 2)
  assert all(all(e is None for e in spec) for spec in _specs(dp)["all"])
  s = _specs(fsdp)
  assert s["wi"] == P("fsdp", None) and s["query"] == P("fsdp", None, None) and s["embedding"] == P(None, "fsdp")
  assert not any("tensor" in str(spec) for spec in s["all"])
  s = _specs(fsdp_tp)
  assert s["wi"] == P("fsdp", "tensor") and s["query"] == P("fsdp", "tensor", None)
  assert s["embedding"] == P("tensor", "fsdp")

  results = {}
  for name, setup in (("dp", dp), ("fsdp", fsdp), ("fsdp_tp", fsdp_tp)):
    state, metrics = setup.train_step(h.initial_state(setup), h.tokens(0))
    results[name] = (float(metrics["loss"]), jax.device_get(state.params))
    if name == "fsdp_tp":  # the arrays really are split: (32, 64) kernel -> (16, 32) per device
      wi = state.params["encoder"]["stack"]["layer_0"]["mlp"]["wi"]["kernel"]
      assert wi.addressable_shards[0].data.shape == (16, 32)
  for name in ("fsdp", "fsdp_tp"):
    np.testing.assert_allclose(results[name][0], results["dp"][0], atol=1e-5)
    h.assert_trees_close(results[name][1], results["dp"][1], 1e-5)


def test_sufficiently_sharded_check_fails_mostly_replicated_runs():
  setup = h.setup("fsdp", 2, 4)
  report = partitioning.assert_params_sufficiently_sharded(
      setup.abstract_state().params, setup.state_sharding.params, setup.mesh, setup.config)
  assert report["per_device"] < report["total"] / 3  # ~1/4 of the parameters per device
  cfg = h.config("fsdp")
  cfg.logical_axis_rules = partitioning.preset_rules("dp")  # FSDP mesh, but every parameter replicated
  mesh = partitioning.create_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  bad = steps.TrainSetup.create(cfg, mesh)
  with pytest.raises(ValueError, match=r"sharding='custom' on mesh data=2 x fsdp=4 x tensor=1 leaves .* "
                                       r"largest replicated: encoder/"):
    partitioning.assert_params_sufficiently_sharded(bad.abstract_state().params, bad.state_sharding.params,
                                                    mesh, cfg)
  with pytest.raises(ValueError, match="sharding='dp' replicates parameters but the mesh has fsdp=4"):
    partitioning.check_mesh_for_preset(h.config("dp"), (2, 4, 1))
  with pytest.raises(ValueError, match="config.sharding='zero3'"):
    partitioning.logical_rules(h.config("zero3"))


def test_indivisible_dimension_is_left_unsharded():
  mesh = partitioning.create_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  assert partitioning.fit_spec(P("tensor", "fsdp"), (27, 32), mesh) == P(None, "fsdp")  # 27-token vocab
  assert partitioning.fit_spec(P("tensor", "fsdp"), (28, 32), mesh) == P("tensor", "fsdp")


# ----------------------------------------------------------------------------------------------
# jax.distributed start-up and preemption (in-process parts)
# ----------------------------------------------------------------------------------------------

_CLUSTER_VARS = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def test_distributed_detection_and_args(monkeypatch):
  for var in _CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)  # not a TPU VM
  assert distributed.detect_cluster() is None
  assert distributed.initialize(distributed.DistributedArgs(mode="auto")) == "single process"
  assert distributed.initialize(distributed.DistributedArgs(mode="off", num_processes=2)) == "off"
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert distributed.detect_cluster() == "slurm"
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.detect_cluster() is None  # a single task needs no coordinator
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  args = distributed.DistributedArgs.from_env(mode="auto", coordinator_address="10.0.0.1:1234", process_id=1)
  assert (args.coordinator_address, args.num_processes, args.process_id, args.explicit) == ("10.0.0.1:1234", 4, 1, True)
  with pytest.raises(ValueError, match="--distributed='maybe'"):
    distributed.initialize(distributed.DistributedArgs(mode="maybe"))


def test_incomplete_coordinator_flags_fail_with_one_line(monkeypatch):
  for var in _CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(RuntimeError, match=r"initialize failed \(explicit coordinator\).*--coordinator_address"):
    distributed.initialize(distributed.DistributedArgs(mode="on", num_processes=2, process_id=0))


def test_sigterm_in_one_process_stops_at_that_step():
  previous = signal.getsignal(signal.SIGTERM)
  with distributed.PreemptionWatcher() as stop:
    assert not stop.reached(1) and stop.mechanism == "SIGTERM handler"
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stop.reached(2) and stop.stopped_at == 2 and stop.reached(3)  # sticky
  assert signal.getsignal(signal.SIGTERM) == previous  # handler restored


# ----------------------------------------------------------------------------------------------
# Launch scripts and sweeps without running anything
# ----------------------------------------------------------------------------------------------

def test_sweep_dry_run_expands_real_config(tmp_path):
  out = subprocess.run([sys.executable, SWEEP, "--config", "configs/mlm_smiles_small.py", "--workdir",
                        str(tmp_path / "s"), "--dry_run", "--", "--config.total_steps=100"],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
  expected = [[sys.executable, os.path.join(REPO, "main.py"), "--config", "configs/mlm_smiles_small.py",
               "--workdir", str(tmp_path / "s" / f"{i:02d}_mask_prob={p}"), f"--config.mask_prob={p}",
               "--config.total_steps=100"] for i, p in enumerate((0.15, 0.3, 0.45, 0.6))]
  assert [shlex.split(line) for line in out.splitlines()] == expected
  assert not (tmp_path / "s").exists()  # a dry run writes nothing
  slurm = subprocess.run([sys.executable, SWEEP, "--config", "configs/mlm_smiles_small.py", "--workdir", "/runs/s",
                          "--dry_run", "--launcher=slurm", "--only=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
  assert shlex.split(slurm) == ["sbatch", "--job-name=exlm-01_mask_prob=0.3", "--output=/runs/s/01_mask_prob=0.3/slurm-%j.out",
                                os.path.join(REPO, "launch", "slurm_gpu.sbatch"), "--config",
                                "configs/mlm_smiles_small.py", "--workdir", "/runs/s/01_mask_prob=0.3",
                                "--config.mask_prob=0.3"]
  bad = subprocess.run([sys.executable, SWEEP, "--config", "configs/quickstart.py", "--workdir", "x", "--dry_run"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and bad.stderr.strip().endswith("dicts") and len(bad.stderr.splitlines()) == 1


def _fake_bin(tmp_path, name, body):
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(0o755)


def test_launch_scripts_build_the_right_commands(tmp_path):
  log = tmp_path / "calls.log"
  env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
  # SLURM: srun runs the per-task wrapper for task 0; EXLM_PYTHON=echo prints the final command.
  _fake_bin(tmp_path, "scontrol", 'echo node-a; echo node-b\n')
  _fake_bin(tmp_path, "srun", f'echo "srun $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES ${{JAX_LOCAL_DEVICE_IDS:-}}" >> {log}\n'
            'shift; SLURM_PROCID=5 "$@" >> ' + str(log) + '\n')
  slurm_env = {**env, "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "4",
               "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-[a-b]", "EXLM_PYTHON": "echo", "EXLM_REPO": "/r"}
  subprocess.run(["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch"), "--config", "c.py", "--workdir", "/w"],
                 env=slurm_env, check=True, capture_output=True, timeout=60)
  lines = log.read_text().splitlines()
  assert lines[0] == "srun node-a:12422 2 0,1,2,3"  # one process per node -> all 4 GPUs visible to it
  assert lines[1] == "/r/main.py --distributed=on --config c.py --workdir /w"
  # TPU VM: every remote command goes to --worker=all and ends in main.py with the flags.
  log.unlink()
  _fake_bin(tmp_path, "gcloud", f'printf "%s\\n" "$*" >> {log}\n')
  tpu_env = {**env, "TPU_NAME": "t1", "ZONE": "z1"}
  subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "run", "--config", "c.py", "--workdir", "/mnt/w"],
                 env=tpu_env, check=True, capture_output=True, timeout=60)
  calls = log.read_text().splitlines()
  assert any(c.startswith("compute tpus tpu-vm scp ") and "--worker=all" in c for c in calls)
  last = calls[-1]
  assert last.startswith("compute tpus tpu-vm ssh t1 --zone=z1 --worker=all --command=")
  assert last.endswith(".venv/bin/python main.py --config c.py --workdir /mnt/w ")


# ----------------------------------------------------------------------------------------------
# Subprocess runs: local sweep (also the single-process baseline), 2 processes, kill + resume
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_env(tmp_path_factory, shared_data):
  cache = os.environ.get("EXLM_TEST_XLA_CACHE") or str(tmp_path_factory.mktemp("xla_cache"))
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EXLM_DISTRIBUTED") and not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             EXLM_DATA_DIR=str(shared_data), EXLM_TFDS_DIR=str(tmp_path_factory.mktemp("tfds")))
  return env


def _env(base, devices, **extra):
  return {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def _start(args, env, log_path):
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, WORKER] + args, cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
  proc.log_path = log_path
  log.close()
  return proc


def _kill(proc, sig=signal.SIGKILL):
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:
    pass


def _wait(procs, timeout):
  """Waits for every process; kills all of them (and fails) past the deadline."""
  deadline = time.time() + timeout
  try:
    for proc in procs:
      proc.wait(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    for proc in procs:
      _kill(proc)
    pytest.fail(f"run exceeded {timeout}s; logs: {[p.log_path for p in procs]}")
  return [proc.returncode for proc in procs]


def _tail(path, n=15):
  with open(path) as f:
    return "".join(line for line in f.readlines() if not line[:1] in "IW")[-3000:]


def _losses(workdir, process=0):
  path = os.path.join(workdir, "test_losses.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in rows if r["process"] == process}


def _poll(condition, procs, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if any(p.poll() is not None for p in procs):
      pytest.fail(f"a run exited before {what}: {[_tail(p.log_path) for p in procs]}")
    time.sleep(0.1)
  for p in procs:
    _kill(p)
  pytest.fail(f"timed out waiting for {what}")


def _assert_losses_match(got, baseline, steps_):
  assert steps_, "no steps to compare"
  for step in steps_:
    np.testing.assert_allclose(got[step], baseline[step], atol=1e-5, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory, run_env):
  """A 2-run local sweep of the tiny config; run 0 is the single-process (4-device) baseline."""
  base = tmp_path_factory.mktemp("sweep")
  config = base / "tiny_sweep.py"
  config.write_text(textwrap.dedent(f"""\
      from exlm_jax import config_lib

      def get_config(arg=None):
        return config_lib.load({os.path.join(REPO, 'configs', 'mlm_smiles_small.py')!r} + (f":{{arg}}" if arg else ""))

      def get_sweep(arg=None):
        return [{{"data.overlong": "truncate"}}, {{"data.overlong": "skip"}}]
      """))
  workdir = base / "runs"
  started = time.time()
  out = subprocess.run([sys.executable, SWEEP, "--config", f"{config}:size=tiny", "--workdir", str(workdir),
                        "--entry", WORKER, "--timeout", "240", "--"] + COMMON,
                       cwd=REPO, env=_env(run_env, 4), capture_output=True, text=True, timeout=520)
  assert out.returncode == 0, out.stdout + out.stderr
  runs = sorted(p for p in workdir.iterdir() if p.is_dir())
  return dict(workdir=workdir, stdout=out.stdout, runs=runs, baseline=_losses(runs[0]),
              seconds=time.time() - started)


@pytest.mark.slow
@pytest.mark.data
def test_local_sweep_runs_and_collects_table(sweep_runs):
  workdir = sweep_runs["workdir"]
  assert [p.name for p in sweep_runs["runs"]] == ["00_overlong=truncate", "01_overlong=skip"]
  with open(workdir / "results.csv") as f:
    header, *rows = [line.rstrip("\n").split(",") for line in f]
  assert header[:4] == ["run", "data.overlong", "status", "step"] and "eval/loss" in header
  assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("00_overlong=truncate", "truncate", "done", str(TOTAL_STEPS)),
                                                      ("01_overlong=skip", "skip", "done", str(TOTAL_STEPS))]
  assert all(np.isfinite(float(r[header.index("eval/loss")])) for r in rows)
  markdown = (workdir / "results.md").read_text()
  assert "| 00_overlong=truncate | truncate | done |" in markdown and "| 01_overlong=skip | skip | done |" in markdown
  assert sorted(sweep_runs["baseline"]) == list(range(1, TOTAL_STEPS + 1))


@pytest.mark.slow
@pytest.mark.data
def test_multiprocess_training_matches_one_process_then_preempt_kill_resume(tmp_path, run_env, sweep_runs):
  """2 processes x 2 devices == 1 process x 4 devices (1e-5); SIGTERM to ONE process stops both at
  the same step with a checkpoint; it resumes in a single process; SIGKILL mid-run + resume also
  reproduces the uninterrupted losses."""
  baseline = sweep_runs["baseline"]
  workdir = str(tmp_path / "run")
  args = ["--config", TINY, "--workdir", workdir] + COMMON
  port = _free_port()
  procs = [_start(args + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                          "--initialization_timeout=120"],
                  _env(run_env, 2, EXLM_TEST_STEP_DELAY="0.5"), str(tmp_path / f"proc{i}.log")) for i in range(2)]
  try:
    _poll(lambda: len(_losses(workdir)) >= 2, procs, 300, "process 0 to log step 2")
    _kill(procs[1], signal.SIGTERM)  # the preemption notice reaches only process 1
    codes = _wait(procs, 120)
  finally:
    for p in procs:
      _kill(p)
  logs = [open(p.log_path).read() for p in procs]
  assert codes == [0, 0], [_tail(p.log_path) for p in procs]
  assert all("process %d/2 | 2 local / 4 global cpu devices | distributed: explicit coordinator" % i in logs[i]
             for i in range(2))
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  stop = final["step"]
  assert final["preempted"] and 2 <= stop < TOTAL_STEPS
  assert f"saving step {stop} and exiting cleanly" in logs[0]  # process 0 agreed on process 1's step
  ckpt = os.path.join(workdir, "checkpoints", str(stop))
  assert sorted(os.listdir(os.path.join(ckpt, "data_iter")))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]
  for process in (0, 1):
    _assert_losses_match(_losses(workdir, process), baseline, range(1, stop + 1))

  # Resume on ONE process (4 devices) from the 2-process checkpoint; SIGKILL after the next save.
  before = set(_losses(workdir))
  killed = _start(["--config", TINY, "--workdir", workdir] + COMMON, _env(run_env, 4, EXLM_TEST_STEP_DELAY="0.5"),
                  str(tmp_path / "killed.log"))
  target = stop + 2 - stop % 2  # next checkpoint_every=2 step
  try:
    _poll(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", str(target))) and
          max(_losses(workdir), default=0) > target, [killed], 300, f"checkpoint {target}")
  finally:
    _kill(killed)
  _wait([killed], 30)
  assert f"resumed from step {stop} " in open(killed.log_path).read()
  # Resume again (no delay) to the end: every step of every segment equals the uninterrupted run.
  final_run = _start(["--config", TINY, "--workdir", workdir] + COMMON, _env(run_env, 4), str(tmp_path / "final.log"))
  assert _wait([final_run], 300) == [0], _tail(final_run.log_path)
  resumed_at = int(open(final_run.log_path).read().split("resumed from step ")[1].split()[0])
  assert resumed_at >= target
  with open(os.path.join(workdir, "test_losses.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  segments = [r for r in rows if r["process"] == 0]
  assert {r["step"] for r in segments} >= set(range(1, TOTAL_STEPS + 1)) and len(before) == stop
  for r in segments:  # includes the killed run's steps, some recomputed by the final resume
    np.testing.assert_allclose(r["loss"], baseline[r["step"]], atol=1e-5, err_msg=f"step {r['step']}")
  assert json.load(open(os.path.join(workdir, "final_metrics.json")))["step"] == TOTAL_STEPS


@pytest.mark.slow
@pytest.mark.data
def test_compile_only_reports_memory_with_fake_devices(tmp_path, run_env, sweep_runs):
  del sweep_runs  # run after the sweep so the program is in the XLA cache
  env = {k: v for k, v in _env(run_env, 1).items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  out = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--config", TINY, "--workdir",
                        str(tmp_path / "aot"), "--mode=compile_only", "--fake_devices=4"] + COMMON,
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert "process 0/1 | 4 local / 4 global cpu devices" in out.stdout
  assert "train step for mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in out.stdout
  assert "per-device memory: arguments" in out.stdout
