#!/usr/bin/env bash
# Step 6: install the KubeRay operator and its ray.io/v1 CRDs (chart pinned to KUBERAY_OPERATOR_CHART_VERSION).
#
#   deploy/scripts/install-kuberay.sh        # with a kubeconfig for the cluster
#   DRY_RUN=1 deploy/scripts/install-kuberay.sh
#
# Installs the kuberay-operator chart into kuberay-system and waits until the RayCluster, RayJob
# and RayService CRDs are established. Helm installs CRDs only on first install: when bumping the
# version, apply the new release's CRDs first (see deploy/README.md). About 1 minute.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 0 ]] || { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
need_cmd helm "run deploy/scripts/install-helm.sh first"
need_cmd kubectl "use the k3s server (it has kubectl) or install kubectl"
use_kubeconfig

run helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
run helm repo update kuberay
run helm upgrade --install kuberay-operator kuberay/kuberay-operator \
  --version "$KUBERAY_OPERATOR_CHART_VERSION" \
  --namespace kuberay-system --create-namespace \
  --wait --timeout 5m
run kubectl wait --for=condition=Established --timeout=120s \
  crd/rayclusters.ray.io crd/rayjobs.ray.io crd/rayservices.ray.io
log "KubeRay operator ${KUBERAY_OPERATOR_CHART_VERSION} is running (kubectl -n kuberay-system get pods)"
