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
//! forwards are ssh local forwards run by anyvm to the guest's IP (see [`crate::ssh::tunnel`]);
//! vmrun is not involved and the rules live in anyvm's inventory only.

mod errors;
mod parse;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{Backend, ForwardTransport, VmEvent};
use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{
    Boot, ExecOutput, ExecRequest, ForwardSpec, HostPort, PortForward, SharedFolder, SnapshotInfo,
    VmInfo, VmSpec, VmState,
};
use crate::util::command::ToolOutput;
use crate::util::json_store::JsonStore;
use crate::util::tool::{resolve_binary, ToolRunner};

#[derive(Debug, Clone)]
pub struct VmwareOptions {
    /// vmrun path; `ANYVM_VMRUN`, then `PATH`, when unset.
    pub vmrun: Option<PathBuf>,
    /// `ws`, `fusion` or `player`.
    pub flavor: String,
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
        super::require_credentials(ctx, creds, "vmrun guest operations")
    }

    async fn host_network(&self, ctx: &Ctx) -> Result<String> {
        if let Some(n) = &self.opts.host_network {
            return Ok(n.clone());
        }
        let out = self.vmrun(ctx, "listHostNetworks", vec![], None).await.map_err(|e| Error::InvalidState {
            ctx: ctx.clone(),
            state: format!("no host-network commands ({e})"),
            hint: Some("port forwarding needs VMware Workstation Pro or Fusion Pro; on Player use 'ssh -L' through the guest".into()),
        })?;
        let nets = parse::host_networks(&out.stdout_str())
            .map_err(|m| Error::backend(ctx.clone(), "vmrun", m))?;
        nets.into_iter()
            .find(|(_, t)| t == "nat")
            .map(|(n, _)| n)
            .ok_or_else(|| Error::InvalidState {
                ctx: ctx.clone(),
                state: "no NAT host network".into(),
                hint: Some("create one in the Virtual Network Editor or set host_network".into()),
            })
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

    async fn set_forward(
        &self,
        ctx: &Ctx,
        vm: &VmName,
        net: &str,
        ip: &str,
        f: &PortForward,
    ) -> Result<()> {
        let desc = format!("anyvm:{vm}:{}", f.name);
        let args = vec![
            net.into(),
            f.proto.to_string().into(),
            f.host_port.to_string().into(),
            ip.into(),
            f.guest_port.to_string().into(),
            desc.into(),
        ];
        self.vmrun(ctx, "setPortForwarding", args, None)
            .await
            .map(|_| ())
    }

    async fn delete_forward(&self, ctx: &Ctx, net: &str, f: &PortForward) -> Result<()> {
        let args = vec![
            net.into(),
            f.proto.to_string().into(),
            f.host_port.to_string().into(),
        ];
        self.vmrun(ctx, "deletePortForwarding", args, None)
            .await
            .map(|_| ())
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
        std::fs::write(&tmp, v.render())
            .and_then(|_| std::fs::rename(&tmp, vmx))
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

    async fn doctor(&self) -> Vec<crate::doctor::Check> {
        use crate::doctor::Check;
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
        let ctx = Ctx::new("list");
        let running = self.running(&ctx).await?;
        let inv: Inventory = self.inventory.read(&ctx)?;
        let mut out: Vec<VmInfo> = inv
            .vms
            .iter()
            .map(|(name, e)| {
                let state = Self::state_of(e, &running);
                VmInfo {
                    name: name.clone(),
                    state,
                    managed: Some(e.spec.is_some()),
                }
            })
            .collect();
        // Running VMs anyvm does not know, named by their displayName.
        for r in running
            .iter()
            .filter(|r| !inv.vms.values().any(|e| Self::same_file(r, &e.vmx)))
        {
            let name = std::fs::read_to_string(r)
                .ok()
                .and_then(|t| parse::Vmx::parse(&t).get("displayName"))
                .unwrap_or_else(|| {
                    r.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
            out.push(VmInfo {
                name,
                state: VmState::Running,
                managed: Some(false),
            });
        }
        Ok(out)
    }

    async fn exists(&self, vm: &VmName) -> Result<bool> {
        let inv: Inventory = self.inventory.read(&Ctx::vm("lookup", vm))?;
        Ok(inv.vms.contains_key(vm.as_str()))
    }

    async fn spec(&self, vm: &VmName) -> Result<Option<VmSpec>> {
        Ok(self.entry(&Ctx::vm("read spec", vm), vm)?.spec)
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        let ctx = Ctx::vm("define", &spec.name);
        spec.validate()?;
        super::require_nat_network(&ctx, self.id(), spec)?;
        let Boot::Existing { path } = &spec.boot else {
            return Err(Error::InvalidState {
                ctx,
                state: "no .vmx given".into(),
                hint: Some("vmrun cannot create VMs; define from an existing .vmx (boot = { kind = \"existing\", path = \"/vms/x.vmx\" })".into()),
            });
        };
        if !path.is_file() {
            return Err(Error::NotFound {
                ctx,
                what: format!("VMware machine file {}", path.display()),
            });
        }
        self.write_vmx(&ctx, path, spec)?;
        let name = spec.name.to_string();
        self.inventory.update(&ctx, |inv: &mut Inventory| {
            if inv.vms.contains_key(&name) {
                return Err(Error::InvalidState {
                    ctx: ctx.clone(),
                    state: "already defined".into(),
                    hint: None,
                });
            }
            inv.vms.insert(
                name.clone(),
                Entry {
                    vmx: path.clone(),
                    spec: Some(spec.clone()),
                    owned: false,
                    paused: false,
                },
            );
            Ok((true, ()))
        })?;
        for s in &spec.shares {
            if let Err(e) = self.shared_folder_add(&spec.name, s).await {
                let _ = self.undefine(&spec.name).await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("undefine", vm);
        let e = self.entry(&ctx, vm)?;
        let forwards = e
            .spec
            .as_ref()
            .map(VmSpec::resolved_forwards)
            .unwrap_or_default();
        if !forwards.is_empty() && self.forward_transport() == ForwardTransport::Hypervisor {
            if let Ok(net) = self.host_network(&ctx).await {
                for f in &forwards {
                    let _ = self.delete_forward(&ctx, &net, f).await;
                }
            }
        }
        if e.owned {
            self.vmrun(&ctx, "deleteVM", vec![e.vmx.clone().into()], None)
                .await?;
            if let Some(dir) = e.vmx.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        self.inventory.update(&ctx, |inv: &mut Inventory| {
            Ok((inv.vms.remove(vm.as_str()).is_some(), ()))
        })
    }

    async fn state(&self, vm: &VmName) -> Result<VmState> {
        let ctx = Ctx::vm("state", vm);
        let e = self.entry(&ctx, vm)?;
        Ok(Self::state_of(&e, &self.running(&ctx).await?))
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("start", vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(
            &ctx,
            "start",
            vec![e.vmx.clone().into(), "nogui".into()],
            None,
        )
        .await?;
        self.update_entry(&ctx, vm, |e| e.paused = false)?;
        // Forwards are host-wide rules to the guest's current IP: (re)point them now.
        let forwards = e
            .spec
            .as_ref()
            .map(VmSpec::resolved_forwards)
            .unwrap_or_default();
        if !forwards.is_empty() && self.forward_transport() == ForwardTransport::Hypervisor {
            let net = self.host_network(&ctx).await?;
            let ip = self.guest_ip(&ctx, &e.vmx).await?;
            for f in &forwards {
                let _ = self.delete_forward(&ctx, &net, f).await;
                self.set_forward(&ctx, vm, &net, &ip, f).await?;
            }
        }
        Ok(())
    }

    async fn request_shutdown(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("shutdown", vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(&ctx, "stop", vec![e.vmx.into(), "soft".into()], None)
            .await
            .map(|_| ())
    }

    async fn power_off(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("power off", vm);
        let e = self.entry(&ctx, vm)?;
        match self
            .vmrun(&ctx, "stop", vec![e.vmx.into(), "hard".into()], None)
            .await
        {
            Ok(_) | Err(Error::InvalidState { .. }) => {}
            Err(err) => return Err(err),
        }
        self.update_entry(&ctx, vm, |e| e.paused = false)
    }

    async fn reset(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("reset", vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(&ctx, "reset", vec![e.vmx.into(), "hard".into()], None)
            .await?;
        self.update_entry(&ctx, vm, |e| e.paused = false)
    }

    async fn pause(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("pause", vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(&ctx, "pause", vec![e.vmx.into()], None).await?;
        self.update_entry(&ctx, vm, |e| e.paused = true)
    }

    async fn resume(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("resume", vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(&ctx, "unpause", vec![e.vmx.into()], None)
            .await?;
        self.update_entry(&ctx, vm, |e| e.paused = false)
    }

    async fn save_state(&self, vm: &VmName) -> Result<()> {
        let ctx = Ctx::vm("save state", vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(
            &ctx,
            "suspend",
            vec![e.vmx.into(), "soft".into()],
            Some(self.opts.long_timeout),
        )
        .await?;
        self.update_entry(&ctx, vm, |e| e.paused = false)
    }

    async fn snapshot_take(&self, vm: &VmName, name: &str, _description: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("snapshot take {name}"), vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(
            &ctx,
            "snapshot",
            vec![e.vmx.into(), name.into()],
            Some(self.opts.long_timeout),
        )
        .await
        .map(|_| ())
    }

    async fn snapshot_restore(&self, vm: &VmName, name: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("snapshot restore {name}"), vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(
            &ctx,
            "revertToSnapshot",
            vec![e.vmx.into(), name.into()],
            Some(self.opts.long_timeout),
        )
        .await
        .map(|_| ())
    }

    async fn snapshot_delete(&self, vm: &VmName, name: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("snapshot delete {name}"), vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(
            &ctx,
            "deleteSnapshot",
            vec![e.vmx.into(), name.into()],
            Some(self.opts.long_timeout),
        )
        .await
        .map(|_| ())
    }

    async fn snapshot_list(&self, vm: &VmName) -> Result<Vec<SnapshotInfo>> {
        let ctx = Ctx::vm("snapshot list", vm);
        let e = self.entry(&ctx, vm)?;
        let out = self
            .vmrun(&ctx, "listSnapshots", vec![e.vmx.into()], None)
            .await?;
        let names =
            parse::snapshots(&out.stdout_str()).map_err(|m| Error::backend(ctx, "vmrun", m))?;
        Ok(names
            .into_iter()
            .map(|name| SnapshotInfo {
                name,
                created: None,
                state: None,
                current: false,
                parent: None,
            })
            .collect())
    }

    async fn clone_linked(
        &self,
        base: &VmName,
        snapshot: Option<String>,
        clone: &VmSpec,
    ) -> Result<()> {
        let ctx = Ctx::vm(format!("clone to {}", clone.name), base);
        let e = self.entry(&ctx, base)?;
        let snap = match snapshot {
            Some(s) => s,
            None => {
                let s = format!("anyvm-clone-{}", clone.name);
                self.snapshot_take(base, &s, "").await?;
                s
            }
        };
        let dir = self.opts.state_dir.join("vmware").join(clone.name.as_str());
        let vmx = dir.join(format!("{}.vmx", clone.name));
        std::fs::create_dir_all(&dir).map_err(|err| Error::io(ctx.clone(), &dir, err))?;
        let args = vec![
            e.vmx.clone().into(),
            vmx.clone().into(),
            "linked".into(),
            format!("-snapshot={snap}").into(),
            format!("-cloneName={}", clone.name).into(),
        ];
        if let Err(err) = self
            .vmrun(&ctx, "clone", args, Some(self.opts.long_timeout))
            .await
        {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err);
        }
        // vmrun can leave lock folders behind in the clone that block its first start.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for p in rd
                .flatten()
                .map(|d| d.path())
                .filter(|p| p.extension().is_some_and(|x| x == "lck"))
            {
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        let mut spec = clone.clone();
        spec.boot = Boot::Existing { path: vmx.clone() };
        let res = self.write_vmx(&ctx, &vmx, &spec).and_then(|_| {
            self.inventory.update(&ctx, |inv: &mut Inventory| {
                inv.vms.insert(
                    clone.name.to_string(),
                    Entry {
                        vmx: vmx.clone(),
                        spec: Some(spec.clone()),
                        owned: true,
                        paused: false,
                    },
                );
                Ok((true, ()))
            })
        });
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        res
    }

    async fn exec(&self, vm: &VmName, req: &ExecRequest) -> Result<ExecOutput> {
        let ctx = Ctx::vm(format!("exec {}", req.program), vm);
        let creds = Self::need_creds(&ctx, req.credentials.as_ref())?;
        let e = self.entry(&ctx, vm)?;
        let started = Instant::now();
        // vmrun returns no output: the guest writes stdout/stderr to files anyvm copies back.
        let (out_f, err_f) = (Self::temp_name("out"), Self::temp_name("err"));
        let in_f = match &req.stdin {
            Some(data) => {
                let f = Self::temp_name("in");
                let host = tempfile::NamedTempFile::new()
                    .map_err(|err| Error::io(ctx.clone(), std::env::temp_dir(), err))?;
                std::fs::write(host.path(), data)
                    .map_err(|err| Error::io(ctx.clone(), host.path(), err))?;
                self.copy_to(
                    vm,
                    host.path(),
                    &f,
                    Some(creds.clone()),
                    crate::events::CopyProgress::none(),
                )
                .await?;
                Some(f)
            }
            None => None,
        };
        let mut args: Vec<OsString> = vec![
            e.vmx.clone().into(),
            "/bin/sh".into(),
            "-c".into(),
            EXEC_SCRIPT.into(),
            "anyvm".into(),
        ];
        args.push(out_f.clone().into());
        args.push(err_f.clone().into());
        args.push(in_f.clone().unwrap_or_else(|| "/dev/null".into()).into());
        args.push(req.cwd.clone().unwrap_or_default().into());
        if !req.env.is_empty() {
            args.push("env".into());
            args.extend(
                req.env
                    .iter()
                    .map(|(k, v)| OsString::from(format!("{k}={v}"))),
            );
        }
        args.push(req.program.clone().into());
        args.extend(req.args.iter().map(OsString::from));
        let run = self
            .vmrun_auth(
                &ctx,
                "runProgramInGuest",
                args,
                Some(req.timeout),
                Some(&creds),
                true,
            )
            .await;
        let run = match run {
            Err(Error::Timeout { .. }) => {
                return Err(Error::Timeout {
                    ctx,
                    after: req.timeout,
                    what: format!("'{}' to exit (vmrun killed)", req.display_argv()),
                })
            }
            other => other?,
        };
        let exit_code = parse::guest_exit_code(&run.stdout_str()).unwrap_or(0);
        let stage =
            tempfile::tempdir().map_err(|err| Error::io(ctx.clone(), std::env::temp_dir(), err))?;
        let (so, se) = (stage.path().join("out"), stage.path().join("err"));
        let fetched = async {
            self.copy_from(vm, &out_f, &so, Some(creds.clone()), Default::default())
                .await?;
            self.copy_from(vm, &err_f, &se, Some(creds.clone()), Default::default())
                .await
        }
        .await;
        for f in [Some(out_f), Some(err_f), in_f].into_iter().flatten() {
            let _ = self
                .vmrun_auth(
                    &ctx,
                    "deleteFileInGuest",
                    vec![e.vmx.clone().into(), f.into()],
                    None,
                    Some(&creds),
                    false,
                )
                .await;
        }
        fetched?;
        Ok(ExecOutput {
            exit_code: Some(exit_code),
            signal: None,
            stdout: std::fs::read(&so).map_err(|err| Error::io(ctx.clone(), &so, err))?,
            stderr: std::fs::read(&se).map_err(|err| Error::io(ctx.clone(), &se, err))?,
            duration: started.elapsed(),
            stdout_truncated: false,
            stderr_truncated: false,
        })
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
        let e = self.entry(&ctx, vm)?;
        let n = std::fs::metadata(host)
            .map_err(|err| Error::io(ctx.clone(), host, err))?
            .len();
        let args = vec![e.vmx.into(), host.into(), guest.into()];
        self.vmrun_auth(
            &ctx,
            "copyFileFromHostToGuest",
            args,
            Some(self.opts.long_timeout),
            Some(&creds),
            false,
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
        let e = self.entry(&ctx, vm)?;
        // copyFileFromGuestToHost says only "A file was not found", which could be either side.
        let exists = self
            .vmrun_auth(
                &ctx,
                "fileExistsInGuest",
                vec![e.vmx.clone().into(), guest.into()],
                None,
                Some(&creds),
                false,
            )
            .await?;
        if exists.stdout_str().contains("does not exist") {
            return Err(Error::NotFound {
                ctx,
                what: format!("guest file {guest}"),
            });
        }
        let args = vec![e.vmx.into(), guest.into(), host.into()];
        self.vmrun_auth(
            &ctx,
            "copyFileFromGuestToHost",
            args,
            Some(self.opts.long_timeout),
            Some(&creds),
            false,
        )
        .await?;
        Ok(std::fs::metadata(host)
            .map_err(|err| Error::io(ctx.clone(), host, err))?
            .len())
    }

    async fn forwards(&self, vm: &VmName) -> Result<Vec<PortForward>> {
        let ctx = Ctx::vm("forwards", vm);
        Ok(self
            .entry(&ctx, vm)?
            .spec
            .as_ref()
            .map(VmSpec::resolved_forwards)
            .unwrap_or_default())
    }

    async fn forward_add(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        let ctx = Ctx::vm(format!("forward add {}", fwd.name), vm);
        let e = self.entry(&ctx, vm)?;
        if self.forward_transport() == ForwardTransport::Hypervisor {
            let net = self.host_network(&ctx).await?;
            if self.state(vm).await? == VmState::Running {
                let ip = self.guest_ip(&ctx, &e.vmx).await?;
                self.set_forward(&ctx, vm, &net, &ip, fwd).await?;
            }
        }
        self.update_entry(&ctx, vm, |e| {
            if let Some(s) = e.spec.as_mut() {
                s.forwards.push(ForwardSpec::from(fwd));
            }
        })
    }

    async fn forward_remove(&self, vm: &VmName, fwd: &PortForward) -> Result<()> {
        let ctx = Ctx::vm(format!("forward remove {}", fwd.name), vm);
        if self.forward_transport() == ForwardTransport::Hypervisor {
            let net = self.host_network(&ctx).await?;
            match self.delete_forward(&ctx, &net, fwd).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.update_entry(&ctx, vm, |e| {
            if let Some(s) = e.spec.as_mut() {
                s.forwards.retain(|f| f.name != fwd.name);
            }
        })
    }

    /// Ready when VMware Tools report "running".
    async fn agent_ping(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        let ctx = Ctx::vm("vmware tools", vm);
        let e = self.entry(&ctx, vm)?;
        let out = self
            .vmrun(
                &ctx,
                "checkToolsState",
                vec![e.vmx.clone().into()],
                Some(timeout),
            )
            .await?;
        match out.stdout_str().trim() {
            "running" => {
                for var in &self.opts.ready_guest_vars {
                    let args = vec![e.vmx.clone().into(), "guestVar".into(), var.into()];
                    let v = self
                        .vmrun(&ctx, "readVariable", args, Some(timeout))
                        .await?;
                    if v.stdout_str().trim().is_empty() {
                        return Err(Error::backend(
                            ctx,
                            "vmrun",
                            format!("guest variable {var} is not set yet"),
                        ));
                    }
                }
                Ok(())
            }
            s => Err(Error::backend(
                ctx,
                "vmrun",
                format!("VMware Tools state is {s:?}, waiting for \"running\""),
            )),
        }
    }

    async fn shared_folder_add(&self, vm: &VmName, folder: &SharedFolder) -> Result<()> {
        let ctx = Ctx::vm(format!("shared folder add {}", folder.name), vm);
        let e = self.entry(&ctx, vm)?;
        let vmx: OsString = e.vmx.into();
        self.vmrun(&ctx, "enableSharedFolders", vec![vmx.clone()], None)
            .await?;
        self.vmrun(
            &ctx,
            "addSharedFolder",
            vec![
                vmx.clone(),
                folder.name.clone().into(),
                folder.host_path.clone().into(),
            ],
            None,
        )
        .await?;
        let mode = if folder.readonly {
            "readonly"
        } else {
            "writable"
        };
        let args = vec![
            vmx,
            folder.name.clone().into(),
            folder.host_path.clone().into(),
            mode.into(),
        ];
        self.vmrun(&ctx, "setSharedFolderState", args, None)
            .await
            .map(|_| ())
    }

    async fn shared_folder_remove(&self, vm: &VmName, name: &str) -> Result<()> {
        let ctx = Ctx::vm(format!("shared folder remove {name}"), vm);
        let e = self.entry(&ctx, vm)?;
        self.vmrun(
            &ctx,
            "removeSharedFolder",
            vec![e.vmx.into(), name.into()],
            None,
        )
        .await
        .map(|_| ())
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

    fn subscribe(&self) -> Option<broadcast::Receiver<VmEvent>> {
        None
    }

    async fn console_log(&self, _vm: &VmName) -> Result<Option<PathBuf>> {
        Ok(None)
    }
}
