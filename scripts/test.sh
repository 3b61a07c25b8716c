#!/usr/bin/env bash
# Every test on a fresh machine: host set-up (packages, libvirtd), the test guest, the real
# VBoxManage, lint, unit and end-to-end tests against the real libvirtd and VBoxManage.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-host.sh
# The drills restart libvirtd; run under a reaper so the daemon they start (and its QEMUs) are
# reaped at once however late this host's init reaps (see 'orphan reaping' in anyvm doctor).
if [ -z "${ANYVM_UNDER_REAPER:-}" ]; then
  export ANYVM_UNDER_REAPER=1
  exec tini -s -- bash "$0" "$@"
fi
export ANYVM_TEST_GUEST
ANYVM_TEST_GUEST=$(bash tests/guest/build-guest.sh)
# The real VBoxManage (VirtualBox from Debian sid in a chroot) for the offline VirtualBox tests.
export ANYVM_VBOXMANAGE_REAL
ANYVM_VBOXMANAGE_REAL=$(bash tests/support/vbox-real.sh)

command -v cargo-clippy >/dev/null 2>&1 || rustup component add clippy rustfmt >/dev/null 2>&1 || true
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Every public item is documented (missing_docs) and the docs build without a warning.
RUSTDOCFLAGS="-D warnings" cargo doc -p anyvm --no-deps --quiet
# Guests run under software emulation on 2 cores: two tests at a time.
log=$(mktemp)
cargo test --workspace -- --test-threads=2 2>&1 | tee "$log"
cargo build --release --quiet --bin anyvm

# Python: build the wheel, install it into a fresh venv, test the installed package (not the
# source tree), type-check the example and run it.
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q "maturin>=1.5,<2" "pytest>=7" "mypy>=1.8"
wheels=$(mktemp -d)
(cd bindings-python && "$venv/bin/maturin" build --release --compatibility linux --auditwheel skip -o "$wheels" 2>&1 | tail -1)
"$venv/bin/pip" install -q "$wheels"/anyvm-*.whl
(cd "$(dirname "$venv")" && "$venv/bin/python" -m pytest -v -p no:cacheprovider "$OLDPWD/bindings-python/tests" 2>&1) | tee -a "$log"
"$venv/bin/mypy" --strict examples/python/mc_production.py
"$venv/bin/python" examples/python/mc_production.py "$ANYVM_TEST_GUEST" --events 500 --out "$(dirname "$venv")/mc.txt"
"$venv/bin/mypy" --strict examples/python/mc_batch.py
"$venv/bin/python" examples/python/mc_batch.py "$ANYVM_TEST_GUEST" --seeds 3 --out "$(dirname "$venv")/mc-batch"

# C and C++: install libanyvm into a scratch prefix, then build against it exactly as a user
# would (pkg-config). The C test runs under valgrind; the SCons example builds C++ with anyvm.hh.
prefix=$(mktemp -d)
bash bindings-c/install.sh "$prefix"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
cwork=$(mktemp -d /var/tmp/anyvm-c-XXXXXX)
gcc -std=c11 -pthread -Wall -Wextra -Werror tests/c/test_capi.c $(pkg-config --cflags --libs anyvm) -o "$cwork/test_capi"
valgrind --quiet --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=3 \
  "$cwork/test_capi" "$ANYVM_TEST_GUEST" "$cwork" 2>&1 | tee -a "$log"
gcc -std=c11 -Wall -Wextra -Werror examples/c/hello.c $(pkg-config --cflags --libs anyvm) -o "$cwork/hello"
cp "$ANYVM_TEST_GUEST/data.qcow2" "$cwork/hello.qcow2"
cat >"$cwork/anyvm.toml" <<TOML
state_dir = "$cwork/state"
[machines.c-hello]
memory_mib = 192
accel = "tcg"
kernel = "$ANYVM_TEST_GUEST/vmlinuz"
initrd = "$ANYVM_TEST_GUEST/initrd.img"
cmdline = "console=ttyS0 quiet"
disks = [{ path = "$cwork/hello.qcow2" }]
TOML
hello_out=$("$cwork/hello" "$cwork/anyvm.toml" c-hello uname -sr)
echo "examples/c/hello: $hello_out"
[[ $hello_out == Linux\ * ]]
target/release/anyvm -c "$cwork/anyvm.toml" destroy c-hello >/dev/null
"$venv/bin/pip" install -q scons
cp -r examples/scons "$cwork/scons"
(cd "$cwork/scons" && "$venv/bin/scons" -Q && ./rm_vm_check "$ANYVM_TEST_GUEST")

awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^=+ .*(passed|failed).* in [0-9.]+s/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^[0-9]+ passed, [0-9]+ failed$/ { p += $1; f += $3 }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
