//! Prints figures (no pass/fail): how many VBoxManage processes each anyvm operation costs, and
//! how long it takes, against the REAL VBoxManage (tests/support/vbox-real.sh builds it in a
//! Debian sid chroot; offline operations only, no kernel driver needed). Every real call costs
//! 0.05-1 s, so the count is what to keep small.
//!
//! `cargo bench -p anyvm --bench vbox_calls` (`ANYVM_VBOXMANAGE_REAL=PATH` to reuse a wrapper).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyvm::backend::virtualbox::{VirtualBoxBackend, VirtualBoxOptions};
use anyvm::{
    Boot, Client, ClientOptions, DestroyOptions, DiskFormat, DiskSpec, ForwardSpec, VmName, VmSpec,
};

fn wrapper() -> PathBuf {
    if let Some(p) = std::env::var_os("ANYVM_VBOXMANAGE_REAL").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/vbox-real.sh");
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

/// The calls an operation made, by subcommand, as `showvminfo×1 list×2`.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            let k = if k.is_empty() {
                "--version"
            } else {
                k.as_str()
            };
            (d > 0).then(|| format!("{k}×{d}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() {
    let real = wrapper();
    let dir = tempfile::Builder::new()
        .prefix("anyvm-bench-vbox-")
        .tempdir_in("/tmp")
        .unwrap();
    let home = dir.path().join("home");
    // A private VirtualBox home with its own VBoxSVC (socket id), so the figures are this run's.
    let env = vec![
        ("VBOX_USER_HOME".to_string(), home.display().to_string()),
        (
            "VBOX_IPC_SOCKETID".to_string(),
            format!("bench{}", std::process::id()),
        ),
    ];
    let backend = Arc::new(
        VirtualBoxBackend::new(VirtualBoxOptions {
            vboxmanage: Some(real.clone()),
            console_dir: dir.path().join("console"),
            env: env.clone(),
            ..Default::default()
        })
        .unwrap(),
    );
    let client = Client::with_backend(
        backend.clone(),
        ClientOptions::default()
            .state_dir(dir.path().join("state"))
            .port_range(46000..=46999),
    );
    let vms = dir.path().join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let st = Command::new(&real)
        .args(["setproperty", "machinefolder", vms.to_str().unwrap()])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(st.status.success());

    let disk = dir.path().join("base.vdi");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vdi"])
        .arg(&disk)
        .arg("64M")
        .status()
        .unwrap()
        .success());
    let mut spec = VmSpec::new(VmName::new("bench").unwrap(), Boot::Disk);
    spec.disks.push(DiskSpec {
        path: disk,
        format: DiskFormat::Vdi,
        readonly: false,
        owned: false,
    });
    spec.forwards.push(ForwardSpec::new("ssh", 22));

    println!(
        "VBoxManage calls per anyvm operation (real VBoxManage, {})",
        real.display()
    );
    println!("{:<28} {:>6} {:>9}  calls", "operation", "procs", "seconds");
    let row = |op: &str, before: BTreeMap<String, u64>, t: Instant| {
        let after = backend.invocations();
        println!(
            "{:<28} {:>6} {:>9.3}  {}",
            op,
            total(&after) - total(&before),
            t.elapsed().as_secs_f64(),
            delta(&before, &after)
        );
    };
    macro_rules! op {
        ($name:expr, $e:expr) => {{
            let b = backend.invocations();
            let t = Instant::now();
            let r = $e;
            row($name, b, t);
            r
        }};
    }
    let vm = op!("define", client.define(spec).await.unwrap());
    op!("status", client.status("bench").await.unwrap());
    op!("state", vm.state().await.unwrap());
    op!("list", client.list().await.unwrap());
    op!(
        "forward add",
        vm.forward_add(&ForwardSpec::new("rdp", 3389))
            .await
            .unwrap()
    );
    op!("forward remove", vm.forward_remove("rdp").await.unwrap());
    op!("snapshot take", vm.snapshot_take("s1", "").await.unwrap());
    op!("snapshot list", vm.snapshots().await.unwrap());
    let c1 = op!(
        "clone (at snapshot)",
        vm.clone_linked(&VmName::new("bench-c1").unwrap(), Some("s1"))
            .await
            .unwrap()
    );
    op!(
        "clone of clone (current)",
        c1.clone_linked(&VmName::new("bench-c2").unwrap(), None)
            .await
            .unwrap()
    );
    op!("destroy refused (clones)", vm.destroy().await.unwrap_err());
    let ova = dir.path().join("bench.ova");
    op!("export OVA", vm.export_appliance(&ova).await.unwrap());
    op!("doctor", client.doctor().await);
    op!(
        "destroy --with-clones (3)",
        vm.destroy_with(DestroyOptions::default().with_clones(true))
            .await
            .unwrap()
    );
}
