//! File system helpers of the store: canonical metadata, atomic publication, removal of
//! read-only trees, free space, hashing a file or a NAR stream. The build service
//! ([`crate::builds::outputs`]) uses the canonical-metadata helpers too, so that built
//! outputs and imported paths get exactly the same form.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use nixbuild_core::hash::{Hash, HashAlgo, Hasher};
use rustix::fs::{AtFlags, Mode, RenameFlags, Timespec, Timestamps, CWD, UTIME_OMIT};

use super::error::{io_err, StoreError};

/// Size of the pieces files are read and written in.
pub(crate) const CHUNK: usize = 64 * 1024;

/// The modification time of every file and directory in the store, as in Nix.
const CANONICAL_MTIME: i64 = 1;

/// Sets the mode and the canonical mtime of a file or directory (never a symlink).
pub(crate) fn canonicalise(path: &Path, mode: u32) -> Result<(), StoreError> {
    rustix::fs::chmod(path, Mode::from_raw_mode(mode))
        .map_err(|e| io_err("chmod", path)(e.into()))?;
    set_canonical_mtime(path)
}

/// Sets the canonical mtime of `path`, not following a symlink (whose own time does not
/// matter to Nix), leaving the access time alone.
pub(crate) fn set_canonical_mtime(path: &Path) -> Result<(), StoreError> {
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: CANONICAL_MTIME,
            tv_nsec: 0,
        },
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_err("set mtime of", path)(e.into()))
}

/// Renames `from` to `to`, failing if `to` exists (never replacing an object).
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> Result<(), StoreError> {
    rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE)
        .map_err(|e| io_err("publish", to)(e.into()))
}

/// Removes a file, symlink or whole tree, including read-only (0555) directories. A missing
/// path is not an error.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    match fs::remove_dir_all(path) {
        // Without CAP_DAC_OVERRIDE, entries of a 0555 directory cannot be unlinked.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path)?;
            fs::remove_dir_all(path)
        }
        other => other,
    }
}

fn make_dirs_writable(dir: &Path) -> io::Result<()> {
    rustix::fs::chmod(dir, Mode::from_raw_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_dirs_writable(&entry.path())?;
        }
    }
    Ok(())
}

/// What is free on a file system.
pub(super) struct Free {
    /// Bytes available to unprivileged users.
    pub(super) bytes: u64,
    /// Inodes available to unprivileged users; `None` on file systems without a fixed
    /// number of inodes (they report zero in total, e.g. btrfs).
    pub(super) inodes: Option<u64>,
}

/// What is free on the file system holding `path`.
pub(super) fn free_space(path: &Path) -> Result<Free, StoreError> {
    let st = rustix::fs::statvfs(path).map_err(|e| io_err("statvfs", path)(e.into()))?;
    Ok(Free {
        bytes: st.f_bavail.saturating_mul(st.f_frsize),
        inodes: (st.f_files > 0).then_some(st.f_favail),
    })
}

/// Hashes a regular file's contents in chunks.
pub(crate) fn hash_file(path: &Path, algo: HashAlgo) -> Result<Hash, StoreError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Hasher::new(algo);
    let mut buf = vec![0; CHUNK];
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// A writer that only hashes and counts what it is given.
pub(super) struct HashingWriter {
    hasher: Hasher,
    size: u64,
}

impl HashingWriter {
    /// A writer hashing with `algo`.
    pub(super) fn new(algo: HashAlgo) -> HashingWriter {
        HashingWriter {
            hasher: Hasher::new(algo),
            size: 0,
        }
    }

    /// The hash and byte count of everything written.
    pub(super) fn finish(self) -> (Hash, u64) {
        (self.hasher.finish(), self.size)
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
