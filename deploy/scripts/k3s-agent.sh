#!/usr/bin/env bash
# Step 3: join this machine to the k3s cluster as an agent (a worker node), pinned to K3S_VERSION.
#
#   sudo K3S_URL=https://SERVER:6443 K3S_TOKEN_FILE=/root/node-token deploy/scripts/k3s-agent.sh [--gpu a100|h100] [--node-ip IP]
#   DRY_RUN=1 K3S_URL=https://SERVER:6443 K3S_TOKEN=x deploy/scripts/k3s-agent.sh --gpu h100
#
# The join token comes from K3S_TOKEN or the file named by K3S_TOKEN_FILE (copied from the
# server's /var/lib/rancher/k3s/server/node-token), never from an argument. --gpu labels the node
# medtune/gpu=<model> (the Ray worker groups select on it), labels it for the NVIDIA device
# plugin, taints it so that only GPU pods land there, and makes the NVIDIA container runtime
# containerd's default. A GPU node needs the NVIDIA driver and the NVIDIA Container Toolkit
# installed first (both distribution-specific). About 1 minute per node.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '3,5p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

ARGS=()
while (($#)); do
  case "$1" in
    --gpu) [[ $# -ge 2 ]] || die "--gpu needs a value"; gpu_node_args "$2"; ARGS+=("${GPU_ARGS[@]}"); shift 2 ;;
    --node-ip) [[ $# -ge 2 ]] || die "--node-ip needs a value"; ARGS+=(--node-ip "$2"); shift 2 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "${K3S_URL:-}" ]] || die "set K3S_URL=https://SERVER:6443 (the k3s server's API address)"
[[ "$K3S_URL" == https://* ]] || die "K3S_URL=$K3S_URL: expected https://SERVER:6443"
if [[ -z "${K3S_TOKEN:-}" ]]; then
  [[ -n "${K3S_TOKEN_FILE:-}" ]] || die "set K3S_TOKEN_FILE to a copy of the server's /var/lib/rancher/k3s/server/node-token (or K3S_TOKEN)"
  [[ -r "$K3S_TOKEN_FILE" ]] || die "K3S_TOKEN_FILE=$K3S_TOKEN_FILE: cannot read it"
fi
# The installer reads these from its environment (and keeps them in its systemd env file).
export K3S_URL
if [[ -n "${K3S_TOKEN:-}" ]]; then export K3S_TOKEN; else export K3S_TOKEN_FILE; fi

need_root
need_cmd curl "install curl (apt-get install -y curl)"
log "installing the NFS client and k3s ${K3S_VERSION} (agent of ${K3S_URL})"
install_nfs_client
install_k3s agent "${ARGS[@]}"
log "joined. On the server: kubectl get nodes -L medtune/gpu"
