//! What the benchmarks share: the test guest and a spec for it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use anyvm::{Accel, Boot, ForwardSpec, VmName, VmSpec};

/// The test guest (`$ANYVM_TEST_GUEST`, else built by tests/guest/build-guest.sh).
pub fn guest_dir() -> PathBuf {
    if let Ok(d) = std::env::var("ANYVM_TEST_GUEST") {
        return d.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new("bash")
        .arg(root.join("tests/guest/build-guest.sh"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// A 1-vCPU, 192 MiB TCG guest with its own copy of the data disk and an ssh forward.
pub fn spec(g: &std::path::Path, dir: &std::path::Path, name: &str) -> VmSpec {
    let disk = dir.join(format!("{name}.qcow2"));
    std::fs::copy(g.join("data.qcow2"), &disk).unwrap();
    let mut s = VmSpec::new(
        VmName::new(name).unwrap(),
        Boot::Kernel {
            kernel: g.join("vmlinuz"),
            initrd: Some(g.join("initrd.img")),
            cmdline: "console=ttyS0 quiet".into(),
        },
    );
    s.memory_mib = 192;
    s.accel = Accel::Tcg;
    s.disks.push(anyvm::DiskSpec {
        path: disk,
        format: Default::default(),
        readonly: false,
        owned: false,
    });
    s.forwards.push(ForwardSpec::new("ssh", 22));
    s
}

/// A client on the local libvirtd with its own state under `dir`, and no VM called `name` left
/// from an earlier run.
pub fn fresh_client(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    name: &str,
) -> anyvm::Client {
    let client = rt
        .block_on(anyvm::Client::connect_with(
            "libvirt:qemu:///system",
            anyvm::ClientOptions::default().state_dir(dir.join("state")),
        ))
        .unwrap();
    if let Ok(vm) = rt.block_on(client.vm(name)) {
        rt.block_on(vm.destroy()).unwrap();
    }
    client
}
