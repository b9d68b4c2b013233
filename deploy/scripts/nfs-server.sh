#!/usr/bin/env bash
# Step 1: export a directory over NFS as the cluster's shared storage (models, datasets, checkpoints).
#
#   sudo deploy/scripts/nfs-server.sh --clients 10.0.0.0/24 [--export /srv/medtune]
#   DRY_RUN=1 deploy/scripts/nfs-server.sh --clients 10.0.0.0/24
#
# Installs the kernel NFS server, creates the export with models/ datasets/ runs/ and exports it
# read-write to the given client network only. Every client uid is squashed to 1000:1000, the
# owner of the export, so files written by any pod on any node share one owner. Every Ray pod
# mounts it at /mnt/storage (MEDTUNE_STORAGE) through the PersistentVolume in
# deploy/k8s/base/storage.yaml: put this host's address there. About 1 minute.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

EXPORT_DIR=/srv/medtune
CLIENTS=""
while (($#)); do
  case "$1" in
    --export) [[ $# -ge 2 ]] || die "--export needs a directory"; EXPORT_DIR=$2; shift 2 ;;
    --clients) [[ $# -ge 2 ]] || die "--clients needs a CIDR"; CLIENTS=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$CLIENTS" ]] || die "--clients CIDR is required (the node network, e.g. 10.0.0.0/24); '*' would export to anyone"
[[ "$CLIENTS" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]] || die "--clients $CLIENTS: expected an IPv4 CIDR such as 10.0.0.0/24"
[[ "$EXPORT_DIR" == /* ]] || die "--export $EXPORT_DIR: expected an absolute path"

need_root
need_cmd apt-get "this script targets Debian/Ubuntu; elsewhere install the NFS server by hand"
log "exporting ${EXPORT_DIR} to ${CLIENTS}"
run apt-get update -qq
run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nfs-kernel-server
run mkdir -p "$EXPORT_DIR/models" "$EXPORT_DIR/datasets" "$EXPORT_DIR/runs"
run chown -R "${MEDTUNE_UID}:${MEDTUNE_GID}" "$EXPORT_DIR"
line="${EXPORT_DIR} ${CLIENTS}(rw,sync,no_subtree_check,all_squash,anonuid=${MEDTUNE_UID},anongid=${MEDTUNE_GID})"
if dry_run; then
  printf '+ write /etc/exports.d/medtune.exports: %s\n' "$line"
else
  mkdir -p /etc/exports.d
  printf '%s\n' "$line" > /etc/exports.d/medtune.exports
fi
run systemctl enable --now nfs-server
run exportfs -ra
run exportfs -v
log "done: put this host's address and ${EXPORT_DIR} into deploy/k8s/base/storage.yaml (spec.nfs)"
