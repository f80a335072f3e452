//! Named network namespaces as `ip netns add` makes them (the namespace bind-mounted at
//! `<dir>/<name>`, `<dir>` a shared mount so other mount namespaces see it), made in
//! this process: one sandbox's namespace costs ~1 ms here, against ~5 ms for the two
//! `ip` processes (`netns add`, then `link set lo up` inside it) it replaces.
//!
//! The namespace is entered by a thread of its own, which ends once the namespace is
//! mounted: no other thread of the caller changes namespace.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Directories already made shared mount points by this process.
static SHARED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Makes `<dir>/<name>` a new network namespace with its loopback up. Fails if the
/// name is taken.
pub fn create(dir: &Path, name: &str) -> io::Result<()> {
    let path = dir.join(checked(name)?);
    make_shared(dir)?;
    // Created first, as the mount point: an existing name is an error, never reused.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
        .map_err(|e| with_path(e, "create", &path))?;
    let target = path.clone();
    if let Err(e) = on_own_thread("netns", move || enter_new_and_mount(&target)) {
        let _ = umount2(&path, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(())
}

/// Unmounts and removes `<dir>/<name>`; the namespace goes once nothing else holds it.
/// Returns whether it was there.
pub fn remove(dir: &Path, name: &str) -> io::Result<bool> {
    let path = dir.join(checked(name)?);
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a half-made namespace); ENOENT: gone already.
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(with_path(e.into(), "unmount", &path)),
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(with_path(e, "remove", &path)),
    }
}

fn checked(name: &str) -> io::Result<&str> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0']);
    if plain {
        Ok(name)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a namespace name (one path component)"),
        ))
    }
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    context(e, &format!("cannot {what} {}", path.display()))
}

/// `e` with what was being done in front of its message (its kind kept).
pub(crate) fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Runs `work` on a thread of its own and returns what it did: work that changes the
/// thread's namespaces must not run on a thread the caller keeps.
pub(crate) fn on_own_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .map_err(|e| context(e, &format!("cannot start a {name} thread")))?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other(format!("the {name} thread panicked"))))
}

/// As `ip netns` does: `dir` becomes a mount point (bound on itself) with shared
/// propagation, so a namespace mounted in it later shows in every mount namespace.
fn make_shared(dir: &Path) -> io::Result<()> {
    let mut done = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if done.iter().any(|d| d == dir) {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| with_path(e, "create", dir))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, dir, None::<&str>, shared, None::<&str>) {
        Ok(()) => {}
        Err(nix::Error::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| with_path(e.into(), "bind-mount", dir))?;
            mount(None::<&str>, dir, None::<&str>, shared, None::<&str>)
                .map_err(|e| with_path(e.into(), "share", dir))?;
        }
        Err(e) => return Err(with_path(e.into(), "share", dir)),
    }
    done.push(dir.to_path_buf());
    Ok(())
}

/// Runs on its own thread: moves it into a new network namespace, mounts that on
/// `target` and brings its loopback up.
fn enter_new_and_mount(target: &Path) -> io::Result<()> {
    unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("cannot make a network namespace: {e}")))?;
    mount(
        Some("/proc/thread-self/ns/net"),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| with_path(e.into(), "mount the namespace on", target))?;
    loopback_up()
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) takes plain integers; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and own alone.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = CString::new("lo").expect("no NUL in a literal");
    for (dst, src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `request`,
    // which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the flags member is the one SIOCGIFFLAGS just filled in.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `request`, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn names_must_be_one_component() {
        for bad in ["", ".", "..", "a/b", "a\0b", &"x".repeat(256)] {
            let err = create(Path::new("/nonexistent"), bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    #[ignore = "needs root; makes and mounts a network namespace"]
    fn create_then_remove() {
        assert!(root(), "run as root");
        let dir = std::env::temp_dir().join(format!("netns-test-{}", std::process::id()));
        let name = "tt-netns-test";
        create(&dir, name).unwrap();
        let ours = fs::read_link("/proc/self/ns/net").unwrap();
        let made = dir.join(name);
        // A namespace of its own, not ours.
        let file = fs::File::open(&made).unwrap();
        let theirs = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        assert_ne!(ours, theirs);
        drop(file);
        // The name is taken now.
        assert_eq!(
            create(&dir, name).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert!(remove(&dir, name).unwrap());
        assert!(!remove(&dir, name).unwrap());
        let _ = umount2(&dir, MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&dir);
    }
}
