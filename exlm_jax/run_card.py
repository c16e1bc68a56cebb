"""Run cards: what a pretraining or fine-tuning run was, in one file (`<workdir>/run_card.json`), so runs can be
compared only when they are comparable (`python -m exlm_jax.analysis report` refuses mismatched runs).

A card holds exactly these fields:
  kind                'pretrain' | 'finetune'
  objective           config.objective (fine-tuning: the pretraining objective, set by the caller)
  budget              config.budget; 'steps' when the config has none (the run's own total_steps)
  matched_to          config.matched_to: the run an equal-steps / equal-FLOPs baseline was matched to; None
  encoder             every encoder field (models/encoder.py ModelConfig; absent ones at their default)
  encoder_fingerprint sha256 of the canonical JSON (sorted keys) of the ARCHITECTURE fields of `encoder`: all
                      but NON_ARCHITECTURE (dropout rates, dtype, remat, scan_layers, attention_impl), which
                      change how a run computes, not what function the encoder is
  data                {path, content_sha256, tokenizer, vocab_size, records, max_example_len}
  data_fingerprint    sha256 of the canonical JSON of `data`, without `path` when content_sha256 is known
                      (the same bytes under another path are the same data)
  steps               optimizer steps reached
  tokens_seen         slots: steps * batch_size * seq_len (padding included)
  real_tokens_seen    non-padding tokens, summed over sessions; None until the trainer counts them
  train_flops         steps * the static-shape model FLOPs of one step (train/flops.py, checked against XLA)
  wall_time_s         summed over resumes: the previous card's value + this session's
  device              e.g. '8 x TPU v5 lite (tpu)'

Where each value comes from (`build_card`'s inputs; a value whose producer is absent is written as None):
  data_summary: the pipeline's summary (data/pipeline.py `load_pretraining_data().summary`) -- `source` (path),
    `content_sha256` (the data caches keyed on content write it), `tokenizer`, `vocab_size`, `train_records`,
    `max_example_len` (the longest example trained on, in slots with <s> and </s>; the pipeline's records).
    Fine-tuning passes the same keys for its task data.
  perf: `step` (steps reached) and `wall_time_s` (this session) are required; `real_tokens_seen` (this
    session's non-padding tokens, the trainer's on-device count) and `flops_per_step` are optional (FLOPs
    default to train/flops.py for an objective with a FLOPs model).

The trainers call `update_card(workdir, kind, config, data_summary, perf)` (when a run ends and at checkpoint
saves): it reads the previous card, builds the new one and writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import jax
import ml_collections

from exlm_jax import run_store
from exlm_jax.models.encoder import ModelConfig

KINDS = (run_store.PRETRAIN, run_store.FINETUNE)
FIELDS = ("kind", "objective", "budget", "matched_to", "encoder", "encoder_fingerprint", "data", "data_fingerprint",
          "steps", "tokens_seen", "real_tokens_seen", "train_flops", "wall_time_s", "device")
DATA_FIELDS = ("path", "content_sha256", "tokenizer", "vocab_size", "records", "max_example_len")
NON_ARCHITECTURE = ("dropout_rate", "attention_dropout_rate", "dtype", "remat", "scan_layers", "attention_impl")
DEFAULT_BUDGET = "steps"
EQUAL_FLOPS = "equal_flops"


def _plain(config) -> dict:
  """A ConfigDict or mapping as a plain dict."""
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _as_json(payload):
  """`payload` as it reads back from JSON (tuples become lists, ...), so a card's fingerprints survive a round trip."""
  return json.loads(json.dumps(payload, default=str))


def fingerprint(payload) -> str:
  """sha256 of the canonical JSON (sorted keys, no spaces) of `payload`."""
  text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def encoder_fields(model) -> dict:
  """Every ModelConfig field of a config's `model` section, absent ones at their default (keys such as `size`,
  which only name a preset, are not fields)."""
  model = _plain(model)
  defaults = {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(ModelConfig)}
  return _as_json({name: model.get(name, default) for name, default in defaults.items()})


def architecture(encoder: Mapping) -> dict:
  """The encoder fields that define the function it computes (all but NON_ARCHITECTURE)."""
  return {k: v for k, v in encoder.items() if k not in NON_ARCHITECTURE}


def data_fingerprint(data: Mapping) -> str:
  """sha256 of the data fields; `path` left out when the content hash is known."""
  return fingerprint({k: v for k, v in data.items() if not (k == "path" and data.get("content_sha256"))})


def describe_devices() -> str:
  """'N x <device kind> (<platform>)' of this job's devices."""
  device = jax.devices()[0]
  return f"{jax.device_count()} x {device.device_kind} ({device.platform})"


def _static_flops_per_step(config: dict) -> float | None:
  from exlm_jax.train import flops  # pylint: disable=g-import-not-at-top  (the objectives' models)
  objective = config.get("objective")
  if not objective or not flops.has_model(objective):
    return None
  return float(flops.train_flops_per_step(ml_collections.ConfigDict(config)))


def _summed(previous: Mapping | None, key: str, session):
  """previous[key] + session; None when this session's value is unknown or a previous card lacks it."""
  if session is None:
    return None
  if previous is None:
    return session
  return None if previous.get(key) is None else previous[key] + session


def _matched_to(config) -> dict | None:
  """{objective, options, total_steps} of the method a baseline was matched to (config_lib.matched_baseline)."""
  matched = config.get("matched_to")
  if not matched or not matched.get("objective"):
    return None
  return json.loads(json.dumps(matched.to_dict() if hasattr(matched, "to_dict") else dict(matched)))


def build_card(kind: str, config, data_summary: Mapping, perf: Mapping, device: str,
               previous: Mapping | None = None) -> dict:
  """The run card of a run (fields and sources in the module docstring).

  Args:
    kind: 'pretrain' | 'finetune'.
    config: the run's resolved config (ConfigDict or dict; `model.vocab_size` set).
    data_summary: the data's summary (keys in the module docstring); absent keys are None.
    perf: {'step', 'wall_time_s'[, 'real_tokens_seen', 'flops_per_step']} of this session.
    device: e.g. `describe_devices()`.
    previous: the card this workdir held before this session (resumes), or None.
  """
  if kind not in KINDS:
    raise ValueError(f"run card kind {kind!r}; use one of {KINDS}")
  for key in ("step", "wall_time_s"):
    if perf.get(key) is None:
      raise ValueError(f"build_card needs perf[{key!r}] (this session's value)")
  config = _plain(config)
  encoder = encoder_fields(config.get("model", {}))
  data = _as_json({"path": data_summary.get("source") or config.get("data", {}).get("source")
          or config.get("data", {}).get("path") or None,
          "content_sha256": data_summary.get("content_sha256"),
          "tokenizer": data_summary.get("tokenizer"),
          "vocab_size": data_summary.get("vocab_size", encoder["vocab_size"]),
          "records": data_summary.get("train_records"),
          "max_example_len": data_summary.get("max_example_len")})
  steps = int(perf["step"])
  per_step = perf.get("flops_per_step")
  per_step = _static_flops_per_step(config) if per_step is None else float(per_step)
  card = {
      "kind": kind, "objective": config.get("objective"), "budget": config.get("budget") or DEFAULT_BUDGET,
      "matched_to": _matched_to(config),
      "encoder": encoder, "encoder_fingerprint": fingerprint(architecture(encoder)),
      "data": data, "data_fingerprint": data_fingerprint(data),
      "steps": steps, "tokens_seen": steps * int(config["batch_size"]) * int(config["seq_len"]),
      "real_tokens_seen": _summed(previous, "real_tokens_seen", perf.get("real_tokens_seen")),
      "train_flops": None if per_step is None else steps * per_step,
      "wall_time_s": _summed(previous, "wall_time_s", float(perf["wall_time_s"])),
      "device": device,
  }
  validate_card(card)
  return card


def validate_card(card: Mapping, where: str = "run card") -> None:
  """One-line ValueError when `card` lacks a field, has unknown ones or its fingerprints do not match."""
  missing = [f for f in FIELDS if f not in card]
  unknown = sorted(set(card) - set(FIELDS))
  if missing or unknown:
    raise ValueError(f"{where}: missing fields {missing}, unknown fields {unknown}; rewrite it with "
                     "exlm_jax.run_card.build_card")
  if sorted(card["data"]) != sorted(DATA_FIELDS):
    raise ValueError(f"{where}: data fields {sorted(card['data'])}, expected {sorted(DATA_FIELDS)}")
  if card["kind"] not in KINDS:
    raise ValueError(f"{where}: kind {card['kind']!r}; use one of {KINDS}")
  if (card["encoder_fingerprint"] != fingerprint(architecture(card["encoder"]))
      or card["data_fingerprint"] != data_fingerprint(card["data"])):
    raise ValueError(f"{where}: a fingerprint does not match its fields (edited by hand?); rewrite it with "
                     "exlm_jax.run_card.build_card")


def write_card(workdir, card: Mapping) -> pathlib.Path:
  """Validates `card` and writes <workdir>/run_card.json (atomic, process 0 only)."""
  validate_card(card)
  path = pathlib.Path(workdir) / run_store.RUN_CARD_FILE
  run_store.write_json(path, dict(card))
  return path


def read_card(workdir) -> dict | None:
  """The validated card of a workdir; None for a run without one (written before run cards existed)."""
  card = run_store.read_run_card(workdir)
  if card is not None:
    validate_card(card, str(pathlib.Path(workdir) / run_store.RUN_CARD_FILE))
  return card


def update_card(workdir, kind: str, config, data_summary: Mapping, perf: Mapping) -> dict:
  """What a trainer calls: reads the workdir's previous card (if any), builds this session's card on top of it
  (wall_time_s and real_tokens_seen summed) with this job's devices, writes and returns it."""
  card = build_card(kind, config, data_summary, perf, describe_devices(), read_card(workdir))
  write_card(workdir, card)
  return card


# ----------------------------------------------------------------------------------------------
# Comparing cards
# ----------------------------------------------------------------------------------------------


def _field_differences(prefix: str, a: Mapping, b: Mapping, names: tuple[str, str]) -> list[str]:
  return [f"{prefix}.{k}: {a.get(k)} ({names[0]}) vs {b.get(k)} ({names[1]})"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def budget_differences(a: Mapping, b: Mapping, names: tuple[str, str]) -> list[str]:
  """Empty when b's budget matches a's: with budget 'equal_flops' on either side, train_flops within one step of
  that side (its step count is the other's FLOPs rounded to whole steps); otherwise equal steps and tokens_seen."""
  if EQUAL_FLOPS in (a["budget"], b["budget"]):
    fa, fb = a["train_flops"], b["train_flops"]
    if fa is None or fb is None:
      return [f"train_flops: {fa} ({names[0]}) vs {fb} ({names[1]}) (an equal_flops budget needs both)"]
    one_step = max(card["train_flops"] / max(card["steps"], 1) for card in (a, b) if card["budget"] == EQUAL_FLOPS)
    if abs(fa - fb) <= one_step:
      return []
    return [f"train_flops: {fa:.4g} ({names[0]}) vs {fb:.4g} ({names[1]}) (budget {a['budget']} vs {b['budget']})"]
  return [f"{k}: {a[k]} ({names[0]}) vs {b[k]} ({names[1]}) (budget {a['budget']} vs {b['budget']})"
          for k in ("steps", "tokens_seen") if a[k] != b[k]]


def compare_cards(cards: Mapping[str, Mapping] | Sequence[Mapping]) -> list[str]:
  """'field: a (run) vs b (run)' for every way a card differs from the FIRST one (the reference: the run the
  others were matched to) in encoder architecture, data or budget; empty when all runs are matched."""
  if not isinstance(cards, Mapping):
    cards = {f"run {i}": card for i, card in enumerate(cards)}
  (ref_name, ref), *others = cards.items()
  out = []
  for name, card in others:
    names = (ref_name, name)
    if card["encoder_fingerprint"] != ref["encoder_fingerprint"]:
      out += _field_differences("encoder", architecture(ref["encoder"]), architecture(card["encoder"]), names)
    if card["data_fingerprint"] != ref["data_fingerprint"]:
      skip_path = ref["data"]["content_sha256"] and ref["data"]["content_sha256"] == card["data"]["content_sha256"]
      out += [d for d in _field_differences("data", ref["data"], card["data"], names)
              if not (skip_path and d.startswith("data.path:"))]
    out += budget_differences(ref, card, names)
  return out


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
    return value[:12]  # a sha256: its first 12 hex digits
  return str(value).replace("|", "\\|")


def cards_markdown(cards: Mapping[str, Mapping | None]) -> str:
  """The cards side by side: one Markdown row per field (encoder architecture fields and data fields spelt out),
  one column per run; a run without a card shows 'no run card'."""
  names = list(cards)
  present = [c for c in cards.values() if c is not None]
  encoder_keys = sorted({k for c in present for k in c["encoder"]})
  rows = [("kind",), ("objective",), ("budget",), ("matched_to",), ("steps",), ("tokens_seen",),
          ("real_tokens_seen",), ("train_flops",), ("wall_time_s",), ("device",), ("encoder_fingerprint",),
          *(("encoder", k) for k in encoder_keys), ("data_fingerprint",), *(("data", k) for k in DATA_FIELDS)]
  lines = ["| field | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for row in rows:
    cells = []
    for name in names:
      card = cards[name]
      if card is None:
        cells.append("no run card")
        continue
      value = card[row[0]] if len(row) == 1 else card[row[0]].get(row[1])
      cells.append(_cell(value))
    lines.append(f"| {'.'.join(row)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
