#!/usr/bin/env bash
# Runs a multi-worker spectrum job as N local processes on 127.0.0.1.
#
#   launch/local.sh N [hessian-spectrum flags...]
#
# Each worker runs `hessian-spectrum FLAGS --strategy=multi_worker` with its own
# TF_CONFIG. The script waits for all workers, forwards Ctrl-C (SIGINT) and
# SIGTERM to them, and exits with the chief's (worker 0's) status. If a worker
# fails, the others get --worker_timeout seconds (default 600; pass the flag to
# change it) to end on their own, then are killed. The flags are checked once
# (hessian-spectrum --check_flags) before any worker starts; --strategy is the
# script's own.
#
# Environment: HESSIAN_SPECTRUM (default: hessian-spectrum if on PATH, else
# "python3 -m hessian_tf.bin.spectrum").
set -euo pipefail

usage() { sed -n '2,/^[^#]/p' "$0" | sed -n '/^#/s/^# \{0,1\}//p'; }

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  [[ $# -ge 1 ]] && exit 0 || exit 2
fi
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source=lib/common.sh
source "$HERE/lib/common.sh"  # die, flag_value

num_workers="$1"
shift
if ! [[ "$num_workers" =~ ^[0-9]+$ ]] || (( num_workers < 1 )); then
  die "N=$num_workers: pass the number of workers, an integer >= 1."
fi

for argument in "$@"; do
  case "$argument" in
    --strategy|--strategy=*)
      die "$argument: the script runs every worker with --strategy=multi_worker; drop it." ;;
  esac
done
timeout=$(flag_value --worker_timeout -- "$@")
timeout=${timeout:-600}
# The grace period in whole seconds, from the binary's number (1e3 and 2.5 too).
if ! grace=$(python3 -c 'import math, sys
value = float(sys.argv[1])
if not (math.isfinite(value) and value > 0):
    raise ValueError(value)
print(math.ceil(min(value, 1e9)))' "$timeout" 2> /dev/null); then
  die "--worker_timeout=$timeout: pass a positive number of seconds."
fi

if [[ -n "${HESSIAN_SPECTRUM:-}" ]]; then
  read -r -a command <<< "$HESSIAN_SPECTRUM"
elif command -v hessian-spectrum > /dev/null; then
  command=(hessian-spectrum)
else
  command=(python3 -m hessian_tf.bin.spectrum)
fi
# A bad flag is told once, by the binary, not by every worker (its status, 2).
"${command[@]}" "$@" --strategy=multi_worker --check_flags || exit $?

# Free ports on loopback (launch/free_ports.py says how they are chosen).
ports=$(python3 "$HERE/free_ports.py" "$num_workers")
workers=""
for port in $ports; do
  workers="${workers:+$workers, }\"127.0.0.1:$port\""
done

pids=()
for (( index = 0; index < num_workers; index++ )); do
  # A non-interactive shell starts background jobs with SIGINT ignored, and Python keeps
  # an ignored SIGINT ignored: `trap - INT` gives the worker Ctrl-C back before exec.
  (
    trap - INT
    TF_CONFIG="{\"cluster\": {\"worker\": [$workers]}, \"task\": {\"type\": \"worker\", \"index\": $index}}" \
      exec "${command[@]}" "$@" --strategy=multi_worker
  ) &
  pids+=("$!")
done

forward() {
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2> /dev/null || true; done
}
trap 'forward INT' INT
trap 'forward TERM' TERM

# Wait for every worker; on the first failure start the grace period.
declare -A status=()
failed_at=""
while (( ${#status[@]} < num_workers )); do
  for index in "${!pids[@]}"; do
    [[ -n "${status[$index]:-}" ]] && continue
    if ! kill -0 "${pids[$index]}" 2> /dev/null; then
      code=0
      wait "${pids[$index]}" || code=$?
      status[$index]=$code
      if (( code != 0 )) && [[ -z "$failed_at" ]]; then
        echo "local.sh: worker $index exited with status $code" >&2
        failed_at=$SECONDS
      fi
    fi
  done
  if [[ -n "$failed_at" ]] && (( SECONDS - failed_at > grace )); then
    echo "local.sh: killing the workers still running ${grace}s after a failure" >&2
    forward KILL
  fi
  sleep 0.2
done

chief="${status[0]}"
if (( chief == 0 )); then
  for index in "${!status[@]}"; do
    if (( status[$index] != 0 )); then
      echo "local.sh: the chief succeeded but worker $index exited with ${status[$index]}" >&2
    fi
  done
fi
exit "$chief"
