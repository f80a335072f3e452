//! cgroups on v1, v2 and hybrid hierarchies.
//!
//! Each controller the jail needs (memory, pids, cpu) goes where the host mounts it: a
//! v1 hierarchy of its own, or the unified (v2) hierarchy if that one offers it. When a
//! v2 hierarchy exists the jail also gets a directory there, even without controllers,
//! because v2 tracks membership cleanly and offers `cgroup.kill` and `cpu.stat`.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Context, Result};

pub const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "hugetlb"];

/// Where the host mounts its cgroup hierarchies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hierarchies {
    /// Mount point of the unified (v2) hierarchy.
    pub v2: Option<PathBuf>,
    /// v1 controller → mount point of its hierarchy.
    pub v1: BTreeMap<String, PathBuf>,
}

impl Hierarchies {
    pub fn detect() -> Result<Self> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .context(|| "reading /proc/self/mountinfo".into())?;
        Ok(Self::from_mountinfo(&text))
    }

    /// Parses /proc/self/mountinfo text (the first mount of each hierarchy wins).
    pub fn from_mountinfo(text: &str) -> Self {
        let mut found = Self::default();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mountpoint) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mountpoint = PathBuf::from(unescape_mountinfo(mountpoint));
            let mut right = right.split_whitespace();
            let fstype = right.next().unwrap_or_default();
            let superopts = right.nth(1).unwrap_or_default();
            match fstype {
                "cgroup2" if found.v2.is_none() => found.v2 = Some(mountpoint),
                "cgroup" => {
                    for opt in superopts.split(',') {
                        if CONTROLLERS.contains(&opt) || opt == "cpuacct" {
                            found
                                .v1
                                .entry(opt.to_string())
                                .or_insert_with(|| mountpoint.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        found
    }

    /// Controllers the v2 hierarchy offers at its root.
    fn v2_controllers(&self) -> Vec<String> {
        self.v2
            .as_ref()
            .and_then(|root| fs::read_to_string(root.join("cgroup.controllers")).ok())
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default()
    }
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or_default();
            if let Ok(b) = u8::from_str_radix(oct, 8) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Version {
    V1,
    V2,
}

/// One directory of the jail's cgroup, in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDir {
    pub version: Version,
    pub path: PathBuf,
    /// Controllers this directory enforces (may be empty for the v2 tracking directory).
    pub controllers: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: u64,
    /// 2 MiB huge pages the cgroup may reserve and use: huge pages are not charged to
    /// memory. None leaves the hugetlb controller out.
    #[serde(default)]
    pub hugetlb_2mb_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub memory_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    pub cpu_usec: u64,
    pub pids: u64,
    pub oom_kills: u64,
}

/// A jail's cgroup: one directory per hierarchy it uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    pub dirs: Vec<CgroupDir>,
}

impl Cgroup {
    /// Creates `<hierarchy>/<parent>/<name>` in every hierarchy needed and applies the
    /// limits. Fails if the cgroup already exists (names must be unique).
    pub fn create(h: &Hierarchies, parent: &str, name: &str, limits: &Limits) -> Result<Self> {
        let v2_offers = h.v2_controllers();
        let mut v2_controllers = Vec::new();
        let mut v1_dirs: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
        for controller in CONTROLLERS {
            if controller == "hugetlb" && limits.hugetlb_2mb_bytes.is_none() {
                continue;
            }
            if let Some(mount) = h.v1.get(controller) {
                v1_dirs
                    .entry(mount.clone())
                    .or_default()
                    .push(controller.to_string());
            } else if v2_offers.iter().any(|c| c == controller) {
                v2_controllers.push(controller.to_string());
            }
        }
        let mut cgroup = Cgroup::default();
        let result = (|| {
            if let Some(root) = &h.v2 {
                let path = root.join(parent).join(name);
                create_v2(root, parent, name, &v2_controllers)?;
                cgroup.dirs.push(CgroupDir {
                    version: Version::V2,
                    path,
                    controllers: v2_controllers.clone(),
                });
            }
            for (mount, controllers) in &v1_dirs {
                let path = mount.join(parent).join(name);
                fs::create_dir_all(mount.join(parent))
                    .context(|| format!("creating {}", mount.join(parent).display()))?;
                fs::create_dir(&path).context(|| format!("creating cgroup {}", path.display()))?;
                cgroup.dirs.push(CgroupDir {
                    version: Version::V1,
                    path,
                    controllers: controllers.clone(),
                });
            }
            cgroup.apply(limits)
        })();
        if let Err(e) = result {
            let _ = cgroup.remove(Duration::from_millis(100));
            return Err(e);
        }
        Ok(cgroup)
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        for dir in &self.dirs {
            let has = |c: &str| dir.controllers.iter().any(|x| x == c);
            let p = &dir.path;
            match dir.version {
                Version::V2 => {
                    if let (true, Some(bytes)) = (has("memory"), limits.memory_bytes) {
                        write(p, "memory.max", &bytes.to_string())?;
                        write_optional(p, "memory.swap.max", "0")?;
                    }
                    if let (true, Some(n)) = (has("pids"), limits.pids) {
                        write(p, "pids.max", &n.to_string())?;
                    }
                    if let (true, Some(q)) = (has("cpu"), limits.cpu_quota_us) {
                        write(p, "cpu.max", &format!("{q} {}", limits.cpu_period_us))?;
                    }
                    if let (true, Some(bytes)) = (has("hugetlb"), limits.hugetlb_2mb_bytes) {
                        write(p, "hugetlb.2MB.max", &bytes.to_string())?;
                        // Reservations (mmap time, kernels from 5.7): a clear ENOMEM
                        // instead of a SIGBUS at the first touch past the limit.
                        write_optional(p, "hugetlb.2MB.rsvd.max", &bytes.to_string())?;
                    }
                }
                Version::V1 => {
                    if let (true, Some(bytes)) = (has("memory"), limits.memory_bytes) {
                        write(p, "memory.limit_in_bytes", &bytes.to_string())?;
                        // With swap accounting on, memory+swap gets the same cap: no swapping out.
                        write_optional(p, "memory.memsw.limit_in_bytes", &bytes.to_string())?;
                        write_optional(p, "memory.swappiness", "0")?;
                    }
                    if let (true, Some(n)) = (has("pids"), limits.pids) {
                        write(p, "pids.max", &n.to_string())?;
                    }
                    if let (true, Some(q)) = (has("cpu"), limits.cpu_quota_us) {
                        write(p, "cpu.cfs_period_us", &limits.cpu_period_us.to_string())?;
                        write(p, "cpu.cfs_quota_us", &q.to_string())?;
                    }
                    if let (true, Some(bytes)) = (has("hugetlb"), limits.hugetlb_2mb_bytes) {
                        write(p, "hugetlb.2MB.limit_in_bytes", &bytes.to_string())?;
                        write_optional(p, "hugetlb.2MB.rsvd.limit_in_bytes", &bytes.to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves a process (and its future children) into every directory.
    pub fn attach(&self, pid: i32) -> Result<()> {
        for dir in &self.dirs {
            write(&dir.path, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Process ids in the cgroup (the union over hierarchies).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.path.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    pub fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for dir in &self.dirs {
            let p = &dir.path;
            let has = |c: &str| dir.controllers.iter().any(|x| x == c);
            match dir.version {
                Version::V2 => {
                    stats.cpu_usec = keyed(p, "cpu.stat", "usage_usec").unwrap_or(stats.cpu_usec);
                    if has("memory") {
                        stats.memory_bytes = read_u64(p, "memory.current").unwrap_or(0);
                        stats.memory_limit_bytes = read_u64(p, "memory.max");
                        stats.oom_kills = keyed(p, "memory.events", "oom_kill").unwrap_or(0);
                    }
                    if has("pids") {
                        stats.pids = read_u64(p, "pids.current").unwrap_or(0);
                    }
                }
                Version::V1 => {
                    if has("memory") {
                        stats.memory_bytes = read_u64(p, "memory.usage_in_bytes").unwrap_or(0);
                        stats.memory_limit_bytes = read_u64(p, "memory.limit_in_bytes");
                        stats.oom_kills = keyed(p, "memory.oom_control", "oom_kill").unwrap_or(0);
                    }
                    if has("pids") {
                        stats.pids = read_u64(p, "pids.current").unwrap_or(0);
                    }
                }
            }
        }
        if stats.pids == 0 {
            stats.pids = self.pids().len() as u64;
        }
        stats
    }

    /// SIGKILLs every process in the cgroup until it is empty or `timeout` passes.
    pub fn kill_all(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for dir in &self.dirs {
            if dir.version == Version::V2 {
                // Atomic kill of the whole subtree where the kernel has it (5.14+).
                let _ = fs::write(dir.path.join("cgroup.kill"), "1");
            }
        }
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            for pid in pids {
                // SAFETY: kill takes plain integers; a stale pid only yields ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes every directory, retrying while the kernel still holds dying tasks.
    pub fn remove(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for dir in &self.dirs {
            loop {
                match fs::remove_dir(&dir.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e)
                        if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(e).context(|| format!("removing cgroup {}", dir.path.display()))
                    }
                }
            }
        }
        Ok(())
    }
}

/// Creates a v2 cgroup, enabling `controllers` on every level from the root down.
fn create_v2(root: &Path, parent: &str, name: &str, controllers: &[String]) -> Result<()> {
    let mut dir = root.to_path_buf();
    let levels: Vec<&str> = parent.split('/').chain(std::iter::once(name)).collect();
    for (i, level) in levels.iter().enumerate() {
        if !controllers.is_empty() {
            let enable: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
            let subtree = dir.join("cgroup.subtree_control");
            let current = fs::read_to_string(&subtree).unwrap_or_default();
            if controllers
                .iter()
                .any(|c| !current.split_whitespace().any(|x| x == c))
            {
                fs::write(&subtree, enable.join(" ")).context(|| {
                    format!("enabling {} in {}", enable.join(" "), subtree.display())
                })?;
            }
        }
        dir.push(level);
        let last = i == levels.len() - 1;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists && !last => {}
            Err(e) => return Err(e).context(|| format!("creating cgroup {}", dir.display())),
        }
    }
    Ok(())
}

fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    fs::write(&path, value).context(|| format!("writing {value:?} to {}", path.display()))
}

/// Writes a file that only some kernels or configurations have.
fn write_optional(dir: &Path, file: &str, value: &str) -> Result<()> {
    match fs::write(dir.join(file), value) {
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) => Ok(()),
        other => other.context(|| format!("writing {value:?} to {}", dir.join(file).display())),
    }
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    let text = fs::read_to_string(dir.join(file)).ok()?;
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse().ok()
}

/// Reads `key value` lines (memory.events, cpu.stat, memory.oom_control).
fn keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(dir.join(file)).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_hierarchies() {
        let h = Hierarchies::from_mountinfo(HYBRID);
        assert_eq!(h.v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(h.v1["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(h.v1["pids"], PathBuf::from("/sys/fs/cgroup/pids"));
        assert_eq!(h.v1["cpu"], PathBuf::from("/sys/fs/cgroup/cpu"));
        assert!(!h.v1.contains_key("name=systemd"));
    }

    #[test]
    fn pure_v2_and_comounted_v1() {
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = Hierarchies::from_mountinfo(v2);
        assert_eq!(h.v2, Some(PathBuf::from("/sys/fs/cgroup")));
        assert!(h.v1.is_empty());
        let v1 = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let h = Hierarchies::from_mountinfo(v1);
        assert_eq!(h.v2, None);
        assert_eq!(h.v1["cpu"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(h.v1["cpuacct"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/trailing\"), r"/trailing\");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
    }
}
