//! The shared tokio runtime, and how Python waits on it: blocking with the GIL released and
//! Ctrl-C checked, or as an awaitable.

use std::future::Future;
use std::time::Duration;

use pyo3::prelude::*;

use crate::errors::to_py;

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

pub(crate) enum Outcome<T> {
    Done(anyvm::Result<T>),
    Interrupted(PyErr),
}

/// Run `fut` with the GIL released. Every 100 ms the main thread checks for signals, so Ctrl-C
/// raises KeyboardInterrupt (the operation is abandoned) instead of waiting for the deadline.
pub(crate) fn block<T, F>(py: Python<'_>, interruptible: bool, fut: F) -> PyResult<T>
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
pub(crate) fn awaitable<'py, T, F>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    T: for<'a> IntoPyObject<'a> + Send + 'static,
    F: Future<Output = anyvm::Result<T>> + Send + 'static,
{
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        fut.await.map_err(|e| Python::attach(|py| to_py(py, e)))
    })
}
