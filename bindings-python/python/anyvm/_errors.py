"""Exceptions raised by anyvm. Every one carries the core's message, which names the VM, the
operation and the cause; ``kind`` is the core error kind as a string."""

import builtins
from typing import Optional


class Error(Exception):
    """Base class of every anyvm error."""

    kind: Optional[str] = None


class NotFoundError(Error, LookupError):
    """The VM, snapshot, file or forward does not exist."""


class InvalidStateError(Error):
    """The operation is not possible in the VM's current state."""


class TimeoutError(Error, builtins.TimeoutError):
    """A deadline passed (the hung tool or guest program was killed)."""


class NotReadyError(Error):
    """The guest did not pass its readiness probes in time."""


class AuthError(Error, PermissionError):
    """Guest login failed or credentials are missing."""


class PortInUseError(Error):
    """A host port is taken by another VM or program."""


class BackendUnavailableError(Error):
    """The hypervisor or its tool cannot be reached."""


class GuestCommandError(Error):
    """A guest program failed; ``exit_code`` and ``stderr`` (bytes) say how."""

    exit_code: Optional[int] = None
    stderr: bytes = b""


class ConfigError(Error, ValueError):
    """anyvm.toml is invalid; the message names the file, the key and why."""


class InvalidArgumentError(Error, ValueError):
    """A bad argument (name with shell metacharacters, zero timeout, ...)."""


class PolicyDenied(Error, PermissionError):
    """A site policy refused the operation before anything ran."""


class BusyError(Error):
    """The VM is locked by another session."""


class HostIOError(Error, OSError):
    """A host file operation failed."""


class BackendError(Error):
    """The hypervisor reported an error anyvm has no more specific kind for."""


class CancelledError(Error):
    """The caller cancelled the operation (a stream closed or cancelled, a callback that
    raised); the guest program it had started was killed."""
