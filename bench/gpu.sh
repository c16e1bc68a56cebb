#!/usr/bin/env bash
# GPU throughput / MFU table (issue 7): `base`, bf16, seq 128 and 512; MLM, MAE-LM, ExLM(k=4).
#
#   bash bench/gpu.sh [OUT_DIR]                  # default OUT_DIR=bench_results/<host>-<date>
#   WHEELS=/path/to/wheels bash bench/gpu.sh     # offline box: pip installs from local wheels only
#   SIZE=small SEQS=128 STEPS=3 bash bench/gpu.sh   # quick smoke run
#   PROFILE=1 bash bench/gpu.sh                  # also a jax.profiler trace of 3 steps per row
#
# 1. Installs jax[cuda12] (same jax version as installed, if any) when jax has no GPU backend, and the
#    packages the benchmark imports (flax, optax, ml_collections) when missing.
# 2. Runs bench/step_time.py from the repository root with PYTHONPATH set (no install of the project).
# 3. Per sequence length three tables: as configured (attention dropout 0.1, which takes the unfused
#    attention path), with model.attention_dropout_rate=0 (jax.nn.dot_product_attention, XLA), and
#    the same with model.attention_impl=cudnn (the fused cuDNN kernel); JSON per table, a log in OUT_DIR.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZE=${SIZE:-base}
SEQS=${SEQS:-"128 512"}
STEPS=${STEPS:-10}
ROUNDS=${ROUNDS:-2}
OUT=${1:-bench_results/$(hostname)-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

pip_install() {
  if [[ -n "${WHEELS:-}" ]]; then "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"
  else "$PY" -m pip install -q "$@"; fi
}

if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" >/dev/null 2>&1; then
  VERSION=$("$PY" -c "import jax; print('==' + jax.__version__)" 2>/dev/null || true)
  echo "jax has no GPU backend here; installing jax[cuda12]$VERSION" >&2
  pip_install "jax[cuda12]$VERSION" || { echo "could not install jax[cuda12]; set WHEELS=DIR" >&2; exit 1; }
fi
for module in flax optax ml_collections; do
  "$PY" -c "import $module" >/dev/null 2>&1 || pip_install "$module"
done
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$OUT/log.txt" || true

for SEQ in $SEQS; do
  BATCH=$((32768 / SEQ))  # ~32k tokens per step: 256 x 128, 64 x 512
  for VARIANT in default no_attn_dropout cudnn; do
    EXTRA=()
    [[ "$VARIANT" != default ]] && EXTRA+=(--set model.attention_dropout_rate=0)
    [[ "$VARIANT" == cudnn ]] && EXTRA+=(--set model.attention_impl=cudnn)
    [[ "${PROFILE:-0}" == 1 ]] && EXTRA+=(--profile "$OUT/profile_seq${SEQ}_$VARIANT")
    echo "== $SIZE seq $SEQ batch $BATCH bf16 ($VARIANT) ==" | tee -a "$OUT/log.txt"
    "$PY" bench/step_time.py --objective mlm --objective maelm --objective exlm --k 4 \
      --size "$SIZE" --seq_len "$SEQ" --batch "$BATCH" --dtype bfloat16 --steps "$STEPS" --rounds "$ROUNDS" \
      "${EXTRA[@]}" --json "$OUT/step_${SIZE}_seq${SEQ}_${VARIANT}.json" 2>&1 | tee -a "$OUT/log.txt"
  done
done
echo "results in $OUT" >&2
