"""A file's identity, for caches of what was derived from its contents (a digest, a
compiled module, a verified snapshot): a file replaced, or rewritten in place, gets a
new one."""

from __future__ import annotations

from pathlib import Path

# (path, inode, size, mtime in ns)
FileIdentity = tuple[str, int, int, int]


def file_identity(path: Path) -> FileIdentity:
    """Raises OSError when the file cannot be stat'ed."""
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
