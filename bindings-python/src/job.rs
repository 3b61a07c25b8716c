//! Transient jobs from Python: `client.run_job(...)`, `client.job_pool(...)`, `client.gc()`.
//! A job is never abandoned on Ctrl-C: the interrupt cancels it, the clone is removed, then
//! KeyboardInterrupt is raised.

use std::path::PathBuf;
use std::time::Duration;

use anyvm::job::pool::{Budget, JobPool as CorePool};
use anyvm::job::{Cancel, JobReport as CoreReport, JobSpec, Outcome};
use anyvm::{Client as CoreClient, Vm as CoreVm};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::{kind_to_py, to_py};
use crate::{runtime, seconds};

/// What `run_job` and `JobPool.run` take besides the template and argv.
#[derive(Default)]
pub struct JobArgs {
    pub inputs: Vec<(PathBuf, String)>,
    pub outputs: Vec<(String, PathBuf)>,
    pub timeout: Option<f64>,
    pub ready_timeout: Option<f64>,
    pub env: Option<std::collections::BTreeMap<String, String>>,
    pub cwd: Option<String>,
    pub snapshot: Option<String>,
    /// Boot the clone instead of starting it from the template's warm state.
    pub cold: bool,
}

/// Resolve names and build the spec (the core's `job::prepare`), then apply the options.
pub fn prepare(
    py: Python<'_>,
    client: &CoreClient,
    template: Option<String>,
    profile: Option<String>,
    argv: Vec<String>,
    a: JobArgs,
) -> PyResult<(CoreVm, JobSpec)> {
    let (vm, mut spec) = crate::block(py, true, async {
        anyvm::job::prepare(client, template.as_deref(), profile.as_deref(), &argv).await
    })?;
    if let Some(t) = a.timeout {
        spec = spec.timeout(seconds("timeout", t)?);
    }
    if let Some(t) = a.ready_timeout {
        spec.ready.timeout = seconds("ready_timeout", t)?;
    }
    for (k, v) in a.env.unwrap_or_default() {
        spec = spec.env(k, v);
    }
    if let Some(d) = a.cwd {
        spec = spec.cwd(d);
    }
    if let Some(s) = a.snapshot {
        spec = spec.snapshot(s);
    }
    if a.cold {
        spec = spec.cold();
    }
    for (h, g) in a.inputs {
        spec = spec.input(h, g);
    }
    for (g, h) in a.outputs {
        spec = spec.output(g, h);
    }
    spec.validate().map_err(|e| to_py(py, e))?;
    Ok((vm, spec))
}

/// Run a job future with the GIL released; on Ctrl-C cancel it, wait for its teardown, then
/// raise KeyboardInterrupt.
pub fn run_blocking<T, F>(py: Python<'_>, cancel: Cancel, fut: F) -> PyResult<T>
where
    T: Send,
    F: std::future::Future<Output = T> + Send,
{
    let (report, interrupted) = py.detach(|| {
        runtime().block_on(async {
            tokio::pin!(fut);
            let mut interrupted: Option<PyErr> = None;
            // Once interrupted, keep waiting: the job is tearing its clone down.
            loop {
                tokio::select! {
                    r = &mut fut => return (r, interrupted),
                    _ = tokio::time::sleep(Duration::from_millis(100)), if interrupted.is_none() => {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            cancel.cancel();
                            interrupted = Some(e);
                        }
                    }
                }
            }
        })
    });
    match interrupted {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// The outcome of one job: exit code, output, phase timings, the console log.
#[pyclass(module = "anyvm._native", frozen)]
pub struct JobReport {
    inner: CoreReport,
}

impl JobReport {
    pub fn new(inner: CoreReport) -> Self {
        JobReport { inner }
    }
}

fn outcome_str(o: Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[pymethods]
impl JobReport {
    #[getter]
    fn job_id(&self) -> String {
        self.inner.job_id.clone()
    }
    /// The clone's name ("" when none was made).
    #[getter]
    fn vm(&self) -> String {
        self.inner.vm.clone()
    }
    #[getter]
    fn template(&self) -> String {
        self.inner.template.clone()
    }
    /// "succeeded", "failed", "timed_out", "cancelled" or "error".
    #[getter]
    fn outcome(&self) -> String {
        outcome_str(self.inner.outcome)
    }
    #[getter]
    fn exit_code(&self) -> Option<i32> {
        self.inner.exit_code
    }
    /// What a shell would report: the command's code, 124 timeout, 125 anyvm failure.
    #[getter]
    fn exit_status(&self) -> i32 {
        self.inner.exit_status()
    }
    #[getter]
    fn stdout<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.stdout)
    }
    #[getter]
    fn stderr<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.stderr)
    }
    #[getter]
    fn console_log(&self) -> String {
        self.inner.console_log.clone()
    }
    /// Total seconds, queue included.
    #[getter]
    fn seconds(&self) -> f64 {
        self.inner.seconds
    }
    /// Seconds per phase: clone, boot, ready, check, stage_in, run, stage_out, teardown (and
    /// queue in a pool).
    #[getter]
    fn phases<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for p in &self.inner.phases {
            let k = p.phase.to_string();
            let prev: f64 = d
                .get_item(&k)?
                .map(|v| v.extract())
                .transpose()?
                .unwrap_or(0.0);
            d.set_item(k, prev + p.seconds)?;
        }
        Ok(d)
    }
    /// None, or {"phase", "kind", "message"} when anyvm could not complete the job.
    #[getter]
    fn error<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(e) = &self.inner.error else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("phase", e.phase.to_string())?;
        d.set_item(
            "kind",
            serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string)),
        )?;
        d.set_item("message", &e.message)?;
        Ok(Some(d))
    }
    #[getter]
    fn teardown_error(&self) -> Option<String> {
        self.inner.teardown_error.clone()
    }
    /// The whole report as JSON (what `anyvm job run --json` prints).
    fn to_json(&self) -> String {
        serde_json::to_string(&self.inner).unwrap_or_default()
    }
    /// Raise unless the job succeeded: GuestCommandError (non-zero exit), TimeoutError,
    /// the error's own class when anyvm failed, InvalidStateError if the clone was left.
    fn check(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let r = &slf.get().inner;
        let py = slf.py();
        let (kind, msg) = match (r.outcome, &r.error) {
            (Outcome::Succeeded, _) if r.teardown_error.is_none() => return Ok(slf),
            (Outcome::Succeeded, _) => (
                anyvm::ErrorKind::InvalidState,
                format!(
                    "job {}: clone {} was not removed: {}",
                    r.job_id,
                    r.vm,
                    r.teardown_error.clone().unwrap_or_default()
                ),
            ),
            (Outcome::Failed, _) => {
                let err = anyvm::Error::GuestCommand {
                    ctx: anyvm::Ctx::vm(format!("job {}", r.job_id), &r.vm),
                    program: r.template.clone(),
                    exit_code: r.exit_code,
                    stderr: r.stderr.clone().into_boxed_slice(),
                    reason: format!("exit status {}", r.exit_status()),
                };
                return Err(to_py(py, err));
            }
            (_, Some(e)) => (e.kind, e.message.clone()),
            (o, None) => (
                anyvm::ErrorKind::Busy,
                format!("job {}: {}", r.job_id, outcome_str(o)),
            ),
        };
        Err(kind_to_py(py, kind, msg))
    }
    fn __repr__(&self) -> String {
        format!(
            "JobReport(job_id={:?}, outcome={:?}, exit_code={:?}, seconds={:.1})",
            self.inner.job_id,
            outcome_str(self.inner.outcome),
            self.inner.exit_code,
            self.inner.seconds
        )
    }
}

/// Runs jobs under a vCPU/memory budget, first come first served. Safe to share between
/// threads: each `run` releases the GIL while it waits and works.
#[pyclass(module = "anyvm._native", frozen)]
pub struct JobPool {
    pool: CorePool,
    client: CoreClient,
}

impl JobPool {
    pub fn new(client: CoreClient, cpus: Option<u32>, memory_mib: Option<u64>) -> PyResult<Self> {
        let host = Budget::host();
        let budget = Budget {
            cpus: cpus.unwrap_or(host.cpus),
            memory_mib: memory_mib.unwrap_or(host.memory_mib),
        };
        let pool = CorePool::new(client.clone(), budget)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(JobPool { pool, client })
    }
}

#[pymethods]
impl JobPool {
    /// (vcpus, memory_mib) the pool hands out at once.
    #[getter]
    fn budget(&self) -> (u32, u64) {
        let b = self.pool.budget();
        (b.cpus, b.memory_mib)
    }

    /// (vcpus in use, MiB in use, jobs waiting).
    #[getter]
    fn usage(&self) -> (u32, u64, usize) {
        self.pool.usage()
    }

    /// Like `Client.run_job`, after waiting for room in the budget.
    #[pyo3(signature = (template=None, argv=None, *, profile=None, inputs=None, outputs=None,
                        timeout=None, ready_timeout=None, env=None, cwd=None, snapshot=None,
                        cold=false))]
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        template: Option<String>,
        argv: Option<Vec<String>>,
        profile: Option<String>,
        inputs: Option<Vec<(PathBuf, String)>>,
        outputs: Option<Vec<(String, PathBuf)>>,
        timeout: Option<f64>,
        ready_timeout: Option<f64>,
        env: Option<std::collections::BTreeMap<String, String>>,
        cwd: Option<String>,
        snapshot: Option<String>,
        cold: bool,
    ) -> PyResult<JobReport> {
        let (vm, spec) = prepare(
            py,
            &self.client,
            template,
            profile,
            argv.ok_or_else(|| PyValueError::new_err("argv is required"))?,
            JobArgs {
                inputs: inputs.unwrap_or_default(),
                outputs: outputs.unwrap_or_default(),
                timeout,
                ready_timeout,
                env,
                cwd,
                snapshot,
                cold,
            },
        )?;
        let cancel = Cancel::new();
        let pool = self.pool.clone();
        let c = cancel.clone();
        let r = run_blocking(py, cancel, async move { pool.run(&vm, &spec, &c).await })?;
        Ok(JobReport::new(r))
    }

    /// Run every job (each a dict of `run`'s arguments) concurrently within the budget;
    /// reports in the order given. Ctrl-C cancels all of them and waits for their teardown.
    fn run_all(&self, py: Python<'_>, jobs: Vec<Bound<'_, PyDict>>) -> PyResult<Vec<JobReport>> {
        let mut prepared = Vec::new();
        for j in jobs {
            let get = |k: &str| j.get_item(k);
            let opt_str =
                |k: &str| -> PyResult<Option<String>> { get(k)?.map(|v| v.extract()).transpose() };
            let argv: Vec<String> = get("argv")?
                .ok_or_else(|| PyValueError::new_err("each job needs 'argv'"))?
                .extract()?;
            for k in j.keys() {
                let k: String = k.extract()?;
                if !matches!(
                    k.as_str(),
                    "template"
                        | "argv"
                        | "profile"
                        | "inputs"
                        | "outputs"
                        | "timeout"
                        | "ready_timeout"
                        | "env"
                        | "cwd"
                        | "snapshot"
                        | "cold"
                ) {
                    return Err(PyValueError::new_err(format!("unknown job key {k:?}")));
                }
            }
            prepared.push(prepare(
                py,
                &self.client,
                opt_str("template")?,
                opt_str("profile")?,
                argv,
                JobArgs {
                    inputs: get("inputs")?
                        .map(|v| v.extract())
                        .transpose()?
                        .unwrap_or_default(),
                    outputs: get("outputs")?
                        .map(|v| v.extract())
                        .transpose()?
                        .unwrap_or_default(),
                    timeout: get("timeout")?.map(|v| v.extract()).transpose()?,
                    ready_timeout: get("ready_timeout")?.map(|v| v.extract()).transpose()?,
                    env: get("env")?.map(|v| v.extract()).transpose()?,
                    cwd: opt_str("cwd")?,
                    snapshot: opt_str("snapshot")?,
                    cold: get("cold")?
                        .map(|v| v.extract())
                        .transpose()?
                        .unwrap_or(false),
                },
            )?);
        }
        let cancel = Cancel::new();
        let pool = self.pool.clone();
        let c = cancel.clone();
        let reports = run_blocking(py, cancel, async move { pool.run_all(&prepared, &c).await })?;
        Ok(reports.into_iter().map(JobReport::new).collect())
    }
}

/// `anyvm gc` as a dict: {"clones": [...], "leases_released": [...], "host_state_released": [...]}.
pub fn gc<'py>(py: Python<'py>, client: &CoreClient, dry_run: bool) -> PyResult<Bound<'py, PyAny>> {
    let r = crate::block(py, true, anyvm::job::gc::gc(client, dry_run))?;
    let text = serde_json::to_string(&r).unwrap_or_default();
    py.import("json")?.call_method1("loads", (text,))
}
