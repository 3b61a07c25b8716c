//! The VMware backend against the fake vmrun in tests/fakes (formats from the reference; guest
//! programs and files on this host).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyvm::backend::vmware::{VmwareBackend, VmwareOptions};
use anyvm::backend::Backend;
use anyvm::{
    Boot, Client, ClientOptions, Credentials, Error, ErrorKind, ExecRequest, ForwardSpec,
    GuestChannel, HostPort, ReadySpec, Secret, SecretSource, StopOptions, StopOutcome, VmName,
    VmSpec, VmState,
};

#[path = "../support/sshd.rs"]
mod sshd;

fn fake() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fakes/vmrun")
}

struct Fake {
    dir: tempfile::TempDir,
    backend: Arc<VmwareBackend>,
    client: Client,
}

impl Fake {
    fn home(&self) -> PathBuf {
        self.dir.path().join("vmw")
    }
    fn faults(&self, json: &str) {
        std::fs::create_dir_all(self.home()).unwrap();
        std::fs::write(self.home().join("faults.json"), json).unwrap();
    }
    fn vmx(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join("vms").join(name);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("{name}.vmx"));
        std::fs::write(
            &p,
            format!(".encoding = \"UTF-8\"\ndisplayName = \"{name} display\"\nmemsize = \"512\"\n"),
        )
        .unwrap();
        p
    }
    fn spec(&self, name: &str) -> VmSpec {
        let mut s = VmSpec::new(
            VmName::new(name).unwrap(),
            Boot::Existing {
                path: self.vmx(name),
            },
        );
        s.memory_mib = 1024;
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

fn fake_with(f: impl FnOnce(&mut VmwareOptions)) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let mut o = VmwareOptions {
        vmrun: Some(fake()),
        state_dir: dir.path().join("state"),
        env: vec![(
            "ANYVM_FAKE_VMRUN_HOME".into(),
            dir.path().join("vmw").display().to_string(),
        )],
        call_timeout: Duration::from_secs(20),
        long_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    f(&mut o);
    let backend = Arc::new(VmwareBackend::new(o).unwrap());
    let client = Client::with_backend(
        backend.clone(),
        ClientOptions::default()
            .state_dir(dir.path().join("state"))
            .port_range(49600..=49799),
    );
    Fake {
        dir,
        backend,
        client,
    }
}

#[tokio::test]
async fn full_lifecycle_through_the_core_api() {
    let f = fake_with(|_| {});
    let vm = f
        .client
        .define(f.spec("ws1"))
        .await
        .unwrap()
        .with_credentials(creds());
    let vmx_text = std::fs::read_to_string(f.dir.path().join("vms/ws1/ws1.vmx")).unwrap();
    assert!(vmx_text.contains("memsize = \"1024\""), "{vmx_text}");
    assert!(vmx_text.contains("RemoteDisplay.vnc.enabled = \"TRUE\""));
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);

    vm.start().await.unwrap();
    // start pointed the NAT forward at the guest's IP
    assert!(f
        .calls()
        .contains("\"setPortForwarding\", \"vmnet8\", \"tcp\""));
    vm.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(10)))
        .await
        .unwrap();

    let out = vm
        .exec(&ExecRequest::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 4"]))
        .await
        .unwrap();
    assert_eq!(
        (
            out.exit_code,
            out.stdout_str().as_str(),
            out.stderr_str().as_str()
        ),
        (Some(4), "out\n", "err\n")
    );
    let tmp = f.dir.path().display().to_string();
    let out = vm
        .exec(
            &ExecRequest::new("sh")
                .args(["-c", "cat; echo $X; pwd"])
                .env("X", "1 2")
                .cwd(&tmp)
                .stdin(b"piped\n".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), format!("piped\n1 2\n{tmp}\n"));
    // temp files in the guest are removed
    let left: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".anyvm-{}-", std::process::id()))
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let src = f.dir.path().join("a.bin");
    std::fs::write(&src, vec![1u8; 5000]).unwrap();
    let g = format!("{}/g.bin", f.dir.path().display());
    assert_eq!(vm.copy_to(&src, &g).await.unwrap(), 5000);
    let back = f.dir.path().join("b.bin");
    assert_eq!(vm.copy_from(&g, &back).await.unwrap(), 5000);
    let e = vm.copy_from("/no/such", &back).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("guest file /no/such"), "{e}");
    assert!(f.calls().contains("\"fileExistsInGuest\""));

    let added = vm.forward_add(&ForwardSpec::new("web", 80)).await.unwrap();
    assert_eq!(vm.forwards().await.unwrap().len(), 2);
    vm.forward_remove("web").await.unwrap();
    assert!(f.calls().contains(&format!(
        "\"deletePortForwarding\", \"vmnet8\", \"tcp\", \"{}\"",
        added.host_port
    )));

    vm.snapshot_take("clean", "").await.unwrap();
    assert_eq!(vm.snapshots().await.unwrap()[0].name, "clean");
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

    let clone = vm
        .clone_linked(&VmName::new("ws1-job").unwrap(), Some("clean"))
        .await
        .unwrap();
    let cspec = clone.spec().await.unwrap().unwrap();
    let Boot::Existing { path } = &cspec.boot else {
        panic!()
    };
    assert!(path.exists());
    assert!(
        !path.with_extension("vmx.lck").exists(),
        "stale lock left behind"
    );
    assert_ne!(
        clone.forwards().await.unwrap()[0].host_port,
        vm.forwards().await.unwrap()[0].host_port
    );
    clone.destroy().await.unwrap();
    assert!(!path.exists());

    vm.snapshot_restore("clean").await.unwrap();
    vm.snapshot_delete("clean").await.unwrap();
    let vmx = f.dir.path().join("vms/ws1/ws1.vmx");
    vm.destroy().await.unwrap();
    assert!(vmx.exists(), "an adopted .vmx is not deleted");
    assert!(f.client.ports().leases().unwrap().is_empty());
    println!("vmrun invocations: {:?}", f.backend.invocations());
}

#[tokio::test]
async fn hung_vmrun_is_killed_and_soft_stop_falls_back() {
    let f = fake_with(|o| o.call_timeout = Duration::from_millis(1500));
    let vm = f.client.define(f.spec("hang")).await.unwrap();
    vm.start().await.unwrap();
    f.faults(r#"{"hang": ["checkToolsState"]}"#);
    let e = anyvm::Backend::agent_ping(
        vm.backend().as_ref(),
        vm.name(),
        Duration::from_millis(1000),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    // `stop soft` that returns but is ignored, and one that hangs: both end in a hard stop.
    f.faults(r#"{"ignore_soft_stop": true}"#);
    let r = vm
        .stop(StopOptions {
            timeout: Duration::from_millis(500),
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(r, StopOutcome::Forced);
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);
    vm.start().await.unwrap();
    f.faults(r#"{"hang_soft_stop": true}"#);
    let r = vm
        .stop(StopOptions {
            timeout: Duration::from_secs(5),
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(r, StopOutcome::Forced);
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);
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
        assert!(gone, "{pid} survived");
    }
}

#[tokio::test]
async fn error_kinds_from_vmrun_text() {
    let f = fake_with(|_| {});
    let vm = f
        .client
        .define(f.spec("err"))
        .await
        .unwrap()
        .with_credentials(creds());
    // not powered on
    let e = vm.exec(&ExecRequest::new("true")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    vm.start().await.unwrap();
    f.faults(r#"{"tools_never_running": true}"#);
    let e = vm
        .wait_ready(&ReadySpec::default().timeout(Duration::from_secs(2)))
        .await
        .unwrap_err();
    match e {
        Error::NotReady { last_error, .. } => {
            assert!(last_error.contains("\"installed\""), "{last_error}")
        }
        e => panic!("{e}"),
    }
    let e = vm.exec(&ExecRequest::new("true")).await.unwrap_err();
    assert!(matches!(e, Error::NotReady { .. }), "{e}");
    f.faults(r#"{"guest_password": "other-pw"}"#);
    let e = vm.exec(&ExecRequest::new("true")).await.unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(!e.to_string().contains("secret"));
    f.faults(r#"{"no_ip": true}"#);
    vm.power_off().await.unwrap();
    let e = vm.start().await.unwrap_err();
    assert!(
        e.to_string().contains("Unable to get the IP address"),
        "{e}"
    );
    f.faults(r#"{"player": true}"#);
    let e = vm
        .forward_add(&ForwardSpec::new("x", 80))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Workstation Pro"), "{e}");
    let mut s = f.spec("bad");
    s.boot = Boot::Disk;
    s.disks.push(anyvm::DiskSpec {
        path: "/d.vmdk".into(),
        format: Default::default(),
        readonly: false,
        owned: false,
    });
    assert!(f
        .client
        .define(s)
        .await
        .unwrap_err()
        .to_string()
        .contains("vmrun cannot create VMs"));
    let mut s = f.spec("gone");
    s.boot = Boot::Existing {
        path: "/nonexistent/x.vmx".into(),
    };
    assert!(matches!(
        f.client.define(s).await.unwrap_err(),
        Error::NotFound { .. }
    ));
}

#[tokio::test]
async fn readiness_can_wait_for_a_guest_variable() {
    let f = fake_with(|o| o.ready_guest_vars = vec!["ready".into()]);
    let vm = f.client.define(f.spec("gv")).await.unwrap();
    vm.start().await.unwrap();
    let e = vm
        .wait_ready(&ReadySpec::default().timeout(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("guest variable ready is not set yet"),
        "{e}"
    );
    f.faults(r#"{"guest_vars": {"ready": "1"}}"#);
    vm.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(5)))
        .await
        .unwrap();
}

#[tokio::test]
async fn secrets_stay_out_of_logs_and_policy_can_forbid_argv_passwords() {
    let f = fake_with(|_| {});
    let vm = f.client.define(f.spec("sec")).await.unwrap();
    vm.start().await.unwrap();
    let secret = "Vmw4re-Secret!";
    f.faults(&format!(r#"{{"guest_password": "{secret}"}}"#));
    let vm = vm.with_credentials(
        Credentials::user("mc").password(SecretSource::Value(Secret::new(secret))),
    );
    // Capture anyvm's own log output while exec runs.
    let out = vm.exec(&ExecRequest::new("true")).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    let e = vm
        .with_credentials(
            Credentials::user("mc").password(SecretSource::Value(Secret::new("bad-pw-9"))),
        )
        .exec(&ExecRequest::new("true"))
        .await
        .unwrap_err();
    assert!(!format!("{e} {e:?}").contains("bad-pw-9"));

    let strict = fake_with(|o| o.forbid_secrets_in_argv = true);
    let vm = strict
        .client
        .define(strict.spec("strict"))
        .await
        .unwrap()
        .with_credentials(creds());
    vm.start().await.unwrap();
    let e = vm.exec(&ExecRequest::new("true")).await.unwrap_err();
    assert!(matches!(e, Error::PolicyDenied { .. }), "{e}");
    assert!(
        !strict.calls().contains("runProgramInGuest"),
        "nothing may run after a policy refusal"
    );
}

#[tokio::test]
async fn shared_folders_and_cli() {
    let f = fake_with(|_| {});
    let vm = f.client.define(f.spec("sh")).await.unwrap();
    let host = f.dir.path().join("archive");
    std::fs::create_dir_all(&host).unwrap();
    vm.shared_folder_add(&anyvm::SharedFolder {
        name: "calib".into(),
        host_path: host,
        readonly: true,
        automount: false,
        guest_path: None,
    })
    .await
    .unwrap();
    assert!(f.calls().contains("\"setSharedFolderState\""));
    assert!(f.calls().contains("\"readonly\"]"));

    // The CLI behaves the same on vmware.
    let cfg = f.dir.path().join("anyvm.toml");
    let vmx = f.vmx("cli1");
    std::fs::write(f.dir.path().join("pw"), "secret\n").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "backend = \"vmware:ws\"\nport_range = [49800, 49899]\n[machines.cli1]\nvmx = \"{}\"\nforwards = [{{ name = \"ssh\", guest_port = 22 }}]\ncredentials = {{ user = \"mc\", password_file = \"{}\" }}\n",
            vmx.display(),
            f.dir.path().join("pw").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_anyvm"))
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .env("ANYVM_VMRUN", fake())
            .env("ANYVM_FAKE_VMRUN_HOME", f.home())
            .env("ANYVM_STATE_DIR", f.dir.path().join("cli-state"))
            .output()
            .unwrap()
    };
    let o = run(&["up", "cli1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["exec", "cli1", "--", "sh", "-c", "echo hi; exit 6"]);
    assert_eq!(o.status.code(), Some(6));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    let o = run(&["--json", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "cli1" && x["state"] == "running"),
        "{v}"
    );
    let o = run(&["stop", "cli1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["destroy", "cli1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Key-based credentials for the loopback sshd that stands in for the guest's.
fn ssh_creds(d: &sshd::Sshd) -> Credentials {
    Credentials::user(d.user.clone()).identity_file(&d.client_key)
}

#[tokio::test]
async fn ssh_channel_serves_sites_that_forbid_argv_passwords() {
    let d = sshd::Sshd::start();
    let f = fake_with(|o| o.forbid_secrets_in_argv = true);
    f.faults(r#"{"guest_ip": "127.0.0.1"}"#);
    let vm = f.client.define(f.spec("viassh")).await.unwrap();
    vm.start().await.unwrap();

    // The tools channel would need -gp: refused, and the refusal says what to do instead.
    let e = vm
        .clone()
        .with_credentials(creds())
        .exec(&ExecRequest::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PolicyDenied { .. }), "{e}");
    assert!(e.to_string().contains("guest_channel"), "{e}");

    let vm = vm
        .with_credentials(ssh_creds(&d))
        .with_guest_channel(GuestChannel::Ssh { port: d.port });
    // argv boundaries and shell metacharacters survive the remote shell
    let tricky = ["a b", "it's", "$(touch /tmp/anyvm-pwned)", "`id`", "*", ""];
    let out = vm
        .exec(
            &ExecRequest::new("/usr/bin/printf")
                .args(std::iter::once("[%s]").chain(tricky.iter().copied())),
        )
        .await
        .unwrap();
    assert_eq!(
        out.stdout_str(),
        "[a b][it's][$(touch /tmp/anyvm-pwned)][`id`][*][]"
    );
    assert!(!Path::new("/tmp/anyvm-pwned").exists());

    // exit code, stderr, env, cwd and stdin
    let work = f.dir.path().join("work dir");
    std::fs::create_dir_all(&work).unwrap();
    let mut req = ExecRequest::new("/bin/sh")
        .args(["-c", "pwd; echo \"$MC_RUN\"; cat; echo oops >&2; exit 7"]);
    req.env.insert("MC_RUN".into(), "run 42".into());
    req.cwd = Some(work.display().to_string());
    req.stdin = Some(b"from stdin\n".to_vec());
    let out = vm.exec(&req).await.unwrap();
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(
        out.stdout_str(),
        format!("{}\nrun 42\nfrom stdin\n", work.display())
    );
    assert_eq!(out.stderr_str(), "oops\n");

    // file copy both ways (scp over SFTP), a path with a space
    let src = f.dir.path().join("in.dat");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let guest = work.join("staged in.dat").display().to_string();
    assert_eq!(vm.copy_to(&src, &guest).await.unwrap(), data.len() as u64);
    let back = f.dir.path().join("back.dat");
    assert_eq!(
        vm.copy_from(&guest, &back).await.unwrap(),
        data.len() as u64
    );
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let e = vm
        .copy_from("/nonexistent/anyvm.dat", &back)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // Nothing went through vmrun's guest commands, so no password was ever on a command line.
    let calls = f.calls();
    for c in ["runProgramInGuest", "copyFileFromHostToGuest", "-gp"] {
        assert!(!calls.contains(c), "{c} in {calls}");
    }

    // The first key seen is pinned in anyvm's own known_hosts: a different key is refused.
    let kh = std::fs::read_dir(f.dir.path().join("state/ssh"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("viassh.known_hosts"))
        .find(|p| p.exists())
        .expect("per-VM known_hosts written");
    let pinned = std::fs::read_to_string(&kh).unwrap();
    assert!(pinned.contains(d.host_public_key().split_whitespace().nth(1).unwrap()));
    std::fs::write(
        &kh,
        "anyvm.viassh ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm2HAkD0L5gYO6gqQ0mYtV0z4Lw8kR6G8nP3pQd0x1a\n",
    )
    .unwrap();
    let e = vm.exec(&ExecRequest::new("true")).await.unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(e.to_string().contains("host key"), "{e}");
    std::fs::write(&kh, pinned).unwrap();

    // A key the guest does not accept is an Auth error naming the VM, not a hang or exit 255.
    let other = f.dir.path().join("other_key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(st.success());
    let e = vm
        .clone()
        .with_credentials(Credentials::user(d.user.clone()).identity_file(&other))
        .exec(&ExecRequest::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(e.to_string().contains("viassh"), "{e}");

    // Passwords are never handed to ssh: a password-only account is refused up front.
    let e = vm
        .clone()
        .with_credentials(creds())
        .exec(&ExecRequest::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(e.to_string().contains("identity_file"), "{e}");

    // The CLI takes the same channel from the config file.
    let cfg = f.dir.path().join("anyvm.toml");
    let vmx = f.vmx("cli2");
    std::fs::write(
        &cfg,
        format!(
            "backend = \"vmware:ws\"\nport_range = [49900, 49949]\n[machines.cli2]\nvmx = \"{}\"\nguest_channel = \"ssh\"\nssh_port = {}\ncredentials = {{ user = \"{}\", identity_file = \"{}\" }}\n",
            vmx.display(),
            d.port,
            d.user,
            d.client_key.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_anyvm"))
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .env("ANYVM_VMRUN", fake())
            .env("ANYVM_FAKE_VMRUN_HOME", f.home())
            .env("ANYVM_STATE_DIR", f.dir.path().join("cli-state"))
            .output()
            .unwrap()
    };
    let o = run(&["up", "cli2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&[
        "exec",
        "cli2",
        "--",
        "/bin/sh",
        "-c",
        "echo via ssh; exit 5",
    ]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "via ssh\n");
    let o = run(&["destroy", "cli2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A TCP service standing in for one in the guest: answers each line with "echo: LINE".
fn echo_server() -> (u16, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut w = c.try_clone().unwrap();
                for line in std::io::BufReader::new(c).lines().map_while(|l| l.ok()) {
                    let _ = writeln!(w, "echo: {line}");
                }
            });
        }
    });
    (port, h)
}

fn roundtrip(port: u16) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(c, "ping")?;
    let mut line = String::new();
    std::io::BufReader::new(c).read_line(&mut line)?;
    Ok(line)
}

#[tokio::test]
async fn player_forwards_ride_ssh_tunnels() {
    let d = sshd::Sshd::start();
    let (svc, _h) = echo_server();
    let f = fake_with(|o| o.flavor = "player".into());
    f.faults(r#"{"player": true, "guest_ip": "127.0.0.1"}"#);
    let mut spec = f.spec("pl");
    spec.forwards.clear();
    spec.forwards.push(ForwardSpec::new("svc", svc));
    let vm = f
        .client
        .define(spec)
        .await
        .unwrap()
        .with_credentials(ssh_creds(&d))
        .with_guest_channel(GuestChannel::Ssh { port: d.port });
    assert_eq!(
        f.backend.forward_transport(),
        anyvm::backend::ForwardTransport::SshTunnel
    );
    let declared = vm.forwards().await.unwrap()[0].clone();

    // Declared forwards open once the guest is ready (its sshd answers).
    vm.start().await.unwrap();
    vm.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(roundtrip(declared.host_port).unwrap(), "echo: ping\n");

    // Runtime forwards open at once; vmrun's host-network commands are never used.
    let (svc2, _h2) = echo_server();
    let added = vm
        .forward_add(&ForwardSpec::new("svc2", svc2))
        .await
        .unwrap();
    assert_eq!(roundtrip(added.host_port).unwrap(), "echo: ping\n");
    assert!(!f.calls().contains("PortForwarding"), "{}", f.calls());

    // A taken host port fails the add (ExitOnForwardFailure) and leaves nothing behind.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().port();
    let mut clash = ForwardSpec::new("clash", svc);
    clash.host_port = HostPort::Fixed(taken);
    let e = vm.forward_add(&clash).await.unwrap_err();
    assert!(matches!(e, Error::PortInUse { .. }), "{e}");
    assert!(vm
        .forwards()
        .await
        .unwrap()
        .iter()
        .all(|f| f.name != "clash"));
    drop(blocker);

    // ssh cannot carry UDP: refused with the reason.
    let mut udp = ForwardSpec::new("dns", 53);
    udp.proto = anyvm::Protocol::Udp;
    let e = vm.forward_add(&udp).await.unwrap_err();
    assert!(e.to_string().contains("TCP only"), "{e}");

    // Removing a forward closes its tunnel.
    vm.forward_remove("svc2").await.unwrap();
    assert!(roundtrip(added.host_port).is_err());

    // Stopping closes the rest; readiness after the next start reopens them.
    vm.stop(StopOptions::default()).await.unwrap();
    assert!(roundtrip(declared.host_port).is_err());
    vm.start().await.unwrap();
    vm.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(roundtrip(declared.host_port).unwrap(), "echo: ping\n");

    // reset closes them too (the guest's sshd restarts)
    vm.reset().await.unwrap();
    assert!(f.calls().contains("\"reset\""));
    assert!(roundtrip(declared.host_port).is_err());

    vm.destroy().await.unwrap();
    assert!(roundtrip(declared.host_port).is_err());
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.path().join("state/tunnels"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn reset_needs_a_running_vm() {
    let f = fake_with(|_| {});
    let vm = f.client.define(f.spec("rs")).await.unwrap();
    let e = vm.reset().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidState, "{e}");
    assert!(e.to_string().contains("'rs'"), "{e}");
    vm.start().await.unwrap();
    vm.reset().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Running);
    vm.destroy().await.unwrap();
}

#[tokio::test]
async fn profile_policy_can_forbid_argv_secrets_per_vm() {
    let f = fake_with(|_| {});
    let vm = f.client.define(f.spec("pol")).await.unwrap();
    vm.start().await.unwrap();
    let strict = vm
        .clone()
        .with_credentials(creds())
        .with_policy(anyvm::Policy {
            secrets_in_argv: false,
            ..Default::default()
        });
    let e = strict
        .exec(&ExecRequest::new("/bin/true"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PolicyDenied { .. }), "{e}");
    assert!(e.to_string().contains("guest_channel"), "{e}");
    assert!(!f.calls().contains("runProgramInGuest"));
    // the same VM without that policy still works through the tools
    let out = vm
        .with_credentials(creds())
        .exec(&ExecRequest::new("/bin/true"))
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
}

#[tokio::test]
async fn screenshots_need_the_guest_account_and_show_the_screen() {
    let f = fake_with(|_| {});
    let vm = f.client.define(f.spec("shot")).await.unwrap();
    vm.start().await.unwrap();
    let e = vm.screenshot().await.unwrap_err();
    assert_eq!(e.kind(), anyvm::ErrorKind::Auth, "{e}");
    let vm = vm.with_credentials(creds());
    let s = vm.screenshot().await.unwrap();
    assert_eq!((s.width, s.height), (720, 400));
    assert!(!s.is_blank());
    assert!(f.calls().contains("captureScreen"), "{}", f.calls());
    assert!(!f.calls().contains("secret"), "{}", f.calls());
    let d = vm
        .remote_display()
        .await
        .unwrap()
        .expect("console.vnc asked for one");
    assert_eq!(d.protocol, "vnc");
    vm.destroy().await.unwrap();
}

/// VMware has no warm start through vmrun: asking for one says why and changes nothing, and
/// a job (warm by default) boots its clone instead.
#[tokio::test]
async fn warm_starts_say_why_not_and_jobs_boot_cold() {
    use anyvm::job::{run_job, Cancel, JobSpec, Outcome};
    let f = fake_with(|_| {});
    let t = f
        .client
        .define(f.spec("wt"))
        .await
        .unwrap()
        .with_credentials(creds());
    let e = t.warm(&anyvm::ReadySpec::default()).await.unwrap_err();
    assert!(
        e.to_string().contains("vmrun clones carry no memory state"),
        "{e}"
    );
    assert!(e.to_string().contains("boot it cold"), "{e}");
    let before = f.calls();
    assert!(!before.contains("\"suspend\""), "{before}");
    let r = run_job(
        &f.client,
        &t,
        &JobSpec::new("wt", &["/bin/echo", "cold"]).unwrap(),
        &Cancel::new(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{:?}", r.error);
    assert_eq!(r.stdout_str(), "cold\n");
    let calls = f.calls();
    assert!(calls.contains("\"linked\""), "{calls}");
    assert!(!calls.contains("\"suspend\""), "{calls}");
}
