//! libvirt through a `qemu+ssh://` URI: the local libvirtd reached through a real OpenSSH
//! server on loopback, as a remote hypervisor host would be. Domain calls go through libvirt's
//! ssh transport; clone overlays (qemu-img), disk clean-up and console logs through anyvm's own
//! ssh to the same host.

mod common;
#[path = "../support/sshd.rs"]
mod sshd;

use std::io::Read;
use std::time::Duration;

use anyvm::job::{run_job, Cancel, JobSpec, Outcome};
use anyvm::{Client, ClientOptions, ExecRequest, ForwardSpec, ReadySpec, VmName, VmState};
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn remote_libvirt_over_ssh() {
    let local = env().await;
    let sshd = sshd::Sshd::start();
    let remote_dir = tempfile::Builder::new()
        .prefix("anyvm-remote-host-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let uri = format!(
        "libvirt:qemu+ssh://{}@127.0.0.1:{}/system?keyfile={}&no_verify=1&no_tty=1",
        sshd.user,
        sshd.port,
        sshd.client_key.display()
    );
    let state = local.dir.path().join("state");
    let client = Client::connect_with(
        &uri,
        ClientOptions::default()
            .state_dir(&state)
            .port_range(49000..=49499)
            .remote_state_dir(remote_dir.path()),
    )
    .await
    .unwrap();
    assert!(client.backend().uri().contains("qemu+ssh://"));

    let name = "e2e-remote";
    let _c = Cleanup::new(&client, name);
    local.fresh(name).await;
    let mut spec = local.spec(name, "");
    // Reached from elsewhere: the forward listens on the remote host's every address.
    spec.forwards[0].host_addr = "0.0.0.0".into();
    let vm = client.define(spec).await.unwrap();
    assert!(client.list().await.unwrap().iter().any(|i| i.name == name));

    // Lifecycle, readiness through the agent and through the forward, exec, copy.
    vm.start().await.unwrap();
    let ready = ReadySpec::empty()
        .probe(anyvm::Probe::Agent)
        .probe(anyvm::Probe::SshBanner { guest_port: 22 })
        .timeout(Duration::from_secs(120));
    vm.wait_ready(&ready).await.unwrap();
    let out = vm.exec(&ExecRequest::new("uname").arg("-s")).await.unwrap();
    assert_eq!(out.stdout_str(), "Linux\n");
    let f = local.dir.path().join("blob");
    std::fs::write(&f, vec![42u8; 150_000]).unwrap();
    assert_eq!(vm.copy_to(&f, "/tmp/blob").await.unwrap(), 150_000);
    let back = local.dir.path().join("blob.back");
    vm.copy_from("/tmp/blob", &back).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), vec![42u8; 150_000]);

    // A forward added at run time answers with the guest's sshd.
    let fw = vm.forward_add(&ForwardSpec::new("ssh2", 22)).await.unwrap();
    let (host, port) = vm.ssh_endpoint(22).await.unwrap();
    assert_eq!(host, "127.0.0.1");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", fw.host_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"SSH-");
    assert_ne!(port, 0);
    vm.forward_remove("ssh2").await.unwrap();
    // One on the remote host's loopback cannot be reached from elsewhere: said, not hung on.
    vm.forward_add(&ForwardSpec::new("lo", 2222)).await.unwrap();
    let e = vm.ssh_endpoint(2222).await.unwrap_err();
    assert!(
        e.to_string().contains("loopback") && e.to_string().contains("0.0.0.0"),
        "{e}"
    );
    let r = vm
        .wait_ready(
            &ReadySpec::empty()
                .probe(anyvm::Probe::Tcp { guest_port: 2222 })
                .timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap_err();
    assert!(r.to_string().contains("loopback"), "{r}");
    vm.forward_remove("lo").await.unwrap();

    // Snapshots are libvirt calls.
    vm.snapshot_take("s1", "remote").await.unwrap();
    assert!(vm.snapshots().await.unwrap().iter().any(|s| s.name == "s1"));
    vm.snapshot_delete("s1").await.unwrap();
    vm.stop(anyvm::StopOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::ShutOff);

    // A linked clone: its overlay is made with qemu-img on the remote host, in its state dir.
    let clone_name = VmName::new("e2e-remote-clone").unwrap();
    let _cc = Cleanup::new(&client, clone_name.as_str());
    local.fresh(clone_name.as_str()).await;
    let clone = vm.clone_linked(&clone_name, None).await.unwrap();
    let overlay = clone.spec().await.unwrap().unwrap().disks[0].path.clone();
    assert!(
        overlay.starts_with(remote_dir.path().join("images")),
        "{overlay:?}"
    );
    assert!(overlay.exists());
    clone.start().await.unwrap();
    clone.wait_ready(&ReadySpec::default()).await.unwrap();
    let tail = clone.console_tail(4096).await.unwrap();
    assert!(!tail.is_empty(), "console log read on the remote host");
    clone.destroy().await.unwrap();
    assert!(!overlay.exists(), "clone disk removed on the remote host");

    // A whole job against the remote host.
    let spec = JobSpec::new(name, &["sh", "-c", "echo remote-job; hostname"])
        .unwrap()
        .input(&f, "/work/blob")
        .output("/work/blob", local.dir.path().join("job-out/blob"));
    let r = run_job(&client, &vm, &spec, &Cancel::new()).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    assert!(r.stdout_str().starts_with("remote-job\n"));
    assert!(!r.console_log.is_empty());
    assert_eq!(
        std::fs::read(local.dir.path().join("job-out/blob"))
            .unwrap()
            .len(),
        150_000
    );
    assert!(client
        .list()
        .await
        .unwrap()
        .iter()
        .all(|i| !i.name.starts_with("e2e-remote-")));
    vm.destroy().await.unwrap();
    assert!(client.vm(name).await.is_err());

    // An unreachable host is a prompt, typed error.
    let t0 = std::time::Instant::now();
    let e = Client::connect(&format!(
        "libvirt:qemu+ssh://{}@127.0.0.1:1/system?keyfile={}&no_verify=1&no_tty=1",
        sshd.user,
        sshd.client_key.display()
    ))
    .await
    .unwrap_err();
    assert_eq!(e.kind(), anyvm::ErrorKind::BackendUnavailable, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(30));
}
