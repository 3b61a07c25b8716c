//! One error type for every backend. Each message names the VM, the operation and the cause,
//! and most say what to do next.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where an error happened: the VM (when there is one) and the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctx {
    pub vm: Option<String>,
    pub op: String,
}

impl Ctx {
    pub fn new(op: impl Into<String>) -> Self {
        Ctx {
            vm: None,
            op: op.into(),
        }
    }
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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{ctx}: not found: {what}")]
    NotFound { ctx: Ctx, what: String },

    #[error("{ctx}: not possible in state '{state}'{}", hint_suffix(.hint))]
    InvalidState {
        ctx: Ctx,
        state: String,
        /// What to do about it, when anyvm knows.
        hint: Option<String>,
    },

    #[error("{ctx}: timed out{} waiting for {what}", after_suffix(.after))]
    Timeout {
        ctx: Ctx,
        /// The deadline that passed, when anyvm set it (None: the hypervisor's own).
        after: Option<Duration>,
        what: String,
    },

    #[error("{ctx}: not ready{}: probe '{probe}' still failing: {last_error}", after_suffix(.after))]
    NotReady {
        ctx: Ctx,
        /// How long anyvm waited (None: the hypervisor answered "not ready" at once).
        after: Option<Duration>,
        probe: String,
        last_error: String,
    },

    #[error("{ctx}: authentication failed: {reason}")]
    Auth { ctx: Ctx, reason: String },

    #[error("{ctx}: host port {port} is in use: {reason}")]
    PortInUse { ctx: Ctx, port: u16, reason: String },

    #[error("{ctx}: backend '{backend}' unavailable: {reason}")]
    BackendUnavailable {
        ctx: Ctx,
        backend: String,
        reason: String,
    },

    #[error("{ctx}: guest command '{program}' failed: {reason}")]
    GuestCommand {
        ctx: Ctx,
        program: String,
        exit_code: Option<i32>,
        stderr: Box<[u8]>,
        reason: String,
    },

    #[error("configuration error in {}: {key}: {reason}", .file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<input>".into()))]
    Config {
        file: Option<PathBuf>,
        key: String,
        reason: String,
    },

    #[error("invalid argument: {what}: {reason}")]
    InvalidArgument { what: String, reason: String },

    #[error("{ctx}: denied by policy: {reason}")]
    PolicyDenied { ctx: Ctx, reason: String },

    #[error("{ctx}: busy: {reason}")]
    Busy { ctx: Ctx, reason: String },

    #[error("{ctx}: I/O error on {}: {source}", .path.display())]
    Io {
        ctx: Ctx,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The caller cancelled the operation (dropped or cancelled a stream, a job's cancel
    /// token); what it had started in the guest was stopped.
    #[error("{ctx}: cancelled: {what}")]
    Cancelled { ctx: Ctx, what: String },

    #[error("{ctx}: {backend}: {message}")]
    Backend {
        ctx: Ctx,
        backend: String,
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
    NotFound = 1,
    InvalidState = 2,
    Timeout = 3,
    NotReady = 4,
    Auth = 5,
    PortInUse = 6,
    BackendUnavailable = 7,
    GuestCommand = 8,
    Config = 9,
    InvalidArgument = 10,
    PolicyDenied = 11,
    Busy = 12,
    Io = 13,
    Backend = 14,
    Cancelled = 15,
}

impl Error {
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

    pub fn invalid_arg(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what: what.into(),
            reason: reason.into(),
        }
    }

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

    pub fn io(ctx: Ctx, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            ctx,
            path: path.into(),
            source,
        }
    }

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
