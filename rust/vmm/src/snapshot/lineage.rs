//! What a machine's memory descends from: the parent a diff snapshot is taken against,
//! and how to find the pages that changed since that parent.

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::memory::{copied_pages, kvm_dirty_pages, mark_runs, no_pages, union, PageFlags};
use tartarus_vmm_api::snapshot::format::hex;
use tartarus_vmm_api::snapshot::state::PageMap;

#[derive(Default)]
pub struct Lineage {
    /// The full snapshot guest memory is mapped from, and the pages of the diff that
    /// was laid over it (empty when restored from a full snapshot).
    pub restored_from: Option<([u8; 16], PageMap)>,
    /// The last full snapshot this machine took while KVM logged dirty pages, and the
    /// pages written since (KVM's log is read, and cleared, at every snapshot).
    pub last_full: Option<([u8; 16], PageFlags)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    #[error(
        "a diff snapshot needs a parent: restore this machine from a full snapshot, or \
         configure it with track_dirty_pages and take a full snapshot first"
    )]
    NoParent,
    #[error("cannot find the pages written since snapshot {parent}: {source}")]
    Dirty {
        parent: String,
        source: std::io::Error,
    },
}

impl Lineage {
    /// Reads (and clears) KVM's dirty log into the running total, if KVM keeps one.
    pub fn collect_kvm_log(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        tracking: bool,
    ) -> std::io::Result<PageFlags> {
        if !tracking {
            return Ok(no_pages(mem));
        }
        let log = kvm_dirty_pages(vm, mem)?;
        if let Some((_, total)) = &mut self.last_full {
            union(total, &log);
        }
        Ok(log)
    }

    /// The parent of a diff taken now, and the pages that differ from it: the last
    /// full snapshot this machine took (with KVM's log since), else the one it was
    /// restored from. Memory mapped from a snapshot also counts every page that became
    /// a private copy, which covers writes KVM does not log (the VMM's own).
    pub fn diff_pages(&self, mem: &GuestMemoryMmap) -> Result<([u8; 16], PageMap), LineageError> {
        let parent = match (&self.last_full, &self.restored_from) {
            (Some((id, _)), _) | (None, Some((id, _))) => *id,
            (None, None) => return Err(LineageError::NoParent),
        };
        let mut flags = no_pages(mem);
        if let Some((_, logged)) = &self.last_full {
            union(&mut flags, logged);
        }
        if let Some((_, overlay)) = &self.restored_from {
            let copied = copied_pages(mem).map_err(|source| LineageError::Dirty {
                parent: hex(&parent),
                source,
            })?;
            union(&mut flags, &copied);
            mark_runs(mem, &mut flags, overlay);
        }
        let ram: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        Ok((parent, PageMap::from_dirty(&ram, &flags)))
    }

    /// After a full snapshot with dirty tracking on, diffs are taken against it.
    pub fn full_taken(&mut self, id: [u8; 16], mem: &GuestMemoryMmap, tracking: bool) {
        if tracking {
            self.last_full = Some((id, no_pages(mem)));
        }
    }
}
