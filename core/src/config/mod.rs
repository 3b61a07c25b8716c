//! `anyvm.toml`: the backend to use and the machines to run, validated with errors that name
//! the file, the key and the reason.
//!
//! ```toml
//! backend = "libvirt:qemu:///system"
//! state_dir = "/var/lib/anyvm"        # optional
//! port_range = [40000, 44999]         # optional
//! remote_state_dir = "/var/lib/anyvm"  # optional: clone disks, console logs on a qemu+ssh:// host
//!
//! [machines.build]
//! cpus = 1
//! memory_mib = 256
//! accel = "tcg"                       # auto | kvm | tcg
//! kernel = "/path/vmlinuz"            # direct kernel boot (libvirt); or appliance = "x.ova";
//!                                     # omit both to boot from the first disk
//! initrd = "/path/initrd.img"
//! cmdline = "console=ttyS0"
//! disks = [{ path = "/path/data.qcow2" }]  # format: qcow2, raw, vdi, vmdk, vhd (default: from the extension)
//! forwards = [{ name = "ssh", guest_port = 22, host_port = "auto" }]
//! console = { vnc = "auto" }
//! credentials = { user = "root", identity_file = "/path/key", password_file = "/path/pw" }
//! guest_channel = "ssh"               # exec/copy over ssh with the key above (default "tools")
//! ssh_port = 22
//! ready = { timeout_s = 60, mode = "all", probes = [{ kind = "agent" }, { kind = "ssh_banner", guest_port = 22 }] }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::credentials::{Credentials, SecretSource};
use crate::error::{Error, Result};
use crate::name::VmName;
use crate::policy::Policy;
use crate::profile::{Profile, Resource};
use crate::readiness::ReadySpec;
use crate::types::{
    Accel, Boot, ConsoleSpec, DiskFormat, DiskSpec, ForwardSpec, GuestChannel, Network,
    SharedFolder, VmSpec,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    backend: Option<String>,
    state_dir: Option<PathBuf>,
    remote_state_dir: Option<PathBuf>,
    port_range: Option<[u16; 2]>,
    #[serde(default)]
    machines: BTreeMap<String, RawMachine>,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    machine: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    resources: BTreeMap<String, Resource>,
    #[serde(default)]
    shares: Vec<SharedFolder>,
    #[serde(default)]
    forwards: Vec<ForwardSpec>,
    #[serde(default)]
    network: Network,
    #[serde(default)]
    policy: Policy,
    ready: Option<ReadySpec>,
    check_accounts: Option<bool>,
}

/// A disk as written in anyvm.toml: the format may be left out when the file name says it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    path: PathBuf,
    format: Option<DiskFormat>,
    #[serde(default)]
    readonly: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    backend: Option<String>,
    cpus: Option<u32>,
    memory_mib: Option<u64>,
    #[serde(default)]
    accel: Accel,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    /// OVA/OVF to import (VirtualBox).
    appliance: Option<PathBuf>,
    /// An existing VMware .vmx to adopt.
    vmx: Option<PathBuf>,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    disks: Vec<RawDisk>,
    #[serde(default)]
    forwards: Vec<ForwardSpec>,
    #[serde(default)]
    console: ConsoleSpec,
    credentials: Option<RawCredentials>,
    #[serde(default)]
    ready: Option<ReadySpec>,
    /// "tools" (default) or "ssh".
    guest_channel: Option<RawChannel>,
    /// sshd's port in the guest when guest_channel = "ssh".
    ssh_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawChannel {
    Tools,
    Ssh,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    user: String,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    identity_file: Option<PathBuf>,
}

/// One machine from the file, ready to define.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// The backend this machine lives on (default: the file's).
    pub backend: Option<String>,
    /// How to define it.
    pub spec: VmSpec,
    /// The guest account for exec and copies.
    pub credentials: Option<Credentials>,
    /// When it counts as ready.
    pub ready: ReadySpec,
    /// How exec and copies reach the guest.
    pub guest_channel: GuestChannel,
}

/// A loaded `anyvm.toml`.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The file this configuration was read from.
    pub path: Option<PathBuf>,
    /// The backend URI for every machine without its own.
    pub backend: Option<String>,
    /// Where leases, known_hosts files and clone disks live.
    pub state_dir: Option<PathBuf>,
    /// Clone disks and console logs on a remote (`qemu+ssh://`) libvirt host.
    pub remote_state_dir: Option<PathBuf>,
    /// Host ports forwards are allocated from.
    pub port_range: Option<std::ops::RangeInclusive<u16>>,
    /// The machines, by name.
    pub machines: BTreeMap<String, MachineConfig>,
    /// The activity profiles, by name.
    pub profiles: BTreeMap<String, Profile>,
}

impl Config {
    /// Read and validate an `anyvm.toml`; errors name the file, the key and why.
    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(
                Some(path.to_path_buf()),
                "(file)",
                format!("cannot read: {e}"),
            )
        })?;
        Config::parse(&text, Some(path))
    }

    /// Parse TOML text; relative paths are resolved against `path`'s folder.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Config> {
        let file = path.map(Path::to_path_buf);
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.message().to_string();
            let at = inner
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            Error::config(
                file.clone(),
                if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                format!("{msg}{at}"),
            )
        })?;
        let base = path
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let abs = |p: PathBuf| {
            if p.is_absolute() || base.as_os_str().is_empty() {
                p
            } else {
                base.join(p)
            }
        };

        if let Some(b) = &raw.backend {
            b.parse::<crate::BackendUri>()
                .map_err(|e| Error::config(file.clone(), "backend", e.to_string()))?;
        }
        let port_range = match raw.port_range {
            Some([a, b]) if a == 0 || a > b => {
                return Err(Error::config(
                    file,
                    "port_range",
                    format!("[{a}, {b}] must be [low, high] with 1 <= low <= high"),
                ))
            }
            Some([a, b]) => Some(a..=b),
            None => None,
        };

        let mut machines = BTreeMap::new();
        for (name, m) in raw.machines {
            let key = |k: &str| format!("machines.{name}.{k}");
            let vm_name = VmName::new(&name).map_err(|e| {
                Error::config(file.clone(), format!("machines.{name}"), e.to_string())
            })?;
            if let Some(b) = &m.backend {
                b.parse::<crate::BackendUri>()
                    .map_err(|e| Error::config(file.clone(), key("backend"), e.to_string()))?;
            }
            if m.appliance.is_some() && m.kernel.is_some() {
                return Err(Error::config(
                    file,
                    key("appliance"),
                    "give a kernel or an appliance, not both",
                ));
            }
            let boot = match (m.kernel, m.initrd) {
                (None, None) if m.appliance.is_some() => Boot::Appliance {
                    path: abs(m.appliance.clone().expect("checked")),
                },
                (None, None) if m.vmx.is_some() => Boot::Existing {
                    path: abs(m.vmx.clone().expect("checked")),
                },
                (Some(k), initrd) => Boot::Kernel {
                    kernel: abs(k),
                    initrd: initrd.map(abs),
                    cmdline: m.cmdline,
                },
                (None, Some(_)) => {
                    return Err(Error::config(
                        file,
                        key("initrd"),
                        "an initrd needs a kernel",
                    ))
                }
                (None, None) => Boot::Disk,
            };
            let mut spec = VmSpec::new(vm_name, boot);
            if let Some(c) = m.cpus {
                spec.cpus = c;
            }
            if let Some(mem) = m.memory_mib {
                spec.memory_mib = mem;
            }
            spec.accel = m.accel;
            spec.disks = m
                .disks
                .into_iter()
                .map(|d| DiskSpec {
                    format: d
                        .format
                        .or_else(|| DiskFormat::from_path(&d.path))
                        .unwrap_or_default(),
                    path: abs(d.path),
                    readonly: d.readonly,
                    owned: false,
                })
                .collect();
            spec.forwards = m.forwards;
            spec.console = m.console;
            spec.validate().map_err(|e| match e {
                Error::InvalidArgument { what, reason } => Error::config(
                    file.clone(),
                    format!("machines.{name}"),
                    format!("{what}: {reason}"),
                ),
                e => e,
            })?;
            let credentials = match m.credentials {
                None => None,
                Some(c) => {
                    if c.password_file.is_some() && c.password_env.is_some() {
                        return Err(Error::config(
                            file,
                            key("credentials"),
                            "give password_file or password_env, not both",
                        ));
                    }
                    let password = c
                        .password_file
                        .map(|p| SecretSource::File(abs(p)))
                        .or(c.password_env.map(SecretSource::Env));
                    Some(Credentials {
                        user: c.user,
                        password,
                        identity_file: c.identity_file.map(abs),
                    })
                }
            };
            let ready = m.ready.unwrap_or_default();
            ready
                .validate()
                .map_err(|e| Error::config(file.clone(), key("ready"), e.to_string()))?;
            let guest_channel = match (m.guest_channel, m.ssh_port) {
                (Some(RawChannel::Ssh), port) => {
                    let ssh_key = credentials.as_ref().and_then(|c| c.identity_file.as_ref());
                    if ssh_key.is_none() {
                        return Err(Error::config(
                            file,
                            key("guest_channel"),
                            "\"ssh\" needs credentials with an identity_file (ssh logins use keys only)",
                        ));
                    }
                    GuestChannel::Ssh {
                        port: port.unwrap_or(22),
                    }
                }
                (_, Some(_)) => {
                    return Err(Error::config(
                        file,
                        key("ssh_port"),
                        "only used with guest_channel = \"ssh\"",
                    ))
                }
                _ => GuestChannel::Tools,
            };
            machines.insert(
                name,
                MachineConfig {
                    backend: m.backend,
                    spec,
                    credentials,
                    ready,
                    guest_channel,
                },
            );
        }
        let mut profiles = BTreeMap::new();
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for (name, p) in raw.profiles {
            let key = |k: &str| format!("profiles.{name}.{k}");
            let err = |k: &str, why: String| Error::config(file.clone(), key(k), why);
            let Some(m) = machines.get_mut(&p.machine) else {
                let known: Vec<&str> = machines.keys().map(String::as_str).collect();
                return Err(err(
                    "machine",
                    format!(
                        "no machine named {:?} (machines: {})",
                        p.machine,
                        known.join(", ")
                    ),
                ));
            };
            if let Some(other) = owner.insert(p.machine.clone(), name.clone()) {
                return Err(err(
                    "machine",
                    format!(
                        "machine {:?} already belongs to profile {other:?}; a machine carries one profile's policy",
                        p.machine
                    ),
                ));
            }
            p.policy
                .validate()
                .map_err(|(k, why)| err(&format!("policy.{k}"), why))?;
            let policy = Policy {
                share_roots_allow: p.policy.share_roots_allow.into_iter().map(abs).collect(),
                share_roots_deny: p.policy.share_roots_deny.into_iter().map(abs).collect(),
                audit_log: p.policy.audit_log.map(abs),
                ..p.policy
            };
            for (r, res) in &p.resources {
                res.validate()
                    .map_err(|why| err(&format!("resources.{r}"), why))?;
            }
            let mut shares = Vec::new();
            for (i, s) in p.shares.into_iter().enumerate() {
                let s = SharedFolder {
                    host_path: abs(s.host_path),
                    ..s
                };
                let k = format!("shares[{i}]");
                s.validate().map_err(|e| err(&k, e.to_string()))?;
                policy
                    .check_share(&crate::Ctx::new(format!("profile {name}")), &s.host_path)
                    .map_err(|e| err(&k, e.to_string()))?;
                shares.push(s);
            }
            m.spec.network = p.network.clone();
            m.spec.shares.extend(shares.iter().cloned());
            m.spec.forwards.extend(p.forwards.iter().cloned());
            if let Some(r) = &p.ready {
                r.validate().map_err(|e| err("ready", e.to_string()))?;
                m.ready = r.clone();
            }
            m.spec.validate().map_err(|e| {
                Error::config(file.clone(), format!("profiles.{name}"), e.to_string())
            })?;
            profiles.insert(
                name.clone(),
                Profile {
                    name,
                    description: p.description,
                    machine: p.machine,
                    resources: p.resources,
                    shares,
                    forwards: p.forwards,
                    network: p.network,
                    policy,
                    ready: p.ready,
                    check_accounts: p.check_accounts.unwrap_or(true),
                },
            );
        }
        if raw
            .remote_state_dir
            .as_ref()
            .is_some_and(|d| d.is_relative())
        {
            return Err(Error::config(
                file,
                "remote_state_dir",
                "must be an absolute path on the libvirt host",
            ));
        }
        Ok(Config {
            path: file,
            backend: raw.backend,
            state_dir: raw.state_dir.map(abs),
            remote_state_dir: raw.remote_state_dir,
            port_range,
            machines,
            profiles,
        })
    }

    /// The backend URI the file names, else [`crate::DEFAULT_BACKEND`].
    pub fn backend_uri(&self) -> String {
        self.backend
            .clone()
            .unwrap_or_else(|| crate::DEFAULT_BACKEND.into())
    }

    /// Client options from the file's `state_dir` and `port_range` (defaults for what it omits).
    pub fn client_options(&self) -> crate::ClientOptions {
        let mut opts = crate::ClientOptions::default();
        if let Some(d) = &self.state_dir {
            opts = opts.state_dir(d);
        }
        if let Some(r) = &self.port_range {
            opts = opts.port_range(r.clone());
        }
        if let Some(d) = &self.remote_state_dir {
            opts = opts.remote_state_dir(d);
        }
        opts
    }

    /// The profile called `name`, or a Config error listing the ones there are.
    pub fn profile(&self, name: &str) -> Result<&Profile> {
        self.profiles.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            Error::config(
                self.path.clone(),
                format!("profiles.{name}"),
                format!("no such profile (profiles: {})", known.join(", ")),
            )
        })
    }

    /// The profile whose machine this is, if any.
    pub fn profile_for_machine(&self, machine: &str) -> Option<&Profile> {
        self.profiles.values().find(|p| p.machine == machine)
    }

    /// The guest account the file gives for a machine, if any.
    pub fn credentials(&self, machine: &str) -> Option<Credentials> {
        self.machines
            .get(machine)
            .and_then(|m| m.credentials.clone())
    }

    /// The machine called `name`, or a Config error listing the ones there are.
    pub fn machine(&self, name: &str) -> Result<&MachineConfig> {
        self.machines.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.machines.keys().map(String::as_str).collect();
            Error::config(
                self.path.clone(),
                format!("machines.{name}"),
                format!(
                    "no such machine (known: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readiness::Probe;
    use crate::types::HostPort;

    const GOOD: &str = r#"
backend = "libvirt:qemu:///system"
port_range = [41000, 41099]

[machines.build]
memory_mib = 256
accel = "tcg"
kernel = "vmlinuz"
initrd = "/abs/initrd.img"
cmdline = "console=ttyS0"
disks = [{ path = "data.qcow2" }]
forwards = [{ name = "ssh", guest_port = 22 }, { name = "web", guest_port = 80, host_port = 8080 }]
credentials = { user = "root", password_env = "PW" }
ready = { timeout_s = 30, probes = [{ kind = "agent" }, { kind = "ssh_banner", guest_port = 22 }] }
"#;

    #[test]
    fn parses_a_full_machine() {
        let c = Config::parse(GOOD, Some(Path::new("/etc/anyvm/anyvm.toml"))).unwrap();
        let m = c.machine("build").unwrap();
        assert_eq!(m.spec.memory_mib, 256);
        assert_eq!(m.spec.accel, Accel::Tcg);
        assert_eq!(
            m.spec.boot,
            Boot::Kernel {
                kernel: "/etc/anyvm/vmlinuz".into(),
                initrd: Some("/abs/initrd.img".into()),
                cmdline: "console=ttyS0".into()
            }
        );
        assert_eq!(m.spec.disks[0].path, PathBuf::from("/etc/anyvm/data.qcow2"));
        assert_eq!(m.spec.forwards[0].host_port, HostPort::Auto);
        assert_eq!(m.spec.forwards[1].host_port, HostPort::Fixed(8080));
        assert_eq!(
            m.ready.probes,
            vec![Probe::Agent, Probe::SshBanner { guest_port: 22 }]
        );
        assert_eq!(m.ready.timeout, std::time::Duration::from_secs(30));
        assert_eq!(c.port_range, Some(41000..=41099));
        assert!(c
            .machine("nope")
            .unwrap_err()
            .to_string()
            .contains("known: build"));
    }

    fn err(text: &str) -> String {
        Config::parse(text, Some(Path::new("/x/anyvm.toml")))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = err("[machines.a]\nmemory_mib = \"lots\"\n");
        assert!(
            e.starts_with("configuration error in /x/anyvm.toml: machines.a.memory_mib:"),
            "{e}"
        );
        let e = err("[machines.a]\nmemroy_mib = 1\n");
        assert!(e.contains("unknown field `memroy_mib`"), "{e}");
        let e = err("[machines.\"a;b\"]\nkernel=\"/k\"\n");
        assert!(
            e.contains("machines.a;b") && e.contains("not allowed"),
            "{e}"
        );
        let e = err("[machines.a]\nkernel=\"/k\"\nforwards=[{name=\"s\", guest_port=22, host_port=\"x\"}]\n");
        assert!(e.contains("machines.a.forwards[0].host_port"), "{e}");
        let e = err("[machines.a]\nkernel=\"/k\"\nready={probes=[{kind=\"psychic\"}]}\n");
        assert!(e.contains("machines.a.ready.probes[0]"), "{e}");
        let e = err("backend = \"hyperv\"\n");
        assert!(
            e.contains("backend") && e.contains("expected libvirt"),
            "{e}"
        );
        let e = err("port_range = [5, 1]\n");
        assert!(e.contains("port_range"), "{e}");
        let e = err(
            "[machines.a]\ncredentials = { user = \"u\", password = \"plain\" }\nkernel=\"/k\"\n",
        );
        assert!(e.contains("unknown field `password`"), "{e}");
        let e = err("[machines.a]\nmemory_mib = 4\nkernel=\"/k\"\n");
        assert!(e.contains("machines.a") && e.contains("memory_mib"), "{e}");
    }
}

#[cfg(test)]
mod example_file {
    #[test]
    fn shipped_example_config_parses() {
        let text = include_str!("../../../examples/anyvm.toml");
        let c = super::Config::parse(text, Some(std::path::Path::new("/etc/anyvm/anyvm.toml")))
            .unwrap();
        let m = c.machine("sl6-build").unwrap();
        assert_eq!(m.ready.probes.len(), 3);
        assert_eq!(m.spec.forwards.len(), 2);
    }

    #[test]
    fn shipped_profiles_model_the_five_activities() {
        let text = include_str!("../../../examples/profiles.toml");
        let c = super::Config::parse(text, Some(std::path::Path::new("/etc/anyvm/profiles.toml")))
            .unwrap();
        assert_eq!(c.profiles.len(), 5);
        let mc = c.profile("mc-production").unwrap();
        assert!(!mc.policy.secrets_in_argv);
        assert_eq!(mc.resources.len(), 3);
        let m = c.machine("sl6-mc").unwrap();
        assert!(
            matches!(m.spec.network, crate::Network::Restricted { ref allow } if allow.len() == 3)
        );
        assert_eq!(m.spec.shares.len(), 4);
        assert!(c.profile_for_machine("sl6-rm").is_some());
    }
}
