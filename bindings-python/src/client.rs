//! `Client` and `connect`: a connection to one hypervisor.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyvm::{Client as CoreClient, Config, VmSpec};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::block;
use crate::errors::to_py;
use crate::job;
use crate::seconds;
use crate::vm::Vm;

#[pyclass(module = "anyvm._native", frozen)]
pub(crate) struct Client {
    pub(crate) inner: CoreClient,
}

/// Open a backend: "libvirt:qemu:///system", "virtualbox", "vmware:ws"; or take it from an
/// anyvm.toml given as `config`.
#[pyfunction]
#[pyo3(signature = (uri=None, *, config=None, state_dir=None, port_range=None))]
pub(crate) fn connect(
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
    /// `on_phase(phase, clone)` is called as each phase begins; if it raises, the job is
    /// cancelled (its clone removed) and the exception raised.
    #[pyo3(signature = (template=None, argv=None, *, profile=None, inputs=None, outputs=None,
                        timeout=None, ready_timeout=None, env=None, cwd=None, snapshot=None,
                        cold=false, on_phase=None))]
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
        cold: bool,
        on_phase: Option<Py<PyAny>>,
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
                cold,
            },
        )?;
        let cancel = anyvm::Cancel::new();
        let client = self.inner.clone();
        let c = cancel.clone();
        // A callback that raises cancels the job; its exception is raised after the teardown.
        let raised: std::sync::Arc<std::sync::Mutex<Option<PyErr>>> = Default::default();
        let hook = on_phase.map(|cb| {
            let (raised, cancel) = (raised.clone(), cancel.clone());
            let f: anyvm::PhaseFn = std::sync::Arc::new(move |e: &anyvm::JobEvent| {
                let r = Python::attach(|py| {
                    cb.call1(py, (e.phase.to_string(), e.vm.clone()))
                        .map(|_| ())
                });
                if let Err(err) = r {
                    raised
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(err);
                    cancel.cancel();
                }
            });
            f
        });
        let r = job::run_blocking(py, cancel, async move {
            match hook {
                Some(h) => anyvm::run_job_with(&client, &vm, &spec, &c, h).await,
                None => anyvm::run_job(&client, &vm, &spec, &c).await,
            }
        })?;
        if let Some(e) = raised.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
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

    /// Everything that happens from now on to this client's VMs, jobs and copies, as an
    /// EventStream of dicts (iterate, `async for`, or `next_event(timeout)`).
    fn events(&self) -> crate::stream::EventStream {
        // The backend's own events are relayed on the shared runtime.
        let _rt = crate::runtime().enter();
        crate::stream::EventStream::new(self.inner.events())
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
