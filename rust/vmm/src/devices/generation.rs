//! The generation device: one read-only MMIO page where the guest finds out which
//! clone it is. A guest restored from a snapshot shares every byte of memory with its
//! siblings, including the state of its random number generators; this page is how it
//! learns that it must diverge. Each restore gives it a new generation number, the
//! clone index the restorer chose, a new random VM id and 32 bytes of fresh entropy to
//! reseed from (the same idea as the VM generation ID of other hypervisors).
//!
//! ```text
//! offset  size  field
//! 0x00    4     magic "TGEN"
//! 0x04    4     layout version (1)
//! 0x08    8     generation: 0 at boot, +1 at every restore
//! 0x10    8     clone index (0 unless the restorer set one)
//! 0x18    16    VM id (random, new at boot and at every restore)
//! 0x30    32    entropy (random, new at boot and at every restore)
//! ```
//! Everything else in the page reads as zero; writes are ignored.

use serde::{Deserialize, Serialize};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

pub const GENERATION_MAGIC: [u8; 4] = *b"TGEN";
pub const GENERATION_LAYOUT_VERSION: u32 = 1;
pub const GENERATION_PAGE_SIZE: u64 = 0x1000;

/// What the page says; saved in snapshots so a restore knows the previous generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationState {
    pub generation: u64,
    pub clone_id: u64,
    pub vm_id: [u8; 16],
    pub entropy: [u8; 32],
}

/// Fills `buf` from the kernel's random number generator.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

impl GenerationState {
    /// A freshly booted machine: generation 0.
    pub fn first() -> std::io::Result<Self> {
        Self::next_of(None, 0)
    }

    /// The state a restore of `previous` starts with: next generation, new identity.
    pub fn next_of(previous: Option<&GenerationState>, clone_id: u64) -> std::io::Result<Self> {
        let mut vm_id = [0u8; 16];
        let mut entropy = [0u8; 32];
        random_bytes(&mut vm_id)?;
        random_bytes(&mut entropy)?;
        Ok(GenerationState {
            generation: previous.map_or(0, |p| p.generation.saturating_add(1)),
            clone_id,
            vm_id,
            entropy,
        })
    }

    fn page_bytes(&self) -> [u8; 0x50] {
        let mut page = [0u8; 0x50];
        page[0..4].copy_from_slice(&GENERATION_MAGIC);
        page[4..8].copy_from_slice(&GENERATION_LAYOUT_VERSION.to_le_bytes());
        page[8..16].copy_from_slice(&self.generation.to_le_bytes());
        page[16..24].copy_from_slice(&self.clone_id.to_le_bytes());
        page[24..40].copy_from_slice(&self.vm_id);
        page[48..80].copy_from_slice(&self.entropy);
        page
    }
}

pub struct GenerationDevice {
    state: GenerationState,
    page: [u8; 0x50],
}

impl GenerationDevice {
    pub fn new(state: GenerationState) -> Self {
        let page = state.page_bytes();
        GenerationDevice { state, page }
    }

    pub fn state(&self) -> &GenerationState {
        &self.state
    }
}

impl MutDeviceMmio for GenerationDevice {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.page.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, _offset: MmioAddressOffset, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut GenerationDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xee; len];
        dev.mmio_read(MmioAddress(0), offset, &mut buf);
        buf
    }

    #[test]
    fn the_page_shows_the_state_and_zeros_elsewhere() {
        let first = GenerationState::first().unwrap();
        let next = GenerationState::next_of(Some(&first), 7).unwrap();
        assert_eq!(next.generation, 1);
        assert_ne!(next.vm_id, first.vm_id);
        assert_ne!(next.entropy, first.entropy);
        let mut dev = GenerationDevice::new(next.clone());
        assert_eq!(read(&mut dev, 0, 4), b"TGEN");
        assert_eq!(read(&mut dev, 8, 8), 1u64.to_le_bytes());
        assert_eq!(read(&mut dev, 16, 8), 7u64.to_le_bytes());
        assert_eq!(read(&mut dev, 24, 16), next.vm_id);
        assert_eq!(read(&mut dev, 48, 32), next.entropy);
        assert_eq!(read(&mut dev, 0xff8, 8), [0; 8]);
        assert_eq!(read(&mut dev, u64::MAX, 8), [0; 8]);
        dev.mmio_write(MmioAddress(0), 8, &[1, 2, 3]);
        assert_eq!(
            read(&mut dev, 8, 8),
            1u64.to_le_bytes(),
            "writes are ignored"
        );
    }
}
