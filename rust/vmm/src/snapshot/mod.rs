//! Nyx's microVM half: snapshots of a paused machine, and machines restored from them.
//!
//! `take` pauses the vCPUs (each finishes the instruction it was in), saves every
//! vCPU's registers, FPU/XSAVE, MSRs, LAPIC and pending events, the VM's interrupt
//! controllers, PIT and clock, the serial port and generation device, and guest memory:
//! all of it (full), or only the pages written since a parent full snapshot (diff).
//! The file format is read in `tartarus_vmm_api::snapshot::format` and written in
//! `writer`; state in `state`.
//!
//! `restore` builds a machine in a fresh VMM from a snapshot: guest memory is the
//! snapshot file mapped privately (copy-on-write), so every clone of one snapshot
//! shares the pages none of them wrote; a diff's pages are mapped over its parent's.
//! Each restore is a new generation with a new identity on the generation device (the
//! guest's cue to reseed its RNG and drop its connections).

pub mod kvm_state;
pub mod lineage;
pub mod memory;
pub mod state;
pub mod writer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::Serialize;

use vm_memory::GuestMemoryMmap;

use tartarus_vmm_api::api::RestoreOptions;
use tartarus_vmm_api::config::{MachineConfig, VsockConfig};
use tartarus_vmm_api::snapshot::format::{
    hex, FormatError, SectionKind, SnapshotFile, SnapshotKind, PAGE_SIZE,
};
use tartarus_vmm_api::snapshot::state::{PageMap, StateError};

use crate::devices::generation::{random_bytes, GenerationState};
use crate::devices::virtio::attach::{attach, VirtioDevices};
use crate::devices::{DeviceError, DeviceManager};
use crate::machine::{Machine, MachineError, RestoredParts};
use crate::metrics::Metrics;
use crate::vcpu::lock_vcpu;
use kvm_state::{cpu_vendor, host_cpu_vendor, msr_indices, KvmStateError, VcpuState, VmState};
use lineage::{Lineage, LineageError};
use state::{DeviceStates, SnapshotState};
use writer::SnapshotWriter;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file is not a usable snapshot (corrupted, truncated, another version).
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{path}: {source}")]
    State { path: String, source: StateError },
    /// The snapshot does not fit this host or this request.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Lineage(#[from] LineageError),
    #[error(transparent)]
    Kvm(#[from] KvmStateError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl SnapshotError {
    /// True when the snapshot file itself is at fault (not this host or VMM).
    pub fn is_bad_snapshot(&self) -> bool {
        matches!(
            self,
            SnapshotError::Format(_) | SnapshotError::State { .. } | SnapshotError::Refused(_)
        )
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

/// What `take` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub path: PathBuf,
    pub id: String,
    pub kind: SnapshotKind,
    pub parent: Option<String>,
    pub file_bytes: u64,
    pub memory_bytes: u64,
    /// Pages in the memory section (all of RAM for a full snapshot).
    pub pages: u64,
    pub vcpus: usize,
    pub duration_us: u64,
}

/// Saves the machine (which the caller has paused) and its virtio devices to `path`.
pub fn take(
    machine: &mut Machine,
    virtio: Option<&VirtioDevices>,
    kvm: &Kvm,
    path: &Path,
    kind: SnapshotKind,
) -> Result<SnapshotReport, SnapshotError> {
    let started = Instant::now();
    // Device workers stay out of guest memory, disks and queues until the file is done.
    let quiet = virtio.map(VirtioDevices::quiesce);
    let virtio_states = quiet.as_ref().map(|q| q.save());
    let indices = msr_indices(kvm)?;
    let mut vcpus = Vec::with_capacity(machine.vcpus().len());
    for fd in machine.vcpus() {
        vcpus.push(VcpuState::save(&lock_vcpu(fd), &indices)?);
    }
    let vm = VmState::save(machine.vm())?;
    let serial = machine
        .serial()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .snapshot();
    let state = SnapshotState {
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        cpu_vendor: vcpus
            .first()
            .map(|v| cpu_vendor(&v.cpuid))
            .unwrap_or_default(),
        machine: machine.config().clone(),
        entry: machine.entry(),
        ram: crate::layout::ram_ranges(machine.config().memory_bytes()),
        vm,
        vcpus,
        devices: DeviceStates {
            serial,
            generation: machine.generation(),
            virtio: virtio_states,
        },
    };
    let encoded = state.encode().map_err(|source| SnapshotError::State {
        path: path.display().to_string(),
        source,
    })?;

    let tracking = machine.config().track_dirty_pages;
    let mem = machine.memory().clone();
    let vm = machine.vm().clone();
    machine
        .lineage
        .collect_kvm_log(&vm, &mem, tracking)
        .map_err(io("read KVM's dirty page log"))?;
    let (parent, page_map) = match kind {
        SnapshotKind::Full => (None, None),
        SnapshotKind::Diff => {
            let (parent, map) = machine.lineage.diff_pages(&mem)?;
            (Some(parent), Some(map))
        }
    };

    let shown = path.display().to_string();
    let mut writer = SnapshotWriter::create(path).map_err(io(format!("create {shown}")))?;
    writer
        .write_section(SectionKind::State, &encoded)
        .map_err(io(format!("write {shown}")))?;
    if let Some(map) = &page_map {
        writer
            .write_section(SectionKind::PageMap, &map.encode())
            .map_err(io(format!("write {shown}")))?;
    }
    let mut section = writer.memory();
    match &page_map {
        None => memory::write_all_pages(&mem, &mut section),
        Some(map) => memory::write_pages(&mem, map, &mut section),
    }
    .map_err(io(format!("write guest memory to {shown}")))?;
    section.finish();
    let mut id = [0u8; 16];
    random_bytes(&mut id).map_err(io("draw a snapshot id"))?;
    let header = writer
        .finish(kind, id, parent)
        .map_err(io(format!("finish {shown}")))?;
    drop(quiet);
    if kind == SnapshotKind::Full {
        machine.lineage.full_taken(id, &mem, tracking);
    }
    let pages = header
        .section(SectionKind::Memory)
        .map_or(0, |s| s.length / PAGE_SIZE);
    Ok(SnapshotReport {
        path: path.to_path_buf(),
        id: hex(&id),
        kind,
        parent: parent.as_ref().map(|p| hex(p)),
        file_bytes: header.total_len,
        memory_bytes: state.memory_bytes(),
        pages,
        vcpus: state.vcpus.len(),
        duration_us: started.elapsed().as_micros() as u64,
    })
}

/// What `restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub snapshot_id: String,
    pub kind: SnapshotKind,
    pub base_id: Option<String>,
    pub generation: u64,
    pub clone_id: u64,
    pub vm_id: String,
    pub memory_verified: bool,
    pub duration_us: u64,
}

fn state_of(file: &SnapshotFile<std::fs::File>) -> Result<SnapshotState, SnapshotError> {
    let bytes = file.read_section(SectionKind::State)?;
    SnapshotState::decode(&bytes).map_err(|source| SnapshotError::State {
        path: file.path.clone(),
        source,
    })
}

fn memory_offset(file: &SnapshotFile<std::fs::File>) -> u64 {
    file.header
        .section(SectionKind::Memory)
        .map_or(0, |s| s.offset)
}

/// The snapshot and, for a diff, its base and page map, checked against each other.
struct Opened {
    top: SnapshotFile<std::fs::File>,
    state: SnapshotState,
    base: Option<(SnapshotFile<std::fs::File>, PageMap)>,
}

fn open(options: &RestoreOptions) -> Result<Opened, SnapshotError> {
    let top = SnapshotFile::open(&options.snapshot)?;
    let state = state_of(&top)?;
    let refuse = |m: String| Err(SnapshotError::Refused(m));
    let memory_len = top
        .header
        .section(SectionKind::Memory)
        .map_or(0, |s| s.length);
    let base = match (top.header.kind, &options.base) {
        (SnapshotKind::Full, Some(_)) => {
            return refuse(format!(
                "{} is a full snapshot: restore it without a base",
                top.path
            ))
        }
        (SnapshotKind::Full, None) => {
            if memory_len != state.memory_bytes() {
                return refuse(format!(
                    "{}: the memory section holds {memory_len} bytes for {} bytes of RAM",
                    top.path,
                    state.memory_bytes()
                ));
            }
            None
        }
        (SnapshotKind::Diff, None) => {
            return refuse(format!(
                "{} is a diff snapshot: pass its parent full snapshot as base",
                top.path
            ))
        }
        (SnapshotKind::Diff, Some(base_path)) => {
            let base = SnapshotFile::open(base_path)?;
            let parent = top.header.parent.unwrap_or_default();
            if base.header.kind != SnapshotKind::Full || base.header.id != parent {
                return refuse(format!(
                    "{} is not the parent of {}: the diff applies to snapshot {}, the base is {}",
                    base.path,
                    top.path,
                    hex(&parent),
                    hex(&base.header.id)
                ));
            }
            let base_state = state_of(&base)?;
            if base_state.ram != state.ram {
                return refuse(format!(
                    "{} and {} differ in guest RAM",
                    base.path, top.path
                ));
            }
            let map_bytes = top.read_section(SectionKind::PageMap)?;
            let map =
                PageMap::decode(&map_bytes, &state.ram).map_err(|source| SnapshotError::State {
                    path: top.path.clone(),
                    source,
                })?;
            if map.pages() * PAGE_SIZE != memory_len {
                return refuse(format!(
                    "{}: the page map names {} pages, the memory section holds {memory_len} bytes",
                    top.path,
                    map.pages()
                ));
            }
            Some((base, map))
        }
    };
    Ok(Opened { top, state, base })
}

/// A machine built from a snapshot (not started: the caller starts its vCPUs), the
/// virtio devices that live beside it, and what the restore did.
pub struct Restored {
    pub machine: Machine,
    pub virtio: VirtioDevices,
    pub report: RestoreReport,
}

/// Builds a machine from a snapshot.
pub fn restore(
    kvm: &Kvm,
    options: &RestoreOptions,
    metrics: std::sync::Arc<Metrics>,
) -> Result<Restored, SnapshotError> {
    let started = Instant::now();
    let opened = open(options)?;
    let host_vendor = host_cpu_vendor(kvm)?;
    if opened.state.cpu_vendor != host_vendor {
        return Err(SnapshotError::Refused(format!(
            "{} was taken on a {:?} CPU; this host's is {host_vendor:?}",
            opened.top.path, opened.state.cpu_vendor
        )));
    }
    if options.verify_memory {
        opened.top.verify_section(SectionKind::Memory)?;
        if let Some((base, _)) = &opened.base {
            base.verify_section(SectionKind::Memory)?;
        }
    }
    let ram = &opened.state.ram;
    let (mem, lineage) = match &opened.base {
        None => {
            let mem = crate::memory::map_guest_memory_from(
                ram,
                opened.top.file(),
                memory_offset(&opened.top),
                &opened.top.path,
            )
            .map_err(MachineError::from)?;
            let lineage = Lineage {
                restored_from: Some((opened.top.header.id, PageMap::default())),
                last_full: None,
            };
            (mem, lineage)
        }
        Some((base, map)) => {
            let mem = crate::memory::map_guest_memory_from(
                ram,
                base.file(),
                memory_offset(base),
                &base.path,
            )
            .map_err(MachineError::from)?;
            memory::apply_diff(&mem, opened.top.file(), memory_offset(&opened.top), map)
                .map_err(io(format!("map the pages of {}", opened.top.path)))?;
            let lineage = Lineage {
                restored_from: Some((base.header.id, map.clone())),
                last_full: None,
            };
            (mem, lineage)
        }
    };

    let state = &opened.state;
    let config = MachineConfig {
        serial: options
            .serial
            .clone()
            .unwrap_or_else(|| state.machine.serial.clone()),
        wall_clock_limit_ms: options
            .wall_clock_limit_ms
            .or(state.machine.wall_clock_limit_ms),
        track_dirty_pages: options
            .track_dirty_pages
            .unwrap_or(state.machine.track_dirty_pages),
        drives: options
            .drives
            .clone()
            .unwrap_or_else(|| state.machine.drives.clone()),
        vsock: state.machine.vsock.clone().map(|v| VsockConfig {
            uds_path: options.vsock_uds_path.clone().unwrap_or(v.uds_path),
            ..v
        }),
        ..state.machine.clone()
    };
    let generation = GenerationState::next_of(Some(&state.devices.generation), options.clone_id)
        .map_err(io("draw random bytes for the generation device"))?;
    let vm_id = hex(&generation.vm_id);
    let report_generation = generation.generation;
    let mut load = |vm: &VmFd, fds: &[VcpuFd]| -> Result<(), MachineError> {
        let fail = |e: KvmStateError| MachineError::DeviceState(e.to_string());
        vm_state_load(kvm, vm, fds, state).map_err(fail)
    };
    let parts = RestoredParts {
        config,
        mem,
        entry: state.entry,
        serial: state.devices.serial.clone(),
        generation,
        lineage,
    };
    let (drives, vsock) = (parts.config.drives.clone(), parts.config.vsock.clone());
    let mut virtio = None;
    let mut attach_devices = |dm: &mut DeviceManager, mem: &GuestMemoryMmap| {
        let devices = attach(dm, mem, &drives, vsock.as_ref())
            .map_err(|e| DeviceError::Virtio(e.to_string()))?;
        virtio = Some(devices);
        Ok(())
    };
    let machine = Machine::restore(kvm, parts, metrics, &mut attach_devices, &mut load)?;
    let virtio = virtio.unwrap_or_default();
    if let Some(saved) = state.devices.virtio.clone() {
        virtio.restore(saved).map_err(|e| {
            SnapshotError::Refused(format!(
                "{}: the devices do not match: {e}",
                opened.top.path
            ))
        })?;
    }
    let report = RestoreReport {
        snapshot_id: hex(&opened.top.header.id),
        kind: opened.top.header.kind,
        base_id: opened.base.as_ref().map(|(b, _)| hex(&b.header.id)),
        generation: report_generation,
        clone_id: options.clone_id,
        vm_id,
        memory_verified: options.verify_memory,
        duration_us: started.elapsed().as_micros() as u64,
    };
    Ok(Restored {
        machine,
        virtio,
        report,
    })
}

fn vm_state_load(
    kvm: &Kvm,
    vm: &VmFd,
    fds: &[VcpuFd],
    state: &SnapshotState,
) -> Result<(), KvmStateError> {
    state.vm.restore(vm)?;
    for (fd, saved) in fds.iter().zip(&state.vcpus) {
        saved.restore(kvm, fd)?;
    }
    Ok(())
}
