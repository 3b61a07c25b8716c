//! Python binding: a thin pyo3 layer over the `anyvm` crate. Every VM operation runs on one
//! shared tokio runtime with the GIL released; blocking calls poll for Ctrl-C so a long wait can
//! be interrupted. Exceptions are the classes in `anyvm/_errors.py`, chosen by the core's error
//! kind. No logic here that the core lacks.

mod errors;
mod job;
mod logging;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyvm::{
    Client as CoreClient, Config, Credentials, ExecRequest, ForwardSpec, HostPort, Probe, Protocol,
    ReadySpec, SecretSource, SshOptions, StopOptions, Vm as CoreVm, VmName, VmSpec,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use errors::to_py;

fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

enum Outcome<T> {
    Done(anyvm::Result<T>),
    Interrupted(PyErr),
}

/// Run `fut` with the GIL released. Every 100 ms the main thread checks for signals, so Ctrl-C
/// raises KeyboardInterrupt (the operation is abandoned) instead of waiting for the deadline.
fn block<T, F>(py: Python<'_>, interruptible: bool, fut: F) -> PyResult<T>
where
    T: Send,
    F: Future<Output = anyvm::Result<T>> + Send,
{
    let out = py.detach(|| {
        runtime().block_on(async {
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    r = &mut fut => return Outcome::Done(r),
                    _ = tokio::time::sleep(Duration::from_millis(100)), if interruptible => {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            return Outcome::Interrupted(e);
                        }
                    }
                }
            }
        })
    });
    match out {
        Outcome::Done(r) => r.map_err(|e| to_py(py, e)),
        Outcome::Interrupted(e) => Err(e),
    }
}

/// Turn an async core call into a Python awaitable on the shared runtime.
fn awaitable<'py, T, F>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    T: for<'a> IntoPyObject<'a> + Send + 'static,
    F: Future<Output = anyvm::Result<T>> + Send + 'static,
{
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        fut.await.map_err(|e| Python::attach(|py| to_py(py, e)))
    })
}

fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    anyvm::positive_secs(s, what).map_err(|e| PyValueError::new_err(e.to_string()))
}

fn ready_spec(
    timeout: f64,
    probes: Option<Vec<Bound<'_, PyAny>>>,
    mode: &str,
) -> PyResult<ReadySpec> {
    let mut spec = ReadySpec::default().timeout(seconds("timeout", timeout)?);
    if let Some(ps) = probes {
        spec.probes.clear();
        for p in ps {
            // The core's one probe syntax; tuples are spelled into it.
            let text = if let Ok(s) = p.extract::<String>() {
                s
            } else if let Ok((kind, port)) = p.extract::<(String, u16)>() {
                format!("{kind}:{port}")
            } else if let Ok((kind, argv)) = p.extract::<(String, Vec<String>)>() {
                format!(
                    "{kind}:{}",
                    serde_json::to_string(&argv)
                        .map_err(|e| PyValueError::new_err(e.to_string()))?
                )
            } else {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "a probe is \"agent\", \"tcp:PORT\", \"ssh:PORT\", \"command:[...]\" or a tuple (\"tcp\", port), (\"ssh\", port), (\"command\", [argv])",
                ));
            };
            let probe: Probe = text
                .parse()
                .map_err(|e: anyvm::Error| PyValueError::new_err(e.to_string()))?;
            spec.probes.push(probe);
        }
    }
    match mode {
        "all" => {}
        "any" => spec = spec.any(),
        m => {
            return Err(PyValueError::new_err(format!(
                "mode must be \"all\" or \"any\", got {m:?}"
            )))
        }
    }
    spec.validate()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(spec)
}

#[allow(clippy::too_many_arguments)]
fn exec_request(
    argv: Vec<String>,
    env: Option<BTreeMap<String, String>>,
    cwd: Option<String>,
    stdin: Option<Vec<u8>>,
    timeout: f64,
) -> PyResult<ExecRequest> {
    let mut req =
        ExecRequest::from_argv(&argv).map_err(|e| PyValueError::new_err(e.to_string()))?;
    req.timeout = seconds("timeout", timeout)?;
    req.env = env.unwrap_or_default();
    req.cwd = cwd;
    req.stdin = stdin;
    req.validate()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(req)
}

/// What a guest program produced.
#[pyclass(module = "anyvm._native", frozen)]
struct ExecResult {
    #[pyo3(get)]
    exit_code: Option<i32>,
    #[pyo3(get)]
    signal: Option<i32>,
    #[pyo3(get)]
    stdout: Py<PyBytes>,
    #[pyo3(get)]
    stderr: Py<PyBytes>,
    /// Seconds.
    #[pyo3(get)]
    duration: f64,
    #[pyo3(get)]
    truncated: bool,
    argv: String,
    vm: String,
}

impl ExecResult {
    fn from_core(py: Python<'_>, vm: &str, argv: String, o: anyvm::ExecOutput) -> Self {
        ExecResult {
            exit_code: o.exit_code,
            signal: o.signal,
            stdout: PyBytes::new(py, &o.stdout).unbind(),
            stderr: PyBytes::new(py, &o.stderr).unbind(),
            duration: o.duration.as_secs_f64(),
            truncated: o.stdout_truncated || o.stderr_truncated,
            argv,
            vm: vm.to_string(),
        }
    }
}

#[pymethods]
impl ExecResult {
    /// Raise GuestCommandError unless the program exited 0 (like CompletedProcess.check_returncode).
    fn check(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let me = slf.get();
        if me.exit_code == Some(0) {
            return Ok(slf);
        }
        let py = slf.py();
        let stderr = me.stderr.bind(py).as_bytes();
        Err(to_py(
            py,
            anyvm::guest_command_error(&me.vm, &me.argv, me.exit_code, me.signal, stderr),
        ))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "ExecResult(exit_code={:?}, stdout={} bytes, stderr={} bytes, duration={:.3}s)",
            self.exit_code,
            self.stdout.bind(py).as_bytes().len(),
            self.stderr.bind(py).as_bytes().len(),
            self.duration
        )
    }
}

/// A connection to one hypervisor. Use `anyvm.connect(...)`.
#[pyclass(module = "anyvm._native", frozen)]
struct Client {
    inner: CoreClient,
}

/// Open a backend: "libvirt:qemu:///system", "virtualbox", "vmware:ws"; or take it from an
/// anyvm.toml given as `config`.
#[pyfunction]
#[pyo3(signature = (uri=None, *, config=None, state_dir=None, port_range=None))]
fn connect(
    py: Python<'_>,
    uri: Option<String>,
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    port_range: Option<(u16, u16)>,
) -> PyResult<Client> {
    let config = match config {
        Some(p) => Some(Config::load(&p).map_err(|e| to_py(py, e))?),
        None => None,
    };
    let uri = uri
        .or_else(|| config.as_ref().map(Config::backend_uri))
        .unwrap_or_else(|| anyvm::DEFAULT_BACKEND.into());
    let mut opts = config
        .as_ref()
        .map(Config::client_options)
        .unwrap_or_default();
    if let Some(d) = state_dir {
        opts = opts.state_dir(d);
    }
    if let Some((a, b)) = port_range {
        if a == 0 || a > b {
            return Err(PyValueError::new_err(
                "port_range must be (low, high) with 1 <= low <= high",
            ));
        }
        opts = opts.port_range(a..=b);
    }
    let inner = block(py, true, CoreClient::connect_configured(&uri, opts, config))?;
    Ok(Client { inner })
}

impl Client {
    fn machine(&self, py: Python<'_>, name: &str) -> PyResult<anyvm::MachineConfig> {
        match self.inner.config() {
            Some(c) => c.machine(name).cloned().map_err(|e| to_py(py, e)),
            None => Err(to_py(
                py,
                anyvm::Error::config(
                    None,
                    format!("machines.{name}"),
                    "no config given to connect()",
                ),
            )),
        }
    }
}

#[pymethods]
impl Client {
    /// The backend URI, e.g. "libvirt:qemu:///system".
    #[getter]
    fn uri(&self) -> String {
        self.inner.backend().uri()
    }

    /// Run `argv` in a fresh linked clone of `template` (or of `profile`'s machine, whose
    /// resources are then checked first) and remove the clone, whatever happens. Inputs are
    /// (host, guest) pairs copied in before, outputs (guest, host) pairs copied out after;
    /// directories go whole. `timeout` limits the command's wall-clock seconds.
    #[pyo3(signature = (template=None, argv=None, *, profile=None, inputs=None, outputs=None,
                        timeout=None, ready_timeout=None, env=None, cwd=None, snapshot=None))]
    #[allow(clippy::too_many_arguments)]
    fn run_job(
        &self,
        py: Python<'_>,
        template: Option<String>,
        argv: Option<Vec<String>>,
        profile: Option<String>,
        inputs: Option<Vec<(PathBuf, String)>>,
        outputs: Option<Vec<(String, PathBuf)>>,
        timeout: Option<f64>,
        ready_timeout: Option<f64>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        snapshot: Option<String>,
    ) -> PyResult<job::JobReport> {
        let (vm, spec) = job::prepare(
            py,
            &self.inner,
            template,
            profile,
            argv.ok_or_else(|| PyValueError::new_err("argv is required"))?,
            job::JobArgs {
                inputs: inputs.unwrap_or_default(),
                outputs: outputs.unwrap_or_default(),
                timeout,
                ready_timeout,
                env,
                cwd,
                snapshot,
            },
        )?;
        let cancel = anyvm::Cancel::new();
        let client = self.inner.clone();
        let c = cancel.clone();
        let r = job::run_blocking(py, cancel, async move {
            anyvm::run_job(&client, &vm, &spec, &c).await
        })?;
        Ok(job::JobReport::new(r))
    }

    /// A pool that runs jobs within `cpus` vCPUs and `memory_mib` (default: this host's cores
    /// plus one, and 90% of its available memory).
    #[pyo3(signature = (*, cpus=None, memory_mib=None))]
    fn job_pool(&self, cpus: Option<u32>, memory_mib: Option<u64>) -> PyResult<job::JobPool> {
        job::JobPool::new(self.inner.clone(), cpus, memory_mib)
    }

    /// Remove job clones whose owner process is gone, and stale port leases.
    #[pyo3(signature = (*, dry_run=false))]
    fn gc<'py>(&self, py: Python<'py>, dry_run: bool) -> PyResult<Bound<'py, PyAny>> {
        job::gc(py, &self.inner, dry_run)
    }

    /// Health checks of this client's backend and of the host, as dicts: backend, name,
    /// status ("ok", "warn", "fail"), detail, hint.
    fn doctor<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let c = self.inner.clone();
        let report = block(
            py,
            true,
            async move { Ok::<_, anyvm::Error>(c.doctor().await) },
        )?;
        report
            .checks
            .into_iter()
            .map(|ch| {
                let d = PyDict::new(py);
                d.set_item("backend", ch.backend)?;
                d.set_item("name", ch.name)?;
                d.set_item("status", ch.status.to_string())?;
                d.set_item("detail", ch.detail)?;
                d.set_item("hint", ch.hint)?;
                Ok(d)
            })
            .collect()
    }

    /// VMs as dicts: name, state, managed.
    fn list<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let c = self.inner.clone();
        let vms = block(py, true, async move { c.list().await })?;
        vms.into_iter()
            .map(|v| {
                let d = PyDict::new(py);
                d.set_item("name", v.name)?;
                d.set_item("state", v.state.to_string())?;
                d.set_item("managed", v.managed)?;
                Ok(d)
            })
            .collect()
    }

    /// A handle on an existing VM (NotFoundError if there is none).
    fn vm(&self, py: Python<'_>, name: String) -> PyResult<Vm> {
        let c = self.inner.clone();
        let vm = block(py, true, async move { c.vm(&name).await })?;
        Ok(Vm { inner: vm })
    }

    /// Define a VM from a spec dict (the JSON form of anyvm's VmSpec) or a machine name from
    /// the config.
    fn define(&self, py: Python<'_>, spec: Bound<'_, PyAny>) -> PyResult<Vm> {
        let spec: VmSpec = if let Ok(name) = spec.extract::<String>() {
            self.machine(py, &name)?.spec
        } else {
            let json: String = py
                .import("json")?
                .call_method1("dumps", (spec,))?
                .extract()?;
            serde_json::from_str(&json)
                .map_err(|e| PyValueError::new_err(format!("invalid VM spec: {e}")))?
        };
        let c = self.inner.clone();
        let vm = block(py, true, async move { c.define(spec).await })?;
        Ok(Vm { inner: vm })
    }

    /// Define (if needed), start and wait until ready, for a machine in the config.
    #[pyo3(signature = (name, timeout=None))]
    fn up(&self, py: Python<'_>, name: String, timeout: Option<f64>) -> PyResult<Vm> {
        let m = self.machine(py, &name)?;
        let mut ready = m.ready.clone();
        if let Some(t) = timeout {
            ready.timeout = seconds("timeout", t)?;
        }
        let c = self.inner.clone();
        let vm = block(py, true, async move { c.up(m.spec, &ready).await })?;
        Ok(Vm { inner: vm })
    }

    fn __repr__(&self) -> String {
        format!("Client({:?})", self.inner.backend().uri())
    }
}

/// One VM. Methods block (with the GIL released); `vm.aio` has awaitable versions.
#[pyclass(module = "anyvm._native", frozen)]
#[derive(Clone)]
struct Vm {
    inner: CoreVm,
}

#[pymethods]
impl Vm {
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }

    /// "running", "paused", "saved", "shut off", "busy", "crashed" or "unknown".
    #[getter]
    fn state(&self, py: Python<'_>) -> PyResult<String> {
        let vm = self.inner.clone();
        Ok(block(py, true, async move { vm.state().await })?.to_string())
    }

    /// Use this guest account for exec and file copy (VirtualBox, VMware). The password comes from
    /// a file or an environment variable, never from a literal.
    #[pyo3(signature = (user, *, password_file=None, password_env=None, identity_file=None))]
    fn with_credentials(
        &self,
        user: String,
        password_file: Option<PathBuf>,
        password_env: Option<String>,
        identity_file: Option<PathBuf>,
    ) -> PyResult<Vm> {
        let mut c = Credentials::user(user);
        c.password = match (password_file, password_env) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "give password_file or password_env, not both",
                ))
            }
            (Some(f), None) => Some(SecretSource::File(f)),
            (None, Some(v)) => Some(SecretSource::Env(v)),
            (None, None) => None,
        };
        c.identity_file = identity_file;
        Ok(Vm {
            inner: self.inner.clone().with_credentials(c),
        })
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.inner.clone();
        block(py, true, async move { vm.start().await })
    }

    /// Graceful shutdown with `timeout` seconds, then power off. Returns "graceful", "forced" or
    /// "already_off".
    #[pyo3(signature = (*, force=false, timeout=60.0))]
    fn stop(&self, py: Python<'_>, force: bool, timeout: f64) -> PyResult<String> {
        let opts = StopOptions {
            force,
            timeout: seconds("timeout", timeout)?,
        };
        let vm = self.inner.clone();
        let r = block(py, false, async move { vm.stop(opts).await })?;
        Ok(r.to_string())
    }

    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.inner.clone();
        block(py, true, async move { vm.pause().await })
    }
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.inner.clone();
        block(py, true, async move { vm.resume().await })
    }
    /// Hardware reset: the guest restarts at once, without a shutdown.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.inner.clone();
        block(py, true, async move { vm.reset().await })
    }
    fn save_state(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.inner.clone();
        block(py, true, async move { vm.save_state().await })
    }

    /// Power off and remove the VM with its snapshots, clone disks and port leases. Raises
    /// InvalidStateError naming the linked clones that depend on it, unless `with_clones`
    /// (then they are destroyed first).
    #[pyo3(signature = (*, with_clones=false))]
    fn destroy(&self, py: Python<'_>, with_clones: bool) -> PyResult<()> {
        let vm = self.inner.clone();
        let o = anyvm::DestroyOptions::default().with_clones(with_clones);
        block(
            py,
            false,
            async move { vm.destroy_with(o).await.map(|_| ()) },
        )
    }

    /// Linked clones that depend on this VM (on `snapshot` of it), deepest first.
    #[pyo3(signature = (snapshot=None))]
    fn dependants(&self, py: Python<'_>, snapshot: Option<String>) -> PyResult<Vec<String>> {
        let vm = self.inner.clone();
        block(
            py,
            true,
            async move { vm.dependants(snapshot.as_deref()).await },
        )
    }

    /// Write the powered-off VM as an OVA appliance (VirtualBox).
    fn export(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let vm = self.inner.clone();
        block(py, true, async move { vm.export_appliance(&path).await })
    }

    /// Wait until the guest passes its probes. Probes: "agent", ("tcp", port), ("ssh", port),
    /// ("command", [argv]). Returns {"elapsed": s, "passed": [(probe, s), ...]}.
    #[pyo3(signature = (*, timeout=120.0, probes=None, mode="all"))]
    fn wait_ready<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
        probes: Option<Vec<Bound<'py, PyAny>>>,
        mode: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let spec = ready_spec(timeout, probes, mode)?;
        let vm = self.inner.clone();
        let rep = block(py, true, async move { vm.wait_ready(&spec).await })?;
        let d = PyDict::new(py);
        d.set_item("elapsed", rep.elapsed.as_secs_f64())?;
        d.set_item("passed", rep.passed)?;
        Ok(d)
    }

    /// Run a program in the guest: argv is a list of strings (no shell).
    #[pyo3(signature = (argv, *, env=None, cwd=None, stdin=None, timeout=300.0))]
    fn exec(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        stdin: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<ExecResult> {
        let req = exec_request(argv, env, cwd, stdin, timeout)?;
        let shown = req.display_argv();
        let vm = self.inner.clone();
        let out = block(py, true, async move { vm.exec(&req).await })?;
        Ok(ExecResult::from_core(
            py,
            self.inner.name().as_str(),
            shown,
            out,
        ))
    }

    /// Copy a host file into the guest; returns the number of bytes.
    fn copy_to(&self, py: Python<'_>, host_path: PathBuf, guest_path: String) -> PyResult<u64> {
        let vm = self.inner.clone();
        block(py, true, async move {
            vm.copy_to(&host_path, &guest_path).await
        })
    }

    /// Copy a guest file to the host; returns the number of bytes.
    fn copy_from(&self, py: Python<'_>, guest_path: String, host_path: PathBuf) -> PyResult<u64> {
        let vm = self.inner.clone();
        block(py, true, async move {
            vm.copy_from(&guest_path, &host_path).await
        })
    }

    /// Forward a host port ("auto" or a number) to `guest_port`; returns the forward as a dict.
    #[pyo3(signature = (guest_port, *, host_port=None, name=None, proto="tcp", host_addr="127.0.0.1"))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        guest_port: u16,
        host_port: Option<u16>,
        name: Option<String>,
        proto: &str,
        host_addr: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let proto: Protocol = proto
            .parse()
            .map_err(|e: anyvm::Error| PyValueError::new_err(e.to_string()))?;
        let mut spec = ForwardSpec::new(
            name.unwrap_or_else(|| format!("{proto}-{guest_port}")),
            guest_port,
        )
        .proto(proto)
        .host_port(host_port.map(HostPort::Fixed).unwrap_or(HostPort::Auto));
        spec.host_addr = host_addr.to_string();
        let vm = self.inner.clone();
        let f = block(py, true, async move { vm.forward_add(&spec).await })?;
        forward_dict(py, &f)
    }

    /// Remove a forward by name (or host port).
    fn forward_remove(&self, py: Python<'_>, name: String) -> PyResult<()> {
        let vm = self.inner.clone();
        block(py, true, async move {
            vm.forward_remove(&name).await.map(|_| ())
        })
    }

    /// The VM's forwards as dicts: name, proto, host_addr, host_port, guest_port.
    #[getter]
    fn ports<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let vm = self.inner.clone();
        let fs = block(py, true, async move { vm.forwards().await })?;
        fs.iter().map(|f| forward_dict(py, f)).collect()
    }

    #[pyo3(signature = (name, description=""))]
    fn snapshot(&self, py: Python<'_>, name: String, description: &str) -> PyResult<()> {
        let vm = self.inner.clone();
        let d = description.to_string();
        block(py, true, async move { vm.snapshot_take(&name, &d).await })
    }
    fn restore(&self, py: Python<'_>, name: String) -> PyResult<()> {
        let vm = self.inner.clone();
        block(py, true, async move { vm.snapshot_restore(&name).await })
    }
    #[pyo3(signature = (name, *, with_clones=false))]
    fn delete_snapshot(&self, py: Python<'_>, name: String, with_clones: bool) -> PyResult<()> {
        let vm = self.inner.clone();
        let o = anyvm::DestroyOptions::default().with_clones(with_clones);
        block(
            py,
            true,
            async move { vm.snapshot_delete_with(&name, o).await },
        )
    }
    /// Snapshot names, oldest first.
    fn snapshots(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let vm = self.inner.clone();
        Ok(block(py, true, async move { vm.snapshots().await })?
            .into_iter()
            .map(|s| s.name)
            .collect())
    }

    /// A copy-on-write clone with fresh ports.
    #[pyo3(name = "clone", signature = (new_name, *, snapshot=None))]
    fn clone_vm(&self, py: Python<'_>, new_name: String, snapshot: Option<String>) -> PyResult<Vm> {
        let name = VmName::new(new_name).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let vm = self.inner.clone();
        let c = block(py, true, async move {
            vm.clone_linked(&name, snapshot.as_deref()).await
        })?;
        Ok(Vm { inner: c })
    }

    /// An OpenSSH config block for this guest with its host key pinned.
    #[pyo3(signature = (*, user=None, identity_file=None, guest_port=22))]
    fn ssh_config(
        &self,
        py: Python<'_>,
        user: Option<String>,
        identity_file: Option<PathBuf>,
        guest_port: u16,
    ) -> PyResult<String> {
        let opts = SshOptions {
            user,
            identity_file,
            guest_port: Some(guest_port),
            alias: None,
        };
        let vm = self.inner.clone();
        Ok(block(py, true, async move { vm.ssh_config(&opts).await })?.stanza)
    }

    /// Start, wait ready, and always stop on exit: `with vm.running(): ...`.
    #[pyo3(signature = (*, timeout=120.0, probes=None, mode="all", stop_timeout=60.0))]
    fn running(
        &self,
        timeout: f64,
        probes: Option<Vec<Bound<'_, PyAny>>>,
        mode: &str,
        stop_timeout: f64,
    ) -> PyResult<Running> {
        Ok(Running {
            vm: self.clone(),
            ready: ready_spec(timeout, probes, mode)?,
            stop: StopOptions {
                force: false,
                timeout: seconds("stop_timeout", stop_timeout)?,
            },
            destroy: false,
        })
    }

    /// A clone that exists only inside the `with` block: cloned, started, ready; destroyed on exit.
    #[pyo3(signature = (name, *, snapshot=None, timeout=120.0, probes=None, mode="all"))]
    fn transient_clone(
        &self,
        py: Python<'_>,
        name: String,
        snapshot: Option<String>,
        timeout: f64,
        probes: Option<Vec<Bound<'_, PyAny>>>,
        mode: &str,
    ) -> PyResult<Running> {
        let ready = ready_spec(timeout, probes, mode)?;
        let name = VmName::new(name).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let base = self.inner.clone();
        // Owner-labelled like a job's clone: `anyvm gc` collects it if this process is killed.
        let clone = block(py, true, async move {
            anyvm::job::transient_clone(&base, &name, snapshot.as_deref()).await
        })?;
        Ok(Running {
            vm: Vm { inner: clone },
            ready,
            stop: StopOptions {
                force: true,
                timeout: Duration::from_secs(10),
            },
            destroy: true,
        })
    }

    // --- asyncio ---

    fn start_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let vm = self.inner.clone();
        awaitable(py, async move { vm.start().await })
    }

    #[pyo3(signature = (*, force=false, timeout=60.0))]
    fn stop_async<'py>(
        &self,
        py: Python<'py>,
        force: bool,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = StopOptions {
            force,
            timeout: seconds("timeout", timeout)?,
        };
        let vm = self.inner.clone();
        awaitable(
            py,
            async move { vm.stop(opts).await.map(|o| o.to_string()) },
        )
    }

    fn state_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let vm = self.inner.clone();
        awaitable(py, async move { vm.state().await.map(|s| s.to_string()) })
    }

    #[pyo3(signature = (*, timeout=120.0, probes=None, mode="all"))]
    fn wait_ready_async<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
        probes: Option<Vec<Bound<'py, PyAny>>>,
        mode: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let spec = ready_spec(timeout, probes, mode)?;
        let vm = self.inner.clone();
        awaitable(py, async move {
            vm.wait_ready(&spec).await.map(|r| r.elapsed.as_secs_f64())
        })
    }

    #[pyo3(signature = (argv, *, env=None, cwd=None, stdin=None, timeout=300.0))]
    fn exec_async<'py>(
        &self,
        py: Python<'py>,
        argv: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        stdin: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let req = exec_request(argv, env, cwd, stdin, timeout)?;
        let vm = self.inner.clone();
        let name = vm.name().to_string();
        let shown = req.display_argv();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match vm.exec(&req).await {
                Ok(o) => Python::attach(|py| Ok(ExecResult::from_core(py, &name, shown, o))),
                Err(e) => Err(Python::attach(|py| to_py(py, e))),
            }
        })
    }

    fn copy_to_async<'py>(
        &self,
        py: Python<'py>,
        host_path: PathBuf,
        guest_path: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let vm = self.inner.clone();
        awaitable(py, async move { vm.copy_to(&host_path, &guest_path).await })
    }

    fn copy_from_async<'py>(
        &self,
        py: Python<'py>,
        guest_path: String,
        host_path: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        let vm = self.inner.clone();
        awaitable(
            py,
            async move { vm.copy_from(&guest_path, &host_path).await },
        )
    }

    /// For benchmarks: time `op` ("exec_true" or "state") `n` times purely in Rust, so the
    /// Python call overhead can be compared on the same guest. Seconds per call.
    fn _rust_timings(&self, py: Python<'_>, op: &str, n: usize) -> PyResult<Vec<f64>> {
        let vm = self.inner.clone();
        let exec = match op {
            "exec_true" => true,
            "state" => false,
            o => return Err(PyValueError::new_err(format!("unknown op {o:?}"))),
        };
        block(py, true, async move {
            let req = ExecRequest::new("true");
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let t = std::time::Instant::now();
                if exec {
                    vm.exec(&req).await?;
                } else {
                    vm.state().await?;
                }
                out.push(t.elapsed().as_secs_f64());
            }
            Ok(out)
        })
    }

    fn __repr__(&self) -> String {
        format!("Vm({:?})", self.inner.name().as_str())
    }
}

fn forward_dict<'py>(py: Python<'py>, f: &anyvm::PortForward) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &f.name)?;
    d.set_item("proto", f.proto.to_string())?;
    d.set_item("host_addr", &f.host_addr)?;
    d.set_item("host_port", f.host_port)?;
    d.set_item("guest_port", f.guest_port)?;
    Ok(d)
}

/// The context manager behind `vm.running()` and `vm.transient_clone()`.
#[pyclass(module = "anyvm._native", frozen)]
struct Running {
    vm: Vm,
    ready: ReadySpec,
    stop: StopOptions,
    destroy: bool,
}

#[pymethods]
impl Running {
    fn __enter__(&self, py: Python<'_>) -> PyResult<Vm> {
        let vm = self.vm.inner.clone();
        let ready = self.ready.clone();
        let r = block(py, true, async move {
            vm.start().await?;
            vm.wait_ready(&ready).await.map(|_| ())
        });
        if let Err(e) = r {
            // __exit__ does not run when __enter__ fails: clean up here.
            self.cleanup(py);
            return Err(e);
        }
        Ok(self.vm.clone())
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.cleanup(py);
        Ok(false)
    }
}

impl Running {
    /// Not interruptible: a second Ctrl-C must not leave a VM running.
    fn cleanup(&self, py: Python<'_>) {
        let vm = self.vm.inner.clone();
        let (stop, destroy) = (self.stop, self.destroy);
        let r = block(py, false, async move {
            if destroy {
                vm.destroy().await
            } else {
                vm.stop(stop).await.map(|_| ())
            }
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "cleanup after the with-block failed");
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::install();
    m.add_class::<Client>()?;
    m.add_class::<Vm>()?;
    m.add_class::<ExecResult>()?;
    m.add_class::<Running>()?;
    m.add_class::<job::JobReport>()?;
    m.add_class::<job::JobPool>()?;
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(logging::set_log_level, m)?)?;
    Ok(())
}
