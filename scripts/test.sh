#!/usr/bin/env bash
# Every test on a fresh machine: host set-up (packages, libvirtd), the test guest, lint, unit and
# end-to-end tests against the real libvirtd.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-host.sh
export ANYVM_TEST_GUEST
ANYVM_TEST_GUEST=$(bash tests/guest/build-guest.sh)

command -v cargo-clippy >/dev/null 2>&1 || rustup component add clippy rustfmt >/dev/null 2>&1 || true
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Guests run under software emulation on 2 cores: two tests at a time.
log=$(mktemp)
cargo test --workspace -- --test-threads=2 2>&1 | tee "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
