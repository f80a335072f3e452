//! The snapshot file format: a one-page header, then checksummed sections.
//!
//! ```text
//! offset 0     header (little endian), padded to one page:
//!                magic "TARTSNAP", format version, header length, snapshot kind,
//!                section count, snapshot id, parent id (diff snapshots), creation time,
//!                page size, total file length, the section table
//!                (kind, offset, length, sha256 of the section's bytes for each),
//!                and the sha256 of all the header bytes before it
//! 4096         state section (MessagePack, see `state.rs`)
//!              page map section (diff snapshots: runs of guest pages, 16 bytes each)
//! page-aligned memory section (raw guest pages; zero pages are holes in the file)
//! ```
//!
//! Reading never trusts the file: the magic and version are checked first (another
//! version is refused by name), then the header checksum, then every section's bounds
//! against the real file length (a truncated file is refused before anything is
//! mapped), and each section's sha256 before it is used. Nothing here panics on any
//! input; every refusal says which part is wrong.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 8] = *b"TARTSNAP";
/// The only version this VMM reads and writes; bump it for any layout change.
pub const FORMAT_VERSION: u32 = 1;
pub const PAGE_SIZE: u64 = 4096;
/// The header and its padding take the first page.
pub const HEADER_AREA: u64 = PAGE_SIZE;
/// Most sections a header may list.
pub const MAX_SECTIONS: usize = 8;
/// Largest section read into memory whole (state, page map); memory is streamed.
pub const MAX_INLINE_SECTION: u64 = 64 << 20;

const FIXED_LEN: usize = 80;
const ENTRY_LEN: usize = 56;
const DIGEST_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path} is not a Tartarus snapshot: {detail}")]
    NotASnapshot { path: String, detail: String },
    #[error(
        "{path} has snapshot format version {found}; this tartarus-vmm reads version \
         {supported}. Take the snapshot again with this version (or its header is corrupted)"
    )]
    Version {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("{path} is truncated: {detail}. The copy is incomplete; fetch or take it again")]
    Truncated { path: String, detail: String },
    #[error("{path} is corrupted: {detail}. Do not use it; take the snapshot again")]
    Corrupted { path: String, detail: String },
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SectionKind {
    State,
    Memory,
    PageMap,
}

impl SectionKind {
    fn code(self) -> u32 {
        match self {
            SectionKind::State => 1,
            SectionKind::Memory => 2,
            SectionKind::PageMap => 3,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(SectionKind::State),
            2 => Some(SectionKind::Memory),
            3 => Some(SectionKind::PageMap),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionKind::State => "state",
            SectionKind::Memory => "memory",
            SectionKind::PageMap => "page map",
        }
    }
}

/// A full snapshot carries all of guest memory; a diff carries only the pages that
/// changed since its parent (always a full snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    #[default]
    Full,
    Diff,
}

impl SnapshotKind {
    fn code(self) -> u32 {
        match self {
            SnapshotKind::Full => 1,
            SnapshotKind::Diff => 2,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(SnapshotKind::Full),
            2 => Some(SnapshotKind::Diff),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionEntry {
    pub kind: SectionKind,
    pub offset: u64,
    pub length: u64,
    pub sha256: [u8; 32],
}

impl SectionEntry {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: SnapshotKind,
    pub id: [u8; 16],
    /// The full snapshot a diff applies to.
    pub parent: Option<[u8; 16]>,
    pub created_unix_ms: u64,
    pub total_len: u64,
    pub sections: Vec<SectionEntry>,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Header {
    pub fn section(&self, kind: SectionKind) -> Option<&SectionEntry> {
        self.sections.iter().find(|s| s.kind == kind)
    }

    fn encoded_len(&self) -> usize {
        FIXED_LEN + self.sections.len() * ENTRY_LEN + DIGEST_LEN
    }

    /// The header's bytes (without padding).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        let header_len = self.encoded_len() as u32;
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&header_len.to_le_bytes());
        out.extend_from_slice(&self.kind.code().to_le_bytes());
        out.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.parent.unwrap_or([0; 16]));
        out.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.total_len.to_le_bytes());
        debug_assert_eq!(out.len(), FIXED_LEN);
        for s in &self.sections {
            out.extend_from_slice(&s.kind.code().to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&s.offset.to_le_bytes());
            out.extend_from_slice(&s.length.to_le_bytes());
            out.extend_from_slice(&s.sha256);
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Parses and checks a header against the length of the file it came from.
    pub fn decode(bytes: &[u8], file_len: u64, path: &str) -> Result<Header, FormatError> {
        let not_snapshot = |detail: String| FormatError::NotASnapshot {
            path: path.into(),
            detail,
        };
        let corrupted = |detail: String| FormatError::Corrupted {
            path: path.into(),
            detail,
        };
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(not_snapshot(if file_len < MAGIC.len() as u64 {
                format!("the file is only {file_len} bytes")
            } else {
                "it does not start with the snapshot magic".into()
            }));
        }
        let mut r = Reader::new(&bytes[MAGIC.len()..]);
        let Some(version) = r.u32() else {
            return Err(truncated(path, "the header is cut short"));
        };
        if version != FORMAT_VERSION {
            return Err(FormatError::Version {
                path: path.into(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if (bytes.len() as u64) < HEADER_AREA {
            return Err(truncated(
                path,
                &format!("the header page needs {HEADER_AREA} bytes, the file has {file_len}"),
            ));
        }
        let header_len = r.u32().unwrap_or(0) as usize;
        let max_len = FIXED_LEN + MAX_SECTIONS * ENTRY_LEN + DIGEST_LEN;
        if !(FIXED_LEN + DIGEST_LEN..=max_len).contains(&header_len) {
            return Err(corrupted(format!(
                "header length {header_len} is impossible"
            )));
        }
        let (body, digest) = bytes[..header_len].split_at(header_len - DIGEST_LEN);
        if Sha256::digest(body).as_slice() != digest {
            return Err(corrupted("the header checksum does not match".into()));
        }
        // The checksum matched: the fields below are as written (still range-checked).
        let kind_code = r.u32().unwrap_or(0);
        let count = r.u32().unwrap_or(0) as usize;
        let id = r.array::<16>().unwrap_or_default();
        let parent = r.array::<16>().unwrap_or_default();
        let created_unix_ms = r.u64().unwrap_or(0);
        let page_size = r.u32().unwrap_or(0);
        let _flags = r.u32();
        let total_len = r.u64().unwrap_or(0);
        let kind = SnapshotKind::from_code(kind_code)
            .ok_or_else(|| corrupted(format!("unknown snapshot kind {kind_code}")))?;
        if u64::from(page_size) != PAGE_SIZE {
            return Err(corrupted(format!(
                "page size {page_size} is not {PAGE_SIZE}"
            )));
        }
        if header_len != FIXED_LEN + count * ENTRY_LEN + DIGEST_LEN {
            return Err(corrupted(format!(
                "header length {header_len} does not fit {count} sections"
            )));
        }
        let mut sections: Vec<SectionEntry> = Vec::with_capacity(count);
        for _ in 0..count {
            let code = r.u32().unwrap_or(0);
            let _flags = r.u32();
            let offset = r.u64().unwrap_or(0);
            let length = r.u64().unwrap_or(0);
            let sha256 = r.array::<32>().unwrap_or_default();
            let kind = SectionKind::from_code(code)
                .ok_or_else(|| corrupted(format!("unknown section kind {code}")))?;
            if sections.iter().any(|s| s.kind == kind) {
                return Err(corrupted(format!("two {} sections", kind.name())));
            }
            sections.push(SectionEntry {
                kind,
                offset,
                length,
                sha256,
            });
        }
        let header = Header {
            kind,
            id,
            parent: (kind == SnapshotKind::Diff).then_some(parent),
            created_unix_ms,
            total_len,
            sections,
        };
        header.check_layout(file_len, path)?;
        Ok(header)
    }

    /// Sections must lie after the header, inside the file, without overlapping; the
    /// memory section must be page aligned; the kind decides which sections exist.
    fn check_layout(&self, file_len: u64, path: &str) -> Result<(), FormatError> {
        let corrupted = |detail: String| FormatError::Corrupted {
            path: path.into(),
            detail,
        };
        if file_len < self.total_len {
            return Err(truncated(
                path,
                &format!(
                    "the header says {} bytes, the file has {file_len}",
                    self.total_len
                ),
            ));
        }
        if file_len > self.total_len {
            return Err(corrupted(format!(
                "the file has {file_len} bytes, {} more than its header says",
                file_len - self.total_len
            )));
        }
        let mut spans: Vec<(u64, u64, SectionKind)> = Vec::new();
        for s in &self.sections {
            let end = s
                .offset
                .checked_add(s.length)
                .ok_or_else(|| corrupted(format!("the {} section overflows", s.kind.name())))?;
            if s.offset < HEADER_AREA || end > self.total_len {
                return Err(corrupted(format!(
                    "the {} section ({}..{end}) lies outside the file's {} bytes",
                    s.kind.name(),
                    s.offset,
                    self.total_len
                )));
            }
            if s.kind == SectionKind::Memory && s.offset % PAGE_SIZE != 0 {
                return Err(corrupted("the memory section is not page aligned".into()));
            }
            if s.kind != SectionKind::Memory && s.length > MAX_INLINE_SECTION {
                return Err(corrupted(format!(
                    "the {} section is {} bytes, more than {MAX_INLINE_SECTION}",
                    s.kind.name(),
                    s.length
                )));
            }
            spans.push((s.offset, end, s.kind));
        }
        spans.sort();
        for pair in spans.windows(2) {
            if pair[0].1 > pair[1].0 {
                return Err(corrupted(format!(
                    "the {} and {} sections overlap",
                    pair[0].2.name(),
                    pair[1].2.name()
                )));
            }
        }
        let has = |k| self.section(k).is_some();
        let required: &[SectionKind] = match self.kind {
            SnapshotKind::Full => &[SectionKind::State, SectionKind::Memory],
            SnapshotKind::Diff => &[
                SectionKind::State,
                SectionKind::Memory,
                SectionKind::PageMap,
            ],
        };
        for &k in required {
            if !has(k) {
                return Err(corrupted(format!("the {} section is missing", k.name())));
            }
        }
        if self.kind == SnapshotKind::Full && has(SectionKind::PageMap) {
            return Err(corrupted("a full snapshot with a page map".into()));
        }
        Ok(())
    }
}

fn truncated(path: &str, detail: &str) -> FormatError {
    FormatError::Truncated {
        path: path.into(),
        detail: detail.into(),
    }
}

/// Little-endian field reader that never reads past its slice.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_first_chunk::<N>()?;
        self.bytes = rest;
        Some(*head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array::<8>().map(u64::from_le_bytes)
    }
}

/// Random-access reads: a file, or bytes in memory (tests).
pub trait ReadAt {
    fn size(&self) -> io::Result<u64>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

/// A snapshot whose header was read and checked; sections are read on demand.
pub struct SnapshotFile<R: ReadAt> {
    pub header: Header,
    pub path: String,
    source: R,
}

impl SnapshotFile<File> {
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|source| FormatError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(file, shown)
    }

    pub fn file(&self) -> &File {
        &self.source
    }
}

impl<R: ReadAt> SnapshotFile<R> {
    pub fn parse(source: R, path: String) -> Result<Self, FormatError> {
        let io_err = |source| FormatError::Io {
            path: path.clone(),
            source,
        };
        let len = source.size().map_err(io_err)?;
        let mut page = vec![0u8; HEADER_AREA.min(len) as usize];
        source.read_exact_at(&mut page, 0).map_err(io_err)?;
        let header = Header::decode(&page, len, &path)?;
        let file = SnapshotFile {
            header,
            path,
            source,
        };
        file.check_gaps(&page)?;
        Ok(file)
    }

    /// Bytes outside the header and the sections (header padding, alignment before the
    /// memory section) must be zero, so that no byte of the file escapes checking.
    fn check_gaps(&self, page: &[u8]) -> Result<(), FormatError> {
        let corrupted = |detail: String| FormatError::Corrupted {
            path: self.path.clone(),
            detail,
        };
        let header_len = self.header.encoded_len();
        if page[header_len..].iter().any(|&b| b != 0) {
            return Err(corrupted("the header padding is not zero".into()));
        }
        let mut spans: Vec<(u64, u64)> = self
            .header
            .sections
            .iter()
            .map(|s| (s.offset, s.end()))
            .collect();
        spans.sort_unstable();
        let mut at = HEADER_AREA;
        for (start, end) in spans.into_iter().chain([(self.header.total_len, 0)]) {
            if start > at {
                if start - at >= PAGE_SIZE {
                    return Err(corrupted(format!(
                        "a gap of {} bytes between sections",
                        start - at
                    )));
                }
                let mut gap = vec![0u8; (start - at) as usize];
                self.source
                    .read_exact_at(&mut gap, at)
                    .map_err(|source| FormatError::Io {
                        path: self.path.clone(),
                        source,
                    })?;
                if gap.iter().any(|&b| b != 0) {
                    return Err(corrupted("the padding between sections is not zero".into()));
                }
            }
            at = at.max(end);
        }
        Ok(())
    }

    fn entry(&self, kind: SectionKind) -> Result<&SectionEntry, FormatError> {
        self.header
            .section(kind)
            .ok_or_else(|| FormatError::Corrupted {
                path: self.path.clone(),
                detail: format!("the {} section is missing", kind.name()),
            })
    }

    /// Reads a small section whole and checks its sha256.
    pub fn read_section(&self, kind: SectionKind) -> Result<Vec<u8>, FormatError> {
        let entry = self.entry(kind)?;
        let mut buf = vec![0u8; entry.length as usize];
        self.source
            .read_exact_at(&mut buf, entry.offset)
            .map_err(|source| FormatError::Io {
                path: self.path.clone(),
                source,
            })?;
        if Sha256::digest(&buf).as_slice() != entry.sha256 {
            return Err(self.checksum_error(kind));
        }
        Ok(buf)
    }

    /// Streams a section through sha256 (for the memory section, which is not read
    /// into memory).
    pub fn verify_section(&self, kind: SectionKind) -> Result<(), FormatError> {
        let entry = self.entry(kind)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < entry.length {
            let n = (entry.length - done).min(buf.len() as u64) as usize;
            self.source
                .read_exact_at(&mut buf[..n], entry.offset + done)
                .map_err(|source| FormatError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        if hasher.finalize().as_slice() != entry.sha256 {
            return Err(self.checksum_error(kind));
        }
        Ok(())
    }

    fn checksum_error(&self, kind: SectionKind) -> FormatError {
        FormatError::Corrupted {
            path: self.path.clone(),
            detail: format!("the {} section's sha256 does not match", kind.name()),
        }
    }
}
