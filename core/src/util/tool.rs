//! The hardened runner for hypervisor command-line tools (VBoxManage, vmrun, ssh): finds the binary,
//! runs argv vectors under a deadline (killing the process group on expiry, see
//! [`crate::util::command`]), and counts invocations per subcommand, because each real call
//! costs 0.1-1 s and the count is what to optimize.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Ctx, Error, Result};
use crate::util::command::{ToolCommand, ToolOutput};

/// Locate a tool: the configured path, then `env_var`, then `PATH`.
pub fn resolve_binary(name: &str, configured: Option<&Path>, env_var: &str) -> Result<PathBuf> {
    let unavailable = |reason: String| Error::BackendUnavailable {
        ctx: Ctx::new(format!("find {name}")),
        backend: name.to_string(),
        reason,
    };
    let check = |p: PathBuf, from: &str| -> Result<PathBuf> {
        if is_executable(&p) {
            Ok(p)
        } else {
            Err(unavailable(format!(
                "{} (from {from}) is not an executable file",
                p.display()
            )))
        }
    };
    if let Some(p) = configured {
        return check(p.to_path_buf(), "the configuration");
    }
    if let Some(p) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        return check(PathBuf::from(p), env_var);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| unavailable(format!("{name} is not on PATH; install it, or set {env_var} or the path in the configuration")))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// One tool binary with a default deadline and an invocation counter.
#[derive(Debug)]
pub struct ToolRunner {
    pub program: PathBuf,
    pub timeout: Duration,
    /// Extra environment for every call (e.g. VBOX_USER_HOME).
    pub env: Vec<(String, String)>,
    calls: Mutex<BTreeMap<String, u64>>,
}

impl ToolRunner {
    pub fn new(program: PathBuf, timeout: Duration) -> Self {
        ToolRunner {
            program,
            timeout,
            env: Vec::new(),
            calls: Mutex::new(BTreeMap::new()),
        }
    }

    /// Run `args`; `display` names the call in errors and must hold no secret.
    pub async fn run(
        &self,
        ctx: &Ctx,
        args: Vec<OsString>,
        stdin: Option<Vec<u8>>,
        timeout: Option<Duration>,
        display: String,
    ) -> Result<ToolOutput> {
        self.run_into(ctx, args, stdin, timeout, display, None)
            .await
    }

    /// [`ToolRunner::run`] forwarding output to `sink` as it is read (guest programs run by the
    /// tool); the returned output keeps only the tail of each stream.
    pub async fn run_into(
        &self,
        ctx: &Ctx,
        args: Vec<OsString>,
        stdin: Option<Vec<u8>>,
        timeout: Option<Duration>,
        display: String,
        sink: Option<crate::types::OutputSink>,
    ) -> Result<ToolOutput> {
        let key = args
            .iter()
            .find(|a| !a.to_string_lossy().starts_with('-'))
            .map(|a| a.to_string_lossy().into_owned());
        *self
            .calls
            .lock()
            .expect("calls lock")
            .entry(key.unwrap_or_default())
            .or_default() += 1;
        let mut cmd = ToolCommand::new(&self.program, args, timeout.unwrap_or(self.timeout));
        cmd.stdin = stdin;
        cmd.display = display;
        cmd.env = self.env.clone();
        cmd.sink = sink;
        tracing::debug!(tool = %self.program.display(), call = %cmd.display, "running");
        cmd.run(ctx).await
    }

    /// Invocations so far, by subcommand.
    pub fn invocations(&self) -> BTreeMap<String, u64> {
        self.calls.lock().expect("calls lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_order_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("FakeTool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_binary("FakeTool", Some(&tool), "ANYVM_TEST_NO_SUCH_VAR").unwrap(),
            tool
        );
        let e = resolve_binary("FakeTool", Some(Path::new("/nonexistent/x")), "V").unwrap_err();
        assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
        let e = resolve_binary("NoSuchToolAnyvm", None, "ANYVM_TEST_NO_SUCH_VAR").unwrap_err();
        assert!(
            e.to_string().contains("not on PATH")
                && e.to_string().contains("ANYVM_TEST_NO_SUCH_VAR"),
            "{e}"
        );
    }
}
