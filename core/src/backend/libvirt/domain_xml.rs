//! Domain XML for a [`VmSpec`], and the spec stored back in the domain's `<metadata>`.
//!
//! The network is QEMU user-mode networking with `hostfwd` rules (no bridge, no root-only
//! setup), added through `<qemu:commandline>`; the NIC gets a fixed PCI slot because libvirt
//! does not know about it and would otherwise hand the same slot to one of its own devices.

use std::path::Path;

use crate::types::{Accel, Boot, HostPort, Network, Protocol, VmSpec};
use crate::util::xml::escape;

pub const NETDEV_ID: &str = "anyvm0";
pub const META_NS: &str = "https://anyvm.dev/xmlns/spec/1";
pub const META_KEY: &str = "anyvm";

pub fn hostfwd_rule(proto: Protocol, host_addr: &str, host_port: u16, guest_port: u16) -> String {
    format!("{proto}:{host_addr}:{host_port}-:{guest_port}")
}

/// The monitor command that removes a forward added with `hostfwd_add`.
pub fn hostfwd_remove(f: &crate::types::PortForward) -> String {
    format!(
        "hostfwd_remove {NETDEV_ID} {}:{}:{}",
        f.proto, f.host_addr, f.host_port
    )
}

pub fn resolve_accel(a: Accel) -> &'static str {
    match a {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
        Accel::Auto => match std::env::var("ANYVM_ACCEL").as_deref() {
            Ok("tcg") => "qemu",
            Ok("kvm") => "kvm",
            _ => {
                let kvm_ok = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if kvm_ok {
                    "kvm"
                } else {
                    "qemu"
                }
            }
        },
    }
}

pub fn metadata_element(spec: &VmSpec) -> String {
    let json = serde_json::to_string(spec).expect("spec serializes");
    format!(
        "<{META_KEY}:spec xmlns:{META_KEY}='{META_NS}'>{}</{META_KEY}:spec>",
        escape(&json)
    )
}

/// The spec from a `virDomainGetMetadata` reply (`<spec>JSON</spec>`, any prefix).
pub fn spec_from_metadata(xml: &str) -> Result<VmSpec, String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut text = String::new();
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Text(t)) => text.push_str(
                &t.unescape()
                    .map_err(|e| format!("bad metadata text: {e}"))?,
            ),
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("bad metadata XML: {e}")),
        }
    }
    serde_json::from_str(&text).map_err(|e| format!("anyvm metadata is not a valid spec: {e}"))
}

/// Where a restricted guest finds its allowed endpoints: a virtual host on QEMU's user network
/// (slirp refuses guestfwd rules on the gateway 10.0.2.2 itself).
pub const ENDPOINTS_ADDR: &str = "10.0.2.100";

/// Host-side paths a definition refers to.
pub struct HostSide<'a> {
    pub console_log: &'a Path,
    pub virtiofsd: &'a Path,
    /// Folder holding this VM's read-only bind mounts, one per read-only share.
    pub ro_mounts: &'a Path,
    /// busybox, whose `nc` relays each allowed guest connection to its host endpoint.
    pub relay: &'a Path,
    /// Start waiting for a migration stream (a warm clone's memory) instead of booting.
    pub incoming: bool,
}

/// What virtiofsd serves for a share: read-only shares go through a read-only bind mount, so
/// the host kernel refuses writes whatever the guest (even root) does.
pub fn share_source(s: &crate::types::SharedFolder, ro_mounts: &Path) -> std::path::PathBuf {
    if s.readonly {
        ro_mounts.join(&s.name)
    } else {
        s.host_path.clone()
    }
}

pub fn domain_xml(spec: &VmSpec, uuid: Option<&str>, host: &HostSide<'_>) -> String {
    let host_side = host;
    let console_log = host.console_log;
    let virtiofsd = host.virtiofsd;
    let mut x = String::new();
    let dtype = resolve_accel(spec.accel);
    x.push_str(&format!(
        "<domain type='{dtype}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n  <name>{}</name>\n",
        escape(spec.name.as_str())
    ));
    if let Some(u) = uuid {
        x.push_str(&format!("  <uuid>{}</uuid>\n", escape(u)));
    }
    // A VM generation ID of its own (libvirt makes one): a guest restored from another VM's
    // memory sees it change and reseeds its RNG (Linux ≥ 5.18).
    x.push_str("  <genid/>\n");
    x.push_str(&format!(
        "  <metadata>{}</metadata>\n",
        metadata_element(spec)
    ));
    x.push_str(&format!(
        "  <memory unit='MiB'>{}</memory>\n  <vcpu>{}</vcpu>\n",
        spec.memory_mib, spec.cpus
    ));
    if !spec.shares.is_empty() {
        // vhost-user (virtiofsd) needs guest RAM it can map.
        x.push_str(
            "  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n",
        );
    }
    x.push_str("  <os>\n    <type arch='x86_64'>hvm</type>\n");
    match &spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            x.push_str(&format!(
                "    <kernel>{}</kernel>\n",
                escape(&kernel.display().to_string())
            ));
            if let Some(i) = initrd {
                x.push_str(&format!(
                    "    <initrd>{}</initrd>\n",
                    escape(&i.display().to_string())
                ));
            }
            x.push_str(&format!("    <cmdline>{}</cmdline>\n", escape(cmdline)));
        }
        Boot::Disk | Boot::Appliance { .. } | Boot::Existing { .. } => {
            x.push_str("    <boot dev='hd'/>\n")
        }
    }
    x.push_str("  </os>\n  <features><acpi/><apic/></features>\n");
    if dtype == "kvm" {
        x.push_str("  <cpu mode='host-passthrough'/>\n");
    }
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n");
    for (i, d) in spec.disks.iter().enumerate() {
        let dev = format!("vd{}", (b'a' + i as u8) as char);
        x.push_str(&format!(
            "    <disk type='file' device='disk'><driver name='qemu' type='{}'/><source file='{}'/><target dev='{dev}' bus='virtio'/>{}</disk>\n",
            d.format.qemu_name(),
            escape(&d.path.display().to_string()),
            if d.readonly { "<readonly/>" } else { "" }
        ));
    }
    // A warm clone's log starts with the boot its memory went through (copied in first).
    let append = if host.incoming { "on" } else { "off" };
    x.push_str(&format!(
        "    <serial type='pty'><log file='{}' append='{append}'/></serial>\n    <console type='pty'><target type='serial'/></console>\n",
        escape(&console_log.display().to_string())
    ));
    x.push_str("    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n");
    if let Some(HostPort::Fixed(p)) = spec.console.vnc {
        x.push_str(&format!(
            "    <graphics type='vnc' port='{p}' autoport='no' listen='127.0.0.1'/>\n    <video><model type='vga'/></video>\n"
        ));
    }
    for s in &spec.shares {
        let source = share_source(s, host.ro_mounts);
        x.push_str(&format!(
            "    <filesystem type='mount' accessmode='passthrough'><driver type='virtiofs' queue='1024'/><binary path='{}'/><source dir='{}'/><target dir='{}'/></filesystem>\n",
            escape(&virtiofsd.display().to_string()),
            escape(&source.display().to_string()),
            escape(&s.name),
        ));
    }
    x.push_str("    <memballoon model='none'/>\n  </devices>\n");
    let mut netdev = format!("user,id={NETDEV_ID}");
    match &spec.network {
        Network::Nat => {}
        // restrict=on drops every connection the guest starts; guestfwd rules are the only way out.
        Network::None => netdev.push_str(",restrict=on"),
        Network::Restricted { allow } => {
            netdev.push_str(",restrict=on");
            for e in allow {
                let host = &e.host;
                // One relay process per guest connection (`cmd:`); a `tcp:` chardev would be a
                // single connection opened at boot, shared by every guest connection. Host and
                // port are validated (no shell metacharacters) before they reach QEMU's shell.
                netdev.push_str(&format!(
                    ",guestfwd=tcp:{ENDPOINTS_ADDR}:{}-cmd:{} nc {host} {}",
                    e.guest_port(),
                    host_side.relay.display(),
                    e.port
                ));
            }
        }
    }
    for f in &spec.forwards {
        if let HostPort::Fixed(p) = f.host_port {
            netdev.push_str(&format!(
                ",hostfwd={}",
                hostfwd_rule(f.proto, &f.host_addr, p, f.guest_port)
            ));
        }
    }
    let incoming = if host_side.incoming {
        "    <qemu:arg value='-incoming'/>\n    <qemu:arg value='defer'/>\n"
    } else {
        ""
    };
    x.push_str(&format!(
        "  <qemu:commandline>\n{incoming}    <qemu:arg value='-netdev'/>\n    <qemu:arg value='{}'/>\n    <qemu:arg value='-device'/>\n    <qemu:arg value='virtio-net-pci,netdev={NETDEV_ID},addr=0x9'/>\n  </qemu:commandline>\n</domain>\n",
        escape(&netdev)
    ));
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DiskSpec, ForwardSpec};
    use crate::VmName;

    fn spec() -> VmSpec {
        let mut s = VmSpec::new(
            VmName::new("t1").unwrap(),
            Boot::Kernel {
                kernel: "/k/vmlinuz".into(),
                initrd: Some("/k/initrd".into()),
                cmdline: "console=ttyS0 a=<b>".into(),
            },
        );
        s.accel = Accel::Tcg;
        s.disks.push(DiskSpec {
            path: "/d/data.qcow2".into(),
            format: Default::default(),
            readonly: false,
            owned: false,
        });
        s.forwards
            .push(ForwardSpec::new("ssh", 22).host_port(HostPort::Fixed(40022)));
        s
    }

    fn host() -> HostSide<'static> {
        HostSide {
            console_log: Path::new("/log/t1.log"),
            virtiofsd: Path::new("/usr/lib/qemu/virtiofsd"),
            ro_mounts: Path::new("/state/shares/t1"),
            relay: Path::new("/bin/busybox"),
            incoming: false,
        }
    }

    #[test]
    fn network_policy_and_shares_render() {
        let mut s = spec();
        let x = domain_xml(&s, None, &host());
        assert!(!x.contains("restrict=on") && !x.contains("memoryBacking"));
        s.network = Network::Restricted {
            allow: vec![crate::types::Endpoint {
                host: "127.0.0.1".into(),
                port: 3306,
                guest_port: Some(13306),
            }],
        };
        s.shares.push(crate::types::SharedFolder {
            name: "calib".into(),
            host_path: "/data/calib".into(),
            readonly: true,
            automount: false,
            guest_path: None,
        });
        s.shares.push(crate::types::SharedFolder {
            name: "out".into(),
            host_path: "/data/out".into(),
            readonly: false,
            automount: false,
            guest_path: None,
        });
        let x = domain_xml(&s, None, &host());
        assert!(
            x.contains(
                ",restrict=on,guestfwd=tcp:10.0.2.100:13306-cmd:/bin/busybox nc 127.0.0.1 3306"
            ),
            "{x}"
        );
        assert!(x.contains("<access mode='shared'/>"));
        // read-only shares are served from the read-only bind mount, never the folder itself
        assert!(x.contains("<source dir='/state/shares/t1/calib'/><target dir='calib'/>"));
        assert!(x.contains("<source dir='/data/out'/><target dir='out'/>"));
        s.network = Network::None;
        assert!(domain_xml(&s, None, &host()).contains("user,id=anyvm0,restrict=on,hostfwd"));
    }

    #[test]
    fn xml_has_forwards_agent_and_escaped_text() {
        let x = domain_xml(&spec(), None, &host());
        assert!(x.contains("<domain type='qemu'"));
        assert!(x.contains("hostfwd=tcp:127.0.0.1:40022-:22"));
        assert!(x.contains("org.qemu.guest_agent.0"));
        assert!(x.contains("console=ttyS0 a=&lt;b&gt;"));
        assert!(x.contains("<target dev='vda' bus='virtio'/>"));
    }

    #[test]
    fn metadata_round_trips() {
        let s = spec();
        let back = spec_from_metadata(&metadata_element(&s)).unwrap();
        assert_eq!(back, s);
        assert!(spec_from_metadata("<x>nope</x>").is_err());
    }
}
