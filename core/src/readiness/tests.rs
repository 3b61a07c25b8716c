use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backend::mock;
use crate::error::Error;

fn name() -> VmName {
    VmName::new("r1").unwrap()
}

#[tokio::test]
async fn agent_probe_retries_until_it_answers() {
    let mut b = mock();
    b.expect_subscribe().returning(|| None);
    b.expect_state().returning(|_| Ok(VmState::Running));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    b.expect_agent_ping().returning(move |vm, _| {
        if c.fetch_add(1, Ordering::SeqCst) < 3 {
            Err(Error::backend(
                Ctx::vm("agent ping", vm),
                "mock",
                "not connected",
            ))
        } else {
            Ok(())
        }
    });
    let rep = wait_ready(
        Arc::new(b),
        &name(),
        &ReadySpec::default().timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(rep.passed[0].0, "agent");
}

#[tokio::test]
async fn timeout_names_the_failing_probe_and_its_last_error() {
    let mut b = mock();
    b.expect_subscribe().returning(|| None);
    b.expect_state().returning(|_| Ok(VmState::Running));
    b.expect_agent_ping().returning(|_, _| Ok(()));
    b.expect_forwards().returning(|_| Ok(vec![]));
    let spec = ReadySpec::default()
        .probe(Probe::Tcp { guest_port: 22 })
        .timeout(Duration::from_millis(300));
    let e = wait_ready(Arc::new(b), &name(), &spec).await.unwrap_err();
    match e {
        Error::NotReady {
            probe, last_error, ..
        } => {
            assert_eq!(probe, "tcp:22");
            assert!(
                last_error.contains("no TCP forward to guest port 22"),
                "{last_error}"
            );
        }
        e => panic!("{e}"),
    }
}

#[tokio::test]
async fn any_mode_passes_on_the_first_probe() {
    let mut b = mock();
    b.expect_subscribe().returning(|| None);
    b.expect_state().returning(|_| Ok(VmState::Running));
    b.expect_agent_ping()
        .returning(|vm, _| Err(Error::backend(Ctx::vm("p", vm), "mock", "down")));
    b.expect_exec().returning(|_, _| {
        Ok(crate::types::ExecOutput {
            exit_code: Some(0),
            signal: None,
            stdout: vec![],
            stderr: vec![],
            duration: Duration::ZERO,
            stdout_truncated: false,
            stderr_truncated: false,
        })
    });
    let spec = ReadySpec::empty()
        .probe(Probe::Agent)
        .probe(Probe::Command {
            argv: vec!["true".into()],
        })
        .any()
        .timeout(Duration::from_secs(5));
    let rep = wait_ready(Arc::new(b), &name(), &spec).await.unwrap();
    assert_eq!(rep.passed.len(), 1);
    assert_eq!(rep.passed[0].0, "command:[\"true\"]");
}

#[tokio::test]
async fn a_vm_that_stops_fails_the_wait_at_once() {
    let mut b = mock();
    b.expect_subscribe().returning(|| None);
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    b.expect_state().returning(move |_| {
        Ok(if c.fetch_add(1, Ordering::SeqCst) == 0 {
            VmState::Running
        } else {
            VmState::ShutOff
        })
    });
    b.expect_agent_ping()
        .returning(|vm, _| Err(Error::backend(Ctx::vm("p", vm), "mock", "down")));
    let t = std::time::Instant::now();
    let e = wait_ready(
        Arc::new(b),
        &name(),
        &ReadySpec::default().timeout(Duration::from_secs(30)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Error::InvalidState { ref state, .. } if state == "shut off"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn refuses_a_vm_that_is_not_running_and_bad_specs() {
    let mut b = mock();
    b.expect_subscribe().returning(|| None);
    b.expect_state().returning(|_| Ok(VmState::ShutOff));
    let b = Arc::new(b);
    let e = wait_ready(b.clone(), &name(), &ReadySpec::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("start it first"), "{e}");
    let e = wait_ready(b, &name(), &ReadySpec::empty())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }));
}

#[test]
fn probe_text_round_trips_and_is_what_every_surface_reads() {
    let probes = [
        Probe::Agent,
        Probe::Tcp { guest_port: 22 },
        Probe::SshBanner { guest_port: 2222 },
        Probe::Command {
            argv: vec!["sh".into(), "-c".into(), "test -e \"/run/a b\"".into()],
        },
    ];
    for p in &probes {
        let text = p.to_string();
        assert_eq!(&text.parse::<Probe>().unwrap(), p, "{text}");
        // The same text in TOML and JSON (how specs travel to Python and C).
        let toml_text = format!("probes = [{}]", toml::Value::String(text.clone()));
        #[derive(serde::Deserialize)]
        struct T {
            probes: Vec<Probe>,
        }
        let t: T = toml::from_str(&toml_text).unwrap();
        assert_eq!(&t.probes[0], p);
        let json = serde_json::to_string(p).unwrap();
        assert_eq!(&serde_json::from_str::<Probe>(&json).unwrap(), p, "{json}");
    }
    assert_eq!(
        "command:systemctl is-active sshd".parse::<Probe>().unwrap(),
        Probe::Command {
            argv: vec!["systemctl".into(), "is-active".into(), "sshd".into()]
        }
    );
    assert_eq!(
        "ssh_banner:22".parse::<Probe>().unwrap(),
        Probe::SshBanner { guest_port: 22 }
    );
    for bad in [
        "",
        "psychic",
        "tcp",
        "tcp:0",
        "tcp:70000",
        "ssh:x",
        "agent:1",
        "command:",
        "command:[1]",
        "command:[\"\"]",
    ] {
        let e = bad.parse::<Probe>().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{bad}: {e}");
        assert!(e.to_string().contains("probe"), "{e}");
    }
    // Older anyvm.toml files wrote tables; they still read.
    #[derive(serde::Deserialize)]
    struct T {
        probes: Vec<Probe>,
    }
    let t: T = toml::from_str(
        "probes = [{ kind = \"agent\" }, { kind = \"ssh_banner\", guest_port = 22 }, { kind = \"command\", argv = [\"true\"] }]",
    )
    .unwrap();
    assert_eq!(t.probes[1], Probe::SshBanner { guest_port: 22 });
    assert!(toml::from_str::<T>("probes = [{ kind = \"nope\" }]").is_err());
}
