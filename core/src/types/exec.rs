//! Guest programs: the request, what it produced, how it reaches the guest.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::credentials::Credentials;
use crate::error::{Error, Result};

/// The error for a guest program that did not exit 0, as [`crate::Vm::exec_checked`] raises it
/// (also what the bindings' `check()` raise): VM, program, exit code or signal, its stderr.
pub fn guest_command_error(
    vm: &str,
    program: &str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    stderr: &[u8],
) -> crate::error::Error {
    crate::error::Error::GuestCommand {
        ctx: crate::error::Ctx::vm("exec", vm),
        program: program.to_string(),
        exit_code,
        reason: match (exit_code, signal) {
            (Some(c), _) => {
                let tail: String = String::from_utf8_lossy(stderr)
                    .trim()
                    .chars()
                    .take(500)
                    .collect();
                if tail.is_empty() {
                    format!("exit code {c} (no stderr)")
                } else {
                    format!("exit code {c}: {tail}")
                }
            }
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "no exit status".into(),
        },
        stderr: stderr.to_vec().into_boxed_slice(),
    }
}

/// How exec and file copy reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestChannel {
    /// The hypervisor's guest tools: QEMU guest agent, Guest Additions, VMware Tools.
    #[default]
    Tools,
    /// OpenSSH with the credentials' key, to sshd on `port` in the guest (through its forward,
    /// or at the guest's address). For sites whose policy forbids passwords on command lines.
    Ssh {
        /// The guest's sshd port (its forward is used).
        port: u16,
    },
}

/// A program to run in the guest. Build with [`ExecRequest::new`] and the chained setters.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// The program (looked up on the guest's PATH).
    pub program: String,
    /// Its arguments; no shell is involved.
    pub args: Vec<String>,
    /// Environment variables for it.
    pub env: BTreeMap<String, String>,
    /// The guest directory it runs in.
    pub cwd: Option<String>,
    /// Bytes fed to its standard input.
    pub stdin: Option<Vec<u8>>,
    /// Kill it after this long.
    pub timeout: Duration,
    /// The guest account (default: the VM handle's).
    pub credentials: Option<Credentials>,
}

impl ExecRequest {
    /// A request to run `program` with no arguments, a 300 s timeout.
    pub fn new(program: impl Into<String>) -> Self {
        ExecRequest {
            program: program.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout: Duration::from_secs(300),
            credentials: None,
        }
    }
    /// First element is the program, the rest are its arguments.
    pub fn from_argv<S: AsRef<str>>(argv: &[S]) -> Result<Self> {
        let (first, rest) = argv
            .split_first()
            .ok_or_else(|| Error::invalid_arg("argv", "must name a program"))?;
        Ok(ExecRequest::new(first.as_ref()).args(rest.iter().map(|s| s.as_ref().to_string())))
    }
    /// Append one argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// Append arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    /// Set an environment variable.
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }
    /// Run in this guest directory.
    pub fn cwd(mut self, d: impl Into<String>) -> Self {
        self.cwd = Some(d.into());
        self
    }
    /// Feed these bytes to standard input.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }
    /// Kill the program after `t`.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Run as this guest account.
    pub fn credentials(mut self, c: Credentials) -> Self {
        self.credentials = Some(c);
        self
    }

    /// Check the request: a program, no NUL bytes, valid env names, a positive timeout.
    pub fn validate(&self) -> Result<()> {
        if self.program.is_empty() {
            return Err(Error::invalid_arg("exec program", "must not be empty"));
        }
        let nul = |s: &str| s.contains('\0');
        if nul(&self.program) || self.args.iter().any(|a| nul(a)) {
            return Err(Error::invalid_arg(
                "exec argv",
                "NUL bytes cannot be passed to a guest program",
            ));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || nul(k) {
                return Err(Error::invalid_arg(
                    format!("exec env {k:?}"),
                    "names must be non-empty without '=' or NUL",
                ));
            }
        }
        if self.timeout.is_zero() {
            return Err(Error::invalid_arg(
                "exec timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }

    /// The command line for messages; arguments are shown, secrets never are part of it.
    pub fn display_argv(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a guest program produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecOutput {
    /// Exit code, or None when the program was killed by a signal.
    pub exit_code: Option<i32>,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// Its standard output.
    #[serde(with = "lossy_bytes")]
    pub stdout: Vec<u8>,
    /// Its standard error.
    #[serde(with = "lossy_bytes")]
    pub stderr: Vec<u8>,
    /// How long it ran.
    #[serde(with = "duration_secs")]
    pub duration: Duration,
    /// The backend's capture limit was hit: output is incomplete.
    pub stdout_truncated: bool,
    /// The backend's capture limit was hit on stderr.
    pub stderr_truncated: bool,
}

impl ExecOutput {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
    /// Standard output as text (lossy UTF-8).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Standard error as text (lossy UTF-8).
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Which of a guest program's outputs a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// The program's standard output.
    Stdout,
    /// The program's standard error.
    Stderr,
}

impl OutputStream {
    /// `"stdout"` or `"stderr"`, as the bindings name them.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// Bytes a guest program wrote, in the order they arrived on one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// The stream they were written to.
    pub stream: OutputStream,
    /// The bytes, never empty.
    pub data: Vec<u8>,
}

/// Where a streaming exec sends output as it arrives. Bounded, so a slow reader slows the
/// reading instead of growing memory; a closed receiver only drops what would have gone to it.
pub type OutputSink = tokio::sync::mpsc::Sender<OutputChunk>;

/// Send a finished program's buffered output to `sink` (stdout first), leaving `out` empty:
/// the streaming path of channels that only return output at exit (vmrun).
pub(crate) async fn send_buffered(sink: &OutputSink, out: &mut ExecOutput) {
    for (stream, data) in [
        (OutputStream::Stdout, std::mem::take(&mut out.stdout)),
        (OutputStream::Stderr, std::mem::take(&mut out.stderr)),
    ] {
        if !data.is_empty() {
            let _ = sink.send(OutputChunk { stream, data }).await;
        }
    }
}

mod lossy_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(b))
    }
}

mod duration_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}
