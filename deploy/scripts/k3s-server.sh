#!/usr/bin/env bash
# Step 2: make this machine the k3s server (the Kubernetes control plane), pinned to K3S_VERSION.
#
#   sudo deploy/scripts/k3s-server.sh [--tls-san NAME] [--node-ip IP] [--gpu a100|h100]
#   DRY_RUN=1 deploy/scripts/k3s-server.sh     # print what it would do
#
# Installs the NFS client (the kubelet mounts the shared volume) and k3s without Traefik (nothing
# here needs an ingress). --tls-san adds a name or address to the API certificate so that the
# operator's machine can use the kubeconfig; --gpu makes this node a GPU node too (as in
# k3s-agent.sh). Afterwards: the kubeconfig is /etc/rancher/k3s/k3s.yaml (root only), the join
# token for agents is in /var/lib/rancher/k3s/server/node-token. About 1-2 minutes.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '3,5p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

ARGS=(--disable traefik --write-kubeconfig-mode 0600)
while (($#)); do
  case "$1" in
    --tls-san) [[ $# -ge 2 ]] || die "--tls-san needs a value"; ARGS+=(--tls-san "$2"); shift 2 ;;
    --node-ip) [[ $# -ge 2 ]] || die "--node-ip needs a value"; ARGS+=(--node-ip "$2"); shift 2 ;;
    --gpu) [[ $# -ge 2 ]] || die "--gpu needs a value"; gpu_node_args "$2"; ARGS+=("${GPU_ARGS[@]}"); shift 2 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

need_root
need_cmd curl "install curl (apt-get install -y curl)"
log "installing the NFS client and k3s ${K3S_VERSION} (server)"
install_nfs_client
install_k3s server "${ARGS[@]}"
run k3s kubectl wait --for=condition=Ready node --all --timeout=180s
log "k3s server is up. Kubeconfig: /etc/rancher/k3s/k3s.yaml (copy it to the operator's machine as ~/.kube/config"
log "and replace 127.0.0.1 with this host's address). Agents join with the token in"
log "/var/lib/rancher/k3s/server/node-token: pass it as K3S_TOKEN_FILE, never on a command line."
