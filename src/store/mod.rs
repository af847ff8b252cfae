//! The store: objects on disk, metadata in SQLite, one view per account.
//!
//! Layout of the state directory:
//!
//! ```text
//! <state>/db.sqlite       metadata (see the db module for the schema), WAL mode
//! <state>/objects/<key>   one path's contents (file, directory or symlink), canonical:
//!                         files 0444/0555, directories 0555, mtime 1
//! <state>/tmp/<unique>    the root of an import in progress, or an object being deleted by
//!                         the collector; emptied by Store::open
//! <state>/logs/<name>.zst the stored log of a build record (zstd); `.part` while written
//! ```
//!
//! An object's key is `nix32(sha256("<base name>:<NAR sha256 in base16>"))`: the same path
//! name with different contents from two accounts gives two objects, identical contents one.
//! Each account has its own rows mapping a path to an object, with its own deriver,
//! references, signatures, registration time and content address. A row is only written after
//! that account's own bytes were received and checked, and only after the object is in place,
//! so no row ever points at missing files; an object left without a row by a crash is removed
//! by [`Store::open`].
//!
//! All calls block; the async daemon calls them with `spawn_blocking`.

mod accounting;
mod db;
mod error;
pub(crate) mod fsutil;
mod gc;
mod grant;
mod import;
mod pins;
mod policy;
mod publish;
mod records;

pub use accounting::{AccountHolding, DayUsage, HeldPath, TotalHolding, Traffic};
pub use db::now_ms;
pub use error::{StoreError, StoreProblem};
pub use gc::{GcStats, STEP_ROWS};
pub use grant::PUBLIC_ACCOUNT;
pub use import::{Import, PathClaim, Unpack};
pub use pins::{Pins, MAX_PINS};
pub use policy::{AccountPolicy, StorePolicy};
pub use publish::BuiltPath;
pub use records::{BuildRecord, LogCheckpoint, LogReader, LogWriter};

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use nixbuild_core::derivation::Derivation;
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::nixbase32;
use nixbuild_core::serve::ValidPathInfo;
use nixbuild_core::store_path::StorePath;
use rusqlite::Connection;

use crate::nar_fs::{dump_path, dump_to, NarSink, Plain};
use error::io_err;
use fsutil::HashingWriter;

/// The largest `.drv` file read: [`Store::query_closure`] takes a larger one to be no
/// derivation, and the build service's BuildPaths refuses it. One cap for both, so that every
/// derivation whose outputs count in a closure can also be built; 64 MiB is far above any
/// real `.drv` (the largest in nixpkgs are a few MiB) and still bounds what one read holds.
pub const MAX_DERIVATION_SIZE: u64 = 64 << 20;

/// Free inodes below which uploads are refused, like the free-space reserve (and only when
/// that reserve is not zero): more than an import creates between two checks.
pub const INODE_RESERVE: u64 = 65_536;

/// One input path of a build, as the store holds it for an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputObject {
    /// The store path.
    pub path: StorePath,
    /// Its contents: `<state>/objects/<key>` (the root of the path itself).
    pub object: PathBuf,
    /// Its NAR hash.
    pub nar_hash: Hash,
}

/// Limits the store enforces, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Largest NAR an import accepts, in bytes.
    pub max_nar_size: u64,
    /// Imports are refused while the state directory's file system has less free space.
    pub disk_reserve: u64,
}

/// The store of one state directory. Cheap to clone (shared inside), `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state_dir: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    limits: StoreLimits,
    /// The connection; holding it is also the commit lock, so that checking for an object,
    /// moving it into place and inserting its rows is one step for concurrent commits.
    db: Mutex<Connection>,
    /// A second, read-only connection for the operations interface's reads (records, usage,
    /// listings): with WAL they neither wait for nor hold up the store's writes and lookups.
    reader: Mutex<Connection>,
    next_tmp: AtomicU64,
    /// The highest build id handed out ([`Store::next_build_id`]).
    last_build_id: AtomicU64,
    /// The rows in use, which the collector leaves alone (see [`Pins`]).
    pins: Arc<pins::PinTable>,
    /// Retention and quotas; replaced on reload.
    policy: RwLock<Arc<StorePolicy>>,
}

impl Inner {
    fn lock_db(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no open transaction (rusqlite rolls back on
        // drop), so the connection is still usable.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The directory name of the object holding `path` with NAR hash `nar_hash`.
fn object_key(path: &StorePath, nar_hash: &Hash) -> String {
    let id = format!("{}:{}", path.base_name(), nar_hash.to_base16());
    nixbase32::encode(Hash::compute(HashAlgo::Sha256, id.as_bytes()).digest())
}

/// Mode of the state directory: relays must reach `serve.sock` in it, nobody may list it.
pub const STATE_DIR_MODE: u32 = 0o711;
/// Mode of `objects/`, `tmp/` and `logs/`: the daemon's alone (the sandbox bind-mounts objects as
/// root, and builds see them through the mount, not through this directory).
const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of the database and its `-wal` and `-shm` files (SQLite gives those the database's).
const DB_MODE: u32 = 0o600;

/// Creates `path` (and missing parents) if needed and gives it exactly `mode`, whatever
/// the umask.
fn create_dir(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// Creates the state directory with [`STATE_DIR_MODE`] if needed (the daemon locks it
/// before opening the store).
pub fn create_state_dir(state_dir: &Path) -> Result<(), StoreError> {
    create_dir(state_dir, STATE_DIR_MODE)
}

/// Creates the database file with [`DB_MODE`] before SQLite opens it, and restricts an
/// existing one and its `-wal` and `-shm` files.
fn restrict_db_files(db: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(DB_MODE)
        .open(db)
        .map_err(io_err("create", db))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let file = PathBuf::from(name);
        match fs::set_permissions(&file, fs::Permissions::from_mode(DB_MODE)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other.map_err(io_err("chmod", &file))?,
        }
    }
    Ok(())
}

/// Removes every entry of `dir` for which `keep` is false.
fn remove_entries(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if !entry.file_name().to_str().is_some_and(&keep) {
            let path = entry.path();
            fsutil::remove_tree(&path).map_err(io_err("remove", &path))?;
        }
    }
    Ok(())
}

/// Runs `f` in one read transaction on `conn` (the store lock's connection, held by the
/// caller).
fn read_in<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    // Ended by its drop (a rollback, which for reads only releases the lock).
    let tx = conn
        .unchecked_transaction()
        .map_err(error::db_err("begin a read"))?;
    f(&tx)
}

/// The rows of `paths` for `account`. Err([`StoreError::NotValid`]) for one it cannot see.
fn starting_rows(
    conn: &Connection,
    account: &str,
    paths: &BTreeSet<StorePath>,
) -> Result<Vec<(i64, StorePath)>, StoreError> {
    paths
        .iter()
        .map(|path| {
            let id = db::path_id(conn, account, path)?.ok_or_else(|| StoreError::NotValid {
                path: path.clone(),
                account: account.to_owned(),
            })?;
            Ok((id, path.clone()))
        })
        .collect()
}

impl Store {
    /// Opens the store in `state_dir`, creating the layout if missing (state directory 0711,
    /// `objects/`, `tmp/` and `logs/` 0700, database 0600), and cleans leftovers:
    /// empties `tmp/`, removes objects that have no row (a crash between publishing an
    /// object and registering it, or between a collection step's commit and its deletion)
    /// and logs no record names. Only the daemon calls this, at start, so no live import
    /// is disturbed. The policy is [`StorePolicy::default`] until [`Store::set_policy`].
    pub fn open(state_dir: &Path, limits: StoreLimits) -> Result<Store, StoreError> {
        let objects = state_dir.join("objects");
        let tmp = state_dir.join("tmp");
        create_state_dir(state_dir)?;
        create_dir(&objects, PRIVATE_DIR_MODE)?;
        create_dir(&tmp, PRIVATE_DIR_MODE)?;
        create_dir(&state_dir.join("logs"), PRIVATE_DIR_MODE)?;
        remove_entries(&tmp, |_| false)?;
        let db_file = state_dir.join("db.sqlite");
        restrict_db_files(&db_file)?;
        let conn = db::open(&db_file)?;
        let keys = db::object_keys(&conn)?;
        let last_build_id = records::last_build_id(&conn)?;
        let reader = db::open_reader(&db_file)?;
        remove_entries(&objects, |name| keys.contains(name))?;
        let store = Store {
            inner: Arc::new(Inner {
                state_dir: state_dir.to_owned(),
                objects,
                tmp,
                limits,
                db: Mutex::new(conn),
                reader: Mutex::new(reader),
                next_tmp: AtomicU64::new(0),
                last_build_id: AtomicU64::new(last_build_id),
                pins: Arc::default(),
                policy: RwLock::default(),
            }),
        };
        store.remove_orphan_logs()?;
        Ok(store)
    }

    /// The retention and quotas in force.
    pub fn policy(&self) -> Arc<StorePolicy> {
        self.inner
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the retention and quotas (at start and on reload).
    pub fn set_policy(&self, policy: StorePolicy) {
        *self.inner.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// A new, empty set of pins for one session, build or export.
    pub fn pins(&self) -> Pins {
        Pins::new(&self.inner.pins)
    }

    /// How many rows are pinned at this moment, by everyone.
    pub fn pinned_rows(&self) -> usize {
        self.inner.pins.len()
    }

    /// The NAR bytes and number of paths `account` holds.
    pub fn usage(&self, account: &str) -> Result<(u64, u64), StoreError> {
        db::usage(&self.inner.lock_db(), account)
    }

    /// Err([`StoreError::Quota`]) when `account` holding `adding` more bytes would pass its
    /// quota (or, with `adding` 0, when it is at or over it). Under the store lock.
    fn check_quota(&self, conn: &Connection, account: &str, adding: u64) -> Result<(), StoreError> {
        let policy = self.policy();
        let Some(quota) = policy.quota_of(account) else {
            return Ok(());
        };
        let (usage, _) = db::usage(conn, account)?;
        let over = if adding == 0 {
            usage >= quota
        } else {
            usage.saturating_add(adding) > quota
        };
        if over {
            return Err(StoreError::Quota {
                account: account.to_owned(),
                usage,
                adding,
                quota,
                setting: policy.quota_setting(account),
            });
        }
        Ok(())
    }

    /// Refuses a build for `account` ([`StoreError::Quota`]) while it holds its whole quota
    /// or more, after collecting its expired paths.
    pub fn check_build_quota(&self, account: &str) -> Result<(), StoreError> {
        self.collecting_for_quota(account, || {
            self.check_quota(&self.inner.lock_db(), account, 0)
        })
    }

    /// `f`, and when it is refused for `account`'s quota, `f` again once the account's
    /// expired paths are collected.
    fn collecting_for_quota<T>(
        &self,
        account: &str,
        f: impl Fn() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match f() {
            Err(StoreError::Quota { .. }) => {
                self.collect_account(account)?;
                f()
            }
            other => other,
        }
    }

    /// Marks rows `ids` used now and, with `pins`, pins them. Called under the store lock
    /// (`conn` is its connection).
    fn hold(conn: &Connection, ids: &[i64], pins: Option<&Pins>) -> Result<(), StoreError> {
        if let Some(pins) = pins {
            pins.add(ids.iter().copied());
        }
        db::touch(conn, ids, db::now())
    }

    /// Whether the store lock is free at this moment, so that a short query would not wait
    /// for another session's commit (a hint: the lock may be taken right after).
    pub fn is_idle(&self) -> bool {
        matches!(
            self.inner.db.try_lock(),
            Ok(_) | Err(std::sync::TryLockError::Poisoned(_))
        )
    }

    /// The limits this store was opened with.
    pub fn limits(&self) -> StoreLimits {
        self.inner.limits
    }

    /// The subset of `paths` valid for `account`, each marked used now.
    pub fn query_valid_paths(
        &self,
        account: &str,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        self.hold_valid_paths(account, paths, None)
    }

    /// [`Store::query_valid_paths`], pinning the valid ones in `pins` (a session holds what
    /// it was told is valid until it ends).
    pub fn hold_valid_paths(
        &self,
        account: &str,
        paths: &BTreeSet<StorePath>,
        pins: Option<&Pins>,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let conn = self.inner.lock_db();
        let mut valid = BTreeSet::new();
        let mut ids = Vec::new();
        for path in paths {
            if let Some(id) = db::path_id(&conn, account, path)? {
                valid.insert(path.clone());
                ids.push(id);
            }
        }
        Self::hold(&conn, &ids, pins)?;
        Ok(valid)
    }

    /// Records where each `(drv_output, path)` of a content-addressed build was built for
    /// `account` (`drv_output` is `sha256:<hex>!<output>`, the BuildResult's key).
    pub fn register_realisations(
        &self,
        account: &str,
        realisations: &[(String, StorePath)],
    ) -> Result<(), StoreError> {
        let conn = self.inner.lock_db();
        for (drv_output, path) in realisations {
            db::set_realisation(&conn, account, drv_output, path)?;
        }
        Ok(())
    }

    /// Where `drv_output` was built for `account`, if that path is still valid for it.
    pub fn query_realisation(
        &self,
        account: &str,
        drv_output: &str,
    ) -> Result<Option<StorePath>, StoreError> {
        let conn = self.inner.lock_db();
        match db::realisation(&conn, account, drv_output)? {
            Some(path) if db::path_id(&conn, account, &path)?.is_some() => Ok(Some(path)),
            _ => Ok(None),
        }
    }

    /// The metadata of `path` as `account` registered it, or `None` if not valid for it.
    pub fn query_path_info(
        &self,
        account: &str,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, StoreError> {
        self.read(|conn| db::path_info(conn, account, path))
    }

    /// The valid path of `account` whose hash part is `hash_part` (QueryPathFromHashPart).
    pub fn query_path_from_hash_part(
        &self,
        account: &str,
        hash_part: &str,
    ) -> Result<Option<StorePath>, StoreError> {
        db::path_from_hash_part(&self.inner.lock_db(), account, hash_part)
    }

    /// At most `max` of `account`'s paths that refer to its `path` (QueryReferrers).
    pub fn query_referrers(
        &self,
        account: &str,
        path: &StorePath,
        max: usize,
    ) -> Result<Vec<StorePath>, StoreError> {
        db::referrers(&self.inner.lock_db(), account, path, max)
    }

    /// At most `max` of `account`'s valid paths (QueryAllValidPaths of one account's view).
    pub fn account_paths(&self, account: &str, max: usize) -> Result<Vec<StorePath>, StoreError> {
        db::account_paths(&self.inner.lock_db(), account, max)
    }

    /// Adds `sigs` to `path` in `account`'s view only; `false` when it is not valid for it.
    pub fn add_signatures(
        &self,
        account: &str,
        path: &StorePath,
        sigs: &BTreeSet<String>,
    ) -> Result<bool, StoreError> {
        db::add_signatures(&mut self.inner.lock_db(), account, path, sigs)
    }

    /// The metadata of `path` as `account` registered it with its registration time (seconds
    /// since the epoch), or `None` if not valid for it (the worker protocol's path info).
    pub fn query_path_info_with_time(
        &self,
        account: &str,
        path: &StorePath,
    ) -> Result<Option<(ValidPathInfo, u64)>, StoreError> {
        self.read(|conn| {
            let Some(info) = db::path_info(conn, account, path)? else {
                return Ok(None);
            };
            let time = db::registration_time(conn, account, path)?.unwrap_or(0);
            Ok(Some((info, time)))
        })
    }

    /// The metadata of each of `paths` that is valid for `account` (the others are left
    /// out), from one snapshot of the database; each found is marked used and, with `pins`,
    /// pinned.
    pub fn query_path_infos<'a>(
        &self,
        account: &str,
        paths: impl IntoIterator<Item = &'a StorePath>,
        pins: Option<&Pins>,
    ) -> Result<BTreeMap<StorePath, ValidPathInfo>, StoreError> {
        let conn = self.inner.lock_db();
        let (infos, ids) = read_in(&conn, |tx| {
            let (mut infos, mut ids) = (BTreeMap::new(), Vec::new());
            for path in paths {
                if let Some((id, info)) = db::path_info_with_id(tx, account, path)? {
                    ids.push(id);
                    infos.insert(path.clone(), info);
                }
            }
            Ok((infos, ids))
        })?;
        Self::hold(&conn, &ids, pins)?;
        Ok(infos)
    }

    /// Runs `f` in one read transaction: a path's metadata takes three queries (the path,
    /// its references, its signatures), which would otherwise each lock and unlock the
    /// database file on their own.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        read_in(&self.inner.lock_db(), f)
    }

    /// The reference closure of `paths` as `account` sees it. With `include_outputs`, the
    /// outputs of every `.drv` in the closure that are valid for the account (with their
    /// closures) are included too, as `nix-store --query --requisites --include-outputs`
    /// does; a `.drv` whose contents are not a derivation has no outputs (as upstream).
    /// Err([`StoreError::NotValid`]) if a starting path is not valid for the account.
    ///
    /// The `.drv` files are read with the store lock released: the walk takes the lock for
    /// each round of references, then reads the derivations it reached without it.
    pub fn query_closure(
        &self,
        account: &str,
        paths: &BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut seen = HashSet::new();
        let mut closure = BTreeSet::new();
        let mut queue = {
            let conn = self.inner.lock_db();
            starting_rows(&conn, account, paths)?
        };
        // Every row enters the queue at most once, so this ends after at most as many rounds
        // as the account has rows.
        loop {
            let mut derivations = Vec::new();
            {
                let conn = self.inner.lock_db();
                for (_, path) in db::walk_references(&conn, queue, &mut seen)? {
                    if include_outputs && path.is_derivation() {
                        derivations.push(self.object_of(&conn, account, &path)?.1);
                    }
                    closure.insert(path);
                }
            }
            if derivations.is_empty() {
                return Ok(closure);
            }
            let mut outputs = Vec::new();
            for object in &derivations {
                outputs.extend(self.derivation_outputs(object)?);
            }
            let conn = self.inner.lock_db();
            queue = Vec::new();
            for output in outputs {
                if let Some(id) = db::path_id(&conn, account, &output)? {
                    queue.push((id, output));
                }
            }
        }
    }

    /// The output paths known in advance (input-addressed and fixed) of the derivation in
    /// `object`; none when it is not a derivation (not a regular file, too large, or not
    /// parsable).
    fn derivation_outputs(&self, object: &db::ObjectRow) -> Result<Vec<StorePath>, StoreError> {
        let file = self.inner.objects.join(&object.key);
        let meta = fs::symlink_metadata(&file).map_err(io_err("stat", &file))?;
        if !meta.is_file() || object.nar_size > MAX_DERIVATION_SIZE {
            return Ok(Vec::new());
        }
        let mut text = Vec::new();
        File::open(&file)
            .and_then(|f| f.take(MAX_DERIVATION_SIZE).read_to_end(&mut text))
            .map_err(io_err("read derivation", &file))?;
        match Derivation::from_aterm(&text) {
            Ok(drv) => Ok(drv
                .basic
                .outputs
                .values()
                .filter_map(|o| o.path().cloned())
                .collect()),
            Err(e) => {
                tracing::debug!(object = %object.key, "a .drv path that is not a derivation: {e}");
                Ok(Vec::new())
            }
        }
    }

    /// The row id of `path` for `account` and its object; Err([`StoreError::NotValid`]).
    fn object_of(
        &self,
        conn: &Connection,
        account: &str,
        path: &StorePath,
    ) -> Result<(i64, db::ObjectRow), StoreError> {
        db::path_object(conn, account, path)?.ok_or_else(|| StoreError::NotValid {
            path: path.clone(),
            account: account.to_owned(),
        })
    }

    /// The `objects/` directory, whose entries builds see as their inputs.
    pub fn objects_dir(&self) -> &Path {
        &self.inner.objects
    }

    /// Where each of `paths` is stored for `account`, with its NAR hash: what a build's
    /// sandbox mounts, and what identifies its inputs. Each is marked used and pinned in
    /// `pins` (the build's, held until its outputs are registered).
    /// Err([`StoreError::NotValid`]) for a path the account cannot see.
    pub fn input_objects(
        &self,
        account: &str,
        paths: &BTreeSet<StorePath>,
        pins: &Pins,
    ) -> Result<Vec<InputObject>, StoreError> {
        let conn = self.inner.lock_db();
        let mut ids = Vec::with_capacity(paths.len());
        let inputs = paths
            .iter()
            .map(|path| {
                let (id, row) = self.object_of(&conn, account, path)?;
                ids.push(id);
                Ok(InputObject {
                    path: path.clone(),
                    object: self.inner.objects.join(&row.key),
                    nar_hash: row.nar_hash,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Self::hold(&conn, &ids, Some(pins))?;
        Ok(inputs)
    }

    /// The object of `path` for `account`, pinned by the returned [`Pins`] (marked used when
    /// `used`): for reading its files after the lock is released.
    fn pinned_object(
        &self,
        account: &str,
        path: &StorePath,
        used: bool,
    ) -> Result<(db::ObjectRow, Pins), StoreError> {
        let conn = self.inner.lock_db();
        let (id, row) = self.object_of(&conn, account, path)?;
        let pins = self.pins();
        if used {
            Self::hold(&conn, &[id], Some(&pins))?;
        } else {
            pins.add([id]);
        }
        Ok((row, pins))
    }

    /// The contents of `path` (valid for `account`) when it is a regular file of at most
    /// `max` bytes: how `.drv` files are read. `Ok(None)` when it is something else.
    pub fn read_small_file(
        &self,
        account: &str,
        path: &StorePath,
        max: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (row, _pins) = self.pinned_object(account, path, false)?;
        let file = self.inner.objects.join(&row.key);
        let meta = fs::symlink_metadata(&file).map_err(io_err("stat", &file))?;
        if !meta.is_file() || meta.len() > max {
            return Ok(None);
        }
        fs::read(&file).map(Some).map_err(io_err("read", &file))
    }

    /// Refuses with [`StoreError::DiskReserve`] when free space is below the reserve;
    /// otherwise starts an import into a fresh directory under `tmp/`.
    pub fn begin_import(&self, account: &str) -> Result<Import, StoreError> {
        let headroom = self.disk_headroom()?;
        // Unique among this store's imports; nothing else is in tmp/, which `open` empties.
        // The import creates its root node there itself (a file, directory or symlink), so
        // a path costs no directory of its own to make and remove.
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        let root = self.inner.tmp.join(format!("{}-{n}", std::process::id()));
        Ok(Import::new(self.clone(), account, root, headroom))
    }

    /// Refuses ([`StoreError::DiskReserve`], [`StoreError::InodeReserve`]) when free space on
    /// the state directory's file system is below the reserve, or (with a non-zero reserve)
    /// free inodes below [`INODE_RESERVE`]. What new builds and the build service's disk
    /// watcher check.
    pub fn check_disk_reserve(&self) -> Result<(), StoreError> {
        self.disk_headroom().map(drop)
    }

    /// The bytes free on the state directory's file system.
    pub fn free_space(&self) -> Result<u64, StoreError> {
        Ok(fsutil::free_space(&self.inner.state_dir)?.bytes)
    }

    /// Like [`Store::check_disk_reserve`], returning the bytes free above the reserve.
    fn disk_headroom(&self) -> Result<u64, StoreError> {
        let dir = &self.inner.state_dir;
        let free = fsutil::free_space(dir)?;
        let reserve = self.inner.limits.disk_reserve;
        if free.bytes < reserve {
            return Err(StoreError::DiskReserve {
                dir: dir.clone(),
                free: free.bytes,
                reserve,
            });
        }
        match free.inodes {
            Some(inodes) if reserve > 0 && inodes < INODE_RESERVE => {
                Err(StoreError::InodeReserve {
                    dir: dir.clone(),
                    free: inodes,
                    reserve: INODE_RESERVE,
                })
            }
            _ => Ok(free.bytes - reserve),
        }
    }

    /// Streams the canonical NAR of a path the account can see into `out`, in chunks,
    /// never holding a whole file in memory, and returns its size.
    /// Err([`StoreError::NotValid`]) for paths the account can't see.
    pub fn export_nar(
        &self,
        account: &str,
        path: &StorePath,
        out: &mut dyn Write,
    ) -> Result<u64, StoreError> {
        self.export_nar_to(account, path, &mut Plain(out))
    }

    /// [`Store::export_nar`] into a [`NarSink`], which may move files' contents itself. The
    /// path is marked used (downloaded) and pinned while it streams.
    pub fn export_nar_to(
        &self,
        account: &str,
        path: &StorePath,
        out: &mut dyn NarSink,
    ) -> Result<u64, StoreError> {
        let (object, _pins) = self.pinned_object(account, path, true)?;
        #[cfg(feature = "failpoints")]
        let out = &mut crate::failpoint::MidStream::new(out);
        let size = dump_to(&self.inner.objects.join(&object.key), out).map_err(|source| {
            StoreError::Dump {
                path: path.clone(),
                source: Box::new(source),
            }
        })?;
        if size != object.nar_size {
            return Err(StoreError::ExportSize {
                path: path.clone(),
                recorded: object.nar_size,
                actual: size,
            });
        }
        Ok(size)
    }

    /// Re-hashes every object and compares with the recorded NAR hash and size (tests,
    /// fsck). Returns the problems found, empty when the store is consistent.
    pub fn verify(&self) -> Result<Vec<StoreProblem>, StoreError> {
        let objects = db::objects(&self.inner.lock_db())?;
        let mut problems = Vec::new();
        for object in objects {
            let file = self.inner.objects.join(&object.key);
            if fs::symlink_metadata(&file).is_err() {
                problems.push(StoreProblem::Missing { object: object.key });
                continue;
            }
            let mut w = HashingWriter::new(HashAlgo::Sha256);
            if let Err(error) = dump_path(&file, &mut w) {
                problems.push(StoreProblem::Unreadable {
                    object: object.key,
                    error,
                });
                continue;
            }
            let (actual_hash, actual_size) = w.finish();
            if actual_hash != object.nar_hash || actual_size != object.nar_size {
                problems.push(StoreProblem::Mismatch {
                    object: object.key,
                    recorded_hash: object.nar_hash,
                    actual_hash,
                    recorded_size: object.nar_size,
                    actual_size,
                });
            }
        }
        Ok(problems)
    }
}
