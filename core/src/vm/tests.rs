use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backend::{mock, MockBackend};

fn vm_with(b: MockBackend, dir: &Path) -> Vm {
    let ports = PortAllocator::new(dir, 43000..=43999);
    Vm::new(
        VmName::new("f1").unwrap(),
        Arc::new(b),
        ports,
        dir.to_path_buf(),
        crate::events::EventBus::new(false),
    )
}

#[tokio::test]
async fn stop_powers_off_when_the_guest_ignores_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = mock();
    // A stop ends the VM's shared ssh logins, filed under the backend's URI.
    b.expect_uri().returning(|| "mock:".into());
    let off = Arc::new(AtomicBool::new(false));
    let o = off.clone();
    b.expect_state().returning(move |_| {
        Ok(if o.load(Ordering::SeqCst) {
            VmState::ShutOff
        } else {
            VmState::Running
        })
    });
    b.expect_subscribe().returning(|| None);
    b.expect_request_shutdown().times(1).returning(|_| Ok(()));
    let o = off.clone();
    b.expect_power_off().times(1).returning(move |_| {
        o.store(true, Ordering::SeqCst);
        Ok(())
    });
    let vm = vm_with(b, dir.path());
    let t = std::time::Instant::now();
    let r = vm
        .stop(StopOptions {
            timeout: Duration::from_millis(300),
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(r, StopOutcome::Forced);
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn stop_is_graceful_when_the_guest_complies() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = mock();
    // A stop ends the VM's shared ssh logins, filed under the backend's URI.
    b.expect_uri().returning(|| "mock:".into());
    let off = Arc::new(AtomicBool::new(false));
    let o = off.clone();
    b.expect_state().returning(move |_| {
        Ok(if o.load(Ordering::SeqCst) {
            VmState::ShutOff
        } else {
            VmState::Running
        })
    });
    b.expect_subscribe().returning(|| None);
    let o = off.clone();
    b.expect_request_shutdown().returning(move |_| {
        o.store(true, Ordering::SeqCst);
        Ok(())
    });
    b.expect_power_off().never();
    let vm = vm_with(b, dir.path());
    assert_eq!(
        vm.stop(StopOptions::default()).await.unwrap(),
        StopOutcome::Graceful
    );
}

#[tokio::test]
async fn forward_add_allocates_and_releases_on_backend_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = mock();
    b.expect_uri().returning(|| "mock:".into());
    b.expect_forwards().returning(|_| Ok(vec![]));
    b.expect_forward_add().returning(|vm, _| {
        Err(Error::backend(
            Ctx::vm("forward add", vm),
            "mock",
            "refused",
        ))
    });
    let vm = vm_with(b, dir.path());
    let e = vm
        .forward_add(&ForwardSpec::new("ssh", 22))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refused"));
    assert!(
        vm.ports.leases().unwrap().is_empty(),
        "lease must be given back"
    );
    // Bad input never reaches the backend.
    assert!(vm
        .forward_add(&ForwardSpec::new("bad name", 22))
        .await
        .is_err());
}

#[tokio::test]
async fn define_with_ports_resolves_auto_and_gives_leases_back_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let ports = PortAllocator::new(dir.path(), 43000..=43999);
    let mut b = mock();
    b.expect_uri().returning(|| "mock:".into());
    b.expect_define().times(1).returning(|spec| {
        assert!(spec
            .forwards
            .iter()
            .all(|f| matches!(f.host_port, HostPort::Fixed(_))));
        assert!(matches!(spec.console.vnc, Some(HostPort::Fixed(_))));
        Err(Error::backend(
            Ctx::vm("define", &spec.name),
            "mock",
            "disk missing",
        ))
    });
    let b: Arc<dyn Backend> = Arc::new(b);
    let mut spec = VmSpec::new(
        VmName::new("d1").unwrap(),
        crate::types::Boot::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    spec.forwards = vec![ForwardSpec::new("ssh", 22), ForwardSpec::new("rdp", 3389)];
    spec.console.vnc = Some(HostPort::Auto);
    assert!(define_with_ports(&b, &ports, spec).await.is_err());
    assert!(ports.leases().unwrap().is_empty());
}

#[tokio::test]
async fn exec_checked_turns_nonzero_exit_into_guest_command_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = mock();
    b.expect_exec().returning(|_, _| {
        Ok(ExecOutput {
            exit_code: Some(2),
            signal: None,
            stdout: vec![],
            stderr: b"no such file".to_vec(),
            duration: Duration::ZERO,
            stdout_truncated: false,
            stderr_truncated: false,
        })
    });
    let vm = vm_with(b, dir.path());
    let e = vm
        .exec_checked(&ExecRequest::new("ls").arg("/x"))
        .await
        .unwrap_err();
    match e {
        Error::GuestCommand {
            exit_code,
            ref stderr,
            ..
        } => {
            assert_eq!(exit_code, Some(2));
            assert_eq!(&stderr[..], b"no such file");
        }
        ref e => panic!("{e}"),
    }
    assert!(
        e.to_string()
            .contains("vm 'f1': exec: guest command 'ls' failed: exit code 2: no such file"),
        "{e}"
    );
    // Invalid requests and paths are refused before the backend sees them.
    assert!(vm.exec(&ExecRequest::new("")).await.is_err());
    assert!(vm
        .copy_from("relative/path", dir.path().join("x"))
        .await
        .is_err());
    assert!(vm.snapshot_take("bad;name", "").await.is_err());
}
