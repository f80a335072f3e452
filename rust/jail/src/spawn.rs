//! Forking a child into new namespaces and holding it until its parent has set it up:
//! the parent writes the child's id maps and moves it into its cgroup, then releases
//! it; the child reports back either why it failed or that it is ready.
//!
//! Readiness is end-of-file on a close-on-exec pipe: `tartarus-jail`'s init calls
//! [`Report::ready`] and the exec of the jailed program closes the last copy; a jailed
//! process that does not exec (the VMM) calls [`Report::ready`] itself.

use std::cell::Cell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{pipe2, Pid};

use crate::cgroup::Cgroup;
use crate::namespaces::{self, Namespaces};
use crate::privileges;
use crate::{Context, JailError, Result};

/// What the parent does for the child before releasing it.
#[derive(Debug, Clone, Copy)]
pub struct Hold<'a> {
    /// Namespaces the child is created in. A cgroup namespace is entered by the child
    /// once it sits in `cgroup`, so that cgroup becomes the namespace's root.
    pub namespaces: Namespaces,
    pub cgroup: Option<&'a Cgroup>,
    /// Maps root inside the user namespace to this (uid, gid) outside.
    pub id_map: Option<(u32, u32)>,
}

/// The child's end: report a failure, or readiness.
pub struct Report {
    err_w: Cell<Option<OwnedFd>>,
}

impl Report {
    /// The descriptor a forked grandchild may write its own failure to (until
    /// [`Report::ready`]).
    pub fn raw_fd(&self) -> Option<RawFd> {
        let fd = self.err_w.take();
        let raw = fd.as_ref().map(AsRawFd::as_raw_fd);
        self.err_w.set(fd);
        raw
    }

    /// Tells the parent setup is complete (closes this process's end of the pipe).
    pub fn ready(&self) {
        drop(self.err_w.take());
    }

    /// True while the parent holds the read end: a parent that died before
    /// [`privileges::die_with_parent`] took effect is noticed here (the pipe reports an error).
    pub fn parent_alive(&self) -> bool {
        let Some(fd) = self.raw_fd() else {
            return true;
        };
        let mut pfd = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc == 0 || (rc > 0 && pfd.revents & libc::POLLERR == 0)
    }

    /// Sends `error` to the parent and leaves the child.
    fn fail(&self, error: &JailError) -> ! {
        if let Some(fd) = self.err_w.take() {
            let _ = File::from(fd).write_all(error.to_string().as_bytes());
        }
        // SAFETY: _exit skips the parent's atexit handlers and buffers, as a fork child must.
        unsafe { libc::_exit(126) }
    }
}

/// Uninhabited: a child step that only returns on failure returns `Result<Never>`.
pub enum Never {}

/// Forks a child into `hold.namespaces`, sets it up from the parent, releases it and
/// waits until it reports. In the child, `child` runs once released (after
/// `PR_SET_PDEATHSIG(SIGKILL)` and the cgroup namespace); it either never returns
/// (`Ok(Never)`: it exec'd or reported ready and carries on) or fails, which ends the
/// child with the error sent to the parent. Returns the child's pid (in the parent's
/// pid namespace) once it is ready, or the child's error (the child is then reaped).
///
/// # Safety
/// The caller must be single-threaded: as after `fork()`, only the calling thread
/// exists in the child.
pub unsafe fn spawn_held(
    hold: Hold<'_>,
    child: impl FnOnce(&Report) -> Result<Never>,
) -> Result<Pid> {
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).context(|| "pipe".into())?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).context(|| "pipe".into())?;
    let cgroup_ns = hold.namespaces.cgroup;
    let mut ns = hold.namespaces;
    ns.cgroup = false;
    // SAFETY: the caller guarantees we are single-threaded.
    let pid = unsafe { namespaces::fork_into(ns) }?;
    let Some(pid) = pid else {
        drop(go_w);
        drop(err_r);
        let report = Report {
            err_w: Cell::new(Some(err_w)),
        };
        if let Err(e) = released(go_r, cgroup_ns) {
            report.fail(&e);
        }
        match child(&report) {
            Ok(never) => match never {},
            Err(e) => report.fail(&e),
        }
    };
    drop(go_r);
    drop(err_w);
    let setup = (|| {
        if let Some((uid, gid)) = hold.id_map {
            namespaces::write_id_maps(pid, 0, uid, gid)?;
        }
        if let Some(cg) = hold.cgroup {
            cg.attach(pid.as_raw())?;
        }
        File::from(go_w)
            .write_all(b"g")
            .context(|| "releasing the child".into())
    })();
    let mut failure = String::new();
    let _ = File::from(err_r).read_to_string(&mut failure);
    if setup.is_err() || !failure.is_empty() {
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(pid.as_raw(), libc::SIGKILL) };
        let _ = waitpid(pid, None);
        setup?;
        return Err(JailError::Config(failure));
    }
    Ok(pid)
}

/// In the child: waits for the parent's release, dies with the parent, enters the
/// cgroup namespace.
fn released(go_r: OwnedFd, cgroup_ns: bool) -> Result<()> {
    let mut go = [0u8; 1];
    if File::from(go_r).read(&mut go).unwrap_or(0) != 1 {
        return Err(JailError::Config(
            "the parent went away before release".into(),
        ));
    }
    privileges::die_with_parent()?;
    if cgroup_ns {
        match unshare(CloneFlags::CLONE_NEWCGROUP) {
            // Kernels without cgroup namespaces.
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(e).context(|| "unshare(CLONE_NEWCGROUP)".into()),
        }
    }
    Ok(())
}
