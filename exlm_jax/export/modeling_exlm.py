"""PyTorch port of the exlm_jax Transformer encoder, shipped inside every exported folder for `trust_remote_code`.

Load an exported folder with
    AutoModel.from_pretrained(DIR, trust_remote_code=True)               # last_hidden_state (B, L, D)
    AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)    # MLM runs: logits (B, L, V)
    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)  # fine-tuned runs

It computes exactly what exlm_jax's Encoder computes (float32 parity 1e-4 is tested in exlm_jax):
  * token embedding (+ learned absolute position row, `position_scheme` 'absolute' or 'absolute+relbias',
    positions clipped to the table) -> optional embedding LayerNorm -> dropout -> zero at padding;
  * `num_hidden_layers` blocks, pre-LN  x + Drop(Attn(LN(x))), x + Drop(FFN(LN(x)))  (+ a final LayerNorm),
    or post-LN  LN(x + Drop(Attn(x))), LN(h + Drop(FFN(h)));  FFN = Linear -> GELU (erf) -> Linear;
  * attention with biases on q/k/v/o, scale 1/sqrt(Dh), padded keys masked, plus
      - 'absolute+relbias': a learned per-head bias indexed by the bucket of the key-minus-query distance
        of the original positions (MAE-LM / COCO-LM's signed log buckets), or
      - 'rope2d': 2-D rotary embedding per head: dims [0, Dh/2) rotated by the position, [Dh/2, Dh) by the
        copy index (0 for ordinary tokens, i.e. unrotated), each half with the rotate-half pairing
        (j, j + Dh/4) and frequencies theta^(-2j / (Dh/2)).
Positions default to 0..L-1 for every row (right padding); `position_ids` and `copy_index` may be given.
Only torch and transformers are imported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput


class ExlmConfig(PreTrainedConfig):
  model_type = "exlm_jax"

  vocab_size: int = 0
  hidden_size: int = 256
  num_hidden_layers: int = 4
  num_attention_heads: int = 4
  intermediate_size: int = 1024
  pre_layer_norm: bool = True
  embedding_layer_norm: bool = False
  position_scheme: str = "rope2d"  # 'rope2d' | 'absolute+relbias' | 'absolute'
  max_positions: int = 512  # rows of the learned absolute table
  relative_position_bins: int = 64
  max_relative_distance: int = 128
  rope2d_theta: float = 10000.0
  layer_norm_eps: float = 1e-5
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  initializer_range: float = 0.02
  pad_token_id: int | None = 0
  bos_token_id: int | None = 2
  eos_token_id: int | None = 3


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------


def rope2d_tables(position_ids: torch.Tensor, copy_index: torch.Tensor, head_dim: int, theta: float):
  """cos, sin (B, 1, L, Dh) float32: first half of each head rotated by position, second half by copy index."""
  half = head_dim // 2
  freqs = theta ** (-torch.arange(0, half // 2, dtype=torch.float32, device=position_ids.device) * 2.0 / half)
  ang_pos = position_ids.to(torch.float32)[..., None] * freqs
  ang_copy = copy_index.to(torch.float32)[..., None] * freqs
  angles = torch.cat([ang_pos, ang_pos, ang_copy, ang_copy], dim=-1)[:, None]
  return torch.cos(angles), torch.sin(angles)


def apply_rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """x (B, N, L, Dh): within each half, the pair (j, j + Dh/4) is rotated by the table's angle."""
  *lead, dh = x.shape
  quarters = x.reshape(*lead, 2, 2, dh // 4)  # [half, part, j]
  rotated = torch.stack([-quarters[..., 1, :], quarters[..., 0, :]], dim=-2).reshape(x.shape)
  return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def relative_bucket_table(max_positions: int, num_bins: int, max_distance: int) -> torch.Tensor:
  """(2P - 1,) bucket id of every signed distance r = key - query in [-(P-1), P-1] (index with r + P - 1).

  Signed symmetric buckets: exact below num_bins / 4, log-spaced (ceil) up to max_distance, ids in
  [0, num_bins - 2]. Computed in float64 like the JAX original.
  """
  nb = num_bins // 2
  exact = nb // 2
  log_slots = nb - 1 - exact
  r = torch.arange(-(max_positions - 1), max_positions, dtype=torch.int64)
  n = r.abs()
  log_part = exact + torch.ceil(torch.log(n.clamp(min=1).to(torch.float64) / exact)
                                / math.log((max_distance - 1) / exact) * log_slots)
  magnitude = torch.where(n < exact, n.to(torch.float64), log_part.clamp(max=nb - 1)).to(torch.int64)
  return r.sign() * magnitude + (nb - 1)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class ExlmAttention(nn.Module):
  def __init__(self, config: ExlmConfig):
    super().__init__()
    self.num_heads = config.num_attention_heads
    self.head_dim = config.hidden_size // config.num_attention_heads
    self.query = nn.Linear(config.hidden_size, config.hidden_size)
    self.key = nn.Linear(config.hidden_size, config.hidden_size)
    self.value = nn.Linear(config.hidden_size, config.hidden_size)
    self.out = nn.Linear(config.hidden_size, config.hidden_size)
    self.dropout = config.attention_probs_dropout_prob

  def forward(self, x, attn_bias, rope):
    batch, length, _ = x.shape
    split = lambda t: t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, L, Dh)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    if rope is not None:
      q, k = apply_rope2d(q, *rope), apply_rope2d(k, *rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype),
                                         dropout_p=self.dropout if self.training else 0.0)
    return self.out(out.transpose(1, 2).reshape(batch, length, -1))


class ExlmMlp(nn.Module):
  def __init__(self, config: ExlmConfig):
    super().__init__()
    self.wi = nn.Linear(config.hidden_size, config.intermediate_size)
    self.wo = nn.Linear(config.intermediate_size, config.hidden_size)

  def forward(self, x):
    return self.wo(F.gelu(self.wi(x)))


class ExlmLayer(nn.Module):
  def __init__(self, config: ExlmConfig):
    super().__init__()
    self.pre_ln = config.pre_layer_norm
    self.attention = ExlmAttention(config)
    self.ln_attention = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.mlp = ExlmMlp(config)
    self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.dropout = nn.Dropout(config.hidden_dropout_prob)

  def forward(self, x, attn_bias, rope):
    if self.pre_ln:
      x = x + self.dropout(self.attention(self.ln_attention(x), attn_bias, rope))
      return x + self.dropout(self.mlp(self.ln_mlp(x)))
    x = self.ln_attention(x + self.dropout(self.attention(x, attn_bias, rope)))
    return self.ln_mlp(x + self.dropout(self.mlp(x)))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class ExlmPreTrainedModel(PreTrainedModel):
  config_class = ExlmConfig
  config: ExlmConfig
  base_model_prefix = "exlm_jax"
  _supports_sdpa = True

  def _init_weights(self, module):
    super()._init_weights(module)
    if isinstance(module, ExlmModel) and module.rel_bias is not None:
      nn.init.normal_(module.rel_bias, std=self.config.initializer_range)
    if isinstance(module, ExlmLMHead):
      nn.init.zeros_(module.bias)


class ExlmModel(ExlmPreTrainedModel):
  """The encoder. forward(input_ids (B, L), attention_mask (B, L) 1 = token / 0 = padding; default
  input_ids != pad_token_id) -> BaseModelOutput(last_hidden_state (B, L, D), hidden_states if asked)."""

  def __init__(self, config: ExlmConfig):
    super().__init__(config)
    scheme = config.position_scheme
    if scheme not in ("rope2d", "absolute+relbias", "absolute"):
      raise ValueError(f"position_scheme={scheme!r}; expected 'rope2d', 'absolute+relbias' or 'absolute'")
    self.token_embed = nn.Embedding(config.vocab_size, config.hidden_size)
    self.pos_embed = nn.Embedding(config.max_positions, config.hidden_size) if scheme != "rope2d" else None
    self.rel_bias = None
    if scheme == "absolute+relbias":
      self.rel_bias = nn.Parameter(torch.zeros(config.relative_position_bins, config.num_attention_heads))
    self.embed_ln = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                     if config.embedding_layer_norm else None)
    self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
    self.layers = nn.ModuleList([ExlmLayer(config) for _ in range(config.num_hidden_layers)])
    self.final_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layer_norm else None
    self.post_init()

  def get_input_embeddings(self):
    return self.token_embed

  def set_input_embeddings(self, value):
    self.token_embed = value

  def forward(self, input_ids, attention_mask=None, position_ids=None, copy_index=None, token_type_ids=None,
              output_hidden_states=None, return_dict=None, **kwargs):
    config = self.config
    if token_type_ids is not None and bool((token_type_ids != 0).any()):
      raise ValueError("this encoder has no segment embedding; pass token_type_ids=None (or all zeros)")
    batch, length = input_ids.shape
    if attention_mask is None:
      attention_mask = input_ids.ne(config.pad_token_id)
    is_token = attention_mask.bool()
    if position_ids is None:
      position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    x = self.token_embed(input_ids)
    if self.pos_embed is not None:
      x = x + self.pos_embed(position_ids.clamp(0, config.max_positions - 1))
    if self.embed_ln is not None:
      x = self.embed_ln(x)
    x = self.embed_dropout(x) * is_token[..., None].to(x.dtype)

    attn_bias = torch.zeros((batch, 1, 1, length), dtype=torch.float32, device=x.device)
    attn_bias = attn_bias.masked_fill(~is_token[:, None, None, :], torch.finfo(torch.float32).min)
    if self.rel_bias is not None:
      distance = position_ids[:, None, :] - position_ids[:, :, None] + config.max_positions - 1
      table = relative_bucket_table(config.max_positions, config.relative_position_bins,
                                    config.max_relative_distance).to(x.device)
      buckets = table[distance.clamp(0, 2 * config.max_positions - 2)]  # (B, L, L)
      attn_bias = attn_bias + self.rel_bias[buckets].permute(0, 3, 1, 2).float()  # (B, N, L, L)
    rope = None
    if config.position_scheme == "rope2d":
      copy_index = torch.zeros_like(position_ids) if copy_index is None else copy_index
      rope = rope2d_tables(position_ids, copy_index, config.hidden_size // config.num_attention_heads,
                           config.rope2d_theta)

    hidden = [x]
    for layer in self.layers:
      x = layer(x, attn_bias, rope)
      hidden.append(x)
    if self.final_ln is not None:
      x = self.final_ln(x)
      hidden[-1] = x
    return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if output_hidden_states else None)


class ExlmLMHead(nn.Module):
  """Dense -> GELU -> LayerNorm -> tied token embedding^T + bias."""

  def __init__(self, config: ExlmConfig):
    super().__init__()
    self.dense = nn.Linear(config.hidden_size, config.hidden_size)
    self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.bias = nn.Parameter(torch.zeros(config.vocab_size))

  def forward(self, hidden, embedding):
    return self.layer_norm(F.gelu(self.dense(hidden))) @ embedding.T + self.bias


class ExlmForMaskedLM(ExlmPreTrainedModel):
  def __init__(self, config: ExlmConfig):
    super().__init__(config)
    self.exlm_jax = ExlmModel(config)
    self.lm_head = ExlmLMHead(config)
    self.post_init()

  def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
    out = self.exlm_jax(input_ids, attention_mask=attention_mask, **kwargs)
    logits = self.lm_head(out.last_hidden_state, self.exlm_jax.token_embed.weight)
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
    return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class ExlmClassificationHead(nn.Module):
  """`<s>` state -> dropout -> dense -> tanh -> dropout -> out_proj (RoBERTa's classification head)."""

  def __init__(self, config: ExlmConfig):
    super().__init__()
    rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    self.dropout = nn.Dropout(rate)
    self.dense = nn.Linear(config.hidden_size, config.hidden_size)
    self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

  def forward(self, hidden):
    return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(hidden[:, 0])))))


class ExlmForSequenceClassification(ExlmPreTrainedModel):
  """problem_type 'single_label_classification' (softmax), 'multi_label_classification' (independent
  sigmoids) or 'regression' (see `target_mean` / `target_std` in config.json for the units)."""

  def __init__(self, config: ExlmConfig):
    super().__init__(config)
    self.exlm_jax = ExlmModel(config)
    self.classifier = ExlmClassificationHead(config)
    self.post_init()

  def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
    out = self.exlm_jax(input_ids, attention_mask=attention_mask, **kwargs)
    logits = self.classifier(out.last_hidden_state)
    loss = None
    if labels is not None:
      if self.config.problem_type == "regression":
        loss = F.mse_loss(logits, labels.view(logits.shape).to(logits.dtype))
      elif self.config.problem_type == "multi_label_classification":
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
      else:
        loss = F.cross_entropy(logits, labels.view(-1))
    return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
