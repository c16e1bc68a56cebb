"""The papers' analyses as importable tools and a CLI (`python -m exlm_jax.analysis <tool>`).

Each tool module holds its maths and its driver `analyse(...)`, which runs on a pretraining workdir and
writes `<tool>.json` + PNGs; what a tool measures on a given objective is that objective's business
(`Objective.rank_groups`, `masked_log_probs`, `dag`). Import the submodules (nothing is re-exported):
  inputs          the restored run (`load_run`), the analysis data as the pipeline's blocks, the mask rule
  effective_rank  rank_eps of token states (streaming Gram, per-sequence mode), [MASK]-subspace diagnostics
  entropy         predictive entropy at masked positions: the prediction rule's, or DAG state / Viterbi-path /
                  posterior mixture
  repeated_mlm    the Repeated-MLM pilot: repeat x k, Bernoulli(p) mask, ratios, the (p, k) grid (the
                  pretraining objective is exlm_jax/objectives/repeated_mlm.py)
  dag_view        Viterbi alignment + transition matrix of one input (DAG objectives)
  report          effective_rank + entropy per workdir and one Markdown comparison
  plots           PNGs: rank vs layer, entropy vs mask ratio, DAG alignment heatmap, Repeated-MLM grid
"""
