//! Host capability probes for Tartarus: what isolation this machine can offer.
//!
//! `tartarus doctor` and the backend selector read these facts. Each probe tries the real
//! operation (open the device, create the namespace, run guest code) rather than trusting
//! a file name, and reports failures as findings instead of errors.
//!
//! `netns` makes and removes the named network namespaces Styx gives sandboxes; `links`
//! joins them to the host.

use std::ffi::CString;
use std::fs;
use std::path::Path;

use serde::Serialize;
use tartarus_vmm_api::probe::{probe_kvm, KvmProbe};

pub mod egress;
pub mod links;
pub mod netns;

/// Which cgroup hierarchy the host mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    /// Only the unified (v2) hierarchy at /sys/fs/cgroup.
    V2,
    /// Only v1 controller hierarchies.
    V1,
    /// v1 controllers plus a v2 hierarchy (usually at /sys/fs/cgroup/unified).
    Hybrid,
    /// No cgroup filesystem mounted.
    None,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cgroups {
    pub mode: CgroupMode,
    /// Mount point of the v2 hierarchy, if any.
    pub v2_mount: Option<String>,
    /// v1 controllers that are mounted, e.g. `memory`, `pids`.
    pub v1_controllers: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Capability {
    pub available: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub path: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Everything `probe_host` finds.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub kernel: String,
    pub arch: String,
    pub cpus: usize,
    /// CPU flags that matter for virtualisation: `vmx`, `svm`, `hypervisor`.
    pub cpu_virt_flags: Vec<String>,
    pub kvm: KvmProbe,
    pub cgroups: Cgroups,
    pub seccomp: Capability,
    pub user_namespaces: Capability,
    pub tun: Capability,
    pub memory: Memory,
    pub disk: Disk,
}

/// Probes the host. `disk_path` is where Tartarus keeps its cache (its free space matters).
pub fn probe_host(disk_path: &Path) -> HostReport {
    let uts = uname();
    HostReport {
        kernel: uts.0,
        arch: uts.1,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_virt_flags: cpu_virt_flags(&fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
        kvm: probe_kvm(),
        cgroups: cgroups_from_mountinfo(
            &fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        ),
        seccomp: probe_seccomp(),
        user_namespaces: probe_user_namespaces(),
        tun: probe_tun(),
        memory: memory_from_meminfo(&fs::read_to_string("/proc/meminfo").unwrap_or_default()),
        disk: disk_usage(disk_path),
    }
}

fn uname() -> (String, String) {
    // SAFETY: utsname is plain old data; uname fills it and we read NUL-terminated fields.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return ("unknown".into(), std::env::consts::ARCH.into());
    }
    let field = |chars: &[libc::c_char]| {
        let bytes: Vec<u8> = chars
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&uts.release), field(&uts.machine))
}

/// Extracts virtualisation-related flags from /proc/cpuinfo text.
pub fn cpu_virt_flags(cpuinfo: &str) -> Vec<String> {
    let Some(line) = cpuinfo.lines().find(|l| l.starts_with("flags")) else {
        return Vec::new();
    };
    let mut flags: Vec<String> = line
        .split_whitespace()
        .filter(|f| matches!(*f, "vmx" | "svm" | "hypervisor"))
        .map(str::to_string)
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// Decides the cgroup mode from /proc/self/mountinfo text.
pub fn cgroups_from_mountinfo(mountinfo: &str) -> Cgroups {
    let mut v2_mount = None;
    let mut v1_controllers = Vec::new();
    for line in mountinfo.lines() {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mountpoint = left.split_whitespace().nth(4).unwrap_or_default();
        let mut right = right.split_whitespace();
        let fstype = right.next().unwrap_or_default();
        let superopts = right.nth(1).unwrap_or_default();
        match fstype {
            "cgroup2" => v2_mount = Some(mountpoint.to_string()),
            "cgroup" => v1_controllers.extend(
                superopts
                    .split(',')
                    .filter(|o| !is_mount_option(o))
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    v1_controllers.sort();
    v1_controllers.dedup();
    let mode = match (v2_mount.is_some(), v1_controllers.is_empty()) {
        (true, true) => CgroupMode::V2,
        (true, false) => CgroupMode::Hybrid,
        (false, false) => CgroupMode::V1,
        (false, true) => CgroupMode::None,
    };
    Cgroups {
        mode,
        v2_mount,
        v1_controllers,
    }
}

/// Options that appear beside controller names in a v1 cgroup mount.
fn is_mount_option(opt: &str) -> bool {
    opt.contains('=')
        || matches!(
            opt,
            "rw" | "ro" | "xattr" | "noprefix" | "clone_children" | "cpuset_v2_mode"
        )
}

/// Parses MemTotal and MemAvailable (kB) from /proc/meminfo text.
pub fn memory_from_meminfo(meminfo: &str) -> Memory {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kb| kb * 1024)
    };
    Memory {
        total_bytes: field("MemTotal:"),
        available_bytes: field("MemAvailable:"),
    }
}

fn disk_usage(path: &Path) -> Disk {
    // Walk up to the nearest existing ancestor: the cache dir may not exist yet.
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let mut free_bytes = 0;
    let mut total_bytes = 0;
    if let Ok(c_path) = CString::new(existing.as_os_str().as_encoded_bytes()) {
        // SAFETY: statvfs is plain old data that statvfs(3) fills.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c_path is NUL-terminated and `st` is writable.
        if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } == 0 {
            free_bytes = st.f_bavail * st.f_frsize;
            total_bytes = st.f_blocks * st.f_frsize;
        }
    }
    Disk {
        path: path.display().to_string(),
        free_bytes,
        total_bytes,
    }
}

fn probe_seccomp() -> Capability {
    // PR_GET_SECCOMP fails with EINVAL when the kernel lacks CONFIG_SECCOMP.
    // SAFETY: prctl(PR_GET_SECCOMP) takes no pointers and only reads this thread's mode.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode < 0 {
        return Capability {
            available: false,
            detail: "prctl(PR_GET_SECCOMP) failed: kernel built without seccomp".into(),
        };
    }
    let actions = fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    let filter = actions.split_whitespace().any(|a| a == "kill_process");
    Capability {
        available: filter,
        detail: if filter {
            format!("seccomp filter mode; actions: {}", actions.trim())
        } else {
            "seccomp present but filter actions unavailable".into()
        },
    }
}

/// Forks a child that tries `unshare(CLONE_NEWUSER)`: the only honest test.
fn probe_user_namespaces() -> Capability {
    // SAFETY: the child only calls async-signal-safe functions (unshare, _exit) before
    // exiting, which is what POSIX allows after fork in a multi-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Capability {
            available: false,
            detail: format!("fork failed: {}", std::io::Error::last_os_error()),
        };
    }
    if pid == 0 {
        // SAFETY: see above; the child exits immediately with the result.
        unsafe {
            let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let available = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let max = fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Capability {
        available,
        detail: if available {
            format!("unshare(CLONE_NEWUSER) works; max_user_namespaces={max}")
        } else {
            format!("unshare(CLONE_NEWUSER) refused; max_user_namespaces={max}")
        },
    }
}

fn probe_tun() -> Capability {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => Capability {
            available: true,
            detail: "/dev/net/tun opens read-write".into(),
        },
        Err(e) => Capability {
            available: false,
            detail: format!("/dev/net/tun: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
34 30 0:30 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids";

    #[test]
    fn hybrid_hierarchy_is_detected() {
        let c = cgroups_from_mountinfo(HYBRID);
        assert_eq!(c.mode, CgroupMode::Hybrid);
        assert_eq!(c.v2_mount.as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(c.v1_controllers, vec!["memory", "pids"]);
    }

    #[test]
    fn pure_v2_and_none() {
        let v2 = "31 1 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(cgroups_from_mountinfo(v2).mode, CgroupMode::V2);
        assert_eq!(cgroups_from_mountinfo("").mode, CgroupMode::None);
    }

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let m = memory_from_meminfo("MemTotal:       2048 kB\nMemAvailable:    1024 kB\n");
        assert_eq!(m.total_bytes, 2048 * 1024);
        assert_eq!(m.available_bytes, 1024 * 1024);
    }

    #[test]
    fn virt_flags_are_filtered() {
        let flags = cpu_virt_flags("flags\t: fpu vme hypervisor sse vmx\n");
        assert_eq!(flags, vec!["hypervisor", "vmx"]);
    }
}
