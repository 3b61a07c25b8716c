//! Guest programs and files: exec under the policy and the chosen channel, file copies.

use super::*;
use std::sync::Mutex;

use crate::events::{CopyDirection, CopyProgress, CopyReporter, ProgressFn};
use crate::types::OutputSink;

impl Vm {
    /// Run a guest program under the handle's policy and channel and collect its output at the
    /// end. A non-zero exit is a result, not an error ([`Vm::exec_checked`] makes it one).
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_as("exec", req, true, None).await
    }

    /// Exec for anyvm's own probes (resource checks, mounts): audited under `op`, not subject
    /// to the exec allowlist, which governs what users run.
    pub(crate) async fn exec_internal(&self, op: &str, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_as(op, req, false, None).await
    }

    pub(super) async fn exec_as(
        &self,
        op: &str,
        req: &ExecRequest,
        allowlist: bool,
        sink: Option<OutputSink>,
    ) -> Result<ExecOutput> {
        self.audited(op, exec_audit_args(req), async move {
            self.check_exec(op, req, allowlist)?;
            let mut r = req.clone();
            if r.credentials.is_none() {
                r.credentials = self.credentials.clone();
            }
            let out = match (self.channel, sink) {
                (GuestChannel::Tools, None) => self.backend.exec(&self.name, &r).await?,
                (GuestChannel::Tools, Some(sink)) => {
                    self.backend.exec_streaming(&self.name, &r, sink).await?
                }
                (GuestChannel::Ssh { port }, sink) => {
                    self.ssh_target_for(port, r.credentials.as_ref())
                        .await?
                        .exec_into(&r, sink)
                        .await?
                }
            };
            if out.stdout_truncated || out.stderr_truncated {
                tracing::warn!(vm = %self.name, program = %req.program, "guest output was truncated by the backend's capture limit");
            }
            Ok(out)
        })
        .await
    }

    /// The request is well-formed and the policy allows it (the allowlist only for users'
    /// programs, not anyvm's own probes).
    pub(super) fn check_exec(&self, op: &str, req: &ExecRequest, allowlist: bool) -> Result<()> {
        req.validate()?;
        if allowlist {
            self.check_exec_policy(req)
        } else {
            self.check_argv_secrets(
                &self.ctx(op),
                req.credentials.as_ref().or(self.credentials.as_ref()),
            )
        }
    }

    /// Run and require exit code 0.
    pub async fn exec_checked(&self, req: &ExecRequest) -> Result<ExecOutput> {
        let out = self.exec(req).await?;
        if out.success() {
            return Ok(out);
        }
        Err(crate::types::guest_command_error(
            self.name.as_str(),
            &req.program,
            out.exit_code,
            out.signal,
            &out.stderr,
        ))
    }

    /// Copy a host file into the guest; returns the bytes copied.
    pub async fn copy_to(&self, host: impl AsRef<Path>, guest: &str) -> Result<u64> {
        self.copy_to_inner(host.as_ref(), guest, None).await
    }

    /// [`Vm::copy_to`], calling `progress(done, total)` as the copy moves (per chunk on the
    /// libvirt agent, at the end on channels that copy a file whole) and reporting to the
    /// client's event stream.
    pub async fn copy_to_with(
        &self,
        host: impl AsRef<Path>,
        guest: &str,
        progress: impl Fn(u64, Option<u64>) + Send + Sync + 'static,
    ) -> Result<u64> {
        self.copy_to_inner(host.as_ref(), guest, Some(Arc::new(progress)))
            .await
    }

    /// Copy a guest file to the host; returns the bytes copied. The host file appears whole
    /// or not at all.
    pub async fn copy_from(&self, guest: &str, host: impl AsRef<Path>) -> Result<u64> {
        self.copy_from_inner(guest, host.as_ref(), None).await
    }

    /// [`Vm::copy_from`] with progress, as [`Vm::copy_to_with`].
    pub async fn copy_from_with(
        &self,
        guest: &str,
        host: impl AsRef<Path>,
        progress: impl Fn(u64, Option<u64>) + Send + Sync + 'static,
    ) -> Result<u64> {
        self.copy_from_inner(guest, host.as_ref(), Some(Arc::new(progress)))
            .await
    }

    /// A reporter for one copy, and the backend's side of it.
    fn copy_reporter(
        &self,
        direction: CopyDirection,
        guest: &str,
        host: &Path,
        total: Option<u64>,
        callback: Option<ProgressFn>,
    ) -> (Arc<Mutex<CopyReporter>>, CopyProgress) {
        let r = Arc::new(Mutex::new(CopyReporter::new(
            self.events.clone(),
            self.name.as_str(),
            direction,
            guest,
            host.to_path_buf(),
            total,
            callback,
        )));
        let r2 = r.clone();
        let p = CopyProgress::new(move |done| r2.lock().expect("reporter").progress(done));
        (r, p)
    }

    async fn copy_to_inner(
        &self,
        host: &Path,
        guest: &str,
        callback: Option<ProgressFn>,
    ) -> Result<u64> {
        let args = json!({"host": host.display().to_string(), "guest": guest});
        self.audited("copy_to", args, async move {
            let meta = std::fs::metadata(host).ok().filter(|m| m.is_file());
            let Some(meta) = meta else {
                return Err(Error::NotFound {
                    ctx: self.ctx("copy_to"),
                    what: format!("host file {}", host.display()),
                });
            };
            check_guest_path(guest)?;
            let (rep, progress) = self.copy_reporter(
                CopyDirection::ToGuest,
                guest,
                host,
                Some(meta.len()),
                callback,
            );
            let r = match self.channel {
                GuestChannel::Tools => {
                    self.backend
                        .copy_to(&self.name, host, guest, self.credentials.clone(), progress)
                        .await
                }
                GuestChannel::Ssh { port } => {
                    self.ssh_target(port)
                        .await?
                        .upload(host, guest, COPY_TIMEOUT)
                        .await
                }
            };
            if let Ok(n) = &r {
                rep.lock().expect("reporter").finish(*n);
            }
            r
        })
        .await
    }

    async fn copy_from_inner(
        &self,
        guest: &str,
        host: &Path,
        callback: Option<ProgressFn>,
    ) -> Result<u64> {
        let args = json!({"guest": guest, "host": host.display().to_string()});
        self.audited("copy_from", args, async move {
            check_guest_path(guest)?;
            let (rep, progress) =
                self.copy_reporter(CopyDirection::FromGuest, guest, host, None, callback);
            let r = match self.channel {
                GuestChannel::Tools => {
                    self.backend
                        .copy_from(&self.name, guest, host, self.credentials.clone(), progress)
                        .await
                }
                GuestChannel::Ssh { port } => {
                    self.ssh_target(port)
                        .await?
                        .download(guest, host, COPY_TIMEOUT)
                        .await
                }
            };
            if let Ok(n) = &r {
                rep.lock().expect("reporter").finish(*n);
            }
            r
        })
        .await
    }

    /// A small guest file, through whichever channel this handle uses.
    pub(crate) async fn read_guest_file(&self, guest: &str, limit: usize) -> Result<Vec<u8>> {
        match self.channel {
            GuestChannel::Tools => {
                self.backend
                    .read_file(&self.name, guest, limit, self.credentials.clone())
                    .await
            }
            GuestChannel::Ssh { .. } => {
                let ctx = self.ctx(&format!("read {guest}"));
                crate::backend::read_by_copy(&ctx, limit, |p| async move {
                    self.copy_from(guest, p).await
                })
                .await
            }
        }
    }
}

/// What the audit log records of an exec: argv, directory and the names (not values) of the
/// environment.
pub(super) fn exec_audit_args(req: &ExecRequest) -> serde_json::Value {
    json!({
        "argv": std::iter::once(&req.program).chain(&req.args).collect::<Vec<_>>(),
        "cwd": req.cwd,
        "env_keys": req.env.keys().collect::<Vec<_>>(),
    })
}
