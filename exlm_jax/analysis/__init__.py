"""Model-independent analysis tools; the CLI that runs them on trained workdirs builds on these.

Import the submodules (nothing is re-exported: `effective_rank` is both a module and its main function):
  effective_rank  rank_eps of token states (streaming Gram, per-sequence mode), [MASK]-subspace diagnostics
  entropy         predictive entropy: MLM masked positions, ExLM state / Viterbi-path / posterior mixture
  repeated_mlm    the Repeated-MLM pilot: repeat x k, Bernoulli(p) mask, ratios and the (p, k) grid
  plots           PNGs: rank vs layer, entropy vs mask ratio, DAG alignment heatmap
"""
