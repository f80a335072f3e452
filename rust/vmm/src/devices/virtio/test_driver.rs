//! A virtio driver for tests: it programs a transport only through MMIO register
//! accesses and guest memory, the way Linux's virtio_mmio and virtio_ring do, so the
//! device code is exercised exactly as a guest exercises it. It can also write any
//! descriptor a hostile driver would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{Interrupt, VirtioDevice};
use super::mmio::{reg, MmioTransport};

pub const MEM_SIZE: usize = 16 << 20;
/// Where the driver puts its rings: queue `i` at `RINGS + i * 0x10000`.
const RINGS: u64 = 0x10_0000;
/// Data buffers live above this address.
pub const DATA: u64 = 0x40_0000;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// One descriptor as the driver writes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Desc {
    pub fn r(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }
    pub fn w(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: true,
        }
    }
}

pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    pub used_seen: u16,
}

pub struct Driver<D: VirtioDevice> {
    pub transport: Arc<Mutex<MmioTransport<D>>>,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<QueueLayout>,
}

impl<D: VirtioDevice> Driver<D> {
    pub fn new(device: D) -> Self {
        let mem = guest_memory();
        let transport = MmioTransport::new(device, mem.clone(), Interrupt::polled());
        Driver {
            transport: Arc::new(Mutex::new(transport)),
            mem,
            queues: Vec::new(),
        }
    }

    pub fn read(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport
            .lock()
            .unwrap()
            .mmio_read(MmioAddress(0), offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write(&self, offset: u64, value: u32) {
        self.transport
            .lock()
            .unwrap()
            .mmio_write(MmioAddress(0), offset, &value.to_le_bytes());
    }

    pub fn read_config(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.transport
            .lock()
            .unwrap()
            .mmio_read(MmioAddress(0), reg::CONFIG + offset, &mut data);
        data
    }

    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(self.read(reg::DEVICE_FEATURES));
        lo | (hi << 32)
    }

    /// Negotiates `features` and sets up `sizes.len()` queues; returns the final status.
    pub fn init(&mut self, features: u64, sizes: &[u16]) -> u32 {
        assert_eq!(self.read(reg::MAGIC), 0x7472_6976);
        assert_eq!(self.read(reg::VERSION), 2);
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write(
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write(reg::STATUS, s);
        if self.read(reg::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return self.read(reg::STATUS);
        }
        self.queues.clear();
        for (i, &size) in sizes.iter().enumerate() {
            let base = RINGS + i as u64 * 0x10000;
            let layout = QueueLayout {
                size,
                desc: base,
                avail: base + 16 * u64::from(size),
                used: base + 0x8000,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            };
            self.write(reg::QUEUE_SEL, i as u32);
            assert!(self.read(reg::QUEUE_NUM_MAX) >= u32::from(size));
            self.write(reg::QUEUE_NUM, u32::from(size));
            self.write(reg::QUEUE_DESC_LOW, layout.desc as u32);
            self.write(reg::QUEUE_DESC_HIGH, (layout.desc >> 32) as u32);
            self.write(reg::QUEUE_DRIVER_LOW, layout.avail as u32);
            self.write(reg::QUEUE_DRIVER_HIGH, 0);
            self.write(reg::QUEUE_DEVICE_LOW, layout.used as u32);
            self.write(reg::QUEUE_DEVICE_HIGH, 0);
            self.write(reg::QUEUE_READY, 1);
            self.queues.push(layout);
        }
        self.write(reg::STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        self.read(reg::STATUS)
    }

    /// Writes descriptor `index` of queue `q` verbatim (hostile drivers use this).
    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.queues[q].desc + 16 * u64::from(index);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Publishes `head` in the available ring (does not notify).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let layout = &mut self.queues[q];
        let slot = layout.avail + 4 + 2 * u64::from(layout.avail_idx % layout.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        layout.avail_idx = layout.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(layout.avail_idx, GuestAddress(layout.avail + 2))
            .unwrap();
    }

    /// Writes a well-formed chain from `descs`, publishes it, and returns its head.
    pub fn add_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let size = self.queues[q].size;
        let head = self.queues[q].next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % size;
            let last = i + 1 == descs.len();
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(q, index, d.addr, d.len, flags, (index + 1) % size);
        }
        self.queues[q].next_desc = (head + descs.len() as u16) % size;
        self.push_avail(q, head);
        head
    }

    pub fn notify(&self, q: usize) {
        self.write(reg::QUEUE_NOTIFY, q as u32);
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.queues[q].used + 2))
            .unwrap()
    }

    /// Takes the next used element (id, len) if the device has placed one.
    pub fn pop_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let layout = &self.queues[q];
        if self.used_idx(q) == layout.used_seen {
            return None;
        }
        let elem = layout.used + 4 + 8 * u64::from(layout.used_seen % layout.size);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        self.queues[q].used_seen = layout.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Polls the used ring until an element arrives (for devices with worker threads).
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.pop_used(q) {
                return Some(e);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
