#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM (one host or a pod slice): every worker runs the same main.py command.
#
#   export TPU_NAME=exlm-v5p ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 RUNTIME_VERSION=v2-alpha-tpuv5
#   export GCS_BUCKET=my-bucket          # mounted with gcsfuse at /mnt/gcs on every worker (shared workdir)
#   launch/tpu_vm.sh create              # create the TPU VM, or reuse it when it exists
#   launch/tpu_vm.sh setup               # copy this checkout to every worker, venv + pip install -e .[tpu]
#   launch/tpu_vm.sh run --config configs/mlm_smiles_small.py --workdir /mnt/gcs/runs/mlm
#   launch/tpu_vm.sh ssh 'tail -n 20 ~/exlm_jax/run.log'     # any command on every worker
#   launch/tpu_vm.sh delete
#
# `run` re-copies the code (so local edits are picked up) and starts main.py on ALL workers at once
# (`--worker=all`; a pod slice hangs if only some run it). jax.distributed configures itself from the
# TPU metadata. DETACH=1 runs it under nohup (log: ~/exlm_jax/run.log on each worker) so the job
# survives a dropped ssh session. The workdir must be the same shared path on every worker.
# Optional: PROJECT, SPOT=1 (spot VM; SIGTERM on preemption -> checkpoint + clean exit), DATA_DIR
# (exported as EXLM_DATA_DIR on the workers), EXTRA_ENV ("K=V K2=V2" prepended to the command).

set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-exlm_jax}
REPO=$(cd "$(dirname "$0")/.." && pwd)
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && COMMON+=(--project="$PROJECT")

remote() {  # remote 'command' -> run on every worker
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="$1"
}

exists() {
  "${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" --format='value(state)' >/dev/null 2>&1
}

create() {
  if exists; then
    echo "tpu_vm: reusing $TPU_NAME ($("${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" --format='value(state)'))"
    return
  fi
  local extra=()
  [[ "${SPOT:-0}" == "1" ]] && extra+=(--spot)
  "${GCLOUD[@]}" create "$TPU_NAME" "${COMMON[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${extra[@]}"
}

copy_code() {
  local tarball
  tarball=$(mktemp /tmp/exlm_jax.XXXXXX.tar.gz)
  (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -czf "$tarball" -T -)
  "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:/tmp/exlm_jax.tar.gz" "${COMMON[@]}" --worker=all
  rm -f "$tarball"
  remote "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/exlm_jax.tar.gz -C ~/$REMOTE_DIR"
}

setup() {
  copy_code
  remote "cd ~/$REMOTE_DIR && (test -d .venv || python3 -m venv .venv) && .venv/bin/pip install -q -U pip \
    && .venv/bin/pip install -q -e '.[tpu]'"
  if [[ -n "${GCS_BUCKET:-}" ]]; then
    remote "command -v gcsfuse >/dev/null || { echo 'install gcsfuse on the workers first'; exit 1; }; \
      sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && (mountpoint -q /mnt/gcs || \
      gcsfuse --implicit-dirs $GCS_BUCKET /mnt/gcs)"
  fi
}

run() {
  copy_code
  local env="${EXTRA_ENV:-}"
  [[ -n "${DATA_DIR:-}" ]] && env="EXLM_DATA_DIR=$DATA_DIR $env"
  local cmd="cd ~/$REMOTE_DIR && $env .venv/bin/python main.py $(printf '%q ' "$@")"
  if [[ "${DETACH:-0}" == "1" ]]; then
    remote "nohup bash -c $(printf '%q' "$cmd") > ~/$REMOTE_DIR/run.log 2>&1 < /dev/null &"
    echo "tpu_vm: started on all workers; follow with: $0 ssh 'tail -f ~/$REMOTE_DIR/run.log'"
  else
    remote "$cmd"
  fi
}

case "${1:-}" in
  create) create ;;
  setup) setup ;;
  copy) copy_code ;;
  run) shift; run "$@" ;;
  ssh) shift; remote "$*" ;;
  delete) "${GCLOUD[@]}" delete "$TPU_NAME" "${COMMON[@]}" --quiet ;;
  *) echo "usage: $0 create|setup|copy|run <main.py flags>|ssh '<command>'|delete" >&2; exit 2 ;;
esac
