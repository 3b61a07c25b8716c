//! Core errors become the exception classes defined in `anyvm/_errors.py` (Python defines the
//! hierarchy so `anyvm.TimeoutError` can also subclass the builtin `TimeoutError`).

use anyvm::ErrorKind;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

fn class_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::NotFound => "NotFoundError",
        ErrorKind::InvalidState => "InvalidStateError",
        ErrorKind::Timeout => "TimeoutError",
        ErrorKind::NotReady => "NotReadyError",
        ErrorKind::Auth => "AuthError",
        ErrorKind::PortInUse => "PortInUseError",
        ErrorKind::BackendUnavailable => "BackendUnavailableError",
        ErrorKind::GuestCommand => "GuestCommandError",
        ErrorKind::Config => "ConfigError",
        ErrorKind::InvalidArgument => "InvalidArgumentError",
        ErrorKind::PolicyDenied => "PolicyDenied",
        ErrorKind::Busy => "BusyError",
        ErrorKind::Io => "HostIOError",
        ErrorKind::Backend => "BackendError",
        ErrorKind::Cancelled => "CancelledError",
    }
}

pub fn to_py(py: Python<'_>, e: anyvm::Error) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = py.import("anyvm._errors")?;
        let cls = module.getattr(class_name(e.kind()))?;
        let exc = cls.call1((e.to_string(),))?;
        exc.setattr(
            "kind",
            serde_json::to_value(e.kind())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string)),
        )?;
        if let anyvm::Error::GuestCommand {
            exit_code, stderr, ..
        } = &e
        {
            exc.setattr("exit_code", *exit_code)?;
            exc.setattr("stderr", PyBytes::new(py, stderr))?;
        }
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|err| err)
}

/// An exception of the class for `kind` with `message` (errors carried in reports rather than
/// returned, such as a job's).
pub fn kind_to_py(py: Python<'_>, kind: ErrorKind, message: String) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = py.import("anyvm._errors")?;
        let exc = module.getattr(class_name(kind))?.call1((message,))?;
        exc.setattr(
            "kind",
            serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string)),
        )?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|err| err)
}
