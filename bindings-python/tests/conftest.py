"""Fixtures: the real libvirtd and anyvm's test guest (tests/guest/build-guest.sh)."""

import os
import pathlib
import shutil
import signal
import subprocess
import uuid

import pytest

import anyvm

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_is_keyboard_interrupt():
    """Python leaves SIGINT ignored when its parent ignored it (a suite started in the background
    by a non-interactive shell); the Ctrl-C tests need it to mean KeyboardInterrupt, as at a
    terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def guest_dir() -> pathlib.Path:
    d = os.environ.get("ANYVM_TEST_GUEST")
    if not d:
        d = subprocess.run(["bash", str(REPO / "tests/guest/build-guest.sh")], check=True,
                           capture_output=True, text=True).stdout.strip()
    return pathlib.Path(d)


@pytest.fixture(scope="session")
def client(tmp_path_factory: pytest.TempPathFactory) -> anyvm.Client:
    state = tmp_path_factory.mktemp("anyvm-state")
    return anyvm.connect("libvirt:qemu:///system", state_dir=state, port_range=(50000, 50999))


@pytest.fixture
def make_vm(client, guest_dir, tmp_path):
    made = []

    def make(extra_cmdline: str = "", forwards=True, vnc=False) -> anyvm.Vm:
        name = "py-" + uuid.uuid4().hex[:8]
        disk = tmp_path / f"{name}.qcow2"
        shutil.copy(guest_dir / "data.qcow2", disk)
        spec = {
            "name": name,
            "memory_mib": 192,
            "accel": "tcg",
            "boot": {"kind": "kernel", "kernel": str(guest_dir / "vmlinuz"), "initrd": str(guest_dir / "initrd.img"),
                     "cmdline": f"console=ttyS0 quiet {extra_cmdline}".strip()},
            "disks": [{"path": str(disk)}],
            "forwards": [{"name": "ssh", "guest_port": 22}] if forwards else [],
        }
        if vnc:
            spec["console"] = {"vnc": "auto"}
        vm = client.define(spec)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        try:
            vm.destroy(with_clones=True)
        except anyvm.NotFoundError:
            pass
