//! The guest: programs, files, agent pings, shared folders.

use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{
    ExecOutput, ExecRequest, OutputChunk, OutputSink, OutputStream, SharedFolder, VmState,
};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virt::connect::Connect;

use super::*;

pub(super) async fn copy_to(
    be: &LibvirtBackend,
    vm: &VmName,
    host: &Path,
    guest: &str,
    _creds: Option<Credentials>,
    progress: crate::events::CopyProgress,
) -> Result<u64> {
    let ctx = Ctx::vm(format!("copy {} to {guest}", host.display()), vm);
    let mut f = tokio::fs::File::open(host)
        .await
        .map_err(|e| Error::io(ctx.clone(), host, e))?;
    let handle = be.open_guest_file(&ctx, vm, guest, "wb").await?;
    let mut total = 0u64;
    let mut buf = vec![0u8; be.opts.write_chunk];
    let res: Result<()> = async {
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| Error::io(ctx.clone(), host, e))?;
            if n == 0 {
                return Ok(());
            }
            let r = be
                .agent(
                    &ctx,
                    vm,
                    agent::file_write(handle, &buf[..n]),
                    be.opts.agent_timeout,
                )
                .await?;
            let written = agent::int_field(&r, "count").map_err(|m| agent_err(&ctx, m))?;
            if written as usize != n {
                return Err(agent_err(
                    &ctx,
                    format!("short write in guest: {written} of {n} bytes"),
                ));
            }
            total += n as u64;
            progress.report(total);
        }
    }
    .await;
    let closed = be
        .agent(&ctx, vm, agent::file_close(handle), be.opts.agent_timeout)
        .await;
    res?;
    closed?;
    Ok(total)
}

pub(super) async fn copy_from(
    be: &LibvirtBackend,
    vm: &VmName,
    guest: &str,
    host: &Path,
    _creds: Option<Credentials>,
    progress: crate::events::CopyProgress,
) -> Result<u64> {
    let ctx = Ctx::vm(format!("copy {guest} to {}", host.display()), vm);
    let handle = be.open_guest_file(&ctx, vm, guest, "rb").await?;
    let tmp = host.with_file_name(format!(
        ".{}.anyvm-part",
        host.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "copy".into())
    ));
    let res: Result<u64> = async {
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::io(ctx.clone(), &tmp, e))?;
        let mut total = 0u64;
        loop {
            let r = be
                .agent(
                    &ctx,
                    vm,
                    agent::file_read(handle, be.opts.read_chunk),
                    be.opts.agent_timeout,
                )
                .await?;
            let (data, eof) = agent::parse_read(&r).map_err(|m| agent_err(&ctx, m))?;
            f.write_all(&data)
                .await
                .map_err(|e| Error::io(ctx.clone(), &tmp, e))?;
            total += data.len() as u64;
            progress.report(total);
            if eof || data.is_empty() {
                break;
            }
        }
        f.flush()
            .await
            .map_err(|e| Error::io(ctx.clone(), &tmp, e))?;
        Ok(total)
    }
    .await;
    let closed = be
        .agent(&ctx, vm, agent::file_close(handle), be.opts.agent_timeout)
        .await;
    match res {
        Ok(n) => {
            closed?;
            tokio::fs::rename(&tmp, host)
                .await
                .map_err(|e| Error::io(ctx.clone(), host, e))?;
            Ok(n)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

pub(super) async fn read_file(
    be: &LibvirtBackend,
    vm: &VmName,
    guest: &str,
    limit: usize,
    _creds: Option<Credentials>,
) -> Result<Vec<u8>> {
    let ctx = Ctx::vm(format!("read {guest}"), vm);
    let handle = be.open_guest_file(&ctx, vm, guest, "r").await?;
    let mut out = Vec::new();
    let res: Result<()> = async {
        while out.len() < limit {
            let r = be
                .agent(
                    &ctx,
                    vm,
                    agent::file_read(handle, limit - out.len()),
                    be.opts.agent_timeout,
                )
                .await?;
            let (data, eof) = agent::parse_read(&r).map_err(|m| agent_err(&ctx, m))?;
            out.extend_from_slice(&data);
            if eof || data.is_empty() {
                break;
            }
        }
        Ok(())
    }
    .await;
    let _ = be
        .agent(&ctx, vm, agent::file_close(handle), be.opts.agent_timeout)
        .await;
    res.map(|_| out)
}

/// virtiofs shares are part of the definition (libvirt 9 cannot hot-plug them): the VM
/// must be off. Read-only ones are served through a read-only bind mount.
pub(super) async fn shared_folder_add(
    be: &LibvirtBackend,
    vm: &VmName,
    folder: &SharedFolder,
) -> Result<()> {
    let ctx = Ctx::vm(format!("shared folder add {}", folder.name), vm);
    let mut spec = be.stored_spec(&ctx, vm).await?;
    if spec.shares.iter().any(|s| s.name == folder.name) {
        return Err(Error::invalid_arg(
            format!("shared folder {:?}", folder.name),
            format!("vm '{vm}' already has a share with that name; remove it first"),
        ));
    }
    let state = be.state(vm).await?;
    if state != VmState::ShutOff {
        return Err(Error::InvalidState {
            ctx,
            state: state.to_string(),
            hint: Some("virtiofs shares are added while the VM is off; stop it first".into()),
        });
    }
    spec.shares.push(folder.clone());
    be.check_host_paths(&ctx, &spec).await?;
    be.redefine(&ctx, spec).await
}

pub(super) async fn shared_folder_remove(
    be: &LibvirtBackend,
    vm: &VmName,
    name: &str,
) -> Result<()> {
    let ctx = Ctx::vm(format!("shared folder remove {name}"), vm);
    let mut spec = be.stored_spec(&ctx, vm).await?;
    if !spec.shares.iter().any(|s| s.name == name) {
        return Err(Error::NotFound {
            ctx,
            what: format!("shared folder {name:?}"),
        });
    }
    let state = be.state(vm).await?;
    if state != VmState::ShutOff {
        return Err(Error::InvalidState {
            ctx,
            state: state.to_string(),
            hint: Some("virtiofs shares are removed while the VM is off; stop it first".into()),
        });
    }
    spec.shares.retain(|s| s.name != name);
    be.redefine(&ctx, spec).await?;
    be.release_shares(vm, [name.to_string()]);
    Ok(())
}

impl LibvirtBackend {
    /// `guest-file-open`, returning the agent's handle.
    async fn open_guest_file(&self, ctx: &Ctx, vm: &VmName, path: &str, mode: &str) -> Result<i64> {
        let reply = self
            .agent(
                ctx,
                vm,
                agent::file_open(path, mode),
                self.opts.agent_timeout,
            )
            .await?;
        reply
            .as_i64()
            .ok_or_else(|| agent_err(ctx, format!("guest-file-open returned {reply}")))
    }

    /// A guest program through the agent, its output captured by qemu-ga and returned at exit.
    pub(super) async fn exec_captured(&self, vm: &VmName, req: &ExecRequest) -> Result<ExecOutput> {
        let ctx = Ctx::vm(format!("exec {}", req.program), vm);
        if req.credentials.is_some() {
            tracing::debug!(vm = %vm, "libvirt runs guest programs through the agent as its user; credentials are not used");
        }
        let started = Instant::now();
        let deadline = started + req.timeout;
        let reply = self
            .agent(&ctx, vm, agent::exec(req), self.opts.agent_timeout)
            .await?;
        let pid = agent::int_field(&reply, "pid").map_err(|m| agent_err(&ctx, m))?;
        // Cancel-safety: if this future is dropped (a cancelled job, a timeout around the call),
        // the guest program is killed instead of running on unobserved.
        let mut guard = KillOnDrop {
            conn: Some(self.current_connection()),
            vm: vm.to_string(),
            pid,
            handles: Vec::new(),
            dir: None,
        };
        // Short programs finish in a few ms: poll fast at first, then back off.
        let mut delay = Duration::from_millis(1);
        loop {
            let st = self
                .agent(&ctx, vm, agent::exec_status(pid), self.opts.agent_timeout)
                .await?;
            if let Some(s) = agent::parse_exec_status(&st).map_err(|m| agent_err(&ctx, m))? {
                guard.disarm();
                return Ok(ExecOutput {
                    exit_code: s.exit_code,
                    signal: s.signal,
                    stdout: s.stdout,
                    stderr: s.stderr,
                    duration: started.elapsed(),
                    stdout_truncated: s.stdout_truncated,
                    stderr_truncated: s.stderr_truncated,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                guard.disarm();
                return Err(self.kill_timed_out(&ctx, vm, pid, req).await);
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Kill a guest program that outlived its request's timeout; the error to report.
    async fn kill_timed_out(&self, ctx: &Ctx, vm: &VmName, pid: i64, req: &ExecRequest) -> Error {
        if let Err(e) = self
            .agent(ctx, vm, agent::kill(pid), self.opts.agent_timeout)
            .await
        {
            tracing::warn!(vm = %vm, pid, error = %e, "could not kill timed-out guest program");
        }
        Error::Timeout {
            ctx: ctx.clone(),
            after: Some(req.timeout),
            what: format!("'{}' to exit (killed guest pid {pid})", req.display_argv()),
        }
    }

    /// A guest program whose output is sent as it is written. qemu-ga returns output only at
    /// exit, so the program writes to two files in a private guest directory that are tailed
    /// with `guest-file-read`, polling faster while output flows.
    pub(super) async fn exec_streamed(
        &self,
        vm: &VmName,
        req: &ExecRequest,
        sink: OutputSink,
    ) -> Result<ExecOutput> {
        let ctx = Ctx::vm(format!("exec {}", req.program), vm);
        let started = Instant::now();
        let deadline = started + req.timeout;
        let mk = self
            .exec_captured(
                vm,
                &ExecRequest::new("mktemp")
                    .arg("-d")
                    .arg("/tmp/anyvm-exec.XXXXXXXX")
                    .timeout(self.opts.agent_timeout),
            )
            .await?;
        let dir = mk.stdout_str().trim().to_string();
        if !mk.success() || !dir.starts_with("/tmp/anyvm-exec.") {
            return Err(agent_err(
                &ctx,
                format!(
                    "could not make a guest directory for the output: {}",
                    mk.stderr_str().trim()
                ),
            ));
        }
        // From here on, a dropped or failed call removes what it made in the guest.
        let mut guard = KillOnDrop {
            conn: Some(self.current_connection()),
            vm: vm.to_string(),
            pid: 0,
            handles: Vec::new(),
            dir: Some(dir.clone()),
        };
        // "a+" creates the files before the program does, and reads from their start.
        for name in ["out", "err"] {
            let h = self
                .open_guest_file(&ctx, vm, &format!("{dir}/{name}"), "a+")
                .await?;
            guard.handles.push(h);
        }
        let reply = self
            .agent(
                &ctx,
                vm,
                agent::exec_to_files(req, &dir),
                self.opts.agent_timeout,
            )
            .await?;
        guard.pid = agent::int_field(&reply, "pid").map_err(|m| agent_err(&ctx, m))?;
        let pid = guard.pid;
        let mut tails = [
            (guard.handles[0], OutputStream::Stdout, 0u64),
            (guard.handles[1], OutputStream::Stderr, 0u64),
        ];
        let mut delay = Duration::from_millis(1);
        loop {
            let st = self
                .agent(&ctx, vm, agent::exec_status(pid), self.opts.agent_timeout)
                .await?;
            let exited = agent::parse_exec_status(&st).map_err(|m| agent_err(&ctx, m))?;
            let mut got = false;
            for t in &mut tails {
                // After exit, read each file to its end; before, one chunk per poll.
                while self.read_tail(&ctx, vm, t, &sink).await? {
                    got = true;
                    if exited.is_none() {
                        break;
                    }
                }
            }
            if let Some(s) = exited {
                self.clean_up_exec(&ctx, vm, &mut guard).await;
                return Ok(ExecOutput {
                    exit_code: s.exit_code,
                    signal: s.signal,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                    duration: started.elapsed(),
                    stdout_truncated: false,
                    stderr_truncated: false,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let e = self.kill_timed_out(&ctx, vm, pid, req).await;
                guard.pid = 0;
                self.clean_up_exec(&ctx, vm, &mut guard).await;
                return Err(e);
            }
            if got {
                delay = Duration::from_millis(1);
            } else {
                tokio::time::sleep(delay.min(deadline - now)).await;
                delay = (delay * 2).min(Duration::from_millis(100));
            }
        }
    }

    /// Read what was appended to one tailed file since the last read and send it; true when
    /// there was something.
    async fn read_tail(
        &self,
        ctx: &Ctx,
        vm: &VmName,
        (handle, stream, offset): &mut (i64, OutputStream, u64),
        sink: &OutputSink,
    ) -> Result<bool> {
        let r = self
            .agent(
                ctx,
                vm,
                agent::file_read(*handle, self.opts.read_chunk),
                self.opts.agent_timeout,
            )
            .await?;
        let (data, eof) = agent::parse_read(&r).map_err(|m| agent_err(ctx, m))?;
        *offset += data.len() as u64;
        if eof {
            // The file may grow again: clear the end-of-file state where we stand.
            self.agent(
                ctx,
                vm,
                agent::file_seek(*handle, *offset),
                self.opts.agent_timeout,
            )
            .await?;
        }
        if data.is_empty() {
            return Ok(false);
        }
        let _ = sink
            .send(OutputChunk {
                stream: *stream,
                data,
            })
            .await;
        Ok(true)
    }

    /// Close a finished streamed exec's files and remove its guest directory, here rather
    /// than on the guard's thread.
    async fn clean_up_exec(&self, ctx: &Ctx, vm: &VmName, guard: &mut KillOnDrop) {
        for h in std::mem::take(&mut guard.handles) {
            let _ = self
                .agent(ctx, vm, agent::file_close(h), self.opts.agent_timeout)
                .await;
        }
        if let Some(dir) = guard.dir.take() {
            let _ = self
                .agent(
                    ctx,
                    vm,
                    agent::spawn("rm", &["-rf", "--", &dir]),
                    self.opts.agent_timeout,
                )
                .await;
        }
        guard.disarm();
    }
}

/// Kills a guest program started through the agent when the exec that watches it is dropped
/// before the program ended. Runs on its own thread: Drop cannot await, and libvirt blocks.
struct KillOnDrop {
    conn: Option<Arc<Connect>>,
    vm: String,
    /// 0 before the program started.
    pid: i64,
    /// Agent file handles to close.
    handles: Vec<i64>,
    /// A guest directory of anyvm's to remove.
    dir: Option<String>,
}

impl KillOnDrop {
    fn disarm(&mut self) {
        self.conn = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let (vm, pid) = (self.vm.clone(), self.pid);
        let handles = std::mem::take(&mut self.handles);
        let dir = self.dir.take();
        crate::util::cleanup::spawn("anyvm-exec-kill", move || {
            let Ok(d) = conn.lookup_domain_by_name(&vm) else {
                return;
            };
            if pid > 0 {
                match d.qemu_agent_command(&agent::kill(pid), 5, 0) {
                    Ok(_) => tracing::debug!(vm = %vm, pid, "exec dropped: guest program killed"),
                    Err(e) => {
                        tracing::warn!(vm = %vm, pid, error = %e, "exec dropped: could not kill the guest program")
                    }
                }
            }
            for h in handles {
                let _ = d.qemu_agent_command(&agent::file_close(h), 5, 0);
            }
            if let Some(dir) = dir {
                let _ = d.qemu_agent_command(&agent::spawn("rm", &["-rf", "--", &dir]), 5, 0);
            }
        });
    }
}
