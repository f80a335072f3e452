//! The e820 memory map: which guest physical ranges are RAM.
//!
//! Both boot protocols hand the guest this map (Linux in `boot_params.e820_table`, PVH
//! in its memory map table). The range between the EBDA and 1 MiB (BIOS area, MP table)
//! and the MMIO gap are left out, so the guest never uses them as RAM.

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// e820 type for usable RAM.
pub const E820_RAM: u32 = 1;
/// Most entries `boot_params` can carry.
pub const E820_MAX_ENTRIES: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum E820Error {
    #[error("guest memory of {0:#x} bytes is too small: it must extend past 1 MiB")]
    TooSmall(u64),
    #[error("guest RAM range {start:#x}+{len:#x} overlaps the MMIO gap or wraps")]
    BadRange { start: u64, len: u64 },
    #[error("the e820 map would need more than {E820_MAX_ENTRIES} entries")]
    TooManyEntries,
}

/// Builds the e820 map for the given RAM ranges (sorted, as `layout::ram_ranges` returns).
pub fn build_e820(ram: &[(u64, u64)]) -> Result<Vec<E820Entry>, E820Error> {
    let mut entries = vec![E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    }];
    for &(start, len) in ram {
        let end = start
            .checked_add(len)
            .ok_or(E820Error::BadRange { start, len })?;
        if start < MMIO_GAP_END && end > MMIO_GAP_START {
            return Err(E820Error::BadRange { start, len });
        }
        // Low memory below 1 MiB is described by the fixed first entry.
        let start = start.max(HIMEM_START);
        if end > start {
            entries.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    if entries.len() < 2 {
        let total = ram
            .iter()
            .map(|r| r.0.saturating_add(r.1))
            .max()
            .unwrap_or(0);
        return Err(E820Error::TooSmall(total));
    }
    if entries.len() > E820_MAX_ENTRIES {
        return Err(E820Error::TooManyEntries);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ram_ranges;
    use proptest::prelude::*;
    use tartarus_vmm_api::layout::{MAX_MEMORY_BYTES, MIN_MEMORY_BYTES};

    #[test]
    fn small_guest_has_low_and_high_ram() {
        let map = build_e820(&ram_ranges(64 << 20)).unwrap();
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: (64 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn memory_below_one_mib_is_rejected() {
        assert_eq!(
            build_e820(&[(0, 0x8_0000)]),
            Err(E820Error::TooSmall(0x8_0000))
        );
    }

    #[test]
    fn a_range_in_the_mmio_gap_is_rejected() {
        assert!(matches!(
            build_e820(&[(0, MMIO_GAP_START + 1)]),
            Err(E820Error::BadRange { .. })
        ));
        assert!(matches!(
            build_e820(&[(u64::MAX - 1, 4)]),
            Err(E820Error::BadRange { .. })
        ));
    }

    proptest! {
        #[test]
        fn map_is_sorted_disjoint_and_avoids_holes(mem in MIN_MEMORY_BYTES..MAX_MEMORY_BYTES) {
            let map = build_e820(&ram_ranges(mem)).unwrap();
            for pair in map.windows(2) {
                prop_assert!(pair[0].addr + pair[0].size <= pair[1].addr);
            }
            for e in &map {
                let end = e.addr + e.size;
                prop_assert!(end <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
                prop_assert!(end <= EBDA_START || e.addr >= HIMEM_START);
            }
            let last = ram_ranges(mem).last().map(|r| r.0 + r.1);
            prop_assert_eq!(map.last().map(|e| e.addr + e.size), last);
            let ram: u64 = map.iter().map(|e| e.size).sum();
            prop_assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        }
    }
}
