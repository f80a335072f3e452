//! Puts a machine's virtio devices on its MMIO bus: disks in order (the first is
//! `/dev/vda`), then vsock. Each device gets a 4 KiB window, a GSI raised through an
//! irqfd, and a `virtio_mmio.device=` entry on the kernel command line.
//!
//! For snapshots, `VirtioDevices::quiesce` holds every transport's lock (so no worker
//! touches guest memory, a disk or a queue) while their state is saved; a restore
//! (`attach_restored`) loads each transport's saved state before its worker starts,
//! so the worker first serves what the restore queued (vsock's connection reset).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::block::scratch::{ScratchDisk, Wipe};
use super::block::{Block, BlockConfig, BlockOpenError, BlockState};
use super::device::{Interrupt, VirtioDevice};
use super::mmio::{MmioTransport, TransportState};
use super::rate_limiter::RateLimit;
use super::vsock::{Vsock, VsockError, VsockState};
use super::worker::DeviceWorker;
use crate::devices::{DeviceError, DeviceManager};

/// A disk as the `configure` request describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Host path of the image (for a scratch disk: where to create it).
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// The disk's serial as the guest sees it (up to 20 bytes).
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// A per-sandbox scratch disk (Lethe): wiped and removed when the VMM exits.
    #[serde(default)]
    pub scratch: Option<ScratchConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchConfig {
    /// Create `path` as a fresh sparse disk of this size; without it, `path` must be an
    /// existing (e.g. pre-formatted) disk that the VMM takes charge of.
    #[serde(default)]
    pub size_mib: Option<u64>,
    #[serde(default)]
    pub wipe: Wipe,
}

/// The vsock device: the guest's CID and the host-side unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// Disks per microVM: each takes an MMIO window and a GSI.
pub const MAX_DRIVES: usize = 8;
/// Largest scratch disk (sparse, so only written blocks use host disk).
const MAX_SCRATCH_MIB: u64 = 1 << 20;

impl DriveConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("a drive has an empty path".into());
        }
        if self.id.len() > 20 {
            return Err(format!("drive id {:?} is longer than 20 bytes", self.id));
        }
        if let Some(mib) = self.scratch.and_then(|s| s.size_mib) {
            if mib == 0 || mib > MAX_SCRATCH_MIB {
                return Err(format!(
                    "scratch size_mib is {mib}; it must be between 1 and {MAX_SCRATCH_MIB}"
                ));
            }
        }
        Ok(())
    }
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.guest_cid < 3 || self.guest_cid > u64::from(u32::MAX) {
            return Err(format!(
                "vsock guest_cid is {}; CIDs 0-2 are reserved and it must fit 32 bits",
                self.guest_cid
            ));
        }
        if self.uds_path.as_os_str().is_empty() {
            return Err("vsock uds_path is empty".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Bus(#[from] DeviceError),
    #[error(transparent)]
    Block(#[from] BlockOpenError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("cannot create scratch disk {path}: {source}")]
    Scratch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    #[error("the snapshot's devices do not match: {0}")]
    Mismatch(String),
    #[error("cannot restore {device}: {source}")]
    Restore {
        device: String,
        source: super::device::DeviceError,
    },
}

/// Every virtio device's saved state (registers, queues, device state), in attach order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VirtioStates {
    pub blocks: Vec<TransportState<BlockState>>,
    pub vsock: Option<TransportState<VsockState>>,
}

/// Everything that must live as long as the VM: workers, scratch disks, transports.
/// Dropping it stops the workers and wipes the scratch disks.
#[derive(Default)]
pub struct VirtioDevices {
    // Workers first: they are stopped before the disks they serve are wiped.
    workers: Vec<DeviceWorker>,
    scratch: Vec<ScratchDisk>,
    pub blocks: Vec<Arc<Mutex<MmioTransport<Block>>>>,
    pub vsock: Option<Arc<Mutex<MmioTransport<Vsock>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device transports, locked: no worker runs while this lives.
pub struct QuietDevices<'a> {
    blocks: Vec<MutexGuard<'a, MmioTransport<Block>>>,
    vsock: Option<MutexGuard<'a, MmioTransport<Vsock>>>,
}

impl QuietDevices<'_> {
    pub fn save(&self) -> VirtioStates {
        VirtioStates {
            blocks: self.blocks.iter().map(|t| t.save()).collect(),
            vsock: self.vsock.as_ref().map(|t| t.save()),
        }
    }
}

impl VirtioDevices {
    /// Locks every transport (blocks first, then vsock, always in this order).
    pub fn quiesce(&self) -> QuietDevices<'_> {
        QuietDevices {
            blocks: self.blocks.iter().map(|t| lock(t)).collect(),
            vsock: self.vsock.as_ref().map(|t| lock(t)),
        }
    }
}

fn add<D: VirtioDevice + 'static>(
    dm: &mut DeviceManager,
    mem: &GuestMemoryMmap,
    device: D,
    saved: Option<TransportState<D::State>>,
    name: &str,
) -> Result<Arc<Mutex<MmioTransport<D>>>, AttachError> {
    let slot = dm.allocate_mmio_slot()?;
    let irq = dm.irq_eventfd(slot.gsi)?;
    let mut transport = MmioTransport::new(device, mem.clone(), Interrupt::new(Arc::new(irq)));
    if let Some(state) = saved {
        transport
            .restore(state)
            .map_err(|source| AttachError::Restore {
                device: name.to_string(),
                source,
            })?;
    }
    let transport = Arc::new(Mutex::new(transport));
    dm.register_mmio_device(slot, transport.clone())?;
    Ok(transport)
}

/// Creates and registers the devices; returns what keeps them alive.
pub fn attach(
    dm: &mut DeviceManager,
    mem: &GuestMemoryMmap,
    drives: &[DriveConfig],
    vsock: Option<&VsockConfig>,
) -> Result<VirtioDevices, AttachError> {
    attach_with(dm, mem, drives, vsock, None)
}

/// Like `attach`, for a restored machine: each device starts in its saved state. The
/// configuration must describe the same devices (paths may differ).
pub fn attach_restored(
    dm: &mut DeviceManager,
    mem: &GuestMemoryMmap,
    drives: &[DriveConfig],
    vsock: Option<&VsockConfig>,
    saved: &VirtioStates,
) -> Result<VirtioDevices, AttachError> {
    if saved.blocks.len() != drives.len() || saved.vsock.is_some() != vsock.is_some() {
        return Err(AttachError::Mismatch(format!(
            "saved: {} disks and {} vsock; configured: {} disks and {} vsock",
            saved.blocks.len(),
            if saved.vsock.is_some() { "a" } else { "no" },
            drives.len(),
            if vsock.is_some() { "a" } else { "no" },
        )));
    }
    attach_with(dm, mem, drives, vsock, Some(saved))
}

fn attach_with(
    dm: &mut DeviceManager,
    mem: &GuestMemoryMmap,
    drives: &[DriveConfig],
    vsock: Option<&VsockConfig>,
    saved: Option<&VirtioStates>,
) -> Result<VirtioDevices, AttachError> {
    let mut out = VirtioDevices::default();
    for (i, drive) in drives.iter().enumerate() {
        if let Some(scratch) = drive.scratch {
            let disk = match scratch.size_mib {
                Some(mib) => ScratchDisk::create(&drive.path, mib << 20, scratch.wipe),
                None => ScratchDisk::adopt(&drive.path, scratch.wipe),
            }
            .map_err(|source| AttachError::Scratch {
                path: drive.path.clone(),
                source,
            })?;
            out.scratch.push(disk);
        }
        let id = if drive.id.is_empty() {
            format!("tartarus-disk{i}")
        } else {
            drive.id.clone()
        };
        let block = Block::open(BlockConfig {
            path: drive.path.clone(),
            read_only: drive.read_only && drive.scratch.is_none(),
            id,
            rate_limit: drive.rate_limit,
        })?;
        let state = saved.and_then(|s| s.blocks.get(i).cloned());
        let transport = add(dm, mem, block, state, &format!("disk {i}"))?;
        let worker = DeviceWorker::spawn(&format!("virtio-blk{i}"), transport.clone())
            .map_err(AttachError::Worker)?;
        out.workers.push(worker);
        out.blocks.push(transport);
    }
    if let Some(cfg) = vsock {
        let device = Vsock::new(cfg.guest_cid, &cfg.uds_path)?;
        let state = saved.and_then(|s| s.vsock.clone());
        let transport = add(dm, mem, device, state, "vsock")?;
        out.workers.push(
            DeviceWorker::spawn("virtio-vsock", transport.clone()).map_err(AttachError::Worker)?,
        );
        out.vsock = Some(transport);
    }
    Ok(out)
}
