"""The papers' analyses (MAE-LM reference §8.2, ExLM reference §8.1-8.5) as importable tools and a CLI.

Import the submodules (nothing is re-exported: `effective_rank` is both a module and a tool):
  effective_rank  rank_eps of token states (streaming Gram, per-sequence mode), [MASK]-subspace diagnostics
  entropy         predictive entropy: MLM masked positions, ExLM state / Viterbi-path / posterior mixture
  repeated_mlm    the Repeated-MLM pilot: repeat x k, Bernoulli(p) mask, ratios, the (p, k) grid (the
                  pretraining objective is exlm_jax/objectives/repeated_mlm.py)
  plots           PNGs: rank vs layer, entropy vs mask ratio, DAG alignment heatmap, Repeated-MLM grid
  tools           the tools on trained workdirs; `python -m exlm_jax.analysis <tool>` runs them
"""
