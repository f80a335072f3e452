//! Puts a machine's virtio devices on its MMIO bus: disks in order (the first is
//! `/dev/vda`), then vsock. Each device gets a 4 KiB window, a GSI raised through an
//! irqfd, and a `virtio_mmio.device=` entry on the kernel command line.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use tartarus_vmm_api::config::{DriveConfig, VsockConfig};

use super::block::scratch::ScratchDisk;
use super::block::BlockState;
use super::block::{Block, BlockConfig, BlockOpenError};
use super::device::{DeviceError as VirtioError, Interrupt, VirtioDevice};
use super::mmio::{MmioTransport, TransportState};
use super::vsock::VsockState;
use super::vsock::{Vsock, VsockError};
use super::worker::DeviceWorker;
use crate::devices::{DeviceError, DeviceManager};

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

/// Every virtio device's registers, queues and device state, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    pub blocks: Vec<TransportState<BlockState>>,
    pub vsock: Option<TransportState<VsockState>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device transports, locked: no worker touches guest memory, a disk or a queue
/// while this lives (a snapshot holds it until guest memory is written).
pub struct QuietDevices<'a> {
    blocks: Vec<MutexGuard<'a, MmioTransport<Block>>>,
    vsock: Option<MutexGuard<'a, MmioTransport<Vsock>>>,
}

impl QuietDevices<'_> {
    pub fn save(&self) -> VirtioSnapshot {
        VirtioSnapshot {
            blocks: self.blocks.iter().map(|t| t.save()).collect(),
            vsock: self.vsock.as_ref().map(|t| t.save()),
        }
    }
}

impl VirtioDevices {
    /// Locks every transport (disks first, then vsock, always in this order).
    pub fn quiesce(&self) -> QuietDevices<'_> {
        QuietDevices {
            blocks: self.blocks.iter().map(|t| lock(t)).collect(),
            vsock: self.vsock.as_ref().map(|t| lock(t)),
        }
    }

    /// Captures every device (call with the vCPUs paused).
    pub fn save(&self) -> VirtioSnapshot {
        self.quiesce().save()
    }

    /// Restores devices created from the same machine config; vsock connections are
    /// reset (host programs reconnect) and the guest is told so.
    pub fn restore(&self, snapshot: VirtioSnapshot) -> Result<(), VirtioError> {
        if snapshot.blocks.len() != self.blocks.len()
            || snapshot.vsock.is_some() != self.vsock.is_some()
        {
            return Err(VirtioError::State(format!(
                "snapshot has {} disks and {} vsock, this machine {} and {}",
                snapshot.blocks.len(),
                u8::from(snapshot.vsock.is_some()),
                self.blocks.len(),
                u8::from(self.vsock.is_some())
            )));
        }
        for (transport, state) in self.blocks.iter().zip(snapshot.blocks) {
            lock(transport).restore(state)?;
        }
        if let (Some(transport), Some(state)) = (&self.vsock, snapshot.vsock) {
            let mut t = lock(transport);
            t.restore(state)?;
            // The reset event goes out as soon as the guest's event queue has a buffer.
            t.process_backend();
        }
        Ok(())
    }
}

fn add<D: VirtioDevice + 'static>(
    dm: &mut DeviceManager,
    mem: &GuestMemoryMmap,
    device: D,
) -> Result<Arc<Mutex<MmioTransport<D>>>, AttachError> {
    let slot = dm.allocate_mmio_slot()?;
    let irq = dm.irq_eventfd(slot.gsi)?;
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device,
        mem.clone(),
        Interrupt::new(Arc::new(irq)),
    )));
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
        let transport = add(dm, mem, block)?;
        let worker = DeviceWorker::spawn(&format!("virtio-blk{i}"), transport.clone())
            .map_err(AttachError::Worker)?;
        out.workers.push(worker);
        out.blocks.push(transport);
    }
    if let Some(cfg) = vsock {
        let transport = add(dm, mem, Vsock::new(cfg.guest_cid, &cfg.uds_path)?)?;
        out.workers.push(
            DeviceWorker::spawn("virtio-vsock", transport.clone()).map_err(AttachError::Worker)?,
        );
        out.vsock = Some(transport);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::BlockConfig;
    use crate::devices::virtio::test_driver::guest_memory;
    use std::io::Write;
    use tartarus_vmm_api::config::{RateLimit, ScratchConfig, Wipe};

    fn devices(dir: &std::path::Path, disk: &std::path::Path, name: &str) -> VirtioDevices {
        let mem = guest_memory();
        let block = Block::open(BlockConfig {
            path: disk.to_path_buf(),
            read_only: true,
            id: "root".into(),
            rate_limit: RateLimit::default(),
        })
        .unwrap();
        let vsock = Vsock::new(3, &dir.join(format!("{name}.sock"))).unwrap();
        VirtioDevices {
            blocks: vec![Arc::new(Mutex::new(MmioTransport::new(
                block,
                mem.clone(),
                Interrupt::polled(),
            )))],
            vsock: Some(Arc::new(Mutex::new(MmioTransport::new(
                vsock,
                mem,
                Interrupt::polled(),
            )))),
            ..VirtioDevices::default()
        }
    }

    #[test]
    fn snapshot_round_trips_through_json_and_checks_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = tempfile::NamedTempFile::new().unwrap();
        disk.write_all(&[0u8; 8192]).unwrap();
        let a = devices(dir.path(), disk.path(), "a");
        let saved = a.save();
        let json = serde_json::to_vec(&saved).unwrap();
        let back: VirtioSnapshot = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, saved);
        let b = devices(dir.path(), disk.path(), "b");
        b.restore(back.clone()).unwrap();
        let mut fewer = back;
        fewer.blocks.clear();
        assert!(b.restore(fewer).is_err());
    }

    #[test]
    fn config_validation_rejects_bad_values() {
        let good = DriveConfig {
            path: "/d".into(),
            read_only: false,
            id: String::new(),
            rate_limit: RateLimit::default(),
            scratch: None,
        };
        assert!(good.validate().is_ok());
        let long_id = DriveConfig {
            id: "x".repeat(21),
            ..good.clone()
        };
        assert!(long_id.validate().is_err());
        let huge = DriveConfig {
            scratch: Some(ScratchConfig {
                size_mib: Some(u64::MAX),
                wipe: Wipe::Unlink,
            }),
            ..good
        };
        assert!(huge.validate().is_err());
        let vsock = VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::new(),
        };
        assert!(vsock.validate().is_err());
    }
}
