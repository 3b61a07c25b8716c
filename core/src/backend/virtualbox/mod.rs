//! VirtualBox backend, driven through `VBoxManage` with the hardened tool runner (`util::tool`).
//!
//! What this adds over calling VBoxManage by hand: C locale, argv only, every call under a
//! deadline with the process group killed on expiry, "already locked" retried with backoff,
//! `VBoxManage: error:` treated as failure even on exit 0, the guest password passed through a
//! private `--passwordfile` (never argv), readiness from `guestproperty wait` on the Guest
//! Additions run level instead of sleeps, and NAT forwards that use the shared port allocator.

mod doctor;
mod errors;
mod media;
mod parse;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{broadcast, OnceCell};

use super::{Backend, VmEvent};
use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::SharedFolder;
use crate::types::{
    Boot, CloneLink, DiskFormat, ExecOutput, ExecRequest, HostPort, OutputSink, PortForward,
    SnapshotInfo, VmInfo, VmSpec, VmState, VmStatus,
};
use crate::util::command::ToolOutput;
use crate::util::tool::{resolve_binary, ToolRunner};
pub use errors::Failure;

const SPEC_KEY: &str = "anyvm/spec";
const RUN_LEVEL: &str = "/VirtualBox/GuestAdd/RunLevel";
const CONTROLLER: &str = "anyvm-sata";

/// How the VirtualBox backend finds and runs VBoxManage.
#[derive(Debug, Clone)]
pub struct VirtualBoxOptions {
    /// VBoxManage path; `ANYVM_VBOXMANAGE`, then `PATH`, when unset.
    pub vboxmanage: Option<PathBuf>,
    /// Deadline for ordinary calls.
    pub call_timeout: Duration,
    /// Deadline for calls that copy disks (clone, import).
    pub long_timeout: Duration,
    /// How often an "already locked" call is retried before giving up.
    pub lock_retries: u32,
    /// `headless`, `gui` or `separate`.
    pub start_type: String,
    /// Guest Additions run level that counts as ready (2 = services, 3 = desktop session).
    pub ready_run_level: u32,
    /// Guest properties that must also have a value before the guest counts as ready, e.g.
    /// `/VirtualBox/GuestInfo/Net/0/V4/IP` (networking up) or
    /// `/VirtualBox/GuestInfo/OS/LoggedInUsers` (a user logged in; "0" counts as no value).
    pub ready_properties: Vec<String>,
    /// Where serial console logs are written.
    pub console_dir: PathBuf,
    /// Extra environment for VBoxManage, e.g. `VBOX_USER_HOME` to pick a VirtualBox home.
    pub env: Vec<(String, String)>,
}

impl Default for VirtualBoxOptions {
    fn default() -> Self {
        VirtualBoxOptions {
            vboxmanage: None,
            call_timeout: Duration::from_secs(60),
            long_timeout: Duration::from_secs(1800),
            lock_retries: 5,
            start_type: "headless".into(),
            ready_run_level: 2,
            ready_properties: Vec::new(),
            console_dir: crate::paths::default_state_dir().join("console"),
            env: Vec::new(),
        }
    }
}

/// How one `guestcontrol` call runs.
struct GuestCall {
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    /// The exit code is the guest program's: only VBoxManage's own error lines mean failure.
    raw: bool,
    /// Forward the guest program's output here as VBoxManage relays it.
    sink: Option<OutputSink>,
}

#[derive(Debug)]
pub struct VirtualBoxBackend {
    tool: ToolRunner,
    opts: VirtualBoxOptions,
    version: OnceCell<(u32, u32, u32)>,
}

/// Formats VirtualBox attaches as hard disks.
const ATTACHABLE: [DiskFormat; 3] = [DiskFormat::Vdi, DiskFormat::Vmdk, DiskFormat::Vhd];

/// VBoxSVC is one process per user and IPC socket; a second VBOX_USER_HOME under the same user
/// silently talks to the first one's VBoxSVC and registry. A socket id per home keeps them apart.
fn ipc_socket_id(home: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in home.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("anyvm-{:012x}", h & 0xffff_ffff_ffff)
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

fn rule(f: &PortForward) -> String {
    format!(
        "{},{},{},{},,{}",
        f.name, f.proto, f.host_addr, f.host_port, f.guest_port
    )
}

impl VirtualBoxBackend {
    pub fn new(opts: VirtualBoxOptions) -> Result<Self> {
        let program = resolve_binary("VBoxManage", opts.vboxmanage.as_deref(), "ANYVM_VBOXMANAGE")?;
        let mut tool = ToolRunner::new(program, opts.call_timeout);
        tool.env = opts.env.clone();
        let home = tool
            .env
            .iter()
            .find(|(k, _)| k == "VBOX_USER_HOME")
            .map(|(_, v)| v.clone());
        if let Some(home) = home {
            if !tool.env.iter().any(|(k, _)| k == "VBOX_IPC_SOCKETID") {
                tool.env
                    .push(("VBOX_IPC_SOCKETID".into(), ipc_socket_id(&home)));
            }
        }
        Ok(VirtualBoxBackend {
            tool,
            opts,
            version: OnceCell::new(),
        })
    }

    /// VBoxManage calls made so far, by subcommand.
    pub fn invocations(&self) -> std::collections::BTreeMap<String, u64> {
        self.tool.invocations()
    }

    /// `(major, minor, patch)`, asked once; 6.1 and later are supported.
    pub async fn version(&self) -> Result<(u32, u32, u32)> {
        self.version
            .get_or_try_init(|| async {
                let ctx = Ctx::new("VBoxManage --version");
                let out = self
                    .tool
                    .run(
                        &ctx,
                        os(&["--version"]),
                        None,
                        None,
                        "VBoxManage --version".into(),
                    )
                    .await?;
                let (out, _) = strip(out);
                let v = parse::version(&out.stdout_str())
                    .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?;
                if v < (6, 1, 0) {
                    return Err(Error::BackendUnavailable {
                        ctx,
                        backend: "virtualbox".into(),
                        reason: format!(
                            "VirtualBox {}.{}.{} is too old; 6.1 or later is needed",
                            v.0, v.1, v.2
                        ),
                    });
                }
                Ok(v)
            })
            .await
            .copied()
    }

    /// Run VBoxManage; retry while the VM is locked by another session; classify failures.
    async fn vbox(&self, ctx: &Ctx, args: Vec<OsString>) -> Result<ToolOutput> {
        self.vbox_with(ctx, args, None, None).await
    }

    async fn vbox_with(
        &self,
        ctx: &Ctx,
        args: Vec<OsString>,
        stdin: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<ToolOutput> {
        self.vbox_call(ctx, args, stdin, timeout).await.0
    }

    /// [`Self::vbox_with`], also returning the kernel-driver WARNING the (last) call printed:
    /// it is that call's own, so concurrent calls cannot mix theirs up.
    async fn vbox_call(
        &self,
        ctx: &Ctx,
        args: Vec<OsString>,
        stdin: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> (Result<ToolOutput>, Option<String>) {
        let shown = format!(
            "VBoxManage {}",
            args.iter()
                .take(3)
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut delay = Duration::from_millis(200);
        for attempt in 0..=self.opts.lock_retries {
            let out = match self
                .tool
                .run(ctx, args.clone(), stdin.clone(), timeout, shown.clone())
                .await
            {
                Ok(o) => o,
                Err(e) => return (Err(e), None),
            };
            let (out, driver) = strip(out);
            match errors::classify(&out) {
                None => return (Ok(out), driver),
                Some(Failure::Busy(m)) if attempt < self.opts.lock_retries => {
                    tracing::debug!(call = %shown, attempt, "VM locked, retrying: {m}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(3));
                }
                Some(f) => return (Err(errors::to_error(ctx, f)), driver),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// `list -l hdds`: every registered hard disk with its parent and users.
    async fn media(&self, ctx: &Ctx) -> Result<Vec<parse::Medium>> {
        let out = self.vbox(ctx, os(&["list", "-l", "hdds"])).await?;
        parse::media(&out.stdout_str()).map_err(|m| {
            Error::backend(
                ctx.clone(),
                "VBoxManage",
                format!("unreadable 'list -l hdds' output: {m}"),
            )
        })
    }

    /// VM UUID -> name, from `list vms`.
    async fn vm_names(&self, ctx: &Ctx) -> Result<std::collections::BTreeMap<String, String>> {
        let out = self.vbox(ctx, os(&["list", "vms"])).await?;
        Ok(parse::list(&out.stdout_str())
            .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?
            .into_iter()
            .map(|(name, uuid)| (uuid, name))
            .collect())
    }

    async fn info(&self, ctx: &Ctx, vm: &VmName) -> Result<Vec<(String, String)>> {
        let out = self
            .vbox(ctx, os(&["showvminfo", vm.as_str(), "--machinereadable"]))
            .await?;
        parse::machine_readable(&out.stdout_str()).map_err(|m| {
            Error::backend(
                ctx.clone(),
                "VBoxManage",
                format!("unreadable showvminfo output: {m}"),
            )
        })
    }

    fn state_of(ctx: &Ctx, kv: &[(String, String)]) -> Result<VmState> {
        let s = parse::get(kv, "VMState").ok_or_else(|| {
            Error::backend(
                ctx.clone(),
                "VBoxManage",
                "showvminfo output has no VMState",
            )
        })?;
        Ok(parse::vm_state(s))
    }

    fn console_path(&self, vm: &VmName) -> PathBuf {
        self.opts.console_dir.join(format!("{vm}.log"))
    }

    async fn store_spec(&self, ctx: &Ctx, spec: &VmSpec) -> Result<()> {
        let json = serde_json::to_string(spec).expect("spec serializes");
        self.vbox(
            ctx,
            vec![
                "setextradata".into(),
                spec.name.as_str().into(),
                SPEC_KEY.into(),
                json.into(),
            ],
        )
        .await
        .map(|_| ())
    }

    /// `modifyvm` arguments for cpus, memory, NAT with forwards, console and serial log.
    fn modify_args(&self, spec: &VmSpec) -> Vec<OsString> {
        let mut a = os(&["modifyvm", spec.name.as_str(), "--memory"]);
        a.push(spec.memory_mib.to_string().into());
        a.push("--cpus".into());
        a.push(spec.cpus.to_string().into());
        a.extend(os(&["--nic1", "nat"]));
        for f in spec.resolved_forwards() {
            a.push("--natpf1".into());
            a.push(rule(&f).into());
        }
        if let Some(HostPort::Fixed(p)) = spec.console.vnc {
            a.extend(os(&[
                "--vrde",
                "on",
                "--vrdeaddress",
                "127.0.0.1",
                "--vrdeport",
            ]));
            a.push(p.to_string().into());
        }
        a.extend(os(&["--uart1", "0x3F8", "4", "--uartmode1", "file"]));
        a.push(self.console_path(&spec.name).into_os_string());
        a
    }

    /// [`Self::modify_args`] for a VM that came with NAT rules of its own (a clone, an imported
    /// appliance): they are deleted first, so the spec's forwards replace them.
    async fn modify_replacing_forwards(&self, ctx: &Ctx, spec: &VmSpec) -> Result<Vec<OsString>> {
        let inherited = parse::forwards(&self.info(ctx, &spec.name).await?, 1)
            .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?;
        let mut a = self.modify_args(spec);
        for f in inherited {
            a.insert(2, f.name.into());
            a.insert(2, "delete".into());
            a.insert(2, "--natpf1".into());
        }
        Ok(a)
    }

    /// Every configured readiness property has a (non-"0") value.
    async fn ready_properties(&self, ctx: &Ctx, vm: &VmName) -> Result<()> {
        for prop in &self.opts.ready_properties {
            let out = self
                .vbox(ctx, os(&["guestproperty", "get", vm.as_str(), prop]))
                .await?;
            match parse::guest_property(&out.stdout_str()) {
                Some(v) if !v.trim().is_empty() && v.trim() != "0" => {}
                v => {
                    return Err(Error::backend(
                        ctx.clone(),
                        "VBoxManage",
                        format!(
                            "guest property {prop} is {}, waiting for a value",
                            v.map(|v| format!("{v:?}"))
                                .unwrap_or_else(|| "unset".into())
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Change NAT rules of NIC 1: live (`controlvm natpf1`) when the VM runs, in its settings
    /// (`modifyvm --natpf1`) otherwise.
    async fn natpf1(&self, ctx: &Ctx, vm: &VmName, rule_args: &[&str]) -> Result<()> {
        let live = !matches!(
            self.state(vm).await?,
            VmState::ShutOff | VmState::Saved | VmState::Crashed
        );
        let mut a = if live {
            os(&["controlvm", vm.as_str(), "natpf1"])
        } else {
            os(&["modifyvm", vm.as_str(), "--natpf1"])
        };
        a.extend(os(rule_args));
        self.vbox(ctx, a).await.map(|_| ())
    }

    /// Write the password to a private file that lives for one call.
    fn password_file(
        &self,
        ctx: &Ctx,
        creds: &Credentials,
    ) -> Result<Option<tempfile::NamedTempFile>> {
        let Some(src) = &creds.password else {
            return Ok(None);
        };
        let secret = src.resolve(ctx)?;
        let mut f = tempfile::Builder::new()
            .prefix(".anyvm-pw-")
            .tempfile()
            .map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
        // NamedTempFile is created 0600.
        f.write_all(secret.expose().as_bytes())
            .and_then(|_| f.flush())
            .map_err(|e| Error::io(ctx.clone(), f.path(), e))?;
        Ok(Some(f))
    }

    fn need_creds(ctx: &Ctx, creds: Option<&Credentials>) -> Result<Credentials> {
        super::require_credentials(ctx, creds, "VirtualBox guest control")
    }

    /// `guestcontrol VM SUBCMD --username U [--passwordfile F] ...rest`
    async fn guestcontrol(
        &self,
        ctx: &Ctx,
        vm: &VmName,
        sub: &str,
        creds: &Credentials,
        rest: Vec<OsString>,
        call: GuestCall,
    ) -> Result<ToolOutput> {
        let pw = self.password_file(ctx, creds)?;
        let mut args = os(&["guestcontrol", vm.as_str(), sub, "--username", &creds.user]);
        if let Some(f) = &pw {
            args.push("--passwordfile".into());
            args.push(f.path().as_os_str().to_owned());
        }
        args.extend(rest);
        let display = format!("VBoxManage guestcontrol {vm} {sub}");
        let GuestCall {
            stdin,
            timeout,
            raw,
            sink,
        } = call;
        if raw {
            // Exit code is the guest program's: classify only VBoxManage's own error lines.
            let out = self
                .tool
                .run_into(ctx, args, stdin, Some(timeout), display, sink)
                .await?;
            if !errors::error_lines(&out.stderr_str()).is_empty() {
                return Err(errors::to_error(
                    ctx,
                    errors::classify(&out).expect("has error lines"),
                ));
            }
            Ok(out)
        } else {
            self.vbox_with(ctx, args, stdin, Some(timeout)).await
        }
    }

    /// `guestcontrol run`, its output forwarded to `sink` as VBoxManage relays it.
    async fn exec_into(
        &self,
        vm: &VmName,
        req: &ExecRequest,
        sink: Option<OutputSink>,
    ) -> Result<ExecOutput> {
        let ctx = Ctx::vm(format!("exec {}", req.program), vm);
        let creds = Self::need_creds(&ctx, req.credentials.as_ref())?;
        let (major, _, _) = self.version().await?;
        let started = Instant::now();
        let mut rest: Vec<OsString> = Vec::new();
        let (exe, argv): (String, Vec<String>) = match (&req.cwd, major >= 7) {
            (Some(d), true) => {
                rest.push("--cwd".into());
                rest.push(d.into());
                (
                    req.program.clone(),
                    std::iter::once(req.program.clone())
                        .chain(req.args.iter().cloned())
                        .collect(),
                )
            }
            // 6.1 has no --cwd: a fixed prologue takes the directory as a parameter.
            (Some(d), false) => {
                let mut a = vec![
                    "sh".to_string(),
                    "-c".into(),
                    "cd -- \"$1\" || exit 127; shift; exec \"$@\"".into(),
                    "sh".into(),
                    d.clone(),
                    req.program.clone(),
                ];
                a.extend(req.args.iter().cloned());
                ("/bin/sh".into(), a)
            }
            (None, _) => (
                req.program.clone(),
                std::iter::once(req.program.clone())
                    .chain(req.args.iter().cloned())
                    .collect(),
            ),
        };
        rest.extend(os(&[
            "--exe",
            &exe,
            "--wait-stdout",
            "--wait-stderr",
            "--timeout",
        ]));
        // VBoxManage reads the limit as a 32-bit millisecond count (about 49 days); longer
        // limits are anyvm's own deadline alone.
        rest.push(
            req.timeout
                .as_millis()
                .min(u128::from(u32::MAX))
                .to_string()
                .into(),
        );
        for (k, v) in &req.env {
            rest.push("--putenv".into());
            rest.push(format!("{k}={v}").into());
        }
        rest.push("--".into());
        rest.extend(argv.into_iter().map(OsString::from));
        // VBoxManage's own deadline is the guest timeout; ours adds slack so its report arrives.
        let out = self
            .guestcontrol(
                &ctx,
                vm,
                "run",
                &creds,
                rest,
                GuestCall {
                    stdin: req.stdin.clone(),
                    timeout: req.timeout + Duration::from_secs(15),
                    raw: true,
                    sink,
                },
            )
            .await?;
        if started.elapsed() >= req.timeout {
            return Err(Error::Timeout {
                ctx,
                after: req.timeout,
                what: format!("'{}' to exit", req.display_argv()),
            });
        }
        Ok(ExecOutput {
            exit_code: out.code,
            signal: None,
            stdout: out.stdout,
            stderr: out.stderr,
            duration: started.elapsed(),
            stdout_truncated: false,
            stderr_truncated: false,
        })
    }
}

#[async_trait]
impl Backend for VirtualBoxBackend {
    fn id(&self) -> &str {
        "virtualbox"
    }
    fn uri(&self) -> String {
        "virtualbox".into()
    }

    async fn list(&self) -> Result<Vec<VmInfo>> {
        let ctx = Ctx::new("list");
        self.version().await?;
        let all = parse::list(&self.vbox(&ctx, os(&["list", "vms"])).await?.stdout_str())
            .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?;
        let running = parse::list(
            &self
                .vbox(&ctx, os(&["list", "runningvms"]))
                .await?
                .stdout_str(),
        )
        .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?;
        Ok(all
            .into_iter()
            .map(|(name, uuid)| VmInfo {
                state: if running.iter().any(|(_, u)| *u == uuid) {
                    VmState::Running
                } else {
                    VmState::ShutOff
                },
                name,
                // Knowing would cost one getextradata per VM.
                managed: None,
            })
            .collect())
    }

    async fn exists(&self, vm: &VmName) -> Result<bool> {
        match self.info(&Ctx::vm("lookup", vm), vm).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn spec(&self, vm: &VmName) -> Result<Option<VmSpec>> {
        let ctx = Ctx::vm("read spec", vm);
        let out = self
            .vbox(&ctx, os(&["getextradata", vm.as_str(), SPEC_KEY]))
            .await?;
        match parse::guest_property(&out.stdout_str()) {
            None => Ok(None),
            Some(json) => serde_json::from_str(&json).map(Some).map_err(|e| {
                Error::backend(
                    ctx,
                    "VBoxManage",
                    format!("anyvm spec in extradata is unreadable: {e}"),
                )
            }),
        }
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        let ctx = Ctx::vm("define", &spec.name);
        spec.validate()?;
        super::require_nat_network(&ctx, self.id(), spec)?;
        self.version().await?;
        if let Boot::Kernel { .. } | Boot::Existing { .. } = spec.boot {
            return Err(Error::InvalidState {
                ctx,
                state: "direct kernel boot requested".into(),
                hint: Some(
                    "VirtualBox boots from disks or appliances; use a disk image or an OVA".into(),
                ),
            });
        }
        for d in &spec.disks {
            if !ATTACHABLE.contains(&d.format) {
                return Err(Error::InvalidArgument {
                    what: format!("disk {}", d.path.display()),
                    reason: format!(
                        "VirtualBox cannot attach {} images (it takes vdi, vmdk and vhd); convert it first: qemu-img convert -O vdi {} {}",
                        d.format,
                        d.path.display(),
                        d.path.with_extension("vdi").display()
                    ),
                });
            }
            if !d.path.exists() {
                return Err(Error::NotFound {
                    ctx,
                    what: format!("host file {}", d.path.display()),
                });
            }
        }
        std::fs::create_dir_all(&self.opts.console_dir)
            .map_err(|e| Error::io(ctx.clone(), &self.opts.console_dir, e))?;
        let name = spec.name.as_str();
        match &spec.boot {
            Boot::Appliance { path } => {
                if !path.exists() {
                    return Err(Error::NotFound {
                        ctx,
                        what: format!("appliance {}", path.display()),
                    });
                }
                let mut a = os(&["import"]);
                a.push(path.as_os_str().to_owned());
                a.extend(os(&["--vsys", "0", "--vmname", name]));
                self.vbox_with(&ctx, a, None, Some(self.opts.long_timeout))
                    .await?;
            }
            _ => {
                self.vbox(
                    &ctx,
                    os(&[
                        "createvm",
                        "--name",
                        name,
                        "--ostype",
                        "Linux_64",
                        "--register",
                    ]),
                )
                .await?;
            }
        }
        // From here on a failure unregisters the half-made VM: a failed define changes nothing.
        let rest: Result<()> = async {
            let modify = match spec.boot {
                Boot::Appliance { .. } => self.modify_replacing_forwards(&ctx, spec).await?,
                _ => self.modify_args(spec),
            };
            self.vbox(&ctx, modify).await?;
            if !spec.disks.is_empty() {
                let n = spec.disks.len().max(1).to_string();
                self.vbox(
                    &ctx,
                    os(&[
                        "storagectl",
                        name,
                        "--name",
                        CONTROLLER,
                        "--add",
                        "sata",
                        "--portcount",
                        &n,
                    ]),
                )
                .await?;
                for (i, d) in spec.disks.iter().enumerate() {
                    let mut a = os(&[
                        "storageattach",
                        name,
                        "--storagectl",
                        CONTROLLER,
                        "--port",
                        &i.to_string(),
                        "--device",
                        "0",
                        "--type",
                        "hdd",
                        "--medium",
                    ]);
                    a.push(d.path.as_os_str().to_owned());
                    if d.readonly {
                        a.extend(os(&["--mtype", "readonly"]));
                    }
                    self.vbox(&ctx, a).await?;
                }
            }
            for s in &spec.shares {
                self.shared_folder_add(&spec.name, s).await?;
            }
            self.store_spec(&ctx, spec).await
        }
        .await;
        if let Err(e) = rest {
            let _ = self.undefine(&spec.name).await;
            return Err(e);
        }
        Ok(())
    }

    /// Remove the VM, its snapshots and every medium only it used, without ever deleting the
    /// user's own disks. `unregistervm --delete` cannot do that: it deletes every disk it can,
    /// and a user disk still referenced by a snapshot makes it fail after unregistering, leaving
    /// the differencing media registered. So: refuse up front when linked clones depend on the
    /// VM; otherwise unregister, then close the VM's media leaves first, deleting differencing
    /// images and images VirtualBox made in the machine folder, keeping (only unregistering)
    /// the rest; then remove the machine's own files.
    async fn undefine(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("undefine", vm);
        let kv = self.info(&ctx, vm).await?;
        let uuid = parse::get(&kv, "UUID").unwrap_or_default().to_string();
        let cfg = parse::get(&kv, "CfgFile").map(PathBuf::from);
        let folder = cfg.as_ref().and_then(|c| c.parent()).map(Path::to_path_buf);
        let spec = self.spec(vm).await.ok().flatten();
        let before = self.media(&ctx).await?;
        let names = self.vm_names(&ctx).await?;
        let deps: std::collections::BTreeSet<String> = media::clone_links(&before, &names)
            .into_iter()
            .filter(|l| l.base == vm.as_str())
            .map(|l| l.clone)
            .collect();
        if !deps.is_empty() {
            return Err(Error::InvalidState {
                ctx,
                state: format!(
                    "has linked clones: {}",
                    deps.into_iter().collect::<Vec<_>>().join(", ")
                ),
                hint: Some("destroy the clones first, or destroy with --with-clones".into()),
            });
        }
        let keep: Vec<PathBuf> = spec
            .as_ref()
            .map(|s| {
                s.disks
                    .iter()
                    .filter(|d| !d.owned)
                    .flat_map(|d| {
                        [
                            d.path.clone(),
                            std::fs::canonicalize(&d.path).unwrap_or_default(),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mine: Vec<parse::Medium> = media::media_of(&before, &uuid)
            .into_iter()
            .cloned()
            .collect();

        self.vbox(&ctx, os(&["unregistervm", vm.as_str()])).await?;

        // From here the VM is gone from VirtualBox: finish the clean-up, report what could not.
        let mut problems: Vec<String> = Vec::new();
        let after = self.media(&ctx).await.unwrap_or_default();
        for m in &mine {
            let loc = PathBuf::from(&m.location);
            let registered = after.iter().any(|a| a.uuid == m.uuid);
            if registered && media::still_needed(&after, &m.uuid) {
                continue; // shared with another VM: stays registered
            }
            let made_for_vm = folder.as_ref().is_some_and(|f| loc.starts_with(f));
            let delete = !keep.contains(&loc) && (m.differencing || made_for_vm);
            if registered {
                let mut a = os(&["closemedium", "disk"]);
                a.push(loc.clone().into_os_string());
                if delete {
                    a.push("--delete".into());
                }
                if let Err(e) = self.vbox(&ctx, a).await {
                    problems.push(format!("{}: {e}", loc.display()));
                }
            } else if delete {
                if let Err(e) = std::fs::remove_file(&loc) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        problems.push(format!("{}: {e}", loc.display()));
                    }
                }
            }
        }
        if let (Some(cfg), Some(folder)) = (&cfg, &folder) {
            remove_machine_files(&kv, cfg, folder);
        }
        let _ = std::fs::remove_file(self.console_path(vm));
        // A clone made at the base's current state left a snapshot on the base: drop it too.
        let auto = spec.as_ref().and_then(|s| {
            (!s.labels.contains_key(crate::labels::CLONE_SNAPSHOT))
                .then(|| s.labels.get(crate::labels::CLONE_BASE))
                .flatten()
        });
        if let Some(base) = auto {
            let snap = format!("anyvm-clone-{vm}");
            if let Err(e) = self
                .vbox(&ctx, os(&["snapshot", base, "delete", &snap]))
                .await
            {
                if !matches!(e, Error::NotFound { .. }) {
                    tracing::warn!(vm = %vm, base = %base, error = %e, "could not delete the clone's base snapshot");
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::backend(
                ctx,
                "VBoxManage",
                format!(
                    "the VM is unregistered, but these media could not be removed: {}; remove them with 'VBoxManage closemedium disk PATH --delete'",
                    problems.join("; ")
                ),
            ))
        }
    }

    async fn state(&self, vm: &VmName) -> Result<VmState> {
        let ctx = Ctx::vm("state", vm);
        let kv = self.info(&ctx, vm).await?;
        Self::state_of(&ctx, &kv)
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("start", vm);
        let args = os(&["startvm", vm.as_str(), "--type", &self.opts.start_type]);
        match self.vbox_call(&ctx, args, None, None).await {
            (Ok(_), _) => Ok(()),
            (Err(e), driver) => {
                if let Some(w) = driver {
                    return Err(Error::BackendUnavailable {
                        ctx,
                        backend: "virtualbox".into(),
                        reason: format!(
                            "VirtualBox cannot start VMs on this host: its kernel driver is not loaded ({w}); install virtualbox-dkms and the headers of the running kernel, then load it (modprobe vboxdrv). VBoxManage said: {e}"
                        ),
                    });
                }
                // Some versions exit 1 after a successful start; the state says the truth.
                if matches!(e, Error::Backend { .. })
                    && self.state(vm).await.ok() == Some(VmState::Running)
                {
                    return Ok(());
                }
                Err(e)
            }
        }
    }

    async fn request_shutdown(&self, vm: &VmName) -> Result<()> {
        self.vbox(
            &Ctx::vm("shutdown", vm),
            os(&["controlvm", vm.as_str(), "acpipowerbutton"]),
        )
        .await
        .map(|_| ())
    }

    async fn reset(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("reset", vm);
        self.vbox(&ctx, os(&["controlvm", vm.as_str(), "reset"]))
            .await
            .map(|_| ())
    }

    async fn power_off(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("power off", vm);
        match self
            .vbox(&ctx, os(&["controlvm", vm.as_str(), "poweroff"]))
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::InvalidState { .. })
                if matches!(self.state(vm).await, Ok(VmState::ShutOff | VmState::Saved)) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn pause(&self, vm: &VmName) -> Result<()> {
        self.vbox(
            &Ctx::vm("pause", vm),
            os(&["controlvm", vm.as_str(), "pause"]),
        )
        .await
        .map(|_| ())
    }

    async fn resume(&self, vm: &VmName) -> Result<()> {
        self.vbox(
            &Ctx::vm("resume", vm),
            os(&["controlvm", vm.as_str(), "resume"]),
        )
        .await
        .map(|_| ())
    }

    async fn save_state(&self, vm: &VmName) -> Result<()> {
        self.vbox(
            &Ctx::vm("save state", vm),
            os(&["controlvm", vm.as_str(), "savestate"]),
        )
        .await
        .map(|_| ())
    }

    async fn snapshot_take(&self, vm: &VmName, name: &str, description: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("snapshot take {name}"), vm);
        let mut a = os(&[
            "snapshot",
            vm.as_str(),
            "take",
            name,
            "--description",
            description,
        ]);
        if self.state(vm).await? == VmState::Running {
            a.push("--live".into());
        }
        self.vbox_with(&ctx, a, None, Some(self.opts.long_timeout))
            .await
            .map(|_| ())
    }

    async fn snapshot_restore(&self, vm: &VmName, name: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("snapshot restore {name}"), vm);
        self.vbox_with(
            &ctx,
            os(&["snapshot", vm.as_str(), "restore", name]),
            None,
            Some(self.opts.long_timeout),
        )
        .await
        .map(|_| ())
    }

    async fn snapshot_delete(&self, vm: &VmName, name: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("snapshot delete {name}"), vm);
        self.vbox_with(
            &ctx,
            os(&["snapshot", vm.as_str(), "delete", name]),
            None,
            Some(self.opts.long_timeout),
        )
        .await
        .map(|_| ())
    }

    async fn snapshot_list(&self, vm: &VmName) -> Result<Vec<SnapshotInfo>> {
        // showvminfo carries the same SnapshotName keys as 'snapshot list', and answers a VM
        // without snapshots with success instead of exit 1.
        let ctx = Ctx::vm("snapshot list", vm);
        Ok(snapshot_infos(&self.info(&ctx, vm).await?))
    }

    async fn clone_linked(
        &self,
        base: &VmName,
        snapshot: Option<String>,
        clone: &VmSpec,
    ) -> Result<()> {
        let ctx = Ctx::vm(format!("clone to {}", clone.name), base);
        let snap = match snapshot {
            Some(s) => s,
            None => {
                // VirtualBox links clones to a snapshot; make one of the current state.
                let s = format!("anyvm-clone-{}", clone.name);
                self.snapshot_take(base, &s, "base of a linked clone made by anyvm")
                    .await?;
                s
            }
        };
        let a = os(&[
            "clonevm",
            base.as_str(),
            "--snapshot",
            &snap,
            "--options",
            "link",
            "--name",
            clone.name.as_str(),
            "--register",
        ]);
        self.vbox_with(&ctx, a, None, Some(self.opts.long_timeout))
            .await?;
        let rest: Result<()> = async {
            // The clone inherited the base's forwards (same host ports): replace them.
            let a = self.modify_replacing_forwards(&ctx, clone).await?;
            self.vbox(&ctx, a).await?;
            let mut spec = clone.clone();
            // Its disks are differencing images VirtualBox made: deleted with the clone.
            spec.disks.iter_mut().for_each(|d| d.owned = true);
            self.store_spec(&ctx, &spec).await
        }
        .await;
        if let Err(e) = rest {
            let _ = self
                .vbox(&ctx, os(&["unregistervm", clone.name.as_str(), "--delete"]))
                .await;
            return Err(e);
        }
        Ok(())
    }

    async fn exec(&self, vm: &VmName, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_into(vm, req, None).await
    }

    async fn exec_streaming(
        &self,
        vm: &VmName,
        req: &ExecRequest,
        sink: OutputSink,
    ) -> Result<ExecOutput> {
        let mut out = self.exec_into(vm, req, Some(sink)).await?;
        // The output went to the sink; what the call kept is only its tail.
        out.stdout.clear();
        out.stderr.clear();
        Ok(out)
    }

    async fn copy_to(
        &self,
        vm: &VmName,
        host: &Path,
        guest: &str,
        creds: Option<Credentials>,
        _progress: crate::events::CopyProgress,
    ) -> Result<u64> {
        let ctx = Ctx::vm(format!("copy {} to {guest}", host.display()), vm);
        let creds = Self::need_creds(&ctx, creds.as_ref())?;
        let (dir, base) = guest
            .rsplit_once('/')
            .ok_or_else(|| Error::invalid_arg("guest path", "must be absolute"))?;
        let dir = if dir.is_empty() { "/" } else { dir };
        // copyto keeps the source's file name: stage the file under the target name.
        let stage =
            tempfile::tempdir().map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
        let staged = stage.path().join(base);
        let n = std::fs::copy(host, &staged).map_err(|e| Error::io(ctx.clone(), host, e))?;
        let mut rest = os(&["--target-directory", dir]);
        rest.push(staged.into_os_string());
        self.guestcontrol(
            &ctx,
            vm,
            "copyto",
            &creds,
            rest,
            GuestCall {
                stdin: None,
                timeout: self.opts.long_timeout,
                raw: false,
                sink: None,
            },
        )
        .await?;
        Ok(n)
    }

    async fn copy_from(
        &self,
        vm: &VmName,
        guest: &str,
        host: &Path,
        creds: Option<Credentials>,
        _progress: crate::events::CopyProgress,
    ) -> Result<u64> {
        let ctx = Ctx::vm(format!("copy {guest} to {}", host.display()), vm);
        let creds = Self::need_creds(&ctx, creds.as_ref())?;
        let base = guest.rsplit('/').next().unwrap_or("file");
        let stage =
            tempfile::tempdir().map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
        let mut rest = os(&["--target-directory"]);
        rest.push(stage.path().as_os_str().to_owned());
        rest.push(guest.into());
        self.guestcontrol(
            &ctx,
            vm,
            "copyfrom",
            &creds,
            rest,
            GuestCall {
                stdin: None,
                timeout: self.opts.long_timeout,
                raw: false,
                sink: None,
            },
        )
        .await?;
        let staged = stage.path().join(base);
        let n = std::fs::copy(&staged, host).map_err(|e| Error::io(ctx.clone(), host, e))?;
        Ok(n)
    }

    async fn forwards(&self, vm: &VmName) -> Result<Vec<PortForward>> {
        let ctx = Ctx::vm("forwards", vm);
        let kv = self.info(&ctx, vm).await?;
        parse::forwards(&kv, 1).map_err(|m| Error::backend(ctx, "VBoxManage", m))
    }

    async fn forward_add(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        let ctx = Ctx::vm(format!("forward add {}", fwd.name), vm);
        self.natpf1(&ctx, vm, &[&rule(fwd)]).await?;
        if let Some(mut spec) = self.spec(vm).await? {
            spec.forwards.push(crate::types::ForwardSpec::from(fwd));
            self.store_spec(&ctx, &spec).await?;
        }
        Ok(())
    }

    async fn forward_remove(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        let ctx = Ctx::vm(format!("forward remove {}", fwd.name), vm);
        self.natpf1(&ctx, vm, &["delete", &fwd.name]).await?;
        if let Some(mut spec) = self.spec(vm).await? {
            spec.forwards.retain(|f| f.name != fwd.name);
            self.store_spec(&ctx, &spec).await?;
        }
        Ok(())
    }

    /// Ready when the Guest Additions run level reaches the configured level; while it has not,
    /// block in `guestproperty wait` (an event wait inside VirtualBox) instead of sleeping.
    async fn agent_ping(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        let ctx = Ctx::vm("guest additions", vm);
        let level = |out: ToolOutput| {
            parse::guest_property(&out.stdout_str())
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(0)
        };
        let get = os(&["guestproperty", "get", vm.as_str(), RUN_LEVEL]);
        let now = level(self.vbox(&ctx, get.clone()).await?);
        if now >= self.opts.ready_run_level {
            return self.ready_properties(&ctx, vm).await;
        }
        let wait_ms = timeout
            .saturating_sub(Duration::from_millis(200))
            .as_millis()
            .max(100)
            .to_string();
        let wait = os(&[
            "guestproperty",
            "wait",
            vm.as_str(),
            RUN_LEVEL,
            "--timeout",
            &wait_ms,
        ]);
        // Exit 0 on timeout in older versions, 2 with a notice in newer: both mean "not yet".
        let _ = self
            .tool
            .run(
                &ctx,
                wait,
                None,
                Some(timeout + Duration::from_secs(5)),
                "VBoxManage guestproperty wait".into(),
            )
            .await?;
        let now = level(self.vbox(&ctx, get).await?);
        if now >= self.opts.ready_run_level {
            self.ready_properties(&ctx, vm).await
        } else {
            Err(Error::backend(
                ctx,
                "VBoxManage",
                format!("Guest Additions run level is {now}, waiting for {} (0 = not running, 1 = system, 2 = services, 3 = desktop)", self.opts.ready_run_level),
            ))
        }
    }

    async fn shared_folder_add(&self, vm: &VmName, folder: &SharedFolder) -> Result<()> {
        let ctx = Ctx::vm(format!("shared folder add {}", folder.name), vm);
        let mut a = os(&[
            "sharedfolder",
            "add",
            vm.as_str(),
            "--name",
            &folder.name,
            "--hostpath",
        ]);
        a.push(folder.host_path.as_os_str().to_owned());
        if folder.readonly {
            a.push("--readonly".into());
        }
        if folder.automount {
            a.push("--automount".into());
        }
        if self.state(vm).await? == VmState::Running {
            // A running VM only takes transient shares; they end with this power cycle.
            a.push("--transient".into());
        }
        self.vbox(&ctx, a).await.map(|_| ())
    }

    async fn shared_folder_remove(&self, vm: &VmName, name: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("shared folder remove {name}"), vm);
        let mut a = os(&["sharedfolder", "remove", vm.as_str(), "--name", name]);
        if self.state(vm).await? == VmState::Running {
            a.push("--transient".into());
        }
        self.vbox(&ctx, a).await.map(|_| ())
    }

    async fn shared_folders(&self, vm: &VmName) -> Result<Vec<SharedFolder>> {
        let ctx = Ctx::vm("shared folders", vm);
        let kv = self.info(&ctx, vm).await?;
        Ok(kv
            .iter()
            .filter_map(|(k, v)| {
                let i = k.strip_prefix("SharedFolderNameMachineMapping")?;
                let path = parse::get(&kv, &format!("SharedFolderPathMachineMapping{i}"))?;
                Some(SharedFolder {
                    name: v.clone(),
                    host_path: path.into(),
                    readonly: false,
                    automount: false,
                    guest_path: None,
                })
            })
            .collect())
    }

    fn share_mount_argv(&self, share: &SharedFolder, guest_path: &str) -> Vec<String> {
        super::mount_argv("vboxsf", share, guest_path)
    }

    async fn status(&self, vm: &VmName) -> Result<VmStatus> {
        let ctx = Ctx::vm("status", vm);
        let kv = self.info(&ctx, vm).await?;
        Ok(VmStatus {
            name: vm.to_string(),
            state: Self::state_of(&ctx, &kv)?,
            forwards: parse::forwards(&kv, 1)
                .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?,
            snapshots: snapshot_infos(&kv),
        })
    }

    async fn clone_links(&self) -> Result<Vec<CloneLink>> {
        let ctx = Ctx::new("clone graph");
        let names = self.vm_names(&ctx).await?;
        let media = self.media(&ctx).await?;
        Ok(media::clone_links(&media, &names))
    }

    async fn export_appliance(&self, vm: &VmName, path: &Path) -> Result<()> {
        let ctx = Ctx::vm(format!("export to {}", path.display()), vm);
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "ova" | "ovf") {
            return Err(Error::invalid_arg(
                format!("appliance path {}", path.display()),
                "must end in .ova (one file) or .ovf",
            ));
        }
        if path.exists() {
            return Err(Error::InvalidState {
                ctx,
                state: format!("{} exists", path.display()),
                hint: Some("remove it or choose another file name".into()),
            });
        }
        match self.state(vm).await? {
            VmState::ShutOff => {}
            st => {
                return Err(Error::InvalidState {
                    ctx,
                    state: st.to_string(),
                    hint: Some(
                        "stop the VM first (anyvm stop); VirtualBox exports powered-off machines"
                            .into(),
                    ),
                })
            }
        }
        let mut a = os(&["export", vm.as_str(), "--output"]);
        a.push(path.as_os_str().to_owned());
        a.extend(os(&["--vsys", "0", "--vmname", vm.as_str()]));
        let r = self
            .vbox_with(&ctx, a, None, Some(self.opts.long_timeout))
            .await;
        if r.is_err() {
            // A failed export leaves a partial file behind.
            let _ = std::fs::remove_file(path);
        }
        r.map(|_| ())
    }

    async fn doctor(&self) -> Vec<crate::doctor::Check> {
        doctor::checks(self).await
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<VmEvent>> {
        None
    }

    async fn console_log(&self, vm: &VmName) -> Result<Option<PathBuf>> {
        Ok(Some(self.console_path(vm)))
    }
}

/// Remove WARNING blocks from VBoxManage's own output (never from a guest program's); the
/// kernel-driver warning among them, if any, comes back beside the output.
fn strip(mut out: ToolOutput) -> (ToolOutput, Option<String>) {
    let mut driver = None;
    for stream in [&mut out.stdout, &mut out.stderr] {
        let text = String::from_utf8_lossy(stream);
        if !text.contains("WARNING:") {
            continue;
        }
        let (rest, warnings) = parse::strip_warnings(&text);
        driver = driver.or(warnings.into_iter().find(|w| parse::is_driver_warning(w)));
        *stream = rest.into_bytes();
    }
    (out, driver)
}

/// Snapshots from `showvminfo` / `snapshot list` keys.
fn snapshot_infos(kv: &[(String, String)]) -> Vec<SnapshotInfo> {
    parse::snapshots(kv)
        .into_iter()
        .map(|(name, parent, current)| SnapshotInfo {
            name,
            created: None,
            state: None,
            current,
            parent,
        })
        .collect()
}

/// Remove what `unregistervm` (without `--delete`) leaves of a machine: its settings file and
/// backups, logs, saved states and NVRAM; then the folders, if nothing else is in them.
fn remove_machine_files(kv: &[(String, String)], cfg: &Path, folder: &Path) {
    let mut files = vec![
        cfg.to_path_buf(),
        PathBuf::from(format!("{}-prev", cfg.display())),
        PathBuf::from(format!("{}-tmp", cfg.display())),
    ];
    if let Some(nv) = parse::get(kv, "NvramFile") {
        files.push(nv.into());
    }
    // VirtualBox writes a self-signed VRDE certificate into the folder of VMs with VRDE on.
    for f in [
        "VRDEAutoGeneratedCert.pem",
        "VRDEAutoGeneratedPrivateKey.pem",
    ] {
        files.push(folder.join(f));
    }
    for f in files.iter().filter(|f| f.starts_with(folder)) {
        let _ = std::fs::remove_file(f);
    }
    let inside = |key: &str| {
        parse::get(kv, key)
            .map(PathBuf::from)
            .filter(|p| p.starts_with(folder) && p != folder)
    };
    if let Some(logs) = inside("LogFldr") {
        let _ = std::fs::remove_dir_all(logs);
    }
    if let Some(snaps) = inside("SnapFldr") {
        for e in std::fs::read_dir(&snaps).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "sav") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&snaps);
    }
    let _ = std::fs::remove_dir(folder);
}
