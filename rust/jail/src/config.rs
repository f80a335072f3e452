//! What `tartarus-jail run` is asked to do: one JSON document.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tartarus_seccomp::Profile;

use crate::{JailError, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// Sandbox id; names the cgroup and appears in errors.
    pub id: String,
    /// The template's root filesystem; never written to.
    pub rootfs: PathBuf,
    /// An empty host directory the jail mounts its scratch layer on. The mount lives
    /// only in the jail's mount namespace, so it vanishes with the jail.
    pub work_dir: PathBuf,
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Size of the writable scratch layer (tmpfs), MiB.
    #[serde(default = "default_scratch_mib")]
    pub scratch_mib: u64,
    /// A network namespace to join (a path such as `/run/netns/NAME`, prepared by the
    /// host with its links, addresses and routes); otherwise the jail gets a new one
    /// with loopback only. The host's own namespace is never shared.
    #[serde(default)]
    pub network_namespace: Option<PathBuf>,
    #[serde(default)]
    pub user_namespace: UserNamespace,
    /// Host paths bound into the jail (the agent binary, its socket directory).
    #[serde(default)]
    pub mounts: Vec<BindMount>,
    #[serde(default)]
    pub cgroup: Option<CgroupConfig>,
    #[serde(default = "default_rlimits")]
    pub rlimits: Vec<Rlimit>,
    /// Capabilities the jailed program keeps (names like `CAP_CHOWN`); all others are
    /// dropped from every set, the bounding set included.
    #[serde(default = "default_capabilities")]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub seccomp: SeccompChoice,
    /// The program to run inside, found by absolute path.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_cwd")]
    pub cwd: String,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Where the jailed program's stdin, stdout and stderr go.
    #[serde(default)]
    pub stdio: Stdio,
    /// Keep the jail running when whoever started it dies (a host that restarts
    /// re-attaches to it, or reaps it); by default it ends with its host.
    #[serde(default)]
    pub outlive_host: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stdio {
    /// The jail's own stdin, stdout and stderr.
    #[default]
    Inherit,
    /// /dev/null for all three.
    Null,
    /// stdin from /dev/null; stdout and stderr appended to this host file.
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserNamespace {
    /// Only when not running as root (root does not need one to mount).
    #[default]
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindMount {
    pub source: PathBuf,
    /// Absolute path inside the jail; created if missing.
    pub destination: String,
    #[serde(default = "yes")]
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupConfig {
    /// Path of the parent cgroup, relative to each hierarchy's root (e.g.
    /// `tartarus/3f2a`); created as needed.
    pub parent: String,
    /// Name of this jail's cgroup under `parent`; must not exist yet.
    pub name: String,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub pids: Option<u64>,
    /// CPU time per period, in microseconds (e.g. 50000 of 100000 = half a core).
    #[serde(default)]
    pub cpu_quota_us: Option<u64>,
    #[serde(default = "default_cpu_period")]
    pub cpu_period_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    /// `nofile`, `core`, `fsize`, `stack`, `as`, `memlock`, `msgqueue`, `nproc`, ...
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompChoice {
    /// Typhon's `jail-default` profile.
    #[default]
    Default,
    None,
    Profile(Profile),
}

fn default_hostname() -> String {
    "tartarus".into()
}

fn default_scratch_mib() -> u64 {
    1024
}

fn default_cwd() -> String {
    "/".into()
}

fn default_cpu_period() -> u64 {
    100_000
}

fn yes() -> bool {
    true
}

fn default_rlimits() -> Vec<Rlimit> {
    vec![
        Rlimit {
            resource: "nofile".into(),
            soft: 4096,
            hard: 4096,
        },
        Rlimit {
            resource: "core".into(),
            soft: 0,
            hard: 0,
        },
    ]
}

/// Enough for the agent to run commands as another user and own its files; nothing
/// that reaches beyond the jail (no SYS_ADMIN, NET_ADMIN, SYS_PTRACE, SYS_MODULE, MKNOD).
pub fn default_capabilities() -> Vec<String> {
    [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

impl JailConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self =
            serde_json::from_str(text).map_err(|e| JailError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(JailError::Config(m));
        if self.argv.is_empty() || !self.argv[0].starts_with('/') {
            return bad(format!(
                "argv must start with an absolute path, got {:?}",
                self.argv
            ));
        }
        if !self.rootfs.is_dir() {
            return bad(format!(
                "rootfs {} is not a directory",
                self.rootfs.display()
            ));
        }
        if !self.work_dir.is_dir() {
            return bad(format!(
                "work_dir {} is not a directory",
                self.work_dir.display()
            ));
        }
        for m in &self.mounts {
            if !m.destination.starts_with('/') || m.destination.split('/').any(|c| c == "..") {
                return bad(format!(
                    "mount destination {:?} must be absolute, without ..",
                    m.destination
                ));
            }
            if !m.source.exists() {
                return bad(format!(
                    "mount source {} does not exist",
                    m.source.display()
                ));
            }
        }
        if let Some(cg) = &self.cgroup {
            let safe = |s: &str| {
                !s.is_empty() && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            };
            if !safe(&cg.parent) || !safe(&cg.name) || cg.name.contains('/') {
                return bad(format!(
                    "cgroup parent {:?} and name {:?} must be relative paths without . or ..",
                    cg.parent, cg.name
                ));
            }
        }
        for cap in &self.capabilities {
            if cap.parse::<caps::Capability>().is_err() {
                return bad(format!("unknown capability {cap:?}"));
            }
        }
        for r in &self.rlimits {
            crate::privileges::rlimit_resource(&r.resource)?;
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 {
            return bad(format!("hostname {:?} must be 1-64 bytes", self.hostname));
        }
        Ok(())
    }
}
