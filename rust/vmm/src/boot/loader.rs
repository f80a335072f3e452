//! Loads the guest kernel into guest memory with linux-loader: a vmlinux ELF (its 64-bit
//! entry, plus the PVH entry from its `XEN_ELFNOTE_PHYS32_ENTRY` note when present) or
//! a bzImage.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::bootparam::setup_header;
use linux_loader::loader::{elf::PvhBootCapability, BzImage, Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::HIMEM_START;

/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// The 64-bit (Linux boot protocol) entry point.
    pub entry64: u64,
    /// The 32-bit PVH entry point, if the ELF carries one.
    pub pvh_entry: Option<u64>,
    /// First guest address past the loaded image.
    pub kernel_end: u64,
    /// The bzImage's setup header, to be copied into boot_params.
    pub setup_header: Option<setup_header>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open kernel {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither a vmlinux ELF nor a bzImage: {source}")]
    Format {
        path: String,
        source: linux_loader::loader::Error,
    },
}

/// Loads `path` into `mem`, choosing the loader by the file's magic.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoadError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| LoadError::Open {
        path: shown.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    let himem = Some(GuestAddress(HIMEM_START));
    let format_err = |source| LoadError::Format {
        path: shown.clone(),
        source,
    };
    if is_elf {
        let r = Elf::load(mem, None, &mut file, himem).map_err(format_err)?;
        let pvh_entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
            _ => None,
        };
        Ok(LoadedKernel {
            format: KernelFormat::Elf,
            entry64: r.kernel_load.0,
            pvh_entry,
            kernel_end: r.kernel_end,
            setup_header: None,
        })
    } else {
        let r = BzImage::load(mem, None, &mut file, himem).map_err(format_err)?;
        Ok(LoadedKernel {
            format: KernelFormat::BzImage,
            entry64: r.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET,
            pvh_entry: None,
            kernel_end: r.kernel_end,
            setup_header: r.setup_header,
        })
    }
}
