#!/usr/bin/env bash
# Runs hessian-spectrum on a Cloud TPU VM slice over `gcloud compute tpus tpu-vm ssh`.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
source "$HERE/lib/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE [options] [--] [hessian-spectrum flags...]

Runs `hessian-spectrum --strategy=tpu --tpu=NAME FLAGS...` on a Cloud TPU VM
slice through `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=W
--command "..."`. Everything after the launcher options goes to hessian-spectrum.

TensorFlow drives a whole slice from one client: on a multi-host (pod) slice the
program runs on worker 0 only, with TPU_LOAD_LIBRARY=0, and reaches the other
hosts through the TPU runtime (create the slice with a tpu-vm-tf-*-pod-* runtime).
A program on every host (--worker=all) would start one client per host, each
initialising the same TPU system and writing the same output.

Options (environment variable in brackets):
  --name NAME        the TPU VM name, also passed as --tpu=NAME [TPU_NAME]
  --zone ZONE        its zone [ZONE]
  --project PROJECT  its project (default: gcloud's configured one) [PROJECT_ID]
  --single-host      a one-host slice (e.g. v4-8): pass --tpu=local, no TPU_LOAD_LIBRARY
  --worker W         the worker(s) to run on: 0 (default), all, or e.g. 0,1
  --env NAME=VALUE   export this on the TPU VM first (repeatable)
  --program CMD      the program to run (default: hessian-spectrum) [HESSIAN_SPECTRUM]
  --gcloud-arg ARG   an extra argument for gcloud, e.g. --tunnel-through-iap (repeatable)
  --dry-run          print the gcloud command and exit; run nothing
  -h, --help         this help

Example:
  launch/tpu_vm.sh --name my-tpu --zone us-central2-b --dry-run -- \
      --model=gs://bucket/model.keras --dataset=tfds:cifar10 \
      --data_dir=gs://bucket/tfds --output_dir=results/cifar10
USAGE
}

LAUNCHER_OPTIONS="--name --zone --project --single-host --worker --env --program --gcloud-arg --dry-run"
NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT_ID:-}
PROGRAM=${HESSIAN_SPECTRUM:-hessian-spectrum}
WORKER=0
SINGLE_HOST=0
DRY_RUN=0
ENVS=()
GCLOUD_ARGS=()

set_option() {
  case $1 in
    --single-host) SINGLE_HOST=$2 ;;
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --worker) WORKER=$2 ;;
    --env) ENVS+=("$2") ;;
    --program) PROGRAM=$2 ;;
    --gcloud-arg) GCLOUD_ARGS+=("$2") ;;
  esac
}

parse_launcher_options "$LAUNCHER_OPTIONS" "--single-host" "$@"

reject_launcher_options "$LAUNCHER_OPTIONS" -- ${ARGS[@]+"${ARGS[@]}"}
reject_flags "--strategy --tpu" "the launcher sets --strategy=tpu and --tpu itself." \
  -- ${ARGS[@]+"${ARGS[@]}"}
[[ -n $NAME ]] || die "--name is required (or set TPU_NAME): the TPU VM to run on."
[[ -n $ZONE ]] || die "--zone is required (or set ZONE): the TPU VM's zone."
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name=$NAME: a TPU name is lower-case letters, digits and '-', starting with a letter."
[[ $WORKER =~ ^(all|[0-9]+(,[0-9]+)*)$ ]] || die "--worker=$WORKER: use 0, all, or a list like 0,1."
[[ -n $PROGRAM ]] || die "--program is empty: pass the command that runs hessian-spectrum."
for assignment in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$assignment: use NAME=VALUE."
done

# Non-interactive ssh skips ~/.profile, so put pip's --user scripts on PATH.
exports=('PATH="$HOME/.local/bin:$PATH"')
if ((SINGLE_HOST)); then
  tpu=local
else
  tpu=$NAME
  exports+=(TPU_LOAD_LIBRARY=0)
fi
for assignment in ${ENVS[@]+"${ENVS[@]}"}; do
  exports+=("$(quote "$assignment")")
done
remote="export ${exports[*]} && $PROGRAM $(quote --strategy=tpu "--tpu=$tpu" ${ARGS[@]+"${ARGS[@]}"})"

command=(gcloud compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE")
[[ -n $PROJECT ]] && command+=("--project=$PROJECT")
command+=("--worker=$WORKER")
command+=(${GCLOUD_ARGS[@]+"${GCLOUD_ARGS[@]}"})
command+=("--command=$remote")

if ((DRY_RUN)); then
  quote "${command[@]}"
  exit 0
fi
exec "${command[@]}"
