"""The comparison plan: which pretraining arms, fine-tunings and analyses `launch/compare.py` runs, and with what.

JAX-free (configs are data: this module reads them through exlm_jax.config_lib only), so a plan is cheap anywhere.

An arm is one pretraining run. Every arm starts from its method family's config file (`Suite.configs`: the
ExLM or MAE-LM recipe of the suite) with `objective=` / `budget=` arguments (config_lib.matched_baseline), and is
then overridden field by field to the group's RECIPE, so the arms of one group differ only in `objective`, the
objective's own block, `budget` / `matched_to` and, for MLM++ (`budget=equal_flops`), the `total_steps` the run
resolves from its method's FLOPs:
  --encoder shared  one group: every arm on the shared method's config (ExLM's: rope2d, pre-LN, which MAE-LM and
                    ExLM both support) with the suite's data, tokenizer, schedule, batch and seed.
  --encoder paper   one group per method family: each method on its paper's config, with its own mlm@<family>
                    and mlm++@<family>; the report compares arms only inside their group.
The scale (`SCALES`) sets the encoder size argument and the overrides every recipe gets on top (steps, packing,
...). `--arms` names: mlm, mlm++ (one mlm++@<family> per family present), mlm++@exlm, mlm++@maelm, mlm@exlm,
mlm@maelm, exlm, maelm and the ablations in `ARM_SPECS`.

Layout under the suite's workdir DIR: pretrain/<arm>/, finetune/<arm>/<task>/, analysis/<group>/,
analysis/dag_<arm>/, logs/<run>.log, plan.json, launches.jsonl (one line per launched run), report.{md,json}.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import ml_collections

from exlm_jax import config_lib

SHARED, PAPER = "shared", "paper"
ENCODERS = (SHARED, PAPER)
BASELINE, METHOD, ABLATION = "baseline", "method", "ablation"
EQUAL_FLOPS = "equal_flops"
# Fields that are the objective and its budget, not the recipe: never copied from the recipe to an arm.
_NOT_RECIPE = ("objective", "budget", "matched_to")


@dataclasses.dataclass(frozen=True)
class Suite:
  """One corpus with its method configs, fine-tuning config and task registry."""

  name: str
  configs: dict  # family -> config file of that method on this corpus
  shared_family: str  # whose config is the shared encoder's recipe (--encoder shared)
  finetune_config: str
  task_names: tuple[str, ...]  # what --tasks may name


# The method families: ExLM's encoder (rope2d, pre-LN) is the shared one, which MAE-LM and ExLM both support.
EXLM, MAELM = "exlm", "maelm"
FAMILIES = (EXLM, MAELM)
_SHARED_FAMILY = EXLM
# (suite, method family, its config file): the method configs each suite's arms start from (records, not a mapping
# keyed by objective: which config a family uses is data of the comparison, never a branch).
METHOD_CONFIGS = (
    ("smiles", EXLM, "configs/exlm_smiles_small.py"), ("smiles", MAELM, "configs/maelm_smiles_small.py"),
    ("text", EXLM, "configs/exlm_text_small.py"), ("text", MAELM, "configs/maelm_text_small.py"),
)


def _suite(name: str, finetune_config: str, task_names: tuple[str, ...]) -> Suite:
  configs = {family: path for suite, family, path in METHOD_CONFIGS if suite == name}
  return Suite(name, configs, _SHARED_FAMILY, finetune_config, task_names)


SUITES = {"smiles": _suite("smiles", "configs/finetune_moleculenet.py", config_lib.MOLECULENET_TASKS),
          "text": _suite("text", "configs/finetune_glue.py", ("sst2", "cola", "rte"))}


@dataclasses.dataclass(frozen=True)
class Scale:
  """`size` is the method configs' size argument; `pretrain` / `finetune` override every recipe / fine-tuning."""

  size: str
  pretrain: dict
  finetune: dict
  finetune_arg: str  # extra fine-tuning config argument ("quick": 1 seed, 2 epochs, few examples)
  tasks: dict  # suite -> default tasks
  seeds: tuple[int, ...]
  analysis_sequences: int  # --max_sequences of the analyses
  analysis_args: tuple = ()  # more arguments of `python -m exlm_jax.analysis report`


# cpu: a 4 x 128 encoder on packed 128-slot blocks; MLM's 400 steps x 64 blocks x ~0.87 of the slots real is about
# 2.9 M real tokens, the other arms by their FLOPs (MLM++) or the same steps (the methods); 5 fine-tuning epochs. Sized
# so that the whole SMILES suite runs in one 3-hour working session with time to spare on one idle 2-core machine:
# the committed run (results/smiles_cpu) took 2.1 h there, 1.4 h of it pretraining; at 700 steps (~5 M real
# tokens) `launch/compare.py --dry_run --scale cpu` estimated 3.0 h.
_CPU_ENCODER = {"model.num_layers": 4, "model.d_model": 128, "model.num_heads": 4, "model.mlp_dim": 512}
SCALES = {
    "tiny": Scale("tiny", {"total_steps": 6, "warmup_steps": 1, "log_every": 3, "eval_every": 3, "checkpoint_every": 3,
                           "eval_batches": 1},
                  {"num_epochs": 1, "log_every": 4}, "quick", {"smiles": ("bbbp",), "text": ("sst2",)}, (0,), 48,
                  ("--mask_ratios", "0.15,0.45")),
    "cpu": Scale("small", {**_CPU_ENCODER, "seq_len": 128, "data.packing": True, "batch_size": 64, "total_steps": 400,
                           "warmup_steps": 50, "learning_rate": 1e-3, "log_every": 20, "eval_every": 100,
                           "eval_batches": 8, "checkpoint_every": 100},
                 {"num_epochs": 5}, "", {"smiles": ("bbbp", "bace", "esol"), "text": ("sst2", "cola", "rte")},
                 (0, 1, 2), 512),
    "base": Scale("base", {"seq_len": 128, "data.packing": True, "data.max_examples": -1, "batch_size": 256,
                           "total_steps": 100_000, "warmup_steps": 10_000, "learning_rate": 5e-4, "log_every": 100,
                           "eval_every": 5_000, "eval_batches": 16, "checkpoint_every": 5_000},
                  {"num_epochs": 20}, "",
                  {"smiles": ("bbbp", "bace", "clintox", "tox21", "sider", "esol", "freesolv"),
                   "text": ("sst2", "cola", "rte")}, (0, 1, 2), 2048),
}


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  """What an arm trains: its family's config with `objective` / `budget` and config arguments or block options."""

  family: str  # exlm | maelm | "" (the baseline of whichever family it is matched to)
  objective: str
  role: str
  budget: str = "steps"
  arg: str = ""  # config arguments, e.g. "k=2"
  options: tuple = ()  # ((dotted key, value), ...) of the objective's own block
  dag_view: bool = False  # the objective aligns masked tokens to a DAG: the analyses show its DAG view


# (arm name, what it trains), in --arms order. An arm named like an objective is that method's main arm.
_ARMS = (
    ("mlm", ArmSpec("", "mlm", BASELINE)),
    ("mlm++", ArmSpec("", "mlm", BASELINE, EQUAL_FLOPS)),
    ("exlm", ArmSpec(EXLM, EXLM, METHOD, dag_view=True)),
    ("maelm", ArmSpec(MAELM, MAELM, METHOD)),
    ("exlm_k2", ArmSpec(EXLM, EXLM, ABLATION, arg="k=2", dag_view=True)),
    ("exlm_k8", ArmSpec(EXLM, EXLM, ABLATION, arg="k=8", dag_view=True)),
    ("exlm_ctc", ArmSpec(EXLM, EXLM, ABLATION, arg="transitions=ctc", dag_view=True)),
    ("exlm_rope1d", ArmSpec(EXLM, EXLM, ABLATION, arg="positions=rope1d_shared", dag_view=True)),
    ("maelm_dec1", ArmSpec(MAELM, MAELM, ABLATION, options=(("maelm.decoder_layers", 1),))),
    ("maelm_dec2", ArmSpec(MAELM, MAELM, ABLATION, options=(("maelm.decoder_layers", 2),))),
)
ARM_SPECS = dict(_ARMS)
DEFAULT_ARMS = ("mlm", "mlm++", "maelm", "exlm")


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str  # e.g. mlm, mlm++@exlm, maelm_dec1 (with --encoder paper: mlm@exlm)
  family: str  # the method family whose config (and group) it belongs to
  group: str  # the analysis / comparison group: "shared" or the family (--encoder paper)
  spec: ArmSpec


def arm_dir(name: str) -> str:
  """A folder name for an arm: 'mlm++@exlm' -> 'mlmpp_at_exlm'."""
  return name.replace("++", "pp").replace("@", "_at_")


def resolve_arms(names: Sequence[str], encoder: str) -> list[Arm]:
  """The arms `names` asks for, expanded: mlm++ -> mlm++@<family> for each family with a method or ablation arm
  (@<the shared family's> when there is none), and with --encoder paper mlm -> mlm@<family> likewise."""
  if encoder not in ENCODERS:
    raise ValueError(f"--encoder {encoder!r}; choose shared or paper")
  base_names = {n.partition("@")[0] for n in names}
  unknown = sorted(n for n in base_names if n not in ARM_SPECS)
  if unknown:
    raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARM_SPECS)} (mlm++@exlm, mlm++@maelm, and "
                     "with --encoder paper mlm@exlm, mlm@maelm)")
  families = [ARM_SPECS[n].family for n in names if n in ARM_SPECS and ARM_SPECS[n].family]
  families = list(dict.fromkeys(families)) or [_SHARED_FAMILY]
  arms = []
  for name in names:
    base, _, at = name.partition("@")
    spec = ARM_SPECS[base]
    if at and (spec.role != BASELINE or at not in FAMILIES):
      raise ValueError(f"arm {name!r}: only mlm and mlm++ take @exlm / @maelm")
    if spec.role != BASELINE:
      arms.append(Arm(name, spec.family, spec.family if encoder == PAPER else SHARED, spec))
      continue
    per_family = spec.budget == EQUAL_FLOPS or encoder == PAPER
    for family in ([at] if at else families if per_family else [None]):
      arm_name = f"{base}@{family}" if family else base
      family = family or _SHARED_FAMILY
      arms.append(Arm(arm_name, family, family if encoder == PAPER else SHARED, spec))
  seen = {}
  for arm in arms:
    seen.setdefault(arm.name, arm)
  return list(seen.values())


# ----------------------------------------------------------------------------------------------
# Configs: recipe, overrides, resolution (JAX-free)
# ----------------------------------------------------------------------------------------------


def flatten(config, prefix: str = "") -> dict[str, Any]:
  """{dotted.key: leaf value} of a ConfigDict / dict."""
  out = {}
  for key, value in (config.items() if hasattr(config, "items") else []):
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _blocks(config) -> set[str]:
  """The objective blocks of a pretraining config: its top-level sections config_lib.pretrain_config lacks."""
  return {k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)} - set(config_lib.pretrain_config())


def _is_recipe_key(key: str, blocks: set[str]) -> bool:
  top = key.split(".")[0]
  return top not in _NOT_RECIPE and top not in blocks


def config_spec(suite: Suite, scale: Scale, spec: ArmSpec, family: str) -> str:
  """'configs/<family config>.py:size=..,objective=..,budget=..[,<arg>]' of an arm."""
  args = [f"size={scale.size}"]
  if spec.objective != family:
    args.append(f"objective={spec.objective}")
  if spec.budget != "steps":
    args.append(f"budget={spec.budget}")
  if spec.arg:
    args.append(spec.arg)
  return f"{suite.configs[family]}:{','.join(args)}"


def recipe(suite: Suite, scale: Scale, family: str) -> dict[str, Any]:
  """The group's recipe: every field of `family`'s method config at this scale (the scale's overrides set)
  except the objective, its budget and the objective blocks."""
  config = config_lib.load(config_spec(suite, scale, ARM_SPECS[family], family))
  for key, value in scale.pretrain.items():
    config_lib.override(config, key, config_lib.format_value(value), f"scale {scale.size}: ")
  blocks = _blocks(config)
  return {k: v for k, v in flatten(config).items() if _is_recipe_key(k, blocks)}


def arm_overrides(suite: Suite, scale: Scale, arm: Arm, recipe_fields: dict[str, Any]) -> dict[str, Any]:
  """{dotted key: value} that turn the arm's config file into the recipe (the fields that differ and every field the
  scale sets, so e.g. data.packing is explicit whatever the configs' defaults), plus the
  arm's block options and, for a baseline, the method's steps at this scale in `matched_to` (MLM++: the FLOPs it
  is matched to)."""
  spec_text = config_spec(suite, scale, arm.spec, arm.family)
  fields = flatten(config_lib.load(spec_text))
  overrides = {}
  for key, value in recipe_fields.items():
    if key not in fields:
      raise ValueError(f"{spec_text} has no field {key!r} that the recipe sets; give every method config of the "
                       f"{suite.name} suite the same fields")
    if fields[key] != value or key in scale.pretrain:  # the scale's own settings always explicit
      overrides[key] = value
  if fields.get("matched_to.objective") and fields["matched_to.total_steps"] != recipe_fields["total_steps"]:
    overrides["matched_to.total_steps"] = recipe_fields["total_steps"]  # the method's steps at this scale
  overrides.update(dict(arm.spec.options))
  return overrides


def resolved_config(spec_text: str, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The config main.py builds from `--config spec_text` and the overrides, without the objective's defaults
  merged in (an option of the objective's block absent from the file is added as given)."""
  config = config_lib.load(spec_text)
  for key, value in overrides.items():
    top, _, rest = key.partition(".")
    if top == config.get("objective") and rest and rest not in config.get(top, {}):
      config[top] = config.get(top) or ml_collections.ConfigDict()
      config[top][rest] = value
      continue
    config_lib.override(config, key, config_lib.format_value(value))
  return config


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """One launch: `module` is 'main' (main.py) or 'analysis' (python -m exlm_jax.analysis)."""

  name: str
  kind: str  # pretrain | finetune | analysis | dag_view
  module: str
  args: list
  workdir: str
  arm: str = ""
  task: str = ""


def comparisons(arms: Sequence[Arm]) -> list[dict]:
  """[{method, baseline, group}]: every non-baseline arm against each MLM / MLM++ of its family in its group."""
  out = []
  for arm in arms:
    if arm.spec.role == BASELINE:
      continue
    for base in arms:
      if base.spec.role == BASELINE and base.group == arm.group and (
          base.family == arm.family or (base.spec.budget != EQUAL_FLOPS and arm.group == SHARED)):
        out.append({"method": arm.name, "baseline": base.name, "group": arm.group})
  return out


def build(suite_name: str, scale_name: str, workdir: str, arms: Sequence[str] | None = None,
          seeds: Sequence[int] | None = None, tasks: Sequence[str] | None = None, encoder: str = SHARED) -> dict:
  """The whole plan as JSON-able data: arms (spec, overrides), runs in launch order, comparisons."""
  if suite_name not in SUITES:
    raise ValueError(f"--suite {suite_name!r}; choose one of {', '.join(SUITES)}")
  if scale_name not in SCALES:
    raise ValueError(f"--scale {scale_name!r}; choose one of {', '.join(SCALES)}")
  suite, scale = SUITES[suite_name], SCALES[scale_name]
  tasks = list(tasks or scale.tasks[suite_name])
  bad = [t for t in tasks if t not in suite.task_names]
  if bad:
    raise ValueError(f"--tasks {bad} not in the {suite_name} suite; choose from {', '.join(suite.task_names)}")
  seeds = [int(s) for s in (scale.seeds if seeds is None else seeds)]
  if not seeds:
    raise ValueError("--seeds is empty; give e.g. --seeds 0,1,2")
  resolved = resolve_arms(list(arms or DEFAULT_ARMS), encoder)
  workdir = os.path.abspath(workdir)
  recipes = {}
  arm_rows, runs = [], []
  for arm in resolved:
    key = suite.shared_family if arm.group == SHARED else arm.family
    if key not in recipes:
      recipes[key] = recipe(suite, scale, key)
    overrides = arm_overrides(suite, scale, arm, recipes[key])
    spec_text = config_spec(suite, scale, arm.spec, arm.family)
    folder = os.path.join(workdir, "pretrain", arm_dir(arm.name))
    arm_rows.append({"name": arm.name, "family": arm.family, "group": arm.group, "objective": arm.spec.objective,
                     "budget": arm.spec.budget, "role": arm.spec.role, "dag_view": arm.spec.dag_view, "config": spec_text,
                     "overrides": overrides,
                     "workdir": folder})
    runs.append(Run(f"pretrain/{arm_dir(arm.name)}", "pretrain", "main",
                    main_args(spec_text, folder, overrides), folder, arm=arm.name))
  ft_spec = lambda task: f"{suite.finetune_config}:task={task}" + (f",{scale.finetune_arg}" if scale.finetune_arg else "")
  for row in arm_rows:
    for task in tasks:
      folder = os.path.join(workdir, "finetune", arm_dir(row["name"]), task)
      overrides = {"init_from": row["workdir"], "seeds": tuple(seeds), **scale.finetune}
      runs.append(Run(f"finetune/{arm_dir(row['name'])}/{task}", "finetune", "main",
                      main_args(ft_spec(task), folder, overrides), folder, arm=row["name"], task=task))
  eval_data = {key: r.get("data.eval_path") or r["data.path"] for key, r in recipes.items()}
  groups = list(dict.fromkeys(row["group"] for row in arm_rows))
  for group in groups:
    members = [row for row in arm_rows if row["group"] == group]
    members.sort(key=lambda row: (row["role"] != BASELINE or row["budget"] == EQUAL_FLOPS,))  # MLM first
    data = eval_data[suite.shared_family if group == SHARED else group]
    folder = os.path.join(workdir, "analysis", group)
    args = ["report", "--workdirs", *[row["workdir"] for row in members], "--data", data, "--out", folder,
            "--allow_mismatch", "--max_sequences", str(scale.analysis_sequences), *scale.analysis_args]
    runs.append(Run(f"analysis/{group}", "analysis", "analysis", args, folder))
  for row in arm_rows:
    if row["dag_view"]:
      data = eval_data[suite.shared_family if row["group"] == SHARED else row["group"]]
      folder = os.path.join(workdir, "analysis", f"dag_{arm_dir(row['name'])}")
      runs.append(Run(f"analysis/dag_{arm_dir(row['name'])}", "dag_view", "analysis",
                      ["dag_view", "--workdir", row["workdir"], "--data", data, "--index", "0", "--out", folder],
                      folder, arm=row["name"]))
  return {"suite": suite_name, "scale": scale_name, "encoder": encoder, "workdir": workdir, "seeds": seeds,
          "tasks": tasks, "arms": arm_rows, "runs": [dataclasses.asdict(r) for r in runs],
          "comparisons": comparisons(resolved), "eval_data": eval_data}


def main_args(spec_text: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
  """main.py's arguments for one run."""
  flags = [f"--config.{k}={config_lib.format_value(v)}" for k, v in overrides.items()]
  return ["--config", spec_text, "--workdir", workdir] + flags


# ----------------------------------------------------------------------------------------------
# Finished runs (resume)
# ----------------------------------------------------------------------------------------------


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def finished(run: dict, seeds: Sequence[int]) -> bool:
  """Whether a run of the plan is complete: pretraining final_metrics.json not preempted; fine-tuning
  results.json with every seed; an analysis its report.json / dag_view.json."""
  folder = run["workdir"]
  if run["kind"] == "pretrain":
    final = _read(os.path.join(folder, "final_metrics.json"))
    return bool(final) and not final.get("preempted", True)
  if run["kind"] == "finetune":
    results = _read(os.path.join(folder, "results.json"))
    return bool(results) and sorted(results.get("seeds", [])) == sorted(seeds)
  name = "report.json" if run["kind"] == "analysis" else "dag_view.json"
  return os.path.exists(os.path.join(folder, name))
