//! `tartarus._core`: the PyO3 bindings. Thin wrappers only; the logic lives in the
//! crates under `rust/`.

use std::path::PathBuf;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Probes the host (KVM flavour by running guest code, cgroups, seccomp, user
/// namespaces, /dev/net/tun, memory, free disk at `disk_path`) and returns a dict.
#[pyfunction]
fn probe_host<'py>(py: Python<'py>, disk_path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let report = py.detach(|| tartarus_host::probe_host(&disk_path));
    let json = serde_json::to_string(&report)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot encode host report: {e}")))?;
    let loads = py.import("json")?.getattr("loads")?;
    Ok(loads.call1((json,))?.cast_into::<PyDict>()?)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(probe_host, m)?)?;
    Ok(())
}
