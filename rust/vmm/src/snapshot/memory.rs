//! Guest memory in snapshots: writing it (all of it, or the dirty pages), finding the
//! dirty pages, and mapping it back copy-on-write on restore.
//!
//! Dirty pages come from two sources. KVM's dirty log (slots registered with
//! `track_dirty_pages`) records guest writes since the last time it was read. For a
//! machine restored from a snapshot, guest memory is a private mapping of the snapshot
//! file, so every page anyone wrote (the guest, or the VMM on its behalf) has become a
//! private copy; `/proc/self/pagemap` says which, exactly. The jail has no /proc, so a
//! jailed VMM opens the file before it enters ([`open_pagemap`]); the open file keeps
//! reading this process's page table after the chroot and the privilege drop.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use tartarus_vmm_api::snapshot::format::PAGE_SIZE;
use tartarus_vmm_api::snapshot::state::PageMap;

use super::writer::MemorySectionWriter;

/// Above this many runs a diff is copied into guest memory instead of mapped run by
/// run, to stay far below the kernel's limit on mappings per process.
const MAX_MAPPED_RUNS: usize = 8192;

/// Per-region, per-page flags.
pub type PageFlags = Vec<Vec<bool>>;

pub fn no_pages(mem: &GuestMemoryMmap) -> PageFlags {
    mem.iter()
        .map(|r| vec![false; (r.len() / PAGE_SIZE) as usize])
        .collect()
}

pub fn union(into: &mut PageFlags, other: &PageFlags) {
    for (a, b) in into.iter_mut().zip(other) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
}

/// Marks the pages of `map` (guest page numbers) in `flags`.
pub fn mark_runs(mem: &GuestMemoryMmap, flags: &mut PageFlags, map: &PageMap) {
    for (region, f) in mem.iter().zip(flags.iter_mut()) {
        let first = region.start_addr().0 / PAGE_SIZE;
        let count = region.len() / PAGE_SIZE;
        for &(start, n) in &map.runs {
            let lo = start.max(first);
            let hi = (start + n).min(first + count);
            for page in lo..hi {
                f[(page - first) as usize] = true;
            }
        }
    }
}

fn copy_page(mem: &GuestMemoryMmap, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|e| io::Error::other(format!("cannot read guest page {addr:#x}: {e}")))
}

/// Writes every page of guest RAM, in address order.
pub fn write_all_pages(mem: &GuestMemoryMmap, out: &mut MemorySectionWriter<'_>) -> io::Result<()> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for region in mem.iter() {
        let start = region.start_addr().0;
        for page in 0..region.len() / PAGE_SIZE {
            copy_page(mem, start + page * PAGE_SIZE, &mut buf)?;
            out.page(&buf)?;
        }
    }
    Ok(())
}

/// Writes the pages `map` names, in its order.
pub fn write_pages(
    mem: &GuestMemoryMmap,
    map: &PageMap,
    out: &mut MemorySectionWriter<'_>,
) -> io::Result<()> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for &(first, count) in &map.runs {
        for page in first..first + count {
            copy_page(mem, page * PAGE_SIZE, &mut buf)?;
            out.page(&buf)?;
        }
    }
    Ok(())
}

/// Reads (and thereby clears) KVM's dirty log of every slot.
pub fn kvm_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> io::Result<PageFlags> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let pages = (region.len() / PAGE_SIZE) as usize;
        let bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| io::Error::other(format!("KVM get dirty log of slot {slot}: {e}")))?;
        out.push(
            (0..pages)
                .map(|i| bitmap.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1))
                .collect(),
        );
    }
    Ok(out)
}

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;

/// This process's `/proc/self/pagemap`, opened on first use. The file describes the
/// address space of the process that opened it, so a forked child must open its own:
/// the jail calls this in the VMM process, before its root loses /proc.
static PAGEMAP: OnceLock<File> = OnceLock::new();

pub fn open_pagemap() -> io::Result<&'static File> {
    if let Some(file) = PAGEMAP.get() {
        return Ok(file);
    }
    let file = File::open("/proc/self/pagemap").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open /proc/self/pagemap (a jailed VMM opens it before entering): {e}"),
        )
    })?;
    Ok(PAGEMAP.get_or_init(|| file))
}

/// Pages of a private file mapping that were written since it was mapped: they are
/// private (anonymous) copies now, present or swapped out.
pub fn copied_pages(mem: &GuestMemoryMmap) -> io::Result<PageFlags> {
    let pagemap = open_pagemap()?;
    let mut out = Vec::new();
    let mut entries = vec![0u8; 8 * 4096];
    for region in mem.iter() {
        let pages = (region.len() / PAGE_SIZE) as usize;
        let first_vpn = region.as_ptr() as u64 / PAGE_SIZE;
        let mut flags = Vec::with_capacity(pages);
        let mut done = 0usize;
        while done < pages {
            let n = (pages - done).min(entries.len() / 8);
            pagemap.read_exact_at(&mut entries[..n * 8], (first_vpn + done as u64) * 8)?;
            for e in entries[..n * 8].chunks_exact(8) {
                let v = u64::from_le_bytes(e.try_into().unwrap_or_default());
                let private = v & PAGEMAP_FILE_OR_SHARED == 0;
                flags.push(private && v & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0);
            }
            done += n;
        }
        out.push(flags);
    }
    Ok(out)
}

/// Lays a diff's pages over guest memory that maps its parent: each run is mapped
/// privately from the diff file (shared between clones like the parent's pages), or
/// copied in when the diff is too fragmented to map run by run.
pub fn apply_diff(
    mem: &GuestMemoryMmap,
    diff: &File,
    memory_offset: u64,
    map: &PageMap,
) -> io::Result<()> {
    let mut at = memory_offset;
    let copy = map.runs.len() > MAX_MAPPED_RUNS;
    let mut buf = Vec::new();
    for &(first, count) in &map.runs {
        let len = count * PAGE_SIZE;
        let addr = GuestAddress(first * PAGE_SIZE);
        if copy {
            buf.resize(len as usize, 0);
            diff.read_exact_at(&mut buf, at)?;
            mem.write_slice(&buf, addr)
                .map_err(|e| io::Error::other(format!("cannot write guest page {addr:?}: {e}")))?;
        } else {
            let host = mem
                .get_host_address(addr)
                .map_err(|e| io::Error::other(format!("guest page {addr:?}: {e}")))?;
            // SAFETY: `host..host+len` lies inside one mapping owned by `mem` (PageMap
            // runs were checked against guest RAM, and each RAM range is one region);
            // MAP_FIXED replaces those pages of that mapping with a private mapping of
            // the diff file, which `mem` unmaps with the rest when it is dropped. No
            // vCPU runs yet, so nothing reads the range while it is replaced.
            let mapped = unsafe {
                libc::mmap(
                    host.cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    std::os::fd::AsRawFd::as_raw_fd(diff),
                    at as libc::off_t,
                )
            };
            if mapped != host.cast() {
                return Err(io::Error::last_os_error());
            }
        }
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::map_guest_memory_from;
    use crate::snapshot::writer::SnapshotWriter;
    use tartarus_vmm_api::snapshot::format::{SectionKind, SnapshotFile};

    fn dir(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("tartarus-snapmem-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn written_pages_of_a_private_file_mapping_are_found_and_a_diff_lays_over_it() {
        let d = dir("cow");
        let ram = [(0u64, 1u64 << 20)];
        // A "full snapshot": 256 pages, page i filled with byte i.
        let base = d.join("base");
        let mut w = SnapshotWriter::create(&base).unwrap();
        w.write_section(SectionKind::State, b"-").unwrap();
        let mut m = w.memory();
        for i in 0..256u32 {
            m.page(&[i as u8; 4096]).unwrap();
        }
        m.finish();
        w.finish(
            tartarus_vmm_api::snapshot::format::SnapshotKind::Full,
            [1; 16],
            None,
        )
        .unwrap();
        let snap = SnapshotFile::open(&base).unwrap();
        let off = snap.header.section(SectionKind::Memory).unwrap().offset;

        let mem = map_guest_memory_from(&ram, snap.file(), off, "base").unwrap();
        let v: u8 = mem.read_obj(GuestAddress(5 * 4096)).unwrap();
        assert_eq!(v, 5);
        assert!(
            copied_pages(&mem).unwrap()[0].iter().all(|&c| !c),
            "reads copy nothing"
        );
        mem.write_obj(0xeeu8, GuestAddress(7 * 4096 + 3)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(8 * 4096)).unwrap();
        let copied = copied_pages(&mem).unwrap();
        let pages: Vec<usize> = (0..256).filter(|&i| copied[0][i]).collect();
        assert_eq!(pages, vec![7, 8]);

        // A "diff" carrying pages 7 and 8 as they are now, applied over a fresh map.
        let map = PageMap::from_dirty(&ram, &copied);
        let diff = d.join("diff");
        let mut w = SnapshotWriter::create(&diff).unwrap();
        w.write_section(SectionKind::State, b"-").unwrap();
        let mut m = w.memory();
        write_pages(&mem, &map, &mut m).unwrap();
        m.finish();
        w.finish(
            tartarus_vmm_api::snapshot::format::SnapshotKind::Full,
            [2; 16],
            None,
        )
        .unwrap();
        let diff_snap = SnapshotFile::open(&diff).unwrap();
        let doff = diff_snap
            .header
            .section(SectionKind::Memory)
            .unwrap()
            .offset;
        let clone = map_guest_memory_from(&ram, snap.file(), off, "base").unwrap();
        apply_diff(&clone, diff_snap.file(), doff, &map).unwrap();
        let a: u8 = clone.read_obj(GuestAddress(7 * 4096 + 3)).unwrap();
        let b: u8 = clone.read_obj(GuestAddress(7 * 4096)).unwrap();
        let c: u8 = clone.read_obj(GuestAddress(9 * 4096)).unwrap();
        assert_eq!((a, b, c), (0xee, 7, 9));
        // Mapped pages are the diff file's, not private copies: shared between clones.
        assert!(copied_pages(&clone).unwrap()[0].iter().all(|&c| !c));
        std::fs::remove_dir_all(d).unwrap();
    }
}
