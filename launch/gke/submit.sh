#!/usr/bin/env bash
# Submits a multi-worker GPU spectrum as a Kubeflow TFJob (renders tfjob.yaml.template).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/common.sh
source "$HERE/../lib/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gke/submit.sh --image IMAGE [options] [--] --output_dir=DIR [hessian-spectrum flags...]

Renders launch/gke/tfjob.yaml.template into a Kubeflow TFJob (kubeflow.org/v1)
of N GPU workers, each running `hessian-spectrum --strategy=multi_worker FLAGS...`
(the training operator sets TF_CONFIG), and pipes it to `kubectl apply -f -`.
--output_dir must outlive the pods: a bucket path (gs://...), or a path under
--mount-path with --pvc. Needs python3 (standard library) to render.

Options (environment variable in brackets):
  --image IMAGE           a container image with hessian_tf installed [HESSIAN_IMAGE]
  --workers N             worker replicas, N >= 1 (default 2) [NUM_WORKERS]
  --gpus-per-worker G     nvidia.com/gpu per worker, G >= 1 (default 1)
  --name NAME             the TFJob's name (default hessian-spectrum-<UTC time>) [JOB_NAME]
  --namespace NS          the namespace (default: kubectl's current one)
  --accelerator TYPE      GKE GPU type for nodeSelector, e.g. nvidia-l4
  --service-account KSA   the pods' service account, e.g. one with bucket access
                          through Workload Identity (default: default)
  --pvc CLAIM             mount this PersistentVolumeClaim (ReadWriteMany) ...
  --mount-path PATH       ... at PATH (default /results)
  --dry-run               print the manifest (and the command) and exit; run nothing
  -h, --help              this help

Example:
  launch/gke/submit.sh --image us-docker.pkg.dev/my-project/ml/hessian-tf:latest \
      --workers 4 --accelerator nvidia-l4 --dry-run -- \
      --model=gs://my-bucket/model.keras --dataset=tfds:cifar10 \
      --data_dir=gs://my-bucket/tfds --output_dir=gs://my-bucket/spectra/cifar10
USAGE
}

LAUNCHER_OPTIONS="--image --workers --gpus-per-worker --name $K8S_OPTIONS --dry-run"
IMAGE=${HESSIAN_IMAGE:-}
WORKERS=${NUM_WORKERS:-2}
GPUS=1
NAME=${JOB_NAME:-hessian-spectrum-$(date -u +%Y%m%d-%H%M%S)}
DRY_RUN=0

set_option() {
  case $1 in
    --image) IMAGE=$2 ;;
    --workers) WORKERS=$2 ;;
    --gpus-per-worker) GPUS=$2 ;;
    --name) NAME=$2 ;;
    *) set_k8s_option "$1" "$2" ;;
  esac
}

parse_launcher_options "$LAUNCHER_OPTIONS" "" "$@"

reject_launcher_options "$LAUNCHER_OPTIONS" -- ${ARGS[@]+"${ARGS[@]}"}
reject_flags "--strategy" "every worker runs --strategy=multi_worker." -- ${ARGS[@]+"${ARGS[@]}"}
[[ -n $IMAGE ]] || die "--image is required (or set HESSIAN_IMAGE): an image with hessian_tf installed."
require_plain --image "$IMAGE"
require_int --workers "$WORKERS" 1
require_int --gpus-per-worker "$GPUS" 1
require_k8s_options
require_durable_output --output_dir "$(flag_value --output_dir -- ${ARGS[@]+"${ARGS[@]}"})" \
  "$PVC" "$MOUNT_PATH"

mounts='[]'
volumes='[]'
if [[ -n $PVC ]]; then
  mounts="[{\"name\": \"results\", \"mountPath\": \"$MOUNT_PATH\"}]"
  volumes="[{\"name\": \"results\", \"persistentVolumeClaim\": {\"claimName\": \"$PVC\"}}]"
fi

render_manifest "$HERE/tfjob.yaml.template" \
  "NAME=$NAME" "IMAGE=$IMAGE" "NUM_WORKERS=$WORKERS" "GPUS_PER_WORKER=$GPUS" \
  "SERVICE_ACCOUNT=$SERVICE_ACCOUNT" "NODE_SELECTOR=$(k8s_node_selector "$ACCELERATOR")" \
  "VOLUME_MOUNTS=$mounts" "VOLUMES=$volumes" \
  -- --strategy=multi_worker ${ARGS[@]+"${ARGS[@]}"}

kubectl_apply "$DRY_RUN" "$NAMESPACE"
