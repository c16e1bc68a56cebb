"""exlm_jax: pretraining masked-language encoders in JAX/Flax (MLM, MAE-LM, ExLM)."""

__version__ = "0.1.0"
