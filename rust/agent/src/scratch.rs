//! Lethe, guest side: the microVM's per-sandbox scratch disk, and the writable root built
//! on it.
//!
//! A microVM boots from the template's read-only ext4 image. When the kernel command line
//! names a scratch disk (`tartarus.scratch=/dev/vdb`), the agent (PID 1) mounts it and
//! makes an overlay root: the read-only root as the lower layer, upper and work
//! directories on the scratch disk. It moves the mounts it already has (/proc, /dev, ...)
//! into the overlay and pivots into it, so every write lands on the scratch disk, which the
//! host wipes when the sandbox ends. `tartarus.scratch_mode=mount:/path` only mounts the
//! disk at `/path`. Nothing here is fatal: on failure the agent says why on the console
//! and serves on the read-only root as before.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::cmdline::{Scratch, ScratchMode};

/// Where the scratch disk is mounted while the overlay is built: a directory every
/// template image has. After the pivot the mount is detached (the overlay keeps its own
/// reference) and /tmp is the overlay's.
const STAGING: &str = "/tmp";
const UPPER: &str = "/tmp/overlay/upper";
const WORK: &str = "/tmp/overlay/work";
const MERGED: &str = "/tmp/overlay/merged";

fn log(device: &str, message: &str) {
    eprintln!("tartarus-agent: scratch disk {device}: {message}");
}

/// Sets up the scratch disk as `scratch` asks, logging (never failing) when it cannot.
pub fn setup(scratch: &Scratch) {
    let device = scratch.device.as_str();
    match &scratch.mode {
        ScratchMode::Mount(path) => {
            if let Err(e) = fs::create_dir_all(path)
                .map_err(|e| format!("cannot create {path}: {e}"))
                .and_then(|()| mount_ext4(device, path))
            {
                log(device, &format!("{e}; it is not used"));
            }
        }
        ScratchMode::Overlay => overlay_root(device),
    }
}

fn mount_ext4(device: &str, target: &str) -> Result<(), String> {
    mount(
        Some(device),
        target,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("cannot mount it (ext4) on {target}: {e}"))
}

fn overlay_root(device: &str) {
    if let Err(e) = mount_ext4(device, STAGING) {
        log(
            device,
            &format!("{e}; / stays read-only and /tmp is a tmpfs"),
        );
        return;
    }
    let result = if overlay_supported() {
        pivot_into_overlay()
    } else {
        Err("this kernel has no overlayfs (CONFIG_OVERLAY_FS)".into())
    };
    if let Err(e) = result {
        // Still better than a tmpfs: /tmp is on the disk, not in guest memory.
        let _ = fs::remove_dir_all("/tmp/overlay");
        let _ = fs::set_permissions(STAGING, fs::Permissions::from_mode(0o1777));
        log(
            device,
            &format!("no overlay root: {e}; / stays read-only, /tmp is on the scratch disk"),
        );
    }
}

fn overlay_supported() -> bool {
    fs::read_to_string("/proc/filesystems").is_ok_and(|list| {
        list.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    })
}

/// Mounts the overlay on MERGED, moves the other mounts into it and makes it the root.
/// On failure, undoes what it did.
fn pivot_into_overlay() -> Result<(), String> {
    // MS_MOVE refuses mounts under a shared parent; the guest shares with no one.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make / private: {e}"))?;
    for dir in [UPPER, WORK, MERGED] {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    }
    let submounts = read_submounts()?;
    // `redirect_dir=on`: directories of the template can be renamed (else EXDEV).
    // `volatile`: no syncs to a disk that is thrown away when the sandbox ends.
    let options = format!("lowerdir=/,upperdir={UPPER},workdir={WORK},redirect_dir=on,volatile");
    mount(
        Some("overlay"),
        MERGED,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| format!("cannot mount the overlay: {e}"))?;
    let mut moved: Vec<&str> = Vec::new();
    let result = submounts
        .iter()
        .try_for_each(|mp| {
            move_mount(mp, &format!("{MERGED}{mp}"))?;
            moved.push(mp);
            Ok(())
        })
        .and_then(|()| pivot(MERGED));
    if result.is_err() {
        let _ = nix::unistd::chdir("/");
        for mp in moved.iter().rev() {
            let _ = move_mount(&format!("{MERGED}{mp}"), mp);
        }
        let _ = umount2(MERGED, MntFlags::MNT_DETACH);
    }
    result
}

fn move_mount(from: &str, to: &str) -> Result<(), String> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("cannot move the mount on {from} to {to}: {e}"))
}

/// `new_root` becomes `/`; the old root, stacked on it by `pivot_root(".", ".")`, is
/// detached (the overlay holds its own reference to its lower layer). Fails only before
/// the pivot: after it there is no going back.
fn pivot(new_root: &str) -> Result<(), String> {
    nix::unistd::chdir(new_root).map_err(|e| format!("cannot enter {new_root}: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    if let Err(e) = umount2(".", MntFlags::MNT_DETACH) {
        eprintln!("tartarus-agent: cannot detach the old root after pivot_root: {e}");
    }
    if let Err(e) = nix::unistd::chdir("/") {
        eprintln!("tartarus-agent: cannot enter the new root: {e}");
    }
    Ok(())
}

fn read_submounts() -> Result<Vec<String>, String> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    Ok(top_level_submounts(&text, STAGING))
}

/// The mount points to move into the new root: every mount below `/` except `staging` and
/// what is under it, outermost only (moving a mount moves the mounts beneath it).
fn top_level_submounts(mountinfo: &str, staging: &str) -> Vec<String> {
    let points: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .filter(|mp| mp != "/" && !is_within(mp, staging))
        .collect();
    let mut top: Vec<String> = Vec::new();
    for mp in &points {
        let nested = points.iter().any(|p| p != mp && is_within(mp, p));
        if !nested && !top.contains(mp) {
            top.push(mp.clone());
        }
    }
    top
}

/// `path` is `dir` or below it.
fn is_within(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and tab, newline, backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / ro,relatime - ext4 /dev/vda ro
23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw
24 22 0:20 / /proc rw,nosuid,nodev,noexec - proc proc rw
25 23 0:21 / /dev/pts rw,nosuid,noexec - devpts devpts rw
26 22 0:22 / /.tartarus/run rw - tmpfs tmpfs rw
27 22 254:16 / /tmp rw - ext4 /dev/vdb rw
28 27 0:23 / /tmp/overlay/merged rw - overlay overlay rw
29 22 0:24 / /my\\040dir rw - tmpfs tmpfs rw
30 22 0:25 / /tmpfoo rw - tmpfs tmpfs rw
31 24 0:26 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw
";

    #[test]
    fn moves_the_outermost_mounts_except_the_staging_area() {
        assert_eq!(
            top_level_submounts(MOUNTINFO, "/tmp"),
            vec!["/dev", "/proc", "/.tartarus/run", "/my dir", "/tmpfoo"]
        );
    }

    #[test]
    fn stacked_mounts_are_moved_once() {
        let info = "1 0 0:1 / / rw - ext4 x rw\n2 1 0:2 / /dev rw - tmpfs x rw\n\
                    3 2 0:3 / /dev rw - devtmpfs x rw\n";
        assert_eq!(top_level_submounts(info, "/tmp"), vec!["/dev"]);
        assert!(top_level_submounts("", "/tmp").is_empty());
        assert!(top_level_submounts("garbage\n\n", "/tmp").is_empty());
    }

    #[test]
    fn unescapes_octal_and_keeps_the_rest() {
        assert_eq!(unescape("/a\\040b\\011c\\012d\\134e"), "/a b\tc\nd\\e");
        assert_eq!(unescape("/a\\09b\\"), "/a\\09b\\");
        assert_eq!(unescape("/a\\04"), "/a\\04");
    }

    #[test]
    fn within() {
        assert!(is_within("/tmp", "/tmp"));
        assert!(is_within("/tmp/a", "/tmp"));
        assert!(!is_within("/tmpfoo", "/tmp"));
        assert!(!is_within("/", "/tmp"));
    }
}
