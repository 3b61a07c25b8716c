//! Secrets: every operation that uses the guest password runs while every process's argv and
//! environment are sampled, and every log line (TRACE) and error message is kept: the password
//! must appear 0 times. VirtualBox gets it through a password file; VMware's vmrun only takes
//! it on its command line, so with `forbid_secrets_in_argv` those operations must be refused.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyvm::{Credentials, ErrorKind, ExecRequest, Probe, ReadySpec, Secret, SecretSource};

use super::{virtualbox_vm, vmware_vm, FakeVm};
use crate::Tally;

const PASSWORD: &str = "Drill-pw-7f3a9c";

/// Log lines written during the drill.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads every process's argv and environment until stopped; counts password sightings.
fn sampler(stop: Arc<AtomicBool>, seen: Arc<AtomicU32>, samples: Arc<AtomicU32>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(d) = std::fs::read_dir("/proc") {
            for e in d.flatten() {
                let p = e.path();
                for f in ["cmdline", "environ"] {
                    if let Ok(b) = std::fs::read(p.join(f)) {
                        if contains(&b, PASSWORD.as_bytes()) {
                            seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        samples.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn creds(pw: &str) -> Credentials {
    Credentials::user("mc").password(SecretSource::Value(Secret::new(pw)))
}

/// The drill.
pub async fn sampled() -> Tally {
    let lines = Lines::default();
    let l2 = lines.clone();
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || l2.clone())
        .try_init();
    let (stop, seen, samples) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
    );
    let th = {
        let (a, b, c) = (stop.clone(), seen.clone(), samples.clone());
        std::thread::spawn(move || sampler(a, b, c))
    };
    let mut t = Tally::default();
    let mut messages = String::new();
    virtualbox(&mut t, &mut messages).await;
    vmware(&mut t, &mut messages).await;
    stop.store(true, Ordering::Relaxed);
    th.join().unwrap();
    let in_procs = seen.load(Ordering::Relaxed);
    let logs = lines.0.lock().unwrap().clone();
    let in_logs = contains(&logs, PASSWORD.as_bytes());
    let in_errors = messages.contains(PASSWORD);
    t.trial(
        &format!(
            "argv and environment ({} samples)",
            samples.load(Ordering::Relaxed)
        ),
        if in_procs == 0 {
            Ok(())
        } else {
            Err(format!("the password was seen {in_procs} times"))
        },
    );
    t.trial(
        &format!("log lines ({} bytes at TRACE)", logs.len()),
        if in_logs {
            Err("the password is in the log".into())
        } else {
            Ok(())
        },
    );
    t.trial(
        "error messages",
        if in_errors {
            Err("the password is in an error message".into())
        } else {
            Ok(())
        },
    );
    t
}

async fn virtualbox(t: &mut Tally, messages: &mut String) {
    let faults = format!(r#"{{"guest_password": "{PASSWORD}"}}"#);
    let FakeVm { dir, home, vm, .. } =
        virtualbox_vm("secret-vb", 48800..=48899, &faults, |_| {}).await;
    let vm = vm.with_credentials(creds(PASSWORD));
    vm.start().await.unwrap();
    let ready = ReadySpec::default()
        .probe(Probe::Command {
            argv: vec!["true".into()],
        })
        .timeout(Duration::from_secs(20));
    t.trial(
        "VirtualBox wait_ready with a command probe",
        vm.wait_ready(&ready)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    );
    let r = vm
        .exec(&ExecRequest::new("/bin/sh").args(["-c", "sleep 0.3; echo ok"]))
        .await;
    t.trial("VirtualBox exec", r.map(|_| ()).map_err(|e| e.to_string()));
    let mut s = vm
        .exec_stream(&ExecRequest::new("/bin/sh").args(["-c", "echo a; sleep 0.3"]))
        .await
        .unwrap();
    while s.next().await.is_some() {}
    t.trial(
        "VirtualBox streamed exec",
        s.wait().await.map(|_| ()).map_err(|e| e.to_string()),
    );
    let src = dir.path().join("f");
    std::fs::write(&src, b"x").unwrap();
    let g = dir.path().join("g").display().to_string();
    t.trial(
        "VirtualBox copy to",
        vm.copy_to(&src, &g)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    );
    t.trial(
        "VirtualBox copy from",
        vm.copy_from(&g, dir.path().join("back"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    );
    // A wrong password: the error names the failure, not the password tried.
    let wrong = vm
        .clone()
        .with_credentials(creds(&format!("{PASSWORD}-wrong")));
    match wrong.exec(&ExecRequest::new("true")).await {
        Err(e) if e.kind() == ErrorKind::Auth => {
            messages.push_str(&e.to_string());
            t.trial("VirtualBox wrong password: Auth", Ok(()));
        }
        other => t.trial("VirtualBox wrong password: Auth", Err(format!("{other:?}"))),
    }
    let calls = std::fs::read_to_string(home.join("calls.log")).unwrap_or_default();
    messages.push_str(&calls);
    let _ = vm.destroy().await;
}

async fn vmware(t: &mut Tally, messages: &mut String) {
    let faults = format!(r#"{{"guest_password": "{PASSWORD}"}}"#);
    let FakeVm { dir, home, vm, .. } = vmware_vm("secret-vw", 48900..=48999, &faults, |o| {
        o.forbid_secrets_in_argv = true;
    })
    .await;
    let vm = vm.with_credentials(creds(PASSWORD));
    vm.start().await.unwrap();
    let src = dir.path().join("f");
    std::fs::write(&src, b"x").unwrap();
    let g = dir.path().join("g").display().to_string();
    let refused = |r: anyvm::Result<()>, messages: &mut String| match r {
        Err(e) if e.kind() == ErrorKind::PolicyDenied => {
            messages.push_str(&e.to_string());
            Ok(())
        }
        other => Err(format!("not refused: {other:?}")),
    };
    let r = vm.exec(&ExecRequest::new("/bin/true")).await.map(|_| ());
    t.trial("VMware exec refused (vmrun -gp)", refused(r, messages));
    let r = vm.copy_to(&src, &g).await.map(|_| ());
    t.trial("VMware copy refused (vmrun -gp)", refused(r, messages));
    let calls = std::fs::read_to_string(home.join("calls.log")).unwrap_or_default();
    messages.push_str(&calls);
    let _ = vm.destroy().await;
}
