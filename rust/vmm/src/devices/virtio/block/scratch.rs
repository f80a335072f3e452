//! Lethe: per-sandbox scratch disks that are forgotten when the sandbox ends.
//!
//! A scratch disk is a sparse file created exclusively (mode 0600) for one microVM. When
//! the [`ScratchDisk`] is dropped (the VMM exits) the file is removed; with
//! [`Wipe::Shred`] every allocated extent is first overwritten with zeros and synced, so
//! the data does not survive in freed blocks of the host filesystem.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tartarus_vmm_api::config::Wipe;

/// A scratch disk file that removes itself on drop.
#[derive(Debug)]
pub struct ScratchDisk {
    path: PathBuf,
    wipe: Wipe,
    disposed: bool,
}

impl ScratchDisk {
    /// Creates a sparse `size_bytes` file at `path`; fails if it already exists.
    pub fn create(path: &Path, size_bytes: u64, wipe: Wipe) -> io::Result<Self> {
        if size_bytes == 0 || size_bytes % 512 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("scratch disk size {size_bytes} is not a positive multiple of 512"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(size_bytes)?;
        Ok(ScratchDisk {
            path: path.to_path_buf(),
            wipe,
            disposed: false,
        })
    }

    /// Takes charge of an existing disk file (e.g. one the host pre-formatted) so it is
    /// wiped and removed like a created one.
    pub fn adopt(path: &Path, wipe: Wipe) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("scratch disk {} is not a regular file", path.display()),
            ));
        }
        Ok(ScratchDisk {
            path: path.to_path_buf(),
            wipe,
            disposed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wipes and removes the disk now, reporting errors (drop does the same silently).
    pub fn dispose(mut self) -> io::Result<()> {
        self.disposed = true;
        dispose_file(&self.path, self.wipe)
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        if !self.disposed {
            let _ = dispose_file(&self.path, self.wipe);
        }
    }
}

/// Wipes (per `wipe`) and removes `path`. A missing file is already forgotten.
pub fn dispose_file(path: &Path, wipe: Wipe) -> io::Result<()> {
    if wipe == Wipe::Shred {
        match OpenOptions::new().write(true).open(path) {
            Ok(file) => shred(&file)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Overwrites every data extent (holes are skipped: they hold nothing) with zeros.
fn shred(file: &File) -> io::Result<()> {
    let len = file.metadata()?.len();
    let zeros = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = start;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    file.sync_all()
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` when there is no more data (ENXIO).
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek on a file descriptor we own; it does not touch memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn tmpdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tartarus-lethe-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rand_suffix() -> u64 {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn scratch_is_sparse_private_and_removed_on_drop() {
        let dir = tmpdir();
        let path = dir.join("scratch.img");
        {
            let disk = ScratchDisk::create(&path, 64 << 20, Wipe::Unlink).unwrap();
            let meta = std::fs::metadata(disk.path()).unwrap();
            assert_eq!(meta.len(), 64 << 20);
            use std::os::unix::fs::MetadataExt;
            assert_eq!(meta.mode() & 0o777, 0o600);
            assert!(meta.blocks() * 512 < 1 << 20, "file should be sparse");
            // A second disk at the same path is refused rather than reused.
            assert!(ScratchDisk::create(&path, 4096, Wipe::Unlink).is_err());
        }
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn shred_zeroes_data_before_removal() {
        let dir = tmpdir();
        let path = dir.join("scratch.img");
        let disk = ScratchDisk::create(&path, 8 << 20, Wipe::Shred).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"secret", 4 << 20).unwrap();
        drop(f);
        // Keep a handle to the inode to observe what was left in it.
        let mut keep = File::open(&path).unwrap();
        disk.dispose().unwrap();
        assert!(!path.exists());
        let mut content = Vec::new();
        keep.read_to_end(&mut content).unwrap();
        assert!(!content.windows(6).any(|w| w == b"secret"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn adopted_disks_are_removed_and_symlinks_refused() {
        let dir = tmpdir();
        let path = dir.join("formatted.img");
        std::fs::write(&path, b"ext4 would be here").unwrap();
        drop(ScratchDisk::adopt(&path, Wipe::Shred).unwrap());
        assert!(!path.exists());
        let link = dir.join("link");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert!(ScratchDisk::adopt(&link, Wipe::Unlink).is_err());
        assert!(std::fs::metadata("/etc/passwd").is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dir = tmpdir();
        assert!(ScratchDisk::create(&dir.join("a"), 0, Wipe::Unlink).is_err());
        assert!(ScratchDisk::create(&dir.join("b"), 1000, Wipe::Unlink).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn disposing_a_missing_file_is_fine() {
        let dir = tmpdir();
        dispose_file(&dir.join("gone"), Wipe::Shred).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
