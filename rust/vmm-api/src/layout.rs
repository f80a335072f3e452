//! The parts of the guest memory map that a configuration or a snapshot is checked
//! against; the rest of the map (where the boot structures and devices go) is
//! `tartarus_vmm::layout`.

/// Longest command line (including the NUL) the guest accepts.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// The 32-bit MMIO hole: devices live between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Most vCPUs whose processor entries fit in the EBDA space the VMM reserves for the
/// MP table.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest RAM the boot structures fit in.
pub const MIN_MEMORY_BYTES: u64 = 2 << 20;
/// Largest guest RAM we accept (bounded so a bad request cannot ask for the moon).
pub const MAX_MEMORY_BYTES: u64 = 256 << 30;

/// The RAM ranges for `mem_size` bytes of guest memory: one range below the MMIO gap and,
/// if needed, one starting at 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1].0, MMIO_GAP_END);
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    proptest! {
        #[test]
        fn ranges_cover_exactly_the_memory_and_avoid_the_gap(mem in MIN_MEMORY_BYTES..MAX_MEMORY_BYTES) {
            let ranges = ram_ranges(mem);
            let total: u64 = ranges.iter().map(|r| r.1).sum();
            prop_assert_eq!(total, mem);
            for (start, len) in ranges {
                let end = start + len;
                prop_assert!(end <= MMIO_GAP_START || start >= MMIO_GAP_END);
            }
        }
    }
}
