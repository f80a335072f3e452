//! What a microVM is asked to be: the `configure` request of the API and the
//! `--config` file of the binary (same JSON shape), with every part of it (boot, CPU,
//! serial console, disks, vsock). The VMM builds its devices from these types.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::layout::{MAX_MEMORY_BYTES, MAX_VCPUS, MIN_MEMORY_BYTES};

/// How guest RAM is backed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBacking {
    /// Map this file privately (copy-on-write) as guest RAM, e.g. a snapshot's memory
    /// file; the file is never written. Anonymous memory when absent.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Back anonymous guest RAM with 2 MiB huge pages (needs reserved hugetlb pages).
    #[serde(default)]
    pub hugepages: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "one")]
    pub vcpus: u8,
    pub memory_mib: u64,
    /// vmlinux ELF or bzImage, as seen by the VMM (inside its jail when jailed).
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default = "default_serial_limit")]
    pub serial_limit_bytes: u64,
    #[serde(default)]
    pub memory: MemoryBacking,
    /// Stop the guest after this many milliseconds of running (paused time included).
    #[serde(default)]
    pub wall_clock_limit_ms: Option<u64>,
    /// virtio-blk disks in guest order: the first is `/dev/vda`.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// virtio-vsock with a hybrid unix-socket host side.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Have KVM log the pages the guest writes, so that diff snapshots can be taken
    /// after a full one (machines restored from a snapshot can take diffs without it).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

fn one() -> u8 {
    1
}

fn default_serial_limit() -> u64 {
    DEFAULT_SERIAL_LIMIT
}

/// Which entry point to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootProtocol {
    /// PVH when the kernel has a PVH note, else the 64-bit Linux entry.
    #[default]
    Auto,
    /// The Linux 64-bit boot protocol (long mode, identity page tables).
    Linux64,
    /// PVH (32-bit protected mode, paging off).
    Pvh,
}

/// Which CPUID features the guest sees (`tartarus_vmm::boot::cpuid` applies it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuTemplate {
    /// Everything KVM can virtualise on this host.
    Host,
    /// A portable x86-64-v3-like set (no AVX-512, TSX, MPX, SGX, PKU, PT).
    #[default]
    Baseline,
}

/// Default cap on serial output: 16 MiB.
pub const DEFAULT_SERIAL_LIMIT: u64 = 16 << 20;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialConfig {
    /// Discard output.
    #[default]
    None,
    /// Append to a file (created if missing).
    File { path: PathBuf },
    /// Connect to a listening unix stream socket and write there.
    Socket { path: PathBuf },
    /// This process's standard output.
    Stdout,
}

/// A disk as the `configure` request describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Host path of the image (for a scratch disk: where to create it).
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// The disk's serial as the guest sees it (up to 20 bytes).
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// A per-sandbox scratch disk (Lethe): wiped and removed when the VMM exits.
    #[serde(default)]
    pub scratch: Option<ScratchConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchConfig {
    /// Create `path` as a fresh sparse disk of this size; without it, `path` must be an
    /// existing (e.g. pre-formatted) disk that the VMM takes charge of.
    #[serde(default)]
    pub size_mib: Option<u64>,
    #[serde(default)]
    pub wipe: Wipe,
}

/// The vsock device: the guest's CID and the host-side unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// Disks per microVM: each takes an MMIO window and a GSI.
pub const MAX_DRIVES: usize = 8;
/// Largest scratch disk (sparse, so only written blocks use host disk).
const MAX_SCRATCH_MIB: u64 = 1 << 20;

impl DriveConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("a drive has an empty path".into());
        }
        if self.id.len() > 20 {
            return Err(format!("drive id {:?} is longer than 20 bytes", self.id));
        }
        if let Some(mib) = self.scratch.and_then(|s| s.size_mib) {
            if mib == 0 || mib > MAX_SCRATCH_MIB {
                return Err(format!(
                    "scratch size_mib is {mib}; it must be between 1 and {MAX_SCRATCH_MIB}"
                ));
            }
        }
        Ok(())
    }
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.guest_cid < 3 || self.guest_cid > u64::from(u32::MAX) {
            return Err(format!(
                "vsock guest_cid is {}; CIDs 0-2 are reserved and it must fit 32 bits",
                self.guest_cid
            ));
        }
        if self.uds_path.as_os_str().is_empty() {
            return Err("vsock uds_path is empty".into());
        }
        Ok(())
    }
}

/// I/O limits for one device; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub bytes_per_sec: Option<u64>,
    pub ops_per_sec: Option<u64>,
    /// Extra tokens a bucket may hold above one second's worth (a burst allowance).
    #[serde(default)]
    pub burst_bytes: u64,
    #[serde(default)]
    pub burst_ops: u64,
}

/// What happens to a scratch disk's contents when the sandbox ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wipe {
    /// Remove the file.
    #[default]
    Unlink,
    /// Overwrite every allocated extent with zeros, sync, then remove the file.
    Shred,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid machine configuration: {0}")]
pub struct ConfigError(pub String);

impl MachineConfig {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib.saturating_mul(1 << 20)
    }

    /// Checks every field; the VM is only built from a configuration that passed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError(format!(
                "vcpus is {}; it must be between 1 and {MAX_VCPUS}",
                self.vcpus
            )));
        }
        let bytes = self.memory_bytes();
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&bytes) {
            return Err(ConfigError(format!(
                "memory_mib is {}; it must be between {} and {}",
                self.memory_mib,
                MIN_MEMORY_BYTES >> 20,
                MAX_MEMORY_BYTES >> 20
            )));
        }
        if self.memory.hugepages && self.memory_mib % 2 != 0 {
            return Err(ConfigError(
                "memory_mib must be a multiple of 2 with hugepages".into(),
            ));
        }
        if self.memory.hugepages && self.memory.file.is_some() {
            return Err(ConfigError(
                "hugepages apply to anonymous memory; drop one of memory.file and memory.hugepages"
                    .into(),
            ));
        }
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError("kernel path is empty".into()));
        }
        if self.wall_clock_limit_ms == Some(0) {
            return Err(ConfigError("wall_clock_limit_ms must be positive".into()));
        }
        crate::cmdline::parse_cmdline(&self.cmdline).map_err(|e| ConfigError(e.to_string()))?;
        if self.drives.len() > MAX_DRIVES {
            return Err(ConfigError(format!(
                "{} drives configured; at most {MAX_DRIVES} are supported",
                self.drives.len()
            )));
        }
        for drive in &self.drives {
            drive.validate().map_err(ConfigError)?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate().map_err(ConfigError)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> MachineConfig {
        serde_json::from_str(r#"{"memory_mib": 64, "kernel": "/k"}"#).unwrap()
    }

    #[test]
    fn defaults_are_one_vcpu_auto_boot_baseline_cpu() {
        let c = base();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.boot_protocol, BootProtocol::Auto);
        assert_eq!(c.cpu_template, CpuTemplate::Baseline);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        assert!(
            serde_json::from_str::<MachineConfig>(r#"{"memory_mib":64,"kernel":"/k","x":1}"#)
                .is_err()
        );
        let mut c = base();
        c.vcpus = 0;
        assert!(c.validate().is_err());
        let mut c = base();
        c.memory_mib = 1;
        assert!(c.validate().is_err());
        let mut c = base();
        c.memory_mib = u64::MAX;
        assert!(c.validate().is_err());
        let mut c = base();
        c.cmdline = "a".repeat(10_000);
        assert!(c.validate().is_err());
    }

    #[test]
    fn virtio_devices_are_validated() {
        let c: MachineConfig = serde_json::from_str(
            r#"{"memory_mib": 64, "kernel": "/k",
                "drives": [{"path": "/root.ext4", "read_only": true},
                           {"path": "/s.img", "scratch": {"size_mib": 64, "wipe": "shred"}}],
                "vsock": {"guest_cid": 3, "uds_path": "/run/v.sock"}}"#,
        )
        .unwrap();
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.vsock.as_mut().unwrap().guest_cid = 2;
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.drives[0].path = PathBuf::new();
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.drives[1].scratch.as_mut().unwrap().size_mib = Some(0);
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.drives = vec![bad.drives[0].clone(); MAX_DRIVES + 1];
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"memory_mib": 64, "kernel": "/k", "drives": [{"path": "/a", "cache": 1}]}"#
        )
        .is_err());
    }
}
