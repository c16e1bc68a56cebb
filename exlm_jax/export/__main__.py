"""`python -m exlm_jax.export --workdir RUN --out DIR [--seed S] [--overwrite]`: see exlm_jax/export/__init__.py."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m exlm_jax.export",
                                   description="Export an exlm_jax run as a Hugging Face / PyTorch folder.")
  parser.add_argument("--workdir", required=True, help="a run written by main.py (or any path exlm_jax.load takes)")
  parser.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer, card)")
  parser.add_argument("--seed", type=int, default=None, help="fine-tuning runs: the seed to export (default: best)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
  args = parser.parse_args(argv)
  from exlm_jax import export  # pylint: disable=g-import-not-at-top
  try:
    result = export.to_hf(args.workdir, args.out, seed=args.seed, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  remote = ", trust_remote_code=True" if result.trust_remote_code else ""
  print(f"wrote {result.out_dir}: {result.architecture} ({result.num_tensors} tensors); load with "
        f"{result.auto_class}.from_pretrained('{result.out_dir}'{remote})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
