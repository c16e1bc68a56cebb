"""exlm_jax entry point.

  python main.py --config configs/quickstart.py --workdir runs/quickstart
  python main.py --config configs/exlm_smiles_small.py:size=tiny --config.total_steps=20 --workdir runs/x
  python main.py --config configs/mlm_smiles_small.py --workdir runs/mlm --mode=compile_only --fake_devices=8

Pretraining configs (they have `objective`) run `exlm_jax.train.loop.train_and_evaluate`;
fine-tuning configs (they have `finetune`) run `exlm_jax.finetune.loop.run`.
`--config FILE[:arg]` is loaded by `exlm_jax.config_lib.load`; `--config.<dotted.key>=<value>` then sets
any field, typed like its current value (tuples as `'(0, 1)'`), including every option of the
objective's block (`--config.exlm.transitions=ctc`: its defaults are merged in first). A bad config,
a mistyped key or a missing file is one line `error: ...` (`--traceback` shows the trace).

Several processes (launch/README.md): on a TPU VM pod slice (`--worker=all`), under `srun`, or
under `mpirun`, every process runs the same command and `jax.distributed` configures itself. Anywhere
else give each process the coordinator, e.g. two processes on one machine:
  python main.py ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0
  python main.py ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=1
(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Each process prints
`process i/n | local / global devices` first; the workdir must be a path every process can reach.
"""

import os
import sys

from absl import app, flags

from exlm_jax import config_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file, optionally with ':arg', e.g. configs/quickstart.py:objective=mlm; "
                    "then --config.<dotted.key>=<value> sets any field.")
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and metrics are written.")
flags.DEFINE_enum("mode", "train", ["train", "compile_only"],
                  "train: run (and resume) the job; compile_only: compile the train step and print memory.")
flags.DEFINE_enum("distributed", os.environ.get("EXLM_DISTRIBUTED", "auto"), ["auto", "on", "off"],
                  "auto: start jax.distributed on TPU VMs, under srun/mpirun, or when a coordinator is "
                  "given; on: always; off: never (env EXLM_DISTRIBUTED).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (env JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (env JAX_PROCESS_ID).")
flags.DEFINE_string("local_device_ids", None, "Comma-separated local device ids this process uses "
                    "(env JAX_LOCAL_DEVICE_IDS); e.g. all GPUs of a node when running one process per node.")
flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for every process to join.")
flags.DEFINE_integer("fake_devices", 0, "Run on CPU with this many fake devices (AOT memory checks, debugging).")
flags.DEFINE_bool("traceback", False, "Show the full traceback of a configuration or data error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])


def _start_jax() -> None:
  """Fake devices and jax.distributed, before anything asks JAX for devices; then who we are."""
  import jax  # pylint: disable=g-import-not-at-top
  from exlm_jax.train import distributed  # pylint: disable=g-import-not-at-top

  if FLAGS.fake_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.fake_devices)
  args = distributed.DistributedArgs.from_env(
      mode=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
      local_device_ids=FLAGS.local_device_ids, initialization_timeout=FLAGS.initialization_timeout)
  how = distributed.initialize(args)
  print(distributed.describe(how), flush=True)


# What bad input raises (config validation, missing files, unreadable data, a diverging loss with
# its hint): shown as one line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, FloatingPointError)
OVERRIDE_PREFIX = "--config."


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flags (a parsing error is one line); `--config.<key>=<value>` overrides pass through to main."""
  overrides = [arg for arg in argv[1:] if arg.startswith(OVERRIDE_PREFIX)]
  try:
    rest = FLAGS([arg for arg in argv if not arg.startswith(OVERRIDE_PREFIX)])
  except flags.Error as e:
    if "--traceback" in argv:
      raise
    sys.exit(f"error: {e} (see --helpshort)")
  return rest + overrides


def load_config(spec: str, overrides: list[str]):
  """The config of `--config spec`, with a pretraining objective's defaults merged in and the overrides set."""
  config = config_lib.load(spec)
  overrides = [arg[len(OVERRIDE_PREFIX):] for arg in overrides]
  if "objective" in config:
    from exlm_jax import objectives  # pylint: disable=g-import-not-at-top
    first = [o for o in overrides if o.partition("=")[0] == "objective"]  # the block to merge depends on it
    config = objectives.with_defaults(_override(config, first))
  return _override(config, overrides)


def _override(config, overrides: list[str]):
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"{OVERRIDE_PREFIX}{key}: give a value as {OVERRIDE_PREFIX}{key}=VALUE")
    config_lib.override(config, key, text, OVERRIDE_PREFIX)
  return config


def main(argv):
  overrides = [arg for arg in argv[1:] if arg.startswith(OVERRIDE_PREFIX)]
  try:
    config = load_config(FLAGS.config, overrides)
    if len(argv) > 1 + len(overrides):
      raise ValueError(f"unexpected arguments {[a for a in argv[1:] if a not in overrides]}; flags are --name=value")
    _run(config)
  except USER_ERRORS as e:
    if FLAGS.traceback:
      raise
    sys.exit(f"error: {type(e).__name__}: {e} (rerun with --traceback for the full trace)")


def _run(config) -> None:
  from exlm_jax.train import reporting  # pylint: disable=g-import-not-at-top
  reporting.quiet_library_logs()  # before JAX starts: its backend probing logs too
  _start_jax()
  if "finetune" in config:
    from exlm_jax.finetune import loop as finetune_loop  # pylint: disable=g-import-not-at-top
    finetune_loop.run(config, FLAGS.workdir)
    return
  from exlm_jax.train import loop  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == "compile_only":
    loop.compile_only(config, FLAGS.workdir)
  else:
    loop.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
