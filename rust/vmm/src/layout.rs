//! The x86_64 guest physical memory map every microVM gets.
//!
//! Low memory holds the boot structures at fixed addresses (the same places Linux's
//! 64-bit boot protocol and PVH expect to find them); the kernel loads at 1 MiB; a 768 MiB
//! hole below 4 GiB is left for MMIO devices (virtio-mmio, the IOAPIC, the LAPIC), and RAM
//! beyond that hole continues at 4 GiB.

/// GDT used at boot (four descriptors).
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT used at boot (empty: the guest installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table (after `hvm_start_info`).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, then up to `PAGING_MAX_PDS` page directories.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Page directories mapping 1 GiB each with 2 MiB pages: the first 4 GiB are mapped.
pub const PAGING_MAX_PDS: u64 = 4;
/// Kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line (including the NUL) the guest accepts.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory usable by the guest (the EBDA and BIOS area follow).
pub const EBDA_END: u64 = 0xa0000;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: devices live between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// IOAPIC and LAPIC register windows (inside the MMIO gap, above the device windows).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The generation device's page (clone identity, see `devices::generation`): the last
/// page below the IOAPIC, at a fixed address a guest can rely on.
pub const GENERATION_DEVICE_START: u64 = IOAPIC_START - 0x1000;
pub const APIC_START: u64 = 0xfee0_0000;
/// First GSI handed to MMIO devices (0-4 are legacy: timer, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last usable GSI on the in-kernel IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// Address KVM uses for its TSS (Intel VMX needs three pages below 4 GiB).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
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

    // The boot structures must not overlap: checked when the crate compiles.
    const _: () = {
        assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
        assert!(BOOT_STACK_POINTER < PML4_START);
        assert!(PDE_START + PAGING_MAX_PDS * 0x1000 <= CMDLINE_START);
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
        assert!(IOAPIC_START > MMIO_GAP_START && APIC_START < MMIO_GAP_END);
        assert!(GENERATION_DEVICE_START > MMIO_GAP_START + MMIO_DEVICE_SIZE);
    };

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
