# shellcheck shell=bash
# Shared helpers for the bootstrap scripts; sourced, not run.
#
# DRY_RUN=1 prints every command that would change the machine instead of running it, and
# skips the root check: review what a script will do before running it on a server (the
# tests in tests/test_deploy.py run every script this way).

# shellcheck source=versions.env
source "$(dirname "${BASH_SOURCE[0]}")/versions.env"

# Every medtune pod runs as root inside its container; the NFS export squashes all clients
# to this uid/gid so files written by any node have one owner (deploy/scripts/nfs-server.sh).
# shellcheck disable=SC2034  # used by the scripts that source this file
MEDTUNE_UID=1000
# shellcheck disable=SC2034
MEDTUNE_GID=1000

log() { printf '[medtune-deploy] %s\n' "$*" >&2; }
die() { printf '[medtune-deploy] error: %s\n' "$*" >&2; exit 1; }

dry_run() { [[ "${DRY_RUN:-0}" == "1" ]]; }

# run CMD ARGS...: run it, or print it shell-quoted under DRY_RUN=1. Never pass a secret as an
# argument: arguments show in `ps` and in this dry-run output. Secrets travel in the environment.
run() {
  if dry_run; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

need_root() {
  dry_run && return 0
  [[ ${EUID} -eq 0 ]] || die "run this as root (sudo $0 ...)"
}

# need_cmd NAME HINT: fail early, with how to get it, when NAME is missing (not under DRY_RUN).
need_cmd() {
  dry_run && return 0
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"
}

# download URL DEST: fetch a file over HTTPS, failing on HTTP errors.
download() {
  run curl --proto '=https' --tlsv1.2 -fsSL --retry 3 -o "$2" "$1"
}

# The GPU models the manifests know: a node joins with `--gpu a100` or `--gpu h100` and gets the
# label medtune/gpu=<model>, which the Ray worker groups select on (deploy/k8s/overlays/gpu-cluster).
GPU_MODELS=(a100 h100)

# gpu_node_args MODEL: k3s flags for a GPU node: the medtune/gpu label the worker groups select
# on, the label the NVIDIA device plugin's DaemonSet selects on, a taint that keeps CPU-only pods
# away (GPU pods tolerate it), and the NVIDIA container runtime as containerd's default.
gpu_node_args() {
  local model=$1 known=0 m
  for m in "${GPU_MODELS[@]}"; do [[ "$model" == "$m" ]] && known=1; done
  ((known)) || die "--gpu $model: expected one of: ${GPU_MODELS[*]}"
  if ! dry_run; then
    command -v nvidia-smi >/dev/null 2>&1 || die "--gpu $model: nvidia-smi not found; install the NVIDIA driver first"
    command -v nvidia-container-runtime >/dev/null 2>&1 \
      || die "--gpu $model: nvidia-container-runtime not found; install the NVIDIA Container Toolkit first"
  fi
  # shellcheck disable=SC2034  # read by the caller
  GPU_ARGS=(
    --node-label "medtune/gpu=${model}"
    --node-label "nvidia.com/gpu.present=true"
    --node-taint "nvidia.com/gpu=present:NoSchedule"
    --default-runtime nvidia
  )
}

# install_nfs_client: the kubelet mounts the shared NFS volume itself, so every node needs it.
install_nfs_client() {
  if command -v apt-get >/dev/null 2>&1 || dry_run; then
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nfs-common
  else
    log "no apt-get here: install the NFS client (nfs-utils) with this distribution's package manager"
  fi
}

# install_k3s ROLE ARGS...: the k3s installer of the pinned release (from that release's tag,
# so the script and the binary match), run with INSTALL_K3S_VERSION; ROLE is server or agent.
install_k3s() {
  local role=$1
  shift
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: the trap must remove this directory
  trap "rm -rf '$tmp'" EXIT
  download "https://raw.githubusercontent.com/k3s-io/k3s/${K3S_VERSION/+/%2B}/install.sh" "$tmp/install.sh"
  run env INSTALL_K3S_VERSION="$K3S_VERSION" sh "$tmp/install.sh" "$role" "$@"
}

# use_kubeconfig: on the k3s server itself, talk to it through k3s's kubeconfig unless the
# caller chose one (on the operator's machine: ~/.kube/config or KUBECONFIG).
use_kubeconfig() {
  if [[ -z "${KUBECONFIG:-}" && ! -f "${HOME}/.kube/config" && -r /etc/rancher/k3s/k3s.yaml ]]; then
    export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
  fi
}
