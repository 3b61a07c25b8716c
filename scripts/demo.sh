#!/usr/bin/env bash
# The main job on a fresh machine: set up the host, build the test guest, boot it, run a command
# inside, print the output, tear down.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-host.sh
GUEST=$(bash tests/guest/build-guest.sh)
cargo build --release --quiet --bin anyvm
ANYVM=target/release/anyvm

WORK=$(mktemp -d)
export ANYVM_STATE_DIR="$WORK/state"
cp "$GUEST/data.qcow2" "$WORK/data.qcow2"
cat >"$WORK/anyvm.toml" <<TOML
backend = "libvirt:qemu:///system"

[machines.anyvm-demo]
memory_mib = 256
accel = "tcg"
kernel = "$GUEST/vmlinuz"
initrd = "$GUEST/initrd.img"
cmdline = "console=ttyS0 quiet"
disks = [{ path = "$WORK/data.qcow2" }]
forwards = [{ name = "ssh", guest_port = 22 }]
credentials = { user = "root", identity_file = "$GUEST/client_key" }
ready = { timeout_s = 120, probes = ["agent", "ssh:22"] }
TOML

cleanup() { "$ANYVM" -c "$WORK/anyvm.toml" destroy anyvm-demo >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$ANYVM" -c "$WORK/anyvm.toml" destroy anyvm-demo >/dev/null 2>&1 || true
time "$ANYVM" -c "$WORK/anyvm.toml" up anyvm-demo
echo "--- anyvm exec anyvm-demo -- uname -a"
"$ANYVM" -c "$WORK/anyvm.toml" exec anyvm-demo -- uname -a
echo "--- the same guest over ssh, host key pinned by anyvm ssh-config"
"$ANYVM" -c "$WORK/anyvm.toml" ssh-config anyvm-demo >"$WORK/ssh_config"
ssh -F "$WORK/ssh_config" -o BatchMode=yes anyvm-anyvm-demo cat /proc/version
"$ANYVM" -c "$WORK/anyvm.toml" stop anyvm-demo --timeout 30
