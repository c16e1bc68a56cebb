"""Times the jitted train step of every objective: step time, tokens/s, ratio to the baseline (MLM), DAG share.

  python bench/step_time.py --size small --seq_len 128 --batch 16   # every objective; k=1,2,4,8 where it has copies
  python bench/step_time.py --objective mlm --objective maelm --objective maelm:decoder_layers=1
  python bench/step_time.py --objective mlm --objective exlm --k 4 --size base --dtype bfloat16 \
      --seq_len 512 --batch 64 --json out.json
  python bench/step_time.py --objective mlm --data_path '$DATA/text/agnews/dev.tsv'   # input- or compute-bound?
  python bench/step_time.py --objective mlm --data_path '$DATA/smiles/moses/test.csv.gz' --data_name smiles \
      --packing on,off                                   # real MOSES batches, packed vs one molecule per block

Each row is a real pretraining config (`config_lib.pretrain_config(objective, size)` + the objective's
default block, `Objective.default_config`; `--set dotted.key=value` overrides, where a key under another
objective's block, e.g. `maelm.decoder_layers`, only touches that objective's rows). `--k N` is
`NAME:<copies option>=N` for every objective with copies per token (`Objective.copies_option`: ExLM,
Repeated-MLM). The step is the trainer's own (`TrainSetup.compile_train_step`: AOT-compiled, state
donated, masking inside the step) on full-length synthetic blocks `<s> x ... x </s>`, or with `--packing`
on real batches of the training pipeline (`--data_path`, `--data_name`): one row per objective and
packing value (on = several examples per block, off = one per block), the vocabulary the tokenizer gives.
All rows are compiled and warmed up first, then timed round-robin (`--rounds` x `--steps`, each step
ended by `block_until_ready`) so load drifting on a shared host hits every row alike; the table shows
the median.

Columns: step ms (median), tokens/s (batch x seq_len slots, padding included, as the trainer's progress
line), real tok/s (real tokens counted by the step on device / step time) and slots % (real / all slots),
xMLM (step-time ratio to the row of `objectives.BASELINE`), CPU ms + xMLM (CPU only: process CPU time per
step over all threads, steadier than wall time when other jobs share the host), GFLOP (analytic model FLOPs
per step at the static shapes, exlm_jax/train/flops.py), TFLOP/s per device (static count), MFU (real FLOPs:
the same formulas at the batch's actual lengths, over the device peak from `flops.PEAK_FLOPS`; none on
CPU), DAG % (rows whose FLOPs model has a DAG programme, i.e. ExLM: the DAG loss forward+backward timed
alone on the step's shapes, over the step time) and mem MiB (XLA temp + argument bytes of the compiled
step, per device).
--profile DIR writes a jax.profiler trace of 3 steps per row (open with TensorBoard / xprof).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from exlm_jax import config_lib, objectives
from exlm_jax.data import vocab
from exlm_jax.objectives import dag
from exlm_jax.train import flops, partitioning, steps

BASELINE = objectives.BASELINE
DEFAULT_VOCAB = {"tiny": 1000, "small": 8000, "base": 32768, "large": 32768}


# -- configs and inputs -------------------------------------------------------------------------


def apply_overrides(config, overrides: list[str]):
  """`--set a.b=value` overrides, typed like the current value; the row's objective block holds every option
  (its defaults merged in), and keys under another objective's block are skipped for this row."""
  config = objectives.with_defaults(config)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected dotted.key=value, e.g. --set model.remat=full")
    section = key.split(".")[0]
    if section in objectives.names() and section != config.objective:
      continue
    config_lib.override(config, key, text, "--set ")
  return config


def make_config(objective: str, overrides: list[str], args, data=None):
  """The pretraining config of one benchmark row: the objective's default block, then `overrides`; with
  `data` (a RealData) its data block (packing and the resolved bound) and the tokenizer's vocabulary."""
  config = config_lib.pretrain_config(objective, args.size)
  config.model.update(vocab_size=args.vocab or DEFAULT_VOCAB[args.size], dtype=args.dtype, remat=args.remat)
  config.seq_len, config.batch_size = args.seq_len, args.batch
  config.warmup_steps = 1
  if data is not None:
    config.data = data.config
    config.model.vocab_size = data.vocab_size
  return apply_overrides(config, overrides)


class RealData(NamedTuple):
  """Real training batches of one packing value: the data block, the tokenizer's vocabulary, host batches."""

  config: Any  # config.data, with max_examples_per_block resolved when packing
  vocab_size: int
  batches: list  # pipeline batches as the objectives take them (steps.pipeline_batch)
  summary: dict


def real_data(args, packing: bool, workdir: str) -> RealData:
  """`args.data_batches` consecutive batches of the real training pipeline (`--data_path`) at the bench's
  batch shape, packed or one example per block."""
  from exlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.pretrain_config("mlm", args.size)
  config.seq_len, config.batch_size = args.seq_len, args.batch
  config.data = config_lib.data_config(args.data_name, args.data_path, max_examples=args.data_max_examples,
                                       tfds_dir=args.tfds_dir or os.path.join(workdir, "tfds"))
  config.data.packing = packing
  config.data.max_examples_per_block = -1
  data = pipeline.load_pretraining_data(config, os.path.join(workdir, f"packing_{packing}"))
  config.data.max_examples_per_block = data.max_examples_per_block
  iterator = data.train_iterator()
  batches = [steps.pipeline_batch(next(iterator), packing) for _ in range(args.data_batches)]
  return RealData(config.data, data.tokenizer.vocab_size, batches, data.summary)


def synthetic_blocks(batch: int, seq_len: int, vocab_size: int, seed: int) -> np.ndarray:
  """(batch, seq_len) int32 full-length blocks `<s> x ... x </s>`, x uniform over non-special tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(vocab.NUM_SPECIAL, vocab_size, size=(batch, seq_len), dtype=np.int32)
  tokens[:, 0], tokens[:, -1] = vocab.BOS, vocab.EOS
  return tokens


def dag_inputs(config, rows: int, groups: int, size: int):
  """DAG inputs of the step's shapes: emit (R, G, S), trans (R, S, S) log-softmax over later vertices,
  num_targets (R,) = m + 2, num_vertices (R,) = k (m + 2); S = k G, m = round(p n); R = DAG rows of the batch
  (batch x examples per block when packed)."""
  batch, n, k = rows, config.seq_len, size // groups
  key_e, key_t = jax.random.split(jax.random.key(0))
  num_targets = jnp.full((batch,), min(round(config.mask_prob * n), groups - 2) + 2, jnp.int32)
  num_vertices = k * num_targets
  valid = jnp.arange(size)[None, :] < num_vertices[:, None]
  allowed = valid[:, :, None] & valid[:, None, :] & (jnp.arange(size)[:, None] < jnp.arange(size)[None, :])
  logits = jnp.where(allowed, jax.random.normal(key_t, (batch, size, size)), -1e9)
  trans = jnp.where(allowed, jax.nn.log_softmax(logits, axis=-1), -jnp.inf)
  emit = -jnp.abs(jax.random.normal(key_e, (batch, groups, size))) * 3.0
  return emit, trans, num_targets, num_vertices


# -- timing ---------------------------------------------------------------------------------------


def median_seconds(fn, repeats: int) -> float:
  """Median wall seconds of fn() ended by block_until_ready, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


class Run:
  """One row: compiled step, live (donated) state, device batches and the timed samples."""

  def __init__(self, objective: str, k: int | None, label: str, overrides: list[str], args, mesh,
               data: RealData | None = None):
    self.objective, self.k, self.label, self.overrides = objective, k, label, overrides
    self.config = config = make_config(objective, overrides, args, data)
    self.packing = None if data is None else steps.packed(config)  # None: synthetic full blocks
    self.setup = steps.TrainSetup.create(config, mesh)
    started = time.perf_counter()
    self.compiled = self.setup.compile_train_step()
    self.compile_s = time.perf_counter() - started
    self.state = self.setup.init_state()
    host = data.batches if data is not None else [
        synthetic_blocks(config.batch_size, config.seq_len, config.model.vocab_size, seed) for seed in range(2)]
    self.batches = [self.setup.shard_batch(batch) for batch in host]
    self.wall, self.cpu = [], []  # seconds per timed step: wall clock, process CPU (all threads)
    self.real_tokens, self.examples = [], []  # counted by the step, per timed step

  def step(self) -> tuple[float, float, dict]:
    batch = self.batches[len(self.wall) % len(self.batches)]
    start, cpu_start = time.perf_counter(), time.process_time()
    self.state, metrics = self.compiled(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start, time.process_time() - cpu_start, metrics

  def time(self, num_steps: int) -> None:
    for _ in range(num_steps):
      wall, cpu, metrics = self.step()
      self.wall.append(wall)
      self.cpu.append(cpu)
      self.real_tokens.append(int(metrics["real_tokens"]))
      self.examples.append(int(metrics["examples"]))

  def memory_bytes(self) -> int | None:
    mem = self.compiled.memory_analysis()
    return None if mem is None else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes)

  def dag_seconds(self, repeats: int) -> float | None:
    """DAG loss forward+backward alone on this row's shapes (rows whose FLOPs model runs the DAG programme)."""
    counted = flops.breakdown(self.config)
    if counted.dag == 0:
      return None
    shapes = dict(counted.shapes)
    rows = self.config.batch_size * shapes["dag_rows"]
    emit, trans, num_targets, num_vertices = dag_inputs(self.config, rows, shapes["dag_groups"], shapes["dag_vertices"])
    loss = lambda e, t: jnp.sum(dag.dag_loss(e, t, num_targets, num_vertices))
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return median_seconds(lambda: fwd_bwd(emit, trans), repeats)


def input_seconds(args, config) -> float:
  """Median seconds per `next()` of the real Grain training iterator at `config`'s batch shape."""
  from exlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.data = config_lib.data_config(args.data_name, args.data_path)
  with tempfile.TemporaryDirectory() as workdir:
    config.data.tfds_dir = os.path.join(workdir, "tfds")  # built here, not in ~/tensorflow_datasets
    iterator = pipeline.load_pretraining_data(config, workdir).train_iterator()
    for _ in range(3):
      next(iterator)
    return median_seconds(lambda: next(iterator), 20)


# -- report ---------------------------------------------------------------------------------------


def record(run: Run, baseline: Run | None, args, peak: float | None, dag_s: float | None) -> dict:
  """One JSON record per row; the ratios are to the `baseline` row (`objectives.BASELINE`)."""
  config, device = run.config, jax.devices()[0]
  step_s, cpu_s = statistics.median(run.wall), statistics.median(run.cpu)
  model_flops = flops.train_flops_per_step(config)
  real_tokens, examples = statistics.mean(run.real_tokens), statistics.mean(run.examples)
  real_flops = flops.real_train_flops_per_step(config, real_tokens, examples)
  slots = config.batch_size * config.seq_len
  return {
      "objective": run.objective, "k": run.k, "packing": run.packing, "size": args.size, "seq_len": config.seq_len,
      "batch": config.batch_size, "dtype": config.model.dtype, "remat": config.model.remat,
      "vocab_size": config.model.vocab_size, "overrides": run.overrides,
      "data_path": args.data_path if run.packing is not None else None,
      "step_time_s": step_s, "num_samples": len(run.wall),
      "tokens_per_s": slots / step_s, "real_tokens_per_s": real_tokens / step_s,
      "slot_utilisation": real_tokens / slots, "real_tokens_per_step": real_tokens, "examples_per_step": examples,
      f"ratio_to_{BASELINE}": step_s / statistics.median(baseline.wall) if baseline else None,
      "cpu_time_s": cpu_s,
      f"cpu_ratio_to_{BASELINE}": cpu_s / statistics.median(baseline.cpu) if baseline else None,
      "flops_per_step": model_flops, "flops_breakdown": flops.breakdown(config).as_dict(),
      "real_flops_per_step": real_flops, "xla_flops_per_step": flops.xla_flops(run.compiled),
      **flops.perf_metrics(model_flops, step_s, jax.device_count(), peak, real_flops),
      "dag_time_s": dag_s, "dag_fraction": dag_s / step_s if dag_s is not None else None,
      "peak_memory_bytes": run.memory_bytes(), "compile_s": run.compile_s,
      "device": device.platform, "device_kind": device.device_kind, "num_devices": jax.device_count(),
      "jax_version": jax.__version__,
  }


def _cell(value, spec: str, scale: float = 1.0) -> str:
  return "-" if value is None else format(value * scale, spec)


def print_table(records: list[dict], header: str) -> None:
  cpu, width = records[0]["device"] == "cpu", max(len(r["label"]) for r in records + [{"label": "objective"}])
  ratio = "x" + BASELINE.upper()
  title = (f"{'objective':<{width}} {'step ms':>8} {'tokens/s':>9} {'real tok/s':>10} {'slots %':>7} {ratio:>5} "
           + (f"{'CPU ms':>7} {ratio:>5} " if cpu else "")
           + f"{'GFLOP':>7} {'TFLOP/s/dev':>11} {'MFU %':>6} {'DAG %':>6} {'mem MiB':>8}")
  print(header, title, "-" * len(title), sep="\n")
  for r in records:
    print(f"{r['label']:<{width}} {r['step_time_s'] * 1e3:>8.1f} {r['tokens_per_s']:>9,.0f} "
          f"{r['real_tokens_per_s']:>10,.0f} {100 * r['slot_utilisation']:>7.1f} "
          f"{_cell(r[f'ratio_to_{BASELINE}'], '.2f'):>5} "
          + (f"{r['cpu_time_s'] * 1e3:>7.0f} {_cell(r[f'cpu_ratio_to_{BASELINE}'], '.2f'):>5} " if cpu else "")
          + f"{r['flops_per_step'] / 1e9:>7.1f} {r['tflops_per_device']:>11.3f} "
          f"{_cell(r.get('mfu'), '.1f', 100):>6} {_cell(r['dag_fraction'], '.1f', 100):>6} "
          f"{_cell(r['peak_memory_bytes'], '.0f', 2**-20):>8}")


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  names = sorted(objectives.names(), key=lambda name: name != BASELINE)  # the baseline row first
  with_copies = [objectives.get(name).title for name in names if objectives.get(name).copies_option]
  parser.add_argument("--objective", action="append",
                      help=f"{' | '.join(names)} | all, or NAME:key=value,... for a row with that objective's "
                           "block overridden (e.g. maelm:decoder_layers=1); repeatable; default all")
  parser.add_argument("--k", action="append", type=int,
                      help=f"copies per token of {', '.join(with_copies)}, repeatable; default 1 2 4 8")
  parser.add_argument("--size", default="small", choices=tuple(config_lib.MODEL_SIZES))
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32, help="global batch in sequences")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per row and round")
  parser.add_argument("--rounds", type=int, default=1, help="round-robin timing rounds over the rows")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
  parser.add_argument("--vocab", type=int, default=0, help=f"vocabulary size (default {DEFAULT_VOCAB})")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
  parser.add_argument("--no_dag", action="store_true", help="skip timing the DAG loss alone")
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (default: table)")
  parser.add_argument("--profile", default="", help="write a jax.profiler trace of 3 steps per row here")
  parser.add_argument("--data_path", default="", help="also time the real input pipeline on this corpus; with "
                      "--packing: rows on its real batches")
  parser.add_argument("--data_name", default="text", choices=("text", "smiles"))
  parser.add_argument("--packing", default="", help="on,off | on | off: real-data rows (needs --data_path), one "
                      "per objective and value: several examples per block (on) or one per block (off)")
  parser.add_argument("--data_max_examples", type=int, default=20_000, help="records read from --data_path")
  parser.add_argument("--data_batches", type=int, default=4, help="distinct real batches a row cycles through")
  parser.add_argument("--tfds_dir", default="", help="where the corpus is built (default: a temporary folder)")
  parser.add_argument("--json", default="", help="write one record per row here")
  args = parser.parse_args(argv)
  args.ks = args.k or [1, 2, 4, 8]
  args.packings = []
  for value in filter(None, args.packing.split(",")):
    if value not in ("on", "off"):
      parser.error(f"--packing {args.packing!r}: a comma list of on / off, e.g. --packing on,off")
    args.packings.append(value == "on")
  if args.packings and not args.data_path:
    parser.error("--packing times real batches: give the corpus, e.g. --data_path '$DATA/smiles/moses/test.csv.gz' "
                 "--data_name smiles")
  args.plan = []  # (objective, k, label, block overrides, packing or None)
  for spec in args.objective or ["all"]:
    name, _, block = spec.partition(":")
    if name not in (*names, "all"):
      parser.error(f"--objective {spec!r}: choose {', '.join(names)} or all (optionally NAME:key=value,...)")
    extra = [f"{name}.{item}" for item in block.split(",") if item]
    for objective in (names if name == "all" else (name,)):
      copies = objectives.get(objective).copies_option
      for k in (args.ks if copies else (None,)):
        label = objective if k is None else f"{objective} k={k}"
        label = f"{label} {block}" if block else label
        row = extra if k is None else [f"{objective}.{copies}={k}", *extra]
        for packing in args.packings or [None]:
          suffix = "" if packing is None else (" packed" if packing else " padded")
          args.plan.append((objective, k, label + suffix, row, packing))
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as scratch:
    return _main(args, scratch)


def _main(args, scratch: str) -> list[dict]:
  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops_per_device(device)
  mesh = partitioning.create_mesh(config_lib.pretrain_config().mesh)
  data = {packing: real_data(args, packing, scratch) for packing in args.packings}
  for packing, real in data.items():
    print(f"data packing={packing}: " + ", ".join(f"{k} {real.summary[k]}" for k in _DATA_COUNTS if k in real.summary),
          file=sys.stderr, flush=True)
  runs = []
  for objective, k, label, extra, packing in args.plan:
    runs.append(Run(objective, k, label, args.set + extra, args, mesh, data.get(packing)))
    for _ in range(args.warmup):
      runs[-1].step()
    print(f"compiled {runs[-1].label} in {runs[-1].compile_s:.1f}s", file=sys.stderr, flush=True)

  load = [os.getloadavg()[0]]
  for _ in range(args.rounds):
    for run in runs:
      run.time(args.steps)
  load.append(os.getloadavg()[0])

  if args.profile:
    for run in runs:
      with jax.profiler.trace(os.path.join(args.profile, run.label.replace(" ", "_").replace("=", ""))):
        for _ in range(3):
          run.step()

  baselines = {}  # packing -> the first baseline row with that packing
  for run in runs:
    if run.objective == BASELINE:
      baselines.setdefault(run.packing, run)
  repeats = args.steps * args.rounds
  records = []
  for run in runs:
    dag_s = None if args.no_dag else run.dag_seconds(repeats)
    records.append({"label": run.label, **record(run, baselines.get(run.packing), args, peak, dag_s),
                    "load_average": load})
  _packed_to_padded(records)
  header = (f"{device.platform} ({device.device_kind}) x {jax.device_count()}, jax {jax.__version__} | "
            f"size {args.size}, seq {args.seq_len}, batch {args.batch}, {args.dtype}, remat {args.remat}, "
            f"vocab {', '.join(sorted({str(r['vocab_size']) for r in records}))}"
            f"{''.join(' --set ' + s for s in args.set)}{' | data ' + args.data_path if args.packings else ''} | "
            f"median of {repeats} steps | load avg {load[0]:.1f} -> {load[1]:.1f}")
  print_table(records, header)
  for r in records:
    if r.get("real_ratio_packed_to_padded") is not None:
      print(f"{r['label']}: real tokens/s {r['real_ratio_packed_to_padded']:.2f}x the padded row")
  if args.data_path and not args.packings:
    next_s, step_s = input_seconds(args, runs[0].config), statistics.median(runs[0].wall)
    bound = "INPUT-bound" if next_s > step_s else "compute-bound"
    print(f"input pipeline {args.data_path}: {next_s * 1e3:.1f} ms per batch vs {runs[0].label} step "
          f"{step_s * 1e3:.1f} ms -> {bound}")
    for r in records:
      r["input_batch_s"] = next_s
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {args.json}")
  return records


_DATA_COUNTS = ("train_records", "train_blocks", "slot_utilisation", "examples_per_block", "max_examples_per_block",
                "closed_early", "vocab_size")


def _packed_to_padded(records: list[dict]) -> None:
  """`real_ratio_packed_to_padded` on each packed record: its real tokens/s over the padded row of the same
  objective, k and overrides (None where there is none)."""
  key = lambda r: (r["objective"], r["k"], tuple(r["overrides"]))
  padded = {key(r): r for r in records if r["packing"] is False}
  for r in records:
    other = padded.get(key(r)) if r["packing"] else None
    r["real_ratio_packed_to_padded"] = r["real_tokens_per_s"] / other["real_tokens_per_s"] if other else None


if __name__ == "__main__":
  main()
