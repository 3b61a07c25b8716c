//! The `Vm` handle callers use. It holds a backend and adds the behaviour every backend shares.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::ForwardTransport;
use crate::backend::{Backend, VmEventKind};
use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::policy::Policy;
use crate::ports::PortAllocator;
use crate::readiness::{self, ReadyReport, ReadySpec};
use crate::ssh::{self, SshConfig, SshOptions, SshTarget, Tunnels};
use crate::types::{
    CloneLink, DestroyOptions, ExecOutput, ExecRequest, ForwardSpec, GuestChannel, HostPort,
    PortForward, SharedFolder, SnapshotInfo, StopOptions, StopOutcome, VmSpec, VmState, VmStatus,
};
use serde_json::json;

/// Label a linked clone carries: the VM it was cloned from (the clone graph where the backend
/// has no registry of its own).
pub const CLONE_BASE_LABEL: &str = "anyvm.clone/base";
/// Label a linked clone carries: the snapshot of the base it was cloned at, when one was named.
pub const CLONE_SNAPSHOT_LABEL: &str = "anyvm.clone/snapshot";

/// A handle on one VM. Cheap to clone; all methods are async and cancel-safe at await points.
#[derive(Debug, Clone)]
pub struct Vm {
    name: VmName,
    backend: Arc<dyn Backend>,
    ports: PortAllocator,
    state_dir: PathBuf,
    credentials: Option<Credentials>,
    channel: GuestChannel,
    policy: Option<Arc<Policy>>,
}

impl Vm {
    pub(crate) fn new(
        name: VmName,
        backend: Arc<dyn Backend>,
        ports: PortAllocator,
        state_dir: PathBuf,
    ) -> Self {
        Vm {
            name,
            backend,
            ports,
            state_dir,
            credentials: None,
            channel: GuestChannel::Tools,
            policy: None,
        }
    }

    /// Enforce `policy` on this handle (and the clones made from it): exec allowlist, shared
    /// folder roots, secrets on command lines, audit log.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_deref()
    }

    /// Run an operation and, when the policy names an audit log, record it with its outcome.
    /// `args` never holds secrets: callers pass names, paths and argv only.
    async fn audited<T>(
        &self,
        op: &str,
        args: serde_json::Value,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let r = f.await;
        if let Some(log) = self.policy.as_ref().and_then(|p| p.audit_log.as_ref()) {
            crate::policy::audit(log, self.name.as_str(), op, &args, r.as_ref().map(|_| ()));
        }
        r
    }

    /// Refuse, before anything runs, what the policy forbids for an exec.
    fn check_exec_policy(&self, req: &ExecRequest) -> Result<()> {
        let Some(p) = &self.policy else {
            return Ok(());
        };
        let ctx = self.ctx(&format!("exec {}", req.program));
        p.check_exec(&ctx, &req.program)?;
        self.check_argv_secrets(&ctx, req.credentials.as_ref().or(self.credentials.as_ref()))
    }

    fn check_argv_secrets(&self, ctx: &Ctx, creds: Option<&Credentials>) -> Result<()> {
        let forbid = self.policy.as_ref().is_some_and(|p| !p.secrets_in_argv);
        let has_password = creds.is_some_and(|c| c.password.is_some());
        if forbid
            && has_password
            && self.channel == GuestChannel::Tools
            && self.backend.tools_take_secrets_in_argv()
        {
            return Err(Error::PolicyDenied {
                ctx: ctx.clone(),
                reason: format!(
                    "the {} backend's tools would put the guest password on a command line; reach the guest over ssh instead (guest_channel = \"ssh\")",
                    self.backend.id()
                ),
            });
        }
        Ok(())
    }

    /// How exec and file copy reach the guest: its tools (agent, Guest Additions, VMware Tools;
    /// the default) or ssh with the credentials' key ([`GuestChannel::Ssh`]).
    pub fn with_guest_channel(mut self, channel: GuestChannel) -> Self {
        self.channel = channel;
        self
    }

    pub fn guest_channel(&self) -> GuestChannel {
        self.channel
    }

    /// The guest's sshd port anyvm logs in to (exec channel, tunnels): the ssh channel's, else 22.
    pub fn ssh_port(&self) -> u16 {
        match self.channel {
            GuestChannel::Ssh { port } => port,
            GuestChannel::Tools => 22,
        }
    }

    /// Credentials and guest channel from the machine's entry in `config`, where it has them.
    pub fn with_config(self, config: Option<&crate::Config>) -> Self {
        let channel = config
            .and_then(|c| c.machines.get(self.name.as_str()))
            .map(|m| m.guest_channel);
        let policy = config
            .and_then(|c| c.profile_for_machine(self.name.as_str()))
            .map(|p| p.policy.clone());
        let mut vm = self.with_config_credentials(config);
        if let Some(p) = policy {
            vm = vm.with_policy(p);
        }
        match channel {
            Some(ch) => vm.with_guest_channel(ch),
            None => vm,
        }
    }

    /// Use this guest account for exec (when a request names none) and file transfer, on
    /// backends whose tools log in to the guest (VirtualBox, VMware).
    pub fn with_credentials(self, c: Credentials) -> Self {
        self.with_credentials_opt(Some(c))
    }

    /// Use the guest account `config` gives for this VM, if it gives one.
    pub fn with_config_credentials(self, config: Option<&crate::Config>) -> Self {
        match config.and_then(|c| c.credentials(self.name.as_str())) {
            Some(c) => self.with_credentials(c),
            None => self,
        }
    }

    fn with_policy_opt(mut self, p: Option<Arc<Policy>>) -> Self {
        self.policy = p;
        self
    }

    fn with_credentials_opt(mut self, c: Option<Credentials>) -> Self {
        self.credentials = c;
        self
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn name(&self) -> &VmName {
        &self.name
    }
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn ctx(&self, op: &str) -> Ctx {
        Ctx::vm(op, &self.name)
    }

    pub async fn state(&self) -> Result<VmState> {
        self.backend.state(&self.name).await
    }

    pub async fn spec(&self) -> Result<Option<VmSpec>> {
        self.backend.spec(&self.name).await
    }

    /// Start the VM (headless). Starting a running VM does nothing.
    pub async fn start(&self) -> Result<()> {
        let args = json!({});
        self.audited("start", args, async move {
            match self.state().await? {
                VmState::Running => Ok(()),
                VmState::Paused => Err(Error::InvalidState {
                    ctx: self.ctx("start"),
                    state: "paused".into(),
                    hint: format!("resume it instead (anyvm resume {})", self.name),
                }),
                _ => self.backend.start(&self.name).await,
            }
        })
        .await
    }

    /// Graceful shutdown with a deadline, then power off. Returns which of the two happened.
    pub async fn stop(&self, opts: StopOptions) -> Result<StopOutcome> {
        let args = json!({"force": opts.force, "timeout_s": opts.timeout.as_secs_f64()});
        self.audited("stop", args, async move {
            let out = self.stop_inner(opts).await;
            self.close_tunnels().await;
            out
        })
        .await
    }

    async fn stop_inner(&self, opts: StopOptions) -> Result<StopOutcome> {
        let state = self.state().await?;
        if matches!(state, VmState::ShutOff | VmState::Saved) {
            return Ok(StopOutcome::AlreadyOff);
        }
        if opts.force || state == VmState::Crashed {
            self.backend.power_off(&self.name).await?;
            return Ok(StopOutcome::Forced);
        }
        if state == VmState::Paused {
            // A paused guest cannot see a shutdown request.
            self.backend.resume(&self.name).await?;
        }
        let deadline = Instant::now() + opts.timeout;
        let events = self.backend.subscribe();
        match self.backend.request_shutdown(&self.name).await {
            Ok(()) => {
                if self.wait_off(deadline, events).await? {
                    return Ok(StopOutcome::Graceful);
                }
                tracing::warn!(vm = %self.name, timeout = ?opts.timeout, "graceful shutdown timed out; powering off");
            }
            Err(e) => {
                tracing::warn!(vm = %self.name, error = %e, "shutdown request failed; powering off")
            }
        }
        match self.backend.power_off(&self.name).await {
            Ok(()) => Ok(StopOutcome::Forced),
            // It may have gone down between the deadline and the power-off.
            Err(e) if self.state().await.ok() == Some(VmState::ShutOff) => {
                tracing::debug!(vm = %self.name, error = %e, "power off raced with shutdown");
                Ok(StopOutcome::Graceful)
            }
            Err(e) => Err(e),
        }
    }

    /// Wait until the VM is off or the deadline passes; true if it went off.
    async fn wait_off(
        &self,
        deadline: Instant,
        mut events: Option<tokio::sync::broadcast::Receiver<crate::backend::VmEvent>>,
    ) -> Result<bool> {
        let mut poll = Duration::from_millis(50);
        loop {
            if matches!(self.state().await?, VmState::ShutOff | VmState::Saved) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let wait = poll.min(deadline - now);
            poll = (poll * 2).min(Duration::from_secs(1));
            match events.as_mut() {
                Some(rx) => {
                    let stopped = async {
                        loop {
                            match rx.recv().await {
                                Ok(ev)
                                    if ev.vm == self.name.as_str()
                                        && ev.kind == VmEventKind::Stopped =>
                                {
                                    return
                                }
                                Ok(_) => {}
                                Err(_) => futures::future::pending::<()>().await,
                            }
                        }
                    };
                    tokio::select! { _ = stopped => {}, _ = tokio::time::sleep(wait) => {} }
                }
                None => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Cut the power at once.
    pub async fn power_off(&self) -> Result<()> {
        let args = json!({});
        self.audited("power_off", args, async move {
            let out = self.backend.power_off(&self.name).await;
            self.close_tunnels().await;
            out
        })
        .await
    }
    /// Hardware reset: the guest restarts at once (ssh tunnels reopen at the next `wait_ready`).
    pub async fn reset(&self) -> Result<()> {
        let args = json!({});
        self.audited("reset", args, async move {
            self.backend.reset(&self.name).await?;
            self.close_tunnels().await;
            Ok(())
        })
        .await
    }
    pub async fn pause(&self) -> Result<()> {
        let args = json!({});
        self.audited("pause", args, async move {
            self.backend.pause(&self.name).await
        })
        .await
    }
    pub async fn resume(&self) -> Result<()> {
        let args = json!({});
        self.audited("resume", args, async move {
            self.backend.resume(&self.name).await
        })
        .await
    }
    pub async fn save_state(&self) -> Result<()> {
        let args = json!({});
        self.audited("save_state", args, async move {
            self.backend.save_state(&self.name).await?;
            self.close_tunnels().await;
            Ok(())
        })
        .await
    }

    /// Power off if needed, remove the definition, its snapshots, the disks anyvm created for it,
    /// its port leases and its known_hosts file. Refuses, changing nothing, while linked clones
    /// depend on the VM; see [`Vm::destroy_with`].
    pub async fn destroy(&self) -> Result<()> {
        self.destroy_with(DestroyOptions::default()).await
    }

    /// [`Vm::destroy`]; with [`DestroyOptions::with_clones`] the dependent clones (and their
    /// clones) are destroyed first, deepest first.
    pub async fn destroy_with(&self, opts: DestroyOptions) -> Result<()> {
        let args = json!({"with_clones": opts.with_clones});
        self.audited("destroy", args, async move {
            let deps = self.dependants(None).await?;
            if !deps.is_empty() && !opts.with_clones {
                return Err(self.has_clones("destroy", None, &deps));
            }
            for d in &deps {
                self.sibling(d)?.destroy_one().await?;
            }
            self.destroy_one().await
        })
        .await
    }

    async fn destroy_one(&self) -> Result<()> {
        self.close_tunnels().await;
        if !matches!(self.state().await?, VmState::ShutOff | VmState::Saved) {
            self.backend.power_off(&self.name).await?;
        }
        self.backend.undefine(&self.name).await?;
        self.ports
            .release(&self.backend.uri(), self.name.as_str(), None)?;
        let kh = self
            .state_dir
            .join("ssh")
            .read_dir()
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join(format!("{}.known_hosts", self.name)));
        for p in kh {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// Linked clones that depend on this VM (on `snapshot` of it, when given), transitively,
    /// deepest first: the order in which they can be removed.
    pub async fn dependants(&self, snapshot: Option<&str>) -> Result<Vec<String>> {
        let links = self.backend.clone_links().await?;
        Ok(dependants_of(&links, self.name.as_str(), snapshot))
    }

    fn has_clones(&self, op: &str, snapshot: Option<&str>, deps: &[String]) -> Error {
        let what = match snapshot {
            Some(s) => format!("snapshot '{s}' is the base of linked clones"),
            None => "has linked clones".to_string(),
        };
        Error::InvalidState {
            ctx: self.ctx(op),
            state: format!("{what}: {}", deps.join(", ")),
            hint: "destroy those clones first, or ask for them to be removed too (anyvm: --with-clones; Rust: DestroyOptions::with_clones; Python: with_clones=True; C: ANYVM_WITH_CLONES)".into(),
        }
    }

    /// A handle on another VM of the same backend, with this one's settings.
    fn sibling(&self, name: &str) -> Result<Vm> {
        Ok(Vm::new(
            VmName::new(name)?,
            self.backend.clone(),
            self.ports.clone(),
            self.state_dir.clone(),
        )
        .with_credentials_opt(self.credentials.clone())
        .with_guest_channel(self.channel)
        .with_policy_opt(self.policy.clone()))
    }

    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_as("exec", req, true).await
    }

    /// Exec for anyvm's own probes (resource checks, mounts): audited under `op`, not subject
    /// to the exec allowlist, which governs what users run.
    pub(crate) async fn exec_internal(&self, op: &str, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_as(op, req, false).await
    }

    async fn exec_as(&self, op: &str, req: &ExecRequest, allowlist: bool) -> Result<ExecOutput> {
        let args = json!({
            "argv": std::iter::once(&req.program).chain(&req.args).collect::<Vec<_>>(),
            "cwd": req.cwd,
            "env_keys": req.env.keys().collect::<Vec<_>>(),
        });
        self.audited(op, args, async move {
            req.validate()?;
            if allowlist {
                self.check_exec_policy(req)?;
            } else {
                self.check_argv_secrets(&self.ctx(op), req.credentials.as_ref().or(self.credentials.as_ref()))?;
            }
            let mut r = req.clone();
            if r.credentials.is_none() {
                r.credentials = self.credentials.clone();
            }
            let out = match self.channel {
                GuestChannel::Tools => self.backend.exec(&self.name, &r).await?,
                GuestChannel::Ssh { port } => {
                    self.ssh_target_for(port, r.credentials.as_ref())
                        .await?
                        .exec(&r)
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

    /// Run and require exit code 0.
    pub async fn exec_checked(&self, req: &ExecRequest) -> Result<ExecOutput> {
        let out = self.exec(req).await?;
        if out.success() {
            return Ok(out);
        }
        Err(Error::GuestCommand {
            ctx: self.ctx("exec"),
            program: req.program.clone(),
            exit_code: out.exit_code,
            reason: match (out.exit_code, out.signal) {
                (Some(c), _) => format!(
                    "exit code {c}: {}",
                    out.stderr_str()
                        .trim()
                        .chars()
                        .take(500)
                        .collect::<String>()
                ),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "no exit status".into(),
            },
            stderr: out.stderr.into_boxed_slice(),
        })
    }

    pub async fn copy_to(&self, host: impl AsRef<Path>, guest: &str) -> Result<u64> {
        let args = json!({"host": host.as_ref().display().to_string(), "guest": guest});
        self.audited("copy_to", args, async move {
            let host = host.as_ref();
            if !host.is_file() {
                return Err(Error::NotFound {
                    ctx: self.ctx("copy_to"),
                    what: format!("host file {}", host.display()),
                });
            }
            check_guest_path(guest)?;
            match self.channel {
                GuestChannel::Tools => {
                    self.backend
                        .copy_to(&self.name, host, guest, self.credentials.clone())
                        .await
                }
                GuestChannel::Ssh { port } => {
                    self.ssh_target(port)
                        .await?
                        .upload(host, guest, COPY_TIMEOUT)
                        .await
                }
            }
        })
        .await
    }

    pub async fn copy_from(&self, guest: &str, host: impl AsRef<Path>) -> Result<u64> {
        let args = json!({"guest": guest, "host": host.as_ref().display().to_string()});
        self.audited("copy_from", args, async move {
            check_guest_path(guest)?;
            match self.channel {
                GuestChannel::Tools => {
                    self.backend
                        .copy_from(&self.name, guest, host.as_ref(), self.credentials.clone())
                        .await
                }
                GuestChannel::Ssh { port } => {
                    self.ssh_target(port)
                        .await?
                        .download(guest, host.as_ref(), COPY_TIMEOUT)
                        .await
                }
            }
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

    /// Where the host reaches the guest's `guest_port`: a hypervisor forward to it, else the
    /// guest's own address where the backend can tell it.
    pub async fn ssh_endpoint(&self, guest_port: u16) -> Result<(String, u16)> {
        if self.backend.forward_transport() == ForwardTransport::Hypervisor {
            if let Some(f) = self
                .forwards()
                .await?
                .into_iter()
                .find(|f| f.guest_port == guest_port && f.proto == crate::types::Protocol::Tcp)
            {
                return f
                    .connect_addr_via(self.backend.forward_host().as_deref())
                    .map_err(|reason| Error::InvalidState {
                        ctx: self.ctx("ssh"),
                        state: reason,
                        hint: String::new(),
                    });
            }
        }
        match self.backend.guest_address(&self.name).await? {
            Some(ip) => Ok((ip, guest_port)),
            None => Err(Error::InvalidState {
                ctx: self.ctx("ssh"),
                state: format!("no forward to guest port {guest_port}"),
                hint: format!(
                    "add one: anyvm forward add {} --guest-port {guest_port}",
                    self.name
                ),
            }),
        }
    }

    /// How anyvm itself logs in to the guest over ssh (key from the credentials, host key pinned
    /// in anyvm's per-VM known_hosts).
    pub async fn ssh_target(&self, guest_port: u16) -> Result<SshTarget> {
        self.ssh_target_for(guest_port, self.credentials.as_ref())
            .await
    }

    async fn ssh_target_for(
        &self,
        guest_port: u16,
        creds: Option<&Credentials>,
    ) -> Result<SshTarget> {
        let ctx = self.ctx("ssh");
        let creds = crate::backend::require_credentials(&ctx, creds, "ssh to the guest")?;
        let identity_file = creds.identity_file.clone().ok_or_else(|| Error::Auth {
            ctx: ctx.clone(),
            reason: format!(
                "ssh logins use keys only; give user {:?} an identity_file",
                creds.user
            ),
        })?;
        let (host, port) = self.ssh_endpoint(guest_port).await?;
        Ok(SshTarget {
            vm: self.name.to_string(),
            host,
            port,
            user: creds.user.clone(),
            identity_file,
            known_hosts: ssh::known_hosts_path(
                &self.state_dir,
                &self.backend.uri(),
                self.name.as_str(),
            ),
            host_key_alias: ssh::host_key_alias(self.name.as_str()),
            connect_timeout: Duration::from_secs(15),
        })
    }

    /// Tunnels for this VM's forwards, when anyvm carries them (see [`crate::ssh::tunnel`]).
    fn tunnels(&self) -> Option<Tunnels> {
        (self.backend.forward_transport() == ForwardTransport::SshTunnel)
            .then(|| Tunnels::new(&self.state_dir, &self.backend.uri(), self.name.as_str()))
    }

    /// (Re)open the ssh tunnel of every forward; retries while the guest's sshd is not up yet.
    async fn open_tunnels(&self, deadline: Instant) -> Result<()> {
        let Some(t) = self.tunnels() else {
            return Ok(());
        };
        let forwards = self.backend.forwards(&self.name).await?;
        if forwards.is_empty() {
            return Ok(());
        }
        let target = self.ssh_target(self.ssh_port()).await?;
        for f in &forwards {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match t.open(&target, f, left.max(Duration::from_secs(5))).await {
                    Ok(()) => break,
                    Err(e @ Error::Backend { .. }) if Instant::now() + TUNNEL_RETRY < deadline => {
                        tracing::debug!(vm = %self.name, error = %e, "guest sshd not reachable yet");
                        tokio::time::sleep(TUNNEL_RETRY).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn close_tunnels(&self) {
        if let Some(t) = self.tunnels() {
            if let Ok(f) = self.backend.forwards(&self.name).await {
                t.close_all(&f).await;
            }
        }
    }

    pub async fn forwards(&self) -> Result<Vec<PortForward>> {
        self.backend.forwards(&self.name).await
    }

    /// Add a forward (works on running and stopped VMs). `Auto` host ports are allocated safely.
    pub async fn forward_add(&self, spec: &ForwardSpec) -> Result<PortForward> {
        let args = json!({"spec": spec});
        self.audited("forward_add", args, async move {
            spec.validate()?;
            let ctx = self.ctx("forward add");
            let existing = self.forwards().await?;
            if existing.iter().any(|f| f.name == spec.name) {
                return Err(Error::invalid_arg(
                    format!("forward {:?}", spec.name),
                    format!(
                        "vm '{}' already has a forward with that name; remove it first",
                        self.name
                    ),
                ));
            }
            let uri = self.backend.uri();
            let purpose = format!("forward:{}", spec.name);
            let port = match spec.host_port {
                HostPort::Auto => self.ports.allocate(
                    &uri,
                    self.name.as_str(),
                    &purpose,
                    &spec.host_addr,
                    spec.proto,
                )?,
                HostPort::Fixed(p) => {
                    if let Some(f) = existing
                        .iter()
                        .find(|f| f.host_port == p && f.proto == spec.proto)
                    {
                        return Err(Error::PortInUse {
                            ctx,
                            port: p,
                            reason: format!("already forwarded by '{}'", f.name),
                        });
                    }
                    self.ports.reserve(
                        &uri,
                        self.name.as_str(),
                        &purpose,
                        &spec.host_addr,
                        spec.proto,
                        p,
                    )?;
                    p
                }
            };
            let fwd = PortForward {
                name: spec.name.clone(),
                proto: spec.proto,
                host_addr: spec.host_addr.clone(),
                host_port: port,
                guest_port: spec.guest_port,
            };
            if let Err(e) = self.backend.forward_add(&self.name, &fwd).await {
                let _ = self.ports.release(&uri, self.name.as_str(), Some(&purpose));
                return Err(e);
            }
            if let Some(t) = self.tunnels() {
                let opened = async {
                    if self.state().await? != VmState::Running {
                        return Ok(());
                    }
                    let target = self.ssh_target(self.ssh_port()).await?;
                    t.open(&target, &fwd, Duration::from_secs(60)).await
                };
                if let Err(e) = opened.await {
                    let _ = self.backend.forward_remove(&self.name, &fwd).await;
                    let _ = self.ports.release(&uri, self.name.as_str(), Some(&purpose));
                    return Err(e);
                }
            }
            Ok(fwd)
        })
        .await
    }

    /// Remove a forward by its name (or its host port, given as a number).
    pub async fn forward_remove(&self, name_or_port: &str) -> Result<PortForward> {
        let args = json!({"forward": name_or_port});
        self.audited("forward_remove", args, async move {
            let fwd = self
                .forwards()
                .await?
                .into_iter()
                .find(|f| f.name == name_or_port || f.host_port.to_string() == name_or_port)
                .ok_or_else(|| Error::NotFound {
                    ctx: self.ctx("forward remove"),
                    what: format!("forward {name_or_port:?}"),
                })?;
            if let Some(t) = self.tunnels() {
                t.close(&fwd.name).await;
            }
            self.backend.forward_remove(&self.name, &fwd).await?;
            self.ports.release(
                &self.backend.uri(),
                self.name.as_str(),
                Some(&format!("forward:{}", fwd.name)),
            )?;
            Ok(fwd)
        })
        .await
    }

    /// Wait until the guest passes `spec`'s probes, or fail with the probe still failing.
    /// Where anyvm carries forwards as ssh tunnels, they are (re)opened once the probes pass.
    pub async fn wait_ready(&self, spec: &ReadySpec) -> Result<ReadyReport> {
        let deadline = Instant::now() + spec.timeout;
        let this = self.clone();
        let exec: readiness::GuestExec = Arc::new(move |req| {
            let vm = this.clone();
            Box::pin(async move { vm.exec(&req).await })
        });
        let report =
            readiness::wait_ready_with(self.backend.clone(), &self.name, spec, Some(exec)).await?;
        self.open_tunnels(deadline).await?;
        Ok(report)
    }

    pub async fn ssh_config(&self, opts: &SshOptions) -> Result<SshConfig> {
        ssh::ssh_config(self, opts).await
    }

    pub async fn snapshot_take(&self, name: &str, description: &str) -> Result<()> {
        let args = json!({"snapshot": name});
        self.audited("snapshot_take", args, async move {
            check_snapshot_name(name)?;
            self.backend
                .snapshot_take(&self.name, name, description)
                .await
        })
        .await
    }
    pub async fn snapshot_restore(&self, name: &str) -> Result<()> {
        let args = json!({"snapshot": name});
        self.audited("snapshot_restore", args, async move {
            check_snapshot_name(name)?;
            self.backend.snapshot_restore(&self.name, name).await
        })
        .await
    }
    /// Delete a snapshot. Refuses, changing nothing, while linked clones were made from it; see
    /// [`Vm::snapshot_delete_with`].
    pub async fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.snapshot_delete_with(name, DestroyOptions::default())
            .await
    }

    /// [`Vm::snapshot_delete`]; with [`DestroyOptions::with_clones`] the clones made from the
    /// snapshot (and their clones) are destroyed first.
    pub async fn snapshot_delete_with(&self, name: &str, opts: DestroyOptions) -> Result<()> {
        let args = json!({"snapshot": name, "with_clones": opts.with_clones});
        self.audited("snapshot_delete", args, async move {
            check_snapshot_name(name)?;
            let deps = self.dependants(Some(name)).await?;
            if !deps.is_empty() && !opts.with_clones {
                return Err(self.has_clones(&format!("snapshot delete {name}"), Some(name), &deps));
            }
            for d in &deps {
                self.sibling(d)?.destroy_one().await?;
            }
            self.backend.snapshot_delete(&self.name, name).await
        })
        .await
    }

    /// Write this (powered-off) VM as an OVA appliance, the way frozen VMs are shipped
    /// (VirtualBox; other backends say they cannot).
    pub async fn export_appliance(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let args = json!({"path": path});
        self.audited("export", args, async move {
            self.backend.export_appliance(&self.name, path).await
        })
        .await
    }

    /// State, forwards and snapshots, in as few hypervisor calls as the backend allows.
    pub async fn status(&self) -> Result<VmStatus> {
        self.backend.status(&self.name).await
    }

    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.backend.snapshot_list(&self.name).await
    }

    /// A copy-on-write clone of this VM (at `snapshot`, or its current disks when it is off).
    /// The clone gets fresh host ports for every forward and console.
    pub async fn clone_linked(&self, new_name: &VmName, snapshot: Option<&str>) -> Result<Vm> {
        self.clone_linked_labeled(new_name, snapshot, Default::default())
            .await
    }

    /// [`Vm::clone_linked`], storing `labels` with the clone (over the base's own labels, minus
    /// the job-ownership ones, which belong to one clone only).
    pub async fn clone_linked_labeled(
        &self,
        new_name: &VmName,
        snapshot: Option<&str>,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Vm> {
        let args = json!({"clone": new_name.as_str(), "snapshot": snapshot, "labels": labels});
        self.audited("clone_linked", args, async move {
            if let Some(s) = snapshot {
                check_snapshot_name(s)?;
            }
            if self.backend.exists(new_name).await? {
                return Err(Error::InvalidState {
                    ctx: Ctx::vm("clone", new_name),
                    state: "already defined".into(),
                    hint: "choose another name or destroy the existing VM".into(),
                });
            }
            let ctx = Ctx::vm(format!("clone to {new_name}"), &self.name);
            let mut spec =
                self.backend
                    .spec(&self.name)
                    .await?
                    .ok_or_else(|| Error::InvalidState {
                        ctx: ctx.clone(),
                        state: "not defined by anyvm".into(),
                        hint: "only VMs defined through anyvm carry the spec a clone is made from"
                            .into(),
                    })?;
            spec.name = new_name.clone();
            spec.labels.retain(|k, _| {
                !k.starts_with(crate::job::LABEL_PREFIX) && !k.starts_with("anyvm.clone/")
            });
            spec.labels.extend(labels);
            spec.labels
                .insert(CLONE_BASE_LABEL.into(), self.name.to_string());
            if let Some(s) = snapshot {
                spec.labels
                    .insert(CLONE_SNAPSHOT_LABEL.into(), s.to_string());
            }
            spec.validate()?;
            for f in &mut spec.forwards {
                f.host_port = HostPort::Auto;
            }
            if spec.console.vnc.is_some() {
                spec.console.vnc = Some(HostPort::Auto);
            }
            let backend = self.backend.clone();
            let snapshot = snapshot.map(str::to_string);
            let base = self.name.clone();
            with_ports(&self.backend, &self.ports, spec, move |spec| async move {
                backend.clone_linked(&base, snapshot, &spec).await
            })
            .await?;
            Ok(Vm::new(
                new_name.clone(),
                self.backend.clone(),
                self.ports.clone(),
                self.state_dir.clone(),
            )
            .with_credentials_opt(self.credentials.clone())
            .with_guest_channel(self.channel)
            .with_policy_opt(self.policy.clone()))
        })
        .await
    }

    /// Offer a host folder to the guest. The host path must exist; symlinks are resolved first.
    pub async fn shared_folder_add(&self, folder: &SharedFolder) -> Result<SharedFolder> {
        let args = json!({"folder": folder});
        self.audited("shared_folder_add", args, async move {
            folder.validate()?;
            let ctx = self.ctx(&format!("shared folder add {}", folder.name));
            if let Some(p) = &self.policy {
                p.check_share(&ctx, &folder.host_path)?;
            }
            let host_path = std::fs::canonicalize(&folder.host_path)
                .map_err(|e| Error::io(ctx.clone(), &folder.host_path, e))?;
            let f = SharedFolder {
                host_path,
                ..folder.clone()
            };
            self.backend.shared_folder_add(&self.name, &f).await?;
            Ok(f)
        })
        .await
    }
    /// Mount a share inside the guest at its `guest_path` (as root through the guest channel;
    /// nothing happens when something is already mounted there).
    pub async fn shared_folder_mount(&self, share: &SharedFolder) -> Result<()> {
        let ctx = self.ctx(&format!("mount share {}", share.name));
        let Some(gp) = share.guest_path.clone() else {
            return Err(Error::invalid_arg(
                format!("shared folder {:?}", share.name),
                "has no guest_path to mount at",
            ));
        };
        share.validate()?;
        let argv = self.backend.share_mount_argv(share, &gp);
        // Mount only when nothing is mounted there yet; argv goes through "$@", never a string.
        let script = "p=$1; shift; mkdir -p \"$p\" && { awk -v p=\"$p\" '$2 == p { f = 1 } END { exit !f }' /proc/mounts || \"$@\"; }";
        let req = ExecRequest::new("/bin/sh")
            .args(
                ["-c", script, "anyvm-mount", gp.as_str()]
                    .into_iter()
                    .map(String::from)
                    .chain(argv),
            )
            .timeout(Duration::from_secs(60));
        let out = self.exec_internal("shared_folder_mount", &req).await?;
        if out.success() {
            return Ok(());
        }
        Err(Error::GuestCommand {
            ctx,
            program: "mount".into(),
            exit_code: out.exit_code,
            reason: out.stderr_str().trim().to_string(),
            stderr: out.stderr.into_boxed_slice(),
        })
    }

    /// Verify from inside the guest that every resource of `profile` is usable (see
    /// [`crate::profile::check`]); audited as "check".
    pub async fn check(
        &self,
        profile: &crate::Profile,
        per_resource: Duration,
    ) -> Result<crate::CheckReport> {
        let args = json!({"profile": profile.name});
        self.audited("check", args, async move {
            crate::profile::check(self, profile, per_resource).await
        })
        .await
    }

    pub async fn shared_folder_remove(&self, name: &str) -> Result<()> {
        let args = json!({"folder": name});
        self.audited("shared_folder_remove", args, async move {
            self.backend.shared_folder_remove(&self.name, name).await
        })
        .await
    }
    pub async fn shared_folders(&self) -> Result<Vec<SharedFolder>> {
        self.backend.shared_folders(&self.name).await
    }

    /// The last `limit` bytes of the serial console log, read where the hypervisor keeps it.
    pub async fn console_tail(&self, limit: usize) -> Result<Vec<u8>> {
        self.backend.console_tail(&self.name, limit).await
    }

    pub async fn console_log(&self) -> Result<Option<PathBuf>> {
        self.backend.console_log(&self.name).await
    }
}

/// scp of big files through a software-emulated guest is slow; this bounds a hung transfer.
const COPY_TIMEOUT: Duration = Duration::from_secs(1800);
const TUNNEL_RETRY: Duration = Duration::from_millis(500);

fn check_snapshot_name(name: &str) -> Result<()> {
    VmName::new(name).map(|_| ()).map_err(|e| match e {
        Error::InvalidArgument { reason, .. } => {
            Error::invalid_arg(format!("snapshot name {name:?}"), reason)
        }
        e => e,
    })
}

fn check_guest_path(p: &str) -> Result<()> {
    if !p.starts_with('/') || p.contains('\0') {
        return Err(Error::invalid_arg(
            format!("guest path {p:?}"),
            "must be absolute and contain no NUL",
        ));
    }
    Ok(())
}

/// Resolve `Auto` ports to leases, define, and give the leases back if defining fails.
pub(crate) async fn define_with_ports(
    backend: &Arc<dyn Backend>,
    ports: &PortAllocator,
    spec: VmSpec,
) -> Result<()> {
    let b = backend.clone();
    with_ports(backend, ports, spec, move |spec| async move {
        b.define(&spec).await
    })
    .await
}

/// Resolve `Auto` ports to leases, run `create` with the concrete spec, and give the leases back
/// if it fails.
async fn with_ports<F, Fut>(
    backend: &Arc<dyn Backend>,
    ports: &PortAllocator,
    mut spec: VmSpec,
    create: F,
) -> Result<()>
where
    F: FnOnce(VmSpec) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    spec.validate()?;
    let uri = backend.uri();
    let vm = spec.name.to_string();
    let resolve = |spec: &mut VmSpec| -> Result<()> {
        for f in &mut spec.forwards {
            let purpose = format!("forward:{}", f.name);
            let port = match f.host_port {
                HostPort::Auto => ports.allocate(&uri, &vm, &purpose, &f.host_addr, f.proto)?,
                HostPort::Fixed(p) => {
                    ports.reserve(&uri, &vm, &purpose, &f.host_addr, f.proto, p)?;
                    p
                }
            };
            f.host_port = HostPort::Fixed(port);
        }
        if let Some(hp) = spec.console.vnc {
            let proto = crate::types::Protocol::Tcp;
            let port = match hp {
                HostPort::Auto => ports.allocate(&uri, &vm, "console:vnc", "127.0.0.1", proto)?,
                HostPort::Fixed(p) => {
                    ports.reserve(&uri, &vm, "console:vnc", "127.0.0.1", proto, p)?;
                    p
                }
            };
            spec.console.vnc = Some(HostPort::Fixed(port));
        }
        Ok(())
    };
    let res = match resolve(&mut spec) {
        Ok(()) => create(spec).await,
        Err(e) => Err(e),
    };
    if res.is_err() {
        let _ = ports.release(&uri, &vm, None);
    }
    res
}

/// The clones that depend on `base` (on its `snapshot`, when given), transitively, deepest first.
pub fn dependants_of(links: &[CloneLink], base: &str, snapshot: Option<&str>) -> Vec<String> {
    let mut seen: std::collections::BTreeSet<String> = std::iter::once(base.to_string()).collect();
    let mut level: Vec<String> = Vec::new();
    for l in links.iter().filter(|l| l.base == base) {
        if (snapshot.is_none() || l.snapshot.as_deref() == snapshot) && seen.insert(l.clone.clone())
        {
            level.push(l.clone.clone());
        }
    }
    let mut levels: Vec<Vec<String>> = Vec::new();
    while !level.is_empty() {
        let mut next = Vec::new();
        for l in links.iter().filter(|l| level.contains(&l.base)) {
            if seen.insert(l.clone.clone()) {
                next.push(l.clone.clone());
            }
        }
        levels.push(std::mem::replace(&mut level, next));
    }
    levels.into_iter().rev().flatten().collect()
}

#[cfg(test)]
mod tests;
