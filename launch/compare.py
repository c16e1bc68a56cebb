"""One command from pretraining to a report: MLM, MLM++, MAE-LM and ExLM on one encoder, fine-tuned and analysed.

  # the plan with estimated FLOPs and wall time per run (compiles and times one step per distinct config)
  python launch/compare.py --suite smiles --scale cpu --workdir runs/smiles_cpu --dry_run
  # run it (re-running the same command skips finished runs and resumes a killed one)
  nohup python launch/compare.py --suite smiles --scale cpu --workdir runs/smiles_cpu > runs/smiles_cpu.log 2>&1 &
  # ablations, MAE-LM and ExLM each on its paper's encoder with its own MLM / MLM++
  python launch/compare.py --suite smiles --scale cpu --workdir runs/abl --arms mlm,exlm,exlm_k2,exlm_k8,exlm_ctc
  python launch/compare.py --suite smiles --scale cpu --workdir runs/paper --encoder paper

Arms (default mlm,mlm++,maelm,exlm; exlm_jax/compare/plan.py): every arm is its method family's config with only
the objective swapped and every other field set to one recipe (--encoder shared: ExLM's rope2d pre-LN encoder and
the suite's data, tokenizer, schedule, batch and seed); mlm++ runs once per method at that method's training
FLOPs (mlm++@maelm, mlm++@exlm: budget=equal_flops). Each arm is pretrained with main.py, then fine-tuned on every
--tasks entry with every --seeds seed (validation picks the step, test is reported there), then analysed
(`python -m exlm_jax.analysis report`: effective rank per layer, entropy vs mask ratio; `dag_view` for ExLM).
Every run is a subprocess of main.py (log: DIR/logs/<run>.log; DIR/launches.jsonl records each launch); a run is
finished when its final_metrics.json (pretraining) / results.json with every seed (fine-tuning) / report.json
(analysis) exists, and is then skipped. The report is DIR/report.md, DIR/report.json and PNGs
(exlm_jax/compare/report.py). Scales: tiny (tests), cpu (a 4 x 128 encoder on packed blocks, BBBP, BACE, ESOL,
3 seeds), base (the papers' scale, for accelerators).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from exlm_jax.compare import plan as plan_lib  # noqa: E402  pylint: disable=g-import-not-at-top

LAUNCHES = "launches.jsonl"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suite", required=True, choices=tuple(plan_lib.SUITES))
  parser.add_argument("--scale", required=True, choices=tuple(plan_lib.SCALES))
  parser.add_argument("--workdir", required=True, help="the suite's folder (runs, logs, report)")
  parser.add_argument("--arms", default=",".join(plan_lib.DEFAULT_ARMS),
                      help=f"comma-separated; from {', '.join(plan_lib.ARM_SPECS)} (+ mlm++@exlm, mlm++@maelm)")
  parser.add_argument("--seeds", default=None, help="fine-tuning seeds, e.g. 0,1,2 (default: the scale's)")
  parser.add_argument("--tasks", default=None, help="fine-tuning tasks, e.g. bbbp,bace,esol (default: the scale's)")
  parser.add_argument("--encoder", default=plan_lib.SHARED, choices=plan_lib.ENCODERS)
  parser.add_argument("--dry_run", action="store_true",
                      help="print the plan with estimated FLOPs and wall time per run (one measured step per "
                      "distinct config); no run starts, no workdir is written")
  parser.add_argument("--python", default=sys.executable, help="interpreter for the runs")
  return parser.parse_args(argv)


def _list(text: str | None, cast=str):
  return None if text is None else [cast(x.strip()) for x in text.split(",") if x.strip()]


def command(run: dict, python: str) -> list[str]:
  if run["module"] == "main":
    return [python, os.path.join(REPO, "main.py"), *run["args"]]
  return [python, "-m", "exlm_jax.analysis", *run["args"]]


def _ready(run: dict, plan: dict, done: set[str]) -> str | None:
  """Why `run` cannot start yet (a run it needs is not finished), else None."""
  if run["kind"] == "pretrain":
    return None
  if run["kind"] in ("finetune", "dag_view"):
    need = [f"pretrain/{plan_lib.arm_dir(run['arm'])}"]
  else:
    need = [r["name"] for r in plan["runs"] if r["kind"] == "pretrain" and r["workdir"] in run["args"]]
  missing = [n for n in need if n not in done]
  return f"needs {', '.join(missing)}" if missing else None


class ProgressLine:
  """The suite's one progress line (rewritten in place on a terminal, one line per change elsewhere)."""

  def __init__(self, total: int):
    self.total, self.started, self.tty = total, time.time(), sys.stdout.isatty()
    self.done = self.skipped = self.failed = 0

  def show(self, now: str) -> None:
    minutes = (time.time() - self.started) / 60
    text = (f"[compare] {self.done + self.skipped}/{self.total} runs finished ({self.skipped} already done, "
            f"{self.failed} failed) | {now} | {minutes:.1f} min")
    print(("\r" + text + "\033[K") if self.tty else text, end="" if self.tty else "\n", flush=True)


class Stopped(Exception):
  """The harness got SIGTERM (raised by the handler `main` installs)."""


def _raise_stopped(signum, frame):
  del signum, frame
  raise Stopped()


def run_child(cmd: list[str], log, env: dict) -> int:
  """Runs one run's process to its end and returns its exit code. A SIGTERM or Ctrl-C to the harness is passed on
  as SIGTERM (main.py then saves a checkpoint and exits) and the harness waits for it before stopping, so no
  orphaned run keeps training or holds its workdir's lock."""
  child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
  try:
    return child.wait()
  except (KeyboardInterrupt, Stopped):
    child.send_signal(signal.SIGTERM)
    child.wait()
    raise


def execute(plan: dict, python: str) -> list[str]:
  """Launches every unfinished run of `plan` in order (skipping those whose inputs failed); returns the failures."""
  workdir = plan["workdir"]
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  progress = ProgressLine(len(plan["runs"]))
  done, failed = set(), []
  for run in plan["runs"]:
    if plan_lib.finished(run, plan["seeds"]):
      done.add(run["name"])
      progress.skipped += 1
      continue
    blocked = _ready(run, plan, done)
    if blocked:
      failed.append(f"{run['name']} (not run: {blocked})")
      progress.failed += 1
      continue
    progress.show(f"running {run['name']}")
    log_path = os.path.join(workdir, "logs", run["name"].replace("/", "__") + ".log")
    cmd = command(run, python)
    started = time.time()
    with open(log_path, "a") as log:
      log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
      log.flush()
      rc = run_child(cmd, log, {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    with open(os.path.join(workdir, LAUNCHES), "a") as f:
      f.write(json.dumps({"run": run["name"], "started": started, "seconds": time.time() - started, "rc": rc,
                          "log": log_path}) + "\n")
    if rc == 0 and plan_lib.finished(run, plan["seeds"]):
      done.add(run["name"])
      progress.done += 1
    else:
      failed.append(f"{run['name']} (exit {rc}; log {log_path})")
      progress.failed += 1
  progress.show("all runs launched")
  if progress.tty:
    print()
  return failed


def dry_run(plan: dict) -> int:
  """Prints the plan with estimated FLOPs, real tokens and wall time per run; starts no run."""
  import main as main_py  # pylint: disable=g-import-not-at-top  (main.py's config loading; JAX from here on)
  from exlm_jax.compare import estimate  # pylint: disable=g-import-not-at-top
  result = estimate.estimate(plan, main_py.load_config)
  print(f"[compare] plan: {plan['suite']} suite, {plan['scale']} scale, {plan['encoder']} encoder; "
        f"{len(plan['arms'])} arms x {len(plan['tasks'])} tasks x {len(plan['seeds'])} seeds; workdir {plan['workdir']}")
  for arm, m in result["measured"].items():
    print(f"[compare] measured ({arm}'s config): setup {m['setup_s']:.1f}s, compile {m['compile_s']:.1f}s, step "
          f"{m['step_s'] * 1e3:.0f} ms, {m['flops_per_step']:.3g} FLOPs/step, slot utilisation "
          f"{m['slot_utilisation']:.2f}")
  print(f"{'run':<34} {'steps':>8} {'FLOPs':>10} {'real tokens':>12} {'est. wall':>10}  done")
  for run in plan["runs"]:
    est = result["runs"].get(run["name"])
    state = "yes" if plan_lib.finished(run, plan["seeds"]) else "no"
    if est is None:
      print(f"{run['name']:<34} {'':>8} {'':>10} {'':>12} {'(small)':>10}  {state}")
      continue
    tokens = "" if est["real_tokens"] is None else f"{est['real_tokens']:.3g}"
    print(f"{run['name']:<34} {est['steps']:>8} {est['flops']:>10.3g} {tokens:>12} "
          f"{est['wall_s'] / 60:>8.1f} m  {state}")
  total = result["total_wall_s"]
  cores = os.cpu_count() or 1
  print(f"[compare] each run also starts a fresh interpreter: {result['process_startup_s']:.1f}s (included)")
  print(f"[compare] estimated total: {total / 3600:.2f} h wall on this machine ({cores} cores: "
        f"{total * cores / 3600:.2f} CPU-hours), analyses and the report not included")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    plan = plan_lib.build(args.suite, args.scale, args.workdir, _list(args.arms), _list(args.seeds, int),
                          _list(args.tasks), args.encoder)
  except (ValueError, FileNotFoundError) as e:
    print(f"compare.py: error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    return dry_run(plan)
  os.makedirs(plan["workdir"], exist_ok=True)
  with open(os.path.join(plan["workdir"], "plan.json"), "w") as f:
    json.dump(plan, f, indent=1, default=str)
  signal.signal(signal.SIGTERM, _raise_stopped)
  try:
    failed = execute(plan, args.python)
  except (KeyboardInterrupt, Stopped):
    print("\n[compare] stopped; the running run saved its state: rerun the same command to resume", file=sys.stderr)
    return 130
  from exlm_jax.compare import report  # pylint: disable=g-import-not-at-top  (JAX, matplotlib)
  cmd = "python launch/compare.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
  out = report.write(plan, cmd)
  print(f"[compare] report: {out['md']} and {out['json']}")
  for line in failed:
    print(f"[compare] failed: {line}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
