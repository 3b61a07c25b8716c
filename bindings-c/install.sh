#!/usr/bin/env bash
# Build libanyvm and install headers, libraries and a pkg-config file under PREFIX, so SCons,
# CMake or make projects find it with `pkg-config --cflags --libs anyvm`.
#   bindings-c/install.sh [PREFIX]      (default /usr/local)
set -euo pipefail
PREFIX=${1:-/usr/local}
cd "$(dirname "$0")/.."
cargo build --release --quiet -p anyvm-c
install -d "$PREFIX/lib/pkgconfig" "$PREFIX/include/anyvm"
install -m 0644 bindings-c/include/anyvm.h bindings-c/include/anyvm.hh "$PREFIX/include/anyvm/"
install -m 0755 target/release/libanyvm.so "$PREFIX/lib/"
install -m 0644 target/release/libanyvm.a "$PREFIX/lib/"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
cat >"$PREFIX/lib/pkgconfig/anyvm.pc" <<PC
prefix=$PREFIX
libdir=\${prefix}/lib
includedir=\${prefix}/include/anyvm

Name: anyvm
Description: Drive virtual machines on libvirt/QEMU, VirtualBox and VMware
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lanyvm
Libs.private: -lvirt -lpthread -ldl -lm
PC
echo "installed anyvm $version under $PREFIX (pkg-config: $PREFIX/lib/pkgconfig/anyvm.pc)"
