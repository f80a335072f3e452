//! The x86_64 guest physical memory map every microVM gets.
//!
//! Low memory holds the boot structures at fixed addresses (the same places Linux's
//! 64-bit boot protocol and PVH expect to find them); the kernel loads at 1 MiB; a 768 MiB
//! hole below 4 GiB is left for MMIO devices (virtio-mmio, the IOAPIC, the LAPIC), and RAM
//! beyond that hole continues at 4 GiB.
//!
//! The parts a configuration or a snapshot is checked against (memory limits, the MMIO
//! hole, the RAM ranges, the command line size) are in `tartarus_vmm_api::layout`.

pub use tartarus_vmm_api::layout::{ram_ranges, MMIO_GAP_END, MMIO_GAP_START};

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
/// Start of the extended BIOS data area: the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory usable by the guest (the EBDA and BIOS area follow).
pub const EBDA_END: u64 = 0xa0000;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tartarus_vmm_api::layout::CMDLINE_MAX_SIZE;

    // The boot structures must not overlap: checked when the crate compiles.
    const _: () = {
        assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
        assert!(BOOT_STACK_POINTER < PML4_START);
        assert!(PDE_START + PAGING_MAX_PDS * 0x1000 <= CMDLINE_START);
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
        assert!(IOAPIC_START > MMIO_GAP_START && APIC_START < MMIO_GAP_END);
        assert!(GENERATION_DEVICE_START > MMIO_GAP_START + MMIO_DEVICE_SIZE);
    };
}
