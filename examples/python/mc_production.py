#!/usr/bin/env python3
"""A Monte Carlo production step in a transient VM, the way batch scripts use anyvm.

Boots the test guest (or any kernel/initrd guest), runs a "generator" with parameters, copies the
output file back, checks it, and always shuts the VM down.

    python examples/python/mc_production.py GUEST_DIR [--events N] [--seed S] [--out FILE]
"""

import argparse
import hashlib
import pathlib
import shutil
import sys
import tempfile
import uuid

import anyvm


def main(argv: "list[str]") -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("guest_dir", type=pathlib.Path, help="folder from tests/guest/build-guest.sh")
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("mc-output.txt"))
    args = p.parse_args(argv)

    work = pathlib.Path(tempfile.mkdtemp(prefix="mc-"))
    disk = work / "data.qcow2"
    shutil.copy(args.guest_dir / "data.qcow2", disk)
    client = anyvm.connect("libvirt:qemu:///system")
    vm = client.define({
        "name": "mc-" + uuid.uuid4().hex[:8],
        "memory_mib": 192,
        "accel": "tcg",
        "boot": {"kind": "kernel", "kernel": str(args.guest_dir / "vmlinuz"),
                 "initrd": str(args.guest_dir / "initrd.img"), "cmdline": "console=ttyS0 quiet"},
        "disks": [{"path": str(disk)}],
    })
    try:
        with vm.running(timeout=120):
            # The "generator": deterministic pseudo-events from the seed, one line each.
            job = vm.exec(
                ["sh", "-c", 'i=0; while [ $i -lt "$1" ]; do echo "event $i $(( ($2 * 1103515245 + $i * 12345) % 65536 ))"; '
                 'i=$((i+1)); done > /tmp/mc.out; wc -l < /tmp/mc.out', "mc", str(args.events), str(args.seed)],
                timeout=600,
            ).check()
            produced = int(job.stdout.decode().strip())
            vm.copy_from("/tmp/mc.out", args.out)
        data = args.out.read_bytes()
        lines = data.count(b"\n")
        print(f"{vm.name}: {produced} events generated, {lines} copied back to {args.out} "
              f"(sha256 {hashlib.sha256(data).hexdigest()[:16]})")
        return 0 if lines == args.events == produced else 1
    finally:
        vm.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
