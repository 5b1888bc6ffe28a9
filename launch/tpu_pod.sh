#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: every worker runs the same command; jax.distributed discovers the pod itself.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh --config=configs/mar_l.py --workdir=gs://bucket/runs/mar_l
#
# Optional: PROJECT, REPO_URL (default: this repo's origin), BRANCH (main), SETUP=0 to skip installing.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
BRANCH=${BRANCH:-main}
ARGS=$(printf '%q ' "$@")

SETUP_CMD="true"
if [ "${SETUP:-1}" = "1" ]; then
  SETUP_CMD="if [ ! -d ~/jaxgen ]; then git clone -b $BRANCH $REPO_URL ~/jaxgen; fi && cd ~/jaxgen && git pull -q && \
python3 -m venv ~/jaxgen-venv && ~/jaxgen-venv/bin/pip install -q -U pip && \
~/jaxgen-venv/bin/pip install -q -e . 'jax[tpu]'"
fi

RUN_CMD="cd ~/jaxgen && JAXGEN_DISTRIBUTED=auto ~/jaxgen-venv/bin/python -m jaxgen.main $ARGS"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="set -e; $SETUP_CMD; $RUN_CMD"
