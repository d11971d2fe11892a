#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice: one sftjax process per host, started together.
#
# Each host runs `python -m sftjax.main --multihost ...`; jax.distributed.initialize() finds the
# other hosts from the TPU VM metadata. Every worker needs the sftjax checkout at REPO_DIR; the
# model, tokenizer, data and WORKDIR are best gs:// URLs, which every host sees alike (a shared
# mount path works too). See launch/README.md.
#
#   TPU_NAME=my-v5p-64 launch/tpu_pod.sh setup       # once: venv with the locked versions
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/70b \
#   HF_PATH=gs://my-bucket/models/Llama-2-70b-hf TRAIN_FILES='gs://my-bucket/data/train*.jsonl' \
#   launch/tpu_pod.sh --config.optim.lr=5e-6
#
# Arguments after the script name go to sftjax.main unchanged. DRY_RUN=1 prints the command.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name (gcloud compute tpus tpu-vm list)}"
ZONE="${ZONE:-us-east5-a}"                      # the TPU's zone
PROJECT="${PROJECT:-}"                          # empty: gcloud's configured project
REPO_DIR="${REPO_DIR:-sftjax}"                  # checkout on each worker, relative to ~
PYTHON="${PYTHON:-.venv/bin/python}"            # interpreter, relative to REPO_DIR
DRY_RUN="${DRY_RUN:-0}"                         # 1: print the gcloud command, run nothing

on_all_workers() {  # run one shell string on every worker of the slice
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all "--command=$1")
  if [[ -n "$PROJECT" ]]; then
    cmd+=("--project=$PROJECT")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    exec "${cmd[@]}"
  fi
}

if [[ "${1:-}" == setup ]]; then
  # The exact versions CI tested (requirements/lock.txt) plus jax's own TPU extra at the locked
  # jax version, which pins the libtpu built for it.
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  jax_version="$(sed -n 's/^jax==//p' "$root/requirements/lock.txt")"
  on_all_workers "cd $(printf %q "$REPO_DIR") && python3 -m venv .venv && \
.venv/bin/pip install -q -c requirements/lock.txt -e . 'jax[tpu]==$jax_version'"
  exit 0
fi

: "${WORKDIR:?set WORKDIR to gs://bucket/run (or a directory every host shares)}"
: "${HF_PATH:?set HF_PATH to the Hugging Face model directory (same path on every host)}"
: "${TRAIN_FILES:?set TRAIN_FILES to the training JSONL (same path on every host)}"
CONFIG="${CONFIG:-configs/llama2_70b.py}"       # relative to REPO_DIR
TOKENIZER="${TOKENIZER:-$HF_PATH}"              # Llama-2 HF directories hold the tokenizer
VALIDATION_FILES="${VALIDATION_FILES:-}"        # empty: a held-out split of TRAIN_FILES
args=(-m sftjax.main --multihost "--config=$CONFIG" "--workdir=$WORKDIR"
  "--config.model.hf_path=$HF_PATH" "--config.data.tokenizer=$TOKENIZER"
  "--config.data.train_files=$TRAIN_FILES")
if [[ -n "$VALIDATION_FILES" ]]; then
  args+=("--config.data.validation_files=$VALIDATION_FILES")
fi
args+=("$@")

# One string for the remote shell, every piece quoted so paths with spaces survive ssh.
on_all_workers "cd $(printf %q "$REPO_DIR") && $(printf %q "$PYTHON")$(printf ' %q' "${args[@]}")"
