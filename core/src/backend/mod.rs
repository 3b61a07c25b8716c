//! The one trait every hypervisor implements. Backends do the hypervisor-specific work; the
//! [`crate::Vm`] facade adds what is common (port allocation, graceful-then-forced stop,
//! readiness, ssh configuration) so it is written once.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::credentials::Credentials;
use crate::error::{Error, Result};
use crate::events::CopyProgress;
use crate::health::Check;
use crate::name::VmName;
use crate::types::{
    CloneLink, ExecOutput, ExecRequest, OutputSink, PortForward, Screenshot, SharedFolder,
    SnapshotInfo, VmInfo, VmSpec, VmState, VmStatus,
};

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod virtualbox;
pub mod vmware;

pub use crate::events::{VmEvent, VmEventKind};

/// How a backend's port forwards reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardTransport {
    /// The hypervisor forwards (QEMU hostfwd, VirtualBox NAT rules, VMware NAT host network).
    Hypervisor,
    /// anyvm runs one ssh local forward per port to the guest's address (anyvm's ssh tunnels).
    SshTunnel,
}

/// What a backend left on the host for a VM that is gone (its owner was killed mid-operation,
/// or the VM was removed behind anyvm's back), found by `anyvm gc`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Leftover {
    /// What it is.
    pub kind: LeftoverKind,
    /// Where, on the hypervisor host.
    pub path: String,
}

/// The kinds of [`Leftover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftoverKind {
    /// A read-only bind mount made for a share.
    ShareMount,
    /// A clone's overlay disk that no VM uses (made before its VM was defined, or left by a
    /// destroy that was cut short).
    CloneDisk,
    /// A base disk frozen for linked clones that no clone uses any more.
    FrozenBase,
    /// An image qemu-img was still writing.
    PartialImage,
}

impl fmt::Display for LeftoverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeftoverKind::ShareMount => "share mount",
            LeftoverKind::CloneDisk => "clone disk",
            LeftoverKind::FrozenBase => "frozen base disk",
            LeftoverKind::PartialImage => "partial image",
        })
    }
}

/// What one sweep of host state found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostSweep {
    /// Released, or on a dry run to release.
    pub released: Vec<Leftover>,
    /// Why part of the host state was not looked at (e.g. clones kept the images dir busy).
    pub skipped: Option<String>,
}

/// A warm state: a ready VM's memory and disks saved once, that clones start from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WarmInfo {
    /// The template it was made from.
    pub template: String,
    /// What it was made from: the template's definition and disks (a change makes a new one).
    pub key: String,
    /// Where it lives on the hypervisor host.
    pub dir: std::path::PathBuf,
    /// Size of the saved memory.
    pub memory_bytes: u64,
    /// Size of the saved disks.
    pub disk_bytes: u64,
    /// How long saving took (memory and disks).
    pub saved_in: Option<Duration>,
}

/// The backend used when neither the caller nor the configuration names one.
pub const DEFAULT_BACKEND: &str = "libvirt:qemu:///system";

/// Which hypervisor, and how to reach it: `libvirt:qemu:///system`, `virtualbox`, `vmware:ws`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendUri {
    /// libvirt at this URI (`qemu:///system`, `qemu+ssh://host/system`).
    Libvirt {
        /// The libvirt connection URI.
        uri: String,
    },
    /// VirtualBox through `VBoxManage`.
    VirtualBox,
    /// VMware through `vmrun`.
    Vmware {
        /// `ws`, `fusion` or `player`.
        flavor: String,
    },
}

impl FromStr for BackendUri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::invalid_arg(format!("backend {s:?}"), why);
        let (scheme, rest) = match s.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        match scheme {
            "libvirt" | "qemu" | "kvm" => {
                let uri = rest
                    .filter(|r| !r.is_empty())
                    .unwrap_or("qemu:///system")
                    .to_string();
                if !uri.contains("://") {
                    return Err(bad(format!(
                        "{uri:?} is not a libvirt URI like qemu:///system"
                    )));
                }
                Ok(BackendUri::Libvirt { uri })
            }
            "virtualbox" | "vbox" => match rest {
                None | Some("") => Ok(BackendUri::VirtualBox),
                Some(r) => Err(bad(format!("virtualbox takes no argument, got {r:?}"))),
            },
            "vmware" => {
                let flavor = rest.filter(|r| !r.is_empty()).unwrap_or("ws").to_string();
                if !matches!(flavor.as_str(), "ws" | "fusion" | "player") {
                    return Err(bad(format!(
                        "VMware flavor {flavor:?} is not ws, fusion or player"
                    )));
                }
                Ok(BackendUri::Vmware { flavor })
            }
            _ => Err(bad(
                "expected libvirt:URI, virtualbox or vmware:ws|fusion|player".into(),
            )),
        }
    }
}

impl fmt::Display for BackendUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendUri::Libvirt { uri } => write!(f, "libvirt:{uri}"),
            BackendUri::VirtualBox => f.write_str("virtualbox"),
            BackendUri::Vmware { flavor } => write!(f, "vmware:{flavor}"),
        }
    }
}

/// A hypervisor driver. All methods take validated names; every call is bounded by a timeout.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// Short identifier used in messages (e.g. "libvirt").
    fn id(&self) -> &str;
    /// The URI this backend was opened with.
    fn uri(&self) -> String;

    /// Every VM the backend knows, anyvm-defined or not.
    async fn list(&self) -> Result<Vec<VmInfo>>;
    /// Whether a VM of that name is defined.
    async fn exists(&self, vm: &VmName) -> Result<bool>;
    /// The spec anyvm stored when defining the VM, if it did.
    async fn spec(&self, vm: &VmName) -> Result<Option<VmSpec>>;
    /// Define a VM. Forward host ports are concrete (`Fixed`) by the time this is called.
    async fn define(&self, spec: &VmSpec) -> Result<()>;
    /// Remove the definition, its snapshots and the disks anyvm created for it.
    async fn undefine(&self, vm: &VmName) -> Result<()>;

    /// Remove a VM nobody keeps anything of (a job's transient clone) as fast as the host
    /// allows: its hypervisor process killed outright where the backend can (no graceful
    /// wind-down), undefined, its disks gone. The default powers off, then undefines.
    async fn discard(&self, vm: &VmName) -> Result<()> {
        if !matches!(self.state(vm).await?, VmState::ShutOff | VmState::Saved) {
            self.power_off(vm).await?;
        }
        self.undefine(vm).await
    }

    /// The VM's power state.
    async fn state(&self, vm: &VmName) -> Result<VmState>;
    /// Power the VM on (headless); resumes a saved state.
    async fn start(&self, vm: &VmName) -> Result<()>;
    /// Ask the guest to shut down; returns once the request is delivered.
    async fn request_shutdown(&self, vm: &VmName) -> Result<()>;
    /// Cut the power.
    async fn power_off(&self, vm: &VmName) -> Result<()>;
    /// Freeze the guest's CPUs.
    async fn pause(&self, vm: &VmName) -> Result<()>;
    /// Unfreeze a paused guest.
    async fn resume(&self, vm: &VmName) -> Result<()>;
    /// Save memory to disk and stop; the next start restores it.
    async fn save_state(&self, vm: &VmName) -> Result<()>;

    /// Take a snapshot named `name` (with memory when the VM runs, where the backend can).
    async fn snapshot_take(&self, vm: &VmName, name: &str, description: &str) -> Result<()>;
    /// Go back to snapshot `name`.
    async fn snapshot_restore(&self, vm: &VmName, name: &str) -> Result<()>;
    /// Remove snapshot `name`.
    async fn snapshot_delete(&self, vm: &VmName, name: &str) -> Result<()>;
    /// The VM's snapshots, oldest first.
    async fn snapshot_list(&self, vm: &VmName) -> Result<Vec<SnapshotInfo>>;
    /// Make copy-on-write disks for a linked clone of `base` (at `snapshot`, or its current
    /// disks when powered off) and return the clone's spec, not yet defined.
    /// Create and define a linked (copy-on-write) clone of `base`, at `snapshot` or, when none is
    /// named, at its current disks (the base must be off). `clone` is the base's spec renamed with
    /// fresh host ports; the backend chooses disk locations.
    async fn clone_linked(
        &self,
        base: &VmName,
        snapshot: Option<String>,
        clone: &VmSpec,
    ) -> Result<()>;

    /// Run a guest program and collect its output when it ends.
    async fn exec(&self, vm: &VmName, req: &ExecRequest) -> Result<ExecOutput>;
    /// Run a guest program, sending its output to `sink` as it arrives. The returned output
    /// has the exit status and duration and empty stdout/stderr: everything went to the sink.
    /// Dropping the future kills the guest program. The default runs [`Backend::exec`] and
    /// sends the buffered output at the end, for channels that only return output at exit.
    async fn exec_streaming(
        &self,
        vm: &VmName,
        req: &ExecRequest,
        sink: OutputSink,
    ) -> Result<ExecOutput> {
        let mut out = self.exec(vm, req).await?;
        crate::types::send_buffered(&sink, &mut out).await;
        Ok(out)
    }
    /// Guest file operations take the guest account for backends whose tools need one.
    async fn copy_to(
        &self,
        vm: &VmName,
        host: &Path,
        guest: &str,
        creds: Option<Credentials>,
        progress: CopyProgress,
    ) -> Result<u64>;
    /// Copy a guest file to the host; `progress` hears the bytes done where the channel
    /// copies in chunks (libvirt's agent).
    async fn copy_from(
        &self,
        vm: &VmName,
        guest: &str,
        host: &Path,
        creds: Option<Credentials>,
        progress: CopyProgress,
    ) -> Result<u64>;
    /// Read a small guest file into memory (at most `limit` bytes). The default copies it to a
    /// private temp file; backends with a direct channel override it.
    async fn read_file(
        &self,
        vm: &VmName,
        guest: &str,
        limit: usize,
        creds: Option<Credentials>,
    ) -> Result<Vec<u8>> {
        let ctx = crate::error::Ctx::vm(format!("read {guest}"), vm);
        read_by_copy(&ctx, limit, |p| async move {
            self.copy_from(vm, guest, &p, creds, CopyProgress::none())
                .await
        })
        .await
    }

    /// The port forwards in effect.
    async fn forwards(&self, vm: &VmName) -> Result<Vec<PortForward>>;
    /// Add a forward (its host port is concrete).
    async fn forward_add(&self, vm: &VmName, fwd: &PortForward) -> Result<()>;
    /// Remove a forward.
    async fn forward_remove(&self, vm: &VmName, fwd: &PortForward) -> Result<()>;

    /// One round trip to the guest agent / additions / tools; Ok means it answers.
    async fn agent_ping(&self, vm: &VmName, timeout: Duration) -> Result<()>;
    /// Offer a host folder to the guest.
    async fn shared_folder_add(&self, vm: &VmName, folder: &SharedFolder) -> Result<()> {
        let _ = folder;
        Err(unsupported(self.id(), vm, "shared folders"))
    }
    /// Stop offering the share `name`.
    async fn shared_folder_remove(&self, vm: &VmName, name: &str) -> Result<()> {
        let _ = name;
        Err(unsupported(self.id(), vm, "shared folders"))
    }
    /// The shares offered to the guest.
    async fn shared_folders(&self, vm: &VmName) -> Result<Vec<SharedFolder>> {
        Err(unsupported(self.id(), vm, "shared folders"))
    }

    /// Hardware reset: the guest restarts at once, without shutting down.
    async fn reset(&self, vm: &VmName) -> Result<()>;

    /// A PNG of the running guest's screen. VMware's `captureScreen` is a guest operation and
    /// needs the guest account (`creds`).
    async fn screenshot(&self, vm: &VmName, creds: Option<Credentials>) -> Result<Screenshot>;

    /// The protocol of the remote display `console.vnc` asks for: `vnc`, or `rdp` where the
    /// hypervisor offers RDP instead (VirtualBox's VRDE).
    fn remote_display_protocol(&self) -> &'static str {
        "vnc"
    }

    /// The guest command that mounts a share at `guest_path` (run as root in the guest).
    fn share_mount_argv(&self, share: &SharedFolder, guest_path: &str) -> Vec<String> {
        // libvirt: virtiofs, the share's name is the tag. Read-only is enforced on the host too.
        mount_argv("virtiofs", share, guest_path)
    }

    /// Whether guest operations through the tools put the guest password on a command line
    /// (vmrun `-gp`); policy `secrets_in_argv = false` refuses them.
    fn tools_take_secrets_in_argv(&self) -> bool {
        false
    }

    /// Who carries port forwards: the hypervisor, or ssh tunnels run by anyvm.
    fn forward_transport(&self) -> ForwardTransport {
        ForwardTransport::Hypervisor
    }
    /// An address at which the host reaches the guest directly (bridged, host-only or NAT
    /// network), where the backend can tell; `None` when only forwards reach it.
    async fn guest_address(&self, vm: &VmName) -> Result<Option<String>> {
        let _ = vm;
        Ok(None)
    }

    /// The machine forwards listen on when it is not this one (a remote libvirt host).
    fn forward_host(&self) -> Option<String> {
        None
    }

    /// The last `limit` bytes of the serial console log. The default reads the local file
    /// [`Backend::console_log`] names; backends with a remote host read it there.
    async fn console_tail(&self, vm: &VmName, limit: usize) -> Result<Vec<u8>> {
        let Some(path) = self.console_log(vm).await? else {
            return Ok(Vec::new());
        };
        let ctx = crate::error::Ctx::vm("read console log", vm);
        crate::util::tail::read_tail(&path, limit).map_err(|e| Error::io(ctx, &path, e))
    }

    /// Release what the backend keeps on the host for VMs that no longer exist (libvirt: the
    /// read-only bind mounts of a VM removed behind anyvm's back or while its owner was being
    /// killed, clone disks and frozen bases no domain uses). `live` lists the backend's VMs;
    /// names are re-checked before anything is released. Returns what was released, or would
    /// be on a dry run.
    async fn release_stale_host_state(&self, live: &[String], dry_run: bool) -> Result<HostSweep> {
        let _ = (live, dry_run);
        Ok(HostSweep::default())
    }

    /// State, forwards and snapshots together. The default asks for each; backends that read
    /// them all from one hypervisor call (VirtualBox `showvminfo`) override it.
    async fn status(&self, vm: &VmName) -> Result<VmStatus> {
        Ok(VmStatus {
            name: vm.to_string(),
            state: self.state(vm).await?,
            forwards: self.forwards(vm).await?,
            snapshots: self.snapshot_list(vm).await?,
        })
    }

    /// Every linked-clone edge the backend knows. The default reads the clone labels anyvm
    /// stores in each VM's spec ([`crate::labels::CLONE_BASE`]); VirtualBox reads its media
    /// registry instead, which also knows clones made without anyvm.
    async fn clone_links(&self) -> Result<Vec<CloneLink>> {
        let mut links = Vec::new();
        for info in self.list().await? {
            let Ok(name) = VmName::new(&info.name) else {
                continue;
            };
            let spec = match self.spec(&name).await {
                Ok(Some(s)) => s,
                // Gone since the listing, or not anyvm's: no labels to read.
                Ok(None) | Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            if let Some(base) = spec.labels.get(crate::labels::CLONE_BASE) {
                links.push(CloneLink {
                    clone: info.name.clone(),
                    base: base.clone(),
                    snapshot: spec.labels.get(crate::labels::CLONE_SNAPSHOT).cloned(),
                });
            }
        }
        Ok(links)
    }

    /// Write the VM as an OVA appliance (VirtualBox `export`).
    async fn export_appliance(&self, vm: &VmName, path: &Path) -> Result<()> {
        let _ = path;
        Err(unsupported(self.id(), vm, "export to OVA"))
    }

    /// Health checks for this backend on this host: the tool and its version, kernel drivers,
    /// what the hypervisor needs to run guests. Problems are `fail` checks, not errors.
    async fn doctor(&self) -> Vec<Check> {
        Vec::new()
    }

    /// Event stream, for backends that have one; `None` means callers must poll.
    fn subscribe(&self) -> Option<broadcast::Receiver<VmEvent>>;

    /// Why clones of `spec` cannot start warm here (`None`: they can).
    fn warm_unsupported(&self, spec: &VmSpec) -> Option<String> {
        let _ = spec;
        Some(format!(
            "the {} backend cannot start a clone from a saved memory state",
            self.id()
        ))
    }

    /// Whether a warm clone's entropy pool must be fed through guest exec after its resume
    /// (the backend has no VM generation ID and no agent of its own to do it).
    fn warm_identity_in_guest(&self) -> bool {
        false
    }

    /// The complete warm state `key` of `template`, if there is one.
    async fn warm_find(&self, template: &VmName, key: &str) -> Result<Option<WarmInfo>> {
        let _ = (template, key);
        Ok(None)
    }

    /// Save running, ready `vm` (a clone of `template` defined from `spec`) as the warm state
    /// `key` of `template`. `vm` is left paused with its state written out: destroy it.
    async fn warm_save(
        &self,
        vm: &VmName,
        template: &VmName,
        key: &str,
        spec: &VmSpec,
    ) -> Result<WarmInfo> {
        let _ = (template, key, spec);
        Err(unsupported(self.id(), vm, "save a warm state"))
    }

    /// Define `clone` (host ports resolved) on the warm state `key` of `template` and bring it up
    /// from the saved memory: running when this returns, nothing of it left on failure.
    async fn warm_start(&self, template: &VmName, key: &str, clone: &VmSpec) -> Result<()> {
        let _ = (template, key);
        Err(unsupported(self.id(), &clone.name, "start a clone warm"))
    }

    /// Remove `template`'s warm states other than `keep` that no VM uses.
    async fn warm_discard(&self, template: &VmName, keep: Option<String>) {
        let _ = (template, keep);
    }

    /// A future that resolves, saying what was seen, when the running VM's hypervisor process
    /// exits: sooner than the hypervisor reports it (libvirt answers only after cleaning up a
    /// killed QEMU, seconds later). `None` where the backend cannot watch the process (the
    /// default, a remote host, a VM not running when called).
    fn process_exit(&self, vm: &VmName) -> Option<futures::future::BoxFuture<'static, String>> {
        let _ = vm;
        None
    }
    /// Path of the serial console log on the host, where the backend keeps one.
    async fn console_log(&self, vm: &VmName) -> Result<Option<std::path::PathBuf>>;
}

/// A mock with the defaults every real backend shares (hypervisor forwards, no guest address),
/// so tests only set up what they exercise.
#[cfg(test)]
pub(crate) fn mock() -> MockBackend {
    let mut b = MockBackend::new();
    b.expect_forward_transport()
        .return_const(ForwardTransport::Hypervisor);
    b.expect_guest_address().returning(|_| Ok(None));
    b.expect_forward_host().return_const(None);
    b.expect_subscribe().returning(|| None);
    b.expect_process_exit().returning(|_| None);
    b
}

/// The guest account for tools that log in to the guest, or an Auth error saying how to give one.
pub fn require_credentials(
    ctx: &crate::error::Ctx,
    creds: Option<&Credentials>,
    what: &str,
) -> Result<Credentials> {
    creds.cloned().ok_or_else(|| Error::Auth {
        ctx: ctx.clone(),
        reason: format!(
            "{what} needs a guest account; set credentials in the config or Vm::with_credentials"
        ),
    })
}

/// `mount -t FSTYPE [-o ro] SHARE GUEST_PATH`, for file systems that name a share by its name.
pub fn mount_argv(fstype: &str, share: &SharedFolder, guest_path: &str) -> Vec<String> {
    let mut v: Vec<String> = vec!["mount".into(), "-t".into(), fstype.into()];
    if share.readonly {
        v.extend(["-o".into(), "ro".into()]);
    }
    v.extend([share.name.clone(), guest_path.into()]);
    v
}

/// Read a small guest file by copying it to a private temp file with `copy` (given the
/// destination) and returning at most `limit` bytes.
pub(crate) async fn read_by_copy<F, Fut>(
    ctx: &crate::error::Ctx,
    limit: usize,
    copy: F,
) -> Result<Vec<u8>>
where
    F: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let tmp = tempfile::tempdir().map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
    let p = tmp.path().join("f");
    copy(p.clone()).await?;
    let mut data = std::fs::read(&p).map_err(|e| Error::io(ctx.clone(), &p, e))?;
    data.truncate(limit);
    Ok(data)
}

/// Backends without per-VM network restriction refuse `restricted` and `none` instead of
/// silently giving the guest full NAT.
pub fn require_nat_network(ctx: &crate::error::Ctx, backend: &str, spec: &VmSpec) -> Result<()> {
    match spec.network {
        crate::types::Network::Nat => Ok(()),
        ref n => Err(Error::PolicyDenied {
            ctx: ctx.clone(),
            reason: format!(
                "network mode {:?} cannot be enforced by the {backend} backend (its NAT has no per-VM allowlist); use libvirt for restricted guests or mode \"nat\"",
                match n {
                    crate::types::Network::Restricted { .. } => "restricted",
                    _ => "none",
                }
            ),
        }),
    }
}

/// The error for an operation a backend does not offer.
pub fn unsupported(backend: &str, vm: &VmName, what: &str) -> Error {
    Error::InvalidState {
        ctx: crate::error::Ctx::vm(what, vm),
        state: format!("not supported by the {backend} backend"),
        hint: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_uris() {
        assert_eq!(
            "libvirt:qemu:///system".parse::<BackendUri>().unwrap(),
            BackendUri::Libvirt {
                uri: "qemu:///system".into()
            }
        );
        assert_eq!(
            "libvirt".parse::<BackendUri>().unwrap().to_string(),
            "libvirt:qemu:///system"
        );
        assert_eq!(
            "libvirt:qemu+ssh://u@h/system"
                .parse::<BackendUri>()
                .unwrap(),
            BackendUri::Libvirt {
                uri: "qemu+ssh://u@h/system".into()
            }
        );
        assert_eq!(
            "virtualbox".parse::<BackendUri>().unwrap(),
            BackendUri::VirtualBox
        );
        assert_eq!(
            "vmware:fusion".parse::<BackendUri>().unwrap(),
            BackendUri::Vmware {
                flavor: "fusion".into()
            }
        );
        assert!("vmware:esx".parse::<BackendUri>().is_err());
        assert!("hyperv".parse::<BackendUri>().is_err());
        assert!("libvirt:nonsense".parse::<BackendUri>().is_err());
    }
}
