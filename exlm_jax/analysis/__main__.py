"""Command line for the analysis tools (exlm_jax/analysis/<tool>.py `analyse`); each writes JSON + PNG into --out.

  python -m exlm_jax.analysis effective_rank --workdir RUN --data FILE --out DIR [--energy 0.9 --center
      --normalise layernorm --max_mask_draws 8]
  python -m exlm_jax.analysis entropy --workdir RUN --data FILE --out DIR [--mask_ratios 0.15,0.3,0.45,0.6
      --block_len N]
  python -m exlm_jax.analysis repeated_mlm --workdir RUN --data FILE --out DIR [--fixed corrupted --ratio 0.15
      --ks 1,2,4,8]
  python -m exlm_jax.analysis dag_view --workdir EXLM_RUN (--data FILE --index 3 | --smiles CCO) --out DIR
  python -m exlm_jax.analysis report --workdirs RUN_A RUN_B RUN_C --data FILE --out DIR [--allow_mismatch]

report prints the runs' cards (run_card.json) side by side and refuses runs whose encoder, data or budget differ
from RUN_A's, or that have no card, unless --allow_mismatch (then it prints what differs).
"""

from __future__ import annotations

import argparse
import json
import sys

TOOLS = ("effective_rank", "entropy", "repeated_mlm", "dag_view", "report")


def _floats(text: str) -> list[float]:
  try:
    return [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.15,0.3") from None


def _ints(text: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m exlm_jax.analysis", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="tool", required=True)

  def common(p, data=True):
    p.add_argument("--workdir", required=True, help="pretraining workdir written by main.py (repeated_mlm: "
                   "any run, for its tokenizer, data kind and seq_len)")
    p.add_argument("--data", required=data, help="SMILES / text file read with the run's tokenizer")
    p.add_argument("--out", required=True, help="output folder for the JSON and PNG files")
    p.add_argument("--max_sequences", type=int, default=512, help="blocks read from --data")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")

  def rank_options(p):
    p.add_argument("--normalise", choices=("layernorm", "none"), default="layernorm",
                   help="layernorm: every layer's token states normalised (mean 0, std 1 over the features) "
                   "before the rank, pre-LN and post-LN alike; none: the raw states")
    p.add_argument("--max_mask_draws", type=int, default=8,
                   help="mask draws over the data until the [MASK] group holds >= 20 x d_model rows")

  def entropy_options(p):
    p.add_argument("--mask_ratios", type=_floats, default=[0.15, 0.3, 0.45, 0.6])
    p.add_argument("--block_len", type=int, help="cut every block to this length for every ratio (and run); "
                   "default: the longest every run can score at every ratio")

  p = sub.add_parser("effective_rank", help="effective rank of token states per layer")
  common(p)
  p.add_argument("--energy", type=float, default=0.9, help="spectral energy threshold 1 - eps")
  p.add_argument("--kind", choices=("squared", "linear"), default="squared")
  p.add_argument("--center", action="store_true", help="subtract the mean state first")
  p.add_argument("--modes", default="corpus,per_sequence", help="corpus and/or per_sequence")
  p.add_argument("--out_of_span", action=argparse.BooleanOptionalAction, default=True,
                 help="MLM: energy of the [MASK] states outside the clean real-token rank_eps subspace")
  rank_options(p)

  p = sub.add_parser("entropy", help="predictive entropy at masked positions vs mask ratio")
  common(p)
  entropy_options(p)

  p = sub.add_parser("repeated_mlm", help="measured ratios of the Repeated-MLM (p, k) grid")
  common(p)
  p.add_argument("--fixed", choices=("corrupted", "unreal"), default="corrupted")
  p.add_argument("--ratio", type=float, default=0.15, help="the ratio held fixed")
  p.add_argument("--ks", type=_ints, default=[1, 2, 3, 4, 6, 8])

  p = sub.add_parser("dag_view", help="Viterbi alignment and transitions of one input (ExLM)")
  common(p, data=False)
  p.add_argument("--index", type=int, default=0, help="block of --data to show")
  p.add_argument("--smiles", help="show this string instead of a --data block")
  p.add_argument("--mask_positions", type=_ints, help="slots to mask, e.g. 2,5; default: the pretraining rule")
  p.add_argument("--mask_ratio", type=float, help="mask ratio of the rule; default the run's mask_prob")

  p = sub.add_parser("report", help="effective_rank + entropy for several runs, one Markdown report")
  p.add_argument("--workdirs", nargs="+", required=True)
  p.add_argument("--data", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--energy", type=float, default=0.9)
  p.add_argument("--center", action="store_true")
  entropy_options(p)
  rank_options(p)
  p.add_argument("--allow_mismatch", action="store_true",
                 help="report runs whose encoder, data or budget differ (or that have no run card), saying what")
  p.add_argument("--max_sequences", type=int, default=512)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  return parser


def run(args: argparse.Namespace) -> dict:
  # pylint: disable=g-import-not-at-top  (the tools import JAX; --help stays fast)
  from exlm_jax.analysis import dag_view, entropy, rank_tool, repeated_mlm, report
  common = dict(max_sequences=args.max_sequences, seed=args.seed)
  if args.tool == "effective_rank":
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    return rank_tool.analyse(args.workdir, args.data, args.out, energy=args.energy, center=args.center,
                                  kind=args.kind, modes=modes, batch_size=args.batch_size,
                                  out_of_span=args.out_of_span, normalise=args.normalise,
                                  max_mask_draws=args.max_mask_draws, **common)
  if args.tool == "entropy":
    return entropy.analyse(args.workdir, args.data, args.out, args.mask_ratios, batch_size=args.batch_size,
                           block_len=args.block_len, **common)
  if args.tool == "repeated_mlm":
    return repeated_mlm.analyse(args.workdir, args.data, args.out, args.fixed, args.ratio, args.ks, **common)
  if args.tool == "dag_view":
    return dag_view.analyse(args.workdir, args.out, data=args.data, index=args.index, smiles=args.smiles,
                            mask_positions=args.mask_positions, mask_ratio=args.mask_ratio, seed=args.seed)
  if args.tool == "report":
    return report.analyse(args.workdirs, args.data, args.out, args.energy, args.center, args.mask_ratios,
                          batch_size=args.batch_size, allow_mismatch=args.allow_mismatch, normalise=args.normalise,
                          max_mask_draws=args.max_mask_draws, block_len=args.block_len, **common)
  raise ValueError(f"unknown tool {args.tool!r}; choose one of {TOOLS}")


def _summary(result: dict) -> str:
  keep = {k: v for k, v in result.items() if k in ("tool", "workdir", "objective", "plots", "report", "entropy")}
  if result.get("tool") == "report":
    keep.pop("entropy", None)
  return json.dumps(keep, indent=1, default=str)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    result = run(args)
  except (ValueError, FileNotFoundError, IndexError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if result.get("tool") == "report":
    print(result["run_cards_markdown"], end="")
    for line in result["mismatches"]:
      print(f"mismatch: {line}")
  print(_summary(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
