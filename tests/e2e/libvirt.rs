//! End-to-end tests against the real libvirtd and the test guest (QEMU, software emulation).
//! Run with `cargo test -p anyvm --test e2e_libvirt` after `scripts/setup-host.sh`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use anyvm::{
    Credentials, Error, ExecRequest, ForwardSpec, GuestChannel, HostPort, Probe, ReadySpec,
    SshOptions, StopOptions, StopOutcome, VmName, VmState,
};
use common::*;

fn ready() -> ReadySpec {
    ReadySpec::default().timeout(Duration::from_secs(120))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_exec_copy_and_ssh() {
    let env = env().await;
    let name = "e2e-main";
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let vm = env.client.define(env.spec(name, "")).await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);
    // Defining twice is refused and changes nothing.
    let e = env.client.define(env.spec(name, "")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");

    vm.start().await.unwrap();
    let rep = vm
        .wait_ready(&ready().probe(Probe::SshBanner { guest_port: 22 }))
        .await
        .unwrap();
    assert_eq!(rep.passed.len(), 2);

    // exit codes, stdout, stderr
    let out = vm
        .exec(&ExecRequest::new("sh").args(["-c", "echo out; echo err >&2; exit 7"]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let e = vm
        .exec_checked(&ExecRequest::new("false"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::GuestCommand {
                exit_code: Some(1),
                ..
            }
        ),
        "{e}"
    );
    // stdin, env, cwd
    let out = vm
        .exec(&ExecRequest::new("cat").stdin(b"from stdin\x00\xff".to_vec()))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"from stdin\x00\xff");
    let out = vm
        .exec(
            &ExecRequest::new("sh")
                .args(["-c", "echo \"$GREETING\"; pwd"])
                .env("GREETING", "hi there")
                .cwd("/tmp"),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "hi there\n/tmp\n");
    // a cwd with shell metacharacters is a directory name, never code
    let out = vm
        .exec(&ExecRequest::new("true").cwd("/nonexistent;touch /tmp/pwned"))
        .await
        .unwrap();
    assert_ne!(out.exit_code, Some(0));
    assert_ne!(
        vm.exec(&ExecRequest::new("ls").arg("/tmp/pwned"))
            .await
            .unwrap()
            .exit_code,
        Some(0)
    );
    // 1 MiB of stdout intact
    let out = vm
        .exec(&ExecRequest::new("sh").args([
            "-c",
            "head -c 1048576 /dev/urandom | tee /tmp/big | sha256sum",
        ]))
        .await
        .unwrap();
    let guest_sum = out
        .stdout_str()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let big = vm
        .exec(&ExecRequest::new("cat").arg("/tmp/big"))
        .await
        .unwrap();
    assert_eq!(big.stdout.len(), 1 << 20);
    assert!(!big.stdout_truncated);
    assert_eq!(sha256(&big.stdout), guest_sum);
    // timeout kills the guest program
    let t = Instant::now();
    let e = vm
        .exec(
            &ExecRequest::new("sleep")
                .arg("600")
                .timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15));
    let ps = vm.exec(&ExecRequest::new("ps")).await.unwrap().stdout_str();
    assert!(!ps.contains("sleep 600"), "{ps}");
    // Dropping an exec (a caller's own timeout, a cancelled task) kills the guest program too.
    let dropped = tokio::time::timeout(
        Duration::from_secs(2),
        vm.exec(&ExecRequest::new("sleep").arg("601")),
    )
    .await;
    assert!(dropped.is_err(), "sleep 601 cannot have finished");
    let mut gone = false;
    for _ in 0..50 {
        let ps = vm.exec(&ExecRequest::new("ps")).await.unwrap().stdout_str();
        if !ps.contains("sleep 601") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "the dropped exec's guest program still runs");

    // file copy round trip (3 MiB + a bit, several chunks)
    let data: Vec<u8> = (0..(3 * 1024 * 1024 + 12345u32))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = env.dir.path().join("in.bin");
    std::fs::write(&src, &data).unwrap();
    assert_eq!(
        vm.copy_to(&src, "/tmp/in.bin").await.unwrap(),
        data.len() as u64
    );
    let sum = vm
        .exec(&ExecRequest::new("sha256sum").arg("/tmp/in.bin"))
        .await
        .unwrap()
        .stdout_str();
    assert!(sum.starts_with(&sha256(&data)), "{sum}");
    let back = env.dir.path().join("out.bin");
    vm.copy_from("/tmp/in.bin", &back).await.unwrap();
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&data));
    let e = vm
        .copy_from("/no/such/file", env.dir.path().join("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(!env.dir.path().join("x").exists());

    // ssh through the forward with the pinned host key
    let cfg = vm
        .ssh_config(&SshOptions {
            identity_file: Some(guest().client_key()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(cfg.stanza.contains("StrictHostKeyChecking yes"));
    assert!(!cfg.stanza.contains("StrictHostKeyChecking no"));
    let kh = std::fs::read_to_string(&cfg.known_hosts).unwrap();
    assert!(
        kh.contains(guest().host_key().split_whitespace().nth(1).unwrap()),
        "{kh}"
    );
    let cfg_file = env.dir.path().join("ssh_config");
    std::fs::write(&cfg_file, &cfg.stanza).unwrap();
    let ssh = |file: &std::path::Path| {
        Command::new("ssh")
            .args([
                "-F",
                file.to_str().unwrap(),
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=20",
                &cfg.alias,
                "echo",
                "via-ssh",
            ])
            .output()
            .unwrap()
    };
    let out = ssh(&cfg_file);
    assert!(
        out.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-ssh\n");
    // A wrong pinned key must be refused.
    std::fs::write(
        &cfg.known_hosts,
        format!(
            "{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm4fE4vRrG4yWq2uEJ3Y1bW0bQf7V2k5mJ3d9dQ8Zx1\n",
            cfg.host_key_alias
        ),
    )
    .unwrap();
    let out = ssh(&cfg_file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Host key verification failed")
            || err.contains("HOST IDENTIFICATION HAS CHANGED"),
        "{err}"
    );

    // The ssh guest channel on a real guest sshd (dropbear, busybox sh): argv survives the
    // remote shell, and the host key pinned from the agent is the one checked.
    vm.ssh_config(&SshOptions::default()).await.unwrap();
    let via_ssh = vm
        .clone()
        .with_credentials(Credentials::user("root").identity_file(guest().client_key()))
        .with_guest_channel(GuestChannel::Ssh { port: 22 });
    let out = via_ssh
        .exec(
            &ExecRequest::new("printf")
                .args(["[%s]", "a b", "it's", "$(reboot)", ";exit 3"])
                .env("X", "y z")
                .cwd("/tmp"),
        )
        .await
        .unwrap();
    assert_eq!(
        (out.exit_code, out.stdout_str().as_str()),
        (Some(0), "[a b][it's][$(reboot)][;exit 3]")
    );
    let out = via_ssh
        .exec(&ExecRequest::new("sh").args(["-c", "exit 9"]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(9));

    // reset restarts the guest at once; readiness sees it come back
    let boot_id = || async {
        vm.exec(&ExecRequest::new("cat").arg("/proc/sys/kernel/random/boot_id"))
            .await
            .unwrap()
            .stdout_str()
    };
    let before = boot_id().await;
    vm.reset().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();
    assert_ne!(boot_id().await, before);

    // pause / resume
    vm.pause().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Paused);
    vm.resume().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Running);

    // graceful stop, then destroy removes everything
    assert_eq!(
        vm.stop(StopOptions {
            timeout: Duration::from_secs(60),
            force: false
        })
        .await
        .unwrap(),
        StopOutcome::Graceful
    );
    assert_eq!(
        vm.stop(StopOptions::default()).await.unwrap(),
        StopOutcome::AlreadyOff
    );
    vm.destroy().await.unwrap();
    assert!(matches!(
        env.client.vm(name).await.unwrap_err(),
        Error::NotFound { .. }
    ));
    assert_eq!(leases_of(&env.client, name), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_forward_add_and_remove() {
    let env = env().await;
    let name = "e2e-fwd";
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let mut spec = env.spec(name, "");
    spec.forwards.clear();
    let vm = env.client.define(spec).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();

    let f = vm
        .forward_add(&ForwardSpec::new("ssh2", 22).host_port(HostPort::Auto))
        .await
        .unwrap();
    let banner = |port: u16| -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut b = [0u8; 64];
        let n = s.read(&mut b)?;
        Ok(String::from_utf8_lossy(&b[..n]).into_owned())
    };
    assert!(banner(f.host_port).unwrap().starts_with("SSH-"));
    assert_eq!(vm.forwards().await.unwrap(), vec![f.clone()]);
    // duplicate label refused, nothing changes
    assert!(vm.forward_add(&ForwardSpec::new("ssh2", 22)).await.is_err());
    vm.forward_remove("ssh2").await.unwrap();
    assert!(vm.forwards().await.unwrap().is_empty());
    let gone = banner(f.host_port);
    assert!(gone.is_err() || gone.unwrap().is_empty());

    // a forward added while running survives a restart (it was persisted)
    let f = vm.forward_add(&ForwardSpec::new("ssh3", 22)).await.unwrap();
    vm.stop(StopOptions {
        timeout: Duration::from_secs(60),
        force: false,
    })
    .await
    .unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(&ready().probe(Probe::SshBanner { guest_port: 22 }))
        .await
        .unwrap();
    assert!(banner(f.host_port).unwrap().starts_with("SSH-"));
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_falls_back_to_power_off() {
    let env = env().await;
    let name = "e2e-stubborn";
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let vm = env
        .client
        .define(env.spec(name, "anyvm.ignore_shutdown=1"))
        .await
        .unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();
    let t = Instant::now();
    let outcome = vm
        .stop(StopOptions {
            timeout: Duration::from_secs(3),
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(outcome, StopOutcome::Forced);
    assert!(t.elapsed() >= Duration::from_secs(3));
    // The shutdown request must not block until libvirt's own call deadline (60 s): qemu-ga never
    // answers it. The bound is loose because destroying a TCG guest is slow under load.
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "forced stop took {:?}",
        t.elapsed()
    );
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_times_out_naming_the_probe_on_a_guest_without_agent() {
    let env = env().await;
    let name = "e2e-noagent";
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let vm = env
        .client
        .define(env.spec(name, "anyvm.noagent=1"))
        .await
        .unwrap();
    vm.start().await.unwrap();
    let t = Instant::now();
    let e = vm
        .wait_ready(&ReadySpec::default().timeout(Duration::from_secs(8)))
        .await
        .unwrap_err();
    let el = t.elapsed();
    assert!(
        el >= Duration::from_secs(8) && el < Duration::from_secs(14),
        "{el:?}"
    );
    match &e {
        Error::NotReady {
            probe, last_error, ..
        } => {
            assert_eq!(probe, "agent");
            assert!(last_error.contains("agent"), "{last_error}");
        }
        other => panic!("expected NotReady, got {other}"),
    }
    assert!(
        e.to_string().contains("vm 'e2e-noagent': wait_ready"),
        "{e}"
    );
    // ssh comes up even without the agent: an `any` spec passes
    vm.wait_ready(
        &ReadySpec::empty()
            .probe(Probe::Agent)
            .probe(Probe::SshBanner { guest_port: 22 })
            .any()
            .timeout(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    // A VM that stops while someone waits fails the wait at once.
    let vm2 = vm.clone();
    let waiter = tokio::spawn(async move {
        vm2.wait_ready(&ReadySpec::default().timeout(Duration::from_secs(60)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    vm.power_off().await.unwrap();
    let e = waiter.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_brings_back_disk_data_and_clone_boots_beside_base() {
    let env = env().await;
    let (name, clone_name) = ("e2e-snap", "e2e-snap-clone");
    env.fresh(clone_name).await;
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let _c2 = Cleanup::new(&env.client, clone_name);
    let vm = env.client.define(env.spec(name, "")).await.unwrap();
    let write = |text: &'static str| {
        ExecRequest::new("sh").args([
            "-c",
            "printf '%s' \"$1\" | dd of=/dev/vda bs=512 conv=notrunc,fsync 2>/dev/null",
            "sh",
            text,
        ])
    };
    let read = ExecRequest::new("sh").args(["-c", "head -c 8 /dev/vda"]);

    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();
    assert!(vm.exec(&write("BEFORE-1")).await.unwrap().success());
    vm.stop(StopOptions::default()).await.unwrap();
    vm.snapshot_take("s1", "clean state").await.unwrap();
    let snaps = vm.snapshots().await.unwrap();
    assert_eq!(
        snaps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s1"]
    );

    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();
    assert!(vm.exec(&write("AFTER--2")).await.unwrap().success());
    assert_eq!(vm.exec(&read).await.unwrap().stdout, b"AFTER--2");
    vm.stop(StopOptions::default()).await.unwrap();

    vm.snapshot_restore("s1").await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();
    assert_eq!(vm.exec(&read).await.unwrap().stdout, b"BEFORE-1");
    assert!(matches!(
        vm.snapshot_restore("nope").await.unwrap_err(),
        Error::NotFound { .. }
    ));

    // Linked clone from the snapshot boots beside its running base, with its own ports.
    let clone = vm
        .clone_linked(&VmName::new(clone_name).unwrap(), Some("s1"))
        .await
        .unwrap();
    let spec = clone.spec().await.unwrap().unwrap();
    assert!(spec.disks[0].owned);
    let overlay = spec.disks[0].path.clone();
    let info = Command::new("qemu-img")
        .args(["info", "-U", overlay.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("backing file"),
        "not a linked clone"
    );
    clone.start().await.unwrap();
    clone
        .wait_ready(&ready().probe(Probe::SshBanner { guest_port: 22 }))
        .await
        .unwrap();
    assert_eq!(clone.exec(&read).await.unwrap().stdout, b"BEFORE-1");
    assert_ne!(
        clone.forwards().await.unwrap()[0].host_port,
        vm.forwards().await.unwrap()[0].host_port
    );
    // writes to the clone do not reach the base
    assert!(clone.exec(&write("CLONE--3")).await.unwrap().success());
    assert_eq!(vm.exec(&read).await.unwrap().stdout, b"BEFORE-1");

    // The clone graph: the base and its snapshot cannot go while the clone needs them.
    let images = env.client.options().state_dir.join("images");
    let frozen = |base: &str| -> Vec<String> {
        std::fs::read_dir(&images)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with(&format!("{base}+")) && f.ends_with(".base.qcow2"))
            .collect()
    };
    assert_eq!(frozen(name).len(), 1, "one frozen base for s1");
    let e = vm.destroy().await.unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    assert!(e.to_string().contains(clone_name), "{e}");
    let e = vm.snapshot_delete("s1").await.unwrap_err();
    assert!(e.to_string().contains(clone_name), "{e}");
    assert_eq!(vm.state().await.unwrap(), VmState::Running);
    assert_eq!(clone.exec(&read).await.unwrap().stdout, b"CLONE--3");

    clone.destroy().await.unwrap();
    assert!(!overlay.exists(), "clone overlay left behind");
    assert_eq!(
        frozen(name).len(),
        1,
        "the frozen base stays for further clones"
    );

    vm.snapshot_delete("s1").await.unwrap();
    assert!(vm.snapshots().await.unwrap().is_empty());
    assert!(
        frozen(name).is_empty(),
        "frozen base of the deleted snapshot left behind"
    );

    // A clone of a clone of the stopped base; the whole tree goes with --with-clones.
    vm.stop(StopOptions::default()).await.unwrap();
    let c1 = vm
        .clone_linked(&VmName::new(clone_name).unwrap(), None)
        .await
        .unwrap();
    let grand = format!("{clone_name}-2");
    let _c3 = Cleanup::new(&env.client, &grand);
    let c2 = c1
        .clone_linked(&VmName::new(&grand).unwrap(), None)
        .await
        .unwrap();
    assert_eq!(
        vm.dependants(None).await.unwrap(),
        vec![grand.clone(), clone_name.to_string()]
    );
    let c2_disk = c2.spec().await.unwrap().unwrap().disks[0].path.clone();
    vm.destroy_with(anyvm::DestroyOptions::default().with_clones(true))
        .await
        .unwrap();
    for n in [name, clone_name, grand.as_str()] {
        assert!(env.client.vm(n).await.is_err(), "{n} still defined");
        assert!(
            frozen(n).is_empty(),
            "frozen bases of {n} left: {:?}",
            frozen(n)
        );
    }
    assert!(!c2_disk.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_clear_errors_and_changes_nothing() {
    let env = env().await;
    for bad in ["a;rm -rf /", "-x", "a/b", "", "$(id)"] {
        let e = env.client.vm(bad).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{bad:?}: {e}");
    }
    let e = env.client.vm("no-such-vm-anyvm").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }));
    assert!(e.to_string().contains("vm 'no-such-vm-anyvm'"), "{e}");
    // A spec whose kernel is missing is refused before anything is defined or leased.
    let mut spec = env.spec("e2e-bad", "");
    spec.boot = anyvm::Boot::Kernel {
        kernel: "/nonexistent/vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    };
    let e = env.client.define(spec).await.unwrap_err();
    assert!(e.to_string().contains("/nonexistent/vmlinuz"), "{e}");
    assert_eq!(leases_of(&env.client, "e2e-bad"), 0);
    assert!(!env
        .client
        .list()
        .await
        .unwrap()
        .iter()
        .any(|v| v.name == "e2e-bad"));
    // Bad config names the file and key.
    let p = env.dir.path().join("anyvm.toml");
    let mut f = std::fs::File::create(&p).unwrap();
    writeln!(
        f,
        "[machines.x]\nkernel = \"/k\"\nforwards = [{{ name = \"ssh\", guest_port = 99999 }}]"
    )
    .unwrap();
    let e = anyvm::Config::load(&p).unwrap_err().to_string();
    assert!(
        e.contains(p.to_str().unwrap()) && e.contains("machines.x.forwards[0].guest_port"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_state_keeps_guest_memory() {
    let env = env().await;
    let name = "e2e-save";
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let vm = env.client.define(env.spec(name, "")).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();
    // /run is a tmpfs: the marker survives only if memory is saved and restored.
    let marker = ExecRequest::new("sh").args(["-c", "echo $$ > /run/marker; cat /run/marker"]);
    let pid = vm.exec(&marker).await.unwrap().stdout_str();
    vm.save_state().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Saved);
    assert_eq!(
        vm.stop(StopOptions::default()).await.unwrap(),
        StopOutcome::AlreadyOff
    );
    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();
    let again = vm
        .exec(&ExecRequest::new("cat").arg("/run/marker"))
        .await
        .unwrap()
        .stdout_str();
    assert_eq!(again, pid);
    vm.destroy().await.unwrap();
}

/// A guest program's pids whose command line contains `needle` (none of ps itself).
async fn guest_pids(vm: &anyvm::Vm, needle: &str) -> Vec<String> {
    let ps = vm
        .exec(&ExecRequest::new("ps").arg("-o").arg("pid,args"))
        .await
        .unwrap()
        .stdout_str();
    ps.lines()
        .filter(|l| l.contains(needle) && !l.contains("ps -o"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stream_copy_progress_and_events_on_the_agent() {
    use anyvm::OutputStream;
    let env = env().await;
    let name = "e2e-stream";
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let mut events = env.client.events();
    let vm = env.client.define(env.spec(name, "")).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();

    // Output is read while the program runs: the first line long before it exits.
    let t = Instant::now();
    let mut s = vm
        .exec_stream(
            &ExecRequest::new("sh")
                .args(["-c", "echo one; sleep 3; echo two; echo oops >&2; exit 6"]),
        )
        .await
        .unwrap();
    let first = s.next().await.unwrap();
    let first_at = t.elapsed();
    assert_eq!(
        (first.stream, first.data.as_slice()),
        (OutputStream::Stdout, &b"one\n"[..])
    );
    let out = s.wait().await.unwrap();
    assert!(
        t.elapsed() >= first_at + Duration::from_secs(2),
        "first chunk at {first_at:?}, end at {:?}",
        t.elapsed()
    );
    assert_eq!(out.exit_code, Some(6));
    assert_eq!(
        (out.stdout_str().as_str(), out.stderr_str().as_str()),
        ("two\n", "oops\n")
    );

    // stdin, env and cwd as in a buffered exec; a metacharacter cwd is only a directory name.
    let out = vm
        .exec_stream(
            &ExecRequest::new("sh")
                .args(["-c", "cat; echo \"$G\"; pwd"])
                .stdin(b"in\n".to_vec())
                .env("G", "hi there")
                .cwd("/tmp"),
        )
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "in\nhi there\n/tmp\n");
    let out = vm
        .exec_stream(&ExecRequest::new("true").cwd("/nonexistent;touch /tmp/pwned2"))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(127));

    // 1 MiB through the tailed files, byte for byte, chunk by chunk.
    let mut s = vm
        .exec_stream(&ExecRequest::new("sh").args([
            "-c",
            "head -c 1048576 /dev/urandom | tee /tmp/big-s; sha256sum /tmp/big-s >&2",
        ]))
        .await
        .unwrap();
    let mut data = Vec::new();
    let mut err = Vec::new();
    while let Some(c) = s.next().await {
        match c.stream {
            OutputStream::Stdout => data.extend_from_slice(&c.data),
            OutputStream::Stderr => err.extend_from_slice(&c.data),
        }
    }
    assert_eq!(s.wait().await.unwrap().exit_code, Some(0));
    assert_eq!(data.len(), 1 << 20);
    let guest_sum = String::from_utf8_lossy(&err)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(sha256(&data), guest_sum);

    // A streamed exec past its timeout is killed and reported.
    let t = Instant::now();
    let e = vm
        .exec_stream(
            &ExecRequest::new("sleep")
                .arg("602")
                .timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15));

    // Dropping the stream kills the program and removes its output files in the guest.
    let mut s = vm
        .exec_stream(&ExecRequest::new("sh").args(["-c", "echo up; exec sleep 603"]))
        .await
        .unwrap();
    assert_eq!(s.next().await.unwrap().data, b"up\n");
    assert_eq!(guest_pids(&vm, "sleep 603").await.len(), 1);
    drop(s);
    let (mut left, mut dirs) = (Vec::new(), String::new());
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = guest_pids(&vm, "sleep 60").await;
        dirs = vm
            .exec(&ExecRequest::new("sh").args(["-c", "ls -d /tmp/anyvm-exec.* 2>/dev/null"]))
            .await
            .unwrap()
            .stdout_str();
        if left.is_empty() && dirs.trim().is_empty() {
            break;
        }
    }
    assert!(left.is_empty(), "guest programs left: {left:?}");
    assert!(dirs.trim().is_empty(), "output dirs left: {dirs}");

    // Over the ssh channel: output streams as sshd sends it, and a dropped exec kills the
    // guest program (its session's watcher ends the process group).
    vm.wait_ready(&ready().probe(Probe::SshBanner { guest_port: 22 }))
        .await
        .unwrap();
    let via_ssh = vm
        .clone()
        .with_credentials(Credentials::user("root").identity_file(guest().client_key()))
        .with_guest_channel(GuestChannel::Ssh { port: 22 });
    let t = Instant::now();
    let mut s = via_ssh
        .exec_stream(&ExecRequest::new("sh").args(["-c", "echo one; sleep 2; echo two; exit 3"]))
        .await
        .unwrap();
    assert_eq!(s.next().await.unwrap().data, b"one\n");
    let first_at = t.elapsed();
    let out = s.wait().await.unwrap();
    assert!(t.elapsed() >= first_at + Duration::from_millis(1500));
    assert_eq!(
        (out.exit_code, out.stdout_str().as_str()),
        (Some(3), "two\n")
    );
    let mut s = via_ssh
        .exec_stream(&ExecRequest::new("sh").args(["-c", "echo up; exec sleep 609"]))
        .await
        .unwrap();
    assert_eq!(s.next().await.unwrap().data, b"up\n");
    // The program, and the session's shell and watcher (their argv names it too).
    assert!(!guest_pids(&vm, "sleep 609").await.is_empty());
    drop(s);
    let mut left = vec![String::new()];
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = guest_pids(&vm, "sleep 609").await;
        if left.is_empty() {
            break;
        }
    }
    assert!(
        left.is_empty(),
        "the ssh exec's program survived the drop: {left:?}"
    );

    // Copies through the agent report every chunk, in order, to the caller.
    let src = env.dir.path().join("progress.bin");
    std::fs::write(&src, vec![3u8; 1 << 20]).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    vm.copy_to_with(&src, "/tmp/progress.bin", move |d, t| {
        s2.lock().unwrap().push((d, t))
    })
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 3, "{} reports", seen.len());
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert_eq!(seen.last(), Some(&(1 << 20, Some(1 << 20))));
    let back = env.dir.path().join("progress.back");
    let n = vm
        .copy_from_with("/tmp/progress.bin", &back, |_, _| {})
        .await
        .unwrap();
    assert_eq!(n, 1 << 20);

    // libvirt's own events reach the client's stream: defined, started, the agent, stopped,
    // undefined.
    vm.destroy().await.unwrap();
    let mut kinds = Vec::new();
    let mut copy_ends = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !kinds.contains(&anyvm::VmEventKind::Undefined) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), events.next()).await {
            Ok(Some(anyvm::Event::Vm(v))) if v.vm == name => kinds.push(v.kind),
            Ok(Some(anyvm::Event::Copy(c))) if c.finished && c.vm == name => copy_ends += 1,
            _ => {}
        }
    }
    use anyvm::VmEventKind::*;
    for k in [Defined, Started, AgentConnected, Stopped, Undefined] {
        assert!(kinds.contains(&k), "{k:?} missing from {kinds:?}");
    }
    let pos = |k| kinds.iter().position(|x| *x == k).unwrap();
    assert!(
        pos(Defined) < pos(Started) && pos(Started) < pos(Stopped) && pos(Stopped) < pos(Undefined),
        "{kinds:?}"
    );
    assert_eq!(copy_ends, 2);
}

/// Overlay disks anyvm made for `vm` in the libvirt images directory (under the state dir).
fn overlays_of(vm: &str) -> Vec<String> {
    let dir = shared_state().join("images");
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with(&format!("{vm}-")) && f.ends_with(".qcow2"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_or_define_dropped_at_any_point_leaves_all_or_nothing() {
    let env = env().await;
    let base_name = "e2e-drop-base";
    env.fresh(base_name).await;
    let _c = Cleanup::new(&env.client, base_name);
    let base = env.client.define(env.spec(base_name, "")).await.unwrap();
    // Drop the clone's future after growing delays, from before the disks exist to after
    // the VM is defined: afterwards either the whole clone is there, or nothing of it.
    let (mut whole, mut none) = (0, 0);
    for (i, ms) in [0u64, 2, 10, 30, 80, 200, 500, 1500, 4000]
        .iter()
        .enumerate()
    {
        let name = format!("e2e-drop-c{i}");
        env.fresh(&name).await;
        let r = tokio::time::timeout(
            Duration::from_millis(*ms),
            base.clone_linked(&VmName::new(&name).unwrap(), None),
        )
        .await;
        // A clone finished for a caller that left is removed in the background.
        let mut exists = false;
        for _ in 0..100 {
            anyvm::wait_for_cleanups(Duration::from_secs(5));
            exists = env.client.vm(&name).await.is_ok();
            if r.is_ok()
                || (!exists && overlays_of(&name).is_empty() && leases_of(&env.client, &name) == 0)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match r {
            Ok(res) => {
                let vm = res.unwrap();
                assert!(exists);
                assert_eq!(overlays_of(&name).len(), 1);
                assert_eq!(leases_of(&env.client, &name), 1);
                vm.destroy().await.unwrap();
                whole += 1;
            }
            Err(_) => {
                assert!(
                    !exists,
                    "{name}: a clone dropped after {ms} ms is still defined"
                );
                assert!(
                    overlays_of(&name).is_empty(),
                    "{name}: disks left: {:?}",
                    overlays_of(&name)
                );
                assert_eq!(leases_of(&env.client, &name), 0, "{name}: leases left");
                none += 1;
            }
        }
        assert!(overlays_of(&name).is_empty());
    }
    assert!(
        whole > 0 && none > 0,
        "every attempt ended the same way: {whole} whole, {none} none"
    );

    // The same for a define. A define can finish within a millisecond on a fast host, so
    // the first attempt is dropped right after its first poll (before any libvirt reply can
    // arrive); a later one may finish and must then be whole.
    let mut dropped = 0;
    for (i, ms) in [0u64, 1, 5].iter().enumerate() {
        let name = format!("e2e-drop-def{i}");
        env.fresh(&name).await;
        let r = tokio::time::timeout(
            Duration::from_millis(*ms),
            env.client.define(env.spec(&name, "")),
        )
        .await;
        match r {
            Ok(res) => {
                let vm = res.unwrap();
                assert_eq!(leases_of(&env.client, &name), 1);
                vm.destroy().await.unwrap();
            }
            Err(_) => {
                dropped += 1;
                let mut gone = false;
                for _ in 0..100 {
                    anyvm::wait_for_cleanups(Duration::from_secs(5));
                    if env.client.vm(&name).await.is_err() && leases_of(&env.client, &name) == 0 {
                        gone = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                assert!(
                    gone,
                    "{name}: a define dropped after {ms} ms left its VM or leases"
                );
            }
        }
    }
    assert!(dropped > 0, "no define was dropped before it finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_clones_start_from_one_saved_state_as_machines_of_their_own() {
    let env = env().await;
    let tmpl = "e2e-warm-tmpl";
    env.fresh(tmpl).await;
    let _c = Cleanup::new(&env.client, tmpl);
    let t = env.client.define(env.spec(tmpl, "")).await.unwrap();
    let info = t.warm(&ready()).await.unwrap();
    assert!(info.memory_bytes > 0 && info.disk_bytes > 0, "{info:?}");
    // Made once: asked again, the same state.
    assert_eq!(t.warm(&ready()).await.unwrap().key, info.key);

    let mut clones = Vec::new();
    for i in 0..2 {
        let name = format!("e2e-warm-c{i}");
        env.fresh(&name).await;
        let started = Instant::now();
        let vm = t
            .clone_warm(&VmName::new(&name).unwrap(), &ready())
            .await
            .unwrap();
        eprintln!(
            "warm clone {name} ready in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        clones.push(vm);
    }
    // Each runs beside the other, with its own randomness, forward and a clock set to the host's.
    let probe = ExecRequest::new("sh").args([
        "-c",
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/uuid; date +%s",
    ]);
    let mut seen = Vec::new();
    for vm in &clones {
        let out = vm.exec(&probe).await.unwrap();
        let text = out.stdout_str();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let guest_now: i64 = lines[2].trim().parse().unwrap();
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (guest_now - host_now).abs() <= 2,
            "guest clock {guest_now}, host {host_now}"
        );
        seen.push((lines[0].to_string(), lines[1].to_string()));
        assert_eq!(vm.state().await.unwrap(), VmState::Running);
    }
    assert_ne!(
        seen[0].0, seen[1].0,
        "two warm clones read the same /dev/urandom bytes"
    );
    assert_ne!(seen[0].1, seen[1].1, "two warm clones made the same uuid");
    let ports: Vec<u16> = {
        let mut v = Vec::new();
        for vm in &clones {
            v.extend(vm.forwards().await.unwrap().iter().map(|f| f.host_port));
        }
        v
    };
    assert_eq!(ports.len(), 2);
    assert_ne!(ports[0], ports[1]);
    // The template cannot go while clones live on its state; they go, then it can.
    assert!(t.destroy().await.is_err());
    for vm in clones {
        let name = vm.name().to_string();
        vm.destroy().await.unwrap();
        assert!(overlays_of(&name).is_empty());
        assert_eq!(leases_of(&env.client, &name), 0);
    }
    t.destroy().await.unwrap();
    assert!(!info.dir.exists(), "the warm state outlived its template");
}
