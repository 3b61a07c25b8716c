//! The `Vm` handle callers use. It holds a backend and adds the behaviour every backend shares.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::ForwardTransport;
use crate::backend::{Backend, VmEventKind};
use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::events::EventBus;
use crate::name::VmName;
use crate::policy::Policy;
use crate::ports::PortAllocator;
use crate::readiness::{self, ReadyReport, ReadySpec};
use crate::ssh::{self, SshConfig, SshOptions, SshTarget, Tunnels};
use crate::types::{
    DestroyOptions, ExecOutput, ExecRequest, ForwardSpec, GuestChannel, HostPort, PortForward,
    SharedFolder, SnapshotInfo, StopOptions, StopOutcome, VmSpec, VmState, VmStatus,
};
use serde_json::json;

pub use crate::labels::{CLONE_BASE as CLONE_BASE_LABEL, CLONE_SNAPSHOT as CLONE_SNAPSHOT_LABEL};
pub use crate::types::dependants_of;

/// A handle on one VM. Cheap to clone; all methods are async and cancel-safe at await points:
/// a dropped exec kills its guest program, a dropped define or clone leaves nothing half-made.
///
/// ```no_run
/// # async fn demo(client: anyvm::Client) -> anyvm::Result<()> {
/// use anyvm::{ExecRequest, ReadySpec, StopOptions};
/// let vm = client.vm("build1").await?;
/// vm.start().await?;
/// vm.wait_ready(&ReadySpec::default()).await?;
/// let out = vm.exec_checked(&ExecRequest::new("make").arg("-j2").cwd("/src")).await?;
/// vm.copy_from("/src/build.log", "build.log").await?;
/// vm.stop(StopOptions::default()).await?;
/// # let _ = out; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Vm {
    name: VmName,
    backend: Arc<dyn Backend>,
    ports: PortAllocator,
    state_dir: PathBuf,
    credentials: Option<Credentials>,
    channel: GuestChannel,
    policy: Option<Arc<Policy>>,
    events: EventBus,
}

impl Vm {
    pub(crate) fn new(
        name: VmName,
        backend: Arc<dyn Backend>,
        ports: PortAllocator,
        state_dir: PathBuf,
        events: EventBus,
    ) -> Self {
        Vm {
            name,
            backend,
            ports,
            state_dir,
            events,
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

    /// The policy this handle enforces, if any.
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_deref()
    }

    /// Run an operation and, when the policy names an audit log, record it with its outcome.
    /// `args` never holds secrets: callers pass names, paths and argv only.
    pub(crate) async fn audited<T>(
        &self,
        op: &str,
        args: serde_json::Value,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let r = f.await;
        if r.is_ok() {
            let kind = match op {
                "start" => Some(VmEventKind::Started),
                "stop" | "power_off" | "save_state" => Some(VmEventKind::Stopped),
                "pause" => Some(VmEventKind::Paused),
                "resume" => Some(VmEventKind::Resumed),
                _ => None,
            };
            if let Some(k) = kind {
                self.events.vm_changed(self.name.as_str(), k);
            }
        }
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

    /// How exec and copies reach the guest.
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

    /// Credentials, guest channel and policy from the machine's entry in `config` (and its
    /// profile), where it has them. The [`crate::Client`] applies this to every handle it makes.
    pub(crate) fn configured(self, config: Option<&crate::Config>) -> Self {
        let Some(config) = config else {
            return self;
        };
        let name = self.name.as_str();
        let channel = config.machines.get(name).map(|m| m.guest_channel);
        let policy = config.profile_for_machine(name).map(|p| p.policy.clone());
        let mut vm = match config.credentials(name) {
            Some(c) => self.with_credentials(c),
            None => self,
        };
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

    fn with_policy_opt(mut self, p: Option<Arc<Policy>>) -> Self {
        self.policy = p;
        self
    }

    fn with_credentials_opt(mut self, c: Option<Credentials>) -> Self {
        self.credentials = c;
        self
    }

    /// The guest account this handle uses.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// The VM's name.
    pub fn name(&self) -> &VmName {
        &self.name
    }
    /// The backend it lives on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    /// Where leases, known_hosts files and clone disks live.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn ctx(&self, op: &str) -> Ctx {
        Ctx::vm(op, &self.name)
    }

    /// A handle on another VM of the same backend, with this one's settings.
    fn sibling(&self, name: &str) -> Result<Vm> {
        Ok(self.sibling_named(VmName::new(name)?))
    }

    fn sibling_named(&self, name: VmName) -> Vm {
        Vm::new(
            name,
            self.backend.clone(),
            self.ports.clone(),
            self.state_dir.clone(),
            self.events.clone(),
        )
        .with_credentials_opt(self.credentials.clone())
        .with_guest_channel(self.channel)
        .with_policy_opt(self.policy.clone())
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
    // Dropped before it finished (a cancelled define or clone): the leases go back too.
    let mut leases = LeaseGuard {
        ports,
        uri: &uri,
        vm: &vm,
        armed: true,
    };
    let res = match resolve(&mut spec) {
        Ok(()) => {
            tracing::debug!(vm = %vm, phase = "create", "ports leased");
            create(spec).await
        }
        Err(e) => Err(e),
    };
    leases.armed = res.is_err();
    res
}

/// Run the making of a VM to its end on a task of its own, so a caller that goes away (a
/// dropped future, a cancelled job) cannot leave half of it behind: a VM made for a caller
/// that is gone is destroyed (disks, leases and definition).
pub(crate) async fn complete_or_roll_back<F>(make: F) -> Result<Vm>
where
    F: std::future::Future<Output = Result<Vm>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<Vm>>();
    tokio::spawn(async move {
        if let Err(Ok(vm)) = tx.send(make.await) {
            roll_back(vm).await;
        }
    });
    let mut waiting = Unclaimed(Some(rx));
    let r = waiting.0.as_mut().expect("receiver until claimed").await;
    waiting.0 = None;
    r.unwrap_or_else(|_| {
        Err(Error::backend(
            Ctx::new("create VM"),
            "anyvm",
            "the task making the VM ended without a result",
        ))
    })
}

async fn roll_back(vm: Vm) {
    match vm.destroy_one().await {
        Ok(()) => tracing::info!(vm = %vm.name, "its caller went away: the new VM was removed"),
        Err(e) => {
            tracing::warn!(vm = %vm.name, error = %e, "its caller went away, and removing the new VM failed")
        }
    }
}

/// A made VM nobody took: dropped with the value already sent, it is removed here.
struct Unclaimed(Option<tokio::sync::oneshot::Receiver<Result<Vm>>>);

impl Drop for Unclaimed {
    fn drop(&mut self) {
        let Some(mut rx) = self.0.take() else {
            return;
        };
        // From here on the making task sees the receiver gone and rolls back itself.
        rx.close();
        if let Ok(Ok(vm)) = rx.try_recv() {
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(roll_back(vm));
            }
        }
    }
}

/// Gives a VM's port leases back when dropped armed.
struct LeaseGuard<'a> {
    ports: &'a PortAllocator,
    uri: &'a str,
    vm: &'a str,
    armed: bool,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.ports.release(self.uri, self.vm, None);
        }
    }
}

mod display;
mod guest;
mod lifecycle;
mod network;
mod shares;
mod snapshots;
mod stream;
mod warm;

pub use stream::{ExecCanceller, ExecStream};

#[cfg(test)]
mod tests;
