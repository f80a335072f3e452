//! Namespaces: creating a child in new ones, mapping ids into a user namespace,
//! joining a prepared network namespace, bringing up loopback in a fresh one.

use std::fs::{self, File};
use std::path::Path;

use nix::sched::CloneFlags;
use nix::unistd::Pid;

use crate::{Context, Result};

/// Which namespaces to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespaces {
    pub user: bool,
    pub mount: bool,
    pub pid: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
    pub cgroup: bool,
}

impl Namespaces {
    /// Every namespace (the user namespace as asked).
    pub fn all(user: bool) -> Self {
        Self {
            user,
            mount: true,
            pid: true,
            ipc: true,
            uts: true,
            net: true,
            cgroup: true,
        }
    }

    pub fn flags(&self) -> CloneFlags {
        let mut f = CloneFlags::empty();
        for (on, flag) in [
            (self.user, CloneFlags::CLONE_NEWUSER),
            (self.mount, CloneFlags::CLONE_NEWNS),
            (self.pid, CloneFlags::CLONE_NEWPID),
            (self.ipc, CloneFlags::CLONE_NEWIPC),
            (self.uts, CloneFlags::CLONE_NEWUTS),
            (self.net, CloneFlags::CLONE_NEWNET),
            (self.cgroup, CloneFlags::CLONE_NEWCGROUP),
        ] {
            if on {
                f |= flag;
            }
        }
        f
    }
}

/// Forks into new namespaces: like `fork()`, returns `Some(child)` in the parent and
/// `None` in the child (which is PID 1 of its namespace when `pid` is set).
///
/// # Safety
/// The caller must be single-threaded: as after `fork()`, only the calling thread
/// exists in the child.
pub unsafe fn fork_into(ns: Namespaces) -> Result<Option<Pid>> {
    let flags = ns.flags().bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: raw clone without a new stack behaves as fork (copy-on-write of our stack);
    // the caller guarantees no other threads exist.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match rc {
        -1 => Err(std::io::Error::last_os_error()).context(|| format!("clone({:?})", ns.flags())),
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
    }
}

/// Maps `inside` (usually 0) to `outside` for uid and gid in `child`'s user
/// namespace. Disables setgroups first, as unprivileged gid maps require.
pub fn write_id_maps(child: Pid, inside: u32, uid_outside: u32, gid_outside: u32) -> Result<()> {
    let base = format!("/proc/{child}");
    // EACCES/ENOENT happen on kernels without the file; the gid map then decides.
    let _ = fs::write(format!("{base}/setgroups"), "deny");
    fs::write(
        format!("{base}/uid_map"),
        format!("{inside} {uid_outside} 1\n"),
    )
    .context(|| format!("writing {base}/uid_map"))?;
    fs::write(
        format!("{base}/gid_map"),
        format!("{inside} {gid_outside} 1\n"),
    )
    .context(|| format!("writing {base}/gid_map"))
}

/// Moves the calling thread into the network namespace at `path` (a bind mount such as
/// `/run/netns/NAME`, or `/proc/PID/ns/net`).
pub fn join_network(path: &Path) -> Result<()> {
    let file = File::open(path).context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .context(|| format!("joining the network namespace {}", path.display()))
}

/// Brings up `lo` in the current network namespace (new ones start with it down).
pub fn loopback_up() -> Result<()> {
    // SAFETY: socket() takes plain integers; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(|| "socket for SIOCSIFFLAGS".into());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is a socket and req a valid ifreq naming "lo".
    let mut rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    if rc == 0 {
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        // SAFETY: as above.
        rc = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) };
    }
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err).context(|| "bringing up lo".into());
    }
    Ok(())
}
