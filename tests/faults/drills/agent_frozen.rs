//! The guest agent frozen (SIGSTOP to qemu-ga inside the guest, sent over ssh): exec and a
//! readiness wait fail with a typed error within their bounds instead of hanging; once the
//! agent runs again (SIGCONT), exec works.

use std::time::{Duration, Instant};

use anyvm::{Credentials, ErrorKind, ExecRequest, GuestChannel, Probe, ReadySpec};

use crate::common::{env, guest, Cleanup};
use crate::Tally;

/// libvirt's default agent timeout (10 s) plus anyvm's 2 s around the call, plus 1 s.
const EXEC_BOUND: Duration = Duration::from_secs(13);

/// The drill.
pub async fn frozen() -> Tally {
    let mut t = Tally::default();
    let env = env().await;
    let name = "fault-agent";
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let vm = env.client.define(env.spec(name, "")).await.unwrap();
    vm.start().await.unwrap();
    let ready = ReadySpec::default()
        .probe(Probe::SshBanner { guest_port: 22 })
        .timeout(Duration::from_secs(120));
    if let Err(e) = vm.wait_ready(&ready).await {
        t.trial("boot", Err(e.to_string()));
        return t;
    }
    let ssh = vm
        .clone()
        .with_credentials(Credentials::user("root").identity_file(guest().client_key()))
        .with_guest_channel(GuestChannel::Ssh { port: 22 });
    let signal = |sig: &'static str| {
        let ssh = ssh.clone();
        async move {
            ssh.exec(
                &ExecRequest::new("sh")
                    .args(["-c", &format!("kill -{sig} $(cat /run/qemu-ga.pid)")]),
            )
            .await
            .map_err(|e| e.to_string())
            .and_then(|o| {
                if o.success() {
                    Ok(())
                } else {
                    Err(o.stderr_str())
                }
            })
        }
    };
    if let Err(e) = signal("STOP").await {
        t.trial("freeze qemu-ga", Err(e));
        return t;
    }
    let started = Instant::now();
    let r = vm.exec(&ExecRequest::new("true")).await;
    let took = started.elapsed();
    t.trial(
        &format!(
            "exec with the agent frozen (error after {:.1} s)",
            took.as_secs_f64()
        ),
        match r {
            Err(e)
                if matches!(e.kind(), ErrorKind::Timeout | ErrorKind::NotReady)
                    && took <= EXEC_BOUND
                    && e.to_string().contains(name) =>
            {
                Ok(())
            }
            Err(e) => Err(format!("after {took:?}: {e}")),
            Ok(_) => Err("ran with the agent frozen".into()),
        },
    );
    let started = Instant::now();
    let r = vm
        .wait_ready(&ReadySpec::default().timeout(Duration::from_secs(5)))
        .await;
    let took = started.elapsed();
    t.trial(
        &format!(
            "readiness with the agent frozen (error after {:.1} s)",
            took.as_secs_f64()
        ),
        match r {
            Err(e)
                if e.kind() == ErrorKind::NotReady
                    && took <= Duration::from_secs(5) + EXEC_BOUND =>
            {
                Ok(())
            }
            Err(e) => Err(format!("after {took:?}: {e}")),
            Ok(_) => Err("ready with the agent frozen".into()),
        },
    );
    if let Err(e) = signal("CONT").await {
        t.trial("thaw qemu-ga", Err(e));
        return t;
    }
    let mut back = Err(String::from("never tried"));
    for _ in 0..10 {
        back = vm
            .exec(&ExecRequest::new("true"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        if back.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    t.trial("exec once the agent runs again", back);
    let _ = vm.destroy().await;
    t
}
