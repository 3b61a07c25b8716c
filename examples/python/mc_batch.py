#!/usr/bin/env python3
"""Monte Carlo production as many transient jobs: each seed runs in its own throwaway clone of one
template VM, through a pool that keeps the host's cores busy without overcommitting them.

Defines the test guest as the template (off), submits one job per seed, collects each job's
output file, and removes the template. Every clone is removed by anyvm, whatever the job does.

    python examples/python/mc_batch.py GUEST_DIR [--seeds N] [--events N] [--out DIR]
"""

import argparse
import pathlib
import shutil
import sys
import tempfile
import uuid

import anyvm

GENERATOR = ('i=0; while [ $i -lt "$1" ]; do echo "event $i $(( ($2 * 1103515245 + $i * 12345) % 65536 ))"; '
             'i=$((i+1)); done > /work/mc.out; wc -l < /work/mc.out')


def main(argv: "list[str]") -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("guest_dir", type=pathlib.Path, help="folder from tests/guest/build-guest.sh")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("mc-batch"))
    args = p.parse_args(argv)

    work = pathlib.Path(tempfile.mkdtemp(prefix="mc-batch-"))
    disk = work / "template.qcow2"
    shutil.copy(args.guest_dir / "data.qcow2", disk)
    client = anyvm.connect("libvirt:qemu:///system")
    template = client.define({
        "name": "mc-tmpl-" + uuid.uuid4().hex[:8],
        "memory_mib": 192,
        "accel": "tcg",
        "boot": {"kind": "kernel", "kernel": str(args.guest_dir / "vmlinuz"),
                 "initrd": str(args.guest_dir / "initrd.img"), "cmdline": "console=ttyS0 quiet"},
        "disks": [{"path": str(disk)}],
    })
    try:
        pool = client.job_pool()
        jobs = [{
            "template": template.name,
            "argv": ["sh", "-c", "mkdir -p /work && " + GENERATOR, "mc", str(args.events), str(seed)],
            "outputs": [("/work/mc.out", str(args.out / f"seed-{seed}.txt"))],
            "timeout": 600.0,
        } for seed in range(args.seeds)]
        reports = pool.run_all(jobs)
        ok = True
        for seed, r in enumerate(reports):
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in r.phases.items())
            print(f"seed {seed}: {r.outcome} (exit {r.exit_status}) in {r.seconds:.1f}s [{phases}]")
            lines = (args.out / f"seed-{seed}.txt").read_bytes().count(b"\n") if r.outcome == "succeeded" else -1
            ok = ok and r.outcome == "succeeded" and lines == args.events
        leftovers = [c for c in client.gc(dry_run=True)["clones"] if c["vm"].startswith(template.name)]
        print(f"{len(reports)} jobs, {'all' if ok else 'NOT all'} produced {args.events} events; "
              f"clones left: {len(leftovers)}")
        return 0 if ok and not leftovers else 1
    finally:
        template.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
