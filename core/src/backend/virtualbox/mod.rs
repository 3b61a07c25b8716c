//! VirtualBox backend, driven through `VBoxManage` with the hardened tool runner (`util::tool`).
//!
//! What this adds over calling VBoxManage by hand: C locale, argv only, every call under a
//! deadline with the process group killed on expiry, "already locked" retried with backoff,
//! `VBoxManage: error:` treated as failure even on exit 0, the guest password passed through a
//! private `--passwordfile` (never argv), readiness from `guestproperty wait` on the Guest
//! Additions run level instead of sleeps, and NAT forwards that use the shared port allocator.

mod display;
mod doctor;
mod errors;
mod guest;
mod lifecycle;
mod media;
mod network;
mod parse;
mod snapshots;
mod warm;

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
    CloneLink, DiskFormat, ExecOutput, ExecRequest, HostPort, OutputSink, PortForward,
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

/// The VirtualBox backend: every operation is a `VBoxManage` call (argv only, C locale, under a deadline).
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
    /// A backend using the `VBoxManage` that `opts` names or finds; fails if there is none.
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
        a.extend(Self::forward_and_display_args(spec));
        a.extend(os(&["--uart1", "0x3F8", "4", "--uartmode1", "file"]));
        a.push(self.console_path(&spec.name).into_os_string());
        a
    }

    /// `modifyvm` arguments for the spec's NAT forwards and VRDE port: also what a saved
    /// machine accepts.
    fn forward_and_display_args(spec: &VmSpec) -> Vec<OsString> {
        let mut a = Vec::new();
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
        lifecycle::list(self).await
    }

    async fn exists(&self, vm: &VmName) -> Result<bool> {
        lifecycle::exists(self, vm).await
    }

    async fn spec(&self, vm: &VmName) -> Result<Option<VmSpec>> {
        lifecycle::spec(self, vm).await
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        lifecycle::define(self, spec).await
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        lifecycle::undefine(self, vm).await
    }

    async fn state(&self, vm: &VmName) -> Result<VmState> {
        let ctx = Ctx::vm("state", vm);
        let kv = self.info(&ctx, vm).await?;
        Self::state_of(&ctx, &kv)
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        lifecycle::start(self, vm).await
    }

    async fn request_shutdown(&self, vm: &VmName) -> Result<()> {
        lifecycle::request_shutdown(self, vm).await
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

    fn remote_display_protocol(&self) -> &'static str {
        "rdp"
    }

    async fn power_off(&self, vm: &VmName) -> Result<()> {
        lifecycle::power_off(self, vm).await
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
        snapshots::snapshot_take(self, vm, name, description).await
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
        clone: &VmSpec,
    ) -> Result<()> {
        snapshots::clone_linked(self, base, snapshot, clone).await
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
        guest::exec_streaming(self, vm, req, sink).await
    }

    async fn copy_to(
        &self,
        vm: &VmName,
        host: &Path,
        guest: &str,
        creds: Option<Credentials>,
        _progress: crate::events::CopyProgress,
    ) -> Result<u64> {
        guest::copy_to(self, vm, host, guest, creds, _progress).await
    }

    async fn copy_from(
        &self,
        vm: &VmName,
        guest: &str,
        host: &Path,
        creds: Option<Credentials>,
        _progress: crate::events::CopyProgress,
    ) -> Result<u64> {
        guest::copy_from(self, vm, guest, host, creds, _progress).await
    }

    async fn forwards(&self, vm: &VmName) -> Result<Vec<PortForward>> {
        let ctx = Ctx::vm("forwards", vm);
        let kv = self.info(&ctx, vm).await?;
        parse::forwards(&kv, 1).map_err(|m| Error::backend(ctx, "VBoxManage", m))
    }

    async fn forward_add(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        network::forward_add(self, vm, fwd).await
    }

    async fn forward_remove(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        network::forward_remove(self, vm, fwd).await
    }

    async fn agent_ping(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        guest::agent_ping(self, vm, timeout).await
    }

    async fn shared_folder_add(&self, vm: &VmName, folder: &SharedFolder) -> Result<()> {
        guest::shared_folder_add(self, vm, folder).await
    }

    async fn shared_folder_remove(&self, vm: &VmName, name: &str) -> Result<()> {
        guest::shared_folder_remove(self, vm, name).await
    }

    async fn shared_folders(&self, vm: &VmName) -> Result<Vec<SharedFolder>> {
        guest::shared_folders(self, vm).await
    }

    fn share_mount_argv(&self, share: &SharedFolder, guest_path: &str) -> Vec<String> {
        super::mount_argv("vboxsf", share, guest_path)
    }

    async fn status(&self, vm: &VmName) -> Result<VmStatus> {
        lifecycle::status(self, vm).await
    }

    async fn clone_links(&self) -> Result<Vec<CloneLink>> {
        snapshots::clone_links(self).await
    }

    fn warm_unsupported(&self, spec: &VmSpec) -> Option<String> {
        let _ = spec;
        None
    }

    fn warm_identity_in_guest(&self) -> bool {
        true
    }

    async fn warm_find(&self, template: &VmName, key: &str) -> Result<Option<super::WarmInfo>> {
        warm::find(self, template, key).await
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

    async fn export_appliance(&self, vm: &VmName, path: &Path) -> Result<()> {
        lifecycle::export_appliance(self, vm, path).await
    }

    async fn doctor(&self) -> Vec<crate::health::Check> {
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

/// Every reader of VBoxManage output, as the backend chains them, for the parser fuzz drill.
pub(crate) fn fuzz_parse(target: crate::fuzzing::Target, text: &str) {
    use crate::fuzzing::Target as T;
    let ctx = Ctx::new("fuzz");
    match target {
        T::VboxShowvminfo => {
            let (rest, warnings) = parse::strip_warnings(text);
            let _ = warnings.iter().any(|w| parse::is_driver_warning(w));
            if let Ok(kv) = parse::machine_readable(&rest) {
                let _ = VirtualBoxBackend::state_of(&ctx, &kv);
                for nic in 1..=8 {
                    let _ = parse::forwards(&kv, nic);
                }
                let _ = snapshot_infos(&kv);
                let _ = parse::get(&kv, "CfgFile");
            }
        }
        T::VboxList => {
            let _ = parse::list(text);
            let _ = parse::version(text);
            let _ = parse::guest_property(text);
        }
        T::VboxMedia => {
            if let Ok(all) = parse::media(text) {
                let _ = media::clone_links(&all, &Default::default());
                for m in &all {
                    let _ = media::still_needed(&all, &m.uuid);
                    for u in &m.users {
                        let _ = media::media_of(&all, &u.vm);
                    }
                }
            }
            let _ = parse::extpacks(text);
        }
        T::VboxErrors => {
            for code in [Some(0), Some(1), None] {
                let out = crate::util::command::ToolOutput {
                    code,
                    stdout: Vec::new(),
                    stderr: text.as_bytes().to_vec(),
                    duration: std::time::Duration::ZERO,
                };
                if let Some(f) = errors::classify(&out) {
                    let _ = errors::to_error(&ctx, f).to_string();
                }
            }
        }
        _ => {}
    }
}
