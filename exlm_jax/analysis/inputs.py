"""What every analysis tool reads: a restored pretraining run, the analysis data as the pretraining
pipeline's blocks, and masks drawn by the pretraining rule."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exlm_jax import objectives, run_store
from exlm_jax.data import vocab

DEFAULT_MASK_RATIOS = (0.15, 0.3, 0.45, 0.6)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A restored pretraining workdir."""

  workdir: str
  config: ml_collections.ConfigDict
  tokenizer: Any
  params: Any
  step: int
  jitted: dict = dataclasses.field(default_factory=dict, repr=False)  # (tool fn, extra) -> jitted fn

  @property
  def objective(self) -> str:
    return self.config.objective

  @property
  def spec(self) -> objectives.Objective:
    """The registered Objective: what each analysis may measure on this run."""
    return objectives.get(self.objective)

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))

  def model(self, **overrides):
    """The objective's Linen module (deterministic), attributes replaced by `overrides`."""
    module = self.spec.make_model(self.config, True)
    return module.clone(**overrides) if overrides else module

  def encoder(self):
    from exlm_jax.models.encoder import Encoder, ModelConfig  # pylint: disable=g-import-not-at-top
    return Encoder(ModelConfig.from_config(self.config.model), deterministic=True)


def load_run(workdir) -> Run:
  """Config, tokenizer and latest params (only the params: no optimizer state) of a pretraining run."""
  location = run_store.resolve_run(workdir)
  if location.kind == run_store.FINETUNE:
    raise ValueError(f"{location.workdir} is a fine-tuning run; the analyses need a pretraining workdir")
  params, step = run_store.restore_params(location.checkpoint_dir, location.step)
  return Run(str(location.workdir), run_store.run_config(location), run_store.load_tokenizer(location.workdir),
             params, int(step))


def as_run(run) -> Run:
  return run if isinstance(run, Run) else load_run(run)


def cached(run: Run, name: str, build, *extra):
  """One jitted function per (tool function, extra) on `run`, so repeated tool calls (report) skip compiles."""
  key = (name, *extra)
  if key not in run.jitted:
    run.jitted[key] = build()
  return run.jitted[key]


def hidden_states_fn(run: Run):
  """fn(tokens (B, L), positions (B, L) | None, padding (B, L)) -> tuple of L+1 float32 (B, L, D) numpy states
  of the run's encoder (copy index 0: no expansion)."""
  encoder = run.encoder()

  def build():
    def hidden(params, tokens, positions, padding):
      _, states = encoder.apply({"params": params}, tokens, positions=positions, padding_mask=padding,
                                return_hidden_states=True)
      return tuple(h.astype(jnp.float32) for h in states)
    return jax.jit(hidden)

  jitted = cached(run, "hidden", build)
  return lambda tokens, positions, padding: jax.device_get(jitted(run.params["encoder"], tokens, positions, padding))


# ----------------------------------------------------------------------------------------------
# Data blocks and masks
# ----------------------------------------------------------------------------------------------


def blocks_from_records(records: Sequence[str], run: Run, what: str = "--data") -> np.ndarray:
  """(R, seq_len) int32 blocks made by the pretraining pipeline itself (data/pipeline.py: token cache and block
  sources) with the run's tokenizer, data kind and seq_len: SMILES one record per block (over-long ones
  truncated), text a </s>-joined stream cut into windows of seq_len - 2. Untokenizable and empty records drop."""
  from exlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  seq_len, split = int(run.config.seq_len), "analysis"
  smiles = run.config.data.name == "smiles"
  with tempfile.TemporaryDirectory() as directory:
    pipeline.write_token_cache(list(records), run.tokenizer, directory, split, "records" if smiles else "stream")
    if smiles:
      keep, _ = pipeline.records_keep(np.load(os.path.join(directory, f"{split}.offsets.npy")), seq_len, "truncate")
      source = pipeline.RecordBlocks(directory, split, seq_len, keep)
    else:
      source = pipeline.TextBlocks(directory, split, seq_len)
    blocks = source.batch(np.arange(len(source)))
  if not len(blocks):
    raise ValueError(f"no tokenizable record in {what}; check it and that it matches the run's tokenizer")
  return blocks


def load_data_blocks(path: str, run: Run, max_sequences: int = 512) -> np.ndarray:
  """Reads `path` (SMILES or text, any format the pipeline reads) into <= max_sequences (R, n) blocks with
  the run's tokenizer, data kind and seq_len, all-<pad> trailing columns removed (n <= seq_len)."""
  from exlm_jax.data import readers  # pylint: disable=g-import-not-at-top
  kind = run.config.data.name
  local = readers.resolve_source(path, "--data")
  records = []
  for record in readers.read_records(local, kind=kind, column=str(run.config.data.get("column", "")),
                                      documents=run.config.data.get("documents", "line")):
    if record:
      records.append(record)
    if kind == "smiles" and len(records) >= max_sequences:
      break
    if kind == "text" and len(records) >= 50 * max_sequences:
      break
  return trim_padding(blocks_from_records(records, run)[:max_sequences])


def trim_padding(blocks: np.ndarray) -> np.ndarray:
  """(R, n) -> (R, n') without the trailing columns that are <pad> in every row (SMILES blocks are mostly
  padding); the model's outputs at the kept slots do not change, the work shrinks."""
  used = np.flatnonzero((blocks != vocab.PAD).any(axis=0))
  return blocks[:, :used[-1] + 1] if used.size else blocks


def shorten_blocks(blocks: np.ndarray, length: int) -> np.ndarray:
  """(R, n) blocks cut to (R, length), content truncated so every row still ends in </s>."""
  from exlm_jax.analysis import repeated_mlm as rmlm  # pylint: disable=g-import-not-at-top
  if length >= blocks.shape[1]:
    return blocks
  return np.stack([rmlm.truncate_to_fit(row, 1, length)[:length] for row in blocks])


def batches(blocks: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (index, (b, n) block batch); the last one is padded with all-<pad> rows to batch_size."""
  for index, start in enumerate(range(0, len(blocks), batch_size)):
    chunk = blocks[start:start + batch_size]
    if len(chunk) < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
    yield index, chunk


def select_masks(tokens: np.ndarray, mask_prob: float, seed: int, index: int):
  """The pretraining mask rule (objectives/masking.py), seeded per batch: MaskSelection of numpy arrays."""
  from exlm_jax.objectives.masking import select_masked_positions  # pylint: disable=g-import-not-at-top
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), index)
  return jax.device_get(select_masked_positions(jnp.asarray(tokens), rng, float(mask_prob)))
