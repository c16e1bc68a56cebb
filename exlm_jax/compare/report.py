"""The comparison report: DIR/report.md, DIR/report.json and PNGs from the finished runs of a plan (plan.py).

Sections: what this shows and does not show (sentences chosen by stats.py), compute per arm (steps, real tokens,
FLOPs, wall time from the run cards; MLM++'s FLOPs checked against its method's), pretraining curves (eval loss vs
real tokens and vs FLOPs), the downstream table (test metric at the best validation step, mean ± std over seeds,
best per column in bold, truncation share per task), methods vs their matched MLM (stats.paired), the analyses
(`python -m exlm_jax.analysis report` / `dag_view` outputs) and the run cards. A run that is missing or failed
shows as such; nothing is left out silently.

Eval-loss curves come from the runs' TensorBoard events (`eval/loss`); the x axes put step s at s x the run's mean
real tokens per step (real_tokens_seen / steps of its card) and s x its static FLOPs per step (train_flops / steps).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
from typing import Any

import numpy as np

from exlm_jax import run_card, run_store
from exlm_jax.compare import plan as plan_lib
from exlm_jax.compare import stats

SECTIONS = ("What this shows and does not show", "Compute per arm", "Pretraining curves", "Downstream",
            "Methods vs their matched MLM", "Analyses", "Run cards")


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------


def read_events(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of every scalar in the TFRecord event files under `logdir` (the last value per step
  wins, so a resumed run's rewritten steps count once)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      if len(record) < length:
        break  # a record cut short by a killed run
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        out.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
  return out


def _read(path: str) -> dict | None:
  try:
    return run_store.read_json(path)
  except (OSError, ValueError):
    return None


def eval_curve(workdir: str, card: dict | None) -> dict | None:
  """{step, loss, real_tokens, flops} lists of a pretraining run's eval/loss; None without events or card."""
  points = read_events(os.path.join(workdir, "tensorboard")).get("eval/loss", {})
  if not points or not card or not card.get("steps"):
    return None
  steps = sorted(points)
  per_step_real = (card["real_tokens_seen"] or card["tokens_seen"]) / card["steps"]  # slots when not counted
  per_step_flops = (card["train_flops"] or float("nan")) / card["steps"]
  return {"step": steps, "loss": [points[s] for s in steps], "real_tokens": [s * per_step_real for s in steps],
          "flops": [s * per_step_flops for s in steps]}


def collect(plan: dict) -> dict:
  """Everything the report shows, read from the plan's workdirs."""
  arms = {}
  for row in plan["arms"]:
    card = run_card.read_card(row["workdir"]) if os.path.exists(os.path.join(row["workdir"], run_store.RUN_CARD_FILE)) \
        else None
    final = _read(os.path.join(row["workdir"], "final_metrics.json"))
    arms[row["name"]] = {**row, "run_card": card, "final": final, "curve": eval_curve(row["workdir"], card),
                         "status": "done" if final and not final.get("preempted") else "missing"}
  downstream: dict[str, dict[str, Any]] = {name: {} for name in arms}
  metrics, truncation = {}, {}
  for run in plan["runs"]:
    if run["kind"] != "finetune":
      continue
    results = _read(os.path.join(run["workdir"], "results.json"))
    if not results:
      continue
    metric, values = stats.test_values(results)
    metrics[run["task"]] = metric
    downstream[run["arm"]][run["task"]] = {**stats.cell(list(values.values())), "values": values, "metric": metric}
    share = stats.truncation_share(results)
    truncation.setdefault(run["task"], {})[run["arm"]] = share
  comparisons = []
  for c in plan["comparisons"]:
    result = stats.paired({t: v["values"] for t, v in downstream[c["method"]].items()},
                          {t: v["values"] for t, v in downstream[c["baseline"]].items()}, metrics)
    comparisons.append({**c, **result, "verdict": stats.verdict(c["method"], c["baseline"], result)})
  analyses = {}
  for run in plan["runs"]:
    if run["kind"] in ("analysis", "dag_view"):
      name = "report.json" if run["kind"] == "analysis" else "dag_view.json"
      analyses[run["name"]] = {"kind": run["kind"], "workdir": run["workdir"], "arm": run["arm"],
                               "result": _read(os.path.join(run["workdir"], name))}
  return {"arms": arms, "downstream": downstream, "metrics": metrics, "truncation": truncation,
          "comparisons": comparisons, "budget_checks": budget_checks(arms), "analyses": analyses}


def budget_checks(arms: dict) -> list[dict]:
  """Every MLM++ arm's training FLOPs against its method's (`matched_to`): within one MLM++ step or not."""
  out = []
  for name, arm in arms.items():
    if arm["budget"] != plan_lib.EQUAL_FLOPS:
      continue
    method = arms.get(arm["family"])
    a, b = arm["run_card"], (method or {}).get("run_card")
    if not a or not b:
      out.append({"arm": name, "method": arm["family"], "matched": None, "why": "run card missing"})
      continue
    one_step = a["train_flops"] / max(a["steps"], 1)
    out.append({"arm": name, "method": arm["family"], "flops": a["train_flops"], "method_flops": b["train_flops"],
                "one_step": one_step, "matched": abs(a["train_flops"] - b["train_flops"]) <= one_step})
  return out


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def plot_curves(arms: dict, out_dir: str) -> dict[str, str]:
  """eval_loss_vs_real_tokens.png and eval_loss_vs_flops.png (one line per arm with a curve)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = {}
  for axis, label in (("real_tokens", "real (non-padding) tokens seen"), ("flops", "training FLOPs")):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, arm in arms.items():
      if arm["curve"]:
        ax.plot(arm["curve"][axis], arm["curve"]["loss"], marker="o", markersize=3, label=name)
    ax.set_xlabel(label)
    ax.set_ylabel("eval loss (nats per target)")
    ax.set_title(f"Eval loss vs {label}")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
    path = os.path.join(out_dir, f"eval_loss_vs_{axis}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths[axis] = path
  return paths


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _num(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


# The papers' analysis claims: (objective, what, measure, direction vs MLM). Data, not a branch per objective.
CLAIMS = (
    ("exlm", "ExLM's claim (lower prediction entropy)", "entropy", "lower"),
    ("maelm", "MAE-LM's claim (higher effective rank of real tokens)", "rank_last_layer/clean_input/uncentred",
     "higher"),
)


def _analysis_claims(data: dict) -> list[str]:
  """Direction of the papers' analysis claims on these runs against the group's first MLM baseline (one
  pretraining run each: no test)."""
  lines = []
  roles = {n: a["role"] for n, a in data["arms"].items()}
  for entry in data["analyses"].values():
    result = entry["result"]
    if entry["kind"] != "analysis" or not result:
      continue
    head = {_arm_name(n, data): h for n, h in result.get("headline", {}).items()}
    base = next((n for n in head if roles.get(n) == plan_lib.BASELINE), None)
    if base is None:
      continue
    for name, h in head.items():
      for objective, what, measure, direction in CLAIMS:
        if h["objective"] != objective:
          continue
        ours, theirs = np.atleast_1d(h[measure]), np.atleast_1d(head[base][measure])
        held = int(np.sum(ours < theirs if direction == "lower" else ours > theirs))
        where = f"at {held} of {len(ours)} mask ratios" if len(ours) > 1 else f"({_num(float(ours[0]))} vs " \
            f"{_num(float(theirs[0]))})"
        lines.append(f"{what}: {name} is {direction} than {base} {where}" if held else
                     f"{what}: not seen, {name} is not {direction} than {base} {where}")
        lines[-1] += " (one pretraining run each, no test)."
  return lines


def shows_paragraph(plan: dict, data: dict) -> list[str]:
  arms = data["arms"]
  cards = [a["run_card"] for a in arms.values() if a["run_card"]]
  enc = cards[0]["encoder"] if cards else {}
  tokens = [c["real_tokens_seen"] for c in cards if c.get("real_tokens_seen")]
  shares = [s for per in data["truncation"].values() for s in per.values() if s is not None]
  lines = [f"- {c['verdict']}" for c in data["comparisons"]]
  lines += [f"- {line}" for line in _analysis_claims(data)]
  for check in data["budget_checks"]:
    if check["matched"] is False:
      lines.append(f"- {check['arm']}'s training FLOPs do NOT match {check['method']}'s within one step: its "
                   "comparison is not at equal compute.")
  missing = [n for n, a in arms.items() if a["status"] != "done"]
  caveats = [f"scale: a {enc.get('num_layers', '?')}-layer, width-{enc.get('d_model', '?')} encoder ({plan['scale']} "
             "scale), far below the papers' base models",
             "pretraining tokens: " + (f"{min(tokens):.3g}-{max(tokens):.3g} real tokens per arm" if tokens else
                                       "real tokens not counted by these runs (the curves use slots)"),
             "truncation share of the fine-tuning inputs: " + (f"up to {100 * max(shares):.1f} %" if shares else "n/a "
                                                                 "(the fine-tuning results do not count it)"),
             f"one corpus ({plan['suite']}), one pretraining seed per arm (pretraining variance is not measured; "
             f"the {len(plan['seeds'])} fine-tuning seed(s) vary only the head, dropout and data order)",
             f"tasks: {', '.join(plan['tasks'])}; p-values are not corrected for the {len(data['comparisons'])} "
             "comparisons"]
  if missing:
    caveats.append(f"runs missing or unfinished: {', '.join(missing)}")
  return lines + ["", "Caveats: " + "; ".join(caveats) + "."]


def markdown(plan: dict, data: dict, pngs: dict, command: str, out_dir: str) -> str:
  rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
  arms, tasks = data["arms"], plan["tasks"]
  lines = [f"# Comparison: {plan['suite']} suite, {plan['scale']} scale, {plan['encoder']} encoder", "",
           f"Command: `{command}`", "", f"Arms: {', '.join(arms)}; tasks: {', '.join(tasks)}; fine-tuning seeds: "
           f"{', '.join(map(str, plan['seeds']))}.", "", f"## {SECTIONS[0]}", "", *shows_paragraph(plan, data), "",
           f"## {SECTIONS[1]}", "", "| arm | objective | budget | status | steps | real tokens | train FLOPs | wall time "
           "(s) | final eval loss | FLOPs matched |", "|---|---|---|---|---|---|---|---|---|---|"]
  checks = {c["arm"]: c for c in data["budget_checks"]}
  for name, arm in arms.items():
    card = arm["run_card"] or {}
    loss = ((arm["final"] or {}).get("eval") or {}).get("loss")
    matched = checks.get(name, {}).get("matched")
    lines.append(f"| {name} | {arm['objective']} | {arm['budget']} | {arm['status']} | {_num(card.get('steps'))} | "
                 f"{_num(card.get('real_tokens_seen'))} | {_num(card.get('train_flops'))} | "
                 f"{_num(card.get('wall_time_s'))} | {_num(loss, 4)} | "
                 f"{'-' if name not in checks else ('yes' if matched else 'n/a' if matched is None else 'NO')} |")
  lines += ["", f"## {SECTIONS[2]}", "", f"![eval loss vs real tokens]({rel(pngs['real_tokens'])}) "
            f"![eval loss vs FLOPs]({rel(pngs['flops'])})", "",
            f"## {SECTIONS[3]}", "", "Test split at the best validation step, mean ± sample std over fine-tuning seeds "
            "(**bold**: best per column).", "",
            "| arm | " + " | ".join(f"{t} ({data['metrics'].get(t, '?')})" for t in tasks) + " |",
            "|---|" + "---|" * len(tasks)]
  best = stats.best_per_column(data["downstream"], {t: data["metrics"][t] for t in tasks if t in data["metrics"]})
  for name in arms:
    cells = []
    for task in tasks:
      c = data["downstream"][name].get(task)
      text = "missing" if c is None else f"{c['mean']:.4f} ± {c['std']:.4f}"
      cells.append(f"**{text}**" if c is not None and best.get(task) == name else text)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  share = lambda t: data["truncation"].get(t, {})  # noqa: E731
  lines.append("| truncation share | " + " | ".join(
      "n/a" if not any(v is not None for v in share(t).values()) else
      f"{100 * max(v for v in share(t).values() if v is not None):.1f} %" for t in tasks) + " |")
  lines += ["", f"## {SECTIONS[4]}", "", "Pairs = (task, seed); positive = the method is better; relative = divided by "
            "the baseline's task mean. Sign test on wins vs losses, Wilcoxon signed-rank on the relative differences.",
            "", "| method | baseline | n | " + " | ".join(f"mean diff {t}" for t in tasks)
            + " | mean relative diff | wins/losses/ties | sign p | Wilcoxon p |", "|---|---|---|" + "---|" * len(tasks)
            + "---|---|---|---|"]
  for c in data["comparisons"]:
    diffs = " | ".join(_num(c["per_task"].get(t, {}).get("mean_diff"), 3) for t in tasks)
    lines.append(f"| {c['method']} | {c['baseline']} | {c['n']} | {diffs} | {_num(c['mean_relative_diff'])} | "
                 f"{c['wins']}/{c['losses']}/{c['ties']} | {_num(c['sign_p'], 2)} | {_num(c['wilcoxon_p'], 2)} |")
  lines += ["", f"## {SECTIONS[5]}", ""]
  for name, entry in data["analyses"].items():
    lines += analysis_lines(name, entry, pngs, rel, data)
  lines += ["", f"## {SECTIONS[6]}", "", run_card.cards_markdown({n: a["run_card"] for n, a in arms.items()}).rstrip()]
  return "\n".join(lines) + "\n"


def _arm_name(folder: str, data: dict) -> str:
  """The arm whose pretraining folder is `folder` (the analyses name runs by folder)."""
  return next((n for n in data["arms"] if plan_lib.arm_dir(n) == folder), folder)


def analysis_lines(name: str, entry: dict, pngs: dict, rel, data: dict) -> list[str]:
  result = entry["result"]
  if not result:
    return [f"- {name}: missing", ""]
  if entry["kind"] == "dag_view":
    return [f"### DAG view: {entry['arm']}", "", f"![dag view {entry['arm']}]({rel(pngs[name])})", ""]
  ratios = sorted({r for h in result["headline"].values() for r in h["mask_ratios"]})
  lines = [f"### {name}: effective rank and entropy (blocks of {result['entropy_block_len']} slots)", "",
           "| run | objective | last-layer rank, clean input (uncentred / centred) | "
           + " | ".join(f"H @ {r:g}" for r in ratios) + " |", "|---|---|---|" + "---|" * len(ratios)]
  for run in result["names"]:
    h = result["headline"][run]
    run = _arm_name(run, data)
    rank = " / ".join(str(h.get(f"rank_last_layer/clean_input/{c}", "-")) for c in ("uncentred", "centred"))
    by_ratio = dict(zip(h["mask_ratios"], h["entropy"]))
    lines.append(f"| {run} | {h['objective']} | {rank} | " + " | ".join(_num(by_ratio.get(r)) for r in ratios) + " |")
  lines += ["", f"![effective rank per layer]({rel(pngs[name + ':rank'])}) "
            f"![entropy vs mask ratio]({rel(pngs[name + ':entropy'])})", "",
            f"Full tables: `{rel(os.path.join(entry['workdir'], 'report.md'))}`.", ""]
  return lines


def _copy_analysis_pngs(data: dict, out_dir: str) -> dict[str, str]:
  """The analyses' PNGs copied next to report.md (so the report folder is self-contained)."""
  pngs = {}
  for name, entry in data["analyses"].items():
    result = entry["result"]
    if not result:
      continue
    stem = name.replace("/", "_")
    if entry["kind"] == "dag_view":
      sources = {name: os.path.join(entry["workdir"], "dag_view.png")}
    else:
      sources = {name + ":rank": result["plots"]["effective_rank_all"], name + ":entropy": result["plots"]["entropy_all"]}
    for key, src in sources.items():
      dst = os.path.join(out_dir, f"{stem}{key[len(name):].replace(':', '_')}.png")
      if os.path.exists(src):
        shutil.copyfile(src, dst)
      pngs[key] = dst
  return pngs


def write(plan: dict, command: str) -> dict:
  """Writes report.md, report.json and the PNGs into the plan's workdir; returns {'md', 'json', 'pngs'}."""
  out_dir = plan["workdir"]
  data = collect(plan)
  pngs = {**plot_curves(data["arms"], out_dir), **_copy_analysis_pngs(data, out_dir)}
  md = markdown(plan, data, pngs, command, out_dir)
  md_path, json_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.json")
  with open(md_path, "w") as f:
    f.write(md)
  analyses = {n: {"kind": e["kind"], "workdir": e["workdir"],
                  "headline": (e["result"] or {}).get("headline") if e["kind"] == "analysis" else None,
                  "available": e["result"] is not None} for n, e in data["analyses"].items()}
  payload = {"suite": plan["suite"], "scale": plan["scale"], "encoder": plan["encoder"], "seeds": plan["seeds"],
             "tasks": plan["tasks"], "command": command,
             "arms": {n: {k: a[k] for k in ("objective", "budget", "role", "family", "group", "status", "config",
                                            "overrides", "run_card", "curve")} for n, a in data["arms"].items()},
             "tables": {"downstream": data["downstream"], "metrics": data["metrics"], "truncation": data["truncation"],
                        "comparisons": data["comparisons"], "budget_checks": data["budget_checks"]},
             "analyses": analyses, "plots": {k: os.path.relpath(v, out_dir) for k, v in pngs.items()}}
  run_store.write_json(json_path, payload)
  return {"md": md_path, "json": json_path, "pngs": pngs}
