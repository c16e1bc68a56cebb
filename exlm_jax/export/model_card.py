"""The README.md model card of an exported folder: what was trained, how, how to load it, what is left out."""

from __future__ import annotations

import json

from exlm_jax import objectives

RUN_CARD_FILE = "run_card.json"



def _data_line(config) -> str:
  data = dict(config.get("data", {}) or {})
  if not data:
    return "-"
  parts = [str(data.get(k)) for k in ("path", "tokenizer") if data.get(k)]
  if (data.get("max_examples") or -1) > 0:
    parts.append(f"max_examples={data['max_examples']}")
  return ", ".join(parts) or "-"


def _how_loaded(export) -> str:
  if export.trust_remote_code:
    return " with trust_remote_code=True (modeling_exlm.py, torch + transformers only)"
  return ", a native transformers class"


def _usage(export) -> str:
  remote = ", trust_remote_code=True" if export.trust_remote_code else ""
  out = "outputs.logits" if export.head != "encoder" else "outputs.last_hidden_state"
  # AutoTokenizer also works, but first asks whether to run the config's remote code (either answer works).
  tokenizer_class = "PreTrainedTokenizerFast" if export.trust_remote_code else "AutoTokenizer"
  return "\n".join([
      "```python",
      f"from transformers import {tokenizer_class}, {export.auto_class}",
      f"tokenizer = {tokenizer_class}.from_pretrained(DIR)  # plain tokenizer.json, no remote code",
      f"model = {export.auto_class}.from_pretrained(DIR{remote}).eval()",
      "batch = tokenizer([...], padding=True, truncation=True, return_tensors='pt')",
      f"outputs = model(**batch)  # {out}",
      "```",
  ])


def render(run, export, workdir) -> str:
  """Markdown for `run` (an exlm_jax LoadedModel of `workdir`) exported as `export`."""
  cfg = run.model_config
  task = run.task
  lines = [
      "---", "library_name: transformers", f"tags: [exlm_jax, {run.objective or 'scratch'}]", "---", "",
      f"# {workdir.name} ({export.architecture})", "",
      f"Exported by `python -m exlm_jax.export` from the exlm_jax {run.kind} run `{workdir}` at step {run.step}.", "",
      "| | |", "|---|---|",
      f"| objective | {run.objective or 'none (fine-tuned from random init)'} |",
      f"| data | {_data_line(run.config)} |",
      f"| steps | {run.step} |",
      f"| encoder | {cfg.num_layers} layers x {cfg.d_model}, {cfg.num_heads} heads, MLP {cfg.mlp_dim}, "
      f"{'pre-LN + final LN' if cfg.pre_ln else 'post-LN'}, positions {cfg.positions}, embedding LayerNorm "
      f"{'yes' if cfg.embed_layernorm else 'no'}, LayerNorm eps {cfg.layernorm_eps:g} |",
      f"| vocabulary | {cfg.vocab_size} ({run.tokenizer.kind}); <pad>=0 <unk>=1 <s>=2 </s>=3 [MASK]=4 |",
      f"| max length | {run.config.get('seq_len', '-')} tokens (`tokenizer(..., truncation=True)` cuts there) |",
      f"| class | {export.architecture} via {export.auto_class}{_how_loaded(export)} |",
      "", "## Use", "", _usage(export), "",
  ]
  if task:
    lines += ["## Task", "", f"Fine-tuned on **{task['name']}** ({task['task_type']}, {task['num_outputs']} output(s); "
              f"labels {', '.join(map(str, task.get('label_names') or []))}).", ""]
    if task["task_type"] == "regression":
      lines += ["Targets were standardised for training: `logits` are in standardised units. Predictions in label "
                "units are `logits * target_std + target_mean`, with", "",
                f"- target_mean = {list(task['target_mean'])}", f"- target_std = {list(task['target_std'])}", "",
                "(both also in config.json).", ""]
    elif task["task_type"] == "multitask_binary":
      lines += ["`logits` are independent per-task logits: apply a sigmoid for probabilities.", ""]
    else:
      lines += ["`logits` are class logits: apply a softmax for probabilities.", ""]
  lines += ["## Not exported", ""]
  note = objectives.get(run.objective).export_note if run.objective else ""
  if export.head == "encoder" and note:
    lines += [note, ""]
  if not export.trust_remote_code and export.head == "encoder":
    lines += ["RobertaModel's pooler was never trained here: transformers initialises it at random (it warns); "
                "use `last_hidden_state`.", ""]
  lines += ["Token-type (segment) embeddings: none (a single zero row in RoBERTa layouts); pairs are "
            "`<s> A </s> </s> B </s>`. Dropout matches the run's config for further training.", ""]
  run_card = workdir / RUN_CARD_FILE
  if run_card.is_file():
    lines += ["## Run card", "", "```json", json.dumps(json.loads(run_card.read_text()), indent=2), "```", ""]
  return "\n".join(lines)
