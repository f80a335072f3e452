//! Virtio devices on the virtio-mmio transport (virtio 1.2, "modern" MMIO, version 2).
//!
//! - [`mmio`]: the register file a driver programs, implementing `vm_device::MutDeviceMmio`
//!   so the VMM's MMIO bus dispatches guest accesses to it;
//! - [`chain`]: descriptor-chain validation every device uses before touching guest memory;
//! - [`block`]: virtio-blk over a host file (read-only root, writable scratch "Lethe" disks);
//! - [`vsock`]: virtio-vsock with a hybrid unix-socket host side;
//! - [`rate_limiter`]: token buckets for I/O limits;
//! - [`worker`]: the thread that serves a device's notifications, host-side file
//!   descriptors and timers;
//! - [`attach`]: puts a machine's disks and vsock on the VMM's MMIO bus.
//!
//! Devices are declared to the guest on the kernel command line
//! (`virtio_mmio.device=<size>@<addr>:<irq>`, written by the `DeviceManager`).

pub mod attach;
pub mod block;
pub mod chain;
pub mod device;
pub mod mmio;
pub mod rate_limiter;
pub mod vsock;
pub mod worker;

#[cfg(test)]
pub(crate) mod test_driver;

pub use device::{Interrupt, IrqLine, VirtioDevice};
pub use mmio::MmioTransport;
