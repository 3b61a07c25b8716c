//! `ExecResult`: what a guest program produced.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::to_py;

#[pyclass(module = "anyvm._native", frozen)]
pub(crate) struct ExecResult {
    #[pyo3(get)]
    pub(crate) exit_code: Option<i32>,
    #[pyo3(get)]
    pub(crate) signal: Option<i32>,
    #[pyo3(get)]
    pub(crate) stdout: Py<PyBytes>,
    #[pyo3(get)]
    pub(crate) stderr: Py<PyBytes>,
    /// Seconds.
    #[pyo3(get)]
    pub(crate) duration: f64,
    #[pyo3(get)]
    pub(crate) truncated: bool,
    pub(crate) argv: String,
    pub(crate) vm: String,
}

impl ExecResult {
    pub(crate) fn from_core(py: Python<'_>, vm: &str, argv: String, o: anyvm::ExecOutput) -> Self {
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
