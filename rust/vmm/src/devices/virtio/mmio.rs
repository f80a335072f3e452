//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2).
//!
//! A driver discovers the device from the kernel command line, reads its ID and
//! features, negotiates, programs each queue's rings and sets DRIVER_OK; after that it
//! writes QueueNotify to hand over buffers. This file is the register file for that
//! conversation. Invalid accesses (bad widths, writes in the wrong state, unknown
//! registers) are ignored rather than trusted; a device error sets NEEDS_RESET.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device::{read_config_bytes, DeviceError, Interrupt, QueueContext, VirtioDevice};

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("TART").
pub const VENDOR_ID: u32 = 0x5452_4154;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Serialisable transport state (registers and queues) for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState<S> {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: S,
}

/// A queue's registers and ring positions (virtio-queue's `QueueState`, with serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// A virtio device behind the MMIO register file.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Interrupt,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// With a worker attached, notifications are handed to it (bit per queue) and it
    /// is woken through this eventfd: the vCPU thread never does device I/O.
    wake: Option<Arc<EventFd>>,
    pending_notify: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Interrupt) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            queues,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            wake: None,
            pending_notify: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    pub(crate) fn set_wake(&mut self, wake: Arc<EventFd>) {
        self.wake = Some(wake);
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Handles a notification for `queue` (a QueueNotify write): served here when the
    /// device has no worker (tests), otherwise queued for the worker.
    pub fn notify_queue(&mut self, queue: usize) {
        if !self.is_activated() || !self.queues.get(queue).is_some_and(|q| q.ready()) {
            return;
        }
        match &self.wake {
            Some(wake) => {
                self.pending_notify |= 1 << queue;
                let _ = wake.write(1);
            }
            None => self.process_queue(queue),
        }
    }

    fn process_queue(&mut self, queue: usize) {
        let ctx = QueueContext {
            queues: &mut self.queues,
            mem: &self.mem,
        };
        let outcome = self.device.process_queue(queue, ctx);
        self.after_processing(outcome);
    }

    /// What the worker waits on for the device's host side: its fds and deadline, or
    /// nothing before the driver activates it. (`process_backend` does nothing until
    /// then, so a ready fd, such as a host connection waiting on a vsock listener while
    /// the guest boots, would make the worker spin.)
    pub fn backend_wait(&self) -> (Vec<(RawFd, i16)>, Option<Instant>) {
        if !self.is_activated() {
            return (Vec::new(), None);
        }
        (self.device.backend_fds(), self.device.backend_deadline())
    }

    /// Serves queued notifications, then the device's host side (called by the worker).
    pub fn process_backend(&mut self) {
        if !self.is_activated() {
            return;
        }
        let pending = std::mem::take(&mut self.pending_notify);
        for queue in 0..self.queues.len() {
            if pending & (1 << queue) != 0 {
                self.process_queue(queue);
            }
        }
        if !self.is_activated() {
            return;
        }
        let ctx = QueueContext {
            queues: &mut self.queues,
            mem: &self.mem,
        };
        let outcome = self.device.process_backend(ctx);
        self.after_processing(outcome);
    }

    fn after_processing(&mut self, outcome: Result<bool, DeviceError>) {
        match outcome {
            Ok(true) => {
                let _ = self.interrupt.signal_used();
            }
            Ok(false) => {}
            Err(_) => self.needs_reset(),
        }
    }

    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        let _ = self.interrupt.signal_config();
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.pending_notify = 0;
        self.interrupt.set_status(0);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is a confused or hostile driver.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        let mut new = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let ack_driver = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
            let acked = self.acked_features;
            let ok = self.status & ack_driver == ack_driver
                && acked & !self.offered_features() == 0
                && acked & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Left clear: the driver reads it back and gives up, as the spec says.
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                return;
            }
            self.status = new;
            if let Err(_e) = self.activate() {
                self.needs_reset();
            }
            // The worker waits on nothing of the device's until now: have it look again.
            if let Some(wake) = &self.wake {
                let _ = wake.write(1);
            }
            return;
        }
        self.status = new;
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(DeviceError::QueueNotReady(i));
            }
        }
        let event_idx = self.acked_features
            & (1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        self.device.activate(self.acked_features)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK, on a queue
    /// that is not live.
    fn queue_writable(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if !negotiating {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | u64::from(value);
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32);
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NOTIFY => self.notify_queue((value & 0xffff) as usize),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_writable() {
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        if q.ready() && !(offset == reg::QUEUE_READY && value == 0) {
            return;
        }
        match offset {
            // virtio-queue ignores sizes that are not powers of two or exceed the maximum.
            reg::QUEUE_NUM => q.set_size(value as u16),
            reg::QUEUE_READY => q.set_ready(value == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// Captures registers, queues and device state.
    pub fn save(&self) -> TransportState<D::State> {
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: self.device.save(),
        }
    }

    /// Restores a saved state; queues are validated again (the state is untrusted).
    pub fn restore(&mut self, state: TransportState<D::State>) -> Result<(), DeviceError> {
        if state.queues.len() != self.queues.len() {
            return Err(DeviceError::State(format!(
                "{} queues saved, device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, live)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != live.max_size() {
                return Err(DeviceError::State(format!("queue {i}: max size differs")));
            }
            let q = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| DeviceError::State(format!("queue {i}: {e}")))?;
            queues.push(q);
        }
        self.device.restore(state.device)?;
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        // Buffers the driver queued before the snapshot (e.g. requests a rate limit held
        // back) are served by the worker's next pass: the driver will not notify again.
        self.pending_notify = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .fold(0, |bits, (i, _)| bits | 1 << i);
        if let Some(wake) = &self.wake {
            let _ = wake.write(1);
        }
        Ok(())
    }
}

impl<D: VirtioDevice> MutDeviceMmio for MmioTransport<D> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            read_config_bytes(&self.device.config_space(), offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32-bit and aligned; anything else reads as zero.
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        // Our devices have no writable configuration fields.
        if offset >= reg::CONFIG || data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, value);
    }
}
