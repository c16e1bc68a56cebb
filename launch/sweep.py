"""Expand a config's `get_sweep(arg)` into runs, launch them, and collect their final metrics.

  # print the commands (nothing runs, nothing is written)
  python launch/sweep.py --config configs/mlm_smiles_small.py --workdir runs/mask_sweep --dry_run
  # run them here, one after another, then write runs/mask_sweep/results.{csv,md}
  python launch/sweep.py --config configs/mlm_smiles_small.py:size=tiny --workdir runs/s -- --config.total_steps=50
  # one SLURM job per run (launch/slurm_gpu.sbatch); later collect the table
  python launch/sweep.py --config configs/mlm_smiles_small.py --workdir /shared/runs/s --launcher=slurm
  python launch/sweep.py --config configs/mlm_smiles_small.py --workdir /shared/runs/s --collect_only

A config file may define `get_sweep(arg)` beside `get_config(arg)`: a list of `{dotted.key: value}`
dicts, one per run (`arg` is --sweep_arg). Run i gets its own workdir `<workdir>/<i>_<key=value...>`
and the command `main.py --config <config> --workdir <run dir> --config.<key>=<value> ... <extra>`,
where <extra> is everything after `--`. Every run's `final_metrics.json` (written by
exlm_jax.train.loop) becomes one row of results.csv / results.md; runs without it show their status.
This script imports no JAX (configs are data: exlm_jax.config_lib loads them), so it is cheap to run on
a login node. A sweep key under the objective's own block (`exlm.transitions`) may be absent from the
config, which writes only the options it changes; main.py checks it against the objective's defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ("local", "slurm", "tpu_vm")
MANIFEST = "sweep.json"
METRIC_COLUMNS = ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/perplexity",
                  "perf/tokens_per_s", "perf/step_time_s", "num_params", "wall_time_s")


if REPO not in sys.path:
  sys.path.insert(0, REPO)
from exlm_jax import config_lib  # noqa: E402  pylint: disable=g-import-not-at-top


def load_config_module(config_spec: str):
  """(module, path, arg) for 'path/to/config.py[:arg]'."""
  path, arg = config_lib.split_spec(config_spec)
  return config_lib.load_module(path), path, arg or None


def _check_key(config, dotted: str) -> None:
  """KeyError unless `dotted` names a field of `config` or an option of its objective's block (a config
  writes only the options it changes; main.py checks the rest against the objective's defaults)."""
  section, _, option = dotted.partition(".")
  if section == config.get("objective") and option and "." not in option:
    return
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise KeyError(dotted)
    node = node[part]


def expand(config_spec: str, sweep_arg: str | None = None) -> list[dict[str, Any]]:
  """The config's sweep as a list of override dicts, each key checked against get_config(arg)."""
  module, path, arg = load_config_module(config_spec)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(arg); add one returning a list of {{dotted.key: value}} dicts")
  runs = list(module.get_sweep(sweep_arg))
  if not runs:
    raise ValueError(f"{path}: get_sweep({sweep_arg!r}) returned no runs")
  config = module.get_config(arg)
  for i, overrides in enumerate(runs):
    if not isinstance(overrides, dict):
      raise ValueError(f"{path}: get_sweep run {i} is {type(overrides).__name__}, expected a dict")
    for key in overrides:
      try:
        _check_key(config, key)
      except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}: get_sweep run {i} sets {key!r}, which get_config({arg!r}) does not have") from None
  return runs


def run_name(index: int, overrides: dict[str, Any]) -> str:
  parts = [f"{key.split('.')[-1]}={config_lib.format_value(v)}" for key, v in overrides.items()]
  slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", ",".join(parts))[:80].strip("-")
  return f"{index:02d}_{slug}" if slug else f"{index:02d}"


def main_args(config_spec: str, workdir: str, overrides: dict[str, Any], extra: Sequence[str]) -> list[str]:
  """main.py's arguments for one run."""
  args = ["--config", config_spec, "--workdir", workdir]
  args += [f"--config.{key}={config_lib.format_value(v)}" for key, v in overrides.items()]
  return args + list(extra)


def plan(config_spec: str, workdir: str, sweep_arg: str | None, extra: Sequence[str],
         only: Sequence[int] | None = None) -> list[dict[str, Any]]:
  """[{index, name, overrides, workdir, args}] for every selected run."""
  runs = expand(config_spec, sweep_arg)
  selected = range(len(runs)) if not only else only
  bad = [i for i in selected if not 0 <= i < len(runs)]
  if bad:
    raise ValueError(f"--only {bad}: the sweep has runs 0..{len(runs) - 1}")
  out = []
  for i in selected:
    name = run_name(i, runs[i])
    run_dir = os.path.join(workdir, name)
    out.append(dict(index=i, name=name, overrides=runs[i], workdir=run_dir,
                    args=main_args(config_spec, run_dir, runs[i], extra)))
  return out


def command(run: dict[str, Any], launcher: str, python: str, entry: str) -> list[str]:
  """The command line that starts one run with `launcher`."""
  if launcher == "local":
    return [python, entry] + run["args"]
  if launcher == "slurm":
    return ["sbatch", f"--job-name=exlm-{run['name'][:40]}", f"--output={run['workdir']}/slurm-%j.out",
            os.path.join(REPO, "launch", "slurm_gpu.sbatch")] + run["args"]
  if launcher == "tpu_vm":
    return [os.path.join(REPO, "launch", "tpu_vm.sh"), "run"] + run["args"]
  raise ValueError(f"--launcher={launcher!r}; choose one of {', '.join(LAUNCHERS)}")


# ----------------------------------------------------------------------------------------------
# Results table
# ----------------------------------------------------------------------------------------------

def _flatten(final: dict[str, Any]) -> dict[str, Any]:
  row = {}
  for group in ("train", "eval", "perf"):
    for key, value in (final.get(group) or {}).items():
      row[f"{group}/{key}"] = value
  for key in ("step", "num_params", "wall_time_s", "preempted", "objective"):
    if key in final:
      row[key] = final[key]
  return row


def collect(runs: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
  """(columns, rows): one row per run from its final_metrics.json (status 'missing' without one)."""
  keys = []
  for run in runs:
    keys += [k for k in run["overrides"] if k not in keys]
  rows = []
  for run in runs:
    row = {"run": run["name"], **run["overrides"]}
    path = os.path.join(run["workdir"], "final_metrics.json")
    if os.path.exists(path):
      with open(path) as f:
        final = json.load(f)
      row.update(_flatten(final))
      row["status"] = "preempted" if final.get("preempted") else "done"
    else:
      row["status"] = run.get("status") or "missing"
    rows.append(row)
  present = {k for row in rows for k in row}
  columns = ["run", *keys, "status", "step"] + [c for c in METRIC_COLUMNS if c in present]
  return [c for c in columns if c in present or c in keys], rows


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)


def write_tables(workdir: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
  """Writes results.csv and results.md under `workdir`; returns the Markdown."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_cell(row.get(c)) for c in columns])
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
  markdown = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown)
  return markdown


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  argv = list(argv)
  extra = []
  if "--" in argv:
    cut = argv.index("--")
    argv, extra = argv[:cut], argv[cut + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file with get_config and get_sweep, e.g. "
                      "configs/mlm_smiles_small.py:size=tiny")
  parser.add_argument("--workdir", required=True, help="parent folder; run i goes to <workdir>/<i>_<overrides>")
  parser.add_argument("--sweep_arg", default=None, help="argument passed to get_sweep(arg)")
  parser.add_argument("--launcher", default="local", choices=LAUNCHERS,
                      help="local: run here one after another; slurm: sbatch launch/slurm_gpu.sbatch per run; "
                      "tpu_vm: launch/tpu_vm.sh run per run (sequentially, one TPU VM)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands; run and write nothing")
  parser.add_argument("--collect_only", action="store_true", help="only (re)build results.csv/md from the runs")
  parser.add_argument("--only", default="", help="comma-separated run indices to launch, e.g. 0,2")
  parser.add_argument("--python", default=sys.executable, help="interpreter for local runs")
  parser.add_argument("--entry", default=os.path.join(REPO, "main.py"), help="script local runs execute")
  parser.add_argument("--timeout", type=float, default=0, help="seconds per local run (0 = no limit)")
  return parser.parse_args(argv), extra


def _launch_local(cmd: list[str], run: dict[str, Any], timeout: float) -> str:
  os.makedirs(run["workdir"], exist_ok=True)
  log_path = os.path.join(run["workdir"], "run.log")
  started = time.time()
  with open(log_path, "w") as log:
    try:
      rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout or None).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
  status = "ok" if rc == 0 else f"failed ({rc})"
  print(f"[sweep] {run['name']}: {status} in {time.time() - started:.0f}s (log {log_path})", flush=True)
  return status


def main(argv: Sequence[str] | None = None) -> int:
  args, extra = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    only = [int(i) for i in args.only.split(",") if i.strip()] if args.only else None
    runs = plan(args.config, args.workdir, args.sweep_arg, extra, only)
  except (ValueError, FileNotFoundError) as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2
  commands = [command(run, args.launcher, args.python, args.entry) for run in runs]
  if args.dry_run:
    for cmd in commands:
      print(shlex.join(cmd))
    return 0
  if not args.collect_only:
    os.makedirs(args.workdir, exist_ok=True)
    manifest = [{**run, "command": cmd} for run, cmd in zip(runs, commands)]
    with open(os.path.join(args.workdir, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2, default=str)
    for run, cmd in zip(runs, commands):
      print(f"[sweep] {run['name']}: {shlex.join(cmd)}", flush=True)
      if args.launcher == "local":
        run["status"] = _launch_local(cmd, run, args.timeout)
      else:
        os.makedirs(run["workdir"], exist_ok=True)
        subprocess.run(cmd, check=True)
        run["status"] = "submitted"
    if args.launcher != "local":
      print(f"[sweep] submitted {len(runs)} run(s); when they finish: python launch/sweep.py --config "
            f"{args.config} --workdir {args.workdir} --collect_only")
      return 0
  columns, rows = collect(runs)
  markdown = write_tables(args.workdir, columns, rows)
  print(markdown, end="")
  print(f"[sweep] results: {os.path.join(args.workdir, 'results.csv')} and results.md")
  failed = [row["run"] for row in rows if row["status"] not in ("done", "preempted")]
  return 1 if failed and not args.collect_only else 0


if __name__ == "__main__":
  sys.exit(main())
