//! Everything a VM is defined from: boot, disks, network, consoles, shared folders.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::{Error, Result};
use crate::name::VmName;

/// How the guest is booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Boot {
    /// Direct kernel boot.
    Kernel {
        /// The kernel image.
        kernel: PathBuf,
        /// The initial ramdisk.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        #[serde(default)]
        cmdline: String,
    },
    /// Boot from the first disk.
    Disk,
    /// Import an OVA/OVF appliance (VirtualBox); its disks come from the appliance.
    Appliance {
        /// The .ova or .ovf file.
        path: PathBuf,
    },
    /// Adopt an existing machine definition: a VMware .vmx file.
    Existing {
        /// The .vmx file.
        path: PathBuf,
    },
}

/// A disk image format. Which ones a backend can attach differs: libvirt/QEMU takes all of them,
/// VirtualBox takes VDI, VMDK and VHD, VMware takes VMDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// QEMU copy-on-write (snapshots, linked clones).
    #[default]
    Qcow2,
    /// Raw image.
    Raw,
    /// VirtualBox's native format.
    Vdi,
    /// VMware's format, also VirtualBox's appliance format.
    Vmdk,
    /// Virtual PC / Hyper-V (QEMU calls it `vpc`).
    Vhd,
}

impl DiskFormat {
    /// Every format, in the order messages list them.
    pub const ALL: [DiskFormat; 5] = [
        DiskFormat::Qcow2,
        DiskFormat::Raw,
        DiskFormat::Vdi,
        DiskFormat::Vmdk,
        DiskFormat::Vhd,
    ];

    /// The format a file name implies (`.vdi`, `.vmdk`, `.vhd`, `.qcow2`, `.img`/`.raw`), if any.
    pub fn from_path(path: &std::path::Path) -> Option<DiskFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "qcow2" | "qcow" => DiskFormat::Qcow2,
            "img" | "raw" => DiskFormat::Raw,
            "vdi" => DiskFormat::Vdi,
            "vmdk" => DiskFormat::Vmdk,
            "vhd" | "vpc" => DiskFormat::Vhd,
            _ => return None,
        })
    }

    /// QEMU's name for the format (`-f`, libvirt `<driver type=>`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            DiskFormat::Vhd => "vpc",
            f => f.as_str(),
        }
    }

    /// The format's name in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
            DiskFormat::Vdi => "vdi",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Vhd => "vhd",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        DiskFormat::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s) || f.qemu_name() == s)
            .ok_or_else(|| format!("unknown disk format {s:?} (qcow2, raw, vdi, vmdk, vhd)"))
    }
}

/// A disk attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DiskSpecRepr")]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// Its format (default: from the file name).
    #[serde(default)]
    pub format: DiskFormat,
    /// Attach read-only.
    #[serde(default)]
    pub readonly: bool,
    /// anyvm created this file (a clone overlay) and deletes it with the VM.
    #[serde(default)]
    pub owned: bool,
}

/// How a disk is read from JSON/TOML/Python: `format` may be left out when the file name says it.
#[derive(Deserialize)]
struct DiskSpecRepr {
    path: PathBuf,
    format: Option<DiskFormat>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    owned: bool,
}

impl From<DiskSpecRepr> for DiskSpec {
    fn from(r: DiskSpecRepr) -> Self {
        DiskSpec {
            format: r
                .format
                .or_else(|| DiskFormat::from_path(&r.path))
                .unwrap_or_default(),
            path: r.path,
            readonly: r.readonly,
            owned: r.owned,
        }
    }
}

/// Hardware acceleration. `Auto` picks KVM when `/dev/kvm` is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` works, else software emulation.
    #[default]
    Auto,
    /// Hardware virtualization (KVM).
    Kvm,
    /// Software emulation (QEMU TCG).
    Tcg,
}

/// Remote console settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConsoleSpec {
    /// Offer a VNC display on 127.0.0.1; `Some(Auto)` allocates a distinct port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<HostPort>,
}

/// Everything needed to define a VM on any backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The VM's name.
    pub name: VmName,
    /// Virtual CPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// How it boots.
    pub boot: Boot,
    /// Its disks, in order.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Port forwards to the guest.
    #[serde(default)]
    pub forwards: Vec<ForwardSpec>,
    /// Remote console (VNC).
    #[serde(default)]
    pub console: ConsoleSpec,
    /// Hardware acceleration.
    #[serde(default)]
    pub accel: Accel,
    /// What the guest may reach on the network.
    #[serde(default)]
    pub network: Network,
    /// Host folders offered to the guest from boot.
    #[serde(default)]
    pub shares: Vec<SharedFolder>,
    /// Free-form key/value labels stored with the VM (job clones record their owner here, so
    /// `anyvm gc` can find the ones whose owner died).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The guest's outbound network (inbound forwards work in every mode).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Network {
    /// Full NAT: the guest reaches the host (as 10.0.2.2 on QEMU) and beyond.
    #[default]
    Nat,
    /// The guest reaches only the listed endpoints, each at 10.0.2.100:`guest_port` (QEMU user
    /// networking, libvirt backend), and nothing else — not even the host at 10.0.2.2.
    Restricted {
        /// The endpoints it may reach.
        #[serde(default)]
        allow: Vec<Endpoint>,
    },
    /// No outbound connections at all.
    None,
}

/// A host-side service a restricted guest may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Where the service runs, as the host sees it (default 127.0.0.1).
    #[serde(default = "loopback")]
    pub host: String,
    /// The port the service listens on.
    pub port: u16,
    /// The port the guest connects to at 10.0.2.100 (default: `port`).
    pub guest_port: Option<u16>,
}

fn loopback() -> String {
    "127.0.0.1".into()
}

impl Endpoint {
    /// The port the guest connects to.
    pub fn guest_port(&self) -> u16 {
        self.guest_port.unwrap_or(self.port)
    }
}

impl Network {
    /// Check the endpoint.
    pub fn validate(&self) -> Result<()> {
        if let Network::Restricted { allow } = self {
            let mut seen = std::collections::BTreeSet::new();
            for e in allow {
                let what = format!("network endpoint {}:{}", e.host, e.port);
                if e.port == 0 || e.guest_port == Some(0) {
                    return Err(Error::invalid_arg(what, "ports must be 1-65535"));
                }
                if e.host.is_empty()
                    || !e
                        .host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
                {
                    return Err(Error::invalid_arg(
                        what,
                        "host must be an IP address or a DNS name",
                    ));
                }
                if !seen.insert(e.guest_port()) {
                    return Err(Error::invalid_arg(
                        what,
                        format!("guest port {} is allowed twice", e.guest_port()),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn default_cpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    512
}

impl VmSpec {
    /// A spec with defaults (1 CPU, 512 MiB, NAT) for `name`.
    pub fn new(name: VmName, boot: Boot) -> Self {
        VmSpec {
            name,
            cpus: default_cpus(),
            memory_mib: default_memory(),
            boot,
            disks: Vec::new(),
            forwards: Vec::new(),
            console: ConsoleSpec::default(),
            accel: Accel::Auto,
            network: Network::Nat,
            shares: Vec::new(),
            labels: Default::default(),
        }
    }

    /// Forwards whose host ports are known.
    pub fn resolved_forwards(&self) -> Vec<PortForward> {
        self.forwards
            .iter()
            .filter_map(ForwardSpec::resolved)
            .collect()
    }

    /// Check the spec: names, sizes, disks, forwards, network.
    pub fn validate(&self) -> Result<()> {
        let what = |k: &str| format!("vm '{}' {k}", self.name);
        if self.cpus == 0 || self.cpus > 512 {
            return Err(Error::invalid_arg(what("cpus"), "must be 1-512"));
        }
        if self.memory_mib < 16 {
            return Err(Error::invalid_arg(
                what("memory_mib"),
                "must be at least 16",
            ));
        }
        for (k, v) in &self.labels {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
            if !key_ok {
                return Err(Error::invalid_arg(
                    what(&format!("label {k:?}")),
                    "keys are 1-63 characters of letters, digits, '.', '_', '/', '-'",
                ));
            }
            if v.len() > 256 || v.chars().any(char::is_control) {
                return Err(Error::invalid_arg(
                    what(&format!("label {k:?}")),
                    "values are at most 256 bytes without control characters",
                ));
            }
        }
        let abs = |p: &PathBuf| -> Result<()> {
            if p.is_absolute() {
                Ok(())
            } else {
                Err(Error::invalid_arg(
                    what("boot"),
                    format!("{} must be an absolute path", p.display()),
                ))
            }
        };
        match &self.boot {
            Boot::Kernel { kernel, initrd, .. } => {
                abs(kernel)?;
                if let Some(i) = initrd {
                    abs(i)?;
                }
            }
            Boot::Appliance { path } | Boot::Existing { path } => abs(path)?,
            Boot::Disk if self.disks.is_empty() => {
                return Err(Error::invalid_arg(
                    what("boot"),
                    "disk boot needs at least one disk",
                ))
            }
            Boot::Disk => {}
        }
        for d in &self.disks {
            if !d.path.is_absolute() {
                return Err(Error::invalid_arg(
                    what("disks"),
                    format!("{} must be an absolute path", d.path.display()),
                ));
            }
        }
        self.network.validate()?;
        let mut share_names = std::collections::HashSet::new();
        for s in &self.shares {
            s.validate()?;
            if !share_names.insert(&s.name) {
                return Err(Error::invalid_arg(
                    what("shares"),
                    format!("share name {:?} is used twice", s.name),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for f in &self.forwards {
            f.validate()?;
            if !names.insert(&f.name) {
                return Err(Error::invalid_arg(
                    what("forwards"),
                    format!("forward name {:?} is used twice", f.name),
                ));
            }
        }
        Ok(())
    }
}

/// A host folder offered to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFolder {
    /// The share's name as the guest sees it.
    pub name: String,
    /// The host folder.
    pub host_path: PathBuf,
    /// The guest cannot write to it (enforced on the host too).
    #[serde(default)]
    pub readonly: bool,
    /// Mount it in the guest at start where the backend can.
    #[serde(default)]
    pub automount: bool,
    /// Where `Vm::shared_folder_mount` mounts it in the guest.
    #[serde(default)]
    pub guest_path: Option<String>,
}

impl SharedFolder {
    /// Check the folder: a name, an absolute host path.
    pub fn validate(&self) -> Result<()> {
        let what = format!("shared folder {:?}", self.name);
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid_arg(
                what,
                "name must be non-empty letters, digits, '-' or '_'",
            ));
        }
        if !self.host_path.is_absolute() {
            return Err(Error::invalid_arg(
                what,
                format!("{} must be an absolute path", self.host_path.display()),
            ));
        }
        if let Some(g) = &self.guest_path {
            if !g.starts_with('/') || g.contains('\0') || g.contains('\n') || g.contains("..") {
                return Err(Error::invalid_arg(
                    what,
                    format!("guest_path {g:?} must be an absolute path without '..'"),
                ));
            }
        }
        Ok(())
    }
}
