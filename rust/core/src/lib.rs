//! `tartarus._core`: the PyO3 bindings. Thin wrappers only; the logic lives in the
//! crates under `rust/`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tartarus_vmm_api::client::{ClientError, VmmClient as RustVmmClient};

create_exception!(
    _core,
    VmmError,
    PyException,
    "A tartarus-vmm request failed: `kind` says why (connect, io, decode, or the API's error kind)."
);

create_exception!(
    _core,
    SnapshotError,
    PyException,
    "A microVM snapshot file is unusable (corrupted, truncated, another format version) or unreadable."
);

/// Checks a microVM snapshot file (its guest memory too with `verify_memory`, which
/// reads the whole file) and returns what it holds as a dict.
#[pyfunction]
#[pyo3(signature = (path, verify_memory = false))]
fn inspect_snapshot<'py>(
    py: Python<'py>,
    path: PathBuf,
    verify_memory: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let summary = py
        .detach(|| tartarus_vmm_api::snapshot::inspect(&path, verify_memory))
        .map_err(|e| SnapshotError::new_err(e.to_string()))?;
    let json = serde_json::to_string(&summary)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot encode snapshot summary: {e}")))?;
    json_to_dict(py, &json)
}

/// Probes the host (KVM flavour by running guest code, cgroups, seccomp, user
/// namespaces, /dev/net/tun, memory, free disk at `disk_path`) and returns a dict.
/// Makes `<directory>/<name>` a new network namespace (loopback up), as `ip netns add`
/// does; OSError if the name is taken or the caller may not.
#[pyfunction]
fn make_netns(py: Python<'_>, directory: PathBuf, name: &str) -> PyResult<()> {
    py.detach(|| tartarus_host::netns::create(&directory, name))
        .map_err(PyErr::from)
}

/// Removes the namespace `<directory>/<name>`; False if it was not there.
#[pyfunction]
fn remove_netns(py: Python<'_>, directory: PathBuf, name: &str) -> PyResult<bool> {
    py.detach(|| tartarus_host::netns::remove(&directory, name))
        .map_err(PyErr::from)
}

fn ipv4(text: &str) -> PyResult<Ipv4Addr> {
    text.parse()
        .map_err(|_| PyValueError::new_err(format!("{text:?} is not an IPv4 address")))
}

/// Makes the veth pair `host_if` (here, with `host_address/prefix_len`, down) and
/// `peer_if` (moved into the namespace mounted at `netns`).
#[pyfunction]
fn add_veth(
    py: Python<'_>,
    host_if: &str,
    peer_if: &str,
    netns: PathBuf,
    host_address: &str,
    prefix_len: u8,
) -> PyResult<()> {
    let address = ipv4(host_address)?;
    py.detach(|| tartarus_host::links::add_veth(host_if, peer_if, &netns, address, prefix_len))
        .map_err(PyErr::from)
}

/// Sets the link `name` up.
#[pyfunction]
fn link_up(py: Python<'_>, name: &str) -> PyResult<()> {
    py.detach(|| tartarus_host::links::set_up(name))
        .map_err(PyErr::from)
}

/// Deletes the link `name` (and its veth peer); False if there was none.
#[pyfunction]
fn delete_link(py: Python<'_>, name: &str) -> PyResult<bool> {
    py.detach(|| tartarus_host::links::delete(name))
        .map_err(PyErr::from)
}

/// Inside the namespace mounted at `netns`: loopback and `ifname` up, `ifname` with
/// `address/prefix_len`, the default route via `gateway` (replacing what was there).
#[pyfunction]
fn configure_inside(
    py: Python<'_>,
    netns: PathBuf,
    ifname: &str,
    address: &str,
    prefix_len: u8,
    gateway: &str,
) -> PyResult<()> {
    let (address, gateway) = (ipv4(address)?, ipv4(gateway)?);
    py.detach(|| {
        tartarus_host::links::configure_inside(&netns, ifname, address, prefix_len, gateway)
    })
    .map_err(PyErr::from)
}

/// Loads Styx's eBPF egress filter (pinning its maps under `pin_dir`); OSError if this
/// host cannot run it.
#[pyfunction]
fn egress_probe(py: Python<'_>, pin_dir: PathBuf) -> PyResult<()> {
    py.detach(|| tartarus_host::egress::probe(&pin_dir))
        .map_err(PyErr::from)
}

/// One network's port ranges for `egress_attach`: `(first, last, accept)`, first == 0
/// for every packet.
type PyRule = (String, u8, Vec<(u16, u16, bool)>);

/// Installs a link's egress rules and attaches the filter to `host_if` (which must exist).
#[pyfunction]
#[pyo3(signature = (pin_dir, host_if, sandbox_address, resolver, accept_otherwise, rules))]
fn egress_attach(
    py: Python<'_>,
    pin_dir: PathBuf,
    host_if: String,
    sandbox_address: &str,
    resolver: Option<&str>,
    accept_otherwise: bool,
    rules: Vec<PyRule>,
) -> PyResult<()> {
    use tartarus_host::egress::{LinkRules, NetworkRule, Ports};
    let rules = rules
        .into_iter()
        .map(|(network, prefix_len, ranges)| {
            Ok(NetworkRule {
                network: ipv4(&network)?,
                prefix_len,
                ranges: ranges
                    .into_iter()
                    .map(|(first, last, accept)| (Ports { first, last }, accept))
                    .collect(),
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let link = LinkRules {
        host_if,
        sandbox_address: ipv4(sandbox_address)?,
        resolver: resolver.map(ipv4).transpose()?,
        accept_otherwise,
        rules,
    };
    py.detach(|| tartarus_host::egress::attach(&pin_dir, &link))
        .map_err(PyErr::from)
}

/// Lets `host_if`'s sandbox reach `address` on ports `first..=last` (0: any) for `ttl_s`.
#[pyfunction]
fn egress_allow_resolved(
    py: Python<'_>,
    pin_dir: PathBuf,
    host_if: &str,
    address: &str,
    first: u16,
    last: u16,
    ttl_s: f64,
) -> PyResult<()> {
    use tartarus_host::egress::{allow_resolved, Ports};
    let address = ipv4(address)?;
    let ttl = Duration::try_from_secs_f64(ttl_s)
        .map_err(|e| PyValueError::new_err(format!("ttl_s: {e}")))?;
    py.detach(|| allow_resolved(&pin_dir, host_if, address, Ports { first, last }, ttl))
        .map_err(PyErr::from)
}

/// Removes `host_if`'s egress rules, answers and counters; False if it had none.
#[pyfunction]
fn egress_detach(py: Python<'_>, pin_dir: PathBuf, host_if: &str) -> PyResult<bool> {
    py.detach(|| tartarus_host::egress::detach(&pin_dir, host_if))
        .map_err(PyErr::from)
}

/// Every link the filter has rules for: `(host_if, ifindex, denied, spoofed)`.
#[pyfunction]
fn egress_links(py: Python<'_>, pin_dir: PathBuf) -> PyResult<Vec<(String, u32, u64, u64)>> {
    let links = py
        .detach(|| tartarus_host::egress::links(&pin_dir))
        .map_err(PyErr::from)?;
    Ok(links
        .into_iter()
        .map(|l| (l.host_if, l.ifindex, l.denied, l.spoofed))
        .collect())
}

#[pyfunction]
fn probe_host<'py>(py: Python<'py>, disk_path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let report = py.detach(|| tartarus_host::probe_host(&disk_path));
    let json = serde_json::to_string(&report)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot encode host report: {e}")))?;
    json_to_dict(py, &json)
}

fn json_to_dict<'py>(py: Python<'py>, json: &str) -> PyResult<Bound<'py, PyDict>> {
    let loads = py.import("json")?.getattr("loads")?;
    Ok(loads.call1((json,))?.cast_into::<PyDict>()?)
}

/// A blocking client for one `tartarus-vmm` control socket. Each call is one request
/// on a fresh connection; the GIL is released while it waits.
#[pyclass(module = "tartarus._core", frozen)]
struct VmmClient {
    inner: RustVmmClient,
}

#[pymethods]
impl VmmClient {
    #[new]
    #[pyo3(signature = (socket_path, timeout_s = 30.0))]
    fn new(socket_path: PathBuf, timeout_s: f64) -> PyResult<Self> {
        if !(timeout_s.is_finite() && timeout_s > 0.0) {
            return Err(PyRuntimeError::new_err(
                "timeout_s must be a positive number",
            ));
        }
        Ok(VmmClient {
            inner: RustVmmClient::new(socket_path, Duration::from_secs_f64(timeout_s)),
        })
    }

    /// Sends `request` (a JSON object text with an `op` field) and returns the result
    /// as a dict. Raises `VmmError` with `.kind` and a message on failure.
    fn request<'py>(&self, py: Python<'py>, request: &str) -> PyResult<Bound<'py, PyDict>> {
        let value: serde_json::Value = serde_json::from_str(request)
            .map_err(|e| VmmError::new_err(("bad_request", format!("request is not JSON: {e}"))))?;
        let answer = py.detach(|| self.inner.request(&value));
        match answer {
            Ok(v) => json_to_dict(py, &v.to_string()),
            Err(e) => {
                let kind = match &e {
                    ClientError::Connect { .. } => "connect".to_string(),
                    ClientError::Io(_) => "io".to_string(),
                    ClientError::Decode(_) => "decode".to_string(),
                    ClientError::Api(api) => serde_json::to_value(api.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| "internal".into()),
                };
                Err(VmmError::new_err((kind, e.to_string())))
            }
        }
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(probe_host, m)?)?;
    m.add_function(wrap_pyfunction!(make_netns, m)?)?;
    m.add_function(wrap_pyfunction!(remove_netns, m)?)?;
    m.add_function(wrap_pyfunction!(add_veth, m)?)?;
    m.add_function(wrap_pyfunction!(link_up, m)?)?;
    m.add_function(wrap_pyfunction!(delete_link, m)?)?;
    m.add_function(wrap_pyfunction!(configure_inside, m)?)?;
    m.add_function(wrap_pyfunction!(egress_probe, m)?)?;
    m.add_function(wrap_pyfunction!(egress_attach, m)?)?;
    m.add_function(wrap_pyfunction!(egress_allow_resolved, m)?)?;
    m.add_function(wrap_pyfunction!(egress_detach, m)?)?;
    m.add_function(wrap_pyfunction!(egress_links, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_snapshot, m)?)?;
    m.add("SnapshotError", m.py().get_type::<SnapshotError>())?;
    m.add_class::<VmmClient>()?;
    m.add("VmmError", m.py().get_type::<VmmError>())?;
    Ok(())
}
