//! The contract between the virtio-mmio transport and a device model.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Why a device stopped serving its queues. The transport answers by setting
/// `DEVICE_NEEDS_RESET` in the status register, as the spec asks.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue {0} is not ready or not valid in guest memory")]
    QueueNotReady(usize),
    #[error("guest memory access failed: {0}")]
    Memory(String),
    #[error("host I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("invalid device state: {0}")]
    State(String),
}

/// Something that raises the device's interrupt in the guest: an irqfd registered with
/// KVM (`EventFd`), or nothing at all for poll-mode guests.
pub trait IrqLine: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

impl IrqLine for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// The IRQ line of a guest that polls its used rings and never takes interrupts.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The interrupt status register plus the line that announces changes to it.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn IrqLine>,
}

impl Interrupt {
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            line,
        }
    }

    /// An interrupt for poll-mode guests (status bits are still kept, for the driver).
    pub fn polled() -> Self {
        Interrupt::new(Arc::new(NoIrq))
    }

    /// The device placed buffers in a used ring.
    pub fn signal_used(&self) -> io::Result<()> {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.line.trigger()
    }

    /// The device's configuration (or its status, e.g. NEEDS_RESET) changed.
    pub fn signal_config(&self) -> io::Result<()> {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        self.line.trigger()
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits` (InterruptACK register).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// What a device sees while it serves a queue: every queue and the guest's memory.
pub struct QueueContext<'a> {
    pub queues: &'a mut [Queue],
    pub mem: &'a GuestMemoryMmap,
}

/// A virtio device model; the transport owns the queues and calls it.
///
/// Processing returns whether buffers were placed in a used ring (the transport then
/// raises the interrupt). Host-side work (sockets, timers) is served by the
/// [`worker`](super::worker) through the `backend_*` methods.
pub trait VirtioDevice: Send {
    /// Serialisable device state for snapshots.
    type State: Serialize + DeserializeOwned;

    /// Virtio device ID (2 = block, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The device-specific configuration space.
    fn config_space(&self) -> Vec<u8>;
    /// The driver set DRIVER_OK with these features; queues are valid.
    fn activate(&mut self, acked_features: u64) -> Result<(), DeviceError>;
    /// The driver notified `queue`.
    fn process_queue(&mut self, queue: usize, ctx: QueueContext<'_>) -> Result<bool, DeviceError>;
    /// The driver reset the device (status 0): drop all in-flight work.
    fn reset(&mut self);

    /// File descriptors the worker should poll for this device, with poll(2) events.
    fn backend_fds(&self) -> Vec<(RawFd, i16)> {
        Vec::new()
    }
    /// When the worker should call [`Self::process_backend`] even if no fd is ready.
    fn backend_deadline(&self) -> Option<Instant> {
        None
    }
    /// Serves host-side events (readable sockets, expired throttles).
    fn process_backend(&mut self, _ctx: QueueContext<'_>) -> Result<bool, DeviceError> {
        Ok(false)
    }

    fn save(&self) -> Self::State;
    fn restore(&mut self, state: Self::State) -> Result<(), DeviceError>;
}

/// Returns a chain to the driver: `len` bytes were written into its buffers.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| DeviceError::Memory(e.to_string()))
}

/// Copies `data.len()` bytes of `config` starting at `offset`; bytes past the end read 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start.saturating_add(data.len()));
    data[..end - start].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut out = [9u8; 4];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acked() {
        let irq = Interrupt::polled();
        irq.signal_used().unwrap();
        irq.signal_config().unwrap();
        assert_eq!(irq.status(), 3);
        irq.ack(1);
        assert_eq!(irq.status(), 2);
    }
}
