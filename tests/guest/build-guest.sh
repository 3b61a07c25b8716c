#!/usr/bin/env bash
# Builds anyvm's tiny Linux test guest from Debian packages: a Debian kernel (the generic one: it has vmgenid built in) booted directly, an
# initramfs with busybox, qemu-guest-agent and dropbear, and an empty qcow2 data disk.
# Keys are generated here, never committed. The result is cached under a key made of the package
# versions and this script, so repeated runs cost nothing. Prints the guest directory on stdout.
#
# Kernel command-line switches the guest understands (for tests):
#   anyvm.noagent=1          do not start qemu-guest-agent (a guest that never becomes ready)
#   anyvm.ignore_shutdown=1  ignore agent/ACPI shutdown requests (forces the hard-stop fallback)
set -euo pipefail

CACHE_ROOT=${ANYVM_GUEST_CACHE:-/var/cache/anyvm/test-guest}
log() { printf 'build-guest: %s\n' "$*" >&2; }

need=(busybox-static qemu-guest-agent dropbear-bin openssh-client cpio gzip qemu-utils)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$KPKG" ]; then
  apt-get update -qq
  KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$KPKG" ] || { log "cannot resolve the kernel package"; exit 1; }
KVER_PKG=$(apt-cache policy "$KPKG" | awk '/Candidate:/{print $2}')

versions=$(
  printf '%s=%s\n' "$KPKG" "$KVER_PKG"
  dpkg-query -W -f='${Package}=${Version}\n' busybox-static qemu-guest-agent dropbear-bin libc6 libglib2.0-0
  sha256sum "$0" | cut -d' ' -f1
)
key=$(printf '%s' "$versions" | sha256sum | cut -c1-16)
OUT="$CACHE_ROOT/$key"
if [ -f "$OUT/.complete" ]; then
  ln -sfn "$OUT" "$CACHE_ROOT/current"
  echo "$OUT"
  exit 0
fi

log "building test guest $key ($KPKG)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

(cd "$WORK" && apt-get download -qq "$KPKG" >/dev/null)
dpkg-deb -x "$WORK"/"$KPKG"_*.deb "$WORK/kernel"
KVER=${KPKG#linux-image-}
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

R="$WORK/root"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,run,root/.ssh,lib/anyvm-modules,etc/dropbear,etc/ssh,etc/init.d,var/run,usr/bin,usr/sbin}
cp /bin/busybox "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list); do
  [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"
done
# qemu-ga's guest-set-time syncs the RTC with /sbin/hwclock (a warm clone's clock is set so).
ln -s ../bin/busybox "$R/sbin/hwclock"

copy_with_libs() {
  local bin=$1 dest=$2
  cp "$bin" "$R$dest"
  ldd "$bin" | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
  done
}
copy_with_libs /usr/sbin/qemu-ga /usr/sbin/qemu-ga
copy_with_libs /usr/sbin/dropbear /usr/sbin/dropbear
mkdir -p "$R/lib64"
cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"

MODS="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console failover net_failover virtio_net virtio_blk fuse virtiofs"
for m in $MODS; do
  f=$(find "$WORK/kernel/lib/modules/$KVER" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || { log "kernel module $m not found"; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" >"$R/lib/anyvm-modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" >"$R/lib/anyvm-modules/$m.ko" ;;
    *) cp "$f" "$R/lib/anyvm-modules/$m.ko" ;;
  esac
done
echo "$MODS" >"$R/lib/anyvm-modules/order"

cat >"$R/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat >"$R/etc/group" <<'G'
root:x:0:
nogroup:x:65534:
G
echo 'root:*:19000:0:99999:7:::' >"$R/etc/shadow"
printf '/bin/sh\n' >"$R/etc/shells"
echo anyvm-guest >"$R/etc/hostname"

cat >"$R/etc/inittab" <<'I'
::sysinit:/etc/init.d/rcS
::shutdown:/etc/init.d/rcK
I

cat >"$R/etc/init.d/rcS" <<'S'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname -F /etc/hostname
for m in $(cat /lib/anyvm-modules/order); do insmod /lib/anyvm-modules/$m.ko 2>/dev/null; done
ip link set lo up
if ip link show eth0 >/dev/null 2>&1; then
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
/usr/sbin/dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22 -P /run/dropbear.pid
if ! grep -q 'anyvm.noagent=1' /proc/cmdline; then
  for n in /sys/class/virtio-ports/*/name; do
    [ -f "$n" ] || continue
    if [ "$(cat "$n")" = org.qemu.guest_agent.0 ]; then
      port=/dev/$(basename "$(dirname "$n")")
      /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run -d -f /run/qemu-ga.pid
    fi
  done
fi
echo "anyvm-guest: boot complete" >/dev/console
S

cat >"$R/etc/init.d/rcK" <<'K'
#!/bin/sh
sync
K

# qemu-ga's guest-shutdown execs /sbin/shutdown -P +0 "...": map it onto busybox init.
cat >"$R/sbin/shutdown" <<'D'
#!/bin/sh
grep -q 'anyvm.ignore_shutdown=1' /proc/cmdline && exit 0
case "$1" in
  -r) reboot ;;
  -H) halt ;;
  *) poweroff ;;
esac
exit 0
D
chmod 0755 "$R/etc/init.d/rcS" "$R/etc/init.d/rcK" "$R/sbin/shutdown"
ln -sf /bin/busybox "$R/init"
ln -sf /bin/busybox "$R/sbin/init"

dropbearkey -t ed25519 -f "$R/etc/dropbear/dropbear_ed25519_host_key" >/dev/null 2>&1
dropbearkey -y -f "$R/etc/dropbear/dropbear_ed25519_host_key" | awk '/^ssh-/{print $1" "$2" root@anyvm-guest"}' \
  >"$R/etc/ssh/ssh_host_ed25519_key.pub"
cp "$R/etc/ssh/ssh_host_ed25519_key.pub" "$OUT/host_key.pub"

rm -f "$OUT/client_key" "$OUT/client_key.pub"
ssh-keygen -q -t ed25519 -N '' -C anyvm-test-client -f "$OUT/client_key"
cp "$OUT/client_key.pub" "$R/root/.ssh/authorized_keys"
chmod 0700 "$R/root" "$R/root/.ssh"
chmod 0600 "$R/root/.ssh/authorized_keys"

(cd "$R" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$OUT/initrd.img"
qemu-img create -q -f qcow2 "$OUT/data.qcow2" 64M
printf '%s\n' "$versions" >"$OUT/versions"
touch "$OUT/.complete"
ln -sfn "$OUT" "$CACHE_ROOT/current"
log "built in $OUT"
echo "$OUT"
