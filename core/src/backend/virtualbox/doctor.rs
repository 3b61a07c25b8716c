//! `anyvm doctor` checks for VirtualBox: VBoxManage and its version, the kernel driver, the
//! Extension Pack against VirtualBox's version, remote display (VRDE), and KVM holding VT-x.

use super::{os, parse, VirtualBoxBackend};
use crate::error::Ctx;
use crate::health::{kernel_at_least, kernel_release, Check};

const B: &str = "virtualbox";

pub async fn checks(vb: &VirtualBoxBackend) -> Vec<Check> {
    let mut out = Vec::new();
    let ctx = Ctx::new("doctor");
    let version = match vb.version().await {
        Ok(v) => {
            out.push(Check::ok(
                B,
                "VBoxManage",
                format!("{}.{}.{} ({})", v.0, v.1, v.2, vb.tool.program.display()),
            ));
            v
        }
        Err(e) => {
            out.push(Check::fail(
                B,
                "VBoxManage",
                e.to_string(),
                "install VirtualBox 6.1 or later, or point ANYVM_VBOXMANAGE at VBoxManage",
            ));
            return out;
        }
    };
    // The version call was cached: ask something cheap that prints the driver warning.
    let (ext, driver) = vb
        .vbox_call(&ctx, os(&["list", "extpacks"]), None, None)
        .await;
    out.push(match driver {
        Some(w) => Check::fail(
            B,
            "kernel driver",
            w,
            "install virtualbox-dkms and the headers of the running kernel (linux-headers-$(uname -r)), then 'modprobe vboxdrv'; until then no VM can start",
        ),
        None => Check::ok(B, "kernel driver", "vboxdrv loaded"),
    });
    let packs = match ext {
        Ok(o) => parse::extpacks(&o.stdout_str()),
        Err(e) => {
            out.push(Check::warn(
                B,
                "extension pack",
                format!("cannot list extension packs: {e}"),
                "run 'VBoxManage list extpacks' by hand to see why",
            ));
            Vec::new()
        }
    };
    let want = format!("{}.{}.{}", version.0, version.1, version.2);
    let mut vrde_from_pack = false;
    for p in &packs {
        let same = p.version.split(['r', '_']).next() == Some(want.as_str());
        if !same {
            out.push(Check::fail(
                B,
                "extension pack",
                format!(
                    "'{}' is {} but VirtualBox is {want} (VERR_VERSION_MISMATCH: its USB/remote display features stop working)",
                    p.name, p.version
                ),
                format!("install the {want} Extension Pack ('VBoxManage extpack install --replace ...') or uninstall the old one"),
            ));
        } else if !p.usable {
            out.push(Check::fail(
                B,
                "extension pack",
                format!(
                    "'{}' {} is not usable: {}",
                    p.name, p.version, p.why_unusable
                ),
                "reinstall the pack ('VBoxManage extpack install --replace ...')",
            ));
        } else {
            out.push(Check::ok(
                B,
                "extension pack",
                format!("'{}' {} matches VirtualBox", p.name, p.version),
            ));
            vrde_from_pack |= !p.vrde_module.is_empty();
        }
    }
    // Since 7.2.6 the VRDP server ships in the base package; before, only a pack brings it.
    let base_vrdp = version >= (7, 2, 6);
    out.push(if base_vrdp || vrde_from_pack {
        Check::ok(
            B,
            "remote display",
            if base_vrdp {
                "VRDP is part of VirtualBox (7.2.6 and later)".to_string()
            } else {
                "VRDE module from the Extension Pack".to_string()
            },
        )
    } else {
        Check::warn(
            B,
            "remote display",
            format!("VirtualBox {want} has no VRDE module without the matching Extension Pack"),
            format!("install the {want} Extension Pack to reach guests' screens over RDP"),
        )
    });
    if let Some((_, home)) = vb.tool.env.iter().find(|(k, _)| k == "VBOX_USER_HOME") {
        let id = vb
            .tool
            .env
            .iter()
            .find(|(k, _)| k == "VBOX_IPC_SOCKETID")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        out.push(Check::ok(
            B,
            "VirtualBox home",
            format!("{home}, served by its own VBoxSVC (VBOX_IPC_SOCKETID={id}); run VBoxManage by hand on it with both variables set"),
        ));
    }
    out.push(kvm_vtx_check());
    out
}

/// On Linux 6.12 and later KVM enables VT-x/AMD-V when its module loads
/// (`kvm.enable_virt_at_load`), so VirtualBox fails with VERR_VMX_IN_VMX_ROOT_MODE even while
/// no KVM guest runs. Before 6.12 only running KVM guests hold it.
fn kvm_vtx_check() -> Check {
    let release = kernel_release();
    let loaded: Vec<&str> = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .filter(|m| std::path::Path::new(&format!("/sys/module/{m}")).exists())
        .collect();
    if loaded.is_empty() {
        return Check::ok(B, "KVM and VT-x", "no KVM module loaded");
    }
    let at_load = std::fs::read_to_string("/sys/module/kvm/parameters/enable_virt_at_load")
        .map(|v| v.trim() == "Y")
        .unwrap_or(false);
    let users: u64 = loaded
        .iter()
        .filter_map(|m| std::fs::read_to_string(format!("/sys/module/{m}/refcnt")).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum();
    let modules = loaded.join(", ");
    if kernel_at_least(&release, (6, 12)) && at_load {
        Check::fail(
            B,
            "KVM and VT-x",
            format!("Linux {release} with {modules} loaded: KVM holds VT-x from module load on, VirtualBox VMs fail with VERR_VMX_IN_VMX_ROOT_MODE"),
            "unload KVM while VirtualBox runs (modprobe -r kvm_intel kvm_amd), or boot with kvm.enable_virt_at_load=0; do not place VirtualBox and KVM guests on one host",
        )
    } else if users > 0 {
        Check::warn(
            B,
            "KVM and VT-x",
            format!("{modules} in use ({users} users): VirtualBox VMs cannot start while KVM guests run"),
            "stop the KVM guests, or run VirtualBox guests on another host",
        )
    } else {
        Check::ok(
            B,
            "KVM and VT-x",
            format!("{modules} loaded but idle on Linux {release}"),
        )
    }
}
