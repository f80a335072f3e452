//! Devices and the buses they sit on.
//!
//! The PIO and MMIO buses are rust-vmm's `vm_device` buses (`IoManager`). Devices are
//! registered before the vCPUs start, then the bus is shared read-only by every vCPU
//! thread; a device with state sits behind a `Mutex` (vm-device's `MutDevicePio` /
//! `MutDeviceMmio`). Accesses nobody claims are counted and answered like an empty
//! bus (reads return all ones), never an error that stops the VM.
//!
//! Adding a virtio-mmio device: `allocate_mmio_slot` picks its 4 KiB window and GSI,
//! `irq_eventfd` gives the eventfd that raises that GSI, `register_mmio_device` puts
//! the device on the bus and on the kernel command line.

pub mod generation;
pub mod legacy;
pub mod serial_output;
pub mod virtio;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use linux_loader::cmdline::Cmdline;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::{GENERATION_DEVICE_START, IRQ_BASE, IRQ_MAX, MMIO_DEVICE_SIZE, MMIO_GAP_START};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no MMIO window left for another device")]
    NoMmioSpace,
    #[error("no interrupt line left for another device (GSIs {IRQ_BASE}..={IRQ_MAX} are taken)")]
    NoIrq,
    #[error("bus registration failed: {0:?}")]
    Bus(vm_device::bus::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot register irqfd for GSI {gsi}: {source}")]
    IrqFd { gsi: u32, source: kvm_ioctls::Error },
    #[error("kernel command line has no room for device {0}")]
    Cmdline(String),
    #[error("virtio device: {0}")]
    Virtio(String),
}

/// One device window on the MMIO bus and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// Counts of guest accesses that reached no device.
#[derive(Debug, Default)]
pub struct UnclaimedAccesses {
    pub pio_reads: AtomicU64,
    pub pio_writes: AtomicU64,
    pub mmio_reads: AtomicU64,
    pub mmio_writes: AtomicU64,
}

pub struct DeviceManager {
    io: IoManager,
    vm: Arc<VmFd>,
    next_mmio: u64,
    next_irq: u32,
    mmio_slots: Vec<MmioSlot>,
    pub unclaimed: UnclaimedAccesses,
}

impl DeviceManager {
    pub fn new(vm: Arc<VmFd>) -> Self {
        DeviceManager {
            io: IoManager::new(),
            vm,
            next_mmio: MMIO_GAP_START,
            next_irq: IRQ_BASE,
            mmio_slots: Vec::new(),
            unclaimed: UnclaimedAccesses::default(),
        }
    }

    /// Reserves the next MMIO window and GSI for a device.
    pub fn allocate_mmio_slot(&mut self) -> Result<MmioSlot, DeviceError> {
        if self.next_mmio + MMIO_DEVICE_SIZE > GENERATION_DEVICE_START {
            return Err(DeviceError::NoMmioSpace);
        }
        if self.next_irq > IRQ_MAX {
            return Err(DeviceError::NoIrq);
        }
        let slot = MmioSlot {
            base: self.next_mmio,
            size: MMIO_DEVICE_SIZE,
            gsi: self.next_irq,
        };
        self.next_mmio += MMIO_DEVICE_SIZE;
        self.next_irq += 1;
        Ok(slot)
    }

    /// An eventfd that raises `gsi` on the in-kernel interrupt controller when written.
    pub fn irq_eventfd(&self, gsi: u32) -> Result<EventFd, DeviceError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(|source| DeviceError::IrqFd { gsi, source })?;
        Ok(evt)
    }

    /// The VM, for devices that register ioeventfds.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Puts a virtio-mmio device in `slot` on the bus; it is announced to the guest on
    /// the kernel command line (`virtio_mmio.device=`).
    pub fn register_mmio_device<D>(
        &mut self,
        slot: MmioSlot,
        device: Arc<Mutex<D>>,
    ) -> Result<(), DeviceError>
    where
        D: MutDeviceMmio + Send + 'static,
    {
        self.register_fixed_mmio_device(slot.base, slot.size, device)?;
        self.mmio_slots.push(slot);
        Ok(())
    }

    /// Puts a device at a fixed MMIO window that is not announced on the command line
    /// (the guest knows the address, e.g. the generation device).
    pub fn register_fixed_mmio_device<D>(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<Mutex<D>>,
    ) -> Result<(), DeviceError>
    where
        D: MutDeviceMmio + Send + 'static,
    {
        let range = MmioRange::new(MmioAddress(base), size).map_err(DeviceError::Bus)?;
        self.io
            .register_mmio(range, device)
            .map_err(DeviceError::Bus)
    }

    /// Puts a port-I/O device on `size` ports starting at `base`.
    pub fn register_pio_device<D>(
        &mut self,
        base: u16,
        size: u16,
        device: Arc<Mutex<D>>,
    ) -> Result<(), DeviceError>
    where
        D: MutDevicePio + Send + 'static,
    {
        let range = PioRange::new(PioAddress(base), size).map_err(DeviceError::Bus)?;
        self.io
            .register_pio(range, device)
            .map_err(DeviceError::Bus)
    }

    /// Adds `virtio_mmio.device=` entries for every registered MMIO device.
    pub fn add_to_cmdline(&self, cmdline: &mut Cmdline) -> Result<(), DeviceError> {
        for slot in &self.mmio_slots {
            cmdline
                .add_virtio_mmio_device(slot.size, GuestAddress(slot.base), slot.gsi, None)
                .map_err(|e| DeviceError::Cmdline(format!("{slot:?}: {e}")))?;
        }
        Ok(())
    }

    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.mmio_slots
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            data.fill(0xff);
            self.unclaimed.pio_reads.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.io.pio_write(PioAddress(port), data).is_err() {
            self.unclaimed.pio_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.io.mmio_read(MmioAddress(addr), data).is_err() {
            data.fill(0xff);
            self.unclaimed.mmio_reads.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.io.mmio_write(MmioAddress(addr), data).is_err() {
            self.unclaimed.mmio_writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}
