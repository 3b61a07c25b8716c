//! The individual probes and their retry loop.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::Probe;
use crate::backend::{Backend, VmEvent, VmEventKind};
use crate::name::VmName;
use crate::types::{ExecRequest, PortForward, Protocol};

pub(super) struct ProbeCtx {
    pub backend: Arc<dyn Backend>,
    pub vm: VmName,
    pub forwards: Vec<PortForward>,
    /// Ports are reached at the guest's own address (forwards are ssh tunnels that need the
    /// guest up first).
    pub direct: bool,
    pub exec: Option<super::GuestExec>,
    pub deadline: std::time::Instant,
    pub events: Option<broadcast::Receiver<VmEvent>>,
}

const FIRST_RETRY: Duration = Duration::from_millis(20);
const MAX_RETRY: Duration = Duration::from_millis(500);
const ATTEMPT_CAP: Duration = Duration::from_secs(10);

impl ProbeCtx {
    fn attempt_timeout(&self) -> Duration {
        // Leave time after a failed attempt to record why it failed before the deadline.
        self.deadline
            .saturating_duration_since(std::time::Instant::now())
            .mul_f64(0.75)
            .clamp(Duration::from_millis(100), ATTEMPT_CAP)
    }

    async fn host_side(&self, guest_port: u16) -> Result<(String, u16), String> {
        if self.direct {
            return match self.backend.guest_address(&self.vm).await {
                Ok(Some(ip)) => Ok((ip, guest_port)),
                Ok(None) => Err("the backend cannot tell the guest's address".into()),
                Err(e) => Err(e.to_string()),
            };
        }
        self.forwards
            .iter()
            .find(|f| f.guest_port == guest_port && f.proto == Protocol::Tcp)
            .ok_or_else(|| {
                format!("no TCP forward to guest port {guest_port}; add one (anyvm forward add)")
            })
            .and_then(|f| f.connect_addr_via(self.backend.forward_host().as_deref()))
    }
}

/// Retry `probe` until it passes; report each failure through `on_fail`. Never returns early:
/// the caller's deadline ends it.
pub(super) async fn run_until_pass(ctx: &ProbeCtx, probe: &Probe, mut on_fail: impl FnMut(String)) {
    let mut delay = FIRST_RETRY;
    let mut events = ctx.events.as_ref().map(|e| e.resubscribe());
    let mut failed_before = false;
    loop {
        match check(ctx, probe).await {
            Ok(()) => return,
            // An attempt cut short as the deadline nears says less than the failure before it.
            Err(Failure::AttemptTimedOut(_)) if failed_before => {}
            Err(Failure::AttemptTimedOut(e) | Failure::Failed(e)) => {
                failed_before = true;
                on_fail(e)
            }
        }
        let sleep = tokio::time::sleep(delay);
        delay = (delay * 3 / 2).min(MAX_RETRY);
        match (probe, events.as_mut()) {
            // The agent probe wakes at once when the backend says the agent connected.
            (Probe::Agent, Some(rx)) => {
                let connected = async {
                    loop {
                        match rx.recv().await {
                            Ok(ev)
                                if ev.vm == ctx.vm.as_str()
                                    && ev.kind == VmEventKind::AgentConnected =>
                            {
                                return
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => {
                                futures::future::pending::<()>().await
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = connected => {}
                    _ = sleep => {}
                }
            }
            _ => sleep.await,
        }
    }
}

enum Failure {
    Failed(String),
    AttemptTimedOut(String),
}

fn backend_failure(e: crate::Error) -> Failure {
    if e.kind() == crate::ErrorKind::Timeout {
        Failure::AttemptTimedOut(e.to_string())
    } else {
        Failure::Failed(e.to_string())
    }
}

async fn check(ctx: &ProbeCtx, probe: &Probe) -> Result<(), Failure> {
    match probe {
        Probe::Agent => ctx
            .backend
            .agent_ping(&ctx.vm, ctx.attempt_timeout())
            .await
            .map_err(backend_failure),
        _ => check_other(ctx, probe).await.map_err(Failure::Failed),
    }
}

async fn check_other(ctx: &ProbeCtx, probe: &Probe) -> Result<(), String> {
    let t = ctx.attempt_timeout();
    match probe {
        Probe::Agent => unreachable!("handled by check"),
        Probe::Tcp { guest_port } => {
            let (addr, port) = ctx.host_side(*guest_port).await?;
            connect(&addr, port, t).await.map(|_| ())
        }
        Probe::SshBanner { guest_port } => {
            let (addr, port) = ctx.host_side(*guest_port).await?;
            let mut s = connect(&addr, port, t).await?;
            let mut buf = Vec::new();
            let read = tokio::time::timeout_at(Instant::now() + t, async {
                let mut chunk = [0u8; 256];
                while !buf.contains(&b'\n') && buf.len() < 8192 {
                    let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("connection closed before an SSH banner arrived".to_string());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok(())
            })
            .await;
            match read {
                Err(_) => Err(format!("no SSH banner from {addr}:{port} within {t:?}")),
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => {
                    let text = String::from_utf8_lossy(&buf);
                    if text.lines().any(|l| l.starts_with("SSH-")) {
                        Ok(())
                    } else {
                        Err(format!(
                            "{addr}:{port} answered without an SSH banner: {:?}",
                            text.trim()
                        ))
                    }
                }
            }
        }
        Probe::Command { argv } => {
            let req = ExecRequest::from_argv(argv)
                .map_err(|e| e.to_string())?
                .timeout(t);
            let out = match &ctx.exec {
                Some(exec) => exec(req).await,
                None => ctx.backend.exec(&ctx.vm, &req).await,
            };
            match out {
                Ok(out) if out.success() => Ok(()),
                Ok(out) => Err(format!(
                    "exit code {:?}, stderr: {}",
                    out.exit_code,
                    out.stderr_str()
                        .trim()
                        .chars()
                        .take(200)
                        .collect::<String>()
                )),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

async fn connect(addr: &str, port: u16, t: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(t, TcpStream::connect((addr, port))).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("{addr}:{port}: {e}")),
        Err(_) => Err(format!("{addr}:{port}: connect timed out after {t:?}")),
    }
}
