//! The jail's filesystem: an overlay of the read-only template rootfs with a tmpfs
//! upper layer, minimal /dev, a fresh /proc with the dangerous knobs masked, a private
//! /tmp, bind mounts from the host, and finally `pivot_root` into it.
//!
//! Everything here runs in a private mount namespace, so nothing is visible to (or left
//! behind on) the host: when the last process of the jail exits, the mounts go too.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, pivot_root};

use crate::{Context, JailError, Result};

const NONE: Option<&str> = None;

/// Stops mount events propagating back to the host.
pub fn make_private() -> Result<()> {
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
        .context(|| "making / a private mount tree".into())
}

/// How the writable layer was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scratch {
    /// overlayfs: the whole tree is writable, writes land in tmpfs.
    Overlay,
    /// The kernel refused overlayfs: read-only bind of the rootfs, tmpfs on the usual
    /// writable directories.
    ReadOnlyBind,
}

/// Builds the jail root under `work_dir`: tmpfs of `size_mib` holding the overlay's
/// upper and work dirs, and the overlay itself at `work_dir/root`.
pub fn prepare_root(rootfs: &Path, work_dir: &Path, size_mib: u64) -> Result<(PathBuf, Scratch)> {
    let opts = format!("size={size_mib}m,mode=0755");
    mount(
        Some("tartarus-scratch"),
        work_dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .context(|| format!("mounting scratch tmpfs on {}", work_dir.display()))?;
    let upper = work_dir.join("upper");
    let work = work_dir.join("work");
    let root = work_dir.join("root");
    for d in [&upper, &work, &root] {
        fs::create_dir(d).context(|| format!("creating {}", d.display()))?;
    }
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o755))
        .context(|| "chmod upper".into())?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        escape_overlay(rootfs),
        escape_overlay(&upper),
        escape_overlay(&work)
    );
    if mount(
        Some("tartarus-root"),
        &root,
        Some("overlay"),
        MsFlags::MS_NOSUID,
        Some(data.as_str()),
    )
    .is_ok()
    {
        return Ok((root, Scratch::Overlay));
    }
    bind(rootfs, &root, true)?;
    for dir in ["tmp", "root", "home", "var/tmp", "run"] {
        let target = root.join(dir);
        if target.is_dir() {
            mount_tmpfs(&target, "mode=1777")?;
        }
    }
    Ok((root, Scratch::ReadOnlyBind))
}

/// An empty root for a jail that needs no rootfs (the VMM's): a small tmpfs on
/// `mountpoint`, visible only in this mount namespace. Bind what the jail needs into
/// it with [`bind_inside`], then [`pivot_into`] it and [`seal_root`].
pub fn prepare_empty_root(mountpoint: &Path, size_kib: u64) -> Result<PathBuf> {
    fs::create_dir_all(mountpoint).context(|| format!("creating {}", mountpoint.display()))?;
    let opts = format!("size={size_kib}k,mode=0755");
    mount(
        Some("tartarus-root"),
        mountpoint,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(opts.as_str()),
    )
    .context(|| format!("mounting the jail root on {}", mountpoint.display()))?;
    // bind_inside compares resolved paths against the root: hand out the resolved one.
    fs::canonicalize(mountpoint).context(|| format!("resolving {}", mountpoint.display()))
}

/// Makes the (already pivoted) root filesystem read-only; bind mounts below it keep
/// their own flags.
pub fn seal_root() -> Result<()> {
    mount(
        NONE,
        "/",
        NONE,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        NONE,
    )
    .context(|| "remounting / read-only".into())
}

/// overlayfs option values treat `,` and `:` as separators.
fn escape_overlay(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(':', "\\:")
}

fn mount_tmpfs(target: &Path, opts: &str) -> Result<()> {
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts),
    )
    .context(|| format!("mounting tmpfs on {}", target.display()))
}

/// Bind-mounts `source` on `target` (created as a file or directory to match).
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<()> {
    if !target.exists() {
        if source.is_dir() {
            fs::create_dir_all(target)
        } else {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
            }
            fs::write(target, b"")
        }
        .context(|| format!("creating mount point {}", target.display()))?;
    }
    mount(
        Some(source),
        target,
        NONE,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        NONE,
    )
    .context(|| format!("binding {} on {}", source.display(), target.display()))?;
    if readonly {
        remount_readonly(target)?;
    }
    Ok(())
}

/// Bind-mounts a host path at `destination` (absolute, inside the jail `root`),
/// refusing a destination that a symlink in the rootfs steers outside `root`.
pub fn bind_inside(root: &Path, source: &Path, destination: &str, readonly: bool) -> Result<()> {
    let target = root.join(destination.trim_start_matches('/'));
    let parent = target.parent().unwrap_or(root);
    fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    let real = fs::canonicalize(parent).context(|| format!("resolving {}", parent.display()))?;
    if !real.starts_with(root) || fs::symlink_metadata(&target).is_ok_and(|m| m.is_symlink()) {
        return Err(JailError::Config(format!(
            "mount destination {destination} resolves outside the jail ({})",
            real.display()
        )));
    }
    bind(source, &target, readonly)
}

/// Remounts a bind mount read-only, keeping the flags the kernel locked on it (a user
/// namespace may not clear nosuid/nodev/noexec inherited from the host).
pub fn remount_readonly(target: &Path) -> Result<()> {
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Ok(st) = statvfs(target) {
        let f = st.flags();
        for (fs_flag, ms_flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if f.contains(fs_flag) {
                flags |= ms_flag;
            }
        }
    }
    mount(NONE, target, NONE, flags, NONE)
        .context(|| format!("remounting {} read-only", target.display()))
}

/// Mounts /proc, a minimal /dev, /dev/pts, /dev/shm and /tmp inside `root`.
pub fn mount_system(root: &Path, in_user_namespace: bool) -> Result<()> {
    let proc_dir = root.join("proc");
    fs::create_dir_all(&proc_dir).context(|| "creating /proc".into())?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        NONE,
    )
    .context(|| "mounting /proc".into())?;
    mask_proc(&proc_dir)?;

    let dev = root.join("dev");
    fs::create_dir_all(&dev).context(|| "creating /dev".into())?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .context(|| "mounting /dev".into())?;
    // Device nodes cannot be created in a user namespace; bind the host's harmless ones.
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(node);
        if host.exists() {
            bind(&host, &dev.join(node), false)?;
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        symlink(target, dev.join(link)).context(|| format!("linking /dev/{link}"))?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts).context(|| "creating /dev/pts".into())?;
    // gid=5 (tty) only exists when the group map covers it.
    let pts_opts = if in_user_namespace {
        "newinstance,ptmxmode=0666,mode=0620"
    } else {
        "newinstance,ptmxmode=0666,mode=0620,gid=5"
    };
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(pts_opts),
    )
    .context(|| "mounting /dev/pts".into())?;
    let shm = dev.join("shm");
    fs::create_dir(&shm).context(|| "creating /dev/shm".into())?;
    mount_tmpfs(&shm, "mode=1777,size=64m")?;

    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).context(|| "creating /tmp".into())?;
    mount_tmpfs(&tmp, "mode=1777")
}

/// Makes the kernel knobs under /proc read-only and hides the files that leak host
/// state: a jailed root must not set `kernel.core_pattern` or trigger sysrq.
fn mask_proc(proc_dir: &Path) -> Result<()> {
    for ro in ["sys", "sysrq-trigger", "irq", "bus", "fs"] {
        let p = proc_dir.join(ro);
        if p.exists() {
            bind(&p, &p, true)?;
        }
    }
    for hidden in ["kcore", "keys", "timer_list", "sched_debug", "kallsyms"] {
        let p = proc_dir.join(hidden);
        if p.exists() {
            mount(Some("/dev/null"), &p, NONE, MsFlags::MS_BIND, NONE)
                .context(|| format!("masking /proc/{hidden}"))?;
        }
    }
    Ok(())
}

/// Makes `root` the root filesystem of this mount namespace and detaches the old one,
/// so no path leads back to the host.
pub fn pivot_into(root: &Path) -> Result<()> {
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(root),
        root,
        NONE,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        NONE,
    )
    .context(|| format!("binding {} on itself", root.display()))?;
    chdir(root).context(|| format!("chdir {}", root.display()))?;
    // Stack the old root on the new one, then detach it: no directory for it needed.
    pivot_root(".", ".").context(|| format!("pivot_root into {}", root.display()))?;
    umount2(".", MntFlags::MNT_DETACH).context(|| "detaching the old root".into())?;
    chdir("/").context(|| "chdir /".into())
}
