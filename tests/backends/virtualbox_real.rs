//! The VirtualBox backend against the REAL VBoxManage (7.2 from Debian sid, in a chroot built
//! by tests/support/vbox-real.sh). Without the vboxdrv kernel driver it cannot run guests, so
//! these tests cover every offline operation; running guests, guestcontrol and hangs are
//! tested against the fake (tests/backends/virtualbox.rs), whose outputs are checked against
//! these here where both exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyvm::backend::virtualbox::{VirtualBoxBackend, VirtualBoxOptions};
use anyvm::{
    Backend, Boot, CheckStatus, Client, ClientOptions, DestroyOptions, DiskFormat, DiskSpec, Error,
    ForwardSpec, HostPort, SharedFolder, VmName, VmSpec, VmState,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The wrapper around the real VBoxManage (built once, cached).
fn real() -> &'static Path {
    static W: OnceLock<PathBuf> = OnceLock::new();
    W.get_or_init(|| {
        if let Some(p) = std::env::var_os("ANYVM_VBOXMANAGE_REAL").filter(|p| !p.is_empty()) {
            return p.into();
        }
        let out = Command::new("bash")
            .arg(repo_root().join("tests/support/vbox-real.sh"))
            .output()
            .expect("run vbox-real.sh");
        assert!(
            out.status.success(),
            "vbox-real.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().into()
    })
}

/// One private VirtualBox home (its own VBoxSVC, registry and machine folder) per test.
struct Real {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    backend: Arc<VirtualBoxBackend>,
    client: Client,
}

impl Real {
    fn new() -> Real {
        // /tmp is bound into the chroot at the same path, so host paths mean the same there.
        let dir = tempfile::Builder::new()
            .prefix("anyvm-vbox-")
            .tempdir_in("/tmp")
            .unwrap();
        let home = dir.path().join("home");
        let id = format!(
            "t{}",
            dir.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace('.', "")
        );
        let env = vec![
            ("VBOX_USER_HOME".to_string(), home.display().to_string()),
            ("VBOX_IPC_SOCKETID".to_string(), id),
        ];
        let backend = Arc::new(
            VirtualBoxBackend::new(VirtualBoxOptions {
                vboxmanage: Some(real().to_path_buf()),
                console_dir: dir.path().join("console"),
                env: env.clone(),
                call_timeout: Duration::from_secs(60),
                ..Default::default()
            })
            .unwrap(),
        );
        let client = Client::with_backend(
            backend.clone(),
            ClientOptions::default()
                .state_dir(dir.path().join("state"))
                .port_range(47000..=47999),
        );
        let r = Real {
            dir,
            env,
            backend,
            client,
        };
        let vms = r.dir.path().join("vms");
        std::fs::create_dir_all(&vms).unwrap();
        r.vbox(&["setproperty", "machinefolder", vms.to_str().unwrap()]);
        r
    }

    /// Run the real VBoxManage in this test's home; stdout (WARNING blocks included).
    fn vbox(&self, args: &[&str]) -> String {
        let out = Command::new(real())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "VBoxManage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Locations of every registered hard disk.
    fn hdds(&self) -> BTreeSet<String> {
        self.vbox(&["list", "hdds"])
            .lines()
            .filter_map(|l| l.strip_prefix("Location:"))
            .map(|l| l.trim().to_string())
            .collect()
    }

    fn disk(&self, name: &str, format: DiskFormat) -> PathBuf {
        let ext = match format {
            DiskFormat::Vhd => "vhd",
            f => f.as_str(),
        };
        let p = self.dir.path().join(format!("{name}.{ext}"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", format.qemu_name()])
            .arg(&p)
            .arg("32M")
            .status()
            .unwrap();
        assert!(st.success());
        p
    }

    fn spec(&self, name: &str, disks: &[DiskFormat]) -> VmSpec {
        let mut s = VmSpec::new(VmName::new(name).unwrap(), Boot::Disk);
        s.memory_mib = 256;
        for (i, f) in disks.iter().enumerate() {
            s.disks.push(DiskSpec {
                path: self.disk(&format!("{name}-{i}"), *f),
                format: *f,
                readonly: false,
                owned: false,
            });
        }
        s.forwards.push(ForwardSpec::new("ssh", 22));
        s.console.vnc = Some(HostPort::Auto);
        s
    }

    fn calls(&self) -> std::collections::BTreeMap<String, u64> {
        self.backend.invocations()
    }
}

/// Every path under `dir`.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(tree(&e.path()));
        }
    }
    out
}

fn n(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn defines_from_vdi_and_vmdk_and_reads_everything_back() {
    let r = Real::new();
    let spec = r.spec("sl6", &[DiskFormat::Vdi, DiskFormat::Vmdk, DiskFormat::Vhd]);
    let vm = r.client.define(spec.clone()).await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);
    let stored = vm.spec().await.unwrap().unwrap();
    assert_eq!(stored.disks.len(), 3);
    assert_eq!(stored.memory_mib, 256);
    let show = r.vbox(&["showvminfo", "sl6", "--machinereadable"]);
    assert!(show.contains("memory=256"), "{show}");
    for d in &spec.disks {
        assert!(show.contains(&d.path.display().to_string()), "{show}");
    }

    // status: one showvminfo, nothing else.
    let before = r.calls();
    let st = r.client.status("sl6").await.unwrap();
    let after = r.calls();
    let delta: u64 = after.values().sum::<u64>() - before.values().sum::<u64>();
    assert_eq!(delta, 1, "status cost {delta} VBoxManage calls: {after:?}");
    assert_eq!(st.state, VmState::ShutOff);
    assert_eq!(st.forwards.len(), 1);
    assert!((47000..=47999).contains(&st.forwards[0].host_port));

    // Forwards on a powered-off VM go through modifyvm --natpf1.
    let f = vm
        .forward_add(&ForwardSpec::new("rdp", 3389))
        .await
        .unwrap();
    let rules = r.vbox(&["showvminfo", "sl6", "--machinereadable"]);
    assert!(
        rules.contains(&format!("\"rdp,tcp,127.0.0.1,{},,3389\"", f.host_port)),
        "{rules}"
    );
    assert_eq!(vm.forwards().await.unwrap().len(), 2);
    vm.forward_remove("rdp").await.unwrap();
    assert_eq!(vm.forwards().await.unwrap().len(), 1);

    // Shared folders.
    let share = r.dir.path().join("calib");
    std::fs::create_dir_all(&share).unwrap();
    vm.shared_folder_add(&SharedFolder {
        name: "calib".into(),
        host_path: share.clone(),
        readonly: true,
        automount: true,
        guest_path: None,
    })
    .await
    .unwrap();
    let shares = vm.shared_folders().await.unwrap();
    assert_eq!(shares.len(), 1);
    assert_eq!(shares[0].host_path, std::fs::canonicalize(&share).unwrap());
    vm.shared_folder_remove("calib").await.unwrap();
    assert!(vm.shared_folders().await.unwrap().is_empty());

    // Guest properties as the real tool stores them (the readiness path reads these).
    r.vbox(&["guestproperty", "set", "sl6", "/anyvm/test", "42"]);
    assert!(r
        .vbox(&["guestproperty", "get", "sl6", "/anyvm/test"])
        .contains("Value: 42"));

    // list survives the driver WARNING block on stdout.
    let list = r.client.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "sl6");

    vm.destroy().await.unwrap();
    assert!(r.hdds().is_empty(), "{:?}", r.hdds());
    for d in &spec.disks {
        assert!(d.path.exists(), "user disk {} deleted", d.path.display());
    }
    assert!(matches!(
        r.client.vm("sl6").await.unwrap_err(),
        Error::NotFound { .. }
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn unattachable_formats_and_bad_input_change_nothing() {
    let r = Real::new();
    let mut spec = r.spec("q", &[DiskFormat::Vdi]);
    spec.disks[0].format = DiskFormat::Qcow2;
    let e = r.client.define(spec).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("qemu-img convert -O vdi"), "{e}");
    assert!(!r.calls().contains_key("createvm"), "{:?}", r.calls());
    assert!(r.client.list().await.unwrap().is_empty());
    let e = r.client.status("nosuch").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("nosuch"), "{e}");
    assert!(VmName::new("a;rm -rf /").is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_take_list_restore_delete() {
    let r = Real::new();
    let vm = r
        .client
        .define(r.spec("snappy", &[DiskFormat::Vdi]))
        .await
        .unwrap();
    assert!(vm.snapshots().await.unwrap().is_empty());
    vm.snapshot_take("s1", "first").await.unwrap();
    vm.snapshot_take("s2", "second").await.unwrap();
    let s = vm.snapshots().await.unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s[1].parent.as_deref(), Some("s1"));
    assert!(s[1].current);
    vm.snapshot_restore("s1").await.unwrap();
    assert!(vm.snapshots().await.unwrap()[0].current);
    vm.snapshot_delete("s2").await.unwrap();
    assert_eq!(vm.snapshots().await.unwrap().len(), 1);
    let e = vm.snapshot_restore("nope").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    // A VM with snapshots (no clones) leaves no registered media and keeps the user's disk.
    let disk = vm.spec().await.unwrap().unwrap().disks[0].path.clone();
    vm.destroy().await.unwrap();
    assert!(r.hdds().is_empty(), "{:?}", r.hdds());
    assert!(disk.exists());
    assert!(
        !r.dir.path().join("vms/snappy").exists(),
        "{:?}",
        tree(&r.dir.path().join("vms"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_refuses_with_clones_or_removes_them_all() {
    let r = Real::new();
    let base = r
        .client
        .define(r.spec("base", &[DiskFormat::Vdi, DiskFormat::Vmdk]))
        .await
        .unwrap();
    let user_disks: Vec<PathBuf> = base
        .spec()
        .await
        .unwrap()
        .unwrap()
        .disks
        .into_iter()
        .map(|d| d.path)
        .collect();
    base.snapshot_take("s1", "").await.unwrap();
    let c1 = base.clone_linked(&n("c1"), Some("s1")).await.unwrap();
    // A clone of a clone, at the clone's current state (anyvm snapshots it for VirtualBox).
    let c2 = c1.clone_linked(&n("c2"), None).await.unwrap();
    assert_eq!(c2.state().await.unwrap(), VmState::ShutOff);
    // Clones get their own forwards.
    let p = |v: Vec<anyvm::PortForward>| v[0].host_port;
    assert_ne!(
        p(base.forwards().await.unwrap()),
        p(c1.forwards().await.unwrap())
    );
    assert_ne!(
        p(c1.forwards().await.unwrap()),
        p(c2.forwards().await.unwrap())
    );

    let mut links = r.backend.clone_links().await.unwrap();
    links.sort();
    assert!(links
        .iter()
        .any(|l| l.clone == "c1" && l.base == "base" && l.snapshot.as_deref() == Some("s1")));
    assert!(links.iter().any(|l| l.clone == "c2" && l.base == "c1"));
    assert_eq!(
        base.dependants(None).await.unwrap(),
        vec!["c2".to_string(), "c1".to_string()]
    );

    // Refused up front, naming the clones; nothing changed.
    let media_before = r.hdds();
    let e = base.destroy().await.unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("c1") && msg.contains("c2"), "{msg}");
    assert!(msg.contains("--with-clones"), "{msg}");
    assert_eq!(r.hdds(), media_before);
    assert_eq!(r.client.list().await.unwrap().len(), 3);
    // The backend itself refuses too (callers that skip the facade cannot destroy half-way).
    let e = r.backend.undefine(&n("base")).await.unwrap_err();
    assert!(e.to_string().contains("linked clones"), "{e}");
    assert_eq!(r.hdds(), media_before);
    // Deleting the snapshot the clones hang off is refused the same way.
    let e = base.snapshot_delete("s1").await.unwrap_err();
    assert!(e.to_string().contains("c1"), "{e}");
    assert_eq!(base.snapshots().await.unwrap().len(), 1);
    let e = c1.destroy().await.unwrap_err();
    assert!(e.to_string().contains("c2"), "{e}");

    // The leaf goes on its own, and takes the snapshot anyvm made on c1 for it.
    assert_eq!(c1.snapshots().await.unwrap().len(), 1);
    c2.destroy().await.unwrap();
    assert!(c1.snapshots().await.unwrap().is_empty());
    // Make c2 again, then remove the whole tree at once.
    c1.clone_linked(&n("c2"), None).await.unwrap();
    base.destroy_with(DestroyOptions::default().with_clones(true))
        .await
        .unwrap();
    assert!(r.client.list().await.unwrap().is_empty());
    assert!(r.hdds().is_empty(), "{:?}", r.hdds());
    for d in &user_disks {
        assert!(d.exists(), "user disk {} deleted", d.display());
    }
    let left = tree(&r.dir.path().join("vms"));
    assert!(left.is_empty(), "machine folders left: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_delete_with_clones_removes_the_clones_first() {
    let r = Real::new();
    let base = r
        .client
        .define(r.spec("sbase", &[DiskFormat::Vdi]))
        .await
        .unwrap();
    base.snapshot_take("gold", "").await.unwrap();
    base.clone_linked(&n("job1"), Some("gold")).await.unwrap();
    base.clone_linked(&n("job2"), Some("gold")).await.unwrap();
    base.snapshot_delete_with("gold", DestroyOptions::default().with_clones(true))
        .await
        .unwrap();
    assert!(base.snapshots().await.unwrap().is_empty());
    let names: Vec<String> = r
        .client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["sbase".to_string()]);
    base.destroy().await.unwrap();
    assert!(r.hdds().is_empty(), "{:?}", r.hdds());
}

#[tokio::test(flavor = "multi_thread")]
async fn ova_export_and_import_round_trip() {
    let r = Real::new();
    let vm = r
        .client
        .define(r.spec("golden", &[DiskFormat::Vdi, DiskFormat::Vmdk]))
        .await
        .unwrap();
    let ova = r.dir.path().join("golden.ova");
    vm.export_appliance(&ova).await.unwrap();
    assert!(std::fs::metadata(&ova).unwrap().len() > 10_000);
    let e = vm.export_appliance(&ova).await.unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    let e = vm
        .export_appliance(r.dir.path().join("x.tar"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    let mut spec = VmSpec::new(n("imported"), Boot::Appliance { path: ova.clone() });
    spec.memory_mib = 300;
    spec.forwards.push(ForwardSpec::new("ssh", 22));
    let imp = r.client.define(spec).await.unwrap();
    let show = r.vbox(&["showvminfo", "imported", "--machinereadable"]);
    assert!(show.contains("memory=300"), "{show}");
    assert!(show.contains(".vmdk"), "{show}");
    // The appliance's serial port is not imported; anyvm sets its own console log again.
    assert!(show.contains("uartmode1=\"file"), "{show}");
    assert_eq!(imp.forwards().await.unwrap().len(), 1);
    assert_eq!(r.hdds().len(), 4);
    // The imported disks were made for this VM: destroying it deletes them.
    imp.destroy().await.unwrap();
    vm.destroy().await.unwrap();
    assert!(r.hdds().is_empty(), "{:?}", r.hdds());
    assert!(ova.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn start_fails_naming_the_missing_kernel_driver() {
    let r = Real::new();
    let vm = r
        .client
        .define(r.spec("nodrv", &[DiskFormat::Vdi]))
        .await
        .unwrap();
    let e = vm.start().await.unwrap_err();
    assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("kernel driver"), "{msg}");
    assert!(msg.contains("nodrv"), "{msg}");
    assert!(msg.contains("vboxdrv"), "{msg}");
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_reports_the_real_tool_and_its_driver() {
    let r = Real::new();
    let report = r.client.doctor().await;
    let by = |name: &str| {
        report
            .checks
            .iter()
            .find(|c| c.backend == "virtualbox" && c.name == name)
            .unwrap_or_else(|| panic!("no {name} check in {report:?}"))
    };
    let v = by("VBoxManage");
    assert_eq!(v.status, CheckStatus::Ok);
    assert!(v.detail.starts_with("7.2."), "{v:?}");
    let d = by("kernel driver");
    assert_eq!(d.status, CheckStatus::Fail);
    assert!(d.detail.contains("/dev/vboxdrv"), "{d:?}");
    assert!(d.hint.as_deref().unwrap().contains("virtualbox-dkms"));
    // Debian's VNC pack is built with VirtualBox: versions match.
    assert_eq!(by("extension pack").status, CheckStatus::Ok);
    assert_eq!(by("remote display").status, CheckStatus::Ok);
    by("KVM and VT-x");
    assert!(report.failed());
    assert!(report
        .checks
        .iter()
        .any(|c| c.backend == "host" && c.name == "state dir" && c.status == CheckStatus::Ok));
}

/// The operator's view: `anyvm --backend virtualbox` on the real VBoxManage, from an anyvm.toml
/// whose disk is a plain `sl6.vdi` (the format comes from the file name).
#[test]
fn cli_defines_clones_exports_and_destroys_on_the_real_tool() {
    let r = Real::new();
    let disk = r.disk("sl6", DiskFormat::Vdi);
    let cfg = r.dir.path().join("anyvm.toml");
    std::fs::write(
        &cfg,
        format!(
            "backend = \"virtualbox\"\nstate_dir = \"{}\"\nport_range = [47000, 47999]\n[machines.sl6]\nmemory_mib = 512\ndisks = [{{ path = \"{}\" }}]\nforwards = [{{ name = \"ssh\", guest_port = 22 }}]\n",
            r.dir.path().join("cli-state").display(),
            disk.display()
        ),
    )
    .unwrap();
    let anyvm = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_anyvm"))
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .env("ANYVM_VBOXMANAGE", real())
            .envs(r.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = anyvm(&["define", "sl6"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = anyvm(&["--json", "status", "sl6"]);
    assert_eq!(code, Some(0), "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["state"], "shut_off");
    assert_eq!(st["forwards"][0]["guest_port"], 22);
    assert_eq!(anyvm(&["snapshot", "take", "sl6", "clean"]).0, Some(0));
    assert_eq!(
        anyvm(&["clone", "sl6", "sl6-job1", "--snapshot", "clean"]).0,
        Some(0)
    );
    let (code, _, err) = anyvm(&["destroy", "sl6"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("sl6-job1") && err.contains("--with-clones"),
        "{err}"
    );
    let (code, _, err) = anyvm(&["snapshot", "delete", "sl6", "clean"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("sl6-job1"), "{err}");
    let ova = r.dir.path().join("sl6.ova");
    let (code, _, err) = anyvm(&["export", "sl6", ova.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(ova.exists());
    let (code, out, err) = anyvm(&["destroy", "sl6", "--with-clones"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("sl6-job1: destroyed (clone of sl6)"), "{out}");
    assert!(r.hdds().is_empty(), "{:?}", r.hdds());
    assert!(disk.exists());
    let (code, out, _) = anyvm(&["--json", "doctor"]);
    assert_eq!(code, Some(1), "{out}");
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["status"], "fail");
    let checks = d["checks"].as_array().unwrap();
    let find = |b: &str, n: &str| {
        checks
            .iter()
            .find(|c| c["backend"] == b && c["name"] == n)
            .unwrap_or_else(|| panic!("no {b}/{n} in {out}"))
            .clone()
    };
    assert_eq!(find("virtualbox", "kernel driver")["status"], "fail");
    assert_eq!(find("virtualbox", "VBoxManage")["status"], "ok");
    assert_eq!(find("host", "state dir")["status"], "ok");
    // Every backend is looked at; those not asked for are at worst warnings.
    find("libvirt", "libvirtd");
    let vmware = checks.iter().find(|c| c["backend"] == "vmware").unwrap();
    assert_ne!(vmware["status"], "fail", "{vmware}");
    let (code, text, _) = anyvm(&["doctor"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("fail  virtualbox kernel driver"), "{text}");
    assert!(text.contains("-> install virtualbox-dkms"), "{text}");
}

/// The offline half of a VirtualBox warm state, on the real tool: a saved helper (its state
/// adopted, as no driver can run it) becomes a holder VM with a snapshot of the saved state,
/// hidden from listings; a clone of it is saved too and takes its own forwards and display
/// port while saved (the settings VirtualBox allows then); its start fails on the missing
/// driver and leaves nothing; destroying the template removes the state.
#[tokio::test(flavor = "multi_thread")]
async fn warm_state_is_held_and_cloned_saved_on_the_real_tool() {
    let r = Real::new();
    let t = r
        .client
        .define(r.spec("tmpl", &[DiskFormat::Vdi]))
        .await
        .unwrap();
    let helper = t.clone_linked(&n("tmpl-helper"), None).await.unwrap();
    let sav = r.dir.path().join("helper.sav");
    std::fs::write(&sav, vec![0u8; 65536]).unwrap();
    r.vbox(&["adoptstate", "tmpl-helper", sav.to_str().unwrap()]);
    assert_eq!(helper.state().await.unwrap(), VmState::Saved);
    let spec = r.backend.spec(&n("tmpl-helper")).await.unwrap().unwrap();
    let key = "0123456789abcdef";
    let holder = format!("anyvm-warm-{key}");
    assert!(r
        .backend
        .warm_find(&n("tmpl"), key)
        .await
        .unwrap()
        .is_none());
    let info = r
        .backend
        .warm_save(&n("tmpl-helper"), &n("tmpl"), key, &spec)
        .await
        .unwrap();
    // The holder's own copy of the state file, and a flattened disk of its own.
    assert_eq!(info.memory_bytes, 65536, "{info:?}");
    assert!(info.disk_bytes > 0, "{info:?}");
    assert_eq!(
        r.backend
            .warm_find(&n("tmpl"), key)
            .await
            .unwrap()
            .unwrap()
            .key,
        key
    );
    assert!(r
        .backend
        .warm_find(&n("other"), key)
        .await
        .unwrap()
        .is_none());
    let kv = r.vbox(&["showvminfo", &holder, "--machinereadable"]);
    assert!(kv.contains("VMState=\"saved\""), "{kv}");
    assert!(kv.contains("SnapshotName=\"anyvm-warm\""), "{kv}");
    let names: Vec<String> = r
        .client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, vec!["tmpl", "tmpl-helper"]);
    // The holder does not lean on the helper: the helper goes, the state stays.
    helper.destroy().await.unwrap();
    assert!(r
        .backend
        .warm_find(&n("tmpl"), key)
        .await
        .unwrap()
        .is_some());

    let mut cspec = t.spec().await.unwrap().unwrap();
    cspec.name = n("wc");
    cspec.forwards[0].host_port = HostPort::Fixed(47123);
    cspec.console.vnc = Some(HostPort::Fixed(47124));
    let e = r
        .backend
        .warm_start(&n("tmpl"), key, &cspec)
        .await
        .unwrap_err();
    // Cloned and re-configured while saved; only the resume needs the driver.
    assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
    assert!(!r.backend.exists(&n("wc")).await.unwrap());
    let kv = r.vbox(&["showvminfo", &holder, "--machinereadable"]);
    assert!(kv.contains("VMState=\"saved\""), "{kv}");

    t.destroy().await.unwrap();
    assert!(!r.backend.exists(&n(&holder)).await.unwrap());
    assert!(r.hdds().is_empty(), "{:?}", r.hdds());
}
