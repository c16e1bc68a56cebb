"""The Repeated-MLM pilot (ExLM reference §8.1) on MOSES SMILES: repeat every token k times, mask each copy w.p. p.

  python main.py --config configs/repeated_mlm_smiles_small.py:k=4,fixed=corrupted,ratio=0.15 --workdir runs/rmlm_k4
  python main.py --config configs/repeated_mlm_smiles_small.py:size=tiny --config.total_steps=3 --workdir /tmp/rmlm
  python launch/sweep.py --config configs/repeated_mlm_smiles_small.py --sweep_arg sweep=corrupted --workdir runs/rmlm

Arguments: k (copies per token), fixed=corrupted (p = ratio^(1/k): corrupted-semantics ratio p^k held at
`ratio`) or fixed=unreal (p = ratio: unreal-token ratio held, corrupted = p^k), loss=masked|lost (which
masked copies the loss covers, see exlm_jax/objectives/repeated_mlm.py), size, max_examples.
Optimisation and data as mlm_smiles_small.py; seq_len 64 holds every MOSES molecule (<= 51 tokens), so
the model sees 2 + 62 k slots. The train metrics `unreal_ratio` and `corrupted_ratio` are measured.
"""

from exlm_jax import config_lib
from exlm_jax.analysis import repeated_mlm as pilot  # solve_p, pk_grid
from exlm_jax.objectives import repeated_mlm


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", k=2, fixed="corrupted", ratio=0.15, loss="masked",
                             max_examples=200_000)
  if arg.fixed not in ("corrupted", "unreal"):
    raise ValueError(f"fixed={arg.fixed!r}; choose corrupted or unreal")
  config = config_lib.pretrain_config("repeated_mlm", arg.size)
  config.repeated_mlm = repeated_mlm.default_config(num_copies=arg.k, loss=arg.loss)
  config.mask_prob = pilot.solve_p(arg.ratio, arg.k) if arg.fixed == "corrupted" else arg.ratio
  config.data = config_lib.data_config(
      "smiles", "$DATA/smiles/moses/train.csv.gz", column="SMILES", max_examples=arg.max_examples,
      eval_path="$DATA/smiles/moses/test.csv.gz")
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
  if arg.sweep not in ("corrupted", "unreal"):
    raise ValueError(f"unknown sweep {arg.sweep!r}; choose corrupted or unreal")
  grid = pilot.pk_grid(ks=(1, 2, 4), **{arg.sweep: arg.ratio})
  return [{"mask_prob": point.p, "repeated_mlm.num_copies": point.k} for point in grid]
