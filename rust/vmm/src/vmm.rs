//! The VMM service: the state machine behind the API (configure → start → pause /
//! resume → exit → stop) around one `Machine`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use seccompiler::BpfProgram;
use serde::Serialize;
use serde_json::Value;
use vm_memory::GuestMemoryMmap;

use tartarus_vmm_api::api::{ApiError, ErrorKind, Request, RestoreOptions};

use crate::api::Handler;
use crate::boot::regs::EntryMode;
use crate::control::{Target, VmExit};
use crate::devices::virtio::attach::{attach, VirtioDevices};
use crate::devices::{DeviceError, DeviceManager};
use crate::machine::{Machine, MachineError};
use crate::metrics::Metrics;
use crate::snapshot::{self, SnapshotError};
use tartarus_vmm_api::config::MachineConfig;

/// Longest `wait` a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How long `stop` waits for vCPU threads before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    NotConfigured,
    Configured,
    Running,
    Paused,
    Exited,
}

#[derive(Debug, Serialize)]
pub struct StateReport {
    pub state: VmState,
    pub exit: Option<VmExit>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
    /// `linux64` or `pvh` once the VM is built.
    pub entry: Option<&'static str>,
}

pub struct Vmm {
    kvm: Kvm,
    config: Option<MachineConfig>,
    machine: Option<Machine>,
    // Dropped after the machine (its vCPUs are joined first): stops the device workers,
    // wipes scratch disks, removes the vsock socket.
    virtio: Option<VirtioDevices>,
    metrics: Arc<Metrics>,
    vcpu_filter: Option<Arc<BpfProgram>>,
    /// The jail's cap on guest RAM (its cgroup's memory limit is this plus overhead).
    guest_memory_limit_mib: Option<u64>,
    stopped: bool,
}

fn to_value<T: Serialize>(v: T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidState, message)
}

impl Vmm {
    /// `kvm` is opened by the caller (before the jail, which has no /dev/kvm).
    pub fn new(kvm: Kvm, vcpu_filter: Option<Arc<BpfProgram>>) -> Self {
        Vmm {
            kvm,
            config: None,
            machine: None,
            virtio: None,
            metrics: Arc::new(Metrics::default()),
            vcpu_filter,
            guest_memory_limit_mib: None,
            stopped: false,
        }
    }

    /// Refuses machines with more guest RAM than `mib` (the jail's memory budget).
    pub fn limit_guest_memory(&mut self, mib: u64) {
        self.guest_memory_limit_mib = Some(mib);
    }

    pub fn state(&self) -> VmState {
        match (&self.config, &self.machine) {
            (None, _) => VmState::NotConfigured,
            (Some(_), None) => VmState::Configured,
            (Some(_), Some(m)) => {
                if m.control().exit().is_some() {
                    VmState::Exited
                } else if m.control().target() == Target::Pause {
                    VmState::Paused
                } else {
                    VmState::Running
                }
            }
        }
    }

    pub fn report(&self) -> StateReport {
        StateReport {
            state: self.state(),
            exit: self.machine.as_ref().and_then(|m| m.control().exit()),
            vcpus: self.config.as_ref().map(|c| c.vcpus),
            memory_mib: self.config.as_ref().map(|c| c.memory_mib),
            entry: self.machine.as_ref().map(|m| match m.entry() {
                EntryMode::Long64 { .. } => "linux64",
                EntryMode::Pvh { .. } => "pvh",
            }),
        }
    }

    fn start(&mut self) -> Result<(), ApiError> {
        if self.machine.is_some() {
            return Err(invalid("the VM was already started"));
        }
        let config = self
            .config
            .clone()
            .ok_or_else(|| invalid("configure the machine before starting it"))?;
        let (drives, vsock) = (config.drives.clone(), config.vsock.clone());
        let mut virtio = None;
        let mut attach_virtio = |dm: &mut DeviceManager, mem: &GuestMemoryMmap| {
            let devices = attach(dm, mem, &drives, vsock.as_ref())
                .map_err(|e| DeviceError::Virtio(e.to_string()))?;
            virtio = Some(devices);
            Ok(())
        };
        let mut machine =
            Machine::build(&self.kvm, config, self.metrics.clone(), &mut attach_virtio).map_err(
                |e| {
                    let kind = match e {
                        MachineError::Config(_) => ErrorKind::Config,
                        _ => ErrorKind::Boot,
                    };
                    ApiError::new(kind, e.to_string())
                },
            )?;
        self.virtio = virtio;
        machine
            .start(self.vcpu_filter.clone())
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        self.machine = Some(machine);
        Ok(())
    }

    fn restore(&mut self, options: RestoreOptions) -> Result<Value, ApiError> {
        if self.config.is_some() || self.machine.is_some() {
            return Err(invalid(
                "restore needs a fresh VMM: this one is already configured",
            ));
        }
        let snapshot::Restored {
            mut machine,
            virtio,
            report,
        } = snapshot::restore(&self.kvm, &options, self.metrics.clone()).map_err(snapshot_error)?;
        self.virtio = Some(virtio);
        if !options.resume {
            machine.control().hold();
        }
        machine
            .start(self.vcpu_filter.clone())
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        self.config = Some(machine.config().clone());
        self.machine = Some(machine);
        let mut value = to_value(self.report())?;
        value["restore"] = to_value(report)?;
        Ok(value)
    }

    fn snapshot(
        &mut self,
        path: &std::path::Path,
        kind: tartarus_vmm_api::snapshot::format::SnapshotKind,
    ) -> Result<Value, ApiError> {
        let was_running = self.state() == VmState::Running;
        let machine = match (self.state(), self.machine.as_mut()) {
            (VmState::Running | VmState::Paused, Some(m)) => m,
            (state, _) => {
                return Err(invalid(
                    format!("the VM is {state:?}; only a running or paused VM can be snapshotted")
                        .to_lowercase(),
                ))
            }
        };
        machine.control().pause();
        let taken = snapshot::take(machine, self.virtio.as_ref(), &self.kvm, path, kind);
        if was_running {
            machine.control().resume();
        }
        let report = taken.map_err(snapshot_error)?;
        let mut value = to_value(self.report())?;
        value["snapshot"] = to_value(report)?;
        Ok(value)
    }

    fn running_machine(&self) -> Result<&Machine, ApiError> {
        match (self.state(), &self.machine) {
            (VmState::Running | VmState::Paused, Some(m)) => Ok(m),
            (state, _) => Err(invalid(
                format!("the VM is {state:?}, not running").to_lowercase(),
            )),
        }
    }

    /// Stops the guest and marks the service finished.
    pub fn shutdown(&mut self) -> bool {
        self.stopped = true;
        self.machine.as_mut().is_none_or(|m| m.stop(STOP_TIMEOUT))
    }

    /// Blocks until the guest exits or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> Option<VmExit> {
        let m = self.machine.as_ref()?;
        m.control().wait_exit_until(Instant::now() + timeout)
    }
}

impl Handler for Vmm {
    fn handle(&mut self, request: Request) -> Result<Value, ApiError> {
        match request {
            Request::Configure { machine } => {
                if self.machine.is_some() {
                    return Err(invalid("the VM is already started; configure comes first"));
                }
                machine
                    .validate()
                    .map_err(|e| ApiError::new(ErrorKind::Config, e.to_string()))?;
                if let Some(limit) = self.guest_memory_limit_mib {
                    if machine.memory_mib > limit {
                        return Err(ApiError::new(
                            ErrorKind::Config,
                            format!(
                                "memory_mib is {}; this VMM's jail allows at most {limit} MiB \
                                 of guest RAM (jail cgroup.guest_memory_mib)",
                                machine.memory_mib
                            ),
                        ));
                    }
                }
                self.config = Some(machine);
                to_value(self.report())
            }
            Request::Start {} => {
                self.start()?;
                to_value(self.report())
            }
            Request::Pause {} => {
                let m = self.running_machine()?;
                m.control().pause();
                to_value(self.report())
            }
            Request::Resume {} => {
                let m = self.running_machine()?;
                m.control().resume();
                to_value(self.report())
            }
            Request::State {} => to_value(self.report()),
            Request::Metrics {} => {
                let memory = self.config.as_ref().map_or(0, |c| c.memory_bytes());
                let unclaimed = self.machine.as_ref().map(|m| &m.devices().unclaimed);
                to_value(self.metrics.report(unclaimed, memory))
            }
            Request::Wait { timeout_ms } => {
                if self.machine.is_none() {
                    return Err(invalid("the VM has not been started"));
                }
                self.wait(Duration::from_millis(timeout_ms).min(MAX_WAIT));
                to_value(self.report())
            }
            Request::Snapshot { path, kind } => self.snapshot(&path, kind),
            Request::Restore(options) => self.restore(options),
            Request::Stop {} => {
                let clean = self.shutdown();
                let mut report = to_value(self.report())?;
                report["clean"] = Value::Bool(clean);
                Ok(report)
            }
        }
    }

    fn finished(&self) -> bool {
        self.stopped
    }
}

fn snapshot_error(e: SnapshotError) -> ApiError {
    let kind = if e.is_bad_snapshot() {
        ErrorKind::Snapshot
    } else {
        ErrorKind::Internal
    };
    ApiError::new(kind, e.to_string())
}
