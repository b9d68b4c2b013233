#!/usr/bin/env bash
# Step 4: install the Helm client, pinned to HELM_VERSION, checksum-verified.
#
#   sudo deploy/scripts/install-helm.sh
#   DRY_RUN=1 deploy/scripts/install-helm.sh
#
# Downloads the release tarball and its .sha256sum from get.helm.sh, checks the checksum and
# installs the binary as /usr/local/bin/helm. Run it where the next two scripts run (the k3s
# server, or the operator's machine with a kubeconfig). About 10 seconds.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 0 ]] || { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
need_root
need_cmd curl "install curl (apt-get install -y curl)"
need_cmd sha256sum "install coreutils"

case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64|arm64) arch=arm64 ;;
  *) die "unsupported architecture $(uname -m)" ;;
esac
if command -v helm >/dev/null 2>&1 && [[ "$(helm version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]; then
  log "helm ${HELM_VERSION} is already installed"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tarball="helm-${HELM_VERSION}-linux-${arch}.tar.gz"
download "https://get.helm.sh/${tarball}" "$tmp/${tarball}"
download "https://get.helm.sh/${tarball}.sha256sum" "$tmp/${tarball}.sha256sum"
if ! dry_run; then
  expected=$(cut -d' ' -f1 "$tmp/${tarball}.sha256sum")
  actual=$(sha256sum "$tmp/${tarball}" | cut -d' ' -f1)
  [[ "$expected" == "$actual" ]] || die "${tarball}: sha256 $actual does not match the published $expected"
fi
run tar -xzf "$tmp/${tarball}" -C "$tmp"
run install -m 0755 "$tmp/linux-${arch}/helm" /usr/local/bin/helm
log "installed helm ${HELM_VERSION}"
