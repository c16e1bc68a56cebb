"""Heads shared by the objectives: the tied LM (emission) head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from exlm_jax.models.encoder import ModelConfig, _dense, _layernorm, attend


class LMHead(nn.Module):
  """Dense(D->D) -> GELU -> LayerNorm -> tied E^T + free bias (both papers' LM head).

  h: (..., D) hidden states at the positions to predict only (never the full sequence);
  embedding: (V, D) tied token-embedding matrix. Returns float32 logits (..., V).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: jax.Array, embedding: jax.Array) -> jax.Array:
    h = _dense(self.cfg.d_model, ("embed", "mlp"), self.cfg, "dense")(h)
    h = nn.gelu(h, approximate=False)
    h = _layernorm(self.cfg, "ln")(h)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                      (self.cfg.vocab_size,), jnp.float32)
    return attend(h, embedding) + bias
