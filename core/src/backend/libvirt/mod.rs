//! libvirt backend (QEMU/KVM, local or remote URIs) through the official `virt` bindings.
//!
//! libvirt calls block, so each runs on tokio's blocking pool under a deadline. Guest exec and
//! file transfer go through the QEMU guest agent; forwards are QEMU user-network `hostfwd` rules,
//! changed at runtime through the monitor and persisted in the definition; readiness is woken by
//! libvirt's agent-lifecycle event.

mod agent;
mod display;
mod doctor;
mod domain_xml;
mod events;
mod guest;
pub(crate) mod host;
mod lifecycle;
mod network;
mod orphans;
mod snapshots;
mod warm;

/// Make `target` a read-only bind mount of `source` (what read-only shares are served from).
pub use crate::util::bindmount::ensure_readonly as ensure_readonly_mount;

use host::HypervisorHost;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
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
    ExecOutput, ExecRequest, OutputSink, PortForward, SharedFolder, SnapshotInfo, VmInfo, VmSpec,
    VmState,
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

/// Keepalive (a dead or hung libvirtd becomes an error instead of a hang) and the event
/// callbacks, on a new connection.
fn prepare(conn: &Connect, tx: &broadcast::Sender<VmEvent>) {
    let _ = conn.set_keep_alive(5, 3);
    if let Err(e) = events::register(conn, tx) {
        tracing::warn!(error = %e, "libvirt events unavailable; readiness falls back to polling");
    }
}

/// What a blocking call needs to use, or reopen, the connection.
struct Link {
    slot: Arc<std::sync::RwLock<Arc<Connect>>>,
    uri: String,
    events: broadcast::Sender<VmEvent>,
}

impl Link {
    /// The current connection, reopened first when libvirtd went away (restarted, the link
    /// dropped): the new one gets the same event callbacks, so subscribers keep receiving.
    /// A call in flight when the connection died fails; the next one reconnects. Blocking.
    fn get(&self) -> Arc<Connect> {
        let current = self.slot.read().unwrap_or_else(|p| p.into_inner()).clone();
        if current.is_alive().unwrap_or(false) {
            return current;
        }
        let mut slot = self.slot.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&slot, &current) {
            return slot.clone(); // another call reconnected meanwhile
        }
        match Connect::open(Some(&self.uri)) {
            Ok(c) => {
                prepare(&c, &self.events);
                tracing::info!(uri = %self.uri, "the libvirt connection was lost; reconnected");
                *slot = Arc::new(c);
                slot.clone()
            }
            // Still down: the call fails with libvirt's own error on the dead connection.
            Err(e) => {
                tracing::warn!(uri = %self.uri, error = %e, "libvirtd is not reachable");
                current
            }
        }
    }
}

/// The libvirt backend (QEMU/KVM, local or over `qemu+ssh://`), through the `virt` bindings.
#[derive(Clone)]
pub struct LibvirtBackend {
    uri: String,
    /// The live connection; replaced when libvirtd restarts or the link drops (shared by
    /// clones of the backend).
    conn: Arc<std::sync::RwLock<Arc<Connect>>>,
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
            after: None,
            probe: "agent".into(),
            last_error: format!("{msg}; is qemu-guest-agent running in the guest?"),
        }
    } else if known(ErrorNumber::OperationTimeout) {
        Error::Timeout {
            ctx: ctx.clone(),
            after: None,
            what: msg,
        }
    } else if known(ErrorNumber::AuthFailed) {
        Error::Auth {
            ctx: ctx.clone(),
            reason: msg,
        }
    } else if msg.contains("client socket is closed") || msg.contains("Cannot recv data") {
        Error::BackendUnavailable {
            ctx: ctx.clone(),
            backend: ID.into(),
            reason: format!(
                "{msg}: libvirtd restarted or the connection dropped; the next call reconnects"
            ),
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
        Error::backend_caused(ctx.clone(), ID, msg, e)
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
                    after: Some(opts.call_timeout),
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
        let (tx, _) = broadcast::channel(256);
        prepare(&conn, &tx);
        Ok(LibvirtBackend {
            uri: uri.to_string(),
            conn: Arc::new(std::sync::RwLock::new(Arc::new(conn))),
            events: tx,
            opts,
            host: HypervisorHost::for_uri(uri),
        })
    }

    /// The options this backend was opened with.
    pub fn options(&self) -> &LibvirtOptions {
        &self.opts
    }

    fn link(&self) -> Link {
        Link {
            slot: self.conn.clone(),
            uri: self.uri.clone(),
            events: self.events.clone(),
        }
    }

    /// The current connection as it is, for work that must not block on a reconnect (drop
    /// guards, fire-and-forget requests).
    fn current_connection(&self) -> Arc<Connect> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Run a blocking libvirt call under the call deadline.
    async fn call<T, F>(&self, ctx: &Ctx, timeout: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let link = self.link();
        let task = tokio::task::spawn_blocking(move || f(&link.get()));
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(Error::backend(
                ctx.clone(),
                ID,
                format!("libvirt call panicked: {join}"),
            )),
            Err(_) => Err(Error::Timeout {
                ctx: ctx.clone(),
                after: Some(timeout),
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

    fn console_path(&self, vm: &VmName) -> PathBuf {
        self.opts.console_dir.join(format!("{vm}.log"))
    }

    fn is_local(&self) -> bool {
        self.host.is_local()
    }

    /// The running QEMU of `vm` (pid, start time), from libvirt's pid file: local system
    /// connections only.
    pub(super) fn qemu_process(&self, vm: &VmName) -> Option<(u32, u64)> {
        if !self.is_local() || !self.uri.ends_with("/system") {
            return None;
        }
        let pid: u32 = std::fs::read_to_string(format!("/run/libvirt/qemu/{vm}.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some((pid, crate::util::process::start_ticks(pid)?))
    }

    /// `op`, unless the VM's QEMU exits first: then at once an error saying so, instead of
    /// whatever libvirt answers once it has cleaned up (about 2 s later).
    async fn unless_qemu_exits<T>(
        &self,
        ctx: Ctx,
        vm: &VmName,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some((pid, ticks)) = self.qemu_process(vm) else {
            return op.await;
        };
        let died = |why: String| {
            Error::InvalidState {
            ctx: ctx.clone(),
            state: format!("not running: {why}"),
            hint: Some(format!(
                "the VM died or was killed; its console log tells why (anyvm console {vm}), then start it again"
            )),
        }
        };
        let exited = self
            .process_exit(vm)
            .unwrap_or_else(|| Box::pin(futures::future::pending()));
        tokio::select! {
            r = op => match r {
                // The agent channel closing with QEMU says no more than that QEMU is gone.
                Err(_) if !crate::util::process::runs(pid, ticks) => {
                    Err(died(format!("its QEMU process (pid {pid}) exited")))
                }
                r => r,
            },
            why = exited => Err(died(why)),
        }
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
            let err = out.stderr_str();
            // qemu-img starts its own messages with "qemu-img: "; the error names the tool.
            let msg = err.trim().trim_start_matches("qemu-img:").trim();
            return Err(Error::backend(ctx.clone(), "qemu-img", msg.to_string()));
        }
        Ok(())
    }

    /// A qcow2 overlay on `backing` (qcow2): a clone's disk.
    async fn create_overlay(&self, ctx: &Ctx, backing: &Path, overlay: &Path) -> Result<()> {
        let args = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]
            .into_iter()
            .map(String::from)
            .chain([backing.display().to_string(), overlay.display().to_string()])
            .collect();
        self.qemu_img(ctx, args).await
    }

    fn host_side<'a>(&'a self, log: &'a Path, ro: &'a Path) -> domain_xml::HostSide<'a> {
        domain_xml::HostSide {
            console_log: log,
            virtiofsd: &self.opts.virtiofsd,
            ro_mounts: ro,
            relay: &self.opts.relay,
            incoming: false,
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
    let (st, reason) = d.state().map_err(|e| map_err(ctx, e))?;
    // Paused by libvirt itself on the way somewhere (being started, saved, snapshotted,
    // migrated): a transition, not a pause anyone asked for.
    use virt::domain::{DomainPausedReason as P, DomainStateReason as R};
    use virt::enumutil::Enum as E;
    let transit = matches!(
        reason,
        E::Known(R::Paused(E::Known(
            P::StartingUp | P::Save | P::Snapshot | P::Migration | P::Dump | P::ShuttingDown
        )))
    );
    Ok(match st {
        virt::enumutil::Enum::Known(S::Paused) if transit => VmState::Busy,
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
        lifecycle::list(self).await
    }

    async fn exists(&self, vm: &VmName) -> Result<bool> {
        lifecycle::exists(self, vm).await
    }

    async fn spec(&self, vm: &VmName) -> Result<Option<VmSpec>> {
        self.dom(&Ctx::vm("read spec", vm), vm, |d, _| Ok(read_spec(d)))
            .await
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        lifecycle::define(self, spec).await
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        lifecycle::undefine(self, vm).await
    }

    async fn discard(&self, vm: &VmName) -> Result<()> {
        lifecycle::discard(self, vm).await
    }

    async fn state(&self, vm: &VmName) -> Result<VmState> {
        self.dom(&Ctx::vm("state", vm), vm, map_state).await
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        lifecycle::start(self, vm).await
    }

    async fn request_shutdown(&self, vm: &VmName) -> Result<()> {
        lifecycle::request_shutdown(self, vm).await
    }

    async fn power_off(&self, vm: &VmName) -> Result<()> {
        lifecycle::power_off(self, vm).await
    }

    async fn reset(&self, vm: &VmName) -> Result<()> {
        lifecycle::reset(self, vm).await
    }

    async fn screenshot(
        &self,
        vm: &VmName,
        _creds: Option<Credentials>,
    ) -> Result<crate::types::Screenshot> {
        display::screenshot(self, vm).await
    }

    async fn pause(&self, vm: &VmName) -> Result<()> {
        lifecycle::pause(self, vm).await
    }

    async fn resume(&self, vm: &VmName) -> Result<()> {
        lifecycle::resume(self, vm).await
    }

    async fn save_state(&self, vm: &VmName) -> Result<()> {
        lifecycle::save_state(self, vm).await
    }

    async fn snapshot_take(&self, vm: &VmName, name: &str, description: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("snapshot take {name}"), vm);
        let take = snapshots::snapshot_take(self, vm, name, description);
        self.unless_qemu_exits(ctx, vm, take).await
    }

    async fn snapshot_restore(&self, vm: &VmName, name: &str) -> Result<()> {
        snapshots::snapshot_restore(self, vm, name).await
    }

    async fn snapshot_delete(&self, vm: &VmName, name: &str) -> Result<()> {
        snapshots::snapshot_delete(self, vm, name).await
    }

    async fn snapshot_list(&self, vm: &VmName) -> Result<Vec<SnapshotInfo>> {
        snapshots::snapshot_list(self, vm).await
    }

    async fn clone_linked(
        &self,
        base: &VmName,
        snapshot: Option<String>,
        clone_spec: &VmSpec,
    ) -> Result<()> {
        snapshots::clone_linked(self, base, snapshot, clone_spec).await
    }

    async fn doctor(&self) -> Vec<crate::health::Check> {
        doctor::checks(self).await
    }

    async fn exec(&self, vm: &VmName, req: &ExecRequest) -> Result<ExecOutput> {
        self.unless_qemu_exits(Ctx::vm("exec", vm), vm, self.exec_captured(vm, req))
            .await
    }

    async fn exec_streaming(
        &self,
        vm: &VmName,
        req: &ExecRequest,
        sink: OutputSink,
    ) -> Result<ExecOutput> {
        self.unless_qemu_exits(Ctx::vm("exec", vm), vm, self.exec_streamed(vm, req, sink))
            .await
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
        let copy = guest::copy_to(self, vm, host, guest, _creds, progress);
        self.unless_qemu_exits(ctx, vm, copy).await
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
        let copy = guest::copy_from(self, vm, guest, host, _creds, progress);
        self.unless_qemu_exits(ctx, vm, copy).await
    }

    async fn read_file(
        &self,
        vm: &VmName,
        guest: &str,
        limit: usize,
        _creds: Option<Credentials>,
    ) -> Result<Vec<u8>> {
        guest::read_file(self, vm, guest, limit, _creds).await
    }

    async fn forwards(&self, vm: &VmName) -> Result<Vec<PortForward>> {
        let ctx = Ctx::vm("forwards", vm);
        Ok(self.stored_spec(&ctx, vm).await?.resolved_forwards())
    }

    async fn shared_folder_add(&self, vm: &VmName, folder: &SharedFolder) -> Result<()> {
        guest::shared_folder_add(self, vm, folder).await
    }

    async fn shared_folder_remove(&self, vm: &VmName, name: &str) -> Result<()> {
        guest::shared_folder_remove(self, vm, name).await
    }

    async fn shared_folders(&self, vm: &VmName) -> Result<Vec<SharedFolder>> {
        let ctx = Ctx::vm("shared folders", vm);
        Ok(self.stored_spec(&ctx, vm).await?.shares)
    }

    async fn forward_add(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        network::forward_add(self, vm, fwd).await
    }

    async fn forward_remove(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        network::forward_remove(self, vm, fwd).await
    }

    async fn agent_ping(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        self.agent(&Ctx::vm("agent ping", vm), vm, agent::ping(), timeout)
            .await
            .map(|_| ())
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<VmEvent>> {
        Some(self.events.subscribe())
    }

    fn warm_unsupported(&self, spec: &VmSpec) -> Option<String> {
        warm::unsupported_reason(self, spec)
    }

    async fn warm_find(&self, template: &VmName, key: &str) -> Result<Option<super::WarmInfo>> {
        Ok(warm::find(self, template, key))
    }

    async fn warm_save(
        &self,
        vm: &VmName,
        template: &VmName,
        key: &str,
        spec: &VmSpec,
    ) -> Result<super::WarmInfo> {
        warm::save(self, vm, template, key, spec).await
    }

    async fn warm_start(&self, template: &VmName, key: &str, clone: &VmSpec) -> Result<()> {
        warm::start(self, template, key, clone).await
    }

    async fn warm_discard(&self, template: &VmName, keep: Option<String>) {
        warm::discard(self, template, keep.as_deref()).await
    }

    fn process_exit(&self, vm: &VmName) -> Option<futures::future::BoxFuture<'static, String>> {
        let (pid, ticks) = self.qemu_process(vm)?;
        Some(Box::pin(async move {
            while crate::util::process::runs(pid, ticks) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            format!("its QEMU process (pid {pid}) exited")
        }))
    }

    async fn console_log(&self, vm: &VmName) -> Result<Option<PathBuf>> {
        Ok(Some(self.console_path(vm)))
    }

    async fn console_tail(&self, vm: &VmName, limit: usize) -> Result<Vec<u8>> {
        lifecycle::console_tail(self, vm, limit).await
    }

    fn forward_host(&self) -> Option<String> {
        self.host.remote_name().map(str::to_string)
    }

    async fn release_stale_host_state(
        &self,
        live: &[String],
        dry_run: bool,
    ) -> Result<super::HostSweep> {
        lifecycle::release_stale_host_state(self, live, dry_run).await
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

/// Every reader of agent replies and libvirt XML, for the parser fuzz drill.
pub(crate) fn fuzz_parse(target: crate::fuzzing::Target, text: &str) {
    use crate::fuzzing::Target as T;
    match target {
        T::AgentReply => {
            if let Ok(v) = agent::ret(text) {
                let _ = agent::int_field(&v, "pid");
                let _ = agent::parse_exec_status(&v);
                let _ = agent::parse_read(&v);
            }
        }
        T::DomainXml => {
            let _ = domain_xml::spec_from_metadata(text);
            for tag in ["creationTime", "state", "name"] {
                let _ = xml_text(text, tag);
            }
        }
        _ => {}
    }
}

/// A spec written into domain metadata must read back equal, whatever its strings hold.
pub(crate) fn fuzz_metadata_roundtrip(spec: &VmSpec) {
    let xml = domain_xml::metadata_element(spec);
    let back = domain_xml::spec_from_metadata(&xml)
        .unwrap_or_else(|e| panic!("metadata written by anyvm does not read back: {e}\n{xml}"));
    assert_eq!(&back, spec, "metadata round trip changed the spec");
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
