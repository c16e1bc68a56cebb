"""Test helper: `python tests/multiprocess_worker.py <main.py flags>` = main.py, instrumented.

Used by tests/test_scaleout.py to run real (multi-)process training on CPU. Adds:
  <workdir>/test_losses.jsonl  one JSON line {"process", "step", "loss"} per logged train step
  EXLM_TEST_STEP_DELAY=secs    (env) sleep before each train step, so a test can signal a run mid-way
Everything else (flags, jax.distributed start-up, the training loop) is main.py's own code.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402  pylint: disable=g-import-not-at-top
from absl import app  # noqa: E402
from exlm_jax.train import reporting, steps  # noqa: E402


def _instrument() -> None:
  delay = float(os.environ.get("EXLM_TEST_STEP_DELAY", "0") or 0)
  scalars = reporting.Writer.scalars

  def record(self, step, values, prefix=""):
    if prefix == "train/":
      import jax  # pylint: disable=g-import-not-at-top
      with open(os.path.join(main.FLAGS.workdir, "test_losses.jsonl"), "a") as f:
        f.write(json.dumps({"process": jax.process_index(), "step": int(step), "loss": values["loss"]}) + "\n")
    return scalars(self, step, values, prefix)

  reporting.Writer.scalars = record
  if delay > 0:
    shard_batch = steps.TrainSetup.shard_batch

    def slow_shard_batch(self, tokens):
      time.sleep(delay)
      return shard_batch(self, tokens)

    steps.TrainSetup.shard_batch = slow_shard_batch


if __name__ == "__main__":
  _instrument()
  app.run(main.main, flags_parser=main.parse_flags)
