#!/usr/bin/env bash
# Idempotent host set-up for anyvm's libvirt backend on a machine without systemd:
# packages, the users libvirt's QEMU driver insists on, qemu.conf, virtlogd and libvirtd.
set -euo pipefail

log() { printf 'setup-host: %s\n' "$*" >&2; }

PKGS=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
      pkg-config openssh-client busybox-static qemu-guest-agent dropbear-bin cpio gzip tini
      qemu-utils iproute2 procps gcc g++ make valgrind openssh-server mariadb-server
      munge slurmctld slurmd slurm-client)

missing_pkgs() {
  missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
}
# Two passes: installing one package can remove another that was there (a machine image with a
# backported qemu-utils loses it to Debian's qemu-system-x86), and libvirtd looks for qemu-img
# only when it starts, so everything must be in place before the daemons below.
export DEBIAN_FRONTEND=noninteractive
for pass in 1 2; do
  missing_pkgs
  ((${#missing[@]})) || break
  log "installing ${missing[*]}"
  [ "$pass" = 1 ] && apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
missing_pkgs
if ((${#missing[@]})); then
  log "still missing after install: ${missing[*]}"
  exit 1
fi
command -v qemu-img >/dev/null || { log "qemu-img not found after installing qemu-utils"; exit 1; }

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

# Restricted guests reach each allowed endpoint through a relay QEMU spawns per connection
# (guestfwd cmd:); QEMU's seccomp sandbox denies spawning, so libvirt must not enable it.
if ! grep -q '^seccomp_sandbox' "$conf"; then
  printf '# anyvm: guestfwd cmd: relays for restricted networking need QEMU to spawn\nseccomp_sandbox = 0\n' >>"$conf"
  rm -f /run/anyvm-libvirtd.pid   # libvirtd reads qemu.conf at start: make start_daemon restart it
fi

mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/images

# Package scripts may have started daemons through /etc/init.d before qemu.conf was written;
# keep only the ones this script started (their pids are recorded), restart any other.
ours() { [ -f "/run/anyvm-$1.pid" ] && [ "$(pgrep -o -x "$1")" = "$(cat "/run/anyvm-$1.pid")" ]; }
start_daemon() {
  local d=$1
  if ! ours "$d"; then
    if pgrep -x "$d" >/dev/null; then
      log "restarting $d (not started by this script)"
      pkill -x "$d" || true
      for _ in $(seq 1 50); do pgrep -x "$d" >/dev/null || break; sleep 0.1; done
    else
      log "starting $d"
    fi
    # Under tini -s: libvirt waits for a killed QEMU (an orphan: libvirt daemonizes it) to be
    # reaped, and this host's init may reap late ('anyvm doctor' measures it); tini reaps at once.
    setsid tini -s -- "$d" </dev/null >>"/var/log/anyvm-$d.log" 2>&1 &
    for _ in $(seq 1 50); do pgrep -o -x "$d" >/dev/null && break; sleep 0.1; done
    pgrep -o -x "$d" >"/run/anyvm-$d.pid"
  fi
}
start_daemon virtlogd
# libvirtd looks for qemu-img only when it starts: one older than the installed qemu-img restarts.
if ours libvirtd; then
  started=$(date -d "$(ps -o lstart= -p "$(cat /run/anyvm-libvirtd.pid)")" +%s)
  [ "$started" -ge "$(stat -c %Z "$(command -v qemu-img)")" ] || rm -f /run/anyvm-libvirtd.pid
fi
start_daemon libvirtd

for _ in $(seq 1 100); do
  if timeout 5 virsh -c qemu:///system version >/dev/null 2>&1; then
    log "libvirtd is answering"
    exit 0
  fi
  sleep 0.2
done
log "libvirtd did not answer within 20 s"
exit 1
