"""exlm_jax: pretraining masked-language encoders in JAX/Flax (MLM, MAE-LM, ExLM).

`exlm_jax.load(path)` restores a run for inference (exlm_jax/api.py); it is imported on first use so
that `import exlm_jax` stays cheap (no JAX import).
"""

__version__ = "0.1.0"

__all__ = ["load"]


def __getattr__(name):
  if name == "load":
    from exlm_jax.api import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 'exlm_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), "load"])
