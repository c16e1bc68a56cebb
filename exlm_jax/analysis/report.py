"""The `report` tool: effective_rank + entropy for several workdirs, combined plots and one Markdown comparison
(report.md, its headline the two numbers the papers argue from).

Only matched runs are compared: the runs' cards (exlm_jax/run_card.py, `<workdir>/run_card.json`) are shown side
by side, and runs whose encoder architecture, data or budget differ from the FIRST workdir's (list the run the
others were matched to first) are refused, as are runs without a card (older runs), unless `allow_mismatch`,
which reports what differs. Every run is measured on the same rows (effective_rank) and on blocks of one length
(entropy: the shortest any run can score at every ratio).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from exlm_jax import objectives, run_card, run_store
from exlm_jax.analysis import effective_rank, entropy, inputs, plots, rank_tool


def _fmt(x) -> str:
  """A table cell: floats to 3 significant digits, None / NaN as 'nan'."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "nan"
  return f"{x:.3g}" if isinstance(x, float) else str(x)


def _unique_names(workdirs: Sequence[str]) -> list[str]:
  names = []
  for i, w in enumerate(workdirs):
    name = os.path.basename(os.path.normpath(w)) or f"run{i}"
    names.append(name if name not in names else f"{name}_{i}")
  return names


def headline(rank_result: dict, entropy_result: dict) -> dict:
  """The two numbers the papers argue from, for one run: last-layer corpus rank of the real tokens on clean
  input (every objective, the same rows; MLM: also on the masked input, the objective's `rank_groups.headline`),
  uncentred and centred, and the per-masked-token entropy per ratio."""
  objective = objectives.get(rank_result["objective"])
  variant = entropy.per_token_variant(objective)
  out = {"objective": objective.name, "entropy_variant": variant, "mask_ratios": entropy_result["mask_ratios"],
         "entropy": entropy_result["entropy"][variant]}
  for name, group in {"clean_input": objectives.base.CLEAN_INPUT, **objective.rank_groups.headline}.items():
    for centred, suffix in ((False, "uncentred"), (True, "centred")):
      out[f"rank_last_layer/{name}/{suffix}"] = rank_tool.corpus_table(rank_result, centred)[group]["rank"][-1]
  return out


def check_cards(names: Sequence[str], workdirs: Sequence[str], allow_mismatch: bool = False):
  """({name: card or None}, mismatches): one line per run without a card and per difference from the first
  run's card (`run_card.compare_cards`). Mismatches with 2+ runs raise a one-line ValueError unless
  allow_mismatch."""
  cards = {name: run_card.read_card(run_store.resolve_run(w).workdir) for name, w in zip(names, workdirs)}
  mismatches = [f"{name}: no {run_store.RUN_CARD_FILE} (a run from before run cards), so its encoder, data and "
                "budget cannot be checked" for name, card in cards.items() if card is None]
  present = {name: card for name, card in cards.items() if card is not None}
  mismatches += run_card.compare_cards(present) if present else []
  if mismatches and len(names) > 1 and not allow_mismatch:
    raise ValueError("runs are not matched: " + "; ".join(mismatches) + ". Compare runs with the same encoder, "
                     "data and budget (list the reference run first), or pass --allow_mismatch to report anyway")
  return cards, mismatches


def analyse(workdirs: Sequence[str], data: str, out_dir: str, energy: float = 0.9, center: bool = False,
            mask_ratios: Sequence[float] = inputs.DEFAULT_MASK_RATIOS, max_sequences: int = 512, batch_size: int = 32,
            seed: int = 0, allow_mismatch: bool = False, normalise: str = "layernorm", max_mask_draws: int = 8,
            block_len: int | None = None) -> dict:
  """effective_rank + entropy for every workdir into out_dir/<name>/, combined plots and report.md; refuses
  unmatched runs first (`check_cards`). Entropy blocks: `block_len`, by default the shortest length every run
  can score at every ratio."""
  if not workdirs:
    raise ValueError("report needs at least one --workdirs entry")
  names = _unique_names(workdirs)
  cards, mismatches = check_cards(names, workdirs, allow_mismatch)
  runs = {name: inputs.load_run(workdir) for name, workdir in zip(names, workdirs)}
  blocks = {name: inputs.load_data_blocks(data, run, max_sequences) for name, run in runs.items()}
  longest = min(entropy.block_length_limit(run, mask_ratios, blocks[name].shape[1]) for name, run in runs.items())
  block_len = longest if block_len is None else block_len
  ranks, entropies = {}, {}
  for name, run in runs.items():
    sub = os.path.join(out_dir, name)
    ranks[name] = rank_tool.analyse(run, data, sub, energy, center, modes=("corpus", "per_sequence"),
                                         batch_size=batch_size, seed=seed, blocks=blocks[name], normalise=normalise,
                                         max_mask_draws=max_mask_draws)
    entropies[name] = entropy.analyse(run, data, sub, mask_ratios, batch_size=batch_size, seed=seed,
                                      blocks=blocks[name], block_len=block_len)
  combined_rank = {}
  for name, res in ranks.items():
    for group, row in res["corpus"].items():
      for layer, rank, rows in zip(row["layer"], row["rank"], row["num_rows"]):
        combined_rank[(f"{name}: {group}", layer)] = effective_rank.RankResult(
            rank, energy, "squared", center, effective_rank.CORPUS, rows, res["d_model"])
  dims = {res["d_model"] for res in ranks.values()}
  rank_png = plots.plot_rank_vs_layer(combined_rank, os.path.join(out_dir, "effective_rank_all.png"),
                                      title="Effective rank, all runs", show_dim=len(dims) == 1)
  series = {f"{name}: {variant}": (res["mask_ratios"], values)
            for name, res in entropies.items() for variant, values in res["entropy"].items()}
  entropy_png = plots.plot_entropy_vs_mask_ratio(series, os.path.join(out_dir, "entropy_all.png"))
  cards_md = run_card.cards_markdown(cards)
  md = _report_markdown(names, runs, ranks, entropies, data, energy, center, rank_png, entropy_png, out_dir,
                        cards_md, mismatches)
  md_path = os.path.join(out_dir, "report.md")
  with open(md_path, "w") as f:
    f.write(md)
  result = {"tool": "report", "workdirs": list(workdirs), "names": names, "data": data, "report": md_path,
            "run_cards": cards, "run_cards_markdown": cards_md, "mismatches": mismatches,
            "entropy_block_len": entropies[names[0]]["block_len"],
            "headline": {name: headline(ranks[name], entropies[name]) for name in names},
            "effective_rank": ranks, "entropy": entropies,
            "plots": {"effective_rank_all": rank_png, "entropy_all": entropy_png}}
  run_store.write_json(os.path.join(out_dir, "report.json"), result)
  return result


def _report_markdown(names, runs, ranks, entropies, data, energy, center, rank_png, entropy_png, out_dir,
                     cards_md, mismatches) -> str:
  rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
  first_rank, first_entropy = ranks[names[0]], entropies[names[0]]
  lines = ["# Analysis report", "", f"Data: `{data}`; effective rank at {energy:g} of the squared singular-value "
           f"energy, {'centred' if center else 'uncentred'}, states normalised: "
           f"{first_rank['settings']['normalisation_rule']}; entropies in nats on blocks of "
           f"{first_entropy['block_len']} slots for every run and ratio.", "", "## Run cards", "", cards_md.rstrip()]
  if mismatches:
    lines += ["", "**Runs not matched** (reported with --allow_mismatch; differences from the first run):", ""]
    lines += [f"- {m}" for m in mismatches]
  warnings = [w for n in names for w in ranks[n].get("warnings", [])]
  if warnings:
    lines += ["", *[f"- warning: {w}" for w in warnings]]
  lines += ["", "## Runs", "", "| run | objective | step | d_model | layers | sequences |", "|---|---|---|---|---|---|"]
  for name in names:
    cfg = runs[name].config
    lines.append(f"| {name} | {cfg.objective} | {runs[name].step} | {cfg.model.d_model} | {cfg.model.num_layers} "
                 f"| {ranks[name]['num_sequences']} |")
  ratios = sorted({r for res in entropies.values() for r in res["mask_ratios"]})
  lines += ["", "## Headline", "", "Last-layer corpus effective rank of every real token of the clean input (the "
            "same rows for every run; MLM: also on the masked input, the paper's with-[MASK] group), uncentred / "
            "centred; entropy (nats) of the predictive distribution per masked token (ExLM: posterior-weighted "
            "mixture) at each mask ratio.", "",
            "| run | objective | rank, clean input | rank, MLM masked input | "
            + " | ".join(f"H @ {r:g}" for r in ratios) + " |", "|---|---|---|---|" + "---|" * len(ratios)]
  for name in names:
    head = headline(ranks[name], entropies[name])
    rank = lambda which: " / ".join(str(head.get(f"rank_last_layer/{which}/{c}", "-"))  # noqa: E731
                                    for c in ("uncentred", "centred"))
    by_ratio = dict(zip(head["mask_ratios"], head["entropy"]))
    lines.append(f"| {name} | {head['objective']} | {rank('clean_input')} | {rank('masked_input')} | "
                 + " | ".join(_fmt(by_ratio.get(r)) for r in ratios) + " |")
  tables = (("corpus", f"Effective rank (corpus, {'centred' if center else 'uncentred'})"),
            (rank_tool.corpus_key(not center), f"Effective rank (corpus, {'uncentred' if center else 'centred'})"),
            ("per_sequence", f"Effective rank (per-sequence mean, {'centred' if center else 'uncentred'})"))
  for mode, title in tables:
    num_layers = max(len(row["layer"]) for res in ranks.values() for row in res[mode].values())
    lines += ["", f"## {title}", "", "| run: group | " + " | ".join(f"L{i}" for i in range(num_layers)) + " |",
              "|---|" + "---|" * num_layers]
    for name in names:
      for group, row in ranks[name][mode].items():
        lines.append(f"| {name}: {group} | " + " | ".join(_fmt(float(r)) for r in row["rank"]) + " |")
  span = {n: ranks[n]["mask_out_of_span"] for n in names if "mask_out_of_span" in ranks[n]}
  if span:
    lines += ["", "[MASK]-state energy outside the clean real-token rank_eps subspace, per layer:", ""]
    for name, row in span.items():
      lines.append(f"- {name}: " + ", ".join(f"L{l}: {_fmt(v)}" for l, v in
                                             zip(row["layer"], row["mask_out_of_span_energy"])))
  lines += ["", "## Entropy at masked positions", "", "| run: variant | " + " | ".join(f"{r:g}" for r in ratios)
            + " |", "|---|" + "---|" * len(ratios)]
  for name in names:
    res = entropies[name]
    for variant, values in res["entropy"].items():
      by_ratio = dict(zip(res["mask_ratios"], values))
      lines.append(f"| {name}: {variant} | " + " | ".join(_fmt(by_ratio.get(r)) for r in ratios) + " |")
  lines += ["", "## Plots", "", "| effective rank | entropy |", "|---|---|",
            f"| ![rank]({rel(rank_png)}) | ![entropy]({rel(entropy_png)}) |"]
  for name in names:
    lines.append(f"| ![{name} rank]({rel(ranks[name]['plots']['corpus'])}) | "
                 f"![{name} entropy]({rel(entropies[name]['plots']['entropy'])}) |")
  return "\n".join(lines) + "\n"
