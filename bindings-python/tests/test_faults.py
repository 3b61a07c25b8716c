"""Faults a long-lived Python process lives through: libvirtd restarted under it."""

import os
import subprocess
import time

import pytest

import anyvm


def restart_libvirtd() -> None:
    """Stop libvirtd and start it again, as an upgrade or an operator would (no systemd here)."""
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 20
    while True:
        pid = subprocess.run(["pgrep", "-o", "-x", "libvirtd"], capture_output=True, text=True).stdout
        if pid and subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                  capture_output=True).returncode == 0:
            # scripts/setup-host.sh keeps track of the daemon it started by this file.
            with open("/run/anyvm-libvirtd.pid", "w") as f:
                f.write(pid)
            return
        assert time.monotonic() < deadline, "libvirtd did not come back"
        time.sleep(0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="restarting libvirtd needs root")
def test_long_lived_client_keeps_working_across_libvirtd_restarts(client, make_vm):
    events = client.events()
    vm = make_vm(forwards=False)
    vm.start()
    vm.wait_ready(timeout=120, probes=["agent"])
    assert vm.exec(["echo", "before"]).stdout == b"before\n"

    for round in range(2):
        restart_libvirtd()
        # The same client and handles: no reconnect by the caller.
        assert vm.state == "running"
        assert vm.exec(["echo", str(round)]).stdout == f"{round}\n".encode()
        assert vm.name in [v["name"] for v in client.list()]

    # Event callbacks were registered again on the new connection: a stop is seen.
    while events.next_event(timeout=0.5) is not None:
        pass
    assert vm.stop(force=True) in ("forced", "graceful")
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        e = events.next_event(timeout=1)
        if e and e.get("vm") == vm.name:
            seen.append(e.get("kind"))
            if e.get("kind") == "stopped":
                break
    assert "stopped" in seen, seen

    # And a wait on a fresh start works as before.
    vm.start()
    rep = vm.wait_ready(timeout=120, probes=["agent"])
    assert [p for p, _ in rep["passed"]] == ["agent"]
