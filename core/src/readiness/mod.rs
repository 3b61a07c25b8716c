//! Readiness: "can this guest take commands yet?" answered by composable probes under one
//! deadline, never by guessing a boot time. Probes retry with a short backoff, the agent probe is
//! woken by the backend's agent-connected event where there is one, and a watchdog fails the wait
//! at once if the VM stops or crashes meanwhile.

mod probes;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{join_all, select_all, FutureExt};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, ForwardTransport, VmEventKind};
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{ExecOutput, ExecRequest, VmState};

/// One condition the guest must meet.
///
/// One text form, used by anyvm.toml, the command line, Python and C, and printed back by
/// `Display` so that it round-trips: `agent`, `tcp:PORT`, `ssh:PORT`, `command:["ARG", ...]`
/// (a JSON array; `command:WORD WORD` splits on spaces for simple commands).
///
/// ```
/// use anyvm::Probe;
/// let p: Probe = "command:[\"test\", \"-e\", \"/run/ready\"]".parse().unwrap();
/// assert_eq!(p.to_string().parse::<Probe>().unwrap(), p);
/// assert_eq!("ssh:22".parse::<Probe>().unwrap(), Probe::SshBanner { guest_port: 22 });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The guest agent (QEMU guest agent, Guest Additions, VMware Tools) answers a ping.
    Agent,
    /// A TCP connection to the host side of the forward for `guest_port` succeeds.
    Tcp {
        /// The guest port whose forward is tried.
        guest_port: u16,
    },
    /// The forward for `guest_port` answers with an SSH identification line.
    SshBanner {
        /// The guest's sshd port.
        guest_port: u16,
    },
    /// A guest command exits 0.
    Command {
        /// The command, no shell.
        argv: Vec<String>,
    },
}

const PROBE_FORMS: &str = "agent, tcp:PORT, ssh:PORT or command:[\"ARG\", ...]";

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Agent => f.write_str("agent"),
            Probe::Tcp { guest_port } => write!(f, "tcp:{guest_port}"),
            Probe::SshBanner { guest_port } => write!(f, "ssh:{guest_port}"),
            Probe::Command { argv } => write!(
                f,
                "command:{}",
                serde_json::to_string(argv).map_err(|_| fmt::Error)?
            ),
        }
    }
}

impl std::str::FromStr for Probe {
    type Err = Error;
    fn from_str(s: &str) -> Result<Probe> {
        let bad = |why: String| Error::invalid_arg(format!("probe {s:?}"), why);
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k.trim(), Some(a.trim())),
            None => (s.trim(), None),
        };
        let port = |a: Option<&str>| -> Result<u16> {
            a.and_then(|a| a.parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("{kind} needs a guest port 1-65535 ({PROBE_FORMS})")))
        };
        match (kind, arg) {
            ("agent", None) => Ok(Probe::Agent),
            ("tcp", a) => Ok(Probe::Tcp {
                guest_port: port(a)?,
            }),
            ("ssh" | "ssh_banner", a) => Ok(Probe::SshBanner {
                guest_port: port(a)?,
            }),
            ("command", Some(a)) => {
                let argv: Vec<String> = if a.starts_with('[') {
                    serde_json::from_str(a).map_err(|e| {
                        bad(format!("the command is not a JSON array of strings: {e}"))
                    })?
                } else {
                    a.split_whitespace().map(str::to_string).collect()
                };
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(bad("the command must name a program".into()));
                }
                Ok(Probe::Command { argv })
            }
            _ => Err(bad(format!("expected {PROBE_FORMS}"))),
        }
    }
}

impl Serialize for Probe {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// The table form of older anyvm.toml files (`{ kind = "tcp", guest_port = 22 }`), still read.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum ProbeTable {
    Agent,
    Tcp { guest_port: u16 },
    SshBanner { guest_port: u16 },
    Command { argv: Vec<String> },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ProbeRepr {
    Text(String),
    Table(ProbeTable),
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Probe, D::Error> {
        match ProbeRepr::deserialize(d).map_err(|_| {
            serde::de::Error::custom(format!(
                "a probe is {PROBE_FORMS} (or a {{ kind = ... }} table)"
            ))
        })? {
            ProbeRepr::Text(t) => t.parse().map_err(serde::de::Error::custom),
            ProbeRepr::Table(ProbeTable::Agent) => Ok(Probe::Agent),
            ProbeRepr::Table(ProbeTable::Tcp { guest_port }) => Ok(Probe::Tcp { guest_port }),
            ProbeRepr::Table(ProbeTable::SshBanner { guest_port }) => {
                Ok(Probe::SshBanner { guest_port })
            }
            ProbeRepr::Table(ProbeTable::Command { argv }) => Ok(Probe::Command { argv }),
        }
    }
}

/// Whether every probe must pass, or one is enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every probe must pass.
    #[default]
    All,
    /// The first passing probe is enough.
    Any,
}

/// What "ready" means for a VM, and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadySpec {
    /// What to wait for.
    #[serde(default = "default_probes")]
    pub probes: Vec<Probe>,
    /// All or any.
    #[serde(default)]
    pub mode: Mode,
    /// How long to wait before failing with the probe still failing.
    #[serde(default = "default_timeout", rename = "timeout_s", with = "secs")]
    pub timeout: Duration,
}

fn default_probes() -> Vec<Probe> {
    vec![Probe::Agent]
}
fn default_timeout() -> Duration {
    Duration::from_secs(120)
}

mod secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = <f64 as serde::Deserialize>::deserialize(d)?;
        if !(v > 0.0 && v.is_finite()) {
            return Err(serde::de::Error::custom(
                "timeout_s must be a positive number of seconds",
            ));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

impl Default for ReadySpec {
    fn default() -> Self {
        ReadySpec {
            probes: default_probes(),
            mode: Mode::All,
            timeout: default_timeout(),
        }
    }
}

impl ReadySpec {
    /// No probes yet; add them with [`ReadySpec::probe`].
    pub fn empty() -> Self {
        ReadySpec {
            probes: Vec::new(),
            ..Default::default()
        }
    }
    /// Also wait for `p`.
    pub fn probe(mut self, p: Probe) -> Self {
        self.probes.push(p);
        self
    }
    /// One passing probe is enough.
    pub fn any(mut self) -> Self {
        self.mode = Mode::Any;
        self
    }
    /// Fail after `t`.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Check the spec: at least one probe, a positive timeout, valid probes.
    pub fn validate(&self) -> Result<()> {
        if self.probes.is_empty() {
            return Err(Error::invalid_arg("ready spec", "needs at least one probe"));
        }
        for p in &self.probes {
            match p {
                Probe::Command { argv } if argv.is_empty() => {
                    return Err(Error::invalid_arg(
                        "command probe",
                        "argv must name a program",
                    ))
                }
                Probe::Tcp { guest_port: 0 } | Probe::SshBanner { guest_port: 0 } => {
                    return Err(Error::invalid_arg(
                        format!("probe {p}"),
                        "guest port must be 1-65535",
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// How a successful wait went.
#[derive(Debug, Clone, Serialize)]
pub struct ReadyReport {
    /// How long it took.
    #[serde(with = "secs")]
    pub elapsed: Duration,
    /// Each probe and when it first passed (relative to the start of the wait).
    pub passed: Vec<(String, f64)>,
}

#[derive(Debug, Clone)]
struct ProbeStatus {
    name: String,
    last_error: String,
    passed_at: Option<Duration>,
}

/// How command probes run guest programs (the `Vm` handle's exec, with its credentials and channel).
pub(crate) type GuestExec = Arc<
    dyn Fn(ExecRequest) -> futures::future::BoxFuture<'static, Result<ExecOutput>> + Send + Sync,
>;

#[cfg(test)]
pub(crate) async fn wait_ready(
    backend: Arc<dyn Backend>,
    vm: &VmName,
    spec: &ReadySpec,
) -> Result<ReadyReport> {
    wait_ready_with(backend, vm, spec, None).await
}

pub(crate) async fn wait_ready_with(
    backend: Arc<dyn Backend>,
    vm: &VmName,
    spec: &ReadySpec,
    exec: Option<GuestExec>,
) -> Result<ReadyReport> {
    spec.validate()?;
    let ctx = Ctx::vm("wait_ready", vm);
    let started = Instant::now();
    let deadline = started + spec.timeout;
    // Subscribe before the first check so no event slips between check and wait.
    let events = backend.subscribe();

    let state = backend.state(vm).await?;
    if state != VmState::Running {
        return Err(Error::InvalidState {
            ctx,
            state: state.to_string(),
            hint: Some(format!("start it first (anyvm start {vm})")),
        });
    }
    let needs_ports = spec
        .probes
        .iter()
        .any(|p| matches!(p, Probe::Tcp { .. } | Probe::SshBanner { .. }));
    let direct = backend.forward_transport() == ForwardTransport::SshTunnel;
    let forwards = if needs_ports && !direct {
        backend.forwards(vm).await?
    } else {
        Vec::new()
    };

    let statuses: Arc<Mutex<Vec<ProbeStatus>>> = Arc::new(Mutex::new(
        spec.probes
            .iter()
            .map(|p| ProbeStatus {
                name: p.to_string(),
                last_error: "not tried yet".into(),
                passed_at: None,
            })
            .collect(),
    ));

    let mut futs = Vec::new();
    for (i, probe) in spec.probes.iter().enumerate() {
        let ctx = probes::ProbeCtx {
            backend: backend.clone(),
            vm: vm.clone(),
            forwards: forwards.clone(),
            direct,
            exec: exec.clone(),
            deadline,
            events: events.as_ref().map(|e| e.resubscribe()),
        };
        let statuses = statuses.clone();
        let probe = probe.clone();
        futs.push(
            async move {
                probes::run_until_pass(&ctx, &probe, |err| {
                    statuses.lock().expect("status lock")[i].last_error = err;
                })
                .await;
                statuses.lock().expect("status lock")[i].passed_at = Some(started.elapsed());
            }
            .boxed(),
        );
    }
    let probes_done = async move {
        match spec.mode {
            Mode::All => {
                join_all(futs).await;
            }
            Mode::Any => {
                select_all(futs).await;
            }
        }
    };

    let watchdog = watch_state(
        backend.clone(),
        vm.clone(),
        events.map(|e| e.resubscribe()),
        ctx.clone(),
    );

    tokio::select! {
        _ = probes_done => {
            let st = statuses.lock().expect("status lock");
            Ok(ReadyReport {
                elapsed: started.elapsed(),
                passed: st.iter().filter_map(|s| s.passed_at.map(|t| (s.name.clone(), t.as_secs_f64()))).collect(),
            })
        }
        e = watchdog => Err(e),
        _ = tokio::time::sleep_until(deadline.into()) => {
            let st = statuses.lock().expect("status lock");
            let failing = st.iter().find(|s| s.passed_at.is_none()).cloned().unwrap_or_else(|| st[0].clone());
            Err(Error::NotReady { ctx, after: Some(spec.timeout), probe: failing.name, last_error: failing.last_error })
        }
    }
}

/// Resolves with an error as soon as the VM is no longer running.
async fn watch_state(
    backend: Arc<dyn Backend>,
    vm: VmName,
    mut events: Option<tokio::sync::broadcast::Receiver<crate::backend::VmEvent>>,
    ctx: Ctx,
) -> Error {
    let left = |state: String| Error::InvalidState {
        ctx: ctx.clone(),
        state,
        hint: Some(
            "the VM stopped while waiting for it to become ready; see its console log".into(),
        ),
    };
    // Events answer at once when they come, but libvirt sends "stopped" only after cleaning up
    // a killed QEMU (seconds later) while its state already reads shut off: poll as well.
    let poll_every = Duration::from_millis(500);
    // Where the backend watches the hypervisor process, its exit is the quickest sign of all.
    let mut exited = backend
        .process_exit(&vm)
        .unwrap_or_else(|| Box::pin(futures::future::pending()));
    loop {
        // An event saying the VM went down is the answer itself: libvirt may still report it
        // running for a moment after the event.
        let wake = async {
            match events.as_mut() {
                Some(rx) => loop {
                    match rx.recv().await {
                        Ok(ev) if ev.vm == vm.as_str() => match ev.kind {
                            VmEventKind::Stopped => return Some("shut off"),
                            VmEventKind::Crashed => return Some("crashed"),
                            VmEventKind::Paused => return Some("paused"),
                            _ => {}
                        },
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return None,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            futures::future::pending::<()>().await
                        }
                    }
                },
                None => futures::future::pending::<Option<&str>>().await,
            }
        };
        tokio::select! {
            gone = wake => if let Some(state) = gone {
                return left(state.to_string());
            },
            why = &mut exited => return left(format!("not running: {why}")),
            _ = tokio::time::sleep(poll_every) => {}
        }
        match backend.state(&vm).await {
            Ok(VmState::Running) => {}
            Ok(s) => return left(s.to_string()),
            Err(e) if e.kind() == crate::ErrorKind::NotFound => return e,
            Err(e) => tracing::debug!(vm = %vm, error = %e, "state poll failed while waiting"),
        }
    }
}

#[cfg(test)]
mod tests;
