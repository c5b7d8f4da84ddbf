#!/usr/bin/env bash
# Submits launch/slurm/checkpoints.sbatch as an array: one spectrum per checkpoint.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/common.sh
source "$HERE/../lib/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/slurm/submit_checkpoints.sh --list FILE [options] [--] [hessian-spectrum flags...]

Submits launch/slurm/checkpoints.sbatch as a Slurm array with one task per
checkpoint in FILE (one model path per line; blank lines and '#' lines skipped):
--array=0-(N-1). Task i runs `hessian-spectrum --model=LINE_i
--output_dir=OUTPUT_ROOT/<basename of LINE_i> FLAGS...`. The job inherits this
shell's environment, so activate the virtualenv that has hessian-spectrum first.

Options (environment variable in brackets):
  --list FILE            the checkpoints, one path per line (required)
  --output-root DIR      results go to DIR/<basename>/ (default results/checkpoints) [OUTPUT_ROOT]
  --max-parallel K       run at most K tasks at once (--array=0-(N-1)%K)
  --gpus G               GPUs per task, G >= 0 (default 0: CPU only)
  --cpus-per-task C      CPUs per task (default: Slurm's)
  --time T               time limit per task (default 01:00:00)
  --partition P          partition (default: Slurm's)
  --account A            account (default: Slurm's)
  --job-name J           job name (default hessian-checkpoints)
  --sbatch-arg ARG       another sbatch option, e.g. --exclusive (repeatable)
  --dry-run              print the sbatch command and exit; run nothing
  -h, --help             this help

Example:
  launch/slurm/submit_checkpoints.sh --list checkpoints.txt --output-root results/sweep \
      --max-parallel 8 --dry-run -- --dataset=npz:data/cifar10.npz --lanczos_steps=90
USAGE
}

LAUNCHER_OPTIONS="--list --output-root --max-parallel --gpus --cpus-per-task --time
  --partition --account --job-name --sbatch-arg --dry-run"
LIST=''
OUTPUT_ROOT=${OUTPUT_ROOT:-results/checkpoints}
MAX_PARALLEL=''
GPUS=0
CPUS=''
TIME=01:00:00
PARTITION=''
ACCOUNT=''
JOB_NAME=hessian-checkpoints
SBATCH_ARGS=()
DRY_RUN=0

set_option() {
  case $1 in
    --list) LIST=$2 ;;
    --output-root) OUTPUT_ROOT=$2 ;;
    --max-parallel) MAX_PARALLEL=$2 ;;
    --gpus) GPUS=$2 ;;
    --cpus-per-task) CPUS=$2 ;;
    --time) TIME=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --sbatch-arg) SBATCH_ARGS+=("$2") ;;
  esac
}

parse_launcher_options "$LAUNCHER_OPTIONS" "" "$@"

reject_launcher_options "$LAUNCHER_OPTIONS" -- ${ARGS[@]+"${ARGS[@]}"}
reject_flags "--model --output_dir" "each task sets them from --list and --output-root." \
  -- ${ARGS[@]+"${ARGS[@]}"}
read_checkpoint_list "$LIST"
NUM_CHECKPOINTS=${#CHECKPOINTS[@]}
[[ -n $OUTPUT_ROOT ]] || die "--output-root is empty: pass the directory for the results."
[[ -z $MAX_PARALLEL ]] || require_int --max-parallel "$MAX_PARALLEL" 1
require_int --gpus "$GPUS" 0
require_sbatch_options

# The tasks read the list when they start, from wherever they run.
list_path="$(cd "$(dirname "$LIST")" && pwd)/$(basename "$LIST")"
array="0-$((NUM_CHECKPOINTS - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}"
command=(sbatch "--job-name=$JOB_NAME" "--array=$array" "--time=$TIME")
append_sbatch_options
command+=("$HERE/checkpoints.sbatch" "--list=$list_path" "--output-root=$OUTPUT_ROOT"
  "--count=$NUM_CHECKPOINTS" -- ${ARGS[@]+"${ARGS[@]}"})

if ((DRY_RUN)); then
  quote "${command[@]}"
  exit 0
fi
exec "${command[@]}"
