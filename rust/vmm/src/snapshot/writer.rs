//! Writing the snapshot file format (`tartarus_vmm_api::snapshot::format` reads it and
//! describes the layout): sections are written under a temporary name, then the header,
//! then the file is renamed into place.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use tartarus_vmm_api::snapshot::format::{
    Header, SectionEntry, SectionKind, SnapshotKind, HEADER_AREA, PAGE_SIZE,
};

/// Writes a snapshot under a temporary name and renames it into place when complete,
/// so a crash never leaves a half-written snapshot at the final path.
pub struct SnapshotWriter {
    file: File,
    tmp_path: std::path::PathBuf,
    final_path: std::path::PathBuf,
    sections: Vec<SectionEntry>,
    next_offset: u64,
    done: bool,
}

impl SnapshotWriter {
    pub fn create(path: &Path) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".partial-{}", std::process::id()));
        let tmp_path = path.with_file_name(tmp_name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)?;
        Ok(SnapshotWriter {
            file,
            tmp_path,
            final_path: path.to_path_buf(),
            sections: Vec::new(),
            next_offset: HEADER_AREA,
            done: false,
        })
    }

    /// Appends a small section.
    pub fn write_section(&mut self, kind: SectionKind, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, self.next_offset)?;
        self.sections.push(SectionEntry {
            kind,
            offset: self.next_offset,
            length: bytes.len() as u64,
            sha256: Sha256::digest(bytes).into(),
        });
        self.next_offset += bytes.len() as u64;
        Ok(())
    }

    /// Starts the page-aligned memory section; pages are added in order.
    pub fn memory(&mut self) -> MemorySectionWriter<'_> {
        let offset = self.next_offset.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        MemorySectionWriter {
            writer: self,
            offset,
            length: 0,
            hasher: Sha256::new(),
        }
    }

    /// Writes the header, syncs and renames the file into place; returns the header.
    pub fn finish(
        mut self,
        kind: SnapshotKind,
        id: [u8; 16],
        parent: Option<[u8; 16]>,
    ) -> io::Result<Header> {
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let header = Header {
            kind,
            id,
            parent,
            created_unix_ms,
            total_len: self.next_offset,
            sections: std::mem::take(&mut self.sections),
        };
        // Trailing zero pages are holes: the length makes them part of the file.
        self.file.set_len(self.next_offset)?;
        self.file.write_all_at(&header.encode(), 0)?;
        self.file.sync_data()?;
        std::fs::rename(&self.tmp_path, &self.final_path)?;
        self.done = true;
        Ok(header)
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

pub struct MemorySectionWriter<'a> {
    writer: &'a mut SnapshotWriter,
    offset: u64,
    length: u64,
    hasher: Sha256,
}

impl MemorySectionWriter<'_> {
    /// Adds one page; an all-zero page is left as a hole in the file.
    pub fn page(&mut self, page: &[u8]) -> io::Result<()> {
        debug_assert_eq!(page.len() as u64, PAGE_SIZE);
        self.hasher.update(page);
        if page.iter().any(|&b| b != 0) {
            self.writer
                .file
                .write_all_at(page, self.offset + self.length)?;
        }
        self.length += PAGE_SIZE;
        Ok(())
    }

    pub fn finish(self) {
        self.writer.sections.push(SectionEntry {
            kind: SectionKind::Memory,
            offset: self.offset,
            length: self.length,
            sha256: self.hasher.finalize().into(),
        });
        self.writer.next_offset = self.offset + self.length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tartarus_vmm_api::snapshot::format::{FormatError, SnapshotFile, FORMAT_VERSION, MAGIC};

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tartarus-snapfmt-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("x.snap")
    }

    /// A small valid snapshot: a state section, a page map and three memory pages
    /// (written once per kind, then copied).
    fn sample(kind: SnapshotKind) -> Vec<u8> {
        static FULL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        static DIFF: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let cell = if kind == SnapshotKind::Full {
            &FULL
        } else {
            &DIFF
        };
        cell.get_or_init(|| write_sample(kind)).clone()
    }

    fn write_sample(kind: SnapshotKind) -> Vec<u8> {
        let path = tmp(&format!("{kind:?}"));
        let mut w = SnapshotWriter::create(&path).unwrap();
        w.write_section(SectionKind::State, b"state bytes").unwrap();
        if kind == SnapshotKind::Diff {
            w.write_section(SectionKind::PageMap, &[1u8; 16]).unwrap();
        }
        let mut m = w.memory();
        m.page(&[0u8; 4096]).unwrap();
        m.page(&[0xabu8; 4096]).unwrap();
        m.page(&[0u8; 4096]).unwrap();
        m.finish();
        let parent = (kind == SnapshotKind::Diff).then_some([9u8; 16]);
        w.finish(kind, [7u8; 16], parent).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        bytes
    }

    /// Everything a reader checks: header, every section's checksum.
    fn check_all(bytes: Vec<u8>) -> Result<(), FormatError> {
        let f = SnapshotFile::parse(bytes, "x.snap".into())?;
        let kinds: Vec<_> = f.header.sections.iter().map(|s| s.kind).collect();
        for k in kinds {
            f.verify_section(k)?;
        }
        Ok(())
    }

    #[test]
    fn a_written_snapshot_reads_back() {
        for kind in [SnapshotKind::Full, SnapshotKind::Diff] {
            let bytes = sample(kind);
            let f = SnapshotFile::parse(bytes.clone(), "x".into()).unwrap();
            assert_eq!(f.header.kind, kind);
            assert_eq!(f.header.id, [7u8; 16]);
            assert_eq!(f.read_section(SectionKind::State).unwrap(), b"state bytes");
            let mem = f.header.section(SectionKind::Memory).unwrap();
            assert_eq!(mem.offset % PAGE_SIZE, 0);
            assert_eq!(mem.length, 3 * PAGE_SIZE);
            assert_eq!(bytes[mem.offset as usize + PAGE_SIZE as usize], 0xab);
            assert_eq!(f.header.total_len, bytes.len() as u64);
            check_all(bytes).unwrap();
        }
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let good = sample(SnapshotKind::Full);
        let msg = |r: Result<(), FormatError>| r.unwrap_err().to_string();

        assert!(msg(check_all(b"hello".to_vec())).contains("not a Tartarus snapshot"));
        let mut other = good.clone();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(msg(check_all(other)).contains("format version 2"));
        let cut = good[..good.len() - 100].to_vec();
        assert!(msg(check_all(cut)).contains("truncated"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(msg(check_all(longer)).contains("more than its header says"));
        let mut flipped = good.clone();
        let last = flipped.len() - PAGE_SIZE as usize * 2;
        flipped[last] ^= 1;
        assert!(msg(check_all(flipped)).contains("memory section's sha256"));
        let mut header_flip = good;
        header_flip[40] ^= 0x10;
        assert!(msg(check_all(header_flip)).contains("header checksum"));
    }

    #[test]
    fn a_failed_write_leaves_nothing_at_the_final_path() {
        let path = tmp("abandon");
        {
            let mut w = SnapshotWriter::create(&path).unwrap();
            w.write_section(SectionKind::State, b"x").unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_truncation_is_refused(diff in any::<bool>(), cut in 0usize..20_000) {
            let bytes = sample(if diff { SnapshotKind::Diff } else { SnapshotKind::Full });
            let cut = cut % bytes.len();
            prop_assert!(check_all(bytes[..cut].to_vec()).is_err());
        }

        #[test]
        fn any_bit_flip_is_refused(diff in any::<bool>(), at in 0usize..20_000, bit in 0u8..8) {
            let mut bytes = sample(if diff { SnapshotKind::Diff } else { SnapshotKind::Full });
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            prop_assert!(check_all(bytes).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let _ = check_all(bytes);
        }

        #[test]
        fn garbage_after_a_good_magic_never_panics(
            version in prop_oneof![Just(FORMAT_VERSION), any::<u32>()],
            rest in proptest::collection::vec(any::<u8>(), 0..6000),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&version.to_le_bytes());
            bytes.extend_from_slice(&rest);
            prop_assert!(check_all(bytes).is_err());
        }
    }
}
