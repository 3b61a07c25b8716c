//! `anyvm doctor` checks for libvirt: the daemon and its versions, whether KVM really runs
//! guests (a `/dev/kvm` that opens is not proof), and qemu-img for clones.

use std::time::Duration;

use super::{LibvirtBackend, ID};
use crate::error::Ctx;
use crate::health::{probe_kvm, Check};

fn version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

pub async fn checks(lv: &LibvirtBackend) -> Vec<Check> {
    let mut out = Vec::new();
    let ctx = Ctx::new("doctor");
    let versions = lv
        .call(&ctx, Duration::from_secs(10), |c| {
            let lib = c.lib_version().unwrap_or(0);
            let hyp = c.hyp_version().unwrap_or(0);
            Ok((lib, hyp))
        })
        .await;
    match versions {
        Ok((lib, hyp)) => out.push(Check::ok(
            ID,
            "libvirtd",
            format!(
                "{} answers: libvirt {}, QEMU {}",
                lv.uri,
                version(lib),
                version(hyp)
            ),
        )),
        Err(e) => out.push(Check::fail(
            ID,
            "libvirtd",
            e.to_string(),
            "start libvirtd (and virtlogd), e.g. 'libvirtd -d' or 'systemctl start libvirtd'",
        )),
    }
    if !lv.host.is_local() {
        out.push(Check::warn(
            ID,
            "KVM",
            "not probed: the hypervisor host is remote",
            "run 'anyvm doctor' on the hypervisor host",
        ));
    } else if !std::path::Path::new("/dev/kvm").exists() {
        out.push(Check::warn(
            ID,
            "KVM",
            "no /dev/kvm: guests run under TCG software emulation (slow)",
            "enable virtualization in the firmware and load kvm_intel or kvm_amd; or keep accel = \"tcg\"",
        ));
    } else {
        let qemu = std::path::Path::new("/usr/bin/qemu-system-x86_64");
        match probe_kvm(qemu, Duration::from_secs(5)).await {
            Ok(t) => out.push(Check::ok(
                ID,
                "KVM",
                format!("a KVM guest ran its BIOS in {} ms", t.as_millis()),
            )),
            Err(e) => out.push(Check::fail(
                ID,
                "KVM",
                format!("/dev/kvm exists but KVM guests do not run: {e}"),
                "set accel = \"tcg\" for the machines in anyvm.toml (or ANYVM_ACCEL=tcg): accel = \"auto\" would pick KVM here",
            )),
        }
    }
    if lv.host.is_local() {
        out.push(crate::health::check_orphan_reaping().await);
    }
    let img = lv
        .host
        .run(
            &ctx,
            &["qemu-img".to_string(), "--version".into()],
            Duration::from_secs(10),
        )
        .await;
    match img {
        Ok(o) if o.code == Some(0) => out.push(Check::ok(
            ID,
            "qemu-img",
            o.stdout_str()
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        )),
        Ok(o) => out.push(Check::fail(
            ID,
            "qemu-img",
            o.stderr_str().trim().to_string(),
            "install qemu-utils (linked clones need qemu-img), then restart libvirtd",
        )),
        Err(e) => out.push(Check::fail(
            ID,
            "qemu-img",
            e.to_string(),
            "install qemu-utils (linked clones need qemu-img), then restart libvirtd",
        )),
    }
    out
}
