//! Guest RAM: anonymous memory (optionally on huge pages) or a private, copy-on-write
//! mapping of a file (snapshot restore), registered with KVM slot by slot.

use std::fs::File;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use tartarus_vmm_api::config::MemoryBacking;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot open memory file {path}: {source}")]
    OpenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("memory file {path} holds {have} bytes but the guest needs {need}")]
    FileTooSmall { path: String, have: u64, need: u64 },
    #[error("cannot map {size} bytes of guest memory: {detail}")]
    Map { size: u64, detail: String },
    #[error(
        "cannot reserve {size} bytes of 2 MiB huge pages for guest memory ({detail}): \
         reserve more in /proc/sys/vm/nr_hugepages, or drop memory.hugepages"
    )]
    HugePages { size: u64, detail: String },
    #[error("KVM rejected memory slot {slot}: {source}")]
    Slot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Maps guest RAM for `ranges` (guest address, length) as `backing` asks.
pub fn create_guest_memory(
    ranges: &[(u64, u64)],
    backing: &MemoryBacking,
) -> Result<GuestMemoryMmap, MemoryError> {
    match &backing.file {
        Some(path) => {
            let shown = path.display().to_string();
            let f = File::open(path).map_err(|source| MemoryError::OpenFile {
                path: shown.clone(),
                source,
            })?;
            map_guest_memory(ranges, Some((&f, 0, &shown)), false)
        }
        None => map_guest_memory(ranges, None, backing.hugepages),
    }
}

/// Maps guest RAM privately from `file` starting at `offset` (a snapshot's memory
/// section): pages are shared with every other mapping of the file until written.
pub fn map_guest_memory_from(
    ranges: &[(u64, u64)],
    file: &File,
    offset: u64,
    shown: &str,
) -> Result<GuestMemoryMmap, MemoryError> {
    map_guest_memory(ranges, Some((file, offset, shown)), false)
}

fn map_guest_memory(
    ranges: &[(u64, u64)],
    file: Option<(&File, u64, &str)>,
    hugepages: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut file_offset = 0u64;
    if let Some((f, offset, shown)) = file {
        let need: u64 = ranges
            .iter()
            .map(|r| r.1)
            .sum::<u64>()
            .saturating_add(offset);
        let have = f.metadata().map(|m| m.len()).unwrap_or(0);
        if have < need {
            return Err(MemoryError::FileTooSmall {
                path: shown.to_string(),
                have,
                need,
            });
        }
        file_offset = offset;
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let map_err = |detail: String| MemoryError::Map { size: len, detail };
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        let mut builder = MmapRegionBuilder::new(len as usize).with_mmap_prot(prot);
        match file {
            Some((f, _, _)) => {
                let clone = f.try_clone().map_err(|e| map_err(e.to_string()))?;
                builder = builder.with_file_offset(FileOffset::new(clone, file_offset));
            }
            None => {
                flags |= libc::MAP_ANONYMOUS;
                if hugepages {
                    flags |= libc::MAP_HUGETLB;
                    // Reserve the pages now: a short pool fails here, not with a SIGBUS later.
                    flags &= !libc::MAP_NORESERVE;
                    builder = builder.with_hugetlbfs(true);
                }
            }
        }
        let region = builder.with_mmap_flags(flags).build().map_err(|e| {
            if flags & libc::MAP_HUGETLB != 0 {
                MemoryError::HugePages {
                    size: len,
                    detail: e.to_string(),
                }
            } else {
                map_err(e.to_string())
            }
        })?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| map_err("region wraps the address space".into()))?,
        );
        file_offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
        size: ranges.iter().map(|r| r.1).sum(),
        detail: e.to_string(),
    })
}

/// Tells KVM about every region of `mem` (slot numbers follow region order); with
/// `log_dirty`, KVM records which pages the guest writes (for diff snapshots).
pub fn register_guest_memory(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`; the machine keeps `mem`
        // alive for as long as the VM (and therefore this slot) exists.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Slot { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    #[test]
    fn file_backed_memory_is_private() {
        let path = std::env::temp_dir().join(format!("tartarus-mem-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        drop(f);
        let backing = MemoryBacking {
            file: Some(path.clone()),
            hugepages: false,
        };
        let mem = create_guest_memory(&[(0, 1 << 20)], &backing).unwrap();
        let v: u8 = mem.read_obj(GuestAddress(100)).unwrap();
        assert_eq!(v, 7);
        mem.write_obj(9u8, GuestAddress(100)).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap()[100],
            7,
            "the file is never written"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_short_file_is_rejected() {
        let path = std::env::temp_dir().join(format!("tartarus-short-{}", std::process::id()));
        std::fs::write(&path, b"tiny").unwrap();
        let backing = MemoryBacking {
            file: Some(path.clone()),
            hugepages: false,
        };
        assert!(matches!(
            create_guest_memory(&[(0, 1 << 20)], &backing),
            Err(MemoryError::FileTooSmall { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }
}
