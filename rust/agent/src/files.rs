//! File operations: whole-file read and atomic write, chunked streaming through
//! per-connection handles, list, stat, mkdir, remove, rename.
//!
//! Every write goes to a temporary file in the destination's directory and is renamed
//! over the destination only when complete, so readers see the old or the new content.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use tartarus_proto::{codes, FileInfo, FileKind, MAX_CHUNK_BYTES};

use crate::process::Failure;

/// Largest file `read_file` returns in one frame; larger files are streamed.
pub const MAX_READ_FILE_BYTES: u64 = 3 << 20;
/// Default and largest `list_dir` page.
const MAX_LIST_ENTRIES: u32 = 10_000;
/// Open handles per connection.
const MAX_HANDLES: usize = 64;

pub fn io_failure(context: &str, err: &io::Error) -> Failure {
    let code = match err.raw_os_error() {
        Some(libc::ENOENT) => codes::NOT_FOUND,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => codes::PERMISSION_DENIED,
        Some(libc::EEXIST) => codes::ALREADY_EXISTS,
        Some(libc::ENOTDIR) => codes::NOT_A_DIRECTORY,
        Some(libc::EISDIR) => codes::IS_A_DIRECTORY,
        Some(libc::ENOTEMPTY) => codes::NOT_EMPTY,
        Some(libc::EINVAL | libc::ENAMETOOLONG) => codes::INVALID_ARGUMENT,
        Some(libc::EFBIG) => codes::TOO_LARGE,
        _ if err.kind() == io::ErrorKind::InvalidInput => codes::INVALID_ARGUMENT,
        _ => codes::IO,
    };
    (code, format!("{context}: {err}"))
}

pub fn checked_path(path: &str) -> Result<&Path, Failure> {
    if path.is_empty() || path.contains('\0') {
        return Err((codes::INVALID_ARGUMENT, format!("invalid path {path:?}")));
    }
    Ok(Path::new(path))
}

fn info_of(path: &Path, meta: &fs::Metadata) -> FileInfo {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    FileInfo {
        path: path.to_string_lossy().into_owned(),
        name: path.file_name().map_or_else(
            || path.to_string_lossy().into_owned(),
            |n| n.to_string_lossy().into_owned(),
        ),
        kind,
        size: meta.len(),
        mode: meta.mode(),
        mtime,
    }
}

pub fn stat(path: &str) -> Result<FileInfo, Failure> {
    let p = checked_path(path)?;
    let meta = fs::symlink_metadata(p).map_err(|e| io_failure(path, &e))?;
    Ok(info_of(p, &meta))
}

pub fn list_dir(path: &str, limit: Option<u32>) -> Result<(Vec<FileInfo>, bool), Failure> {
    let p = checked_path(path)?;
    let limit = limit.unwrap_or(MAX_LIST_ENTRIES).min(MAX_LIST_ENTRIES) as usize;
    let mut entries = Vec::new();
    let mut truncated = false;
    for entry in fs::read_dir(p).map_err(|e| io_failure(path, &e))? {
        let entry = entry.map_err(|e| io_failure(path, &e))?;
        if entries.len() == limit {
            truncated = true;
            break;
        }
        let child = entry.path();
        // An entry removed while listing is skipped, not an error.
        if let Ok(meta) = fs::symlink_metadata(&child) {
            entries.push(info_of(&child, &meta));
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((entries, truncated))
}

pub fn read_file(path: &str, max_bytes: Option<u64>) -> Result<(Vec<u8>, u64), Failure> {
    use std::io::Read;
    let p = checked_path(path)?;
    let limit = max_bytes
        .unwrap_or(MAX_READ_FILE_BYTES)
        .min(MAX_READ_FILE_BYTES);
    let file = File::open(p).map_err(|e| io_failure(path, &e))?;
    let meta = file.metadata().map_err(|e| io_failure(path, &e))?;
    if meta.is_dir() {
        return Err((codes::IS_A_DIRECTORY, format!("{path} is a directory")));
    }
    let mut data = Vec::with_capacity(meta.len().min(limit) as usize);
    // Read one byte past the limit to tell "exactly the limit" from "larger".
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| io_failure(path, &e))?;
    if data.len() as u64 > limit {
        return Err((
            codes::TOO_LARGE,
            format!("{path} is larger than {limit} bytes; download it in chunks (open_read)"),
        ));
    }
    let size = data.len() as u64;
    Ok((data, size))
}

/// A temporary file beside `dest` that becomes `dest` on commit and disappears if
/// dropped uncommitted.
pub struct PendingWrite {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    mode: u32,
    committed: bool,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PendingWrite {
    pub fn create(path: &str, mode: u32, make_parents: bool) -> Result<Self, Failure> {
        let dest = checked_path(path)?.to_path_buf();
        let name = dest
            .file_name()
            .ok_or_else(|| (codes::INVALID_ARGUMENT, format!("{path} names no file")))?;
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if make_parents {
            fs::create_dir_all(&dir).map_err(|e| io_failure(&dir.to_string_lossy(), &e))?;
        }
        if dest.is_dir() {
            return Err((codes::IS_A_DIRECTORY, format!("{path} is a directory")));
        }
        let tmp = dir.join(format!(
            ".{}.tartarus-{}-{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| io_failure(path, &e))?;
        Ok(Self {
            file,
            tmp,
            dest,
            mode: mode & 0o7777,
            committed: false,
        })
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Failure> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| io_failure(&self.dest.to_string_lossy(), &e))
    }

    pub fn commit(mut self) -> Result<u64, Failure> {
        let context = self.dest.to_string_lossy().into_owned();
        let fail = |e: io::Error| io_failure(&context, &e);
        self.file.flush().map_err(fail)?;
        self.file
            .set_permissions(fs::Permissions::from_mode(self.mode))
            .map_err(fail)?;
        self.file.sync_all().map_err(fail)?;
        let size = self.file.metadata().map_err(fail)?.len();
        fs::rename(&self.tmp, &self.dest).map_err(fail)?;
        self.committed = true;
        Ok(size)
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

pub fn write_file(path: &str, data: &[u8], mode: u32, make_parents: bool) -> Result<(), Failure> {
    let pending = PendingWrite::create(path, mode, make_parents)?;
    pending.write_at(0, data)?;
    pending.commit().map(|_| ())
}

pub fn mkdir(path: &str, parents: bool, mode: u32) -> Result<(), Failure> {
    let p = checked_path(path)?;
    let mut builder = fs::DirBuilder::new();
    builder.recursive(parents).mode(mode & 0o7777);
    builder.create(p).map_err(|e| io_failure(path, &e))
}

pub fn remove(path: &str, recursive: bool) -> Result<(), Failure> {
    let p = checked_path(path)?;
    let meta = fs::symlink_metadata(p).map_err(|e| io_failure(path, &e))?;
    let result = match (meta.is_dir(), recursive) {
        (true, true) => fs::remove_dir_all(p),
        (true, false) => fs::remove_dir(p),
        (false, _) => fs::remove_file(p),
    };
    result.map_err(|e| io_failure(path, &e))
}

pub fn rename(src: &str, dst: &str) -> Result<(), Failure> {
    fs::rename(checked_path(src)?, checked_path(dst)?)
        .map_err(|e| io_failure(&format!("{src} -> {dst}"), &e))
}

pub enum Handle {
    Read { file: File, size: u64 },
    Write(PendingWrite),
}

/// A connection's open handles; dropping it discards uncommitted writes.
#[derive(Default)]
pub struct Handles {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Mutex<Option<Handle>>>>>,
}

impl Handles {
    fn insert(&self, handle: Handle) -> Result<u64, Failure> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= MAX_HANDLES {
            return Err((
                codes::BUSY,
                format!("{MAX_HANDLES} handles are open on this connection; close some"),
            ));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        open.insert(id, Arc::new(Mutex::new(Some(handle))));
        Ok(id)
    }

    fn get(&self, id: u64) -> Result<Arc<Mutex<Option<Handle>>>, Failure> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| (codes::NO_SUCH_HANDLE, format!("no open handle {id}")))
    }

    /// Closes a handle once any chunk being read or written through it is done; an
    /// uncommitted write's temporary file is gone when this returns.
    pub fn close(&self, id: u64) -> Result<(), Failure> {
        let slot = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .ok_or_else(|| (codes::NO_SUCH_HANDLE, format!("no open handle {id}")))?;
        let handle = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(handle);
        Ok(())
    }

    pub fn open_read(&self, path: &str) -> Result<(u64, u64, u32), Failure> {
        let p = checked_path(path)?;
        let file = File::open(p).map_err(|e| io_failure(path, &e))?;
        let meta = file.metadata().map_err(|e| io_failure(path, &e))?;
        if meta.is_dir() {
            return Err((codes::IS_A_DIRECTORY, format!("{path} is a directory")));
        }
        let size = meta.len();
        let id = self.insert(Handle::Read { file, size })?;
        Ok((id, size, meta.mode()))
    }

    pub fn open_write(&self, path: &str, mode: u32, make_parents: bool) -> Result<u64, Failure> {
        let pending = PendingWrite::create(path, mode, make_parents)?;
        self.insert(Handle::Write(pending))
    }

    /// Reads up to `length` bytes at `offset`; `eof` once the end (as of open) is reached.
    pub fn read_chunk(
        &self,
        id: u64,
        offset: u64,
        length: u32,
    ) -> Result<(Vec<u8>, bool), Failure> {
        let slot = self.get(id)?;
        let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Handle::Read { file, size }) = guard.as_ref() else {
            return Err((
                codes::INVALID_ARGUMENT,
                format!("handle {id} is not open for reading"),
            ));
        };
        let length = (length as usize).min(MAX_CHUNK_BYTES);
        let mut buf = vec![0u8; length];
        let mut filled = 0;
        while filled < length {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_failure(&format!("handle {id}"), &e)),
            }
        }
        buf.truncate(filled);
        let eof = filled < length || offset + filled as u64 >= *size;
        Ok((buf, eof))
    }

    pub fn write_chunk(&self, id: u64, offset: u64, data: &[u8]) -> Result<(), Failure> {
        let slot = self.get(id)?;
        let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(Handle::Write(pending)) => pending.write_at(offset, data),
            _ => Err((
                codes::INVALID_ARGUMENT,
                format!("handle {id} is not open for writing"),
            )),
        }
    }

    pub fn commit(&self, id: u64) -> Result<u64, Failure> {
        let slot = self.get(id)?;
        let handle = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.close(id)?;
        match handle {
            Some(Handle::Write(pending)) => pending.commit(),
            _ => Err((
                codes::INVALID_ARGUMENT,
                format!("handle {id} is not open for writing"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn atomic_write_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub/file.txt");
        write_file(s(&target), b"one", 0o640, true).unwrap();
        write_file(s(&target), b"two", 0o640, false).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o640);
        let names: Vec<_> = fs::read_dir(target.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn uncommitted_streams_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("big.bin");
        let handles = Handles::default();
        let id = handles.open_write(s(&target), 0o644, false).unwrap();
        handles.write_chunk(id, 3, b"def").unwrap();
        handles.write_chunk(id, 0, b"abc").unwrap();
        drop(handles);
        assert!(!target.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

        let handles = Handles::default();
        let id = handles.open_write(s(&target), 0o644, false).unwrap();
        handles.write_chunk(id, 3, b"def").unwrap();
        handles.write_chunk(id, 0, b"abc").unwrap();
        assert_eq!(handles.commit(id).unwrap(), 6);
        assert_eq!(fs::read(&target).unwrap(), b"abcdef");
        let rid = handles.open_read(s(&target)).unwrap().0;
        assert_eq!(
            handles.read_chunk(rid, 0, 4).unwrap(),
            (b"abcd".to_vec(), false)
        );
        assert_eq!(
            handles.read_chunk(rid, 4, 4).unwrap(),
            (b"ef".to_vec(), true)
        );
        assert!(handles.read_chunk(99, 0, 1).is_err());
    }

    #[test]
    fn errors_carry_codes() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert_eq!(stat(s(&missing)).unwrap_err().0, codes::NOT_FOUND);
        assert_eq!(
            read_file(s(dir.path()), None).unwrap_err().0,
            codes::IS_A_DIRECTORY
        );
        fs::write(dir.path().join("f"), b"x").unwrap();
        assert_eq!(
            remove(s(dir.path()), false).unwrap_err().0,
            codes::NOT_EMPTY
        );
        assert_eq!(
            read_file(s(&dir.path().join("f")), Some(0)).unwrap_err().0,
            codes::TOO_LARGE
        );
        assert_eq!(stat("").unwrap_err().0, codes::INVALID_ARGUMENT);
    }
}
