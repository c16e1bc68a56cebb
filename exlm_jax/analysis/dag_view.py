"""The `dag_view` tool: Viterbi alignment, transition matrix and which state emits which token for one input
of a run whose objective aligns states through a DAG (`Objective.dag`: ExLM)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from exlm_jax import objectives, run_store
from exlm_jax.analysis import inputs
from exlm_jax.data import vocab
from exlm_jax.objectives.base import content_slots


def dag_view_inputs(run: inputs.Run, data: str | None = None, index: int = 0, smiles: str | None = None,
                    mask_positions: Sequence[int] | None = None, mask_ratio: float | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (1, n), is_masked (1, n)) for one example: block `index` of `data` or the string `smiles`,
  masked at `mask_positions` (slot indices) or by the pretraining rule at `mask_ratio` (default the run's)."""
  if smiles is not None:
    block = inputs.blocks_from_records([smiles], run, "--smiles")[:1]
  elif data is not None:
    blocks = inputs.load_data_blocks(data, run, max_sequences=index + 1)
    if index >= len(blocks):
      raise IndexError(f"--index {index} but --data has only {len(blocks)} blocks")
    block = blocks[index:index + 1]
  else:
    raise ValueError("dag_view needs --smiles or --data (with --index)")
  if mask_positions is not None:
    is_masked = np.zeros(block.shape, bool)
    positions = np.asarray(mask_positions, int)
    if np.any(~content_slots(block)[0, positions]):
      raise ValueError(f"mask positions {list(positions)} include <s>, </s> or <pad> slots; pick content slots")
    is_masked[0, positions] = True
  else:
    ratio = float(run.config.mask_prob if mask_ratio is None else mask_ratio)
    is_masked = np.asarray(inputs.select_masks(block, ratio, seed, 0).is_masked)
  return block, is_masked


def _dag_objective(run: inputs.Run):
  if run.spec.dag is None:
    titles = " or ".join(objectives.get(name).title for name in objectives.names() if objectives.get(name).dag)
    raise ValueError(f"dag_view needs an {titles} workdir; {run.workdir} is {run.objective!r}")
  return run.spec.dag


def analyse(workdir, out_dir: str, data: str | None = None, index: int = 0, smiles: str | None = None,
            mask_positions: Sequence[int] | None = None, mask_ratio: float | None = None, seed: int = 0) -> dict:
  """Viterbi path, transition matrix and which copy emits which token for one input; writes dag_view.json /
  dag_view.png."""
  from exlm_jax.analysis import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
  run = inputs.as_run(workdir)
  dag = _dag_objective(run)
  tokens, is_masked = dag_view_inputs(run, data, index, smiles, mask_positions, mask_ratio, seed)
  ratio = max(float(run.config.mask_prob), float(is_masked.sum()) / tokens.shape[1])
  model = run.model(mask_prob=ratio)
  dag.block_length(model, ratio, tokens.shape[1])  # fails clearly when the model cannot align this block
  fn = inputs.cached(run, "dag_view", lambda: jax.jit(
      lambda p, t, m: model.apply({"params": p}, t, m, method=dag.align)), ratio)
  a = jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(fn(run.params, tokens, is_masked)))  # first row
  num_targets, num_states = int(a.num_targets), int(a.num_states)
  token = lambda i: run.tokenizer.id_to_token(int(i))  # noqa: E731
  target_tokens = [token(t) for t in a.targets[:num_targets]]
  path = a.path[:num_states]
  trans = np.exp(np.asarray(a.transitions[:num_states, :num_states], np.float64))
  labels = [f"g{a.state_group[u]}c{a.state_copy[u]}" for u in range(num_states)]
  states = []
  for u in range(num_states):
    emitted = int(path[u])
    states.append({"state": u, "group": int(a.state_group[u]), "copy": int(a.state_copy[u]),
                   "input_slot": int(a.state_slot[u]), "input_token": token(a.state_token[u]),
                   "group_target": target_tokens[a.state_group[u]],
                   "emits_target": emitted, "emits_token": target_tokens[emitted] if emitted >= 0 else None,
                   "emit_prob_of_emitted": float(np.exp(a.emit_logp[emitted, u])) if emitted >= 0 else None,
                   "posterior_max_target": int(np.argmax(a.posteriors[:num_targets, u]))})
  real = int((tokens[0] != vocab.PAD).sum())
  result = {
      "tool": "dag_view", "workdir": run.workdir, "step": run.step, "num_copies": int(a.state_copy[:num_states].max()),
      "input": run.tokenizer.decode([int(t) for t in tokens[0, 1:real - 1]]),
      "input_tokens": [token(t) for t in tokens[0, :real]],
      "masked_slots": [int(i) for i in np.flatnonzero(is_masked[0])],
      "targets": target_tokens, "num_states": num_states, "viterbi_score": float(a.score),
      "path": [int(x) for x in path], "states": states, "transitions": trans.tolist(),
  }
  result["plots"] = {"dag_view": plots.plot_dag_alignment(
      trans, path, target_tokens, os.path.join(out_dir, "dag_view.png"), state_labels=labels)}
  run_store.write_json(os.path.join(out_dir, "dag_view.json"), result)
  return result
