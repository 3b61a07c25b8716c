//! libvirtd restarted under a long-lived client: between calls, during an exec and during a
//! readiness wait. The client reconnects by itself and re-registers its event callbacks (a
//! later stop is still seen as an event and a later wait on the agent still works); an
//! in-flight call fails with a typed error or completes; the running guest is untouched.

use std::process::Command;
use std::time::{Duration, Instant};

use anyvm::{Event, ExecRequest, ReadySpec, VmEventKind, VmState};

use crate::common::{env, Cleanup};
use crate::Tally;

/// Stop libvirtd and start it again (recording its pid as scripts/setup-host.sh does), then
/// wait until it answers.
fn restart_libvirtd() -> Result<(), String> {
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
    for _ in 0..100 {
        let alive = Command::new("pgrep")
            .args(["-x", "libvirtd"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ok = Command::new("libvirtd")
        .arg("-d")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("libvirtd -d failed".into());
    }
    for _ in 0..100 {
        if let Ok(o) = Command::new("pgrep")
            .args(["-o", "-x", "libvirtd"])
            .output()
        {
            if o.status.success() {
                let _ = std::fs::write("/run/anyvm-libvirtd.pid", &o.stdout);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..100 {
        let up = Command::new("virsh")
            .args(["-c", "qemu:///system", "version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if up {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err("libvirtd did not answer within 20 s of its restart".into())
}

fn ready() -> ReadySpec {
    ReadySpec::default().timeout(Duration::from_secs(120))
}

/// The drill.
pub async fn restarted() -> Tally {
    let mut t = Tally::default();
    let env = env().await;
    let name = "fault-libvirtd";
    env.fresh(name).await;
    let _c = Cleanup::new(&env.client, name);
    let vm = env.client.define(env.spec(name, "")).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(&ready()).await.unwrap();

    // Between calls.
    let r = tokio::task::spawn_blocking(restart_libvirtd).await.unwrap();
    let started = Instant::now();
    let r = r.and(match vm.state().await {
        Ok(VmState::Running) => Ok(()),
        Ok(s) => Err(format!("the guest is {s} after the restart")),
        Err(e) => Err(format!("the first call after the restart failed: {e}")),
    });
    t.trial(
        &format!(
            "between calls (next call took {:.2} s)",
            started.elapsed().as_secs_f64()
        ),
        r,
    );

    // Events are registered again: a stop is seen, and a wait on the agent's event works.
    let mut events = env.client.events();
    let r: Result<(), String> = async {
        vm.power_off()
            .await
            .map_err(|e| format!("power off: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline.into(), events.next()).await {
                Ok(Some(Event::Vm(e))) if e.vm == name && e.kind == VmEventKind::Stopped => break,
                Ok(Some(_)) => {}
                _ => return Err("no stopped event after the restart".into()),
            }
        }
        vm.start().await.map_err(|e| format!("start: {e}"))?;
        vm.wait_ready(&ready())
            .await
            .map_err(|e| format!("wait_ready: {e}"))
            .map(|_| ())
    }
    .await;
    t.trial("events after the restart", r);

    // During an exec: it completes or fails typed; the next one works.
    let v = vm.clone();
    let op = tokio::spawn(async move { v.exec(&ExecRequest::new("sleep").arg("3")).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let restarted = tokio::task::spawn_blocking(restart_libvirtd).await.unwrap();
    let r = restarted.and(match op.await {
        Ok(Ok(o)) if o.success() => Ok(()),
        Ok(Ok(o)) => Err(format!("exec ended with {:?}", o.exit_code)),
        Ok(Err(e)) if e.to_string().contains(name) => Ok(()),
        Ok(Err(e)) => Err(format!("the error does not name the VM: {e}")),
        Err(e) => Err(format!("panicked: {e}")),
    });
    let r = r.and(
        vm.exec(&ExecRequest::new("true"))
            .await
            .map(|_| ())
            .map_err(|e| format!("the next exec failed: {e}")),
    );
    t.trial("during an exec", r);

    // During a readiness wait.
    let r: Result<(), String> = async {
        vm.power_off()
            .await
            .map_err(|e| format!("power off: {e}"))?;
        vm.start().await.map_err(|e| format!("start: {e}"))?;
        let v = vm.clone();
        let op = tokio::spawn(async move { v.wait_ready(&ready()).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::spawn_blocking(restart_libvirtd)
            .await
            .unwrap()?;
        match op.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.to_string().contains(name) => vm
                .wait_ready(&ready())
                .await
                .map(|_| ())
                .map_err(|e| format!("the next wait failed: {e}")),
            Ok(Err(e)) => Err(format!("the error does not name the VM: {e}")),
            Err(e) => Err(format!("panicked: {e}")),
        }
    }
    .await;
    t.trial("during a readiness wait", r);
    let _ = vm.destroy().await;
    t
}
