//! Shared set-up for the end-to-end tests: the real libvirtd and the tiny test guest.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyvm::{Accel, Boot, Client, ClientOptions, DiskSpec, ForwardSpec, VmName, VmSpec};

pub struct Guest {
    pub dir: PathBuf,
}

impl Guest {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }
    pub fn host_key(&self) -> String {
        std::fs::read_to_string(self.dir.join("host_key.pub")).unwrap()
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The built test guest (built once and cached by tests/guest/build-guest.sh).
pub fn guest() -> &'static Guest {
    static G: OnceLock<Guest> = OnceLock::new();
    G.get_or_init(|| {
        if let Ok(d) = std::env::var("ANYVM_TEST_GUEST") {
            return Guest { dir: d.into() };
        }
        let out = Command::new("bash")
            .arg(repo_root().join("tests/guest/build-guest.sh"))
            .output()
            .expect("run build-guest.sh");
        assert!(
            out.status.success(),
            "build-guest.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Guest {
            dir: String::from_utf8(out.stdout).unwrap().trim().into(),
        }
    })
}

/// A per-test workspace for disk copies; the client shares the process-wide state dir.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub client: Client,
}

/// One state dir for the whole test process: port leases must be shared, as on a real host.
pub fn shared_state() -> &'static Path {
    static S: OnceLock<tempfile::TempDir> = OnceLock::new();
    S.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("anyvm-e2e-state-")
            .tempdir_in("/var/tmp")
            .unwrap()
    })
    .path()
}

pub async fn env() -> TestEnv {
    let dir = tempfile::Builder::new()
        .prefix("anyvm-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let opts = ClientOptions::default()
        .state_dir(shared_state())
        .port_range(45000..=47999);
    let client = Client::connect_with("libvirt:qemu:///system", opts)
        .await
        .expect("libvirtd must be running: bash scripts/setup-host.sh");
    TestEnv { dir, client }
}

impl TestEnv {
    /// A spec for the test guest with its own copy of the data disk and an ssh forward.
    pub fn spec(&self, name: &str, extra_cmdline: &str) -> VmSpec {
        let g = guest();
        let disk = self.dir.path().join(format!("{name}-data.qcow2"));
        std::fs::copy(g.dir.join("data.qcow2"), &disk).unwrap();
        let mut s = VmSpec::new(
            VmName::new(name).unwrap(),
            Boot::Kernel {
                kernel: g.kernel(),
                initrd: Some(g.initrd()),
                cmdline: format!("console=ttyS0 quiet {extra_cmdline}")
                    .trim()
                    .to_string(),
            },
        );
        s.memory_mib = 192;
        s.accel = Accel::Tcg;
        s.disks.push(DiskSpec {
            path: disk,
            format: Default::default(),
            readonly: false,
            owned: false,
        });
        s.forwards.push(ForwardSpec::new("ssh", 22));
        s
    }

    /// Remove a leftover VM of that name from an earlier, interrupted run.
    pub async fn fresh(&self, name: &str) {
        if let Ok(vm) = self.client.vm(name).await {
            // Clones left by an earlier, interrupted run go with it.
            vm.destroy_with(anyvm::DestroyOptions::default().with_clones(true))
                .await
                .unwrap();
        }
    }
}

/// Destroys the VM when the test ends, pass or fail.
pub struct Cleanup(pub Option<Client>, pub String);

impl Cleanup {
    pub fn new(c: &Client, name: &str) -> Self {
        Cleanup(Some(c.clone()), name.into())
    }
    pub fn named(name: &str) -> Self {
        Cleanup(None, name.into())
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "destroy", &self.1])
            .output();
        let _ = Command::new("virsh")
            .args([
                "-c",
                "qemu:///system",
                "undefine",
                "--managed-save",
                "--snapshots-metadata",
                &self.1,
            ])
            .output();
    }
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// Port leases held by one VM.
pub fn leases_of(client: &Client, vm: &str) -> usize {
    client
        .ports()
        .leases()
        .unwrap()
        .iter()
        .filter(|l| l.vm == vm)
        .count()
}

/// `dir/anyvm.toml` with one machine, `machine`, of the test guest on its own copy of the data
/// disk; `extra` adds lines to the machine's table.
pub fn config_with_machine(dir: &Path, machine: &str, extra: &str) -> PathBuf {
    let g = guest();
    let disk = dir.join(format!("{machine}.qcow2"));
    std::fs::copy(g.dir.join("data.qcow2"), &disk).unwrap();
    let cfg = dir.join("anyvm.toml");
    std::fs::write(
        &cfg,
        format!(
            "backend = \"libvirt:qemu:///system\"\nport_range = [48000, 48999]\n\
             [machines.{machine}]\nmemory_mib = 192\naccel = \"tcg\"\nkernel = \"{k}\"\n\
             initrd = \"{i}\"\ncmdline = \"console=ttyS0 quiet\"\ndisks = [{{ path = \"{d}\" }}]\n{extra}\n",
            k = g.kernel().display(),
            i = g.initrd().display(),
            d = disk.display(),
        ),
    )
    .unwrap();
    cfg
}

/// Job clones of `template` (named `<template>-<job id>`) still defined.
pub async fn clones_of(client: &Client, template: &str) -> Vec<String> {
    client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .filter(|n| n.starts_with(&format!("{template}-")))
        .collect()
}
