//! One import: a NAR unpacked into `<state>/tmp/<unique>` (its root node) as it arrives, then checked
//! against the client's claim and published under `objects/<key>`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nixbuild_core::content_address::{ContentAddress, ContentAddressMethod};
use nixbuild_core::hash::{Hash, HashAlgo, Hasher};
use nixbuild_core::nar::{NarError, NarEvent, NarSummary, NarValidator};
use nixbuild_core::store_path::StorePath;

use super::error::{io_err, StoreError};
use super::fsutil::{self, hash_file, HashingWriter, CHUNK};
use super::publish::Publication;
use super::Store;
use crate::failpoint::failpoint;
use crate::nar_fs::dump_path;

/// How often, in bytes received, an import re-checks the free disk space and inodes, at most;
/// nearer the reserve it checks after half the space left above it (so that an upload stops
/// before crossing the reserve), but not more often than every [`MIN_DISK_CHECK_INTERVAL`].
const DISK_CHECK_INTERVAL: u64 = 64 << 20;
/// The shortest interval between two checks: one chunk of the session.
const MIN_DISK_CHECK_INTERVAL: u64 = 256 << 10;

/// Bytes an import may receive before its next disk check, given the bytes free above the
/// reserve at the last one.
fn next_disk_check(headroom: u64) -> u64 {
    (headroom / 2).clamp(MIN_DISK_CHECK_INTERVAL, DISK_CHECK_INTERVAL)
}
/// How often, in files, directories and symlinks created, an import re-checks them too:
/// many small files use up inodes and blocks long before 64 MiB of NAR.
const NODE_CHECK_INTERVAL: u64 = 10_000;

/// What the client claims about the path an import carries, checked by [`Import::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathClaim {
    /// The store path.
    pub path: StorePath,
    /// The deriver, recorded as given.
    pub deriver: Option<StorePath>,
    /// The claimed NAR hash (AddToStoreNar claims it, ImportPaths does not).
    pub nar_hash: Option<Hash>,
    /// The claimed NAR size (AddToStoreNar claims it, ImportPaths does not).
    pub nar_size: Option<u64>,
    /// References; each must be valid for the account or be the path itself.
    pub references: BTreeSet<StorePath>,
    /// Registration time, seconds since the epoch.
    pub registration_time: u64,
    /// Content address; checked against the contents and the path.
    pub ca: Option<ContentAddress>,
    /// Signatures, recorded as given.
    pub sigs: BTreeSet<String>,
}

/// One import: NAR bytes are written to `<state>/tmp` while hashed and validated; nothing is
/// visible until [`Import::commit`]. Dropping it without commit removes the temporary files.
#[derive(Debug)]
pub struct Import {
    store: Store,
    account: String,
    /// `tmp/<unique>`, where the root node goes (no directory is made for it: the unique
    /// name is reserved by the counter, and `tmp/` is emptied at open); `None` once the
    /// import failed and was cleaned up.
    dir: Option<PathBuf>,
    validator: NarValidator,
    unpacker: Unpacker,
    ca_hasher: Option<CaHasher>,
    received: u64,
    since_disk_check: u64,
    /// Bytes after which the next disk check happens ([`next_disk_check`]).
    disk_check_after: u64,
    /// Nodes the unpacker had created at the last disk check.
    nodes_at_disk_check: u64,
}

/// The extra hash a content address needs, computed while the bytes arrive when the ca is
/// known in advance ([`Import::expect_ca`]).
#[derive(Debug)]
enum CaHasher {
    /// `fixed:r:` with an algorithm other than sha256: the NAR hashed with it.
    Nar(Hasher),
    /// `fixed:` (flat) and `text:`: the contents of the root file.
    RootFile(Hasher),
}

impl Import {
    /// An import whose root node goes at `dir`; `headroom` is the space free above the
    /// reserve at its start.
    pub(super) fn new(store: Store, account: &str, dir: PathBuf, headroom: u64) -> Import {
        let unpacker = Unpacker::new(dir.clone(), None);
        Import {
            store,
            account: account.to_owned(),
            dir: Some(dir),
            validator: NarValidator::new(),
            unpacker,
            ca_hasher: None,
            received: 0,
            since_disk_check: 0,
            disk_check_after: next_disk_check(headroom),
            nodes_at_disk_check: 0,
        }
    }

    /// Announces the content address the claim will carry, so that the hash it needs (if
    /// other than the NAR's sha256) is computed as the bytes arrive. AddToStoreNar knows it
    /// before the NAR; ImportPaths does not, and then [`Import::commit`] re-reads the files.
    /// Has no effect once bytes were written.
    pub fn expect_ca(&mut self, ca: &ContentAddress) {
        if self.received > 0 {
            return;
        }
        let algo = ca.hash.algo();
        self.ca_hasher = match ca.method {
            ContentAddressMethod::Recursive if algo == HashAlgo::Sha256 => None,
            ContentAddressMethod::Recursive => Some(CaHasher::Nar(Hasher::new(algo))),
            ContentAddressMethod::Flat | ContentAddressMethod::Text => {
                Some(CaHasher::RootFile(Hasher::new(algo)))
            }
        };
    }

    /// Feeds the next NAR bytes: validates them, unpacks them into the temporary directory
    /// and hashes them. Refuses bytes past `max_nar_size` and bytes after the end of the NAR.
    /// After an error the import is dead: its files are removed and every further call fails.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if self.dir.is_none() {
            return Err(StoreError::ImportFailed);
        }
        let result = self.write_inner(chunk);
        if result.is_err() {
            self.discard();
        }
        result
    }

    fn write_inner(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let received = self.received.saturating_add(chunk.len() as u64);
        let limit = self.store.inner.limits.max_nar_size;
        if received > limit {
            return Err(StoreError::NarTooLarge { limit, received });
        }
        let unpacker = &mut self.unpacker;
        let mut root_hasher = match &mut self.ca_hasher {
            Some(CaHasher::RootFile(h)) => Some(h),
            _ => None,
        };
        let n = self.validator.feed_with(chunk, |event| {
            unpacker.event(event, root_hasher.as_deref_mut())
        })?;
        if let Some(CaHasher::Nar(h)) = &mut self.ca_hasher {
            h.update(&chunk[..n]);
        }
        failpoint!("import-stream-started", self.received == 0 && n > 0);
        self.received += n as u64;
        if n < chunk.len() {
            return Err(NarError::TrailingData {
                offset: self.received,
                len: chunk.len() - n,
            }
            .into());
        }
        self.since_disk_check += n as u64;
        let nodes = self.unpacker.nodes - self.nodes_at_disk_check;
        if self.since_disk_check >= self.disk_check_after || nodes >= NODE_CHECK_INTERVAL {
            self.since_disk_check = 0;
            self.nodes_at_disk_check = self.unpacker.nodes;
            self.disk_check_after = next_disk_check(self.store.disk_headroom()?);
        }
        Ok(())
    }

    /// Verifies the claim against what was received and registers the path for the account:
    /// the NAR is complete; its hash and size equal the claim (when claimed); the content
    /// address (if any) matches the contents and the path; every reference is valid for the
    /// account or is the path itself. Committing a path the account already has is a no-op
    /// success (the first registration stays). Two imports of the same path and contents at
    /// once give one object and both succeed.
    pub fn commit(mut self, claim: PathClaim) -> Result<(), StoreError> {
        let Some(dir) = self.dir.clone() else {
            return Err(StoreError::ImportFailed);
        };
        let validator = std::mem::take(&mut self.validator);
        let summary = validator.finish()?;
        failpoint!("import-nar-written");
        self.check_claim(&claim, &summary)?;
        self.check_ca(&claim, &summary)?;
        failpoint!("import-hash-verified");
        self.publish(&claim, &summary, &dir)
        // Drop removes tmp/<unique> if it is still there (a duplicate copy), outside the lock.
    }

    fn check_claim(&self, claim: &PathClaim, summary: &NarSummary) -> Result<(), StoreError> {
        if let Some(claimed) = claim.nar_hash {
            if claimed != summary.nar_hash {
                return Err(StoreError::HashMismatch {
                    path: claim.path.clone(),
                    claimed: Box::new(claimed),
                    actual: Box::new(summary.nar_hash),
                });
            }
        }
        if let Some(claimed) = claim.nar_size {
            if claimed != summary.nar_size {
                return Err(StoreError::SizeMismatch {
                    path: claim.path.clone(),
                    claimed,
                    actual: summary.nar_size,
                });
            }
        }
        Ok(())
    }

    fn check_ca(&mut self, claim: &PathClaim, summary: &NarSummary) -> Result<(), StoreError> {
        let Some(ca) = claim.ca else {
            return Ok(());
        };
        let algo = ca.hash.algo();
        let root = &self.unpacker.root;
        let actual = match (ca.method, self.ca_hasher.take()) {
            (ContentAddressMethod::Recursive, _) if algo == HashAlgo::Sha256 => summary.nar_hash,
            (ContentAddressMethod::Recursive, Some(CaHasher::Nar(h))) if h.algo() == algo => {
                h.finish()
            }
            (ContentAddressMethod::Recursive, _) => {
                let mut w = HashingWriter::new(algo);
                dump_path(root, &mut w).map_err(|source| StoreError::Dump {
                    path: claim.path.clone(),
                    source: Box::new(source),
                })?;
                w.finish().0
            }
            (ContentAddressMethod::Flat | ContentAddressMethod::Text, hasher) => {
                if !self.unpacker.root_is_plain_file {
                    return Err(StoreError::CaNotAFile {
                        path: claim.path.clone(),
                        ca: Box::new(ca),
                    });
                }
                match hasher {
                    Some(CaHasher::RootFile(h)) if h.algo() == algo => h.finish(),
                    _ => hash_file(root, algo)?,
                }
            }
        };
        if actual != ca.hash {
            return Err(StoreError::CaMismatch {
                path: claim.path.clone(),
                ca: Box::new(ca),
                actual: Box::new(actual),
            });
        }
        Ok(())
    }

    /// Registers the path with the files under `root` (see [`Store::publish`]).
    fn publish(
        &self,
        claim: &PathClaim,
        summary: &NarSummary,
        root: &Path,
    ) -> Result<(), StoreError> {
        let publication = Publication {
            path: &claim.path,
            files: root,
            nar_hash: summary.nar_hash,
            nar_size: summary.nar_size,
            deriver: claim.deriver.as_ref(),
            ca: claim.ca.as_ref(),
            references: &claim.references,
            registration_time: claim.registration_time,
            sigs: &claim.sigs,
        };
        self.store
            .publish(&self.account, &[publication], true)
            .map(drop)
    }

    fn discard(&mut self) {
        self.unpacker.open.clear();
        if let Some(dir) = self.dir.take() {
            // Best effort: Store::open empties tmp/ anyway.
            let _ = fsutil::remove_tree(&dir);
        }
    }
}

impl Drop for Import {
    fn drop(&mut self) {
        self.discard();
    }
}

/// A node being written.
#[derive(Debug)]
enum Open {
    Directory(PathBuf),
    File {
        path: PathBuf,
        out: BufWriter<File>,
        executable: bool,
    },
    Symlink,
}

/// Materialises NAR events on disk, canonicalising each node as it ends.
#[derive(Debug)]
struct Unpacker {
    root: PathBuf,
    /// Where the next node goes: the root, then `<directory>/<entry name>`.
    next: PathBuf,
    /// The nodes from the root down to the current one.
    open: Vec<Open>,
    /// Whether the root is a non-executable regular file (what flat and text addresses need).
    root_is_plain_file: bool,
    /// Files, directories and symlinks created so far.
    nodes: u64,
    /// The uid and gid every node is given as it is created (`None`: the daemon's own).
    owner: Option<u32>,
}

impl Unpacker {
    fn new(root: PathBuf, owner: Option<u32>) -> Unpacker {
        Unpacker {
            next: root.clone(),
            root,
            open: Vec::new(),
            root_is_plain_file: false,
            nodes: 0,
            owner,
        }
    }

    /// Gives the node just created at `self.next` to the owner, if there is one.
    fn own(&self) -> Result<(), StoreError> {
        let Some(id) = self.owner else {
            return Ok(());
        };
        rustix::fs::chownat(
            rustix::fs::CWD,
            &self.next,
            Some(rustix::fs::Uid::from_raw(id)),
            Some(rustix::fs::Gid::from_raw(id)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("chown", &self.next)(e.into()))
    }

    /// Handles one event; `root_hasher` (if any) gets the root file's contents.
    fn event(
        &mut self,
        event: NarEvent<'_>,
        root_hasher: Option<&mut Hasher>,
    ) -> Result<(), StoreError> {
        match event {
            NarEvent::Directory => {
                self.nodes += 1;
                fs::create_dir(&self.next).map_err(io_err("create directory", &self.next))?;
                self.own()?;
                self.open.push(Open::Directory(self.next.clone()));
            }
            NarEvent::Entry { name } => {
                if let Some(Open::Directory(dir)) = self.open.last() {
                    self.next = dir.join(OsStr::from_bytes(name));
                }
            }
            NarEvent::File { executable, .. } => {
                self.nodes += 1;
                if self.open.is_empty() {
                    self.root_is_plain_file = !executable;
                }
                let file = File::options()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&self.next)
                    .map_err(io_err("create file", &self.next))?;
                self.own()?;
                self.open.push(Open::File {
                    path: self.next.clone(),
                    out: BufWriter::with_capacity(CHUNK, file),
                    executable,
                });
            }
            NarEvent::Contents(data) => {
                let at_root = self.open.len() == 1;
                if let Some(Open::File { path, out, .. }) = self.open.last_mut() {
                    out.write_all(data).map_err(io_err("write", path))?;
                }
                if let (true, Some(h)) = (at_root, root_hasher) {
                    h.update(data);
                }
            }
            NarEvent::Symlink { target } => {
                self.nodes += 1;
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &self.next)
                    .map_err(io_err("create symlink", &self.next))?;
                self.own()?;
                self.open.push(Open::Symlink);
            }
            NarEvent::EndNode => match self.open.pop() {
                Some(Open::File {
                    path,
                    out,
                    executable,
                }) => {
                    out.into_inner()
                        .map_err(|e| io_err("write", &path)(e.into_error()))?;
                    let mode = if executable { 0o555 } else { 0o444 };
                    fsutil::canonicalise(&path, mode)?;
                }
                Some(Open::Directory(path)) => fsutil::canonicalise(&path, 0o555)?,
                Some(Open::Symlink) | None => {}
            },
            NarEvent::End => {}
        }
        Ok(())
    }
}

/// A NAR that is not to be registered, unpacked into a directory as it arrives and
/// validated: the output of a build on another machine, given to the build's uid so that the
/// build service checks it as it checks a local build's (the outputs' own checks then
/// decide). Knows where its NAR ends: [`Unpack::write`] takes no byte past it. Bounded by
/// `max` bytes.
#[derive(Debug)]
pub struct Unpack {
    validator: NarValidator,
    unpacker: Unpacker,
    received: u64,
    max: u64,
}

impl Unpack {
    /// Unpacks into `root` (which must not exist; its parent must), every node owned by
    /// `owner` (uid and gid), at most `max` NAR bytes.
    pub fn new(root: PathBuf, owner: u32, max: u64) -> Unpack {
        Unpack {
            validator: NarValidator::new(),
            unpacker: Unpacker::new(root, Some(owner)),
            received: 0,
            max,
        }
    }

    /// Feeds bytes; returns how many were the NAR's (fewer than given once it ended).
    pub fn write(&mut self, chunk: &[u8]) -> Result<usize, StoreError> {
        let unpacker = &mut self.unpacker;
        let n = self
            .validator
            .feed_with(chunk, |event| unpacker.event(event, None))?;
        self.received = self.received.saturating_add(n as u64);
        if self.received > self.max {
            return Err(StoreError::NarTooLarge {
                limit: self.max,
                received: self.received,
            });
        }
        Ok(n)
    }

    /// Whether the whole NAR has arrived.
    pub fn is_complete(&self) -> bool {
        self.validator.is_complete()
    }

    /// NAR bytes so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_checks_come_sooner_near_the_reserve() {
        assert_eq!(next_disk_check(u64::MAX), DISK_CHECK_INTERVAL);
        assert_eq!(next_disk_check(20 << 20), 10 << 20);
        assert_eq!(next_disk_check(0), MIN_DISK_CHECK_INTERVAL);
    }
}
