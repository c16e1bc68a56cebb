"""launch/compare.py: the plan (JAX-free), the paired statistics, and the tiny suite end to end on real data."""

import itertools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from exlm_jax.compare import plan as plan_lib
from exlm_jax.compare import stats

REPO = pathlib.Path(__file__).resolve().parents[1]
OBJECTIVE_FIELDS = ("objective", "budget", "matched_to")


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


def _resolved(arm_row):
  return plan_lib.flatten(plan_lib.resolved_config(arm_row["config"], arm_row["overrides"]))


def _objective_key(key, arm_rows):
  top = key.split(".")[0]
  return top in OBJECTIVE_FIELDS or top in {row["objective"] for row in arm_rows}


@pytest.mark.parametrize("suite", ["smiles", "text"])
def test_shared_encoder_arms_differ_only_in_the_objective(suite, tmp_path):
  arms = list(plan_lib.ARM_SPECS)
  plan = plan_lib.build(suite, "tiny", str(tmp_path), arms=arms)
  rows = {row["name"]: row for row in plan["arms"]}
  assert set(rows) == {"mlm", "mlm++@exlm", "mlm++@maelm", "exlm", "maelm", "exlm_k2", "exlm_k8", "exlm_ctc",
                       "exlm_rope1d", "maelm_dec1", "maelm_dec2"}
  reference = _resolved(rows["mlm"])
  for name, row in rows.items():
    fields = _resolved(row)
    differ = {k for k in set(fields) | set(reference) if fields.get(k) != reference.get(k)}
    assert all(_objective_key(k, plan["arms"]) for k in differ), (name, sorted(differ))
  # the shared encoder is ExLM's: rope2d, pre-LN, no embedding LayerNorm, for MAE-LM too
  maelm = _resolved(rows["maelm"])
  assert (maelm["model.positions"], maelm["model.pre_ln"], maelm["model.embed_layernorm"]) == ("rope2d", True, False)
  # what each arm trains
  assert _resolved(rows["exlm_k8"])["exlm.num_copies"] == 8
  assert _resolved(rows["exlm_ctc"])["exlm.transitions"] == "ctc"
  assert _resolved(rows["exlm_rope1d"])["exlm.positions"] == "rope1d_shared"
  assert _resolved(rows["maelm_dec1"])["maelm.decoder_layers"] == 1
  for family in ("exlm", "maelm"):
    pp = _resolved(rows[f"mlm++@{family}"])
    assert (pp["objective"], pp["budget"], pp["matched_to.objective"]) == ("mlm", "equal_flops", family)
    assert pp["matched_to.total_steps"] == _resolved(rows[family])["total_steps"] == plan_lib.SCALES["tiny"].pretrain[
        "total_steps"]
    method_block = {k.partition(".")[2]: v for k, v in _resolved(rows[family]).items() if k.startswith(family + ".")}
    assert {k.partition("options.")[2]: v for k, v in pp.items() if k.startswith("matched_to.options.")} == method_block
  # every non-baseline arm is compared with MLM; a method also with its own MLM++
  pairs = {(c["method"], c["baseline"]) for c in plan["comparisons"]}
  assert {("exlm", "mlm"), ("exlm", "mlm++@exlm"), ("maelm", "mlm++@maelm"), ("maelm_dec1", "mlm")} <= pairs
  assert ("maelm", "mlm++@exlm") not in pairs
  kinds = [r["kind"] for r in plan["runs"]]
  assert kinds.count("pretrain") == len(rows) and kinds.count("finetune") == len(rows)
  assert kinds.count("dag_view") == sum(row["objective"] == "exlm" for row in plan["arms"])


def test_paper_encoder_groups_each_method_with_its_own_baselines(tmp_path):
  plan = plan_lib.build("smiles", "tiny", str(tmp_path), arms=["mlm", "mlm++", "exlm", "maelm"], encoder="paper")
  rows = {row["name"]: row for row in plan["arms"]}
  assert set(rows) == {"mlm@exlm", "mlm@maelm", "mlm++@exlm", "mlm++@maelm", "exlm", "maelm"}
  for family in ("exlm", "maelm"):
    group = [row for row in plan["arms"] if row["group"] == family]
    reference = _resolved(rows[f"mlm@{family}"])
    for row in group:
      fields = _resolved(row)
      differ = {k for k in set(fields) | set(reference) if fields.get(k) != reference.get(k)}
      assert all(_objective_key(k, plan["arms"]) for k in differ), (row["name"], sorted(differ))
  assert _resolved(rows["maelm"])["model.positions"] == "absolute+relbias"  # MAE-LM's own encoder
  assert {c["group"] for c in plan["comparisons"] if c["method"] == "maelm"} == {"maelm"}
  assert all(c["baseline"].endswith("@" + rows[c["method"]]["family"]) for c in plan["comparisons"])
  assert sum(r["kind"] == "analysis" for r in plan["runs"]) == 2


def test_plan_errors_are_one_line(tmp_path):
  for kwargs, text in ((dict(arms=["mlm", "bert"]), "unknown arm"), (dict(tasks=["sst2"]), "not in the smiles suite"),
                       (dict(arms=["exlm@maelm"]), "only mlm and mlm++"), (dict(seeds=[]), "--seeds is empty")):
    with pytest.raises(ValueError, match=text):
      plan_lib.build("smiles", "tiny", str(tmp_path), **kwargs)


def test_plan_and_cli_import_no_jax():
  code = ("import sys; sys.path.insert(0, 'launch'); import compare; from exlm_jax.compare import plan, stats; "
          "plan.build('smiles', 'cpu' if 'packing' in plan.config_lib.data_config() else 'tiny', '/tmp/x'); "
          "assert 'jax' not in sys.modules, 'jax imported'")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


# ----------------------------------------------------------------------------------------------
# Statistics, against brute force
# ----------------------------------------------------------------------------------------------


def _brute_sign_p(wins, n):
  tail = sum(math.comb(n, k) for k in range(0, min(wins, n - wins) + 1)) / 2 ** n
  return min(1.0, 2 * tail)


def _brute_wilcoxon_p(d):
  """Exact two-sided p of the signed-rank statistic min(W+, W-) by enumerating every sign pattern."""
  ranks = np.argsort(np.argsort(np.abs(d))) + 1.0
  observed = min(ranks[d > 0].sum(), ranks[d < 0].sum())
  stats_ = [min(sum(r for r, s in zip(ranks, signs) if s), sum(r for r, s in zip(ranks, signs) if not s))
            for signs in itertools.product((0, 1), repeat=len(d))]
  return float(np.mean(np.asarray(stats_) <= observed + 1e-12))


def test_paired_statistics_match_brute_force():
  rng = np.random.default_rng(0)
  metrics = {"bbbp": "roc_auc", "esol": "rmse"}
  method = {"bbbp": {s: 0.7 + 0.05 * rng.standard_normal() for s in range(3)},
            "esol": {s: 1.0 + 0.1 * rng.standard_normal() for s in range(4)}}
  base = {"bbbp": {s: 0.69 + 0.05 * rng.standard_normal() for s in range(3)},
          "esol": {s: 1.1 + 0.1 * rng.standard_normal() for s in range(3)}}  # seed 3 unpaired: left out
  out = stats.paired(method, base, metrics)
  diffs = [method["bbbp"][s] - base["bbbp"][s] for s in range(3)] + [base["esol"][s] - method["esol"][s]
                                                                    for s in range(3)]
  scale = [np.mean(list(base["bbbp"].values()))] * 3 + [np.mean(list(base["esol"].values()))] * 3
  rel = np.asarray(diffs) / np.asarray(scale)
  assert out["n"] == 6 and out["wins"] == sum(d > 0 for d in diffs)
  assert out["per_task"]["esol"]["mean_diff"] == pytest.approx(np.mean(diffs[3:]))
  assert out["mean_relative_diff"] == pytest.approx(rel.mean())
  assert out["sign_p"] == pytest.approx(_brute_sign_p(out["wins"], 6))
  assert out["wilcoxon_p"] == pytest.approx(_brute_wilcoxon_p(rel))


def test_verdict_follows_the_statistics():
  won = {"n": 8, "wins": 8, "losses": 0, "ties": 0, "mean_relative_diff": 0.05, "sign_p": 0.0078,
         "wilcoxon_p": 0.0078, "why": None}
  assert "exlm is better than mlm" in stats.verdict("exlm", "mlm", won)
  assert "no detectable difference, Wilcoxon p = 0.41" in stats.verdict("exlm", "mlm", {**won, "wilcoxon_p": 0.41})
  assert "too few pairs" in stats.verdict("exlm", "mlm", {**won, "n": 3, "wins": 3})
  assert stats.best_per_column({"a": {"esol": {"mean": 1.2}}, "b": {"esol": {"mean": 0.9}}}, {"esol": "rmse"}) == \
      {"esol": "b"}


# ----------------------------------------------------------------------------------------------
# The tiny suite end to end (real MOSES + BBBP)
# ----------------------------------------------------------------------------------------------

ARMS = "mlm++,exlm"  # MLM++ at ExLM's FLOPs and ExLM: every kind of run (MAE-LM's is covered by the plan tests)


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data):
  cache = os.environ.get("EXLM_TEST_XLA_CACHE") or str(tmp_path_factory.mktemp("xla_cache"))
  base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  return {**base, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "JAX_COMPILATION_CACHE_DIR": cache,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "EXLM_DATA_DIR": str(shared_data), "EXLM_TFDS_DIR": str(tmp_path_factory.mktemp("tfds")),
          "PYTHONPATH": str(REPO)}


def _compare(workdir, env, *extra):
  cmd = [sys.executable, str(REPO / "launch" / "compare.py"), "--suite", "smiles", "--scale", "tiny",
         "--workdir", str(workdir), "--arms", ARMS, *extra]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return result.stdout


@pytest.fixture(scope="module")
def suite(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp("compare") / "smiles_tiny"
  out = _compare(workdir, env)
  return workdir, out


def test_tiny_suite_report_has_every_section(suite):
  workdir, out = suite
  assert "[compare] report:" in out and "runs finished" in out
  md = (workdir / "report.md").read_text()
  for section in ("What this shows and does not show", "Compute per arm", "Pretraining curves", "Downstream",
                  "Methods vs their matched MLM", "Analyses", "Run cards"):
    assert f"## {section}" in md
  assert "Caveats:" in md and "exlm vs mlm++@exlm" in md and "truncation share" in md
  report = json.loads((workdir / "report.json").read_text())
  assert (report["suite"], report["scale"], report["seeds"], report["tasks"]) == ("smiles", "tiny", [0], ["bbbp"])
  assert set(report["arms"]) == {"mlm++@exlm", "exlm"}
  for arm in report["arms"].values():
    assert arm["run_card"]["kind"] == "pretrain" and arm["status"] == "done"
  # the downstream table is the fine-tuning results.json's test score at the best validation step
  results = json.loads((workdir / "finetune" / "exlm" / "bbbp" / "results.json").read_text())
  assert report["tables"]["downstream"]["exlm"]["bbbp"]["mean"] == pytest.approx(
      results["per_seed"][0]["report"]["test"]["roc_auc"])
  for name in ("eval_loss_vs_real_tokens.png", "eval_loss_vs_flops.png", "analysis_shared_rank.png",
               "analysis_shared_entropy.png", "analysis_dag_exlm.png"):
    assert (workdir / name).stat().st_size > 1000, name


def test_mlmpp_trains_exlms_flops_within_one_step(suite):
  workdir, _ = suite
  pp = json.loads((workdir / "pretrain" / "mlmpp_at_exlm" / "run_card.json").read_text())
  exlm = json.loads((workdir / "pretrain" / "exlm" / "run_card.json").read_text())
  per_step = pp["train_flops"] / pp["steps"]
  assert pp["steps"] > exlm["steps"]  # ExLM's step costs more than MLM's
  assert abs(pp["train_flops"] - exlm["train_flops"]) <= per_step
  assert pp["matched_to"]["objective"] == "exlm" and pp["matched_to"]["total_steps"] == exlm["steps"]


def test_rerun_launches_nothing(suite, env):
  workdir, _ = suite
  launches = (workdir / "launches.jsonl").read_text().splitlines()
  assert len(launches) == 6  # 2 pretrainings, 2 fine-tunings, the analysis report, the DAG view
  ckpt = workdir / "pretrain" / "exlm" / "checkpoints"
  before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
  out = _compare(workdir, env)
  assert (workdir / "launches.jsonl").read_text().splitlines() == launches
  assert "6/6 runs finished (6 already done, 0 failed)" in out
  assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before


def test_dry_run_spends_nothing(tmp_path, env):
  workdir = tmp_path / "dry"
  out = _compare(workdir, env, "--dry_run", "--arms", "mlm")
  assert "pretrain/mlm" in out and "finetune/mlm/bbbp" in out and "estimated total" in out
  assert "measured (mlm's config)" in out
  assert not workdir.exists()


CHILD = """
import pathlib, signal, sys, time
here = pathlib.Path(sys.argv[1])
def save_and_exit(signum, frame):
  (here / "saved").write_text("saved")
  sys.exit(0)
signal.signal(signal.SIGTERM, save_and_exit)
(here / "child_pid").write_text(str(__import__("os").getpid()))
time.sleep(120)
"""
HARNESS = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("compare_cli", sys.argv[1])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
signal.signal(signal.SIGTERM, cli._raise_stopped)  # as main() does
try:
  cli.run_child([sys.executable, "-c", sys.argv[2], sys.argv[3]], open(os.path.join(sys.argv[3], "log"), "w"),
                dict(os.environ))
except cli.Stopped:
  sys.exit(130)
"""


def test_a_stopped_harness_stops_its_run_cleanly_and_leaves_no_orphan(tmp_path):
  """SIGTERM to the harness reaches the running run as SIGTERM (main.py saves and exits there) and the harness waits
  for it: no run keeps training, or holding its workdir's lock, after the harness is gone."""
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  harness = subprocess.Popen([sys.executable, "-c", HARNESS, str(REPO / "launch" / "compare.py"), CHILD, str(tmp_path)],
                             env=env, cwd=REPO)
  deadline = time.time() + 60
  while not (tmp_path / "child_pid").exists() and time.time() < deadline:
    time.sleep(0.1)
  child_pid = int((tmp_path / "child_pid").read_text())
  harness.send_signal(signal.SIGTERM)
  assert harness.wait(timeout=30) == 130
  assert (tmp_path / "saved").read_text() == "saved"  # the run got SIGTERM and handled it
  with pytest.raises(ProcessLookupError):
    os.kill(child_pid, 0)  # and is gone
