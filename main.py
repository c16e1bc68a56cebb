"""exlm_jax entry point.

  python main.py --config configs/quickstart.py --workdir runs/quickstart
  python main.py --config configs/exlm_smiles_small.py:size=tiny --config.total_steps=20 --workdir runs/x
  python main.py --config configs/mlm_base.py --workdir runs/mlm --mode=compile_only

Pretraining configs (they have `objective`) run `exlm_jax.train.loop.train_and_evaluate`;
fine-tuning configs (they have `finetune`) run `exlm_jax.finetune.loop.run`.
"""

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and metrics are written.")
flags.DEFINE_enum("mode", "train", ["train", "compile_only"],
                  "train: run (and resume) the job; compile_only: compile the train step and print memory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top  (after flags, before anything uses devices)

  config = FLAGS.config
  if "finetune" in config:
    from exlm_jax.finetune import loop as finetune_loop  # pylint: disable=g-import-not-at-top
    finetune_loop.run(config, FLAGS.workdir)
    return
  from exlm_jax.train import loop  # pylint: disable=g-import-not-at-top
  del jax
  if FLAGS.mode == "compile_only":
    loop.compile_only(config, FLAGS.workdir)
  else:
    loop.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
