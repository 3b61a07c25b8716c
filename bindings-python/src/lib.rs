//! Python binding: a thin pyo3 layer over the `anyvm` crate. Every VM operation runs on one
//! shared tokio runtime with the GIL released; blocking calls poll for Ctrl-C so a long wait can
//! be interrupted. Exceptions are the classes in `anyvm/_errors.py`, chosen by the core's error
//! kind. No logic here that the core lacks.

mod client;
mod convert;
mod errors;
mod exec;
mod job;
mod logging;
mod running;
mod runtime;
mod stream;
mod vm;

use pyo3::prelude::*;

pub(crate) use convert::seconds;
pub(crate) use runtime::{block, runtime};

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::install();
    m.add_class::<client::Client>()?;
    m.add_class::<vm::Vm>()?;
    m.add_class::<exec::ExecResult>()?;
    m.add_class::<running::Running>()?;
    m.add_class::<stream::ExecStream>()?;
    m.add_class::<stream::EventStream>()?;
    m.add_class::<job::JobReport>()?;
    m.add_class::<job::JobPool>()?;
    m.add_function(wrap_pyfunction!(client::connect, m)?)?;
    m.add_function(wrap_pyfunction!(logging::set_log_level, m)?)?;
    Ok(())
}
