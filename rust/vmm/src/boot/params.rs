//! The boot parameter blocks: Linux's `boot_params` (zero page) and PVH's
//! `hvm_start_info` with its memory map, written through linux-loader's configurators
//! (which bounds-check every write against guest memory).

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::e820::E820Entry;
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The zero page for the Linux 64-bit boot protocol.
pub fn zero_page(e820: &[E820Entry], cmdline_len: usize, hdr: Option<setup_header>) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = hdr {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    params
}

pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    cmdline_len: usize,
    hdr: Option<setup_header>,
) -> Result<(), linux_loader::configurator::Error> {
    let params = zero_page(e820, cmdline_len, hdr);
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
}

/// `hvm_start_info` (56 bytes) as the guest reads it.
pub fn pvh_start_info_bytes(memmap_entries: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(56);
    b.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // version
    b.extend_from_slice(&0u32.to_le_bytes()); // flags
    b.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    b.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    b.extend_from_slice(&CMDLINE_START.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr
    b.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    b.extend_from_slice(&memmap_entries.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // reserved
    b
}

/// The PVH memory map table: 24-byte entries (addr, size, type, reserved).
pub fn pvh_memmap_bytes(e820: &[E820Entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(e820.len() * 24);
    for e in e820 {
        b.extend_from_slice(&e.addr.to_le_bytes());
        b.extend_from_slice(&e.size.to_le_bytes());
        b.extend_from_slice(&e.kind.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    b
}

pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    _cmdline_len: usize,
) -> Result<(), linux_loader::configurator::Error> {
    let params = BootParams {
        header: pvh_start_info_bytes(e820.len() as u32),
        header_start: GuestAddress(PVH_INFO_START),
        sections: Some(pvh_memmap_bytes(e820)),
        sections_start: Some(GuestAddress(PVH_MEMMAP_START)),
        modules: None,
        modules_start: None,
    };
    PvhBootConfigurator::write_bootparams(&params, mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::e820::{build_e820, E820_RAM};
    use crate::layout::ram_ranges;
    use vm_memory::Bytes;

    #[test]
    fn zero_page_carries_magic_cmdline_and_e820() {
        let e820 = build_e820(&ram_ranges(64 << 20)).unwrap();
        let p = zero_page(&e820, 12, None);
        let (magic, flag, ptr, n) = (
            p.hdr.header,
            p.hdr.boot_flag,
            p.hdr.cmd_line_ptr,
            p.e820_entries,
        );
        assert_eq!(
            (magic, flag, ptr as u64, n),
            (KERNEL_HDR_MAGIC, 0xaa55, CMDLINE_START, 2)
        );
        let second = p.e820_table[1];
        let (addr, kind) = (second.addr, second.r#type);
        assert_eq!((addr, kind), (0x10_0000, E820_RAM));
    }

    #[test]
    fn pvh_start_info_is_written_where_the_guest_looks() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e820 = build_e820(&ram_ranges(64 << 20)).unwrap();
        write_pvh_start_info(&mem, &e820, 1).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_START + 48)).unwrap();
        assert_eq!(entries, 2);
        let second_addr: u64 = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!(second_addr, 0x10_0000);
        assert_eq!(pvh_start_info_bytes(0).len(), 56);
    }
}
