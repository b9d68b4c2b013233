#!/usr/bin/env bash
# Step 7: create the two Secrets the pods read, from this shell's environment.
#
#   MEDTUNE_API_KEY=... [HF_TOKEN=...] deploy/scripts/create-secrets.sh [--namespace medtune]
#   (MEDTUNE_API_KEY_FILE / HF_TOKEN_FILE / RAY_AUTH_TOKEN_FILE may name files holding the values)
#
#   medtune-secrets   MEDTUNE_API_KEY (required: the serving API demands it as a Bearer token,
#                     the chatbot sends it) and HF_TOKEN (optional: only for gated hub downloads)
#   medtune-ray-auth  auth_token: the Ray token the RayCluster and RayService require (KubeRay
#                     authOptions.secretName). RAY_AUTH_TOKEN if set, else generated once and kept
#                     on later runs. `medtune submit` from the operator's machine needs it:
#                     export RAY_AUTH_TOKEN="$(kubectl -n medtune get secret medtune-ray-auth \
#                                              -o jsonpath='{.data.auth_token}' | base64 -d)"
#
# Values never appear on a command line (they would show in `ps`), in this script's output or in
# the repository: they go from the environment through a pipe into `kubectl create secret
# --from-env-file=/dev/stdin --dry-run=client -o yaml | kubectl apply -f -`. Idempotent: re-run it
# to rotate the API key or the hub token. DRY_RUN=1 names the keys it would write. Seconds.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

NAMESPACE=medtune
while (($#)); do
  case "$1" in
    --namespace|-n) [[ $# -ge 2 ]] || die "--namespace needs a value"; NAMESPACE=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$1' (see --help); secrets are read from the environment, never from arguments" ;;
  esac
done

# secret_value NAME: the value of $NAME, else the contents of the file named by ${NAME}_FILE
# (without its trailing newline), else nothing.
secret_value() {
  local name=$1 file_var="${1}_FILE" value=""
  if [[ -n "${!name:-}" ]]; then
    value=${!name}
  elif [[ -n "${!file_var:-}" ]]; then
    [[ -r "${!file_var}" ]] || die "${file_var}=${!file_var}: cannot read it"
    value=$(<"${!file_var}")
  fi
  value=${value%$'\n'}
  [[ "$value" != *$'\n'* ]] || die "$name holds more than one line; expected a single token"
  printf '%s' "$value"
}

# apply_secret NAME: KEY=VALUE lines on stdin become Secret NAME (created or updated).
apply_secret() {
  local name=$1
  if dry_run; then
    log "would apply Secret ${NAMESPACE}/${name} with keys: $(cut -d= -f1 | paste -sd, -)"
    return 0
  fi
  kubectl create secret generic "$name" --namespace "$NAMESPACE" \
    --from-env-file=/dev/stdin --dry-run=client -o yaml | kubectl apply -f -
}

api_key=$(secret_value MEDTUNE_API_KEY)
hf_token=$(secret_value HF_TOKEN)
ray_token=$(secret_value RAY_AUTH_TOKEN)
[[ -n "$api_key" ]] || die "set MEDTUNE_API_KEY (or MEDTUNE_API_KEY_FILE): the serving API key the chatbot and clients use"
[[ -n "$hf_token" ]] || log "HF_TOKEN not set: fine when the base models are already on the shared volume"

need_cmd kubectl "use the k3s server (it has kubectl) or install kubectl"
use_kubeconfig
if ! dry_run; then
  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
fi

{
  printf 'MEDTUNE_API_KEY=%s\n' "$api_key"
  if [[ -n "$hf_token" ]]; then printf 'HF_TOKEN=%s\n' "$hf_token"; fi
} | apply_secret medtune-secrets

if [[ -z "$ray_token" ]] && ! dry_run && kubectl get secret medtune-ray-auth --namespace "$NAMESPACE" >/dev/null 2>&1; then
  log "keeping the existing Ray auth token in ${NAMESPACE}/medtune-ray-auth (set RAY_AUTH_TOKEN to replace it)"
else
  if [[ -z "$ray_token" ]]; then
    ray_token=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
  fi
  printf 'auth_token=%s\n' "$ray_token" | apply_secret medtune-ray-auth
fi
log "secrets ready in namespace ${NAMESPACE}"
