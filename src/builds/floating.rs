//! The outputs of floating content-addressed derivations (`__contentAddressed = true`, Nix's
//! experimental `ca-derivations`), whose paths are only known once they are built: Nix's
//! `registerOutputs` for a `CAFloating` output.
//!
//! The builder wrote each such output at a temporary path
//! ([`nixbuild_core::derivation::fallback_output_path`]), and referred to it there. Once the
//! output is canonicalised and scanned ([`super::outputs`]), in an order where each output
//! comes after the outputs it refers to:
//!
//! 1. the temporary hash parts of the outputs finished before are rewritten to their final
//!    ones, in place ([`rewrite_tree`]: file contents, symlink targets, file names);
//! 2. the output is hashed with its method (the NAR, or the file for `flat` and `text`) and
//!    algorithm, *modulo* its own temporary hash part ([`hash_modulo`]);
//! 3. its path is the content-addressed path of that hash, its name and its references (the
//!    others' final paths, and itself as `self`);
//! 4. its self-references are rewritten to that path, and its NAR is hashed again.
//!
//! The rewriting works on the canonicalised tree as root: each file or directory is made
//! writable for the owner (root) while it is changed, then given back its canonical mode and
//! mtime, so that nothing needs `CAP_DAC_OVERRIDE`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nixbuild_core::content_address::ContentAddressMethod;
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::rewrite::{HashModulo, Rewriter};
use nixbuild_core::store_path::StorePath;

use super::outputs::{io_err, OutputError};
use crate::nar_fs::{dump_to, NarSink, CHUNK};
use crate::store::fsutil;

/// One rewrite: a temporary hash part and its final one (32 bytes each).
pub type Rewrite = (Vec<u8>, Vec<u8>);

fn rewriter(rewrites: &[Rewrite]) -> Rewriter {
    Rewriter::new(rewrites.iter().map(|(f, t)| (&f[..], &t[..])))
        .unwrap_or_else(|e| unreachable!("hash parts have one length: {e}"))
}

/// `bytes` with every rewrite applied.
fn rewritten(bytes: &[u8], rewrites: &[Rewrite]) -> Vec<u8> {
    let mut rw = rewriter(rewrites);
    let mut out = Vec::with_capacity(bytes.len());
    rw.feed(bytes, &mut out);
    rw.finish(&mut out);
    out
}

/// Runs `change` on `path` made writable for its owner, then restores `mode` and the
/// canonical mtime.
fn writable<T>(
    path: &Path,
    mode: u32,
    change: impl FnOnce() -> Result<T, OutputError>,
) -> Result<T, OutputError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200))
        .map_err(io_err("chmod", path))?;
    let result = change();
    fsutil::canonicalise(path, mode)?;
    result
}

/// Applies `rewrites` to the canonicalised tree at `host`, in place: regular files'
/// contents, symlinks' targets and the names of directory entries.
pub fn rewrite_tree(
    host: &Path,
    rewrites: &[Rewrite],
    abort: &AtomicBool,
) -> Result<(), OutputError> {
    if abort.load(Ordering::Relaxed) {
        return Err(OutputError::Aborted);
    }
    let meta = fs::symlink_metadata(host).map_err(io_err("stat", host))?;
    let ty = meta.file_type();
    let mode = meta.mode() & 0o7777;
    if ty.is_symlink() {
        let target = fs::read_link(host).map_err(io_err("read the link", host))?;
        let new = rewritten(target.as_os_str().as_bytes(), rewrites);
        if new != target.as_os_str().as_bytes() {
            fs::remove_file(host).map_err(io_err("remove", host))?;
            std::os::unix::fs::symlink(std::ffi::OsString::from_vec(new), host)
                .map_err(io_err("create the link", host))?;
            fsutil::set_canonical_mtime(host)?;
        }
    } else if ty.is_file() {
        writable(host, mode, || rewrite_file(host, rewrites, abort))?;
    } else if ty.is_dir() {
        let mut names = Vec::new();
        for entry in fs::read_dir(host).map_err(io_err("list", host))? {
            names.push(entry.map_err(io_err("list", host))?.file_name());
        }
        for name in &names {
            rewrite_tree(&host.join(name), rewrites, abort)?;
        }
        writable(host, mode, || {
            for name in &names {
                let new = rewritten(name.as_bytes(), rewrites);
                if new != name.as_bytes() {
                    let from = host.join(name);
                    fs::rename(&from, host.join(std::ffi::OsStr::from_bytes(&new)))
                        .map_err(io_err("rename", &from))?;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Rewrites a regular file in place, a buffer at a time: the replacements have the length
/// of what they replace, so each rewritten byte goes where it was read from.
fn rewrite_file(path: &Path, rewrites: &[Rewrite], abort: &AtomicBool) -> Result<(), OutputError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    let mut rw = rewriter(rewrites);
    let mut buf = vec![0; CHUNK];
    let mut out = Vec::with_capacity(CHUNK);
    let (mut read_at, mut write_at) = (0u64, 0u64);
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(OutputError::Aborted);
        }
        file.seek(SeekFrom::Start(read_at))
            .map_err(io_err("seek", path))?;
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        read_at += n as u64;
        out.clear();
        if n == 0 {
            rw.finish(&mut out);
        } else {
            rw.feed(&buf[..n], &mut out);
        }
        if rw.matches().is_empty() {
            // Nothing changed so far: the bytes are already in place.
            write_at += out.len() as u64;
        } else {
            file.seek(SeekFrom::Start(write_at))
                .map_err(io_err("seek", path))?;
            file.write_all(&out).map_err(io_err("write", path))?;
            write_at += out.len() as u64;
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// Where a NAR goes to be hashed modulo a hash part.
struct ModuloSink<'a> {
    hash: HashModulo,
    abort: &'a AtomicBool,
}

impl NarSink for ModuloSink<'_> {
    fn write_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(io::Error::other("the output dump was stopped"));
        }
        self.hash.update(buf);
        buf.clear();
        Ok(())
    }
}

/// The hash of `output`, whose files are at `files`, with `method` and `algo`, modulo `modulus` (its
/// temporary hash part), and whether it refers to itself. `flat` and `text` hash a regular
/// file's contents (`plain_file`: the output is one, not executable), `r:` its NAR.
pub fn hash_modulo(
    output: &StorePath,
    files: &Path,
    plain_file: bool,
    method: ContentAddressMethod,
    algo: HashAlgo,
    modulus: &[u8],
    abort: &AtomicBool,
) -> Result<(Hash, bool), OutputError> {
    let mut hash = HashModulo::new(algo, modulus)
        .unwrap_or_else(|e| unreachable!("a hash part is not empty: {e}"));
    match method {
        ContentAddressMethod::Recursive => {
            let mut sink = ModuloSink { hash, abort };
            dump_to(files, &mut sink).map_err(|source| {
                if abort.load(Ordering::Relaxed) {
                    OutputError::Aborted
                } else {
                    OutputError::Dump {
                        path: Box::new(output.clone()),
                        source: Box::new(source),
                    }
                }
            })?;
            hash = sink.hash;
        }
        ContentAddressMethod::Flat | ContentAddressMethod::Text => {
            if !plain_file {
                return Err(OutputError::NotAFlatFile {
                    path: Box::new(output.clone()),
                });
            }
            let mut file = File::open(files).map_err(io_err("open", files))?;
            let mut buf = vec![0; CHUNK];
            loop {
                let n = file.read(&mut buf).map_err(io_err("read", files))?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
            }
        }
    }
    Ok(hash.finish())
}
