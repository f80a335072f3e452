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
                } else {
                    let addr = map_aligned_anonymous(len as usize, prot, flags)
                        .map_err(|e| map_err(e.to_string()))?;
                    // SAFETY: `addr` starts a live mapping of `len` bytes made just above,
                    // never unmapped (see `map_aligned_anonymous`).
                    builder = unsafe { builder.with_raw_mmap_pointer(addr) };
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

/// The alignment that lets KVM back guest memory with huge pages.
const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes of anonymous memory at a 2 MiB-aligned address. KVM maps a guest's
/// 2 MiB page with one huge page only when the guest and host addresses agree modulo
/// 2 MiB and the host backs it with a transparent huge page; Linux aligns anonymous
/// mappings to a page only (before 6.7). Unaligned, every guest page costs its own
/// nested page fault and TLB entry: under nested KVM the guest kernel's memory init took
/// 7.2 s on unaligned memory and 2.3 s on aligned memory.
///
/// The mapping is never unmapped: a VMM process runs one guest, whose memory device
/// threads may touch until the process ends.
fn map_aligned_anonymous(len: usize, prot: i32, flags: i32) -> std::io::Result<*mut u8> {
    let total = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks; it touches
    // no existing mapping.
    let reserve = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserve == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = reserve as usize;
    let aligned = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    // SAFETY: [aligned, aligned + len) lies inside the reservation made above, which
    // this function owns, so MAP_FIXED replaces nothing else.
    let addr = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: the reservation is ours and nothing uses it.
        unsafe { libc::munmap(reserve, total) };
        return Err(e);
    }
    let (head, tail) = (aligned - start, start + total - (aligned + len));
    // SAFETY: the head and tail are the unused ends of our own reservation.
    unsafe {
        if head > 0 {
            libc::munmap(reserve, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    Ok(addr.cast())
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
    fn anonymous_memory_is_aligned_for_huge_pages() {
        let backing = MemoryBacking::default();
        for _ in 0..4 {
            let mem = create_guest_memory(&[(0, 3 << 20)], &backing).unwrap();
            let region = mem.iter().next().unwrap();
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
            mem.write_slice(&[7; 16], GuestAddress((3 << 20) - 16))
                .unwrap();
        }
    }

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
