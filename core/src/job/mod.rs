//! Transient jobs: run one command in a fresh linked clone of a template VM and leave nothing
//! behind.
//!
//! [`run_job`] clones, boots, waits ready (and runs the profile's resource checks), stages
//! inputs in, runs the command under a wall-clock limit, stages outputs out, keeps the console
//! log, and destroys the clone on every path: success, failure, timeout and cancellation. A
//! process killed outright (SIGKILL) cannot clean up; its clone carries its owner's identity in
//! labels and [`gc::gc`] (`anyvm gc`, and every later job on the host) removes it.
//! [`pool::JobPool`] runs many jobs under a CPU/memory budget.

pub mod gc;
pub use crate::owner;
pub mod pool;
mod prepare;
pub mod slurm;
mod stage;

pub use prepare::prepare;

/// A linked clone that belongs to this process: it carries the owner labels a job's clone
/// carries, so `anyvm gc` removes it if the process dies (SIGKILL, reboot) before it does.
/// The caller destroys it when done (Python's `vm.transient_clone()` does, on every exit).
pub async fn transient_clone(base: &Vm, name: &VmName, snapshot: Option<&str>) -> Result<Vm> {
    let labels = ownership_labels(base.name().as_str());
    base.clone_linked_labeled(name, snapshot, labels).await
}

/// This process as the owner of a clone of `template`, made now.
fn ownership_labels(template: &str) -> std::collections::BTreeMap<String, String> {
    let mut labels = owner::Owner::current().labels();
    labels.insert(owner::LABEL_TEMPLATE.into(), template.to_string());
    labels.insert(
        owner::LABEL_STARTED_AT.into(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string(),
    );
    labels
}

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::check::CheckReport;
use crate::client::Client;
use crate::error::{Ctx, Error, ErrorKind, Result};
use crate::name::VmName;
use crate::profile::Profile;
use crate::readiness::ReadySpec;
use crate::types::ExecRequest;
use crate::vm::Vm;

/// Labels under this prefix belong to the job runner.
pub use crate::labels::JOB_PREFIX as LABEL_PREFIX;

/// Wall-clock limit when none is given: batch systems enforce their own.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// A copy between host and guest: inputs go host → guest, outputs guest → host. Directories
/// are copied whole (as a tar stream through the guest's `tar`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// The host path (file or directory).
    pub host: PathBuf,
    /// The absolute guest path.
    pub guest: String,
}

/// What to run, where, and what to bring in and out. Build with [`JobSpec::new`].
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// An anyvm-defined VM; its disks must be qcow2 (libvirt) and it must be off unless
    /// `snapshot` is given.
    pub template: VmName,
    /// Clone from this snapshot of the template instead of its current disks.
    pub snapshot: Option<String>,
    /// The command; its `timeout` is the job's wall-clock limit for the run phase.
    pub command: ExecRequest,
    /// Copied into the clone before the command.
    pub inputs: Vec<Stage>,
    /// Copied out after the command, whatever its exit code.
    pub outputs: Vec<Stage>,
    /// When the clone counts as ready.
    pub ready: ReadySpec,
    /// Resources verified from inside the clone before inputs go in.
    pub profile: Option<Profile>,
    /// Seconds allowed for each profile resource check.
    pub check_timeout: Duration,
    /// Bytes of the end of the guest console log kept in the report.
    pub console_tail: usize,
    /// Start the clone from the template's warm state where the backend can (made on first
    /// use; see [`Vm::warm`]); `false` boots every clone.
    pub warm: bool,
}

impl JobSpec {
    /// A job running `argv` in a clone of `template`; fails on an empty argv or a bad name.
    pub fn new<S: AsRef<str>>(template: &str, argv: &[S]) -> Result<JobSpec> {
        let mut command = ExecRequest::from_argv(argv)?;
        command.timeout = DEFAULT_JOB_TIMEOUT;
        Ok(JobSpec {
            template: VmName::new(template)?,
            snapshot: None,
            command,
            inputs: Vec::new(),
            outputs: Vec::new(),
            ready: ReadySpec::default(),
            profile: None,
            check_timeout: Duration::from_secs(10),
            console_tail: 64 * 1024,
            warm: true,
        })
    }
    /// Boot the clone instead of starting it from the template's warm state.
    pub fn cold(mut self) -> Self {
        self.warm = false;
        self
    }
    /// Copy `host` into the clone at `guest` before the command.
    pub fn input(mut self, host: impl Into<PathBuf>, guest: impl Into<String>) -> Self {
        self.inputs.push(Stage {
            host: host.into(),
            guest: guest.into(),
        });
        self
    }
    /// Copy `guest` out to `host` after the command.
    pub fn output(mut self, guest: impl Into<String>, host: impl Into<PathBuf>) -> Self {
        self.outputs.push(Stage {
            host: host.into(),
            guest: guest.into(),
        });
        self
    }
    /// The command's wall-clock limit.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.command.timeout = t;
        self
    }
    /// Set an environment variable for the command.
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.command = self.command.env(k, v);
        self
    }
    /// Run the command in this guest directory.
    pub fn cwd(mut self, d: impl Into<String>) -> Self {
        self.command = self.command.cwd(d);
        self
    }
    /// Wait for these probes before staging in.
    pub fn ready(mut self, r: ReadySpec) -> Self {
        self.ready = r;
        self
    }
    /// Check the profile's resources from inside the clone first.
    pub fn profile(mut self, p: Profile) -> Self {
        self.profile = Some(p);
        self
    }
    /// Clone from this snapshot of the template.
    pub fn snapshot(mut self, s: impl Into<String>) -> Self {
        self.snapshot = Some(s.into());
        self
    }

    /// Everything checkable before a clone exists, so bad input creates nothing. Relative host
    /// paths are made absolute against the current directory.
    pub fn validate(&mut self) -> Result<()> {
        self.command.validate()?;
        self.ready.validate()?;
        if self.command.timeout.is_zero() {
            return Err(Error::invalid_arg("job timeout", "must be positive"));
        }
        let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
        for (dir, stages) in [("input", &mut self.inputs), ("output", &mut self.outputs)] {
            for s in stages.iter_mut() {
                let what = format!("{dir} {}:{}", s.host.display(), s.guest);
                if !s.guest.starts_with('/') || s.guest.contains('\0') || s.guest.contains('\n') {
                    return Err(Error::invalid_arg(what, "the guest path must be absolute"));
                }
                if s.guest.split('/').any(|c| c == "..") {
                    return Err(Error::invalid_arg(
                        what,
                        "the guest path must not contain '..'",
                    ));
                }
                if s.host.as_os_str().is_empty() {
                    return Err(Error::invalid_arg(what, "the host path is empty"));
                }
                if s.host.is_relative() {
                    s.host = cwd.join(&s.host);
                }
                if dir == "input" && !s.host.exists() {
                    return Err(Error::NotFound {
                        ctx: Ctx::new(format!("job input {}", s.host.display())),
                        what: "no such file or directory on the host".into(),
                    });
                }
            }
        }
        Ok(())
    }
}

pub use crate::types::Phase;

/// How long one phase took.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTiming {
    /// The phase.
    pub phase: Phase,
    /// Seconds spent in it.
    pub seconds: f64,
    /// Whether it completed.
    pub ok: bool,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The command exited 0.
    Succeeded,
    /// The command ran and exited non-zero (or was killed by a signal in the guest).
    Failed,
    /// The command outran the job's wall-clock limit.
    TimedOut,
    /// The caller cancelled (SIGINT/SIGTERM, `scancel`).
    Cancelled,
    /// anyvm could not run the command: clone, boot, readiness, checks or staging failed.
    Error,
}

/// Why a job did not succeed, when it is not the command's own exit code.
#[derive(Debug, Clone, Serialize)]
pub struct JobError {
    /// The phase it failed in.
    pub phase: Phase,
    /// The core error kind.
    pub kind: ErrorKind,
    /// The error's message.
    pub message: String,
}

/// One staged file or directory.
#[derive(Debug, Clone, Serialize)]
pub struct StagedPath {
    /// The host side.
    pub host: PathBuf,
    /// The guest side.
    pub guest: String,
    /// Bytes copied.
    pub bytes: u64,
}

/// Everything about one job run. `run_job` always returns one; check [`JobReport::outcome`].
#[derive(Clone, Serialize)]
pub struct JobReport {
    /// This run's id (also the clone's label).
    pub job_id: String,
    /// The template VM.
    pub template: String,
    /// The clone's name (empty when no clone was made).
    pub vm: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The command's exit code.
    pub exit_code: Option<i32>,
    /// The signal that killed the command.
    pub signal: Option<i32>,
    /// The command's standard output.
    #[serde(serialize_with = "lossy")]
    pub stdout: Vec<u8>,
    /// The command's standard error.
    #[serde(serialize_with = "lossy")]
    pub stderr: Vec<u8>,
    /// Why anyvm could not run the command, if so.
    pub error: Option<JobError>,
    /// The clone could not be removed (it is labelled; `anyvm gc` retries).
    pub teardown_error: Option<String>,
    /// Each phase with its duration, in order.
    pub phases: Vec<PhaseTiming>,
    /// What was copied in.
    pub inputs: Vec<StagedPath>,
    /// What was copied out.
    pub outputs: Vec<StagedPath>,
    /// The profile check, when one ran.
    pub check: Option<CheckReport>,
    /// The end of the guest's serial console log.
    pub console_log: String,
    /// Wall-clock seconds for the whole job.
    pub seconds: f64,
}

/// Output as text, not byte arrays.
impl std::fmt::Debug for JobReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobReport")
            .field("job_id", &self.job_id)
            .field("template", &self.template)
            .field("vm", &self.vm)
            .field("outcome", &self.outcome)
            .field("exit_code", &self.exit_code)
            .field("signal", &self.signal)
            .field("stdout", &String::from_utf8_lossy(&self.stdout))
            .field("stderr", &String::from_utf8_lossy(&self.stderr))
            .field("error", &self.error)
            .field("teardown_error", &self.teardown_error)
            .field("phases", &self.phases)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("check", &self.check)
            .field("console_log_bytes", &self.console_log.len())
            .field("seconds", &self.seconds)
            .finish()
    }
}

fn lossy<S: serde::Serializer>(b: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

impl JobReport {
    pub(crate) fn empty(job_id: String, template: &VmName) -> JobReport {
        JobReport {
            job_id,
            template: template.to_string(),
            vm: String::new(),
            outcome: Outcome::Error,
            exit_code: None,
            signal: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            error: None,
            teardown_error: None,
            phases: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            check: None,
            console_log: String::new(),
            seconds: 0.0,
        }
    }

    /// Seconds spent in `phase` (0 when it did not run).
    pub fn phase_seconds(&self, phase: Phase) -> f64 {
        self.phases
            .iter()
            .filter(|p| p.phase == phase)
            .map(|p| p.seconds)
            .sum()
    }

    /// The process exit status a command line should report: the command's own code; 128+N
    /// when the guest program died of signal N; 124 on timeout (as `timeout(1)`); 125 when
    /// anyvm failed (as `docker run`) or could not remove the clone; 130 when cancelled.
    pub fn exit_status(&self) -> i32 {
        if self.teardown_error.is_some() && self.outcome == Outcome::Succeeded {
            return 125;
        }
        match self.outcome {
            Outcome::Succeeded | Outcome::Failed => match (self.exit_code, self.signal) {
                (Some(c), _) => c,
                (None, Some(s)) => 128 + s,
                (None, None) => 125,
            },
            Outcome::TimedOut => 124,
            Outcome::Cancelled => 130,
            Outcome::Error => 125,
        }
    }

    /// Standard output as text (lossy UTF-8).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Cancels a running job (or a queued one) from anywhere: a signal handler task, another
/// thread, a binding. Cloning shares the flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<(AtomicBool, Notify)>);

impl Cancel {
    /// A token nobody has cancelled yet.
    pub fn new() -> Cancel {
        Cancel::default()
    }
    /// Cancel every job holding this token (and its clones).
    pub fn cancel(&self) {
        self.0 .0.store(true, Ordering::SeqCst);
        self.0 .1.notify_waiters();
    }
    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0 .0.load(Ordering::SeqCst)
    }
    /// Resolves once `cancel` has been called.
    pub async fn cancelled(&self) {
        loop {
            let n = self.0 .1.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            n.await;
        }
    }
}

/// Removing a clone is bounded: power-off and undefine have their own timeouts, this caps the
/// whole so a hung hypervisor cannot keep a cancelled job alive past the batch system's grace.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(120);

/// A job id unique across hosts, processes and calls: readable in `anyvm list`.
pub(crate) fn new_job_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    // Jobs of several hosts may share one (remote) hypervisor: the host goes into the id too.
    let host = owner::hostname().bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!(
        "{:x}{:03x}{:x}{}",
        t.as_secs(),
        host & 0xfff,
        std::process::id(),
        if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        }
    )
}

/// Records phase timings as the job moves on; the current phase is what a cancellation or an
/// error interrupted.
struct Progress {
    phases: Vec<PhaseTiming>,
    current: Option<(Phase, Instant)>,
    /// Each phase is announced on the client's event stream as it begins.
    bus: crate::events::EventBus,
    job: String,
    vm: Option<String>,
    on_phase: Option<PhaseFn>,
}

impl Progress {
    fn begin(&mut self, phase: Phase) {
        self.end(true);
        self.current = Some((phase, Instant::now()));
        tracing::debug!(job = %self.job, vm = ?self.vm, phase = %phase, "job phase begins");
        let e = crate::events::JobEvent {
            job: self.job.clone(),
            vm: self.vm.clone(),
            phase,
        };
        if let Some(f) = &self.on_phase {
            f(&e);
        }
        self.bus.publish(crate::events::Event::Job(e));
    }
    fn end(&mut self, ok: bool) {
        if let Some((phase, t)) = self.current.take() {
            self.phases.push(PhaseTiming {
                phase,
                seconds: t.elapsed().as_secs_f64(),
                ok,
            });
        }
    }
    fn phase(&self) -> Phase {
        self.current.map(|c| c.0).unwrap_or(Phase::Clone)
    }
}

pub(crate) fn job_error(phase: Phase, e: &Error) -> JobError {
    JobError {
        phase,
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// Run one job to the end. Never returns before the clone is gone (or its removal failed and
/// is reported); never fails: every problem is in the report.
pub async fn run_job(client: &Client, template: &Vm, spec: &JobSpec, cancel: &Cancel) -> JobReport {
    run_job_queued(client, template, spec, cancel, None, None).await
}

/// Called as each phase of a job begins, with what the client's event stream announces.
pub type PhaseFn = std::sync::Arc<dyn Fn(&crate::events::JobEvent) + Send + Sync>;

/// [`run_job`], calling `on_phase` as each phase begins (before the phase's work), on the
/// task that runs the job.
pub async fn run_job_with(
    client: &Client,
    template: &Vm,
    spec: &JobSpec,
    cancel: &Cancel,
    on_phase: PhaseFn,
) -> JobReport {
    run_job_queued(client, template, spec, cancel, None, Some(on_phase)).await
}

pub(crate) async fn run_job_queued(
    client: &Client,
    template: &Vm,
    spec: &JobSpec,
    cancel: &Cancel,
    queued: Option<(Duration, pool::Permit)>,
    on_phase: Option<PhaseFn>,
) -> JobReport {
    let (queued, permit) = match queued {
        Some((d, p)) => (Some(d), Some(p)),
        None => (None, None),
    };
    let started = Instant::now();
    let job_id = new_job_id();
    let mut report = JobReport::empty(job_id.clone(), &spec.template);
    if let Some(q) = queued {
        report.phases.push(PhaseTiming {
            phase: Phase::Queue,
            seconds: q.as_secs_f64(),
            ok: true,
        });
    }
    let finish = |mut r: JobReport| {
        r.seconds = started.elapsed().as_secs_f64() + queued.map_or(0.0, |q| q.as_secs_f64());
        r
    };
    let mut spec = spec.clone();
    let checked = if template.name() != &spec.template {
        Err(Error::invalid_arg(
            "job template",
            format!(
                "the spec names {} but the handle is {}",
                spec.template,
                template.name()
            ),
        ))
    } else {
        spec.validate()
    };
    if let Err(e) = checked {
        report.error = Some(job_error(Phase::Clone, &e));
        return finish(report);
    }
    if cancel.is_cancelled() {
        report.outcome = Outcome::Cancelled;
        return finish(report);
    }
    // Orphans of earlier jobs on this host (owners killed outright) go first.
    match gc::gc(client, false).await {
        Ok(g) if g.removed() > 0 => {
            tracing::info!(removed = g.removed(), "removed orphaned job clones")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not look for orphaned job clones"),
    }

    let mut progress = Progress {
        phases: std::mem::take(&mut report.phases),
        current: None,
        bus: client.event_bus().clone(),
        job: job_id.clone(),
        vm: None,
        on_phase,
    };
    // Clone and boot are short and not interrupted: a half-made clone is harder to remove
    // than a whole one.
    let name = clone_name(&spec.template, &job_id);
    progress.vm = name.as_ref().ok().map(|n| n.to_string());
    progress.begin(Phase::Clone);
    let name = match name {
        Ok(n) => n,
        Err(e) => {
            progress.end(false);
            report.phases = progress.phases;
            report.error = Some(job_error(Phase::Clone, &e));
            return finish(report);
        }
    };
    let mut labels = ownership_labels(spec.template.as_str());
    labels.insert(owner::LABEL_JOB.into(), job_id.clone());
    let warm = spec.warm && spec.snapshot.is_none() && warm_possible(template).await;
    let made = if warm {
        match template.warm(&spec.ready).await {
            Ok(info) => template.clone_from_warm(&info, &name, labels).await,
            // The template never became ready: what a cold clone's ready phase would say.
            Err(e) if matches!(e.kind(), ErrorKind::NotReady | ErrorKind::Timeout) => {
                progress.begin(Phase::Ready);
                progress.end(false);
                report.phases = progress.phases;
                report.error = Some(job_error(Phase::Ready, &e));
                return finish(report);
            }
            Err(e) => Err(e),
        }
    } else {
        template
            .clone_linked_labeled(&name, spec.snapshot.as_deref(), labels)
            .await
    };
    let vm = match made {
        Ok(vm) => vm,
        Err(e) => {
            progress.end(false);
            report.phases = progress.phases;
            report.error = Some(job_error(Phase::Clone, &e));
            return finish(report);
        }
    };
    report.vm = name.to_string();

    let body_result = {
        let body = body(&vm, &spec, warm, &mut progress, &mut report);
        tokio::pin!(body);
        tokio::select! {
            r = &mut body => Some(r),
            _ = cancel.cancelled() => None,
        }
    };
    match body_result {
        None => {
            report.outcome = Outcome::Cancelled;
            progress.end(false);
        }
        Some(Ok(())) => {}
        Some(Err((phase, e))) => {
            progress.end(false);
            if phase == Phase::Run && e.kind() == ErrorKind::Timeout {
                report.outcome = Outcome::TimedOut;
            } else if report.outcome != Outcome::Failed {
                report.outcome = Outcome::Error;
            }
            report.error = Some(job_error(phase, &e));
        }
    }
    progress.end(true);
    // The guest stops running now: its share of the pool goes to the next job while the
    // hypervisor takes the process down.
    drop(permit);

    report.console_log = console_tail(&vm, spec.console_tail).await;
    progress.begin(Phase::Teardown);
    // Nothing of the clone is kept: power off and remove at once.
    let torn = match tokio::time::timeout(TEARDOWN_LIMIT, vm.discard()).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            ctx: Ctx::vm("destroy job clone", vm.name()),
            after: Some(TEARDOWN_LIMIT),
            what: "the clone to be removed".into(),
        }),
    };
    if let Err(e) = &torn {
        tracing::error!(vm = %vm.name(), error = %e, "job clone left behind; 'anyvm gc' removes it once this process exits");
        report.teardown_error = Some(e.to_string());
    }
    progress.end(torn.is_ok());
    report.phases = progress.phases;
    finish(report)
}

/// Whether the template's backend can start its clones warm (else they boot).
async fn warm_possible(template: &Vm) -> bool {
    match template.spec().await {
        Ok(Some(s)) => match template.backend().warm_unsupported(&s) {
            None => true,
            Some(why) => {
                tracing::debug!(vm = %template.name(), why = %why, "job clones boot cold");
                false
            }
        },
        _ => false,
    }
}

/// Boot, ready, check, stage in, run, stage out. Errors carry the phase they happened in.
async fn body(
    vm: &Vm,
    spec: &JobSpec,
    warm: bool,
    progress: &mut Progress,
    report: &mut JobReport,
) -> std::result::Result<(), (Phase, Error)> {
    let at = |p: &Progress| {
        let phase = p.phase();
        move |e: Error| (phase, e)
    };
    progress.begin(Phase::Boot);
    vm.start().await.map_err(at(progress))?;
    progress.begin(Phase::Ready);
    vm.wait_ready(&spec.ready).await.map_err(at(progress))?;
    if warm {
        vm.refresh_warm_identity().await;
    }
    if let Some(p) = &spec.profile {
        progress.begin(Phase::Check);
        let rep = crate::check::check(vm, p, spec.check_timeout)
            .await
            .map_err(at(progress))?;
        let failed: Vec<String> = rep
            .resources
            .iter()
            .filter(|r| !r.ok)
            .map(|r| format!("{} ({}): {}", r.name, r.target, r.detail))
            .collect();
        report.check = Some(rep);
        if !failed.is_empty() {
            return Err((
                Phase::Check,
                Error::NotReady {
                    ctx: Ctx::vm(format!("check profile {}", p.name), vm.name()),
                    after: Some(spec.check_timeout),
                    probe: "profile resources".into(),
                    last_error: failed.join("; "),
                },
            ));
        }
    }
    progress.begin(Phase::StageIn);
    for s in &spec.inputs {
        let bytes = stage::put(vm, &s.host, &s.guest)
            .await
            .map_err(at(progress))?;
        report.inputs.push(StagedPath {
            host: s.host.clone(),
            guest: s.guest.clone(),
            bytes,
        });
    }
    progress.begin(Phase::Run);
    let out = vm.exec(&spec.command).await.map_err(at(progress))?;
    report.exit_code = out.exit_code;
    report.signal = out.signal;
    report.stdout = out.stdout;
    report.stderr = out.stderr;
    report.outcome = if out.exit_code == Some(0) {
        Outcome::Succeeded
    } else {
        Outcome::Failed
    };
    // Outputs come out even when the command failed: they are often its logs.
    progress.begin(Phase::StageOut);
    for s in &spec.outputs {
        let bytes = stage::get(vm, &s.guest, &s.host)
            .await
            .map_err(at(progress))?;
        report.outputs.push(StagedPath {
            host: s.host.clone(),
            guest: s.guest.clone(),
            bytes,
        });
    }
    Ok(())
}

/// `<template>-<job id>`, cut to fit a VM name.
fn clone_name(template: &VmName, job_id: &str) -> Result<VmName> {
    let max = crate::name::MAX_NAME_LEN - job_id.len() - 1;
    let base: String = template.as_str().chars().take(max).collect();
    VmName::new(format!("{base}-{job_id}"))
}

async fn console_tail(vm: &Vm, limit: usize) -> String {
    match vm.console_tail(limit).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("(console log unavailable: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_refuses_bad_stages_before_anything_exists() {
        let base = JobSpec::new("tmpl", &["true"]).unwrap();
        let mut s = base.clone().input("/definitely/not/here", "/tmp/x");
        assert_eq!(s.validate().unwrap_err().kind(), ErrorKind::NotFound);
        let mut s = base.clone().input("/etc/hostname", "tmp/x");
        assert_eq!(s.validate().unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut s = base.clone().output("/tmp/../etc/x", "out");
        assert_eq!(s.validate().unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut s = base.clone().output("/tmp/out", "rel/out");
        s.validate().unwrap();
        assert!(s.outputs[0].host.is_absolute());
        let mut s = base.timeout(Duration::ZERO);
        assert!(s.validate().is_err());
        assert!(JobSpec::new("bad;name", &["true"]).is_err());
        assert!(JobSpec::new("tmpl", &[] as &[&str]).is_err());
    }

    #[test]
    fn clone_names_fit_and_are_distinct() {
        let t = VmName::new("a".repeat(64)).unwrap();
        let a = clone_name(&t, &new_job_id()).unwrap();
        let b = clone_name(&t, &new_job_id()).unwrap();
        assert_ne!(a, b);
        assert!(a.as_str().len() <= crate::name::MAX_NAME_LEN);
    }

    #[test]
    fn exit_status_follows_shell_conventions() {
        let mut r = JobReport::empty("j".into(), &VmName::new("t").unwrap());
        r.outcome = Outcome::Failed;
        r.exit_code = Some(3);
        assert_eq!(r.exit_status(), 3);
        r.exit_code = None;
        r.signal = Some(9);
        assert_eq!(r.exit_status(), 137);
        r.outcome = Outcome::TimedOut;
        assert_eq!(r.exit_status(), 124);
        r.outcome = Outcome::Cancelled;
        assert_eq!(r.exit_status(), 130);
        r.outcome = Outcome::Succeeded;
        r.exit_code = Some(0);
        r.teardown_error = Some("left".into());
        assert_eq!(r.exit_status(), 125);
    }

    #[tokio::test]
    async fn cancel_wakes_waiters_and_is_sticky() {
        let c = Cancel::new();
        let w = tokio::spawn({
            let c = c.clone();
            async move { c.cancelled().await }
        });
        tokio::task::yield_now().await;
        c.cancel();
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap()
            .unwrap();
        // Already cancelled: returns at once.
        c.cancelled().await;
    }
}
