#!/usr/bin/env python3
"""Python call / Rust call for the same operation on the same guest (exec of `true`, state query).
Prints figures; no pass/fail. Needs the installed wheel, libvirtd and the test guest:

    python benches/python_overhead.py GUEST_DIR
"""

import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyvm


def p50(xs):
    return statistics.median(xs) * 1e3


def main() -> None:
    g = Path(sys.argv[1])
    work = Path(tempfile.mkdtemp())
    shutil.copy(g / "data.qcow2", work / "d.qcow2")
    c = anyvm.connect("libvirt:qemu:///system", state_dir=work / "state")
    vm = c.define({"name": "pybench-" + uuid.uuid4().hex[:6], "memory_mib": 192, "accel": "tcg",
                   "boot": {"kind": "kernel", "kernel": str(g / "vmlinuz"), "initrd": str(g / "initrd.img"),
                            "cmdline": "console=ttyS0 quiet"},
                   "disks": [{"path": str(work / "d.qcow2")}]})
    try:
        with vm.running():
            for op, n, call in [("exec_true", 60, lambda: vm.exec(["true"])), ("state", 300, lambda: vm.state)]:
                for _ in range(5):
                    call()
                py, rust = [], []
                for _ in range(n):  # interleave so both see the same guest conditions
                    t = time.perf_counter()
                    call()
                    py.append(time.perf_counter() - t)
                    rust.extend(vm._rust_timings(op, 1))
                print(f"{op:<10} python p50 {p50(py):8.3f} ms   rust p50 {p50(rust):8.3f} ms   "
                      f"ratio {p50(py) / p50(rust):.3f}x (target <= 1.1x)")
    finally:
        vm.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
