//! PID-1 duties for `--init`: the file systems a bare rootfs lacks (and the microVM's
//! scratch disk), and a clean exit.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::{cmdline, scratch};

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
        eprintln!("tartarus-agent: mount {fstype} on {target}: {e}");
    }
}

/// Mounts /proc, /dev (devtmpfs, or a tmpfs with the basic nodes), /dev/pts, /dev/shm
/// and /tmp where they are missing. Each is skipped when already present, except /tmp
/// where it cannot be written. In between, sets up the scratch disk that the kernel
/// command line (read from `kernel_cmdline`) names, if any: it needs /proc and /dev, and
/// the overlay root it makes has a writable /tmp.
pub fn setup_filesystems(kernel_cmdline: &Path) {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !Path::new("/proc/self").exists() {
        mount_fs("proc", "/proc", "proc", nosuid_nodev, None);
    }
    if !Path::new("/dev/null").exists() {
        let _ = std::fs::create_dir_all("/dev");
        if mount(
            Some("devtmpfs"),
            "/dev",
            Some("devtmpfs"),
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )
        .is_err()
        {
            mount_fs(
                "tmpfs",
                "/dev",
                "tmpfs",
                MsFlags::MS_NOSUID,
                Some("mode=0755"),
            );
            make_device_nodes();
        }
    }
    setup_scratch(kernel_cmdline);
    if !Path::new("/dev/pts/ptmx").exists() {
        mount_fs(
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        );
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    if !Path::new("/dev/shm").exists() {
        mount_fs(
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            nosuid_nodev,
            Some("mode=1777"),
        );
    }
    // A microVM without a usable scratch disk runs on the read-only root image: /tmp
    // exists there but cannot be written, so it gets a tmpfs like a missing one.
    if !Path::new("/tmp").exists() || is_read_only("/tmp") {
        mount_fs(
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        );
    }
}

fn is_read_only(path: &str) -> bool {
    nix::sys::statvfs::statvfs(path)
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

fn setup_scratch(kernel_cmdline: &Path) {
    let text = match std::fs::read_to_string(kernel_cmdline) {
        Ok(text) => text,
        Err(e) => {
            eprintln!(
                "tartarus-agent: cannot read the kernel command line {}: {e}; no scratch disk",
                kernel_cmdline.display()
            );
            return;
        }
    };
    match cmdline::scratch(&text) {
        Ok(Some(scratch)) => scratch::setup(&scratch),
        Ok(None) => {}
        Err(e) => eprintln!("tartarus-agent: {e}; the scratch disk is not used"),
    }
}

fn make_device_nodes() {
    let nodes = [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ];
    for (path, major, minor) in nodes {
        if let Err(e) = mknod(
            path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        ) {
            eprintln!("tartarus-agent: mknod {path}: {e}");
        }
    }
}

/// Inode of the kernel's initial PID namespace (`PROC_PID_INIT_INO`), a fixed constant.
const INITIAL_PID_NS: &str = "pid:[4026531836]";

/// Ends the sandbox after a shutdown. As the real init of a VM, reboots it: with
/// `reboot=k` the kernel pulses the i8042 reset line, which the VMM takes as the end of
/// the guest. (A power-off has no ACPI to act on here: it returns, init exits, and the
/// kernel panics before resetting, which the host could not tell from a crash.) As the init of a PID namespace (jail, gVisor),
/// returning and exiting ends the namespace cleanly.
pub fn power_off() {
    nix::unistd::sync();
    let in_initial_ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|l| l.as_os_str() == INITIAL_PID_NS)
        .unwrap_or(false);
    if nix::unistd::getpid().as_raw() == 1 && in_initial_ns {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    }
}
