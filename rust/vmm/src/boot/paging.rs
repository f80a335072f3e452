//! Identity-mapped page tables for the 64-bit entry: the first 4 GiB (RAM and the MMIO
//! gap) mapped with 2 MiB pages, so a kernel or probe guest entered in long mode can
//! touch all of low RAM and its devices before it builds tables of its own.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{PAGING_MAX_PDS, PDE_START, PDPTE_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;
const ENTRIES: u64 = 512;

/// Every (guest address, 64-bit value) the page tables consist of.
pub fn page_table_entries() -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity((2 + PAGING_MAX_PDS * ENTRIES) as usize);
    out.push((PML4_START, PDPTE_START | PRESENT_RW));
    for pd in 0..PAGING_MAX_PDS {
        let pd_addr = PDE_START + pd * 0x1000;
        out.push((PDPTE_START + pd * 8, pd_addr | PRESENT_RW));
        for i in 0..ENTRIES {
            let phys = ((pd * ENTRIES) + i) << 21;
            out.push((pd_addr + i * 8, phys | PRESENT_RW | PAGE_SIZE_2M));
        }
    }
    out
}

/// Writes the tables into guest memory; returns the value for CR3.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, value) in page_table_entries() {
        mem.write_obj(value, GuestAddress(addr))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Walks the tables like the MMU does for a 2 MiB page.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let pml4e = read(mem, cr3 + ((va >> 39) & 0x1ff) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = read(mem, (pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = read(mem, (pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (va & 0x1f_ffff))
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn tables_do_not_spill_past_their_pages() {
        let last = page_table_entries().iter().map(|e| e.0).max().unwrap();
        assert!(last < PDE_START + PAGING_MAX_PDS * 0x1000);
    }

    #[test]
    fn addresses_past_4_gib_are_not_mapped() {
        let mem = memory();
        let cr3 = write_page_tables(&mem).unwrap();
        assert_eq!(translate(&mem, cr3, 4 << 30), None);
    }

    proptest! {
        #[test]
        fn low_4_gib_is_identity_mapped(va in 0u64..(4 << 30)) {
            let mem = memory();
            let cr3 = write_page_tables(&mem).unwrap();
            prop_assert_eq!(translate(&mem, cr3, va), Some(va));
        }
    }
}
