# Helpers shared by the launch scripts; sourced, never run. Written for bash 3.2
# too (macOS), so no mapfile, no associative arrays, and empty arrays are expanded
# as ${a[@]+"${a[@]}"} (bash < 4.4 calls "${a[@]}" of an empty array unbound).

PROG=${PROG:-$(basename "$0")}

# One line on stderr, exit status 2 (as hessian-spectrum does for bad input).
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# Prints the words as one line that a POSIX shell reads back as the same words.
quote() {
  local out='' word single="'\\''"
  for word in "$@"; do
    if [[ -n $word && $word != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
      out+=" $word"
    else
      out+=" '${word//\'/$single}'"
    fi
  done
  printf '%s\n' "${out# }"
}

require_int() {  # NAME VALUE MINIMUM
  [[ $2 =~ ^[0-9]+$ ]] && (($2 >= $3)) || die "$1=$2: pass an integer >= $3."
}

# Kubernetes object names (DNS-1123 labels); 52 leaves room for pod-name suffixes.
require_k8s_name() {  # NAME VALUE
  [[ $2 =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ && ${#2} -le 52 ]] ||
    die "$1=$2: use at most 52 lower-case letters, digits and '-', starting and ending alphanumeric."
}

# Values pasted verbatim into YAML must not need quoting there.
require_plain() {  # NAME VALUE
  [[ -n $2 && $2 != *[!A-Za-z0-9._/:@+-]* ]] ||
    die "$1='$2': use only letters, digits and . _ / : @ + -"
}

# Dies when a launcher option (given as a word or --opt=value) is among the
# words passed through to hessian-spectrum: it would otherwise reach the binary
# (or, for --dry-run, be ignored while the job is really submitted).
# A word with a dash in its name (--gpu-per-node) is a misspelt launcher option:
# hessian-spectrum's flags have underscores.
# (A word after a flag given without `=` may be its value, `--variables --a-b`: not
# taken for an option.)
reject_launcher_options() {  # "OPTION..." -- WORD...
  local options=$1 word option name first=${3-} previous=''
  shift 2
  for word in "$@"; do
    for option in $options; do
      if [[ $word == "$option" || $word == "$option="* ]]; then
        die "$option comes after the hessian-spectrum flags (from $first on); put launcher options first (see --help)."
      fi
    done
    name=${word%%=*}
    if [[ $word == --* && ${name#--} == *-* ]] && ! [[ $previous == --?* && $previous != *=* ]]; then
      die "$name: no launcher option of that name (see --help), and hessian-spectrum's flags are written with underscores."
    fi
    previous=$word
  done
}

# Dies when a flag the launcher sets itself is passed through as well.
reject_flags() {  # "FLAG..." WHY -- WORD...
  local flags=$1 why=$2 word flag
  shift 3
  for word in "$@"; do
    for flag in $flags; do
      if [[ $word == "$flag" || $word == "$flag="* ]]; then
        die "do not pass $flag: $why"
      fi
    done
  done
}

# Prints the value of a hessian-spectrum flag given as --flag=value or --flag value.
flag_value() {  # FLAG -- WORD...
  local flag=$1 value=''
  shift 2
  while (($#)); do
    case $1 in
      "$flag="*) value=${1#*=} ;;
      "$flag") (($# >= 2)) && value=$2 && shift ;;
    esac
    shift
  done
  printf '%s' "$value"
}

# Reads a checkpoint list into CHECKPOINTS: one model path per line; blank lines
# and lines starting with '#' are skipped, surrounding blanks (and CR) trimmed;
# launch/slurm/checkpoints.sbatch cleans its list with the same awk program.
# Each result goes to OUTPUT_ROOT/<basename>, so basenames must be distinct.
read_checkpoint_list() {  # FILE
  local file=$1 line name seen=$'\n'
  CHECKPOINTS=()
  [[ -n $file ]] || die "--list is required: a text file with one model path per line."
  [[ -f $file && -r $file ]] || die "--list=$file: no such readable file."
  while IFS= read -r line; do
    name=$(basename "$line")
    if [[ $seen == *$'\n'"$name"$'\n'* ]]; then
      die "--list=$file: two checkpoints share the basename '$name', so both would write OUTPUT_ROOT/$name; rename one or split the list."
    fi
    seen+="$name"$'\n'
    CHECKPOINTS+=("$line")
  done < <(awk '{ sub(/\r$/, ""); gsub(/^[ \t]+|[ \t]+$/, "") } $0 != "" && $0 !~ /^#/' "$file")
  ((${#CHECKPOINTS[@]} >= 1)) || die "--list=$file is empty: put one model path per line."
}

# Output must outlive the pods: a bucket (scheme://...) or a path under the PVC.
require_durable_output() {  # WHAT PATH PVC MOUNT_PATH
  local what=$1 path=$2 pvc=$3 mount=${4%/}
  [[ -n $path ]] || die "$what is required (a gs:// bucket path, or a path under --mount-path with --pvc)."
  if [[ $path == *://* ]]; then
    return 0
  fi
  if [[ -z $pvc ]]; then
    die "$what=$path would vanish with the pod; use a bucket path (gs://...) or pass --pvc CLAIM and a path under --mount-path ($mount)."
  fi
  [[ $path == "$mount" || $path == "$mount/"* ]] ||
    die "$what=$path is not under the PVC mount path $mount; use $mount/... or change --mount-path."
}

# --- Slurm -----------------------------------------------------------------

# Checks the sbatch options both Slurm launchers take: CPUS, TIME, PARTITION,
# ACCOUNT, JOB_NAME and SBATCH_ARGS.
require_sbatch_options() {
  local arg
  [[ -z $CPUS ]] || require_int --cpus-per-task "$CPUS" 1
  require_plain --time "$TIME"
  [[ -z $PARTITION ]] || require_plain --partition "$PARTITION"
  [[ -z $ACCOUNT ]] || require_plain --account "$ACCOUNT"
  require_plain --job-name "$JOB_NAME"
  for arg in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
    [[ $arg == -* ]] || die "--sbatch-arg=$arg: pass an sbatch option such as --exclusive."
  done
}

# Appends those options (and --gpus-per-node=GPUS unless 0) to the array `command`.
append_sbatch_options() {
  ((GPUS == 0)) || command+=("--gpus-per-node=$GPUS")
  [[ -z $CPUS ]] || command+=("--cpus-per-task=$CPUS")
  [[ -z $PARTITION ]] || command+=("--partition=$PARTITION")
  [[ -z $ACCOUNT ]] || command+=("--account=$ACCOUNT")
  command+=(${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"})
}

# --- Kubernetes manifests ---------------------------------------------------

# The placement options both GKE launchers take (besides --name, whose default
# differs): their defaults, and set_option's cases for them.
K8S_OPTIONS="--namespace --accelerator --service-account --pvc --mount-path"
NAMESPACE=''
ACCELERATOR=''
SERVICE_ACCOUNT=default
PVC=''
MOUNT_PATH=/results

set_k8s_option() {  # OPTION VALUE
  case $1 in
    --namespace) NAMESPACE=$2 ;;
    --accelerator) ACCELERATOR=$2 ;;
    --service-account) SERVICE_ACCOUNT=$2 ;;
    --pvc) PVC=$2 ;;
    --mount-path) MOUNT_PATH=$2 ;;
  esac
}

# Checks them: NAME, NAMESPACE, ACCELERATOR, SERVICE_ACCOUNT, PVC and MOUNT_PATH.
require_k8s_options() {
  require_k8s_name --name "$NAME"
  [[ -z $NAMESPACE ]] || require_k8s_name --namespace "$NAMESPACE"
  [[ -z $ACCELERATOR ]] || require_plain --accelerator "$ACCELERATOR"
  require_k8s_name --service-account "$SERVICE_ACCOUNT"
  [[ -z $PVC ]] || require_k8s_name --pvc "$PVC"
  [[ $MOUNT_PATH == /* ]] && require_plain --mount-path "$MOUNT_PATH" ||
    die "--mount-path=$MOUNT_PATH: pass an absolute path such as /results."
}

# Pipes MANIFEST to `kubectl apply` in NAMESPACE (or prints it: --dry-run).
kubectl_apply() {  # DRY_RUN NAMESPACE
  local command=(kubectl apply)
  [[ -z $2 ]] || command+=("--namespace=$2")
  command+=(-f -)
  apply_manifest "$1" "${command[@]}"
}

# JSON (valid YAML) for a pod's nodeSelector: GKE's GPU node label, or none.
k8s_node_selector() {  # ACCELERATOR
  if [[ -n $1 ]]; then
    printf '{"cloud.google.com/gke-accelerator": "%s"}' "$1"
  else
    printf '{}'
  fi
}

# Renders TEMPLATE with render.py (python3, standard library only) into MANIFEST.
render_manifest() {  # TEMPLATE NAME=VALUE... [-- WORD...]
  local python=${PYTHON:-python3} template=$1
  shift
  command -v "$python" >/dev/null 2>&1 ||
    die "$python not found: it renders the manifest (set PYTHON to another interpreter)."
  MANIFEST=$("$python" "$(dirname "${BASH_SOURCE[0]}")/render.py" "$template" "$@") ||
    die "could not render $template."
  MANIFEST+=$'\n'
}

# Prints MANIFEST under a comment naming the command (--dry-run), or pipes it to
# that command.
apply_manifest() {  # DRY_RUN COMMAND...
  local dry_run=$1
  shift
  if ((dry_run)); then
    printf '# dry run: this manifest would be piped to: %s\n' "$(quote "$@")"
    printf '%s' "$MANIFEST"
    return 0
  fi
  printf '%s' "$MANIFEST" | "$@"
}

# Parses the launcher's own options from the front of the words: OPTIONS (the
# script's LAUNCHER_OPTIONS) take a value (`--opt V` or `--opt=V`) except the
# SWITCHES among them; each is handed to the caller's `set_option NAME VALUE` (a
# switch gets 1). --help and --dry-run (DRY_RUN=1) are
# handled here. Parsing stops at `--` or the first other word; the rest is ARGS.
parse_launcher_options() {  # "OPTION..." "SWITCH..." WORD...
  local values=" ${1//$'\n'/ } " switches=" ${2//$'\n'/ } "  # lists may span lines
  shift 2
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; break ;;
      --*=*)
        [[ $values == *" ${1%%=*} "* && $switches != *" ${1%%=*} "* ]] || break
        set_option "${1%%=*}" "${1#*=}"
        shift ;;
      *)
        if [[ $switches == *" $1 "* ]]; then
          set_option "$1" 1
          shift
        elif [[ $values == *" $1 "* ]]; then
          (($# >= 2)) || die "$1 needs a value."
          set_option "$1" "$2"
          shift 2
        else
          break
        fi ;;
    esac
  done
  ARGS=("$@")
}
