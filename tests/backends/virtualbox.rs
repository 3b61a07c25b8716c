//! The VirtualBox backend against the fake VBoxManage in tests/fakes (real formats, exit codes
//! and failure modes; guest programs run on this host).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyvm::backend::virtualbox::{VirtualBoxBackend, VirtualBoxOptions};
use anyvm::{
    Backend, Boot, Client, ClientOptions, Credentials, DiskSpec, Error, ExecRequest, ForwardSpec,
    HostPort, Probe, ReadySpec, Secret, SecretSource, StopOptions, StopOutcome, VmName, VmSpec,
    VmState,
};

fn fake() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fakes/VBoxManage")
}

struct Fake {
    dir: tempfile::TempDir,
    backend: Arc<VirtualBoxBackend>,
    client: Client,
}

impl Fake {
    fn home(&self) -> PathBuf {
        self.dir.path().join("vbox")
    }
    fn faults(&self, json: &str) {
        std::fs::create_dir_all(self.home()).unwrap();
        std::fs::write(self.home().join("faults.json"), json).unwrap();
    }
    fn disk(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.vdi"));
        std::fs::write(&p, b"disk").unwrap();
        p
    }
    fn spec(&self, name: &str) -> VmSpec {
        let mut s = VmSpec::new(VmName::new(name).unwrap(), Boot::Disk);
        s.memory_mib = 256;
        s.disks.push(DiskSpec {
            path: self.disk(name),
            format: anyvm::DiskFormat::Vdi,
            readonly: false,
            owned: false,
        });
        s.forwards.push(ForwardSpec::new("ssh", 22));
        s.console.vnc = Some(HostPort::Auto);
        s
    }
    fn calls(&self) -> String {
        std::fs::read_to_string(self.home().join("calls.log")).unwrap_or_default()
    }
}

fn creds() -> Credentials {
    Credentials::user("mc").password(SecretSource::Value(Secret::new("secret")))
}

fn fake_with(opts: impl FnOnce(&mut VirtualBoxOptions)) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let mut o = VirtualBoxOptions {
        vboxmanage: Some(fake()),
        console_dir: dir.path().join("console"),
        env: vec![(
            "ANYVM_FAKE_VBOX_HOME".into(),
            dir.path().join("vbox").display().to_string(),
        )],
        call_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    opts(&mut o);
    let backend = Arc::new(VirtualBoxBackend::new(o).unwrap());
    let client = Client::with_backend(
        backend.clone(),
        ClientOptions::default()
            .state_dir(dir.path().join("state"))
            .port_range(49000..=49499),
    );
    Fake {
        dir,
        backend,
        client,
    }
}

fn new_fake() -> Fake {
    fake_with(|_| {})
}

#[tokio::test]
async fn full_lifecycle_through_the_core_api() {
    let f = new_fake();
    let vm = f
        .client
        .define(f.spec("mc1"))
        .await
        .unwrap()
        .with_credentials(creds());
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);
    let spec = vm.spec().await.unwrap().unwrap();
    assert_eq!(spec.memory_mib, 256);
    let fwd = vm.forwards().await.unwrap();
    assert_eq!(fwd.len(), 1);
    assert!((49000..=49499).contains(&fwd[0].host_port));

    vm.start().await.unwrap();
    let rep = vm
        .wait_ready(&ReadySpec::default().timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(rep.passed[0].0, "agent");

    let out = vm
        .exec(&ExecRequest::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 3"]))
        .await
        .unwrap();
    assert_eq!(
        (
            out.exit_code,
            out.stdout_str().as_str(),
            out.stderr_str().as_str()
        ),
        (Some(3), "out\n", "err\n")
    );
    let tmp = f.dir.path().display().to_string();
    let out = vm
        .exec(
            &ExecRequest::new("/bin/sh")
                .args(["-c", "cat; echo $X; pwd"])
                .env("X", "y z")
                .cwd(&tmp)
                .stdin(b"in\n".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), format!("in\ny z\n{tmp}\n"));

    // copy round trip ("guest" paths are on this host for the fake)
    let src = f.dir.path().join("payload.bin");
    std::fs::write(&src, vec![7u8; 100_000]).unwrap();
    let gdir = f.dir.path().join("guest");
    std::fs::create_dir_all(&gdir).unwrap();
    let gpath = format!("{}/renamed.bin", gdir.display());
    assert_eq!(vm.copy_to(&src, &gpath).await.unwrap(), 100_000);
    assert_eq!(std::fs::read(&gpath).unwrap().len(), 100_000);
    let back = f.dir.path().join("back.bin");
    vm.copy_from(&gpath, &back).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), vec![7u8; 100_000]);
    let e = vm.copy_from("/no/such/file", &back).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");

    // forwards at runtime (controlvm natpf1)
    let added = vm
        .forward_add(&ForwardSpec::new("rdp", 3389))
        .await
        .unwrap();
    assert_ne!(added.host_port, fwd[0].host_port);
    assert_eq!(vm.forwards().await.unwrap().len(), 2);
    assert!(f
        .calls()
        .contains("\"controlvm\", \"mc1\", \"natpf1\", \"rdp,tcp,127.0.0.1,"));
    vm.forward_remove("rdp").await.unwrap();
    assert_eq!(vm.forwards().await.unwrap().len(), 1);

    // snapshots
    vm.snapshot_take("s1", "first").await.unwrap();
    vm.snapshot_take("s2", "second").await.unwrap();
    let snaps = vm.snapshots().await.unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[1].parent.as_deref(), Some("s1"));
    assert!(snaps[1].current);

    vm.pause().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Paused);
    vm.resume().await.unwrap();
    vm.save_state().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Saved);
    vm.start().await.unwrap();
    assert_eq!(
        vm.stop(StopOptions::default()).await.unwrap(),
        StopOutcome::Graceful
    );
    vm.snapshot_restore("s1").await.unwrap();
    vm.snapshot_delete("s2").await.unwrap();
    assert_eq!(vm.snapshots().await.unwrap().len(), 1);

    // linked clone: new name, fresh ports, base forwards replaced
    let clone = vm
        .clone_linked(&VmName::new("mc1-job").unwrap(), Some("s1"))
        .await
        .unwrap();
    let cf = clone.forwards().await.unwrap();
    assert_eq!(cf.len(), 1);
    assert_ne!(cf[0].host_port, fwd[0].host_port);
    assert!(f
        .calls()
        .contains("\"clonevm\", \"mc1\", \"--snapshot\", \"s1\", \"--options\", \"link\""));
    clone.destroy().await.unwrap();

    let disk = f.spec("mc1").disks[0].path.clone();
    vm.destroy().await.unwrap();
    assert!(disk.exists(), "a user's disk must survive destroy");
    assert!(!f
        .backend
        .exists(&VmName::new("mc1").unwrap())
        .await
        .unwrap());
    assert!(f.client.ports().leases().unwrap().is_empty());
    println!("VBoxManage invocations: {:?}", f.backend.invocations());
}

#[tokio::test]
async fn counts_calls_per_operation() {
    let f = new_fake();
    let vm = f
        .client
        .define(f.spec("cnt"))
        .await
        .unwrap()
        .with_credentials(creds());
    let count = |before: u64| f.backend.invocations().values().sum::<u64>() - before;
    let mut report = Vec::new();
    let t = count(0);
    vm.state().await.unwrap();
    report.push(("state", count(t)));
    let t = count(0);
    vm.start().await.unwrap();
    report.push(("start", count(t)));
    let t = count(0);
    vm.wait_ready(&ReadySpec::default()).await.unwrap();
    report.push(("wait_ready (additions up)", count(t)));
    let t = count(0);
    vm.exec(&ExecRequest::new("true")).await.unwrap();
    report.push(("exec", count(t)));
    let t = count(0);
    vm.forward_add(&ForwardSpec::new("x", 80)).await.unwrap();
    report.push(("forward add", count(t)));
    let t = count(0);
    vm.stop(StopOptions::default()).await.unwrap();
    report.push(("stop (graceful)", count(t)));
    let t = count(0);
    vm.destroy().await.unwrap();
    report.push(("destroy", count(t)));
    println!("VBoxManage calls per operation: {report:?}");
    assert!(report.iter().find(|r| r.0 == "exec").unwrap().1 <= 1);
    assert!(report.iter().find(|r| r.0 == "state").unwrap().1 == 1);
}

#[tokio::test]
async fn a_hung_vboxmanage_is_killed_with_its_children() {
    let f = fake_with(|o| o.call_timeout = Duration::from_millis(1500));
    f.client.define(f.spec("hang1")).await.unwrap();
    f.faults(r#"{"hang": ["showvminfo"]}"#);
    let vm = f.client.vm("hang1").await.unwrap_err();
    assert!(matches!(vm, Error::Timeout { .. }), "{vm}");
    assert!(
        vm.to_string().contains("VBoxManage showvminfo hang1"),
        "{vm}"
    );
    let pids = std::fs::read_to_string(f.home().join("hung.pids")).unwrap();
    for pid in pids.split_whitespace() {
        let mut gone = false;
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone, "process {pid} survived the timeout");
    }
}

#[tokio::test]
async fn lock_errors_are_retried_then_reported_as_busy() {
    let f = new_fake();
    let vm = f.client.define(f.spec("lk")).await.unwrap();
    f.faults(r#"{"lock_failures": 2}"#);
    vm.start().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Running);
    f.faults(r#"{"lock_failures": 100}"#);
    let e = vm.pause().await.unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
    assert!(e.to_string().contains("already locked"), "{e}");
}

#[tokio::test]
async fn error_text_with_exit_zero_and_malformed_output_are_errors() {
    let f = new_fake();
    f.client.define(f.spec("odd")).await.unwrap();
    f.faults(r#"{"error_exit0": ["list"]}"#);
    let e = f.client.list().await.unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e}");
    f.faults(r#"{"garbage": ["showvminfo"]}"#);
    let e = f
        .backend
        .state(&VmName::new("odd").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e}");
}

#[tokio::test]
async fn password_never_reaches_argv_or_the_call_log() {
    let f = new_fake();
    let vm = f.client.define(f.spec("pw")).await.unwrap();
    vm.start().await.unwrap();
    let secret = "Sup3r-s3cret-pw!";
    f.faults(&format!(r#"{{"guest_password": "{secret}"}}"#));
    let vm = vm.with_credentials(
        Credentials::user("mc").password(SecretSource::Value(Secret::new(secret))),
    );
    let task = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.exec(&ExecRequest::new("sleep").arg("1.5")).await })
    };
    let mut seen_fake = false;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1300) {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd);
                assert!(!cmd.contains(secret), "secret on argv: {cmd}");
                seen_fake |= cmd.contains("guestcontrol");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_fake, "never saw the fake running");
    assert_eq!(task.await.unwrap().unwrap().exit_code, Some(0));
    assert!(!f.calls().contains(secret));
    // The password file is gone after the call.
    assert!(!f.calls().lines().any(|l| l.contains(".anyvm-pw-") && {
        let v: Vec<String> = serde_json::from_str(l).unwrap();
        v.iter()
            .any(|a| a.contains(".anyvm-pw-") && Path::new(a).exists())
    }));
    // Wrong password is an Auth error that does not echo the password.
    let bad = vm.clone().with_credentials(
        Credentials::user("mc").password(SecretSource::Value(Secret::new("wrong-pw-123"))),
    );
    let e = bad.exec(&ExecRequest::new("true")).await.unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(!e.to_string().contains("wrong-pw-123"));
    // No credentials at all: a clear Auth error before VBoxManage runs.
    let none = f.client.vm("pw").await.unwrap();
    let e = none.exec(&ExecRequest::new("true")).await.unwrap_err();
    assert!(e.to_string().contains("needs a guest account"), "{e}");
}

#[tokio::test]
async fn readiness_waits_on_the_run_level_and_reports_when_additions_stall() {
    let f = new_fake();
    let vm = f.client.define(f.spec("slow")).await.unwrap();
    f.faults(r#"{"boot_delay": 1.5}"#);
    vm.start().await.unwrap();
    let t = Instant::now();
    vm.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(20)))
        .await
        .unwrap();
    let el = t.elapsed();
    assert!(
        el >= Duration::from_millis(1200) && el < Duration::from_secs(6),
        "{el:?}"
    );
    vm.power_off().await.unwrap();

    f.faults(r#"{"max_run_level": 1}"#);
    vm.start().await.unwrap();
    let e = vm
        .wait_ready(&ReadySpec::default().timeout(Duration::from_secs(3)))
        .await
        .unwrap_err();
    match e {
        Error::NotReady {
            probe, last_error, ..
        } => {
            assert_eq!(probe, "agent");
            assert!(last_error.contains("run level is 1"), "{last_error}");
        }
        e => panic!("{e}"),
    }
    let e = vm
        .with_credentials(creds())
        .exec(&ExecRequest::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotReady { .. }), "{e}");
}

#[tokio::test]
async fn readiness_can_also_wait_for_guest_properties() {
    let f = fake_with(|o| {
        o.ready_properties = vec![
            "/VirtualBox/GuestInfo/Net/0/V4/IP".into(),
            "/VirtualBox/GuestInfo/OS/LoggedInUsers".into(),
        ]
    });
    let vm = f.client.define(f.spec("props")).await.unwrap();
    vm.start().await.unwrap();
    // additions are up, but nobody is logged in yet
    let e = vm
        .wait_ready(&ReadySpec::default().timeout(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("LoggedInUsers is \"0\""), "{e}");
    f.faults(r#"{"logged_in_users": 1}"#);
    vm.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    f.faults(r#"{"logged_in_users": 1, "no_ip": true}"#);
    let e = vm
        .wait_ready(&ReadySpec::default().timeout(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("V4/IP is unset"), "{e}");
}

#[tokio::test]
async fn graceful_stop_falls_back_when_acpi_is_ignored() {
    let f = new_fake();
    let vm = f.client.define(f.spec("acpi")).await.unwrap();
    vm.start().await.unwrap();
    f.faults(r#"{"ignore_acpi": true}"#);
    let r = vm
        .stop(StopOptions {
            timeout: Duration::from_millis(800),
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(r, StopOutcome::Forced);
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);
}

#[tokio::test]
async fn reset_restarts_a_running_vm_and_refuses_a_stopped_one() {
    let f = new_fake();
    let vm = f.client.define(f.spec("rst")).await.unwrap();
    let e = vm.reset().await.unwrap_err();
    assert_eq!(e.kind(), anyvm::ErrorKind::InvalidState, "{e}");
    assert!(e.to_string().contains("'rst'"), "{e}");
    vm.start().await.unwrap();
    f.faults(r#"{"boot_delay": 1.0}"#);
    vm.reset().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Running);
    // the guest boots again: readiness waits for the run level once more
    let t = std::time::Instant::now();
    vm.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn versions_are_detected_and_6_1_has_no_cwd_flag() {
    let f = new_fake();
    f.faults(r#"{"version": "6.1.50_Debianr161033", "version_warning": true}"#);
    assert_eq!(f.backend.version().await.unwrap(), (6, 1, 50));
    let vm = f
        .client
        .define(f.spec("old"))
        .await
        .unwrap()
        .with_credentials(creds());
    vm.start().await.unwrap();
    let out = vm.exec(&ExecRequest::new("pwd").cwd("/tmp")).await.unwrap();
    assert_eq!(out.stdout_str(), "/tmp\n");

    let f = new_fake();
    f.faults(r#"{"version": "5.1.18r114002"}"#);
    let e = f.client.list().await.unwrap_err();
    assert!(
        matches!(e, Error::BackendUnavailable { .. }) && e.to_string().contains("too old"),
        "{e}"
    );
}

#[tokio::test]
async fn bad_input_is_refused_before_vboxmanage_runs() {
    let f = new_fake();
    let mut s = f.spec("k");
    s.boot = Boot::Kernel {
        kernel: "/k".into(),
        initrd: None,
        cmdline: String::new(),
    };
    let e = f.client.define(s).await.unwrap_err();
    assert!(e.to_string().contains("VirtualBox boots from disks"), "{e}");
    let mut s = f.spec("nodisk");
    s.disks[0].path = "/nonexistent/disk.vdi".into();
    assert!(matches!(
        f.client.define(s).await.unwrap_err(),
        Error::NotFound { .. }
    ));
    assert!(f.client.vm("bad;name").await.is_err());
    assert!(!f.calls().contains("bad;name"));
    assert!(f.client.list().await.unwrap().is_empty());
    assert!(f.client.ports().leases().unwrap().is_empty());
    // the spec can wait for a forwarded port too
    let vm = f.client.define(f.spec("probe")).await.unwrap();
    vm.start().await.unwrap();
    let e = vm
        .wait_ready(
            &ReadySpec::empty()
                .probe(Probe::Tcp { guest_port: 22 })
                .timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotReady { .. }), "{e}");
}

#[tokio::test]
async fn shared_folders_add_list_remove() {
    let f = new_fake();
    let vm = f.client.define(f.spec("sf")).await.unwrap();
    let host = f.dir.path().join("archive");
    std::fs::create_dir_all(&host).unwrap();
    let sf = anyvm::SharedFolder {
        name: "calib".into(),
        host_path: host.clone(),
        readonly: true,
        automount: true,
        guest_path: None,
    };
    vm.shared_folder_add(&sf).await.unwrap();
    let l = vm.shared_folders().await.unwrap();
    assert_eq!(
        (l[0].name.as_str(), l[0].host_path.clone()),
        ("calib", std::fs::canonicalize(&host).unwrap())
    );
    assert!(f.calls().contains("\"--readonly\", \"--automount\""));
    vm.shared_folder_remove("calib").await.unwrap();
    assert!(vm.shared_folders().await.unwrap().is_empty());
    let bad = anyvm::SharedFolder {
        name: "x".into(),
        host_path: "/nonexistent/dir".into(),
        readonly: true,
        automount: false,
        guest_path: None,
    };
    assert!(matches!(
        vm.shared_folder_add(&bad).await.unwrap_err(),
        Error::Io { .. }
    ));
}

#[tokio::test]
async fn appliances_are_imported() {
    let f = new_fake();
    let ova = f.dir.path().join("sl6.ova");
    std::fs::write(&ova, b"ova").unwrap();
    let mut s = VmSpec::new(
        VmName::new("imp").unwrap(),
        Boot::Appliance { path: ova.clone() },
    );
    s.forwards.push(ForwardSpec::new("ssh", 22));
    let vm = f.client.define(s).await.unwrap();
    assert_eq!(vm.forwards().await.unwrap().len(), 1);
    assert!(f.calls().contains(&format!(
        "[\"import\", \"{}\", \"--vsys\", \"0\", \"--vmname\", \"imp\"]",
        ova.display()
    )));
}

/// A host whose kernel lost the vboxdrv module (every kernel upgrade without rebuilt modules):
/// VBoxManage prefixes everything with a WARNING block on stdout. Listing, defining and status
/// still work; start fails naming the driver.
#[tokio::test]
async fn driver_warning_blocks_are_stripped_and_start_names_the_driver() {
    let f = new_fake();
    f.faults(r#"{"driver_missing": true}"#);
    let vm = f.client.define(f.spec("drv")).await.unwrap();
    assert_eq!(f.client.list().await.unwrap().len(), 1);
    let st = f.client.status("drv").await.unwrap();
    assert_eq!(st.state, VmState::ShutOff);
    assert_eq!(st.forwards.len(), 1);
    let e = vm.start().await.unwrap_err();
    assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
    assert!(e.to_string().contains("kernel driver"), "{e}");
    let d = f.client.doctor().await;
    assert!(d.failed());
    assert!(d
        .checks
        .iter()
        .any(|c| c.name == "kernel driver" && c.status == anyvm::CheckStatus::Fail));
    vm.destroy().await.unwrap();
}

/// Running VMs (which only the fake has) keep the clone rules: a live snapshot's clone pins
/// its base; the whole tree goes with with_clones, leaving no registered media.
#[tokio::test]
async fn clones_of_a_running_base_pin_it_until_removed() {
    let f = new_fake();
    let base = f.client.define(f.spec("live")).await.unwrap();
    base.start().await.unwrap();
    base.snapshot_take("warm", "").await.unwrap();
    assert!(f
        .calls()
        .contains("\"take\", \"warm\", \"--description\", \"\", \"--live\""));
    let c = base
        .clone_linked(&VmName::new("live-job").unwrap(), Some("warm"))
        .await
        .unwrap();
    let e = base.destroy().await.unwrap_err();
    assert!(e.to_string().contains("live-job"), "{e}");
    assert_eq!(base.state().await.unwrap(), VmState::Running);
    let e = base.snapshot_delete("warm").await.unwrap_err();
    assert!(e.to_string().contains("live-job"), "{e}");
    c.start().await.unwrap();
    base.destroy_with(anyvm::DestroyOptions::default().with_clones(true))
        .await
        .unwrap();
    assert!(f.client.list().await.unwrap().is_empty());
    let hdds = std::process::Command::new(fake())
        .args(["list", "hdds"])
        .env("ANYVM_FAKE_VBOX_HOME", f.home())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&hdds.stdout).contains("differencing"),
        "{}",
        String::from_utf8_lossy(&hdds.stdout)
    );
    assert!(f.client.ports().leases().unwrap().is_empty());
}

/// `anyvm --backend virtualbox ...` behaves as with libvirt, and concurrent `up`s from several
/// processes get distinct ports.
#[test]
fn cli_on_virtualbox_and_concurrent_up_from_processes() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("vbox");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let mut cfg = String::from("backend = \"virtualbox\"\nport_range = [49500, 49999]\n");
    for i in 0..4 {
        let disk = dir.path().join(format!("d{i}.vdi"));
        std::fs::write(&disk, b"d").unwrap();
        cfg.push_str(&format!(
            "[machines.vb{i}]\ndisks = [{{ path = \"{}\" }}]\nforwards = [{{ name = \"ssh\", guest_port = 22 }}]\ncredentials = {{ user = \"mc\", password_file = \"{}\" }}\nready = {{ timeout_s = 30 }}\n",
            disk.display(),
            pw.display()
        ));
    }
    let cfgp = dir.path().join("anyvm.toml");
    std::fs::write(&cfgp, cfg).unwrap();
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_anyvm"));
        c.arg("-c")
            .arg(&cfgp)
            .args(args)
            .env("ANYVM_VBOXMANAGE", fake())
            .env("ANYVM_FAKE_VBOX_HOME", &home)
            .env("ANYVM_STATE_DIR", dir.path().join("state"));
        c
    };
    let children: Vec<_> = (0..4)
        .map(|i| {
            run(&["up", &format!("vb{i}")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut ports = std::collections::HashSet::new();
    for i in 0..4 {
        let o = run(&["--json", "status", &format!("vb{i}")])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["state"], "running");
        ports.insert(v["forwards"][0]["host_port"].as_u64().unwrap());
    }
    assert_eq!(ports.len(), 4, "ports collided: {ports:?}");

    let o = run(&["exec", "vb0", "--", "/bin/sh", "-c", "echo hi; exit 5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    let o = run(&["--backend", "virtualbox", "--json", "list"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 4);
    let o = run(&["exec", "missing", "--", "true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr)
        .starts_with("anyvm: error: vm 'missing': open: not found"));
    for i in 0..4 {
        assert!(run(&["destroy", &format!("vb{i}")])
            .status()
            .unwrap()
            .success());
    }
    let o = run(&["--json", "ports"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}

/// The job runner is backend-agnostic: the same phases and teardown on VirtualBox.
#[tokio::test]
async fn transient_job_on_virtualbox() {
    use anyvm::job::{run_job, Cancel, JobSpec, Outcome};
    let f = new_fake();
    let t = f
        .client
        .define(f.spec("tmpl"))
        .await
        .unwrap()
        .with_credentials(creds());
    let g = f.dir.path().join("guestfs");
    let host_in = f.dir.path().join("in.txt");
    std::fs::write(&host_in, "payload\n").unwrap();
    let gin = g.join("work/in.txt").display().to_string();
    let gout = g.join("work/out.txt").display().to_string();
    let spec = JobSpec::new(
        "tmpl",
        &[
            "/bin/sh",
            "-c",
            &format!("tr a-z A-Z < {gin} > {gout}; echo done"),
        ],
    )
    .unwrap()
    .input(&host_in, gin.as_str())
    .output(gout.as_str(), f.dir.path().join("out/out.txt"));
    let r = run_job(&f.client, &t, &spec, &Cancel::new()).await;
    assert_eq!(
        r.outcome,
        Outcome::Succeeded,
        "{}: {:?}",
        String::from_utf8_lossy(&r.stderr),
        r.error
    );
    assert_eq!(r.stdout_str(), "done\n");
    assert_eq!(
        std::fs::read_to_string(f.dir.path().join("out/out.txt")).unwrap(),
        "PAYLOAD\n"
    );
    let calls = f.calls();
    assert!(calls.contains(r#"["clonevm", "tmpl","#), "{calls}");
    assert!(
        calls.contains(&format!(r#"["unregistervm", "{}""#, r.vm)),
        "{calls}"
    );
    let names: Vec<String> = f
        .client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, vec!["tmpl".to_string()]);
    // The clone's ports went back to the pool.
    assert!(f
        .client
        .ports()
        .leases()
        .unwrap()
        .iter()
        .all(|l| l.vm == "tmpl"));
}

/// The process exits (or is a zombie about to be reaped) within two seconds. Async: the
/// aborted exec task must get to run its drop on this runtime.
async fn pid_gone_soon(pid: i32) -> bool {
    for _ in 0..100 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A streamed guest program that says "up" and sleeps, and its pid.
async fn sleeper(vm: &anyvm::Vm, pidfile: &Path) -> (anyvm::ExecStream, i32) {
    let script = format!("echo $$ > {}; echo up; exec sleep 300", pidfile.display());
    let mut s = vm
        .exec_stream(&ExecRequest::new("/bin/sh").args(["-c", script.as_str()]))
        .await
        .unwrap();
    assert_eq!(s.next().await.unwrap().data, b"up\n");
    let pid = std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (s, pid)
}

#[tokio::test]
async fn exec_streams_output_and_a_dropped_stream_kills_the_program() {
    use anyvm::{CopyDirection, Event, OutputStream, VmEventKind};
    let f = new_fake();
    let mut events = f.client.events();
    let vm = f
        .client
        .define(f.spec("mcs"))
        .await
        .unwrap()
        .with_credentials(creds());
    vm.start().await.unwrap();
    vm.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(10)))
        .await
        .unwrap();

    // Output arrives while the program runs, each stream on its own.
    let started = Instant::now();
    let mut s = vm
        .exec_stream(
            &ExecRequest::new("/bin/sh")
                .args(["-c", "echo one; sleep 2; echo two; echo oops >&2; exit 5"]),
        )
        .await
        .unwrap();
    let first = s.next().await.unwrap();
    let first_at = started.elapsed();
    assert_eq!(
        (first.stream, first.data.as_slice()),
        (OutputStream::Stdout, &b"one\n"[..])
    );
    let out = s.wait().await.unwrap();
    assert!(
        out.duration >= first_at + Duration::from_millis(1500),
        "first chunk at {first_at:?}, program took {:?}",
        out.duration
    );
    assert_eq!(out.exit_code, Some(5));
    assert_eq!(out.stdout_str(), "two\n");
    assert_eq!(out.stderr_str(), "oops\n");

    // Bad requests fail before anything runs.
    let e = vm.exec_stream(&ExecRequest::new("")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    // Dropping the stream kills the guest program; cancel reports Cancelled.
    let pidfile = f.dir.path().join("prog.pid");
    let (s, pid) = sleeper(&vm, &pidfile).await;
    drop(s);
    assert!(
        pid_gone_soon(pid).await,
        "guest program {pid} survived the dropped stream"
    );

    let (mut s, pid) = sleeper(&vm, &pidfile).await;
    s.cancel();
    let e = s.wait().await.unwrap_err();
    assert_eq!(e.kind(), anyvm::ErrorKind::Cancelled, "{e}");
    assert!(e.to_string().contains("vm 'mcs'"), "{e}");
    assert!(
        pid_gone_soon(pid).await,
        "guest program {pid} survived cancel"
    );

    // Copies report their progress to the caller and to the event stream.
    let src = f.dir.path().join("blob");
    std::fs::write(&src, vec![7u8; 300_000]).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let gpath = f.dir.path().join("blob-in-guest").display().to_string();
    let n = vm
        .copy_to_with(&src, &gpath, move |d, t| s2.lock().unwrap().push((d, t)))
        .await
        .unwrap();
    assert_eq!(n, 300_000);
    assert_eq!(seen.lock().unwrap().last(), Some(&(300_000, Some(300_000))));
    vm.destroy().await.unwrap();

    // What anyvm did is on the event stream, in order (VirtualBox has no events of its own).
    let mut kinds = Vec::new();
    let mut copies = Vec::new();
    while let Some(e) = events.try_next() {
        match e {
            Event::Vm(v) if v.vm == "mcs" => kinds.push(v.kind),
            Event::Copy(c) => copies.push((c.direction, c.done, c.finished)),
            _ => {}
        }
    }
    assert_eq!(
        kinds,
        vec![
            VmEventKind::Defined,
            VmEventKind::Started,
            VmEventKind::Stopped,
            VmEventKind::Undefined
        ]
    );
    assert_eq!(
        copies.last(),
        Some(&(CopyDirection::ToGuest, 300_000, true))
    );
}

#[tokio::test]
async fn screenshots_and_the_remote_display_of_a_running_vm() {
    let f = new_fake();
    let vm = f.client.define(f.spec("shot")).await.unwrap();
    let e = vm.screenshot().await.unwrap_err();
    assert_eq!(e.kind(), anyvm::ErrorKind::InvalidState, "{e}");
    assert!(e.to_string().contains("'shot'"), "{e}");
    let d = vm
        .remote_display()
        .await
        .unwrap()
        .expect("console.vnc asked for one");
    assert_eq!(d.protocol, "rdp");
    assert_eq!(d.url, format!("rdp://127.0.0.1:{}", d.port));
    assert!(
        f.calls()
            .contains(&format!("\"--vrdeport\", \"{}\"", d.port)),
        "{}",
        f.calls()
    );
    vm.start().await.unwrap();
    let out = f.dir.path().join("shot.png");
    let s = vm.screenshot_to(&out).await.unwrap();
    assert_eq!((s.width, s.height), (720, 400));
    assert!(!s.is_blank());
    assert_eq!(std::fs::read(&out).unwrap(), s.png);
    // VirtualBox's own file is gone once read.
    let left: Vec<_> = std::fs::read_dir(f.dir.path().join("console"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("screenshot"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    vm.destroy().await.unwrap();
}

/// Warm clones on VirtualBox: the first job saves a ready clone into a holder VM, later ones
/// clone its saved snapshot and resume it (no second save, no boot), each with its own
/// forwards, serial log and host entropy; the template's destroy takes the state with it.
#[tokio::test]
async fn warm_jobs_resume_a_saved_state_on_virtualbox() {
    use anyvm::job::{run_job, Cancel, JobSpec, Outcome};
    let f = new_fake();
    // A boot that takes time: resumed clones must not wait for it.
    f.faults(r#"{"boot_delay": 1.5}"#);
    let t = f
        .client
        .define(f.spec("tmpl"))
        .await
        .unwrap()
        .with_credentials(creds());
    let spec = JobSpec::new("tmpl", &["/bin/echo", "hi"]).unwrap();
    let mut vms = Vec::new();
    for _ in 0..2 {
        let r = run_job(&f.client, &t, &spec, &Cancel::new()).await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{:?}", r.error);
        assert_eq!(r.stdout_str(), "hi\n");
        vms.push(r.vm.clone());
    }
    let calls = f.calls();
    assert_eq!(calls.matches(r#""savestate""#).count(), 1, "{calls}");
    for vm in &vms {
        assert!(
            calls
                .lines()
                .any(|l| l.starts_with(r#"["clonevm", "anyvm-warm-"#)
                    && l.contains(&format!(r#""--name", "{vm}""#))),
            "{calls}"
        );
        assert!(calls.contains(&format!(r#"["startvm", "{vm}""#)), "{calls}");
        // Own serial log and entropy after the resume.
        assert!(
            calls.contains(&format!(
                r#"["controlvm", "{vm}", "changeuartmode1", "file""#
            )),
            "{calls}"
        );
        assert!(
            calls.contains(&format!(r#"["guestcontrol", "{vm}", "run""#))
                && calls.contains("of=/dev/urandom"),
            "{calls}"
        );
    }
    // The clones' forwards were replaced while they were saved (only NAT/VRDE may change).
    let modify: Vec<&str> = calls
        .lines()
        .filter(|l| l.contains(r#"["modifyvm", "tmpl-"#) && l.contains("--natpf1"))
        .collect();
    assert!(!modify.is_empty(), "{calls}");
    // The holder is not listed, the clones are gone.
    let names: Vec<String> = f
        .client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, vec!["tmpl".to_string()]);
    // A warm clone by hand: running at once, its own forward.
    let c = t
        .clone_warm(&VmName::new("wc").unwrap(), &ReadySpec::default())
        .await
        .unwrap();
    assert_eq!(c.state().await.unwrap(), VmState::Running);
    let tf = t.forwards().await.unwrap();
    let cf = c.forwards().await.unwrap();
    assert_eq!(cf.len(), 1);
    assert_ne!(cf[0].host_port, tf[0].host_port);
    c.destroy().await.unwrap();
    t.destroy().await.unwrap();
    let state = std::fs::read_to_string(f.home().join("state.json")).unwrap();
    assert!(!state.contains("anyvm-warm-"), "{state}");
}
