//! Python values into core types and back, through the core's own parsers.

use std::collections::BTreeMap;
use std::time::Duration;

use anyvm::{ExecRequest, Probe, ReadySpec};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub(crate) fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    anyvm::positive_secs(s, what).map_err(|e| PyValueError::new_err(e.to_string()))
}

pub(crate) fn ready_spec(
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
pub(crate) fn exec_request(
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

pub(crate) fn forward_dict<'py>(
    py: Python<'py>,
    f: &anyvm::PortForward,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &f.name)?;
    d.set_item("proto", f.proto.to_string())?;
    d.set_item("host_addr", &f.host_addr)?;
    d.set_item("host_port", f.host_port)?;
    d.set_item("guest_port", f.guest_port)?;
    Ok(d)
}
