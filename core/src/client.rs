//! Entry point: open a backend by URI and get [`Vm`] handles.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{Backend, BackendUri};
use crate::config::Config;
use crate::error::{Ctx, Error, Result};
use crate::events::{EventBus, EventStream};
use crate::name::VmName;
use crate::ports::{PortAllocator, DEFAULT_PORT_RANGE};
use crate::readiness::ReadySpec;

use crate::types::{UpStep, VmInfo, VmSpec, VmStatus};
use crate::vm::{complete_or_roll_back, define_with_ports, Vm};

/// Options shared by every backend. Build with [`ClientOptions::default`] and the setters.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Port leases, known_hosts files and clone disks live here.
    pub state_dir: PathBuf,
    /// Host ports anyvm allocates forwards from.
    pub port_range: RangeInclusive<u16>,
    /// On a remote libvirt host (`qemu+ssh://`): where clone disks and console logs go there.
    /// The ssh user must be able to write it.
    pub remote_state_dir: PathBuf,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            state_dir: default_state_dir(),
            port_range: DEFAULT_PORT_RANGE,
            remote_state_dir: "/var/lib/anyvm".into(),
        }
    }
}

impl ClientOptions {
    /// Keep leases, known_hosts files and clone disks under `d`.
    pub fn state_dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.state_dir = d.into();
        self
    }
    /// Allocate forward ports from `r`.
    pub fn port_range(mut self, r: RangeInclusive<u16>) -> Self {
        self.port_range = r;
        self
    }
    /// Where a remote libvirt host keeps clone disks and console logs.
    pub fn remote_state_dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.remote_state_dir = d.into();
        self
    }
}

pub use crate::paths::default_state_dir;

/// A connection to one hypervisor, with the configuration its handles follow.
///
/// A client made from an `anyvm.toml` ([`Client::from_config`]) owns it: every [`Vm`] it hands
/// out ([`Client::vm`], [`Client::define`], [`Client::up`], clones of those) already carries the
/// machine's guest account, guest channel and its profile's policy, so no caller can forget them.
///
/// ```no_run
/// # async fn demo() -> anyvm::Result<()> {
/// let client = anyvm::Client::from_config(anyvm::Config::load("anyvm.toml")?).await?;
/// let vm = client.up_machine("build1").await?; // define if needed, start, wait ready
/// for info in client.list().await? {
///     println!("{} {}", info.name, info.state);
/// }
/// # let _ = vm; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    backend: Arc<dyn Backend>,
    ports: PortAllocator,
    opts: ClientOptions,
    config: Option<Arc<Config>>,
    events: EventBus,
}

impl Client {
    /// Open a backend: `libvirt:qemu:///system`, `virtualbox`, `vmware:ws`.
    pub async fn connect(uri: &str) -> Result<Client> {
        Client::connect_with(uri, ClientOptions::default()).await
    }

    /// The backend, state dir and port range of `config`, whose machines' settings every
    /// handle then follows.
    ///
    /// ```no_run
    /// # async fn demo() -> anyvm::Result<()> {
    /// let config = anyvm::Config::load("anyvm.toml")?;
    /// let client = anyvm::Client::from_config(config).await?;
    /// let vm = client.vm("build1").await?; // credentials, channel and policy applied
    /// # Ok(()) }
    /// ```
    pub async fn from_config(config: Config) -> Result<Client> {
        let uri = config.backend_uri();
        let opts = config.client_options();
        Client::connect_configured(&uri, opts, Some(config)).await
    }

    /// [`Client::connect_with`] with a configuration whose machine settings the handles follow
    /// (the URI and options given here win over the config's).
    pub async fn connect_configured(
        uri: &str,
        opts: ClientOptions,
        config: Option<Config>,
    ) -> Result<Client> {
        let mut c = Client::connect_with(uri, opts).await?;
        c.config = config.map(Arc::new);
        Ok(c)
    }

    /// The configuration handles follow, if the client has one.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_deref()
    }

    /// Follow `config`'s machine settings from now on (clients made with
    /// [`Client::with_backend`]).
    pub fn with_config(mut self, config: Config) -> Client {
        self.config = Some(Arc::new(config));
        self
    }

    /// [`Client::connect`] with explicit options.
    pub async fn connect_with(uri: &str, opts: ClientOptions) -> Result<Client> {
        let parsed: BackendUri = uri.parse()?;
        let backend: Arc<dyn Backend> = match parsed {
            #[cfg(feature = "libvirt")]
            BackendUri::Libvirt { uri } => {
                let remote =
                    !crate::backend::libvirt::host::HypervisorHost::for_uri(&uri).is_local();
                // Disks and logs live on the hypervisor host.
                let base = if remote {
                    &opts.remote_state_dir
                } else {
                    &opts.state_dir
                };
                let o = crate::backend::libvirt::LibvirtOptions {
                    images_dir: base.join("images"),
                    console_dir: base.join("console"),
                    // Read-only share mounts are made on this machine (local libvirt only).
                    shares_dir: opts.state_dir.join("shares"),
                    ..Default::default()
                };
                Arc::new(crate::backend::libvirt::LibvirtBackend::open(&uri, o).await?)
            }
            BackendUri::VirtualBox => {
                let o = crate::backend::virtualbox::VirtualBoxOptions {
                    console_dir: opts.state_dir.join("console"),
                    ..Default::default()
                };
                Arc::new(crate::backend::virtualbox::VirtualBoxBackend::new(o)?)
            }
            BackendUri::Vmware { flavor } => {
                let o = crate::backend::vmware::VmwareOptions {
                    flavor,
                    state_dir: opts.state_dir.clone(),
                    ..Default::default()
                };
                Arc::new(crate::backend::vmware::VmwareBackend::new(o)?)
            }
            #[allow(unreachable_patterns)]
            other => {
                return Err(Error::BackendUnavailable {
                    ctx: Ctx::new("connect"),
                    backend: other.to_string(),
                    reason: "this backend is not built into this version of anyvm yet".into(),
                })
            }
        };
        Ok(Client::with_backend(backend, opts))
    }

    /// Wrap an already-open backend (custom backends, tests).
    pub fn with_backend(backend: Arc<dyn Backend>, opts: ClientOptions) -> Client {
        let ports = PortAllocator::new(opts.state_dir.clone(), opts.port_range.clone());
        let events = EventBus::new(backend.subscribe().is_some());
        Client {
            backend,
            ports,
            opts,
            config: None,
            events,
        }
    }

    /// The backend this client drives.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    /// The port allocator its VMs' forwards come from.
    pub fn ports(&self) -> &PortAllocator {
        &self.ports
    }
    /// The options it was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// Everything that happens from now on to this client's VMs, jobs and copies: the
    /// backend's own VM events where it has them (libvirt), else the changes anyvm's operations
    /// make; job phases as they begin; copy progress.
    ///
    /// ```no_run
    /// # async fn demo(client: anyvm::Client) {
    /// let mut events = client.events();
    /// while let Some(e) = events.next().await {
    ///     println!("{e:?}");
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> EventStream {
        self.events.subscribe(|| self.backend.subscribe())
    }

    pub(crate) fn event_bus(&self) -> &EventBus {
        &self.events
    }

    /// Every VM the backend knows.
    pub async fn list(&self) -> Result<Vec<VmInfo>> {
        self.backend.list().await
    }

    /// Every handle is made here, so every handle follows the config.
    fn handle(&self, name: VmName) -> Vm {
        Vm::new(
            name,
            self.backend.clone(),
            self.ports.clone(),
            self.opts.state_dir.clone(),
            self.events.clone(),
        )
        .configured(self.config.as_deref())
    }

    /// Define (from the config) if needed, start and wait until ready with the machine's probes:
    /// `anyvm up NAME`.
    pub async fn up_machine(&self, name: &str) -> Result<Vm> {
        let m = self
            .config
            .as_deref()
            .ok_or_else(|| {
                Error::config(
                    None,
                    format!("machines.{name}"),
                    "the client has no configuration; make it with Client::from_config",
                )
            })?
            .machine(name)?;
        let (spec, ready) = (m.spec.clone(), m.ready.clone());
        self.up(spec, &ready).await
    }

    /// A handle on an existing VM; `NotFound` if the backend does not know it.
    pub async fn vm(&self, name: &str) -> Result<Vm> {
        let name = VmName::new(name)?;
        if !self.backend.exists(&name).await? {
            return Err(Error::NotFound {
                ctx: Ctx::vm("open", &name),
                what: format!(
                    "no such VM on {}; 'anyvm list' shows the defined ones",
                    self.backend.uri()
                ),
            });
        }
        Ok(self.handle(name))
    }

    /// Define a new VM. `Auto` host ports get distinct, leased ports.
    pub async fn define(&self, spec: VmSpec) -> Result<Vm> {
        let name = spec.name.clone();
        if self.backend.exists(&name).await? {
            return Err(Error::InvalidState {
                ctx: Ctx::vm("define", &name),
                state: "already defined".into(),
                hint: Some(format!(
                    "use it as is, or remove it first (anyvm destroy {name})"
                )),
            });
        }
        let (backend, ports, events, vm) = (
            self.backend.clone(),
            self.ports.clone(),
            self.events.clone(),
            self.handle(name.clone()),
        );
        // Cancel-safe: a define whose caller goes away is finished, then removed.
        complete_or_roll_back(async move {
            define_with_ports(&backend, &ports, spec).await?;
            events.vm_changed(name.as_str(), crate::events::VmEventKind::Defined);
            Ok(vm)
        })
        .await
    }

    /// Define if missing, start if not running (resume if paused; a start in progress is
    /// waited for), then wait until ready: the usual "give me a VM".
    pub async fn up(&self, spec: VmSpec, ready: &ReadySpec) -> Result<Vm> {
        self.up_steps(spec, ready, None).await
    }

    /// [`Client::up`], telling `on_step` what it is doing as each step begins.
    pub async fn up_with(
        &self,
        spec: VmSpec,
        ready: &ReadySpec,
        on_step: impl Fn(UpStep) + Send + Sync,
    ) -> Result<Vm> {
        self.up_steps(spec, ready, Some(&on_step)).await
    }

    async fn up_steps(
        &self,
        spec: VmSpec,
        ready: &ReadySpec,
        listener: Option<&(dyn Fn(UpStep) + Send + Sync)>,
    ) -> Result<Vm> {
        ready.validate()?;
        let vm = if self.backend.exists(&spec.name).await? {
            self.handle(spec.name.clone())
        } else {
            tracing::debug!(vm = %spec.name, phase = "define", "up");
            if let Some(f) = listener {
                f(UpStep::Defining);
            }
            self.define(spec).await?
        };
        vm.up_steps(ready, listener).await?;
        Ok(vm)
    }

    /// A VM's state, forwards and snapshots without a separate existence check: one
    /// `showvminfo` on VirtualBox. `NotFound` for an unknown VM.
    pub async fn status(&self, name: &str) -> Result<VmStatus> {
        let name = VmName::new(name)?;
        self.backend.status(&name).await
    }

    /// Health checks: this client's backend, then the host's (state dir, port range).
    pub async fn doctor(&self) -> crate::health::DoctorReport {
        let mut checks = self.backend.doctor().await;
        checks.push(crate::health::check_state_dir(&self.opts.state_dir));
        checks.push(crate::health::check_ports(&self.ports));
        crate::health::DoctorReport { checks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every handle a configured client makes carries the machine's account, channel and
    /// policy: `vm`, `define`, and clones of those.
    #[tokio::test]
    async fn handles_follow_the_clients_config() {
        let cfg = Config::parse(
            r#"
[machines.b1]
disks = [{ path = "/x/sl6.vdi" }]
credentials = { user = "mc", identity_file = "/k" }
guest_channel = "ssh"
ssh_port = 2200
[profiles.mc]
machine = "b1"
policy = { exec_allow = ["/bin/true"] }
"#,
            None,
        )
        .unwrap();
        assert_eq!(
            cfg.machine("b1").unwrap().spec.disks[0].format,
            crate::DiskFormat::Vdi
        );
        let mut b = crate::backend::mock();
        b.expect_exists().returning(|_| Ok(true));
        b.expect_uri().returning(|| "mock".into());
        let dir = tempfile::tempdir().unwrap();
        let client =
            Client::with_backend(Arc::new(b), ClientOptions::default().state_dir(dir.path()))
                .with_config(cfg);
        let vm = client.vm("b1").await.unwrap();
        assert_eq!(vm.credentials().unwrap().user, "mc");
        assert_eq!(vm.ssh_port(), 2200);
        let p = vm.policy().expect("the profile's policy");
        assert!(p.exec_allow.is_some());
        // A VM the config does not describe gets a bare handle.
        let other = client.vm("other").await.unwrap();
        assert!(other.credentials().is_none());
        assert!(other.policy().is_none());
        // A client without config keeps handles bare.
        let mut b = crate::backend::mock();
        b.expect_exists().returning(|_| Ok(true));
        let bare = Client::with_backend(Arc::new(b), ClientOptions::default());
        assert!(bare.vm("b1").await.unwrap().credentials().is_none());
        assert!(bare.config().is_none());
    }
}
