#!/usr/bin/env bash
# The REAL VBoxManage for the test suite. Debian 12 has no virtualbox package; sid's contrib has
# 7.2.x, which installs into a minbase chroot. Without the vboxdrv kernel module it cannot run
# guests, but every offline operation (createvm, modifyvm, storage, media, snapshots, linked
# clones, shared folders, import/export, guest properties, extradata) is the real program.
#
# Builds the chroot once (cached under a key made of this script; about 1 min), makes sure the
# bind mounts are in place (they do not survive a reboot), writes a wrapper that runs VBoxManage
# inside the chroot with the caller's environment, and prints the wrapper's path on stdout.
# Host paths anyvm passes (temp dirs, state dirs under /tmp or /var/tmp) are the same inside.
set -euo pipefail

CACHE_ROOT=${ANYVM_VBOX_CACHE:-/var/cache/anyvm/vbox-real}
log() { printf 'vbox-real: %s\n' "$*" >&2; }

key=$(sha256sum "$0" | cut -c1-16)
ROOT="$CACHE_ROOT/$key/root"
WRAPPER="$CACHE_ROOT/$key/VBoxManage"

if [ ! -x "$ROOT/usr/bin/VBoxManage" ]; then
  if ! command -v mmdebstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  fi
  log "building the Debian sid chroot with virtualbox (once)"
  mkdir -p "$CACHE_ROOT/$key"
  tmp="$CACHE_ROOT/$key/root.tmp"
  rm -rf "$tmp"
  # The mirror serves a dated snapshot whose Release file has expired: Check-Valid-Until off.
  mmdebstrap --quiet --variant=minbase --components=main,contrib \
    --aptopt='Acquire::Check-Valid-Until "false"' --include=virtualbox \
    sid "$tmp" http://deb.debian.org/debian >&2
  mv "$tmp" "$ROOT"
fi

bind() { # bind SRC at the same path inside the chroot, once
  local src=$1 dst="$ROOT$1"
  mkdir -p "$dst"
  mountpoint -q "$dst" || mount --rbind "$src" "$dst"
}
bind /proc
bind /dev
bind /tmp
bind /var/tmp

cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# VBoxManage $(chroot "$ROOT" dpkg-query -W -f='${Version}' virtualbox) from the Debian sid chroot $ROOT
exec chroot "$ROOT" /usr/bin/VBoxManage "\$@"
EOF
chmod +x "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"
"$WRAPPER" --version >/dev/null 2>&1 || { log "VBoxManage in the chroot does not run"; exit 1; }
printf '%s\n' "$WRAPPER"
