#!/usr/bin/env bash
# Submits launch/slurm/spectrum.sbatch: one spectrum over several nodes.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/common.sh
source "$HERE/../lib/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/slurm/submit.sh [options] [--] [hessian-spectrum flags...]

Submits launch/slurm/spectrum.sbatch with sbatch: N nodes, one task per node,
`srun hessian-spectrum --strategy=multi_worker FLAGS...`. The job inherits this
shell's environment (sbatch's default), so activate the virtualenv that has
hessian-spectrum first; results land where --output_dir points (shared storage).

Options:
  --nodes N              nodes (= workers), N >= 1 (default 2)
  --gpus-per-node G      GPUs per node, G >= 0 (default 0: CPU only)
  --cpus-per-task C      CPUs for each node's task (default: Slurm's)
  --time T               time limit, e.g. 02:00:00 (default 01:00:00)
  --partition P          partition (default: Slurm's)
  --account A            account (default: Slurm's)
  --job-name J           job name (default hessian-spectrum)
  --cluster MODE         tf_config (default): the sbatch writes each task's
                         TF_CONFIG; slurm: hessian-spectrum uses TF's
                         SlurmClusterResolver (see launch/README.md)
  --sbatch-arg ARG       another sbatch option, e.g. --exclusive (repeatable)
  --dry-run              print the sbatch command and exit; run nothing
  -h, --help             this help

Example:
  launch/slurm/submit.sh --nodes 4 --gpus-per-node 4 --time 02:00:00 --dry-run -- \
      --model=runs/resnet32/model.keras --dataset=npz:data/cifar10.npz \
      --bn_mode=train --output_dir=results/resnet32
USAGE
}

LAUNCHER_OPTIONS="--nodes --gpus-per-node --cpus-per-task --time --partition --account
  --job-name --cluster --sbatch-arg --dry-run"
NODES=2
GPUS=0
CPUS=''
TIME=01:00:00
PARTITION=''
ACCOUNT=''
JOB_NAME=hessian-spectrum
CLUSTER=tf_config
SBATCH_ARGS=()
DRY_RUN=0

set_option() {
  case $1 in
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS=$2 ;;
    --cpus-per-task) CPUS=$2 ;;
    --time) TIME=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --sbatch-arg) SBATCH_ARGS+=("$2") ;;
    --cluster) CLUSTER=$2 ;;
  esac
}

parse_launcher_options "$LAUNCHER_OPTIONS" "" "$@"

reject_launcher_options "$LAUNCHER_OPTIONS" -- ${ARGS[@]+"${ARGS[@]}"}
reject_flags "--strategy" "every task runs --strategy=multi_worker." -- ${ARGS[@]+"${ARGS[@]}"}
require_int --nodes "$NODES" 1
require_int --gpus-per-node "$GPUS" 0
require_sbatch_options
[[ $CLUSTER == tf_config || $CLUSTER == slurm ]] || die "--cluster=$CLUSTER: use tf_config or slurm."

command=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" --ntasks-per-node=1 "--time=$TIME")
append_sbatch_options
command+=("--export=ALL,HESSIAN_TF_CLUSTER=$CLUSTER")
command+=("$HERE/spectrum.sbatch" ${ARGS[@]+"${ARGS[@]}"})

if ((DRY_RUN)); then
  quote "${command[@]}"
  exit 0
fi
exec "${command[@]}"
