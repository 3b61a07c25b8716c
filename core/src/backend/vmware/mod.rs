//! VMware backend (Workstation `-T ws`, Fusion `-T fusion`, Player `-T player`) through `vmrun`.
//!
//! VMs are .vmx files; anyvm keeps an inventory (name -> .vmx + spec) in its state dir, because
//! vmrun has no registry of its own. vmrun hangs on `stop` and guest operations, so every call
//! runs under a deadline with its process group killed on expiry.
//!
//! Credentials: vmrun takes the guest password on its command line (`-gp`), where other local
//! users can read it in the process table. anyvm keeps it out of every log and error message; sites
//! whose policy forbids secrets in argv set `forbid_secrets_in_argv` and guest operations through
//! vmrun are refused with `PolicyDenied` (use ssh to the guest instead).
//!
//! Port forwards use the NAT host network's port forwarding (`setPortForwarding`, Workstation Pro
//! and Fusion Pro). They are host-wide rules pointing at the guest's current IP, so anyvm sets them
//! when the VM starts (after `getGuestIPAddress -wait`) and removes them when it is destroyed.
//! Player (and vmrun without host-network commands, with `forwards_over_ssh`) has none: there
//! forwards are ssh local forwards run by anyvm to the guest's IP (anyvm's ssh tunnels);
//! vmrun is not involved and the rules live in anyvm's inventory only.

mod display;
mod errors;
mod guest;
mod lifecycle;
mod network;
mod parse;
mod snapshots;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{Backend, ForwardTransport, VmEvent};
use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{
    ExecOutput, ExecRequest, HostPort, PortForward, SharedFolder, SnapshotInfo, VmInfo, VmSpec,
    VmState,
};
use crate::util::command::ToolOutput;
use crate::util::json_store::JsonStore;
use crate::util::tool::{resolve_binary, ToolRunner};

/// Where the VMware backend finds `vmrun` and keeps its VMs.
#[derive(Debug, Clone)]
pub struct VmwareOptions {
    /// vmrun path; `ANYVM_VMRUN`, then `PATH`, when unset.
    pub vmrun: Option<PathBuf>,
    /// `ws`, `fusion` or `player`.
    pub flavor: String,
    /// Deadline of one `vmrun` call.
    pub call_timeout: Duration,
    /// Deadline for clones and for waiting on the guest's IP address.
    pub long_timeout: Duration,
    /// Inventory and clone folders live here.
    pub state_dir: PathBuf,
    /// NAT host network for port forwards (default: the first of type "nat").
    pub host_network: Option<String>,
    /// Refuse guest operations that would put the password on vmrun's command line.
    pub forbid_secrets_in_argv: bool,
    /// Carry forwards over ssh tunnels even on Workstation/Fusion (vmrun without host-network
    /// commands). Player always does.
    pub forwards_over_ssh: bool,
    /// Guest variables (`readVariable VMX guestVar NAME`) that must be non-empty before the guest
    /// counts as ready: a value the guest publishes (e.g. with `vmware-rpctool "info-set guestinfo.ready 1"`).
    pub ready_guest_vars: Vec<String>,
    /// Extra environment for vmrun.
    pub env: Vec<(String, String)>,
}

impl Default for VmwareOptions {
    fn default() -> Self {
        VmwareOptions {
            vmrun: None,
            flavor: "ws".into(),
            call_timeout: Duration::from_secs(120),
            long_timeout: Duration::from_secs(1800),
            state_dir: crate::paths::default_state_dir(),
            host_network: None,
            forbid_secrets_in_argv: false,
            forwards_over_ssh: false,
            ready_guest_vars: Vec::new(),
            env: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    vmx: PathBuf,
    spec: Option<VmSpec>,
    /// anyvm made this VM (a clone): destroying it deletes its files.
    owned: bool,
    paused: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Inventory {
    vms: BTreeMap<String, Entry>,
}

/// The VMware backend (Workstation, Fusion, Player): every operation is a `vmrun` call.
#[derive(Debug)]
pub struct VmwareBackend {
    tool: ToolRunner,
    opts: VmwareOptions,
    inventory: JsonStore,
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

const EXEC_SCRIPT: &str = "out=$1 err=$2 in=$3 cwd=$4; shift 4; \
    if [ -n \"$cwd\" ]; then cd -- \"$cwd\" || exit 127; fi; exec \"$@\" <\"$in\" >\"$out\" 2>\"$err\"";

impl VmwareBackend {
    /// A backend using the `vmrun` that `opts` names or finds; fails if there is none.
    pub fn new(opts: VmwareOptions) -> Result<Self> {
        if !matches!(opts.flavor.as_str(), "ws" | "fusion" | "player") {
            return Err(Error::invalid_arg(
                "vmware flavor",
                format!("{:?} is not ws, fusion or player", opts.flavor),
            ));
        }
        let program = resolve_binary("vmrun", opts.vmrun.as_deref(), "ANYVM_VMRUN")?;
        let mut tool = ToolRunner::new(program, opts.call_timeout);
        tool.env = opts.env.clone();
        let inventory = JsonStore::new(opts.state_dir.join("vmware"), "inventory");
        Ok(VmwareBackend {
            tool,
            opts,
            inventory,
        })
    }

    /// `vmrun` calls made so far, by subcommand (for benchmarks and tests).
    pub fn invocations(&self) -> BTreeMap<String, u64> {
        self.tool.invocations()
    }

    fn entry(&self, ctx: &Ctx, vm: &VmName) -> Result<Entry> {
        let inv: Inventory = self.inventory.read(ctx)?;
        inv.vms
            .get(vm.as_str())
            .cloned()
            .ok_or_else(|| Error::NotFound {
                ctx: ctx.clone(),
                what: "no such VM in anyvm's VMware inventory (define it from its .vmx first)"
                    .into(),
            })
    }

    fn update_entry(&self, ctx: &Ctx, vm: &VmName, f: impl FnOnce(&mut Entry)) -> Result<()> {
        self.inventory.update(ctx, |inv: &mut Inventory| {
            match inv.vms.get_mut(vm.as_str()) {
                Some(e) => {
                    f(e);
                    Ok((true, ()))
                }
                None => Err(Error::NotFound {
                    ctx: ctx.clone(),
                    what: "no such VM in the VMware inventory".into(),
                }),
            }
        })
    }

    /// `vmrun -T FLAVOR [guest auth] COMMAND ARGS`; classifies `Error:` lines.
    async fn vmrun(
        &self,
        ctx: &Ctx,
        cmd: &str,
        args: Vec<OsString>,
        timeout: Option<Duration>,
    ) -> Result<ToolOutput> {
        self.vmrun_auth(ctx, cmd, args, timeout, None, false).await
    }

    async fn vmrun_auth(
        &self,
        ctx: &Ctx,
        cmd: &str,
        args: Vec<OsString>,
        timeout: Option<Duration>,
        creds: Option<&Credentials>,
        guest_exit_ok: bool,
    ) -> Result<ToolOutput> {
        let mut a = os(&["-T", &self.opts.flavor]);
        if let Some(c) = creds {
            if self.opts.forbid_secrets_in_argv {
                return Err(Error::PolicyDenied {
                    ctx: ctx.clone(),
                    reason: "vmrun would put the guest password on its command line; reach the guest over ssh instead (guest_channel = \"ssh\" in the machine's config, Vm::with_guest_channel in the API)".into(),
                });
            }
            a.extend(os(&["-gu", &c.user]));
            if let Some(src) = &c.password {
                let secret = src.resolve(ctx)?;
                a.push("-gp".into());
                a.push(secret.expose().into());
            }
        }
        a.push(cmd.into());
        a.extend(args);
        // The display never includes -gp.
        let shown = format!("vmrun {cmd}");
        let out = self.tool.run(ctx, a, None, timeout, shown).await?;
        if guest_exit_ok && parse::guest_exit_code(&out.stdout_str()).is_some() {
            return Ok(out);
        }
        match errors::message(&out) {
            None => Ok(out),
            Some(m) => Err(errors::to_error(ctx, m)),
        }
    }

    async fn running(&self, ctx: &Ctx) -> Result<Vec<PathBuf>> {
        let out = self.vmrun(ctx, "list", vec![], None).await?;
        parse::list(&out.stdout_str()).map_err(|m| Error::backend(ctx.clone(), "vmrun", m))
    }

    fn same_file(a: &Path, b: &Path) -> bool {
        a == b
            || std::fs::canonicalize(a)
                .ok()
                .zip(std::fs::canonicalize(b).ok())
                .is_some_and(|(x, y)| x == y)
    }

    /// State from `vmrun list` (running), anyvm's pause flag, and a `.vmss` file (suspended).
    fn state_of(e: &Entry, running: &[PathBuf]) -> VmState {
        let up = running.iter().any(|r| Self::same_file(r, &e.vmx));
        match (up, e.paused) {
            (true, true) => VmState::Paused,
            (true, false) => VmState::Running,
            _ if e.vmx.with_extension("vmss").exists() => VmState::Saved,
            _ => VmState::ShutOff,
        }
    }

    fn need_creds(ctx: &Ctx, creds: Option<&Credentials>) -> Result<Credentials> {
        crate::backend::require_credentials(ctx, creds, "vmrun guest operations")
    }

    async fn guest_ip(&self, ctx: &Ctx, vmx: &Path) -> Result<String> {
        let out = self
            .vmrun(
                ctx,
                "getGuestIPAddress",
                vec![vmx.into(), "-wait".into()],
                Some(self.opts.long_timeout),
            )
            .await?;
        let ip = out.stdout_str().trim().to_string();
        ip.parse::<std::net::IpAddr>()
            .map(|_| ip.clone())
            .map_err(|_| {
                Error::backend(
                    ctx.clone(),
                    "vmrun",
                    format!("getGuestIPAddress returned {ip:?}"),
                )
            })
    }

    /// Apply the spec's .vmx settings (memory, cpus, VNC console); the VM must be off.
    fn write_vmx(&self, ctx: &Ctx, vmx: &Path, spec: &VmSpec) -> Result<()> {
        let text = std::fs::read_to_string(vmx).map_err(|e| Error::io(ctx.clone(), vmx, e))?;
        let mut v = parse::Vmx::parse(&text);
        v.set("memsize", &spec.memory_mib.to_string());
        v.set("numvcpus", &spec.cpus.to_string());
        match spec.console.vnc {
            Some(HostPort::Fixed(p)) => {
                v.set("RemoteDisplay.vnc.enabled", "TRUE");
                v.set("RemoteDisplay.vnc.port", &p.to_string());
            }
            _ => v.set("RemoteDisplay.vnc.enabled", "FALSE"),
        }
        let tmp = vmx.with_extension("vmx.anyvm-tmp");
        crate::util::replace::replace_file(vmx, &tmp, v.render())
            .map_err(|e| Error::io(ctx.clone(), vmx, e))
    }

    fn temp_name(tag: &str) -> String {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("/tmp/.anyvm-{}-{n}.{tag}", std::process::id())
    }
}

#[async_trait]
impl Backend for VmwareBackend {
    fn id(&self) -> &str {
        "vmware"
    }
    fn uri(&self) -> String {
        format!("vmware:{}", self.opts.flavor)
    }

    async fn doctor(&self) -> Vec<crate::health::Check> {
        use crate::health::Check;
        let ctx = Ctx::new("doctor");
        let b = "vmware";
        let mut out = Vec::new();
        match self.vmrun(&ctx, "list", vec![], None).await {
            Ok(o) => out.push(Check::ok(
                b,
                "vmrun",
                format!(
                    "{} answers (-T {}): {}",
                    self.tool.program.display(),
                    self.opts.flavor,
                    o.stdout_str().lines().next().unwrap_or("").trim()
                ),
            )),
            Err(e) => {
                out.push(Check::fail(
                    b,
                    "vmrun",
                    e.to_string(),
                    "install VMware Workstation, Fusion or Player (vmrun comes with them), or set ANYVM_VMRUN",
                ));
                return out;
            }
        }
        if self.forward_transport() == super::ForwardTransport::SshTunnel {
            out.push(Check::ok(
                b,
                "host network",
                "forwards through ssh tunnels (Player or forwards_over_ssh)",
            ));
        } else {
            out.push(match self.host_network(&ctx).await {
                Ok(n) => Check::ok(b, "host network", format!("NAT network {n} for forwards")),
                Err(e) => Check::warn(
                    b,
                    "host network",
                    e.to_string(),
                    "port forwards need Workstation Pro/Fusion Pro host-network commands; otherwise set forwards_over_ssh",
                ),
            });
        }
        out
    }

    async fn list(&self) -> Result<Vec<VmInfo>> {
        lifecycle::list(self).await
    }

    async fn exists(&self, vm: &VmName) -> Result<bool> {
        let inv: Inventory = self.inventory.read(&Ctx::vm("lookup", vm))?;
        Ok(inv.vms.contains_key(vm.as_str()))
    }

    async fn spec(&self, vm: &VmName) -> Result<Option<VmSpec>> {
        Ok(self.entry(&Ctx::vm("read spec", vm), vm)?.spec)
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        lifecycle::define(self, spec).await
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        lifecycle::undefine(self, vm).await
    }

    async fn state(&self, vm: &VmName) -> Result<VmState> {
        let ctx = Ctx::vm("state", vm);
        let e = self.entry(&ctx, vm)?;
        Ok(Self::state_of(&e, &self.running(&ctx).await?))
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
        creds: Option<Credentials>,
    ) -> Result<crate::types::Screenshot> {
        display::screenshot(self, vm, creds).await
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

    async fn snapshot_take(&self, vm: &VmName, name: &str, _description: &str) -> Result<()> {
        snapshots::snapshot_take(self, vm, name, _description).await
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
        guest::exec(self, vm, req).await
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
        network::forwards(self, vm).await
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

    fn share_mount_argv(&self, share: &SharedFolder, guest_path: &str) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "vmhgfs-fuse".into(),
            format!(".host:/{}", share.name),
            guest_path.into(),
        ];
        if share.readonly {
            v.extend(["-o".into(), "ro".into()]);
        }
        v
    }

    fn tools_take_secrets_in_argv(&self) -> bool {
        true
    }

    fn forward_transport(&self) -> ForwardTransport {
        if self.opts.flavor == "player" || self.opts.forwards_over_ssh {
            ForwardTransport::SshTunnel
        } else {
            ForwardTransport::Hypervisor
        }
    }

    async fn guest_address(&self, vm: &VmName) -> Result<Option<String>> {
        let ctx = Ctx::vm("guest address", vm);
        let e = self.entry(&ctx, vm)?;
        self.guest_ip(&ctx, &e.vmx).await.map(Some)
    }

    fn warm_unsupported(&self, spec: &VmSpec) -> Option<String> {
        let _ = spec;
        // vSphere's CloneSpec.memory keeps a clone suspended; vmrun has no such option, and
        // a clone it makes of a suspended VM's snapshot has no documented memory state.
        Some(
            "vmrun clones carry no memory state (no counterpart of vSphere's CloneSpec.memory), so VMware clones boot"
                .into(),
        )
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<VmEvent>> {
        None
    }

    async fn console_log(&self, _vm: &VmName) -> Result<Option<PathBuf>> {
        Ok(None)
    }
}

/// Every reader of vmrun output and .vmx files, for the parser fuzz drill. A .vmx read and
/// written back must read the same.
pub(crate) fn fuzz_parse(target: crate::fuzzing::Target, text: &str) {
    use crate::fuzzing::Target as T;
    match target {
        T::VmrunOutput => {
            let _ = parse::list(text);
            let _ = parse::snapshots(text);
            let _ = parse::guest_exit_code(text);
            let _ = parse::host_networks(text);
            for code in [Some(0), Some(255), None] {
                let out = crate::util::command::ToolOutput {
                    code,
                    stdout: text.as_bytes().to_vec(),
                    stderr: Vec::new(),
                    duration: std::time::Duration::ZERO,
                };
                if let Some(m) = errors::message(&out) {
                    let _ = errors::to_error(&Ctx::new("fuzz"), m).to_string();
                }
            }
        }
        T::Vmx => {
            let mut vmx = parse::Vmx::parse(text);
            let again = parse::Vmx::parse(&vmx.render());
            for key in ["displayName", "guestOS", "memsize", "annotation"] {
                assert_eq!(vmx.get(key), again.get(key), "{key} changed by a rewrite");
            }
            vmx.set("annotation", "fuzz \"quoted\" value");
            assert_eq!(
                parse::Vmx::parse(&vmx.render())
                    .get("annotation")
                    .as_deref(),
                Some("fuzz |22quoted|22 value")
            );
        }
        _ => {}
    }
}
