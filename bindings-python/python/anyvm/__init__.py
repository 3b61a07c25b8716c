"""anyvm: drive virtual machines on libvirt/QEMU, VirtualBox and VMware.

    import anyvm
    client = anyvm.connect("libvirt:qemu:///system")
    vm = client.vm("build1")
    with vm.running(timeout=120):
        print(vm.exec(["uname", "-a"]).check().stdout.decode())

Every call releases the GIL while the VM works; Ctrl-C interrupts long waits. ``vm.aio`` has
awaitable versions for asyncio scripts. Log records go to the ``anyvm`` logger.
"""

import logging as _logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native
from ._errors import (
    AuthError,
    BackendError,
    CancelledError,
    BackendUnavailableError,
    BusyError,
    ConfigError,
    Error,
    GuestCommandError,
    HostIOError,
    InvalidArgumentError,
    InvalidStateError,
    NotFoundError,
    NotReadyError,
    PolicyDenied,
    PortInUseError,
    TimeoutError,
)
from ._native import Client, EventStream, ExecResult, ExecStream, JobPool, JobReport, Running, Vm, connect

__all__ = [
    "connect", "Client", "Vm", "ExecResult", "ExecStream", "EventStream", "Running", "AsyncVm", "aio",
    "set_log_level",
    "JobReport", "JobPool",
    "Error", "NotFoundError", "InvalidStateError", "TimeoutError", "NotReadyError", "AuthError",
    "PortInUseError", "BackendUnavailableError", "GuestCommandError", "ConfigError",
    "InvalidArgumentError", "PolicyDenied", "BusyError", "HostIOError", "BackendError", "CancelledError",
]

_logger = _logging.getLogger("anyvm")


def set_log_level(level: int) -> None:
    """Set the ``anyvm`` logger's level and forward core events at that level and above."""
    _logger.setLevel(level)
    _native.set_log_level(_logger.getEffectiveLevel())


_native.set_log_level(_logger.getEffectiveLevel())

Probe = Union[str, Tuple[str, int], Tuple[str, Sequence[str]]]


class AsyncVm:
    """Awaitable view of a Vm: ``await vm.aio.exec([...])``. Many can run at once on one loop."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm

    @property
    def name(self) -> str:
        return self._vm.name

    async def start(self) -> None:
        await self._vm.start_async()

    async def stop(self, *, force: bool = False, timeout: float = 60.0) -> str:
        return str(await self._vm.stop_async(force=force, timeout=timeout))

    async def state(self) -> str:
        return str(await self._vm.state_async())

    async def wait_ready(self, *, timeout: float = 120.0, probes: Optional[List[Probe]] = None,
                         mode: str = "all") -> float:
        return float(await self._vm.wait_ready_async(timeout=timeout, probes=probes, mode=mode))

    async def exec(self, argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                   cwd: Optional[str] = None, stdin: Optional[bytes] = None,
                   timeout: float = 300.0) -> ExecResult:
        r: ExecResult = await self._vm.exec_async(
            list(argv), env=dict(env) if env is not None else None, cwd=cwd, stdin=stdin, timeout=timeout)
        return r

    def exec_stream(self, argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                    cwd: Optional[str] = None, stdin: Optional[bytes] = None,
                    timeout: float = 300.0) -> ExecStream:
        """The program's output as it is written: ``async for stream, data in vm.aio.exec_stream(...)``,
        then ``await s.wait_async()``."""
        return self._vm.exec_stream(list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                                    stdin=stdin, timeout=timeout)

    async def copy_to(self, host_path: str, guest_path: str) -> int:
        return int(await self._vm.copy_to_async(host_path, guest_path))

    async def copy_from(self, guest_path: str, host_path: str) -> int:
        return int(await self._vm.copy_from_async(guest_path, host_path))


def aio(vm: Vm) -> AsyncVm:
    """The asyncio view of ``vm``."""
    return AsyncVm(vm)


def _aio_property(self: Vm) -> AsyncVm:
    return AsyncVm(self)


# `vm.aio` without a Python subclass of the native type.
try:
    setattr(Vm, "aio", property(_aio_property))
except TypeError:  # pragma: no cover - immutable type on some builds
    pass
