#!/usr/bin/env bash
# Submits one spectrum per checkpoint as a Kubernetes Indexed Job
# (renders checkpoints-job.yaml.template).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/common.sh
source "$HERE/../lib/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gke/submit_checkpoints.sh --list FILE --image IMAGE --output-root DIR
           [options] [--] [hessian-spectrum flags...]

Reads FILE (one model path per line; blank lines and '#' lines skipped) into a
ConfigMap and renders launch/gke/checkpoints-job.yaml.template into an Indexed
Job (completionMode: Indexed) with one completion per checkpoint: pod i runs
`hessian-spectrum --model=LINE_i --output_dir=DIR/<basename of LINE_i> FLAGS...`.
Both are piped to `kubectl apply -f -`. DIR must outlive the pods: a bucket path
(gs://...), or a path under --mount-path with --pvc. Needs python3 to render.

Options (environment variable in brackets):
  --list FILE             the checkpoints, one path per line (required)
  --image IMAGE           a container image with hessian_tf installed [HESSIAN_IMAGE]
  --output-root DIR       results go to DIR/<basename>/ [OUTPUT_ROOT]
  --gpus G                nvidia.com/gpu per pod, G >= 0 (default 1)
  --parallelism P         pods at once, P >= 1 (default: all checkpoints)
  --retries R             retries per checkpoint, R >= 0 (default 1)
  --name NAME             the Job's name (default hessian-checkpoints-<UTC time>) [JOB_NAME]
  --namespace NS          the namespace (default: kubectl's current one)
  --accelerator TYPE      GKE GPU type for nodeSelector, e.g. nvidia-l4
  --service-account KSA   the pods' service account (default: default)
  --pvc CLAIM             mount this PersistentVolumeClaim ...
  --mount-path PATH       ... at PATH (default /results)
  --dry-run               print the manifests (and the command) and exit; run nothing
  -h, --help              this help

Example:
  launch/gke/submit_checkpoints.sh --list checkpoints.txt \
      --image us-docker.pkg.dev/my-project/ml/hessian-tf:latest \
      --output-root gs://my-bucket/spectra --dry-run -- --dataset=tfds:cifar10 \
      --data_dir=gs://my-bucket/tfds
USAGE
}

LAUNCHER_OPTIONS="--list --image --output-root --gpus --parallelism --retries --name
  $K8S_OPTIONS --dry-run"
LIST=''
IMAGE=${HESSIAN_IMAGE:-}
OUTPUT_ROOT=${OUTPUT_ROOT:-}
GPUS=1
PARALLELISM=''
RETRIES=1
NAME=${JOB_NAME:-hessian-checkpoints-$(date -u +%Y%m%d-%H%M%S)}
DRY_RUN=0

set_option() {
  case $1 in
    --list) LIST=$2 ;;
    --image) IMAGE=$2 ;;
    --output-root) OUTPUT_ROOT=$2 ;;
    --gpus) GPUS=$2 ;;
    --parallelism) PARALLELISM=$2 ;;
    --retries) RETRIES=$2 ;;
    --name) NAME=$2 ;;
    *) set_k8s_option "$1" "$2" ;;
  esac
}

parse_launcher_options "$LAUNCHER_OPTIONS" "" "$@"

reject_launcher_options "$LAUNCHER_OPTIONS" -- ${ARGS[@]+"${ARGS[@]}"}
reject_flags "--model --output_dir" "each pod sets them from its line of --list and --output-root." \
  -- ${ARGS[@]+"${ARGS[@]}"}
read_checkpoint_list "$LIST"
NUM_CHECKPOINTS=${#CHECKPOINTS[@]}
[[ -n $IMAGE ]] || die "--image is required (or set HESSIAN_IMAGE): an image with hessian_tf installed."
require_plain --image "$IMAGE"
require_int --gpus "$GPUS" 0
PARALLELISM=${PARALLELISM:-$NUM_CHECKPOINTS}
require_int --parallelism "$PARALLELISM" 1
require_int --retries "$RETRIES" 0
require_k8s_options
[[ $OUTPUT_ROOT == / ]] || OUTPUT_ROOT=${OUTPUT_ROOT%/}
require_durable_output --output-root "$OUTPUT_ROOT" "$PVC" "$MOUNT_PATH"

mounts='[{"name": "checkpoint-list", "mountPath": "/etc/hessian-spectrum", "readOnly": true}'
volumes="[{\"name\": \"checkpoint-list\", \"configMap\": {\"name\": \"$NAME-checkpoints\"}}"
if [[ -n $PVC ]]; then
  mounts+=", {\"name\": \"results\", \"mountPath\": \"$MOUNT_PATH\"}"
  volumes+=", {\"name\": \"results\", \"persistentVolumeClaim\": {\"claimName\": \"$PVC\"}}"
fi

render_manifest "$HERE/checkpoints-job.yaml.template" \
  "NAME=$NAME" "IMAGE=$IMAGE" "CHECKPOINTS=$(printf '%s\n' "${CHECKPOINTS[@]}")" \
  "NUM_CHECKPOINTS=$NUM_CHECKPOINTS" "PARALLELISM=$PARALLELISM" "RETRIES=$RETRIES" \
  "OUTPUT_ROOT=$OUTPUT_ROOT" "GPUS=$GPUS" "SERVICE_ACCOUNT=$SERVICE_ACCOUNT" \
  "NODE_SELECTOR=$(k8s_node_selector "$ACCELERATOR")" \
  "VOLUME_MOUNTS=$mounts]" "VOLUMES=$volumes]" \
  -- ${ARGS[@]+"${ARGS[@]}"}

kubectl_apply "$DRY_RUN" "$NAMESPACE"
