//! x86_64 boot: kernel loading and the structures a guest reads at entry (command line,
//! MP table, e820 map, boot_params or PVH start info, page tables, GDT), written into
//! guest memory before any vCPU runs.

pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod loader;
pub mod mptable;
pub mod paging;
pub mod params;
pub mod regs;

use std::path::Path;

use linux_loader::cmdline::Cmdline;
use tartarus_vmm_api::config::BootProtocol;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{CMDLINE_START, EBDA_START, PVH_INFO_START, ZERO_PAGE_START};
use loader::{LoadError, LoadedKernel};
use regs::EntryMode;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the kernel has no PVH entry note, so it cannot boot with protocol \"pvh\"")]
    NoPvhEntry,
    #[error(transparent)]
    Cmdline(#[from] tartarus_vmm_api::cmdline::CmdlineError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    E820(#[from] e820::E820Error),
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("cannot write boot parameters: {0}")]
    Params(#[from] linux_loader::configurator::Error),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
}

/// What the boot code decided, for the vCPUs and for reporting.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub kernel: LoadedKernel,
    pub entry: EntryMode,
}

/// Loads the kernel and writes every boot structure for `vcpus` vCPUs.
pub fn prepare_boot(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    kernel_path: &Path,
    cmdline: &Cmdline,
    vcpus: u8,
    protocol: BootProtocol,
) -> Result<BootInfo, BootError> {
    let kernel = loader::load_kernel(mem, kernel_path)?;
    let use_pvh = match protocol {
        BootProtocol::Auto => kernel.pvh_entry.is_some(),
        BootProtocol::Linux64 => false,
        BootProtocol::Pvh => {
            kernel.pvh_entry.ok_or(BootError::NoPvhEntry)?;
            true
        }
    };
    let cmdline_bytes = tartarus_vmm_api::cmdline::cmdline_bytes(cmdline)?;
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_START))?;
    mem.write_slice(&mptable::build_mptable(vcpus)?, GuestAddress(EBDA_START))?;
    let e820 = e820::build_e820(ram)?;
    let entry = match (use_pvh, kernel.pvh_entry) {
        (true, Some(pvh)) => {
            params::write_pvh_start_info(mem, &e820, cmdline_bytes.len())?;
            EntryMode::Pvh {
                entry: pvh,
                start_info: PVH_INFO_START,
            }
        }
        _ => {
            params::write_zero_page(mem, &e820, cmdline_bytes.len(), kernel.setup_header)?;
            EntryMode::Long64 {
                entry: kernel.entry64,
                boot_params: ZERO_PAGE_START,
                cr3: paging::write_page_tables(mem)?,
            }
        }
    };
    regs::write_gdt(mem, &entry)?;
    Ok(BootInfo { kernel, entry })
}
