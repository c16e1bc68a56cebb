"""The peer race: Hugging Face `RobertaForMaskedLM` (PyTorch, CPU) against exlm_jax's MLM step, same size.

  pip install -e '.[hf]'
  python bench/hf_peer.py --data_path '$DATA/smiles/moses/test.csv.gz' --json peer.json

What a user would run instead of exlm_jax: `transformers`' RoBERTa masked LM, trained the usual way --
`DataCollatorForLanguageModeling` (15 % of the tokens, 80/10/10) pads each batch to its longest molecule,
vocabulary logits at every position, `torch.optim.AdamW` -- on `--threads` CPU threads (2), fp32, at the
`small` size of exlm_jax (4 layers x 256, 4 heads, FFN 1024), dropout 0.1 / attention dropout 0.1 on both
sides. Its tokenizer is exlm_jax's SMILES regex vocabulary exported as a Hugging Face tokenizer (the same ids).

Two cases, each timed for both sides:
  * real MOSES: the peer takes `--molecules` (96) molecules per step; exlm_jax takes `--batch` (32) packed
    blocks of `--seq_len` (128) slots from its own pipeline (packing on, ~3 molecules per block), so both
    see about the same real tokens per step (the table shows them; aim within 10 %). The figure is real
    tokens/s: <s> ... </s> of each molecule, padding excluded, on both sides;
  * synthetic full blocks: `--batch` rows of `--seq_len` random tokens from a vocabulary of 8000, no
    padding (tokens/s = real tokens/s).
exlm_jax's step is bench/step_time.py's (the trainer's AOT-compiled step with its masking). The sides
are timed round-robin in one process (`--rounds` x `--steps`, a torch step ends with the optimizer
update, a JAX step with block_until_ready), so a shared host's load hits both alike; medians and the
ratio ours / peer are printed. Batches of the peer are collated before timing (its masks and padding are
drawn on the host, outside the step), which flatters it slightly. `--no_ours` times the peer alone.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)


def read_smiles(path: str, limit: int) -> list[str]:
  """The first `limit` SMILES of a MOSES-style CSV (column 'SMILES'; gzip or plain)."""
  from exlm_jax.data import paths  # pylint: disable=g-import-not-at-top
  path = paths.resolve(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="") as f:
    reader = csv.DictReader(f)
    column = "SMILES" if "SMILES" in reader.fieldnames else reader.fieldnames[0]
    out = []
    for row in reader:
      out.append(row[column])
      if len(out) >= limit:
        break
  return out


def hf_tokenizer(smiles: list[str], workdir: str, seq_len: int):
  """exlm_jax's SMILES regex vocabulary built on `smiles`, as a transformers PreTrainedTokenizerFast."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  from exlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from exlm_jax.export import hf_tokenizer as export  # pylint: disable=g-import-not-at-top
  ours, out = os.path.join(workdir, "ours"), os.path.join(workdir, "hf")
  tokenizers.SmilesRegexTokenizer.build(smiles).save(ours)
  export.write_hf_tokenizer(ours, out, seq_len)
  return PreTrainedTokenizerFast.from_pretrained(out)


class Peer:
  """RobertaForMaskedLM + AdamW over pre-collated batches; `step()` -> seconds of one update."""

  def __init__(self, vocab_size: int, seq_len: int, batches: list[dict], seed: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import RobertaConfig, RobertaForMaskedLM  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len + 2, type_vocab_size=1,
                           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0,
                           bos_token_id=2, eos_token_id=3, **SMALL)
    self.model = RobertaForMaskedLM(config).train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                       weight_decay=0.01)
    self.batches, self.wall, self.losses = batches, [], []
    self.attention = self.model.config._attn_implementation  # pylint: disable=protected-access

  def step(self) -> float:
    batch = self.batches[len(self.wall) % len(self.batches)]
    start = time.perf_counter()
    loss = self.model(**batch).loss
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    self.losses.append(loss.item())
    return seconds

  def time(self, num_steps: int) -> None:
    for _ in range(num_steps):
      self.wall.append(self.step())

  def real_tokens_per_step(self) -> float:
    return float(np.mean([int(b["attention_mask"].sum()) for b in self.batches]))

  def slots_per_step(self) -> float:
    return float(np.mean([b["attention_mask"].numel() for b in self.batches]))


def collated(tokenizer, sequences: list[list[int]], per_batch: int, count: int, seed: int) -> list[dict]:
  """`count` batches of `per_batch` sequences through DataCollatorForLanguageModeling (15 %, pad to longest)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import DataCollatorForLanguageModeling  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
  batches = []
  for t in range(count):
    rows = sequences[t * per_batch:(t + 1) * per_batch]
    if len(rows) < per_batch:
      raise ValueError(f"only {len(sequences)} sequences for {count} batches of {per_batch}; raise --max_molecules")
    batches.append(dict(collator([{"input_ids": ids} for ids in rows])))
  return batches


def synthetic_sequences(count: int, seq_len: int, vocab_size: int, seed: int) -> list[list[int]]:
  from exlm_jax.data import vocab  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  tokens = rng.integers(vocab.NUM_SPECIAL, vocab_size, size=(count, seq_len))
  tokens[:, 0], tokens[:, -1] = vocab.BOS, vocab.EOS
  return tokens.tolist()


def synthetic_tokenizer(workdir: str, vocab_size: int, seq_len: int):
  """A word-level tokenizer of `vocab_size` ids with our specials (the collator needs one for [MASK], padding)."""
  import tokenizers as tk  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  from exlm_jax.data import vocab  # pylint: disable=g-import-not-at-top
  words = list(vocab.SPECIAL_TOKENS) + [f"t{i}" for i in range(vocab.NUM_SPECIAL, vocab_size)]
  model = tk.Tokenizer(tk.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=vocab.SPECIAL_TOKENS[1]))
  path = os.path.join(workdir, "synthetic.json")
  model.save(path)
  names = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token", "mask_token"), vocab.SPECIAL_TOKENS))
  return PreTrainedTokenizerFast(tokenizer_file=path, model_max_length=seq_len, **names)


def our_runs(args, workdir: str):
  """bench/step_time.py rows of exlm_jax's MLM: packed real batches and synthetic full blocks."""
  import step_time  # pylint: disable=g-import-not-at-top
  from exlm_jax import config_lib  # pylint: disable=g-import-not-at-top
  from exlm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  common = ["--objective", "mlm", "--size", "small", "--seq_len", str(args.seq_len), "--batch", str(args.batch),
            "--vocab", "8000"]
  real_args = step_time.parse_args(common + ["--data_path", args.data_path, "--data_name", "smiles",
                                             "--packing", "on", "--data_batches", str(args.num_batches),
                                             "--data_max_examples", str(args.max_molecules)])
  synth_args = step_time.parse_args(common)
  mesh = partitioning.create_mesh(config_lib.pretrain_config().mesh)
  data = step_time.real_data(real_args, True, workdir)
  runs = {"real": step_time.Run("mlm", None, "exlm_jax mlm packed", [], real_args, mesh, data),
          "synthetic": step_time.Run("mlm", None, "exlm_jax mlm", [], synth_args, mesh)}
  for run in runs.values():
    for _ in range(args.warmup):
      run.step()
  return runs


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_path", default="$DATA/smiles/moses/test.csv.gz")
  parser.add_argument("--max_molecules", type=int, default=20_000, help="molecules read (vocabulary, batches)")
  parser.add_argument("--molecules", type=int, default=96, help="molecules per peer step on real data")
  parser.add_argument("--batch", type=int, default=32, help="exlm_jax blocks per step; synthetic rows (both)")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=8000, help="synthetic vocabulary")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--num_batches", type=int, default=4, help="distinct batches each row cycles through")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per row and round")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no_ours", action="store_true", help="time the peer alone")
  parser.add_argument("--json", default="")
  return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  with tempfile.TemporaryDirectory() as workdir:
    smiles = read_smiles(args.data_path, args.max_molecules)
    tokenizer = hf_tokenizer(smiles, workdir, args.seq_len)
    molecules = tokenizer(smiles, truncation=True, max_length=args.seq_len)["input_ids"]
    synth_tokenizer = synthetic_tokenizer(workdir, args.vocab, args.seq_len)
    synth = synthetic_sequences(args.batch * args.num_batches, args.seq_len, args.vocab, 0)
    peers = {"real": Peer(len(tokenizer), args.seq_len, collated(tokenizer, molecules, args.molecules,
                                                                  args.num_batches, 0)),
             "synthetic": Peer(args.vocab, args.seq_len, collated(synth_tokenizer, synth, args.batch,
                                                                   args.num_batches, 0))}
    for peer in peers.values():
      for _ in range(args.warmup):
        peer.step()
    ours = {} if args.no_ours else our_runs(args, workdir)
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
      for case in peers:
        peers[case].time(args.steps)
        if case in ours:
          ours[case].time(args.steps)
    load.append(os.getloadavg()[0])
  records = []
  for case, peer in peers.items():
    step_s = statistics.median(peer.wall)
    real = peer.real_tokens_per_step()
    record = {"case": case, "side": "hf_peer", "model": "RobertaForMaskedLM", "attention": peer.attention,
              "threads": args.threads, "step_time_s": step_s, "real_tokens_per_step": real,
              "slot_utilisation": real / peer.slots_per_step(), "real_tokens_per_s": real / step_s,
              "tokens_per_s": peer.slots_per_step() / step_s, "rows_per_step": len(peer.batches[0]["input_ids"]),
              "num_samples": len(peer.wall), "load_average": load, "torch_version": torch.__version__}
    records.append(record)
    if case in ours:
      run = ours[case]
      step_s = statistics.median(run.wall)
      real = statistics.mean(run.real_tokens)
      slots = run.config.batch_size * run.config.seq_len
      records.append({"case": case, "side": "exlm_jax", "model": "mlm", "packing": run.packing,
                      "step_time_s": step_s, "real_tokens_per_step": real, "slot_utilisation": real / slots,
                      "real_tokens_per_s": real / step_s, "tokens_per_s": slots / step_s,
                      "rows_per_step": run.config.batch_size, "num_samples": len(run.wall), "load_average": load,
                      "ratio_to_peer": (real / step_s) / record["real_tokens_per_s"]})
  print_table(records, args, load)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {args.json}")
  return records


def print_table(records: list[dict], args, load) -> None:
  print(f"CPU, {args.threads} threads | small (4 x 256, FFN 1024), fp32, dropout 0.1/0.1, 15 % masking, AdamW | "
        f"seq {args.seq_len} | median of {args.steps * args.rounds} steps, round-robin | "
        f"load avg {load[0]:.1f} -> {load[1]:.1f}")
  title = (f"{'case':<10} {'side':<9} {'rows':>5} {'step ms':>8} {'real tok/step':>13} {'slots %':>7} "
           f"{'real tok/s':>10} {'x peer':>6}")
  print(title, "-" * len(title), sep="\n")
  for r in records:
    ratio = r.get("ratio_to_peer")
    print(f"{r['case']:<10} {r['side']:<9} {r['rows_per_step']:>5} {r['step_time_s'] * 1e3:>8.1f} "
          f"{r['real_tokens_per_step']:>13,.0f} {100 * r['slot_utilisation']:>7.1f} {r['real_tokens_per_s']:>10,.0f} "
          f"{'-' if ratio is None else format(ratio, '.2f'):>6}")


if __name__ == "__main__":
  main()
