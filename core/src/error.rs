//! One error type for every backend. Each message names the VM, the operation and the cause,
//! and most say what to do next.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where an error happened: the VM (when there is one) and the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctx {
    /// The VM, when the operation concerns one.
    pub vm: Option<String>,
    /// The operation, as messages name it (`exec make`, `copy a to /b`).
    pub op: String,
}

impl Ctx {
    /// An operation on no particular VM.
    pub fn new(op: impl Into<String>) -> Self {
        Ctx {
            vm: None,
            op: op.into(),
        }
    }
    /// An operation on `vm`.
    pub fn vm(op: impl Into<String>, vm: impl fmt::Display) -> Self {
        Ctx {
            vm: Some(vm.to_string()),
            op: op.into(),
        }
    }
}

impl fmt::Display for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.vm {
            Some(vm) => write!(f, "vm '{}': {}", vm, self.op),
            None => write!(f, "{}", self.op),
        }
    }
}

/// Every failure anyvm reports. Match on the variant (or on [`Error::kind`]) to react.
/// Every `ctx` names the VM (when there is one) and the operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The VM, snapshot, file, forward or machine does not exist.
    #[error("{ctx}: not found: {what}")]
    NotFound {
        /// Where it happened.
        ctx: Ctx,
        /// What was looked for.
        what: String,
    },

    /// The operation is not possible in the VM's current state.
    #[error("{ctx}: not possible in state '{state}'{}", hint_suffix(.hint))]
    InvalidState {
        /// Where it happened.
        ctx: Ctx,
        /// The state that prevents it ("shut off", "has linked clones", ...).
        state: String,
        /// What to do about it, when anyvm knows.
        hint: Option<String>,
    },

    /// A deadline passed; the hung tool or guest program was killed.
    #[error("{ctx}: timed out{} waiting for {what}", after_suffix(.after))]
    Timeout {
        /// Where it happened.
        ctx: Ctx,
        /// The deadline that passed, when anyvm set it (None: the hypervisor's own).
        after: Option<Duration>,
        /// What was waited for.
        what: String,
    },

    /// The guest did not pass its readiness probes in time.
    #[error("{ctx}: not ready{}: probe '{probe}' still failing: {last_error}", after_suffix(.after))]
    NotReady {
        /// Where it happened.
        ctx: Ctx,
        /// How long anyvm waited (None: the hypervisor answered "not ready" at once).
        after: Option<Duration>,
        /// The probe still failing, in the probe syntax (`tcp:22`).
        probe: String,
        /// Its last failure.
        last_error: String,
    },

    /// Guest login failed, or the credentials a channel needs are missing.
    #[error("{ctx}: authentication failed: {reason}")]
    Auth {
        /// Where it happened.
        ctx: Ctx,
        /// Why, and how to give credentials.
        reason: String,
    },

    /// A host port is taken by another VM or program.
    #[error("{ctx}: host port {port} is in use: {reason}")]
    PortInUse {
        /// Where it happened.
        ctx: Ctx,
        /// The port.
        port: u16,
        /// Who holds it, when known.
        reason: String,
    },

    /// The hypervisor or its tool cannot be reached or is not installed.
    #[error("{ctx}: backend '{backend}' unavailable: {reason}")]
    BackendUnavailable {
        /// Where it happened.
        ctx: Ctx,
        /// The backend or tool (`libvirt`, a VBoxManage path).
        backend: String,
        /// Why, and what to install or start.
        reason: String,
    },

    /// A guest program did not exit 0 where that was required.
    #[error("{ctx}: guest command '{program}' failed: {reason}")]
    GuestCommand {
        /// Where it happened.
        ctx: Ctx,
        /// The command line that ran.
        program: String,
        /// Its exit code; None when a signal killed it.
        exit_code: Option<i32>,
        /// Its standard error.
        stderr: Box<[u8]>,
        /// Exit code or signal and the start of stderr, for the message.
        reason: String,
    },

    /// `anyvm.toml` (or a spec given as text) is invalid.
    #[error("configuration error in {}: {key}: {reason}", .file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<input>".into()))]
    Config {
        /// The file, when the configuration came from one.
        file: Option<PathBuf>,
        /// The dotted key at fault (`machines.a.memory_mib`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A bad argument: a name with shell metacharacters, a zero timeout, a relative guest path.
    #[error("invalid argument: {what}: {reason}")]
    InvalidArgument {
        /// The argument.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A site policy refused the operation before anything ran.
    #[error("{ctx}: denied by policy: {reason}")]
    PolicyDenied {
        /// Where it happened.
        ctx: Ctx,
        /// The rule that refused it.
        reason: String,
    },

    /// The VM is locked by another session; retrying later may work.
    #[error("{ctx}: busy: {reason}")]
    Busy {
        /// Where it happened.
        ctx: Ctx,
        /// Who holds the lock, as the hypervisor said.
        reason: String,
    },

    /// A host file operation failed.
    #[error("{ctx}: I/O error on {}: {source}", .path.display())]
    Io {
        /// Where it happened.
        ctx: Ctx,
        /// The host path.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The caller cancelled the operation (dropped or cancelled a stream, a job's cancel
    /// token); what it had started in the guest was stopped.
    #[error("{ctx}: cancelled: {what}")]
    Cancelled {
        /// Where it happened.
        ctx: Ctx,
        /// What was cancelled and what was stopped.
        what: String,
    },

    /// The hypervisor reported an error anyvm has no more specific kind for.
    #[error("{ctx}: {backend}: {message}")]
    Backend {
        /// Where it happened.
        ctx: Ctx,
        /// The backend (`libvirt`, `VBoxManage`, `vmrun`).
        backend: String,
        /// Its message.
        message: String,
        /// The hypervisor library's own error, when there is one (libvirt's).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

fn hint_suffix(hint: &Option<String>) -> String {
    match hint.as_deref() {
        Some(h) if !h.is_empty() => format!("; {h}"),
        _ => String::new(),
    }
}

fn after_suffix(d: &Option<Duration>) -> String {
    d.as_ref()
        .map(|d| format!(" after {}", fmt_dur(d)))
        .unwrap_or_default()
}

fn fmt_dur(d: &Duration) -> String {
    if d.as_secs() >= 1 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The kind of an [`Error`], stable across bindings (C enum, Python exception classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u32)]
pub enum ErrorKind {
    /// See [`Error::NotFound`].
    NotFound = 1,
    /// See [`Error::InvalidState`].
    InvalidState = 2,
    /// See [`Error::Timeout`].
    Timeout = 3,
    /// See [`Error::NotReady`].
    NotReady = 4,
    /// See [`Error::Auth`].
    Auth = 5,
    /// See [`Error::PortInUse`].
    PortInUse = 6,
    /// See [`Error::BackendUnavailable`].
    BackendUnavailable = 7,
    /// See [`Error::GuestCommand`].
    GuestCommand = 8,
    /// See [`Error::Config`].
    Config = 9,
    /// See [`Error::InvalidArgument`].
    InvalidArgument = 10,
    /// See [`Error::PolicyDenied`].
    PolicyDenied = 11,
    /// See [`Error::Busy`].
    Busy = 12,
    /// See [`Error::Io`].
    Io = 13,
    /// See [`Error::Backend`].
    Backend = 14,
    /// See [`Error::Cancelled`].
    Cancelled = 15,
}

impl Error {
    /// The error's kind, as the bindings report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::InvalidState { .. } => ErrorKind::InvalidState,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::NotReady { .. } => ErrorKind::NotReady,
            Error::Auth { .. } => ErrorKind::Auth,
            Error::PortInUse { .. } => ErrorKind::PortInUse,
            Error::BackendUnavailable { .. } => ErrorKind::BackendUnavailable,
            Error::GuestCommand { .. } => ErrorKind::GuestCommand,
            Error::Config { .. } => ErrorKind::Config,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::PolicyDenied { .. } => ErrorKind::PolicyDenied,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Io { .. } => ErrorKind::Io,
            Error::Backend { .. } => ErrorKind::Backend,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
        }
    }

    /// [`Error::InvalidArgument`].
    pub fn invalid_arg(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// [`Error::Config`].
    pub fn config(
        file: Option<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Config {
            file,
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// [`Error::Io`].
    pub fn io(ctx: Ctx, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            ctx,
            path: path.into(),
            source,
        }
    }

    /// [`Error::Backend`] without a cause.
    pub fn backend(ctx: Ctx, backend: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Backend {
            ctx,
            backend: backend.into(),
            message: message.into(),
            source: None,
        }
    }

    /// [`Error::backend`] keeping the error that caused it ([`std::error::Error::source`]).
    pub fn backend_caused(
        ctx: Ctx,
        backend: impl Into<String>,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Backend {
            ctx,
            backend: backend.into(),
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// A result with anyvm's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_deadlines_are_not_printed_and_causes_are_kept() {
        let e = Error::Timeout {
            ctx: Ctx::vm("exec", "b"),
            after: None,
            what: "the agent".into(),
        };
        assert_eq!(
            e.to_string(),
            "vm 'b': exec: timed out waiting for the agent"
        );
        let io = std::io::Error::other("socket closed");
        let e = Error::backend_caused(Ctx::vm("start", "b"), "libvirt", "internal error", io);
        let src = std::error::Error::source(&e).expect("the cause is kept");
        assert_eq!(src.to_string(), "socket closed");
    }

    #[test]
    fn messages_name_vm_operation_and_cause() {
        let e = Error::NotReady {
            ctx: Ctx::vm("wait_ready", "build1"),
            after: Some(Duration::from_millis(2500)),
            probe: "ssh_banner(22)".into(),
            last_error: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "vm 'build1': wait_ready: not ready after 2.5s: probe 'ssh_banner(22)' still failing: connection refused"
        );
        assert_eq!(e.kind(), ErrorKind::NotReady);
        let e = Error::InvalidState {
            ctx: Ctx::vm("exec", "b"),
            state: "shut off".into(),
            hint: Some("start it first (anyvm start b)".into()),
        };
        assert_eq!(
            e.to_string(),
            "vm 'b': exec: not possible in state 'shut off'; start it first (anyvm start b)"
        );
        let e = Error::config(
            Some("/x/anyvm.toml".into()),
            "machines.a.memory_mib",
            "must be at least 16",
        );
        assert_eq!(
            e.to_string(),
            "configuration error in /x/anyvm.toml: machines.a.memory_mib: must be at least 16"
        );
    }
}
