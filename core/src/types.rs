//! Plain data types shared by every backend and binding.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::credentials::Credentials;
use crate::error::{Error, Result};
use crate::name::VmName;

/// A VM's power state, normalized across hypervisors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    /// Memory saved to disk (managed save / savestate / suspend).
    Saved,
    ShutOff,
    /// Transitional: starting, stopping, saving, restoring.
    Busy,
    Crashed,
    Unknown,
}

impl VmState {
    pub fn is_running(self) -> bool {
        matches!(self, VmState::Running)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Saved => "saved",
            VmState::ShutOff => "shut off",
            VmState::Busy => "busy",
            VmState::Crashed => "crashed",
            VmState::Unknown => "unknown",
        })
    }
}

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    /// Whether anyvm defined the VM (and so knows its spec); `None` when the backend cannot
    /// tell without extra calls per VM.
    pub managed: Option<bool>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(Error::invalid_arg(
                "protocol",
                format!("{s:?} is not tcp or udp"),
            )),
        }
    }
}

/// A requested host port: a fixed number or one allocated by anyvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostPort {
    #[default]
    Auto,
    Fixed(u16),
}

impl Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            HostPort::Auto => s.serialize_str("auto"),
            HostPort::Fixed(p) => s.serialize_u16(*p),
        }
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(0) => Err(serde::de::Error::custom(
                "port 0 is not valid; use \"auto\"",
            )),
            Raw::N(p) => Ok(HostPort::Fixed(p)),
            Raw::S(s) if s == "auto" => Ok(HostPort::Auto),
            Raw::S(s) => s
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(HostPort::Fixed)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("{s:?} is not a port number or \"auto\""))
                }),
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(HostPort::Auto);
        }
        match s.parse::<u16>() {
            Ok(p) if p != 0 => Ok(HostPort::Fixed(p)),
            _ => Err(Error::invalid_arg(
                "host port",
                format!("{s:?} is not a port number (1-65535) or 'auto'"),
            )),
        }
    }
}

/// A forward as requested (host port may be `Auto`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSpec {
    /// A label unique within the VM, e.g. "ssh".
    pub name: String,
    #[serde(default)]
    pub proto: Protocol,
    #[serde(default = "default_host_addr")]
    pub host_addr: String,
    #[serde(default)]
    pub host_port: HostPort,
    pub guest_port: u16,
}

pub fn default_host_addr() -> String {
    "127.0.0.1".into()
}

impl ForwardSpec {
    pub fn new(name: impl Into<String>, guest_port: u16) -> Self {
        ForwardSpec {
            name: name.into(),
            proto: Protocol::Tcp,
            host_addr: default_host_addr(),
            host_port: HostPort::Auto,
            guest_port,
        }
    }
    pub fn host_port(mut self, p: HostPort) -> Self {
        self.host_port = p;
        self
    }
    pub fn proto(mut self, p: Protocol) -> Self {
        self.proto = p;
        self
    }

    pub fn validate(&self) -> Result<()> {
        let what = format!("forward {:?}", self.name);
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
        if self.guest_port == 0 {
            return Err(Error::invalid_arg(what, "guest port must be 1-65535"));
        }
        if self.host_addr.parse::<std::net::IpAddr>().is_err() {
            return Err(Error::invalid_arg(
                what,
                format!("host address {:?} is not an IP address", self.host_addr),
            ));
        }
        Ok(())
    }
}

/// A forward in effect: the host port is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    pub name: String,
    pub proto: Protocol,
    pub host_addr: String,
    pub host_port: u16,
    pub guest_port: u16,
}

impl PortForward {
    /// The address and port a client on the host connects to (a forward listening on every
    /// address is reached on loopback).
    pub fn connect_addr(&self) -> (String, u16) {
        let addr = if self.host_addr == "0.0.0.0" {
            "127.0.0.1".to_string()
        } else {
            self.host_addr.clone()
        };
        (addr, self.host_port)
    }

    /// [`PortForward::connect_addr`] for a forward that listens on `remote` (a remote
    /// hypervisor host) rather than here: a wildcard address names that host; a loopback one
    /// cannot be reached from here, which the error says how to fix.
    pub fn connect_addr_via(
        &self,
        remote: Option<&str>,
    ) -> std::result::Result<(String, u16), String> {
        let Some(r) = remote else {
            return Ok(self.connect_addr());
        };
        if self.host_addr == "0.0.0.0" || self.host_addr == "::" {
            return Ok((r.to_string(), self.host_port));
        }
        if self.host_addr.starts_with("127.") || self.host_addr == "::1" {
            return Err(format!(
                "forward {:?} listens on the loopback address of the libvirt host {r}, which this machine cannot reach; give it host_addr = \"0.0.0.0\" (or an address of {r})",
                self.name
            ));
        }
        Ok((self.host_addr.clone(), self.host_port))
    }
}

#[cfg(test)]
mod forward_tests {
    use super::*;

    #[test]
    fn connect_address_here_and_on_a_remote_host() {
        let mut f = PortForward {
            name: "ssh".into(),
            proto: Protocol::Tcp,
            host_addr: "0.0.0.0".into(),
            host_port: 40022,
            guest_port: 22,
        };
        assert_eq!(f.connect_addr(), ("127.0.0.1".into(), 40022));
        assert_eq!(f.connect_addr_via(None), Ok(("127.0.0.1".into(), 40022)));
        assert_eq!(f.connect_addr_via(Some("hv1")), Ok(("hv1".into(), 40022)));
        f.host_addr = "127.0.0.1".into();
        assert_eq!(f.connect_addr(), ("127.0.0.1".into(), 40022));
        let e = f.connect_addr_via(Some("hv1")).unwrap_err();
        assert!(e.contains("loopback") && e.contains("0.0.0.0"), "{e}");
        f.host_addr = "10.0.0.5".into();
        assert_eq!(
            f.connect_addr_via(Some("hv1")),
            Ok(("10.0.0.5".into(), 40022))
        );
    }
}

impl From<&PortForward> for ForwardSpec {
    fn from(f: &PortForward) -> Self {
        ForwardSpec {
            name: f.name.clone(),
            proto: f.proto,
            host_addr: f.host_addr.clone(),
            host_port: HostPort::Fixed(f.host_port),
            guest_port: f.guest_port,
        }
    }
}

impl ForwardSpec {
    /// The forward in effect, once its host port is known.
    pub fn resolved(&self) -> Option<PortForward> {
        match self.host_port {
            HostPort::Fixed(p) => Some(PortForward {
                name: self.name.clone(),
                proto: self.proto,
                host_addr: self.host_addr.clone(),
                host_port: p,
                guest_port: self.guest_port,
            }),
            HostPort::Auto => None,
        }
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}:{}:{} -> {}",
            self.name, self.proto, self.host_addr, self.host_port, self.guest_port
        )
    }
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// Seconds since the epoch, when known.
    pub created: Option<i64>,
    /// The VM state captured (running snapshots include memory).
    pub state: Option<String>,
    pub current: bool,
    pub parent: Option<String>,
}

/// Everything `anyvm status` shows, read in as few hypervisor calls as the backend allows
/// (one `showvminfo` on VirtualBox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub state: VmState,
    pub forwards: Vec<PortForward>,
    pub snapshots: Vec<SnapshotInfo>,
}

/// One edge of the clone graph: `clone` is a linked clone of `base` (at `snapshot`, when the
/// backend ties clones to one) and cannot outlive the disks it shares with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub struct CloneLink {
    pub clone: String,
    pub base: String,
    pub snapshot: Option<String>,
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

/// How `destroy` (and `snapshot delete`) treat linked clones that depend on what is removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestroyOptions {
    /// Destroy the dependent clones first (deepest first). Without it, dependants make the call
    /// fail up front, naming them, and nothing changes.
    pub with_clones: bool,
}

impl DestroyOptions {
    pub fn with_clones(mut self, yes: bool) -> Self {
        self.with_clones = yes;
        self
    }
}

/// A timeout given in seconds by a person or another language: finite and positive, or an
/// InvalidArgument naming `what`. The one check the CLI, Python and C share.
pub fn positive_secs(s: f64, what: &str) -> crate::error::Result<Duration> {
    if s.is_finite() && s > 0.0 && s <= 1e12 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(crate::error::Error::invalid_arg(
            what,
            format!("{s} is not a positive number of seconds"),
        ))
    }
}

/// The error for a guest program that did not exit 0, as [`crate::Vm::exec_checked`] raises it
/// (also what the bindings' `check()` raise): VM, program, exit code or signal, its stderr.
pub fn guest_command_error(
    vm: &str,
    program: &str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    stderr: &[u8],
) -> crate::error::Error {
    crate::error::Error::GuestCommand {
        ctx: crate::error::Ctx::vm("exec", vm),
        program: program.to_string(),
        exit_code,
        reason: match (exit_code, signal) {
            (Some(c), _) => format!(
                "exit code {c}: {}",
                String::from_utf8_lossy(stderr)
                    .trim()
                    .chars()
                    .take(500)
                    .collect::<String>()
            ),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "no exit status".into(),
        },
        stderr: stderr.to_vec().into_boxed_slice(),
    }
}

/// How to stop a VM.
#[derive(Debug, Clone, Copy)]
pub struct StopOptions {
    /// Time allowed for a graceful shutdown before forcing power off.
    pub timeout: Duration,
    /// Skip the graceful attempt.
    pub force: bool,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            timeout: Duration::from_secs(60),
            force: false,
        }
    }
}

/// Which way a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    AlreadyOff,
    Graceful,
    /// The graceful request was ignored or too slow; power was cut.
    Forced,
}

impl StopOutcome {
    /// `already_off`, `graceful`, `forced`: the one spelling (JSON, Python, the CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            StopOutcome::AlreadyOff => "already_off",
            StopOutcome::Graceful => "graceful",
            StopOutcome::Forced => "forced",
        }
    }
}

impl fmt::Display for StopOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How exec and file copy reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestChannel {
    /// The hypervisor's guest tools: QEMU guest agent, Guest Additions, VMware Tools.
    #[default]
    Tools,
    /// OpenSSH with the credentials' key, to sshd on `port` in the guest (through its forward,
    /// or at the guest's address). For sites whose policy forbids passwords on command lines.
    Ssh { port: u16 },
}

/// A program to run in the guest. Build with [`ExecRequest::new`] and the chained setters.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    pub credentials: Option<Credentials>,
}

impl ExecRequest {
    pub fn new(program: impl Into<String>) -> Self {
        ExecRequest {
            program: program.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout: Duration::from_secs(300),
            credentials: None,
        }
    }
    /// First element is the program, the rest are its arguments.
    pub fn from_argv<S: AsRef<str>>(argv: &[S]) -> Result<Self> {
        let (first, rest) = argv
            .split_first()
            .ok_or_else(|| Error::invalid_arg("argv", "must name a program"))?;
        Ok(ExecRequest::new(first.as_ref()).args(rest.iter().map(|s| s.as_ref().to_string())))
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }
    pub fn cwd(mut self, d: impl Into<String>) -> Self {
        self.cwd = Some(d.into());
        self
    }
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    pub fn credentials(mut self, c: Credentials) -> Self {
        self.credentials = Some(c);
        self
    }

    pub fn validate(&self) -> Result<()> {
        if self.program.is_empty() {
            return Err(Error::invalid_arg("exec program", "must not be empty"));
        }
        let nul = |s: &str| s.contains('\0');
        if nul(&self.program) || self.args.iter().any(|a| nul(a)) {
            return Err(Error::invalid_arg(
                "exec argv",
                "NUL bytes cannot be passed to a guest program",
            ));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || nul(k) {
                return Err(Error::invalid_arg(
                    format!("exec env {k:?}"),
                    "names must be non-empty without '=' or NUL",
                ));
            }
        }
        if self.timeout.is_zero() {
            return Err(Error::invalid_arg(
                "exec timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }

    /// The command line for messages; arguments are shown, secrets never are part of it.
    pub fn display_argv(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a guest program produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecOutput {
    /// Exit code, or None when the program was killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    #[serde(with = "lossy_bytes")]
    pub stdout: Vec<u8>,
    #[serde(with = "lossy_bytes")]
    pub stderr: Vec<u8>,
    #[serde(with = "duration_secs")]
    pub duration: Duration,
    /// The backend's capture limit was hit: output is incomplete.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

mod lossy_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(b))
    }
}

mod duration_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// How the guest is booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Boot {
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        #[serde(default)]
        cmdline: String,
    },
    /// Boot from the first disk.
    Disk,
    /// Import an OVA/OVF appliance (VirtualBox); its disks come from the appliance.
    Appliance { path: PathBuf },
    /// Adopt an existing machine definition: a VMware .vmx file.
    Existing { path: PathBuf },
}

/// A disk image format. Which ones a backend can attach differs: libvirt/QEMU takes all of them,
/// VirtualBox takes VDI, VMDK and VHD, VMware takes VMDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Qcow2,
    Raw,
    /// VirtualBox's native format.
    Vdi,
    /// VMware's format, also VirtualBox's appliance format.
    Vmdk,
    /// Virtual PC / Hyper-V (QEMU calls it `vpc`).
    Vhd,
}

impl DiskFormat {
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DiskSpecRepr")]
pub struct DiskSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
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
    #[default]
    Auto,
    Kvm,
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
    pub name: VmName,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    pub boot: Boot,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub forwards: Vec<ForwardSpec>,
    #[serde(default)]
    pub console: ConsoleSpec,
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
    pub port: u16,
    /// The port the guest connects to at 10.0.2.100 (default: `port`).
    pub guest_port: Option<u16>,
}

fn loopback() -> String {
    "127.0.0.1".into()
}

impl Endpoint {
    pub fn guest_port(&self) -> u16 {
        self.guest_port.unwrap_or(self.port)
    }
}

impl Network {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parses_auto_and_numbers() {
        assert_eq!("auto".parse::<HostPort>().unwrap(), HostPort::Auto);
        assert_eq!("2222".parse::<HostPort>().unwrap(), HostPort::Fixed(2222));
        assert!("0".parse::<HostPort>().is_err());
        assert!("70000".parse::<HostPort>().is_err());
        #[derive(Deserialize)]
        struct T {
            p: HostPort,
        }
        assert_eq!(
            toml::from_str::<T>("p = 22").unwrap().p,
            HostPort::Fixed(22)
        );
        assert_eq!(
            toml::from_str::<T>("p = \"auto\"").unwrap().p,
            HostPort::Auto
        );
        assert!(toml::from_str::<T>("p = \"x\"").is_err());
    }

    #[test]
    fn exec_request_validation() {
        assert!(ExecRequest::new("/bin/true").validate().is_ok());
        assert!(ExecRequest::new("").validate().is_err());
        assert!(ExecRequest::new("a").arg("b\0c").validate().is_err());
        assert!(ExecRequest::new("a").env("A=B", "c").validate().is_err());
        assert!(ExecRequest::from_argv::<&str>(&[]).is_err());
        let r = ExecRequest::from_argv(&["sh", "-c", "echo hi"]).unwrap();
        assert_eq!(r.display_argv(), "sh -c echo hi");
    }

    #[test]
    fn spec_validation_names_the_problem() {
        let mut s = VmSpec::new(
            VmName::new("v").unwrap(),
            Boot::Kernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            },
        );
        assert!(s.validate().is_ok());
        s.forwards = vec![ForwardSpec::new("ssh", 22), ForwardSpec::new("ssh", 23)];
        assert!(s.validate().unwrap_err().to_string().contains("used twice"));
        s.forwards = vec![ForwardSpec::new("s;h", 22)];
        assert!(s.validate().is_err());
        s.forwards.clear();
        s.memory_mib = 1;
        assert!(s.validate().unwrap_err().to_string().contains("memory_mib"));
    }
}

/// A host folder offered to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFolder {
    /// The share's name as the guest sees it.
    pub name: String,
    pub host_path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub automount: bool,
    /// Where `Vm::shared_folder_mount` mounts it in the guest.
    #[serde(default)]
    pub guest_path: Option<String>,
}

impl SharedFolder {
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
