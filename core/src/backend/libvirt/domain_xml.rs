//! Domain XML for a [`VmSpec`], and the spec stored back in the domain's `<metadata>`.
//!
//! The network is QEMU user-mode networking with `hostfwd` rules (no bridge, no root-only
//! setup), added through `<qemu:commandline>`; the NIC gets a fixed PCI slot because libvirt
//! does not know about it and would otherwise hand the same slot to one of its own devices.

use std::path::Path;

use crate::types::{Accel, Boot, HostPort, Protocol, VmSpec};
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

pub fn domain_xml(spec: &VmSpec, uuid: Option<&str>, console_log: &Path) -> String {
    let mut x = String::new();
    let dtype = resolve_accel(spec.accel);
    x.push_str(&format!(
        "<domain type='{dtype}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n  <name>{}</name>\n",
        escape(spec.name.as_str())
    ));
    if let Some(u) = uuid {
        x.push_str(&format!("  <uuid>{}</uuid>\n", escape(u)));
    }
    x.push_str(&format!(
        "  <metadata>{}</metadata>\n",
        metadata_element(spec)
    ));
    x.push_str(&format!(
        "  <memory unit='MiB'>{}</memory>\n  <vcpu>{}</vcpu>\n  <os>\n    <type arch='x86_64'>hvm</type>\n",
        spec.memory_mib, spec.cpus
    ));
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
            d.format,
            escape(&d.path.display().to_string()),
            if d.readonly { "<readonly/>" } else { "" }
        ));
    }
    x.push_str(&format!(
        "    <serial type='pty'><log file='{}' append='off'/></serial>\n    <console type='pty'><target type='serial'/></console>\n",
        escape(&console_log.display().to_string())
    ));
    x.push_str("    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n");
    if let Some(HostPort::Fixed(p)) = spec.console.vnc {
        x.push_str(&format!(
            "    <graphics type='vnc' port='{p}' autoport='no' listen='127.0.0.1'/>\n    <video><model type='vga'/></video>\n"
        ));
    }
    x.push_str("    <memballoon model='none'/>\n  </devices>\n");
    let mut netdev = format!("user,id={NETDEV_ID}");
    for f in &spec.forwards {
        if let HostPort::Fixed(p) = f.host_port {
            netdev.push_str(&format!(
                ",hostfwd={}",
                hostfwd_rule(f.proto, &f.host_addr, p, f.guest_port)
            ));
        }
    }
    x.push_str(&format!(
        "  <qemu:commandline>\n    <qemu:arg value='-netdev'/>\n    <qemu:arg value='{}'/>\n    <qemu:arg value='-device'/>\n    <qemu:arg value='virtio-net-pci,netdev={NETDEV_ID},addr=0x9'/>\n  </qemu:commandline>\n</domain>\n",
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

    #[test]
    fn xml_has_forwards_agent_and_escaped_text() {
        let x = domain_xml(&spec(), None, Path::new("/log/t1.log"));
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
