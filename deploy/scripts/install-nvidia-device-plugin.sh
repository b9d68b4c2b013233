#!/usr/bin/env bash
# Step 5: install the NVIDIA device plugin (Helm chart pinned to NVIDIA_DEVICE_PLUGIN_CHART_VERSION).
#
#   deploy/scripts/install-nvidia-device-plugin.sh        # with a kubeconfig for the cluster
#   DRY_RUN=1 deploy/scripts/install-nvidia-device-plugin.sh
#
# The plugin's DaemonSet runs on nodes labelled nvidia.com/gpu.present=true (k3s-agent.sh --gpu
# sets it), under the `nvidia` RuntimeClass that k3s creates, and advertises each node's GPUs as
# the nvidia.com/gpu resource the Ray GPU worker groups request. Skip this step on a CPU-only
# (cpu-dev) cluster. About 1 minute, then the GPUs show in `kubectl describe node`.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 0 ]] || { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
need_cmd helm "run deploy/scripts/install-helm.sh first"
need_cmd kubectl "use the k3s server (it has kubectl) or install kubectl"
use_kubeconfig

run helm repo add nvdp https://nvidia.github.io/k8s-device-plugin --force-update
run helm repo update nvdp
run helm upgrade --install nvdp nvdp/nvidia-device-plugin \
  --version "$NVIDIA_DEVICE_PLUGIN_CHART_VERSION" \
  --namespace nvidia-device-plugin --create-namespace \
  --set runtimeClassName=nvidia \
  --wait --timeout 5m
run kubectl get nodes -L medtune/gpu -o custom-columns='NODE:.metadata.name,GPU:.metadata.labels.medtune/gpu,ALLOCATABLE:.status.allocatable.nvidia\.com/gpu'
log "nvidia.com/gpu should now be allocatable on every GPU node (empty ALLOCATABLE = driver/toolkit problem on that node)"
