//! The store's errors and the problems [`super::Store::verify`] reports.

use std::io;
use std::path::{Path, PathBuf};

use nixbuild_core::content_address::ContentAddress;
use nixbuild_core::hash::Hash;
use nixbuild_core::nar::NarError;
use nixbuild_core::store_path::{StorePath, StorePathError};

use crate::nar_fs::NarFsError;

/// Why a store operation failed. Every variant names what it concerns: the file, the store
/// path, the account, the claimed and the actual values.
#[derive(Debug, thiserror::Error)]
///
/// Hashes and content addresses are boxed to keep the error small on the happy path.
pub enum StoreError {
    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("create directory", "write", ...).
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The SQLite database failed.
    #[error("store database ({context}): {source}")]
    Db {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        source: rusqlite::Error,
    },
    /// The database was written by an incompatible version of nixbuild.
    #[error("store database has schema version {found}, this nixbuild supports {supported}")]
    SchemaVersion {
        /// The version found.
        found: i64,
        /// The version this code writes.
        supported: i64,
    },
    /// A value in the database cannot be parsed back (a damaged or hand-edited database).
    #[error("store database holds an invalid {field}: {value:?}")]
    Corrupt {
        /// Which column.
        field: &'static str,
        /// The stored text.
        value: String,
    },
    /// Free space on the state directory's file system is below the configured reserve.
    #[error("not enough disk space in {dir}: {free} bytes free, the reserve is {reserve} bytes")]
    DiskReserve {
        /// The state directory.
        dir: PathBuf,
        /// Bytes available to the daemon.
        free: u64,
        /// The configured reserve.
        reserve: u64,
    },
    /// Free inodes fell below the inode reserve.
    #[error(
        "not enough inodes in {dir}: {free} inodes free, the reserve is {reserve} (the server \
         is running out of inodes)"
    )]
    InodeReserve {
        /// The state directory.
        dir: PathBuf,
        /// Inodes available to the daemon.
        free: u64,
        /// The reserve.
        reserve: u64,
    },
    /// The NAR grew past `max_nar_size`.
    #[error("NAR exceeds the limit of {limit} bytes ({received} bytes received)")]
    NarTooLarge {
        /// The configured limit.
        limit: u64,
        /// Bytes received when the limit was crossed.
        received: u64,
    },
    /// The NAR is malformed, incomplete, or followed by trailing bytes.
    #[error("invalid NAR: {0}")]
    Nar(#[from] NarError),
    /// The NAR's sha256 differs from the claimed `narHash`.
    #[error("NAR hash mismatch for {path}: claimed {claimed}, got {actual}")]
    HashMismatch {
        /// The path being imported.
        path: StorePath,
        /// The hash the client claimed.
        claimed: Box<Hash>,
        /// The hash of the bytes received.
        actual: Box<Hash>,
    },
    /// The NAR's length differs from the claimed `narSize`.
    #[error("NAR size mismatch for {path}: claimed {claimed} bytes, got {actual}")]
    SizeMismatch {
        /// The path being imported.
        path: StorePath,
        /// The size the client claimed.
        claimed: u64,
        /// The size received.
        actual: u64,
    },
    /// A flat or text content address on something that is not a non-executable regular
    /// file.
    #[error("{path} has content address {ca} but its NAR is not a single non-executable file")]
    CaNotAFile {
        /// The path being imported.
        path: StorePath,
        /// The claimed content address.
        ca: Box<ContentAddress>,
    },
    /// The contents do not hash to the claimed content address.
    #[error("content address mismatch for {path}: claimed {ca}, contents hash to {actual}")]
    CaMismatch {
        /// The path being imported.
        path: StorePath,
        /// The claimed content address.
        ca: Box<ContentAddress>,
        /// What the contents hash to with the ca's method and algorithm.
        actual: Box<Hash>,
    },
    /// The content address and references give another store path than the one claimed.
    #[error(
        "{path} is not the path of content address {ca} with its references: that is {expected}"
    )]
    PathMismatch {
        /// The claimed path.
        path: StorePath,
        /// The claimed content address.
        ca: Box<ContentAddress>,
        /// The path the content address and references give.
        expected: StorePath,
    },
    /// No path can be computed from the content address and references (for example a flat
    /// content address with references).
    #[error("{path}: cannot compute a path from content address {ca}: {source}")]
    CaPath {
        /// The claimed path.
        path: StorePath,
        /// The claimed content address.
        ca: Box<ContentAddress>,
        /// Why not.
        source: StorePathError,
    },
    /// A reference that is not valid for the account (and is not the path itself).
    #[error("{path} references {reference}, which is not valid for account {account:?}")]
    MissingReference {
        /// The path being imported.
        path: StorePath,
        /// The reference.
        reference: Box<StorePath>,
        /// The importing account.
        account: String,
    },
    /// A path that is not valid for the account.
    #[error("path {path} is not valid for account {account:?}")]
    NotValid {
        /// The path.
        path: StorePath,
        /// The account.
        account: String,
    },
    /// Serialising a path's files as a NAR failed (export, or re-hashing at import).
    #[error("reading {path} as a NAR: {source}")]
    Dump {
        /// The path being read.
        path: StorePath,
        /// What went wrong.
        source: Box<NarFsError>,
    },
    /// An exported object's NAR did not have the recorded size (the object changed on disk).
    #[error("export of {path}: NAR is {actual} bytes, {recorded} are recorded")]
    ExportSize {
        /// The path being exported.
        path: StorePath,
        /// The recorded `narSize`.
        recorded: u64,
        /// The size written.
        actual: u64,
    },
    /// Registering would take the account past its storage quota, even after its expired
    /// paths were collected.
    #[error(
        "account {account:?} holds {usage} bytes of store paths; {adding} more would pass its \
         quota of {quota} bytes ({setting} of the server's configuration; its paths unused \
         for longer than its retention were collected first)"
    )]
    Quota {
        /// The account.
        account: String,
        /// The NAR bytes its grants hold.
        usage: u64,
        /// The NAR bytes being added (0: a build, refused while the account is at its quota).
        adding: u64,
        /// The quota.
        quota: u64,
        /// Where the quota is set.
        setting: String,
    },
    /// The import already failed; its error was returned then.
    #[error("import already failed")]
    ImportFailed,
}

/// One inconsistency [`super::Store::verify`] found in an object.
#[derive(Debug)]
pub enum StoreProblem {
    /// The object's files are missing.
    Missing {
        /// The object key (directory name under `objects/`).
        object: String,
    },
    /// The object could not be read as a NAR.
    Unreadable {
        /// The object key.
        object: String,
        /// What went wrong.
        error: NarFsError,
    },
    /// The object's NAR differs from the recorded hash or size.
    Mismatch {
        /// The object key.
        object: String,
        /// The recorded NAR hash.
        recorded_hash: Hash,
        /// The NAR hash of the files on disk.
        actual_hash: Hash,
        /// The recorded NAR size.
        recorded_size: u64,
        /// The NAR size of the files on disk.
        actual_size: u64,
    },
}

/// `map_err` helper: an [`StoreError::Io`] about `path`.
pub(super) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// `map_err` helper: an [`StoreError::Db`] while doing `context`.
pub(super) fn db_err(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Db { context, source }
}
