//! Reading Nyx snapshot files without a VMM: the file format (`format`), what a reader
//! checks in the state section and the page map (`state`), and `inspect`, which
//! describes a snapshot for people and tools. Taking and restoring snapshots needs KVM
//! and guest memory and lives in `tartarus_vmm::snapshot`, which writes this format.

pub mod format;
pub mod state;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{DriveConfig, VsockConfig};
use format::{hex, FormatError, SectionKind, SnapshotFile, SnapshotKind};
use state::{PageMap, StateError, StateView};

/// Why a snapshot cannot be described: the file itself is at fault.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file is not a usable snapshot (corrupted, truncated, another version).
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{path}: {source}")]
    State { path: String, source: StateError },
}

/// A snapshot's header and state, for people and tools (`inspect`).
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    pub path: String,
    pub format_version: u32,
    pub id: String,
    pub kind: SnapshotKind,
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    pub file_bytes: u64,
    pub vmm_version: String,
    pub cpu_vendor: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub drives: Vec<DriveConfig>,
    pub vsock: Option<VsockConfig>,
    pub generation: u64,
    pub pages: u64,
    pub memory_verified: bool,
}

/// Reads and checks a snapshot (its memory too when `verify_memory`) and describes it.
pub fn inspect(path: &Path, verify_memory: bool) -> Result<SnapshotSummary, InspectError> {
    let file = SnapshotFile::open(path)?;
    let state_error = |source| InspectError::State {
        path: file.path.clone(),
        source,
    };
    let state = StateView::decode(&file.read_section(SectionKind::State)?).map_err(state_error)?;
    if file.header.section(SectionKind::PageMap).is_some() {
        let bytes = file.read_section(SectionKind::PageMap)?;
        PageMap::decode(&bytes, &state.ram).map_err(state_error)?;
    }
    if verify_memory {
        file.verify_section(SectionKind::Memory)?;
    }
    Ok(SnapshotSummary {
        path: file.path.clone(),
        format_version: format::FORMAT_VERSION,
        id: hex(&file.header.id),
        kind: file.header.kind,
        parent: file.header.parent.as_ref().map(|p| hex(p)),
        created_unix_ms: file.header.created_unix_ms,
        file_bytes: file.header.total_len,
        vmm_version: state.vmm_version,
        cpu_vendor: state.cpu_vendor,
        vcpus: state.machine.vcpus,
        memory_mib: state.machine.memory_mib,
        kernel: state.machine.kernel,
        cmdline: state.machine.cmdline,
        drives: state.machine.drives,
        vsock: state.machine.vsock,
        generation: state.devices.generation.generation,
        pages: file
            .header
            .section(SectionKind::Memory)
            .map_or(0, |s| s.length / format::PAGE_SIZE),
        memory_verified: verify_memory,
    })
}
