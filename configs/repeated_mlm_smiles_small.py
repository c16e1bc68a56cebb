"""The Repeated-MLM pilot (docs/design.md §10.4) on MOSES SMILES: repeat every token k times, mask each copy w.p. p.

  python main.py --config configs/repeated_mlm_smiles_small.py:k=4,fixed=corrupted,ratio=0.15 --workdir runs/rmlm_k4
  python main.py --config configs/repeated_mlm_smiles_small.py:size=tiny --config.total_steps=3 --workdir /tmp/rmlm
  python launch/sweep.py --config configs/repeated_mlm_smiles_small.py --sweep_arg sweep=corrupted --workdir runs/rmlm

Arguments: k (copies per token), fixed=corrupted (p = ratio^(1/k): corrupted-semantics ratio p^k held at
`ratio`) or fixed=unreal (p = ratio: unreal-token ratio held, corrupted = p^k), loss=masked|lost (which
masked copies the loss covers, see exlm_jax/objectives/repeated_mlm.py), size, max_examples.
Optimisation and data as mlm_smiles_small.py; seq_len 64 holds every MOSES molecule (<= 51 tokens), so
the model sees 2 + 62 k slots. The train metrics `unreal_ratio` and `corrupted_ratio` are measured.
One molecule per block (`data.packing=false`): the pilot repeats whole blocks and does not take packed batches.
"""

import ml_collections

from exlm_jax import config_lib

FIXED = ("corrupted", "unreal")


def mask_prob(fixed: str, ratio: float, k: int) -> float:
  """p holding the `fixed` ratio at `ratio`: corrupted p^k = ratio -> p = ratio^(1/k); unreal p = ratio.
  (exlm_jax/analysis/repeated_mlm.py `solve_p` / `pk_grid` tabulate the same relation.)"""
  if fixed not in FIXED:
    raise ValueError(f"fixed={fixed!r}; choose corrupted or unreal")
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"ratio={ratio} must be in (0, 1)")
  if k < 1:
    raise ValueError(f"k={k} must be >= 1")
  return ratio ** (1.0 / k) if fixed == "corrupted" else ratio


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", k=2, fixed="corrupted", ratio=0.15, loss="masked",
                             max_examples=200_000)
  config = config_lib.pretrain_config("repeated_mlm", arg.size)
  config.repeated_mlm = ml_collections.ConfigDict(dict(num_copies=arg.k, loss=arg.loss))
  config.mask_prob = mask_prob(arg.fixed, arg.ratio, arg.k)
  config.data = config_lib.data_config(
      "smiles", "$DATA/smiles/moses/train.csv.gz", column="SMILES", max_examples=arg.max_examples,
      eval_path="$DATA/smiles/moses/test.csv.gz", packing=False)
  config.seq_len = 64
  config.batch_size = 64
  config.total_steps = 5000
  config.warmup_steps = 300
  config.learning_rate = 5e-4
  config.eval_every = 500
  config.checkpoint_every = 1000
  if arg.size == "tiny":
    config.batch_size, config.data.max_examples = 8, 2000
    config.total_steps, config.warmup_steps, config.log_every, config.eval_every = 20, 2, 5, 10
    config.eval_batches = 2
  return config


def get_sweep(arg=None):
  """The two arms of the pilot over k in {1, 2, 4}: `corrupted` holds p^k = ratio, `unreal` holds p = ratio."""
  arg = config_lib.parse_arg(arg, sweep="corrupted", ratio=0.15)
  if arg.sweep not in FIXED:
    raise ValueError(f"unknown sweep {arg.sweep!r}; choose corrupted or unreal")
  return [{"mask_prob": mask_prob(arg.sweep, arg.ratio, k), "repeated_mlm.num_copies": k} for k in (1, 2, 4)]
