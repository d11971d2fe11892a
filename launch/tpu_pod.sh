#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice: one sftjax process per host, started together.
#
# Each host runs `python -m sftjax.main --multihost ...`; jax.distributed.initialize() finds the
# other hosts from the TPU VM metadata. Every worker needs the sftjax checkout and its venv at
# REPO_DIR, and the model, tokenizer and data at the same paths. WORKDIR must be ONE directory
# all hosts share (a gcsfuse or Filestore mount): sftjax writes checkpoints and metrics through
# local file paths, so gs:// URLs are refused here. See launch/README.md.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a WORKDIR=/mnt/gcs/runs/70b \
#   HF_PATH=/mnt/models/Llama-2-70b-hf TRAIN_FILES=/mnt/data/train.jsonl \
#   launch/tpu_pod.sh --config.optim.lr=5e-6
#
# Arguments after the script name go to sftjax.main unchanged. DRY_RUN=1 prints the command.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name (gcloud compute tpus tpu-vm list)}"
: "${WORKDIR:?set WORKDIR to a directory every host shares, e.g. a gcsfuse mount}"
: "${HF_PATH:?set HF_PATH to the Hugging Face model directory (same path on every host)}"
: "${TRAIN_FILES:?set TRAIN_FILES to the training JSONL (same path on every host)}"
ZONE="${ZONE:-us-east5-a}"                      # the TPU's zone
PROJECT="${PROJECT:-}"                          # empty: gcloud's configured project
CONFIG="${CONFIG:-configs/llama2_70b.py}"       # relative to REPO_DIR
TOKENIZER="${TOKENIZER:-$HF_PATH}"              # Llama-2 HF directories hold the tokenizer
VALIDATION_FILES="${VALIDATION_FILES:-}"        # empty: a held-out split of TRAIN_FILES
REPO_DIR="${REPO_DIR:-sftjax}"                  # checkout on each worker, relative to ~
PYTHON="${PYTHON:-.venv/bin/python}"            # interpreter, relative to REPO_DIR
DRY_RUN="${DRY_RUN:-0}"                         # 1: print the gcloud command, run nothing

if [[ "$WORKDIR" == gs://* ]]; then
  echo "error: WORKDIR=$WORKDIR: gs:// is not supported; mount the bucket (gcsfuse) on every" \
    "host and give the mount path" >&2
  exit 2
fi

args=(-m sftjax.main --multihost "--config=$CONFIG" "--workdir=$WORKDIR"
  "--config.model.hf_path=$HF_PATH" "--config.data.tokenizer=$TOKENIZER"
  "--config.data.train_files=$TRAIN_FILES")
if [[ -n "$VALIDATION_FILES" ]]; then
  args+=("--config.data.validation_files=$VALIDATION_FILES")
fi
args+=("$@")

# One string for the remote shell, every piece quoted so paths with spaces survive ssh.
remote="cd $(printf %q "$REPO_DIR") && $(printf %q "$PYTHON")$(printf ' %q' "${args[@]}")"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all "--command=$remote")
if [[ -n "$PROJECT" ]]; then
  cmd+=("--project=$PROJECT")
fi

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
