//! The VMM's own jail, entered before any guest code runs, built from the
//! `tartarus-jail` library.
//!
//! `tartarus-vmm ... --jail FILE` opens what it needs from the host first (`/dev/kvm`,
//! the API socket, the `--config` file), then forks: the parent stays on the host as the
//! supervisor, the child becomes the VMM inside
//! - new mount, pid (the VMM is its PID 1), network (no interfaces), ipc, uts and cgroup
//!   namespaces;
//! - a cgroup `<parent>/<id>` limiting memory (guest RAM + overhead), pids and CPU;
//! - a root that holds only the configured bind mounts (the kernel, drives, a directory
//!   for the serial log, vsock socket and scratch disks): a small tmpfs mounted on
//!   `chroot_base` in the VMM's own mount namespace, pivoted into and made read-only.
//!   No /dev (KVM is already open), no /proc, no /sys;
//! - an unprivileged uid/gid, no capabilities (bounding set included), rlimits,
//!   `no_new_privs`; then the per-thread seccomp filters of [`crate::seccomp`].
//!
//! The supervisor ([`tartarus_jail::supervisor`]) waits for the VMM, turns
//! SIGTERM/SIGINT/SIGHUP/SIGQUIT into a SIGKILL of the whole jail (a PID 1 ignores
//! signals it has no handler for), ends the jail when the process that started the VMM
//! dies, removes the cgroup when the jail is gone and exits with the VMM's status
//! (128 + signal if a signal ended it). The VMM dies with its supervisor. Paths in the
//! machine configuration are paths inside the jail.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tartarus_jail::cgroup::{Cgroup, Hierarchies, Limits};
use tartarus_jail::config::{BindMount, Rlimit};
use tartarus_jail::namespaces::Namespaces;
use tartarus_jail::spawn::{spawn_held, Hold};
use tartarus_jail::supervisor::{self, Ended, Host, OnStop, Supervisor};
use tartarus_jail::{mounts, privileges, JailError};

/// Where the jail root is mounted (in the VMM's mount namespace only) by default.
pub const DEFAULT_CHROOT_BASE: &str = "/run/tartarus/vmm-jail";
pub const DEFAULT_CGROUP_PARENT: &str = "tartarus/vmm";
/// Memory for the VMM itself and KVM's per-VM kernel allocations, on top of guest RAM.
pub const DEFAULT_OVERHEAD_MIB: u64 = 64;
/// Threads: the API thread, one per vCPU, device workers, the watchdog.
pub const DEFAULT_PIDS: u64 = 128;
/// Size of the tmpfs holding the jail root (mount points only).
const ROOT_SIZE_KIB: u64 = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// Names the cgroup (`<cgroup.parent>/<id>`): 1-64 of `A-Za-z0-9._-`, unique among
    /// running VMMs.
    pub id: String,
    /// The (host) directory the jail root is mounted on, in the VMM's own mount
    /// namespace; created if missing, never written to.
    #[serde(default = "default_chroot_base")]
    pub chroot_base: PathBuf,
    /// The unprivileged user and group the VMM runs as (not 0).
    pub uid: u32,
    pub gid: u32,
    /// Host paths bound into the jail root, read-only unless `readonly` is false. A
    /// writable directory must be writable by `uid`.
    #[serde(default)]
    pub mounts: Vec<BindMount>,
    #[serde(default)]
    pub cgroup: CgroupLimits,
    /// RLIMIT_NOFILE: vCPUs, eventfds, drives and API connections.
    #[serde(default = "default_max_open_files")]
    pub max_open_files: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupLimits {
    /// Parent cgroup, relative to each hierarchy's root; created as needed.
    #[serde(default = "default_cgroup_parent")]
    pub parent: String,
    /// The largest guest RAM this VMM may be configured with. Defaults to the machine
    /// configuration's when one is given at launch (`--config`); required otherwise.
    #[serde(default)]
    pub guest_memory_mib: Option<u64>,
    /// Added to guest RAM for the memory limit: the VMM and KVM's kernel memory.
    #[serde(default = "default_overhead_mib")]
    pub overhead_mib: u64,
    #[serde(default = "default_pids")]
    pub pids: u64,
    /// CPU time per period in microseconds (e.g. 100000 of 100000 = one core); no
    /// limit when absent.
    #[serde(default)]
    pub cpu_quota_us: Option<u64>,
    #[serde(default = "default_cpu_period_us")]
    pub cpu_period_us: u64,
}

impl Default for CgroupLimits {
    fn default() -> Self {
        CgroupLimits {
            parent: default_cgroup_parent(),
            guest_memory_mib: None,
            overhead_mib: DEFAULT_OVERHEAD_MIB,
            pids: DEFAULT_PIDS,
            cpu_quota_us: None,
            cpu_period_us: default_cpu_period_us(),
        }
    }
}

fn default_chroot_base() -> PathBuf {
    PathBuf::from(DEFAULT_CHROOT_BASE)
}

fn default_cgroup_parent() -> String {
    DEFAULT_CGROUP_PARENT.into()
}

fn default_overhead_mib() -> u64 {
    DEFAULT_OVERHEAD_MIB
}

fn default_pids() -> u64 {
    DEFAULT_PIDS
}

fn default_cpu_period_us() -> u64 {
    100_000
}

fn default_max_open_files() -> u64 {
    1024
}

fn bad(message: String) -> JailError {
    JailError::Config(message)
}

fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && s != "."
        && s != ".."
}

impl JailConfig {
    /// Checks every field; `machine_memory_mib` is the guest RAM of a machine
    /// configuration given at launch. Returns the guest memory limit (MiB).
    pub fn validate(&self, machine_memory_mib: Option<u64>) -> Result<u64, JailError> {
        if !is_name(&self.id) {
            return Err(bad(format!(
                "jail id {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                self.id
            )));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(bad(format!(
                "jail uid and gid must be unprivileged (not 0), got {}:{}",
                self.uid, self.gid
            )));
        }
        if !self.chroot_base.is_absolute() {
            return Err(bad(format!(
                "chroot_base {} must be an absolute path",
                self.chroot_base.display()
            )));
        }
        for m in &self.mounts {
            let dest = Path::new(&m.destination);
            if !dest.is_absolute()
                || dest.parent().is_none()
                || m.destination.split('/').any(|c| c == ".." || c == ".")
            {
                return Err(bad(format!(
                    "mount destination {:?} must be an absolute path below /, without . or ..",
                    m.destination
                )));
            }
            if !m.source.exists() {
                return Err(bad(format!(
                    "mount source {} does not exist",
                    m.source.display()
                )));
            }
        }
        let cg = &self.cgroup;
        if cg.parent.is_empty()
            || !cg
                .parent
                .split('/')
                .all(|c| c != "." && c != ".." && !c.is_empty())
        {
            return Err(bad(format!(
                "cgroup parent {:?} must be a relative path without . or ..",
                cg.parent
            )));
        }
        if cg.pids == 0 || cg.cpu_period_us == 0 || cg.cpu_quota_us == Some(0) {
            return Err(bad(
                "cgroup pids, cpu_quota_us and cpu_period_us must be positive".into(),
            ));
        }
        if self.max_open_files < 64 {
            return Err(bad(format!(
                "max_open_files is {}; the VMM needs at least 64",
                self.max_open_files
            )));
        }
        let guest = match (cg.guest_memory_mib, machine_memory_mib) {
            (Some(limit), Some(machine)) if machine > limit => {
                return Err(bad(format!(
                    "the machine has {machine} MiB of RAM but the jail allows {limit} MiB \
                     (cgroup.guest_memory_mib)"
                )))
            }
            (Some(limit), _) => limit,
            (None, Some(machine)) => machine,
            (None, None) => {
                return Err(bad(
                    "cgroup.guest_memory_mib is required when the machine is configured \
                     through the API"
                        .into(),
                ))
            }
        };
        if guest == 0 {
            return Err(bad("cgroup.guest_memory_mib must be positive".into()));
        }
        Ok(guest)
    }

    /// The cgroup limits for a guest of `guest_mib`. Guest RAM on huge pages is not
    /// charged to memory, so the hugetlb controller caps it at the guest's size.
    pub fn limits(&self, guest_mib: u64) -> Limits {
        let memory_mib = guest_mib.saturating_add(self.cgroup.overhead_mib);
        Limits {
            memory_bytes: Some(memory_mib.saturating_mul(1 << 20)),
            pids: Some(self.cgroup.pids),
            cpu_quota_us: self.cgroup.cpu_quota_us,
            cpu_period_us: self.cgroup.cpu_period_us,
            hugetlb_2mb_bytes: Some(guest_mib.saturating_mul(1 << 20)),
        }
    }
}

/// Enters the jail and runs `vmm` there; this process becomes the supervisor and
/// exits when the jail is gone, so this returns only if the jail could not be set up
/// (nothing is left behind then). `vmm` returns the VMM's exit status.
///
/// Must be called while the process is single-threaded (before any vCPU or worker).
pub fn run_jailed(
    config: &JailConfig,
    guest_memory_mib: u64,
    vmm: impl FnOnce() -> u8,
) -> Result<std::convert::Infallible, JailError> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(bad(
            "the VMM jail needs root (mounts, namespaces, cgroups, the uid switch); \
             run without --jail, or as root"
                .into(),
        ));
    }
    let supervisor = Supervisor::prepare()?;
    let cgroup = Cgroup::create(
        &Hierarchies::detect()?,
        &config.cgroup.parent,
        &config.id,
        &config.limits(guest_memory_mib),
    )?;
    let hold = Hold {
        // Every namespace but the user one: root needs none to mount.
        namespaces: Namespaces::all(false),
        cgroup: Some(&cgroup),
        id_map: None,
    };
    // SAFETY: the caller guarantees this process is single-threaded.
    let spawned = unsafe {
        spawn_held(hold, |report| {
            // Diff snapshots read the page table through it; the jail has no /proc.
            crate::snapshot::memory::open_pagemap()
                .map_err(|e| bad(format!("cannot prepare diff snapshots: {e}")))?;
            enter(config)?;
            if !report.parent_alive() {
                return Err(bad("the supervisor went away".into()));
            }
            report.ready();
            std::process::exit(i32::from(vmm()))
        })
    };
    let pid = match spawned {
        Ok(pid) => pid,
        Err(e) => {
            cgroup.kill_all(Duration::from_secs(5));
            let _ = cgroup.remove(Duration::from_secs(5));
            return Err(e);
        }
    };
    let code = supervise(pid, &supervisor);
    cgroup.kill_all(Duration::from_secs(5));
    let oom_kills = cgroup.stats().oom_kills;
    if let Err(e) = cgroup.remove(Duration::from_secs(5)) {
        eprintln!("tartarus-vmm: jail: {e}");
    }
    if oom_kills > 0 {
        eprintln!(
            "tartarus-vmm: jail: the VMM hit its memory limit ({} MiB) {oom_kills} time(s)",
            guest_memory_mib + config.cgroup.overhead_mib
        );
    }
    std::process::exit(code)
}

/// In the child: the filesystem, then the privilege drop.
fn enter(config: &JailConfig) -> Result<(), JailError> {
    mounts::make_private()?;
    let root = mounts::prepare_empty_root(&config.chroot_base, ROOT_SIZE_KIB)?;
    for m in &config.mounts {
        mounts::bind_inside(&root, &m.source, &m.destination, m.readonly)?;
    }
    mounts::pivot_into(&root)?;
    mounts::seal_root()?;
    let rlimits = [
        Rlimit {
            resource: "nofile".into(),
            soft: config.max_open_files,
            hard: config.max_open_files,
        },
        Rlimit {
            resource: "core".into(),
            soft: 0,
            hard: 0,
        },
    ];
    privileges::drop_privileges(&rlimits, &Default::default(), config.uid, config.gid)
}

/// Waits for the jailed VMM; returns its exit status (128 + signal if killed).
fn supervise(pid: Pid, supervisor: &Supervisor) -> i32 {
    if let Err(e) = supervisor.watch(pid, OnStop::Kill, Host::Needed) {
        eprintln!("tartarus-vmm: jail: cannot guard the VMM, it was stopped: {e}");
    }
    match supervisor::wait_for(pid) {
        Ok(ended) => {
            if let Ended::Killed(sig) = ended {
                eprintln!("tartarus-vmm: jail: the VMM was killed by {sig}");
            }
            ended.code()
        }
        Err(e) => {
            eprintln!("tartarus-vmm: jail: {e}");
            125
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> JailConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_fill_in() {
        let c = config(r#"{"id": "vm-1", "uid": 1000, "gid": 1000}"#);
        assert_eq!(c.chroot_base, PathBuf::from(DEFAULT_CHROOT_BASE));
        assert_eq!(c.cgroup.parent, DEFAULT_CGROUP_PARENT);
        assert_eq!(c.cgroup.pids, DEFAULT_PIDS);
        assert_eq!(c.validate(Some(64)).unwrap(), 64);
        let limits = c.limits(64);
        assert_eq!(limits.memory_bytes, Some((64 + DEFAULT_OVERHEAD_MIB) << 20));
        assert_eq!(limits.pids, Some(DEFAULT_PIDS));
        assert_eq!(limits.hugetlb_2mb_bytes, Some(64 << 20));
        assert_eq!(limits.cpu_quota_us, None);
    }

    #[test]
    fn guest_memory_comes_from_the_jail_or_the_machine() {
        let c = config(r#"{"id": "a", "uid": 5, "gid": 5, "cgroup": {"guest_memory_mib": 128}}"#);
        assert_eq!(c.validate(None).unwrap(), 128);
        assert_eq!(c.validate(Some(64)).unwrap(), 128);
        assert!(
            c.validate(Some(256)).is_err(),
            "a machine larger than the jail"
        );
        let c = config(r#"{"id": "a", "uid": 5, "gid": 5}"#);
        assert!(c.validate(None).is_err(), "no limit known at launch");
    }

    #[test]
    fn bad_configs_are_rejected() {
        for json in [
            r#"{"id": "../x", "uid": 5, "gid": 5}"#,
            r#"{"id": "", "uid": 5, "gid": 5}"#,
            r#"{"id": "a", "uid": 0, "gid": 5}"#,
            r#"{"id": "a", "uid": 5, "gid": 0}"#,
            r#"{"id": "a", "uid": 5, "gid": 5, "chroot_base": "rel"}"#,
            r#"{"id": "a", "uid": 5, "gid": 5, "mounts": [{"source": "/", "destination": "/"}]}"#,
            r#"{"id": "a", "uid": 5, "gid": 5, "mounts": [{"source": "/", "destination": "/a/../.."}]}"#,
            r#"{"id": "a", "uid": 5, "gid": 5, "mounts": [{"source": "/nonexistent-src", "destination": "/k"}]}"#,
            r#"{"id": "a", "uid": 5, "gid": 5, "cgroup": {"parent": "../up"}}"#,
            r#"{"id": "a", "uid": 5, "gid": 5, "cgroup": {"pids": 0}}"#,
            r#"{"id": "a", "uid": 5, "gid": 5, "cgroup": {"cpu_quota_us": 0}}"#,
            r#"{"id": "a", "uid": 5, "gid": 5, "max_open_files": 3}"#,
        ] {
            assert!(config(json).validate(Some(64)).is_err(), "{json}");
        }
        assert!(
            serde_json::from_str::<JailConfig>(r#"{"id": "a", "uid": 5, "gid": 5, "x": 1}"#)
                .is_err()
        );
    }
}
