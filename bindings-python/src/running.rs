//! `Running`: the context manager behind `vm.running()` and `vm.transient_clone()`.

use crate::block;
use crate::vm::Vm;
use anyvm::{ReadySpec, StopOptions};
use pyo3::prelude::*;

/// The context manager behind `vm.running()` and `vm.transient_clone()`.
#[pyclass(module = "anyvm._native", frozen)]
pub(crate) struct Running {
    pub(crate) vm: Vm,
    pub(crate) ready: ReadySpec,
    pub(crate) stop: StopOptions,
    pub(crate) destroy: bool,
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
    pub(crate) fn cleanup(&self, py: Python<'_>) {
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
