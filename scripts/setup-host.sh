#!/usr/bin/env bash
# Idempotent host set-up for anyvm's libvirt backend on a machine without systemd:
# packages, the users libvirt's QEMU driver insists on, qemu.conf, virtlogd and libvirtd.
set -euo pipefail

log() { printf 'setup-host: %s\n' "$*" >&2; }

PKGS=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
      pkg-config openssh-client busybox-static qemu-guest-agent dropbear-bin cpio gzip
      qemu-utils iproute2 procps)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirt 9.0 resolves its compiled-in default user at start-up, whatever qemu.conf says.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -G kvm -s /usr/sbin/nologin -d /var/lib/libvirt libvirt-qemu

conf=/etc/libvirt/qemu.conf
want='# anyvm: run guests as root without a security driver or cgroups (no systemd here)
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]'
if ! grep -q '^# anyvm:' "$conf" 2>/dev/null; then
  printf '%s\n' "$want" >>"$conf"
fi

mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/images

running() { pgrep -x "$1" >/dev/null 2>&1; }
running virtlogd || { log "starting virtlogd"; virtlogd -d; }
running libvirtd || { log "starting libvirtd"; libvirtd -d; }

for _ in $(seq 1 100); do
  if timeout 5 virsh -c qemu:///system version >/dev/null 2>&1; then
    log "libvirtd is answering"
    exit 0
  fi
  sleep 0.2
done
log "libvirtd did not answer within 20 s"
exit 1
