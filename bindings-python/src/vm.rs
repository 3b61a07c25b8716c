//! `Vm`: one VM's operations, blocking and (`vm.aio`) awaitable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyvm::{
    Credentials, ExecRequest, ForwardSpec, HostPort, Protocol, SecretSource, SshOptions,
    StopOptions, Vm as CoreVm, VmName,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use std::sync::{Arc, Mutex};

use pyo3::types::PyBytes;

use crate::block;
use crate::convert::exec_request;
use crate::convert::forward_dict;
use crate::convert::ready_spec;
use crate::errors::to_py;
use crate::exec::ExecResult;
use crate::running::Running;
use crate::runtime::awaitable;
use crate::seconds;
use crate::stream::ExecStream;

/// One VM. Methods block (with the GIL released); `vm.aio` has awaitable versions.
#[pyclass(module = "anyvm._native", frozen)]
#[derive(Clone)]
pub(crate) struct Vm {
    pub(crate) inner: CoreVm,
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

    /// Run a program in the guest: argv is a list of strings (no shell). With `on_output`,
    /// `on_output(stream, data)` is called with each chunk as it arrives ("stdout"/"stderr",
    /// bytes) and the result holds no output; an exception it raises kills the program and
    /// propagates.
    #[pyo3(signature = (argv, *, env=None, cwd=None, stdin=None, timeout=300.0, on_output=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        stdin: Option<Vec<u8>>,
        timeout: f64,
        on_output: Option<Py<PyAny>>,
    ) -> PyResult<ExecResult> {
        let req = exec_request(argv, env, cwd, stdin, timeout)?;
        let shown = req.display_argv();
        let vm = self.inner.clone();
        let Some(cb) = on_output else {
            let out = block(py, true, async move { vm.exec(&req).await })?;
            return Ok(ExecResult::from_core(py, vm_name(&self.inner), shown, out));
        };
        let raised: Arc<Mutex<Option<PyErr>>> = Arc::new(Mutex::new(None));
        let r2 = raised.clone();
        let out = block(py, true, async move {
            let mut s = vm.exec_stream(&req).await?;
            while let Some(c) = s.next().await {
                let r = Python::attach(|py| {
                    cb.call1(py, (c.stream.as_str(), PyBytes::new(py, &c.data)))
                        .map(|_| ())
                });
                if let Err(e) = r {
                    *r2.lock().expect("callback error") = Some(e);
                    s.cancel();
                }
            }
            s.wait().await
        });
        if let Some(e) = raised.lock().expect("callback error").take() {
            return Err(e);
        }
        Ok(ExecResult::from_core(py, vm_name(&self.inner), shown, out?))
    }

    /// Start a program and read its output while it runs: returns an ExecStream to iterate
    /// (or `async for`) over `(stream, data)` pairs, then `wait()`. Bad requests raise here.
    #[pyo3(signature = (argv, *, env=None, cwd=None, stdin=None, timeout=300.0))]
    fn exec_stream(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        stdin: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<ExecStream> {
        let req = exec_request(argv, env, cwd, stdin, timeout)?;
        let shown = req.display_argv();
        let vm = self.inner.clone();
        let s = block(py, false, async move { vm.exec_stream(&req).await })?;
        Ok(ExecStream::new(s, vm_name(&self.inner).to_string(), shown))
    }

    /// Copy a host file into the guest; returns the number of bytes. `progress(done, total)`
    /// is called as the copy moves.
    #[pyo3(signature = (host_path, guest_path, *, progress=None))]
    fn copy_to(
        &self,
        py: Python<'_>,
        host_path: PathBuf,
        guest_path: String,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<u64> {
        let vm = self.inner.clone();
        block(py, true, async move {
            match progress {
                None => vm.copy_to(&host_path, &guest_path).await,
                Some(cb) => {
                    vm.copy_to_with(&host_path, &guest_path, progress_fn(cb))
                        .await
                }
            }
        })
    }

    /// Copy a guest file to the host; returns the number of bytes. `progress(done, total)`
    /// is called as the copy moves.
    #[pyo3(signature = (guest_path, host_path, *, progress=None))]
    fn copy_from(
        &self,
        py: Python<'_>,
        guest_path: String,
        host_path: PathBuf,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<u64> {
        let vm = self.inner.clone();
        block(py, true, async move {
            match progress {
                None => vm.copy_from(&guest_path, &host_path).await,
                Some(cb) => {
                    vm.copy_from_with(&guest_path, &host_path, progress_fn(cb))
                        .await
                }
            }
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

    /// This stopped template's warm state, made now if its definition or disks changed: a
    /// clone is booted, waited for (`timeout`, `probes` as in wait_ready), saved and removed.
    /// Returns {"template", "key", "dir", "memory_bytes", "disk_bytes", "saved_in"}.
    #[pyo3(signature = (*, timeout=120.0, probes=None))]
    fn warm<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
        probes: Option<Vec<Bound<'py, PyAny>>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let spec = ready_spec(timeout, probes, "all")?;
        let vm = self.inner.clone();
        let info = block(py, true, async move { vm.warm(&spec).await })?;
        let text = serde_json::to_string(&info).unwrap_or_default();
        py.import("json")?.call_method1("loads", (text,))
    }

    /// A clone started from this template's warm state (made first if needed): running and
    /// ready when returned, with its own ports, generation ID, entropy and the host's clock.
    #[pyo3(signature = (new_name, *, timeout=120.0, probes=None))]
    fn clone_warm<'py>(
        &self,
        py: Python<'py>,
        new_name: String,
        timeout: f64,
        probes: Option<Vec<Bound<'py, PyAny>>>,
    ) -> PyResult<Vm> {
        let name = VmName::new(new_name).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let spec = ready_spec(timeout, probes, "all")?;
        let vm = self.inner.clone();
        let c = block(py, true, async move { vm.clone_warm(&name, &spec).await })?;
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

    /// Save a PNG of the running guest's screen at `path`; returns {"path", "width",
    /// "height"}.
    fn screenshot<'py>(&self, py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
        let vm = self.inner.clone();
        let p = path.clone();
        let shot = block(py, true, async move { vm.screenshot_to(&p).await })?;
        let d = PyDict::new(py);
        d.set_item("path", path)?;
        d.set_item("width", shot.width)?;
        d.set_item("height", shot.height)?;
        Ok(d)
    }

    /// Where a viewer reaches the guest's screen: {"protocol", "host", "port", "url"}, or
    /// None when the VM has no remote display.
    fn remote_display<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let vm = self.inner.clone();
        let Some(r) = block(py, true, async move { vm.remote_display().await })? else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("protocol", r.protocol)?;
        d.set_item("host", r.host)?;
        d.set_item("port", r.port)?;
        d.set_item("url", r.url)?;
        Ok(Some(d))
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

fn vm_name(vm: &CoreVm) -> &str {
    vm.name().as_str()
}

/// A Python progress callback for the core; what it raises is logged, not fatal to the copy.
fn progress_fn(cb: Py<PyAny>) -> impl Fn(u64, Option<u64>) + Send + Sync + 'static {
    move |done, total| {
        Python::attach(|py| {
            if let Err(e) = cb.call1(py, (done, total)) {
                tracing::warn!(error = %e, "copy progress callback raised");
            }
        })
    }
}
