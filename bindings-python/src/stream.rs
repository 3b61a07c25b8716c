//! `ExecStream` and `EventStream`: output and events read as they arrive, by iteration (the
//! GIL released while waiting, Ctrl-C honoured) or by `async for`.

use std::sync::Arc;
use std::time::Duration;

use anyvm::{Event, ExecCanceller, OutputChunk};
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use tokio::sync::Mutex;

use crate::block;
use crate::errors::to_py;
use crate::exec::ExecResult;

/// A guest program's output as it is written: iterate (or `async for`) over
/// `(stream, data)` pairs, "stdout"/"stderr" and bytes; `wait()` gives the ExecResult with the
/// output not read. Leaving a `with` block, `cancel()`, or dropping it kills the program.
#[pyclass(module = "anyvm._native", frozen)]
pub(crate) struct ExecStream {
    inner: Arc<Mutex<Option<anyvm::ExecStream>>>,
    canceller: ExecCanceller,
    vm: String,
    argv: String,
}

impl ExecStream {
    pub(crate) fn new(s: anyvm::ExecStream, vm: String, argv: String) -> Self {
        ExecStream {
            canceller: s.canceller(),
            inner: Arc::new(Mutex::new(Some(s))),
            vm,
            argv,
        }
    }
}

fn chunk_tuple(py: Python<'_>, c: OutputChunk) -> PyResult<Py<PyTuple>> {
    Ok(PyTuple::new(
        py,
        [
            c.stream.as_str().into_pyobject(py)?.into_any(),
            PyBytes::new(py, &c.data).into_any(),
        ],
    )?
    .unbind())
}

async fn next_chunk(inner: &Mutex<Option<anyvm::ExecStream>>) -> Option<OutputChunk> {
    match inner.lock().await.as_mut() {
        Some(s) => s.next().await,
        None => None,
    }
}

async fn wait_stream(inner: &Mutex<Option<anyvm::ExecStream>>) -> anyvm::Result<anyvm::ExecOutput> {
    let s = inner.lock().await.take();
    match s {
        Some(s) => s.wait().await,
        None => Err(anyvm::Error::invalid_arg(
            "ExecStream.wait",
            "the stream was already waited for",
        )),
    }
}

#[pymethods]
impl ExecStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyTuple>>> {
        let inner = self.inner.clone();
        let c = block(py, true, async move { Ok(next_chunk(&inner).await) })?;
        c.map(|c| chunk_tuple(py, c)).transpose()
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match next_chunk(&inner).await {
                Some(c) => Python::attach(|py| chunk_tuple(py, c)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }

    /// Wait for the program to end; the result holds the output not yet read.
    fn wait(&self, py: Python<'_>) -> PyResult<ExecResult> {
        let inner = self.inner.clone();
        let out = block(py, true, async move { wait_stream(&inner).await })?;
        Ok(ExecResult::from_core(py, &self.vm, self.argv.clone(), out))
    }

    /// Awaitable `wait()`.
    fn wait_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        let (vm, argv) = (self.vm.clone(), self.argv.clone());
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match wait_stream(&inner).await {
                Ok(o) => Python::attach(|py| Ok(ExecResult::from_core(py, &vm, argv, o))),
                Err(e) => Err(Python::attach(|py| to_py(py, e))),
            }
        })
    }

    /// Kill the program now; `wait()` then raises CancelledError.
    fn cancel(&self) {
        self.canceller.cancel();
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.canceller.cancel();
        false
    }

    fn __repr__(&self) -> String {
        format!("ExecStream(vm={:?}, argv={:?})", self.vm, self.argv)
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        self.canceller.cancel();
    }
}

/// A client's events as they happen: iterate (or `async for`) over dicts with a "type" of
/// "vm" (vm, kind), "job" (job, vm, phase), "copy" (vm, direction, guest, host, done, total,
/// finished) or "lagged" (missed).
#[pyclass(module = "anyvm._native", frozen)]
pub(crate) struct EventStream {
    inner: Arc<Mutex<anyvm::EventStream>>,
}

impl EventStream {
    pub(crate) fn new(s: anyvm::EventStream) -> Self {
        EventStream {
            inner: Arc::new(Mutex::new(s)),
        }
    }
}

/// The core's one wire shape of an event, as a dict.
fn event_dict(py: Python<'_>, e: Event) -> PyResult<Py<PyDict>> {
    let json = serde_json::to_string(&e)
        .map_err(|err| pyo3::exceptions::PyValueError::new_err(err.to_string()))?;
    let d = py.import("json")?.call_method1("loads", (json,))?;
    Ok(d.cast_into::<PyDict>()?.unbind())
}

#[pymethods]
impl EventStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyDict>>> {
        let inner = self.inner.clone();
        let e = block(py, true, async move { Ok(inner.lock().await.next().await) })?;
        e.map(|e| event_dict(py, e)).transpose()
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match inner.lock().await.next().await {
                Some(e) => Python::attach(|py| event_dict(py, e)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }

    /// The next event, waiting at most `timeout` seconds (None: as long as it takes); None
    /// when none came in time.
    #[pyo3(signature = (timeout=None))]
    fn next_event(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyDict>>> {
        let limit = match timeout {
            Some(0.0) => Some(Duration::ZERO),
            Some(t) => Some(crate::seconds("timeout", t)?),
            None => None,
        };
        let inner = self.inner.clone();
        let e = block(py, true, async move {
            let mut s = inner.lock().await;
            Ok(match limit {
                Some(d) => tokio::time::timeout(d, s.next()).await.ok().flatten(),
                None => s.next().await,
            })
        })?;
        e.map(|e| event_dict(py, e)).transpose()
    }
}
