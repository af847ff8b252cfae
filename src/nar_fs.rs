//! Serialising a file system tree as a canonical NAR, streaming through the core
//! [`nixbuild_core::nar::NarWriter`]: file contents are read in chunks and never held whole in
//! memory. The walk is shared by every output; a [`NarSink`] may move regular files'
//! contents to the output itself (the daemon splices them into the client's pipe).

use nixbuild_core::nar::{NarWriteError, NarWriter};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Size of the pieces files are read in, and of the output buffer.
pub const CHUNK: usize = 256 * 1024;

std::thread_local! {
    /// The output buffer of the last dump on this thread, kept for the next: the store's
    /// exports run one path after another on the same few blocking threads, and a fresh
    /// buffer of this size costs page faults on every path.
    static BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Why a path could not be dumped. Every variant names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum NarFsError {
    /// Reading the tree or writing the output failed.
    #[error("{path}: {source}")]
    Io {
        /// The path being read (or dumped, for output errors).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file that is not a regular file, directory or symlink (a socket, a device, ...).
    #[error("{path}: cannot be put in a NAR: not a regular file, directory or symlink")]
    UnsupportedType {
        /// The offending path.
        path: PathBuf,
    },
    /// A file whose size changed while it was read.
    #[error("{path}: file changed size while being read (expected {expected} bytes)")]
    Changed {
        /// The file.
        path: PathBuf,
        /// Its size when the dump started.
        expected: u64,
    },
    /// The tree cannot be represented as a NAR (a name or target the format forbids, or
    /// nesting too deep).
    #[error("{path}: {source}")]
    Nar {
        /// The offending path.
        path: PathBuf,
        /// What the writer refused.
        source: NarWriteError,
    },
}

/// Where [`dump_to`] writes a NAR: it takes the dumper's buffer when full (and may keep it,
/// giving back another), and may also take regular files' contents straight from the file,
/// without the dumper reading them.
///
/// The dumper reads files' contents straight into its buffer, after the NAR framing, so a
/// sink that keeps the buffer moves the bytes on without any copy in user space.
pub trait NarSink {
    /// Writes out all of `buf` and leaves `buf` empty: cleared, or swapped for another
    /// buffer (with room for at least [`CHUNK`] bytes, to avoid a reallocation).
    fn write_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()>;

    /// Whether to offer a file of `size` bytes to [`NarSink::send_file`]; before the offer,
    /// the dumper writes out all the NAR bytes it holds. By default, never.
    fn takes_file(&self, _size: u64) -> bool {
        false
    }

    /// Writes up to `size` bytes of `file`, from its current offset, to the output, and
    /// returns how many; the dumper reads and writes the rest itself.
    fn send_file(&mut self, _file: &File, _size: u64) -> io::Result<u64> {
        Ok(0)
    }
}

/// A plain `io::Write` as a [`NarSink`] that takes no files: the buffer is written out and
/// cleared.
pub struct Plain<W>(pub W);

impl<W: Write> NarSink for Plain<W> {
    fn write_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        self.0.write_all(buf)?;
        buf.clear();
        Ok(())
    }
}

/// Writes the canonical NAR of the tree at `path` (not following a symlink at `path` itself)
/// to `out`, and returns its size in bytes.
pub fn dump_path(path: &Path, out: &mut impl Write) -> Result<u64, NarFsError> {
    dump_to(path, &mut Plain(out))
}

/// [`dump_path`] into a [`NarSink`], which may move files' contents itself.
pub fn dump_to(path: &Path, out: &mut (impl NarSink + ?Sized)) -> Result<u64, NarFsError> {
    let mut buf = BUFFER.take();
    buf.clear();
    buf.reserve(CHUNK);
    let mut dumper = Dumper {
        writer: NarWriter::new(),
        buf,
        written: 0,
        root: path,
        out,
    };
    let result = dumper.node(path).and_then(|()| dumper.flush());
    let written = dumper.written;
    BUFFER.set(dumper.buf);
    result.map(|()| written)
}

struct Dumper<'a, W: NarSink + ?Sized> {
    writer: NarWriter,
    /// NAR bytes not yet written to `out`.
    buf: Vec<u8>,
    written: u64,
    root: &'a Path,
    out: &'a mut W,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NarFsError + '_ {
    move |source| NarFsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn nar_err(path: &Path) -> impl FnOnce(NarWriteError) -> NarFsError + '_ {
    move |source| NarFsError::Nar {
        path: path.to_owned(),
        source,
    }
}

impl<W: NarSink + ?Sized> Dumper<'_, W> {
    fn flush(&mut self) -> Result<(), NarFsError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let len = self.buf.len() as u64;
        self.out
            .write_buffer(&mut self.buf)
            .map_err(io_err(self.root))?;
        self.written += len;
        Ok(())
    }

    fn flush_if_full(&mut self) -> Result<(), NarFsError> {
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn node(&mut self, path: &Path) -> Result<(), NarFsError> {
        let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
        let ty = meta.file_type();
        if ty.is_file() {
            let executable = meta.permissions().mode() & 0o100 != 0;
            self.file(path, executable, meta.len())?;
        } else if ty.is_symlink() {
            let target = fs::read_link(path).map_err(io_err(path))?;
            self.writer
                .symlink(target.as_os_str().as_bytes(), &mut self.buf)
                .map_err(nar_err(path))?;
        } else if ty.is_dir() {
            self.directory(path)?;
        } else {
            return Err(NarFsError::UnsupportedType {
                path: path.to_owned(),
            });
        }
        self.writer.end(&mut self.buf).map_err(nar_err(path))?;
        self.flush_if_full()
    }

    fn file(&mut self, path: &Path, executable: bool, size: u64) -> Result<(), NarFsError> {
        let mut file = File::open(path).map_err(io_err(path))?;
        self.writer
            .file(executable, size, &mut self.buf)
            .map_err(nar_err(path))?;
        let changed = || NarFsError::Changed {
            path: path.to_owned(),
            expected: size,
        };
        let mut left = size;
        if self.out.takes_file(size) {
            self.flush()?;
            let sent = self.out.send_file(&file, size).map_err(io_err(path))?;
            self.writer
                .contents_written_elsewhere(sent)
                .map_err(nar_err(path))?;
            self.written += sent;
            left -= sent;
        }
        while left > 0 {
            self.flush_if_full()?;
            // The contents are read straight into the buffer, after the framing: as much
            // as it has room for (a file that grew shows as more than `left`).
            self.buf.reserve(CHUNK - self.buf.len());
            let n = read_into(&file, &mut self.buf).map_err(io_err(path))? as u64;
            if n == 0 || n > left {
                return Err(changed());
            }
            self.writer
                .contents_written_elsewhere(n)
                .map_err(nar_err(path))?;
            left -= n;
        }
        if file.read(&mut [0]).map_err(io_err(path))? != 0 {
            return Err(changed());
        }
        Ok(())
    }

    fn directory(&mut self, path: &Path) -> Result<(), NarFsError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            names.push(entry.map_err(io_err(path))?.file_name());
        }
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        self.writer
            .start_directory(&mut self.buf)
            .map_err(nar_err(path))?;
        for name in names {
            let child = path.join(&name);
            self.writer
                .entry(name.as_bytes(), &mut self.buf)
                .map_err(nar_err(&child))?;
            self.node(&child)?;
        }
        Ok(())
    }
}

/// Reads from `file` into the spare capacity of `buf` (which grows by what was read, with no
/// zeroing first), retrying when interrupted.
fn read_into(file: &File, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        match rustix::io::read(file, rustix::buffer::spare_capacity(buf)) {
            Err(rustix::io::Errno::INTR) => {}
            other => return other.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixbuild_core::nar::NarNode;
    use std::collections::BTreeMap;

    #[test]
    fn dumps_a_small_tree_and_names_bad_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("t");
        fs::create_dir_all(root.join("sub")).expect("mkdir");
        fs::write(root.join("B"), b"big B").expect("write");
        fs::write(root.join("a"), b"").expect("write");
        fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::symlink("nowhere", root.join("sub/link")).expect("symlink");
        let mut nar = Vec::new();
        let size = dump_path(&root, &mut nar).expect("dump");
        assert_eq!(size, nar.len() as u64);
        let link = NarNode::Symlink {
            target: b"nowhere".to_vec(),
        };
        let want = NarNode::Directory(BTreeMap::from([
            (
                b"B".to_vec(),
                NarNode::File {
                    executable: false,
                    contents: b"big B".to_vec(),
                },
            ),
            (
                b"a".to_vec(),
                NarNode::File {
                    executable: true,
                    contents: Vec::new(),
                },
            ),
            (
                b"sub".to_vec(),
                NarNode::Directory(BTreeMap::from([(b"link".to_vec(), link)])),
            ),
        ]));
        assert_eq!(NarNode::from_nar(&nar), Ok(want));

        let fifo = root.join("sub/fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        match dump_path(&root, &mut Vec::new()) {
            Err(NarFsError::UnsupportedType { path }) => assert_eq!(path, fifo),
            other => panic!("expected UnsupportedType, got {other:?}"),
        }
        match dump_path(&root.join("missing"), &mut Vec::new()) {
            Err(NarFsError::Io { path, .. }) => assert_eq!(path, root.join("missing")),
            other => panic!("expected Io, got {other:?}"),
        }
    }
}
