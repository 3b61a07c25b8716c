//! libvirt backend (QEMU/KVM, local or remote URIs) through the official `virt` bindings.
//!
//! libvirt calls block, so each runs on tokio's blocking pool under a deadline. Guest exec and
//! file transfer go through the QEMU guest agent; forwards are QEMU user-network `hostfwd` rules,
//! changed at runtime through the monitor and persisted in the definition; readiness is woken by
//! libvirt's agent-lifecycle event.

mod agent;
mod doctor;
mod domain_xml;
mod events;
pub mod host;

/// Make `target` a read-only bind mount of `source` (what read-only shares are served from).
pub use crate::util::bindmount::ensure_readonly as ensure_readonly_mount;

use host::HypervisorHost;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

use super::{Backend, VmEvent};
use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{
    DiskFormat, ExecOutput, ExecRequest, ForwardSpec, HostPort, OutputChunk, OutputSink,
    OutputStream, PortForward, SharedFolder, SnapshotInfo, VmInfo, VmSpec, VmState,
};

const ID: &str = "libvirt";

/// Deadlines and places the libvirt backend uses.
#[derive(Debug, Clone)]
pub struct LibvirtOptions {
    /// Where clone overlays and exported snapshot bases are written.
    pub images_dir: PathBuf,
    /// Where serial console logs go (on the libvirt host).
    pub console_dir: PathBuf,
    /// Bound on any single libvirt call.
    pub call_timeout: Duration,
    /// Bound on a single guest-agent command.
    pub agent_timeout: Duration,
    /// Bound on qemu-img (exports copy whole disks).
    pub qemu_img_timeout: Duration,
    /// Bytes per guest-file-write. qemu-ga stops answering on requests much above 200 KB
    /// (seen with QEMU 7.2's agent), so writes go in small pieces.
    pub write_chunk: usize,
    /// Bytes per guest-file-read.
    pub read_chunk: usize,
    /// Read-only bind mounts of read-only shares, one folder per VM.
    pub shares_dir: PathBuf,
    /// vhost-user filesystem daemon for shares.
    pub virtiofsd: PathBuf,
    /// busybox (its `nc`) relays a restricted guest's allowed connections.
    pub relay: PathBuf,
}

/// Where Debian/Ubuntu (QEMU ≤ 7) and Fedora/newer distributions put virtiofsd.
fn find_virtiofsd() -> PathBuf {
    [
        "/usr/lib/qemu/virtiofsd",
        "/usr/libexec/virtiofsd",
        "/usr/lib/virtiofsd",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| "/usr/libexec/virtiofsd".into())
}

impl Default for LibvirtOptions {
    fn default() -> Self {
        let base = crate::paths::default_state_dir();
        LibvirtOptions {
            images_dir: base.join("images"),
            console_dir: base.join("console"),
            call_timeout: Duration::from_secs(60),
            agent_timeout: Duration::from_secs(10),
            qemu_img_timeout: Duration::from_secs(600),
            write_chunk: 96 * 1024,
            read_chunk: 1024 * 1024,
            shares_dir: base.join("shares"),
            virtiofsd: find_virtiofsd(),
            relay: ["/bin/busybox", "/usr/bin/busybox"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .unwrap_or_else(|| "/bin/busybox".into()),
        }
    }
}

#[derive(Clone)]
pub struct LibvirtBackend {
    uri: String,
    conn: Arc<Connect>,
    events: broadcast::Sender<VmEvent>,
    opts: LibvirtOptions,
    host: HypervisorHost,
}

impl std::fmt::Debug for LibvirtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtBackend")
            .field("uri", &self.uri)
            .finish()
    }
}

fn map_err(ctx: &Ctx, e: virt::error::Error) -> Error {
    let msg = e.message().to_string();
    let known = |n: ErrorNumber| e.code() == virt::error::ErrorNumberEnum::Known(n);
    if known(ErrorNumber::NoDomain) {
        Error::NotFound {
            ctx: ctx.clone(),
            what: "no such domain".into(),
        }
    } else if known(ErrorNumber::NoDomainSnapshot) {
        Error::NotFound {
            ctx: ctx.clone(),
            what: format!("snapshot ({msg})"),
        }
    } else if known(ErrorNumber::OperationInvalid) {
        Error::InvalidState {
            ctx: ctx.clone(),
            state: msg,
            hint: None,
        }
    } else if known(ErrorNumber::AgentUnresponsive) || known(ErrorNumber::AgentUnsynced) {
        Error::NotReady {
            ctx: ctx.clone(),
            after: Duration::ZERO,
            probe: "agent".into(),
            last_error: format!("{msg}; is qemu-guest-agent running in the guest?"),
        }
    } else if known(ErrorNumber::OperationTimeout) {
        Error::Timeout {
            ctx: ctx.clone(),
            after: Duration::ZERO,
            what: msg,
        }
    } else if known(ErrorNumber::AuthFailed) {
        Error::Auth {
            ctx: ctx.clone(),
            reason: msg,
        }
    } else if known(ErrorNumber::NoConnect) || known(ErrorNumber::SystemError) {
        Error::BackendUnavailable {
            ctx: ctx.clone(),
            backend: ID.into(),
            reason: msg,
        }
    } else if known(ErrorNumber::ResourceBusy) {
        Error::Busy {
            ctx: ctx.clone(),
            reason: msg,
        }
    } else if msg.contains("No such file or directory") {
        Error::NotFound {
            ctx: ctx.clone(),
            what: msg,
        }
    } else {
        Error::backend(ctx.clone(), ID, msg)
    }
}

fn agent_err(ctx: &Ctx, msg: String) -> Error {
    Error::backend(ctx.clone(), "qemu-guest-agent", msg)
}

impl LibvirtBackend {
    /// Remove the frozen bases of `vm` (of one snapshot, when given) once no clone of it is
    /// left; they exist only to be shared by its clones.
    async fn remove_frozen(&self, ctx: &Ctx, vm: &VmName, snapshot: Option<&str>) {
        let links = match self.clone_links().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(vm = %vm, error = %e, "cannot read the clone graph; frozen bases kept");
                return;
            }
        };
        if !crate::types::dependants_of(&links, vm.as_str(), snapshot).is_empty() {
            return;
        }
        let files = match self.host.list_dir(ctx, &self.opts.images_dir).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(vm = %vm, error = %e, "cannot list the images dir");
                return;
            }
        };
        for f in files
            .iter()
            .filter(|f| is_frozen_of(f, vm.as_str(), snapshot))
        {
            let p = self.opts.images_dir.join(f);
            if let Err(e) = self.host.remove_file(ctx, &p).await {
                tracing::warn!(vm = %vm, path = %p.display(), error = %e, "could not remove a frozen base");
            }
        }
    }

    /// Connect to `uri` (e.g. `qemu:///system`, `qemu+ssh://user@host/system`).
    pub async fn open(uri: &str, opts: LibvirtOptions) -> Result<Self> {
        let ctx = Ctx::new(format!("connect to {uri}"));
        events::ensure_event_loop().map_err(|reason| Error::BackendUnavailable {
            ctx: ctx.clone(),
            backend: ID.into(),
            reason: format!("cannot start the libvirt event loop: {reason}"),
        })?;
        let u = uri.to_string();
        let call = tokio::task::spawn_blocking(move || Connect::open(Some(&u)));
        let conn = match tokio::time::timeout(opts.call_timeout, call).await {
            Err(_) => {
                return Err(Error::Timeout {
                    ctx,
                    after: opts.call_timeout,
                    what: "libvirtd to answer".into(),
                })
            }
            Ok(Err(join)) => return Err(Error::backend(ctx, ID, join.to_string())),
            Ok(Ok(Err(e))) => {
                return Err(Error::BackendUnavailable {
                    ctx,
                    backend: ID.into(),
                    reason: format!(
                        "{}; is libvirtd running (scripts/setup-host.sh)?",
                        e.message()
                    ),
                })
            }
            Ok(Ok(Ok(c))) => c,
        };
        // Keepalive turns a dead or hung libvirtd into errors instead of hangs.
        let _ = conn.set_keep_alive(5, 3);
        let (tx, _) = broadcast::channel(256);
        if let Err(e) = events::register(&conn, &tx) {
            tracing::warn!(error = %e, "libvirt events unavailable; readiness falls back to polling");
        }
        Ok(LibvirtBackend {
            uri: uri.to_string(),
            conn: Arc::new(conn),
            events: tx,
            opts,
            host: HypervisorHost::for_uri(uri),
        })
    }

    pub fn options(&self) -> &LibvirtOptions {
        &self.opts
    }

    /// Run a blocking libvirt call under the call deadline.
    async fn call<T, F>(&self, ctx: &Ctx, timeout: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let task = tokio::task::spawn_blocking(move || f(&conn));
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(Error::backend(
                ctx.clone(),
                ID,
                format!("libvirt call panicked: {join}"),
            )),
            Err(_) => Err(Error::Timeout {
                ctx: ctx.clone(),
                after: timeout,
                what: "libvirt to answer".into(),
            }),
        }
    }

    /// Look up the domain and run `f` on it.
    async fn dom<T, F>(&self, ctx: &Ctx, vm: &VmName, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Domain, &Ctx) -> Result<T> + Send + 'static,
    {
        let name = vm.to_string();
        let c = ctx.clone();
        self.call(ctx, self.opts.call_timeout, move |conn| {
            let d = conn
                .lookup_domain_by_name(&name)
                .map_err(|e| map_err(&c, e))?;
            f(&d, &c)
        })
        .await
    }

    /// One guest-agent command; returns the reply's `return` value.
    async fn agent(
        &self,
        ctx: &Ctx,
        vm: &VmName,
        cmd: String,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let reply = self
            .call(ctx, timeout + Duration::from_secs(2), {
                let name = vm.to_string();
                let c = ctx.clone();
                move |conn| {
                    let d = conn
                        .lookup_domain_by_name(&name)
                        .map_err(|e| map_err(&c, e))?;
                    d.qemu_agent_command(&cmd, secs, 0)
                        .map_err(|e| map_err(&c, e))
                }
            })
            .await?;
        agent::ret(&reply).map_err(|m| agent_err(ctx, m))
    }

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
    async fn exec_captured(&self, vm: &VmName, req: &ExecRequest) -> Result<ExecOutput> {
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
            conn: Some(self.conn.clone()),
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
            after: req.timeout,
            what: format!("'{}' to exit (killed guest pid {pid})", req.display_argv()),
        }
    }

    /// A guest program whose output is sent as it is written. qemu-ga returns output only at
    /// exit, so the program writes to two files in a private guest directory that are tailed
    /// with `guest-file-read`, polling faster while output flows.
    async fn exec_streamed(
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
            conn: Some(self.conn.clone()),
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

    fn console_path(&self, vm: &VmName) -> PathBuf {
        self.opts.console_dir.join(format!("{vm}.log"))
    }

    fn is_local(&self) -> bool {
        self.host.is_local()
    }

    async fn stored_spec(&self, ctx: &Ctx, vm: &VmName) -> Result<VmSpec> {
        self.spec(vm).await?.ok_or_else(|| Error::InvalidState {
            ctx: ctx.clone(),
            state: "not defined by anyvm".into(),
            hint: Some("only VMs defined through anyvm carry the spec this needs".into()),
        })
    }

    /// Rewrite the persistent definition from `spec`, keeping the domain's UUID.
    async fn redefine(&self, ctx: &Ctx, spec: VmSpec) -> Result<()> {
        let log = self.console_path(&spec.name);
        let ro = self.ro_mounts(&spec.name);
        let host = self.clone();
        let name = spec.name.to_string();
        self.call(ctx, self.opts.call_timeout, {
            let c = ctx.clone();
            move |conn| {
                let d = conn
                    .lookup_domain_by_name(&name)
                    .map_err(|e| map_err(&c, e))?;
                let uuid = d.uuid_string().map_err(|e| map_err(&c, e))?;
                let xml = domain_xml::domain_xml(&spec, Some(&uuid), &host.host_side(&log, &ro));
                conn.define_domain_xml(&xml)
                    .map(|_| ())
                    .map_err(|e| map_err(&c, e))
            }
        })
        .await
    }

    async fn monitor(&self, ctx: &Ctx, vm: &VmName, cmd: String) -> Result<String> {
        self.dom(ctx, vm, move |d, c| {
            d.qemu_monitor_command(&cmd, sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
                .map_err(|e| map_err(c, e))
        })
        .await
    }

    /// qemu-img on the hypervisor host (over ssh for remote URIs).
    async fn qemu_img(&self, ctx: &Ctx, args: Vec<String>) -> Result<()> {
        let argv: Vec<String> = std::iter::once("qemu-img".to_string())
            .chain(args)
            .collect();
        let out = self
            .host
            .run(ctx, &argv, self.opts.qemu_img_timeout)
            .await?;
        if out.code != Some(0) {
            return Err(Error::backend(
                ctx.clone(),
                "qemu-img",
                out.stderr_str().trim().to_string(),
            ));
        }
        Ok(())
    }

    fn host_side<'a>(&'a self, log: &'a Path, ro: &'a Path) -> domain_xml::HostSide<'a> {
        domain_xml::HostSide {
            console_log: log,
            virtiofsd: &self.opts.virtiofsd,
            ro_mounts: ro,
            relay: &self.opts.relay,
        }
    }

    fn boot_paths(spec: &VmSpec) -> Vec<&Path> {
        let mut paths: Vec<&Path> = spec.disks.iter().map(|d| d.path.as_path()).collect();
        if let crate::types::Boot::Kernel { kernel, initrd, .. } = &spec.boot {
            paths.push(kernel);
            paths.extend(initrd.as_deref());
        }
        paths
    }

    fn ro_mounts(&self, vm: &VmName) -> PathBuf {
        self.opts.shares_dir.join(vm.as_str())
    }

    /// Read-only shares need their read-only bind mounts before QEMU starts (they do not
    /// survive a host reboot, so every start makes sure).
    fn prepare_shares(&self, ctx: &Ctx, spec: &VmSpec) -> Result<()> {
        let ro: Vec<_> = spec.shares.iter().filter(|s| s.readonly).collect();
        if ro.is_empty() {
            return Ok(());
        }
        if !self.is_local() {
            return Err(Error::PolicyDenied {
                ctx: ctx.clone(),
                reason: "read-only shares are enforced with a bind mount on the libvirt host; anyvm can only make it when libvirt is local".into(),
            });
        }
        let dir = self.ro_mounts(&spec.name);
        for s in ro {
            crate::util::bindmount::ensure_readonly(ctx, &s.host_path, &dir.join(&s.name))?;
        }
        Ok(())
    }

    fn release_shares(&self, vm: &VmName, names: impl IntoIterator<Item = String>) {
        let dir = self.ro_mounts(vm);
        for n in names {
            crate::util::bindmount::release(&dir.join(n));
        }
        let _ = std::fs::remove_dir(&dir);
    }

    async fn check_host_paths(&self, ctx: &Ctx, spec: &VmSpec) -> Result<()> {
        if !self.is_local() {
            // Shares need local virtiofsd and bind mounts; disks and kernels are checked on
            // the remote host.
            for p in Self::boot_paths(spec) {
                if !self.host.exists(ctx, p).await? {
                    return Err(Error::NotFound {
                        ctx: ctx.clone(),
                        what: format!(
                            "file {} on the libvirt host {}",
                            p.display(),
                            self.host.remote_name().unwrap_or("?")
                        ),
                    });
                }
            }
            return Ok(());
        }
        for s in &spec.shares {
            if !s.host_path.is_dir() {
                return Err(Error::NotFound {
                    ctx: ctx.clone(),
                    what: format!(
                        "host folder {} for share {:?}",
                        s.host_path.display(),
                        s.name
                    ),
                });
            }
        }
        if !spec.shares.is_empty() && !self.opts.virtiofsd.exists() {
            return Err(Error::NotFound {
                ctx: ctx.clone(),
                what: format!(
                    "virtiofsd at {} (shares need it; install the distribution's virtiofsd/qemu package)",
                    self.opts.virtiofsd.display()
                ),
            });
        }
        for p in Self::boot_paths(spec) {
            if !p.exists() {
                return Err(Error::NotFound {
                    ctx: ctx.clone(),
                    what: format!("host file {}", p.display()),
                });
            }
        }
        Ok(())
    }
}

fn map_state(d: &Domain, ctx: &Ctx) -> Result<VmState> {
    use virt::domain::DomainState as S;
    let (st, _) = d.state().map_err(|e| map_err(ctx, e))?;
    Ok(match st {
        virt::enumutil::Enum::Known(S::Running) | virt::enumutil::Enum::Known(S::Blocked) => {
            VmState::Running
        }
        virt::enumutil::Enum::Known(S::Shutdown) => VmState::Running,
        virt::enumutil::Enum::Known(S::Paused) | virt::enumutil::Enum::Known(S::PMSuspended) => {
            VmState::Paused
        }
        virt::enumutil::Enum::Known(S::Shutoff) => {
            if d.has_managed_save(0).unwrap_or(false) {
                VmState::Saved
            } else {
                VmState::ShutOff
            }
        }
        virt::enumutil::Enum::Known(S::Crashed) => VmState::Crashed,
        _ => VmState::Unknown,
    })
}

fn read_spec(d: &Domain) -> Option<VmSpec> {
    let xml = d
        .metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(domain_xml::META_NS),
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        )
        .ok()?;
    match domain_xml::spec_from_metadata(&xml) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring unreadable anyvm metadata");
            None
        }
    }
}

/// Text of the first `<tag>` in a small XML document.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let mut r = quick_xml::Reader::from_str(xml);
    let mut inside = false;
    loop {
        match r.read_event().ok()? {
            quick_xml::events::Event::Start(e) if e.name().as_ref() == tag.as_bytes() => {
                inside = true
            }
            quick_xml::events::Event::Text(t) if inside => {
                return t.unescape().ok().map(|s| s.into_owned())
            }
            quick_xml::events::Event::End(_) if inside => return Some(String::new()),
            quick_xml::events::Event::Eof => return None,
            _ => {}
        }
    }
}

#[async_trait]
impl Backend for LibvirtBackend {
    fn id(&self) -> &str {
        ID
    }
    fn uri(&self) -> String {
        format!("libvirt:{}", self.uri)
    }

    async fn list(&self) -> Result<Vec<VmInfo>> {
        let ctx = Ctx::new("list");
        self.call(&ctx, self.opts.call_timeout, {
            let c = ctx.clone();
            move |conn| {
                let doms = conn.list_all_domains(0).map_err(|e| map_err(&c, e))?;
                let mut out = Vec::new();
                for d in doms {
                    let name = d.name().map_err(|e| map_err(&c, e))?;
                    let state = map_state(&d, &c).unwrap_or(VmState::Unknown);
                    out.push(VmInfo {
                        name,
                        state,
                        managed: Some(read_spec(&d).is_some()),
                    });
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(out)
            }
        })
        .await
    }

    async fn exists(&self, vm: &VmName) -> Result<bool> {
        match self.dom(&Ctx::vm("lookup", vm), vm, |_, _| Ok(())).await {
            Ok(()) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn spec(&self, vm: &VmName) -> Result<Option<VmSpec>> {
        self.dom(&Ctx::vm("read spec", vm), vm, |d, _| Ok(read_spec(d)))
            .await
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        let ctx = Ctx::vm("define", &spec.name);
        spec.validate()?;
        if spec.forwards.iter().any(|f| f.host_port == HostPort::Auto) {
            return Err(Error::invalid_arg(
                "forwards",
                "host ports must be resolved before define (use Client::define)",
            ));
        }
        if let crate::types::Boot::Appliance { path } | crate::types::Boot::Existing { path } =
            &spec.boot
        {
            return Err(Error::InvalidState {
                ctx,
                state: format!("appliance {}", path.display()),
                hint: Some("libvirt does not import OVA/OVF appliances; convert the disk (qemu-img convert) and boot from it".into()),
            });
        }
        self.check_host_paths(&ctx, spec).await?;
        self.host
            .create_dir_all(&ctx, &self.opts.console_dir)
            .await?;
        let xml = domain_xml::domain_xml(
            spec,
            None,
            &self.host_side(&self.console_path(&spec.name), &self.ro_mounts(&spec.name)),
        );
        self.call(&ctx, self.opts.call_timeout, {
            let c = ctx.clone();
            move |conn| {
                conn.define_domain_xml(&xml)
                    .map(|_| ())
                    .map_err(|e| map_err(&c, e))
            }
        })
        .await
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("undefine", vm);
        let spec = self.spec(vm).await?;
        self.dom(&ctx, vm, |d, c| {
            let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
            d.undefine_flags(flags).map_err(|e| map_err(c, e))
        })
        .await?;
        if let Some(spec) = spec {
            for d in spec.disks.iter().filter(|d| d.owned) {
                if let Err(e) = self.host.remove_file(&ctx, &d.path).await {
                    tracing::warn!(vm = %vm, path = %d.path.display(), error = %e, "could not remove clone disk");
                }
            }
            self.release_shares(vm, spec.shares.into_iter().map(|s| s.name));
        }
        let _ = self.host.remove_file(&ctx, &self.console_path(vm)).await;
        // Its frozen bases serve only clones of it; the facade refuses a destroy while those
        // exist, so nothing uses them any more.
        self.remove_frozen(&ctx, vm, None).await;
        Ok(())
    }

    async fn state(&self, vm: &VmName) -> Result<VmState> {
        self.dom(&Ctx::vm("state", vm), vm, map_state).await
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("start", vm);
        if let Ok(spec) = self.stored_spec(&ctx, vm).await {
            self.prepare_shares(&ctx, &spec)?;
        }
        self.dom(&ctx, vm, |d, c| {
            d.create().map(|_| ()).map_err(|e| map_err(c, e))
        })
        .await
    }

    async fn request_shutdown(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("shutdown", vm);
        // The agent is the most reliable path for minimal guests (ACPI needs acpid in the guest).
        // qemu-ga never answers a successful guest-shutdown, so libvirt blocks until the agent
        // disconnects, which never happens when the guest ignores the request. Run it on its own
        // thread: an error within a second means "no agent, try ACPI"; silence means "delivered".
        // The thread ends when the guest goes down or the facade powers it off.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let conn = self.conn.clone();
        let name = vm.to_string();
        tokio::task::spawn_blocking(move || {
            let r = conn.lookup_domain_by_name(&name).and_then(|d| {
                d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
                    .map(|_| ())
            });
            let _ = tx.send(r);
        });
        match tokio::time::timeout(Duration::from_secs(1), rx).await {
            Ok(Ok(Ok(()))) | Err(_) => return Ok(()),
            Ok(Ok(Err(e))) => {
                tracing::debug!(vm = %vm, error = %e, "agent shutdown failed; trying ACPI")
            }
            Ok(Err(_)) => {}
        }
        self.dom(&ctx, vm, |d, c| {
            d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                .map(|_| ())
                .map_err(|e| map_err(c, e))
        })
        .await
    }

    async fn power_off(&self, vm: &VmName) -> Result<()> {
        self.dom(&Ctx::vm("power off", vm), vm, |d, c| match d.destroy() {
            Ok(()) => Ok(()),
            Err(_) if !d.is_active().unwrap_or(true) => Ok(()),
            Err(e) => Err(map_err(c, e)),
        })
        .await
    }

    async fn reset(&self, vm: &VmName) -> Result<()> {
        self.dom(&Ctx::vm("reset", vm), vm, |d, c| {
            d.reset().map_err(|e| map_err(c, e))
        })
        .await
    }

    async fn pause(&self, vm: &VmName) -> Result<()> {
        self.dom(&Ctx::vm("pause", vm), vm, |d, c| {
            d.suspend().map_err(|e| map_err(c, e))
        })
        .await
    }

    async fn resume(&self, vm: &VmName) -> Result<()> {
        self.dom(&Ctx::vm("resume", vm), vm, |d, c| {
            d.resume().map_err(|e| map_err(c, e))
        })
        .await
    }

    async fn save_state(&self, vm: &VmName) -> Result<()> {
        self.dom(&Ctx::vm("save state", vm), vm, |d, c| {
            d.managed_save(0).map_err(|e| map_err(c, e))
        })
        .await
    }

    async fn snapshot_take(&self, vm: &VmName, name: &str, description: &str) -> Result<()> {
        let xml = format!(
            "<domainsnapshot><name>{}</name><description>{}</description></domainsnapshot>",
            crate::util::xml::escape(name),
            crate::util::xml::escape(description)
        );
        self.dom(
            &Ctx::vm(format!("snapshot take {name}"), vm),
            vm,
            move |d, c| {
                d.create_snapshot_xml(&xml, 0)
                    .map(|_| ())
                    .map_err(|e| map_err(c, e))
            },
        )
        .await
    }

    async fn snapshot_restore(&self, vm: &VmName, name: &str) -> Result<()> {
        let n = name.to_string();
        self.dom(
            &Ctx::vm(format!("snapshot restore {name}"), vm),
            vm,
            move |d, c| {
                let s = Domain::lookup_snapshot_by_name(d, &n, 0).map_err(|e| map_err(c, e))?;
                s.revert(0).map_err(|e| map_err(c, e))
            },
        )
        .await
    }

    async fn snapshot_delete(&self, vm: &VmName, name: &str) -> Result<()> {
        let n = name.to_string();
        let ctx = Ctx::vm(format!("snapshot delete {name}"), vm);
        self.dom(&ctx, vm, move |d, c| {
            let s = Domain::lookup_snapshot_by_name(d, &n, 0).map_err(|e| map_err(c, e))?;
            s.delete(0).map_err(|e| map_err(c, e))
        })
        .await?;
        self.remove_frozen(&ctx, vm, Some(name)).await;
        Ok(())
    }

    async fn snapshot_list(&self, vm: &VmName) -> Result<Vec<SnapshotInfo>> {
        self.dom(&Ctx::vm("snapshot list", vm), vm, |d, c| {
            let mut out = Vec::new();
            for s in d.list_all_snapshots(0).map_err(|e| map_err(c, e))? {
                let xml = s.xml_desc(0).map_err(|e| map_err(c, e))?;
                out.push(SnapshotInfo {
                    name: s.name().map_err(|e| map_err(c, e))?,
                    created: xml_text(&xml, "creationTime").and_then(|t| t.trim().parse().ok()),
                    state: xml_text(&xml, "state"),
                    current: s.is_current(0).unwrap_or(false),
                    parent: s.parent(0).ok().and_then(|p| p.name().ok()),
                });
            }
            out.sort_by_key(|s| s.created);
            Ok(out)
        })
        .await
    }

    async fn clone_linked(
        &self,
        base: &VmName,
        snapshot: Option<String>,
        clone_spec: &VmSpec,
    ) -> Result<()> {
        let snapshot = snapshot.as_deref();
        let new = &clone_spec.name;
        let ctx = Ctx::vm(format!("clone to {new}"), base);
        let spec = self.stored_spec(&ctx, base).await?;
        let tag = match snapshot {
            Some(s) => {
                let snaps = self.snapshot_list(base).await?;
                let info = snaps
                    .iter()
                    .find(|i| i.name == s)
                    .ok_or_else(|| Error::NotFound {
                        ctx: ctx.clone(),
                        what: format!("snapshot '{s}'"),
                    })?;
                format!("{s}+{}", info.created.unwrap_or(0))
            }
            None => {
                let st = self.state(base).await?;
                if st != VmState::ShutOff {
                    return Err(Error::InvalidState {
                        ctx,
                        state: st.to_string(),
                        hint: Some("stop the base VM or name a snapshot to clone from".into()),
                    });
                }
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                // No snapshot name: an empty one (snapshot names are VM-name shaped).
                format!("+{}", t.as_nanos())
            }
        };
        self.host
            .create_dir_all(&ctx, &self.opts.images_dir)
            .await?;
        let mut clone = clone_spec.clone();
        clone.disks = spec.disks.clone();
        let mut created: Vec<PathBuf> = Vec::new();
        let result: Result<()> = async {
            for (i, disk) in clone.disks.iter_mut().enumerate() {
                // Internal snapshots live in qcow2 files only; the current disks of a stopped
                // VM can be frozen from any format QEMU reads.
                if snapshot.is_some() && disk.format != DiskFormat::Qcow2 {
                    return Err(Error::InvalidState {
                        ctx: ctx.clone(),
                        state: format!("disk {} is {}", disk.path.display(), disk.format),
                        hint: Some("clones from a snapshot need qcow2 disks; clone the stopped VM's current disks instead (no snapshot)".into()),
                    });
                }
                // Freeze the base disk at the snapshot once; every clone then layers on that file,
                // so the base VM keeps running and changing without touching its clones.
                let frozen = self
                    .opts
                    .images_dir
                    .join(frozen_name(base.as_str(), &tag, i));
                if !self.host.exists(&ctx, &frozen).await? {
                    let tmp = frozen.with_extension("tmp");
                    let mut args = vec![
                        "convert".to_string(),
                        "-U".into(),
                        "-f".into(),
                        disk.format.qemu_name().into(),
                        "-O".into(),
                        "qcow2".into(),
                    ];
                    if let Some(s) = snapshot {
                        args.push("-l".into());
                        args.push(format!("snapshot.name={s}"));
                    }
                    args.push(disk.path.display().to_string());
                    args.push(tmp.display().to_string());
                    self.qemu_img(&ctx, args).await?;
                    self.host.rename(&ctx, &tmp, &frozen).await?;
                }
                let overlay = self.opts.images_dir.join(format!("{new}-{i}.qcow2"));
                if self.host.exists(&ctx, &overlay).await? {
                    return Err(Error::InvalidState {
                        ctx: ctx.clone(),
                        state: format!("{} exists", overlay.display()),
                        hint: Some("remove the stale clone disk or pick another name".into()),
                    });
                }
                self.qemu_img(
                    &ctx,
                    vec![
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        "qcow2".into(),
                        "-F".into(),
                        "qcow2".into(),
                        "-b".into(),
                        frozen.display().to_string(),
                        overlay.display().to_string(),
                    ],
                )
                .await?;
                created.push(overlay.clone());
                disk.path = overlay;
                disk.format = DiskFormat::Qcow2;
                disk.owned = true;
            }
            Ok(())
        }
        .await;
        let result = match result {
            Ok(()) => self.define(&clone).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            for p in created {
                let _ = self.host.remove_file(&ctx, &p).await;
            }
        }
        result
    }

    async fn doctor(&self) -> Vec<crate::doctor::Check> {
        doctor::checks(self).await
    }

    async fn exec(&self, vm: &VmName, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_captured(vm, req).await
    }

    async fn exec_streaming(
        &self,
        vm: &VmName,
        req: &ExecRequest,
        sink: OutputSink,
    ) -> Result<ExecOutput> {
        self.exec_streamed(vm, req, sink).await
    }

    async fn copy_to(
        &self,
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
        let handle = self.open_guest_file(&ctx, vm, guest, "wb").await?;
        let mut total = 0u64;
        let mut buf = vec![0u8; self.opts.write_chunk];
        let res: Result<()> = async {
            loop {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::io(ctx.clone(), host, e))?;
                if n == 0 {
                    return Ok(());
                }
                let r = self
                    .agent(
                        &ctx,
                        vm,
                        agent::file_write(handle, &buf[..n]),
                        self.opts.agent_timeout,
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
        let closed = self
            .agent(&ctx, vm, agent::file_close(handle), self.opts.agent_timeout)
            .await;
        res?;
        closed?;
        Ok(total)
    }

    async fn copy_from(
        &self,
        vm: &VmName,
        guest: &str,
        host: &Path,
        _creds: Option<Credentials>,
        progress: crate::events::CopyProgress,
    ) -> Result<u64> {
        let ctx = Ctx::vm(format!("copy {guest} to {}", host.display()), vm);
        let handle = self.open_guest_file(&ctx, vm, guest, "rb").await?;
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
                let r = self
                    .agent(
                        &ctx,
                        vm,
                        agent::file_read(handle, self.opts.read_chunk),
                        self.opts.agent_timeout,
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
        let closed = self
            .agent(&ctx, vm, agent::file_close(handle), self.opts.agent_timeout)
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

    async fn read_file(
        &self,
        vm: &VmName,
        guest: &str,
        limit: usize,
        _creds: Option<Credentials>,
    ) -> Result<Vec<u8>> {
        let ctx = Ctx::vm(format!("read {guest}"), vm);
        let handle = self.open_guest_file(&ctx, vm, guest, "r").await?;
        let mut out = Vec::new();
        let res: Result<()> = async {
            while out.len() < limit {
                let r = self
                    .agent(
                        &ctx,
                        vm,
                        agent::file_read(handle, limit - out.len()),
                        self.opts.agent_timeout,
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
        let _ = self
            .agent(&ctx, vm, agent::file_close(handle), self.opts.agent_timeout)
            .await;
        res.map(|_| out)
    }

    async fn forwards(&self, vm: &VmName) -> Result<Vec<PortForward>> {
        let ctx = Ctx::vm("forwards", vm);
        Ok(self.stored_spec(&ctx, vm).await?.resolved_forwards())
    }

    /// virtiofs shares are part of the definition (libvirt 9 cannot hot-plug them): the VM
    /// must be off. Read-only ones are served through a read-only bind mount.
    async fn shared_folder_add(&self, vm: &VmName, folder: &SharedFolder) -> Result<()> {
        let ctx = Ctx::vm(format!("shared folder add {}", folder.name), vm);
        let mut spec = self.stored_spec(&ctx, vm).await?;
        if spec.shares.iter().any(|s| s.name == folder.name) {
            return Err(Error::invalid_arg(
                format!("shared folder {:?}", folder.name),
                format!("vm '{vm}' already has a share with that name; remove it first"),
            ));
        }
        let state = self.state(vm).await?;
        if state != VmState::ShutOff {
            return Err(Error::InvalidState {
                ctx,
                state: state.to_string(),
                hint: Some("virtiofs shares are added while the VM is off; stop it first".into()),
            });
        }
        spec.shares.push(folder.clone());
        self.check_host_paths(&ctx, &spec).await?;
        self.redefine(&ctx, spec).await
    }

    async fn shared_folder_remove(&self, vm: &VmName, name: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("shared folder remove {name}"), vm);
        let mut spec = self.stored_spec(&ctx, vm).await?;
        if !spec.shares.iter().any(|s| s.name == name) {
            return Err(Error::NotFound {
                ctx,
                what: format!("shared folder {name:?}"),
            });
        }
        let state = self.state(vm).await?;
        if state != VmState::ShutOff {
            return Err(Error::InvalidState {
                ctx,
                state: state.to_string(),
                hint: Some("virtiofs shares are removed while the VM is off; stop it first".into()),
            });
        }
        spec.shares.retain(|s| s.name != name);
        self.redefine(&ctx, spec).await?;
        self.release_shares(vm, [name.to_string()]);
        Ok(())
    }

    async fn shared_folders(&self, vm: &VmName) -> Result<Vec<SharedFolder>> {
        let ctx = Ctx::vm("shared folders", vm);
        Ok(self.stored_spec(&ctx, vm).await?.shares)
    }

    async fn forward_add(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        let ctx = Ctx::vm(format!("forward add {}", fwd.name), vm);
        let mut spec = self.stored_spec(&ctx, vm).await?;
        let running = self.state(vm).await? != VmState::ShutOff;
        if running {
            let rule =
                domain_xml::hostfwd_rule(fwd.proto, &fwd.host_addr, fwd.host_port, fwd.guest_port);
            let out = self
                .monitor(
                    &ctx,
                    vm,
                    format!("hostfwd_add {} {rule}", domain_xml::NETDEV_ID),
                )
                .await?;
            if !out.trim().is_empty() {
                return Err(Error::PortInUse {
                    ctx,
                    port: fwd.host_port,
                    reason: format!("QEMU refused the rule: {}", out.trim()),
                });
            }
        }
        spec.forwards.push(ForwardSpec::from(fwd));
        if let Err(e) = self.redefine(&ctx, spec).await {
            if running {
                let _ = self
                    .monitor(&ctx, vm, domain_xml::hostfwd_remove(fwd))
                    .await;
            }
            return Err(e);
        }
        Ok(())
    }

    async fn forward_remove(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        let ctx = Ctx::vm(format!("forward remove {}", fwd.name), vm);
        let mut spec = self.stored_spec(&ctx, vm).await?;
        if self.state(vm).await? != VmState::ShutOff {
            let out = self
                .monitor(&ctx, vm, domain_xml::hostfwd_remove(fwd))
                .await?;
            if !out.contains("removed") {
                tracing::warn!(vm = %vm, reply = %out.trim(), "QEMU did not confirm the forward removal");
            }
        }
        spec.forwards.retain(|f| f.name != fwd.name);
        self.redefine(&ctx, spec).await
    }

    async fn agent_ping(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        self.agent(&Ctx::vm("agent ping", vm), vm, agent::ping(), timeout)
            .await
            .map(|_| ())
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<VmEvent>> {
        Some(self.events.subscribe())
    }

    async fn console_log(&self, vm: &VmName) -> Result<Option<PathBuf>> {
        Ok(Some(self.console_path(vm)))
    }

    async fn console_tail(&self, vm: &VmName, limit: usize) -> Result<Vec<u8>> {
        let ctx = Ctx::vm("read console log", vm);
        self.host
            .read_tail(&ctx, &self.console_path(vm), limit)
            .await
    }

    fn forward_host(&self) -> Option<String> {
        self.host.remote_name().map(str::to_string)
    }

    async fn release_stale_host_state(
        &self,
        live: &[String],
        dry_run: bool,
    ) -> Result<Vec<String>> {
        if !self.is_local() {
            return Ok(Vec::new()); // read-only shares are only ever mounted for a local libvirt
        }
        let ctx = Ctx::new("release stale share mounts");
        let dir = &self.opts.shares_dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(ctx, dir, e)),
        };
        let mut released = Vec::new();
        for entry in entries.flatten() {
            let Ok(vm) = VmName::new(entry.file_name().to_string_lossy()) else {
                continue; // not a folder anyvm made
            };
            // A VM defined since `live` was listed keeps its mounts.
            if live.iter().any(|n| n == vm.as_str()) || self.exists(&vm).await? {
                continue;
            }
            let shares: Vec<String> = std::fs::read_dir(entry.path())
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let dir = self.ro_mounts(&vm);
            released.extend(shares.iter().map(|n| dir.join(n).display().to_string()));
            if !dry_run {
                self.release_shares(&vm, shares);
                tracing::info!(vm = %vm, "released share mounts of a VM that is gone");
            }
        }
        Ok(released)
    }
}

/// The file a base disk is frozen to for linked clones: `BASE+SNAPSHOT+STAMP+DISK.base.qcow2`
/// (SNAPSHOT empty for the current disks). '+' cannot occur in VM or snapshot names, so the
/// files of one base are never taken for those of a base whose name extends it.
fn frozen_name(base: &str, tag: &str, disk: usize) -> String {
    format!("{base}+{tag}+{disk}.base.qcow2")
}

/// Whether `file` is a frozen base of `base` (at `snapshot`, when given).
fn is_frozen_of(file: &str, base: &str, snapshot: Option<&str>) -> bool {
    let Some(stem) = file.strip_suffix(".base.qcow2") else {
        return false;
    };
    let parts: Vec<&str> = stem.split('+').collect();
    parts.len() == 4 && parts[0] == base && snapshot.is_none_or(|s| parts[1] == s)
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

#[cfg(test)]
mod frozen_tests {
    use super::*;

    #[test]
    fn frozen_bases_belong_to_exactly_one_base_and_snapshot() {
        let f = frozen_name("mc", "golden+17", 0);
        assert!(is_frozen_of(&f, "mc", None));
        assert!(is_frozen_of(&f, "mc", Some("golden")));
        assert!(!is_frozen_of(&f, "mc", Some("gold")));
        assert!(!is_frozen_of(&f, "m", None));
        assert!(!is_frozen_of(&frozen_name("mc-2", "+5", 1), "mc", None));
        assert!(is_frozen_of(&frozen_name("mc", "+5", 1), "mc", None));
        assert!(!is_frozen_of(
            &frozen_name("mc", "+5", 1),
            "mc",
            Some("golden")
        ));
        assert!(!is_frozen_of("mc-golden-17-0.base.qcow2", "mc", None));
    }
}
