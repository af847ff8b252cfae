//! The SQLite metadata: schema and queries.
//!
//! ```sql
//! schema_version(version)                         -- one row: SCHEMA_VERSION
//! objects(key PK, nar_hash, nar_size)             -- one row per directory under objects/
//! paths(id PK, account, path, object -> objects, deriver, ca, registration_time, last_used)
//!                                                 -- UNIQUE(account, path): the account's view,
//!                                                 -- one row per grant; INDEX(account, last_used)
//! refs(referrer -> paths, reference -> paths)     -- both rows of the same account
//! sigs(path -> paths, sig)
//! realisations(account, drv_output, path)          -- PK(account, drv_output): where a
//!                                                 -- content-addressed output was built
//! usage(account PK, nar_bytes, paths)              -- the sums over the account's rows, kept
//!                                                 -- by every insert and delete
//! builds(id PK, account, drv, ..., log, build)     -- one record per finished build and
//!                                                 -- account (records); `build` is the id
//!                                                 -- users see, shared by a shared build's
//! build_ids(last)                                 -- one row: the highest build id handed out
//! traffic(account, day, uploaded, downloaded, substituted)
//!                                                 -- PK(account, day): bytes moved per day
//! ```
//!
//! `registration_time` is what the client claimed; `last_used` is the server's clock at the
//! grant's last use (registered, queried as valid, used as a build input, downloaded), which
//! the collector (`gc`) compares with the account's retention.
//!
//! Store paths are stored as base names (`<hash>-<name>`), hashes and content addresses in
//! their Nix string forms. A reference points at the row of the same account, so a closure
//! walk never leaves the account.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use nixbuild_core::content_address::ContentAddress;
use nixbuild_core::hash::Hash;
use nixbuild_core::serve::ValidPathInfo;
use nixbuild_core::store_path::StorePath;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::error::{db_err, StoreError};

/// The schema this code reads and writes.
pub(super) const SCHEMA_VERSION: i64 = 2;

/// From version 1 to 2: when each grant was last used, each account's usage, build records.
/// Existing grants count as used at the upgrade (their registration times are what clients
/// claimed, often long ago), so each gets a whole retention from then.
const MIGRATE_TO_2: &str = "
ALTER TABLE paths ADD COLUMN last_used INTEGER NOT NULL DEFAULT 0;
UPDATE paths SET last_used = CAST(strftime('%s', 'now') AS INTEGER);
CREATE INDEX paths_expiry ON paths(account, last_used);
CREATE TABLE usage (
    account TEXT PRIMARY KEY NOT NULL,
    nar_bytes INTEGER NOT NULL,
    paths INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO usage (account, nar_bytes, paths)
    SELECT p.account, SUM(o.nar_size), COUNT(*) FROM paths p JOIN objects o ON o.key = p.object
    GROUP BY p.account;
";

const SCHEMA: &str = "
CREATE TABLE objects (
    key TEXT PRIMARY KEY NOT NULL,
    nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE paths (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    path TEXT NOT NULL,
    object TEXT NOT NULL REFERENCES objects(key),
    deriver TEXT,
    ca TEXT,
    registration_time INTEGER NOT NULL,
    UNIQUE (account, path)
);
CREATE INDEX paths_object ON paths(object);
CREATE TABLE refs (
    referrer INTEGER NOT NULL REFERENCES paths(id),
    reference INTEGER NOT NULL REFERENCES paths(id),
    PRIMARY KEY (referrer, reference)
) WITHOUT ROWID;
CREATE TABLE sigs (
    path INTEGER NOT NULL REFERENCES paths(id),
    sig TEXT NOT NULL,
    PRIMARY KEY (path, sig)
) WITHOUT ROWID;
";

/// Opens (creating if needed) the database at `file`, in WAL mode, at [`SCHEMA_VERSION`].
pub(super) fn open(file: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(file).map_err(db_err("open"))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(db_err("enable WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt {
            field: "journal mode (WAL refused)",
            value: mode,
        });
    }
    // With WAL, NORMAL keeps the database consistent across crashes (like Nix's default).
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
        .map_err(db_err("set pragmas"))?;
    let tx = conn.transaction().map_err(db_err("begin migration"))?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(db_err("create schema_version"))?;
    let found: Option<i64> = tx
        .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
        .optional()
        .map_err(db_err("read schema version"))?;
    match found {
        None => {
            tx.execute_batch(SCHEMA).map_err(db_err("create schema"))?;
            tx.execute("INSERT INTO schema_version (version) VALUES (1)", [])
                .map_err(db_err("record schema version"))?;
        }
        Some(1 | SCHEMA_VERSION) => {}
        Some(found) => {
            return Err(StoreError::SchemaVersion {
                found,
                supported: SCHEMA_VERSION,
            })
        }
    }
    // Referrers are looked up by reference (the worker protocol's QueryReferrers). An index
    // that older stores lack is added in place; older binaries ignore it.
    tx.execute_batch("CREATE INDEX IF NOT EXISTS refs_by_reference ON refs(reference)")
        .map_err(db_err("create the index of references"))?;
    // The realisations of content-addressed outputs, added in place like the index; a row
    // counts only while its path is valid for the account.
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS realisations (
            account TEXT NOT NULL,
            drv_output TEXT NOT NULL,
            path TEXT NOT NULL,
            PRIMARY KEY (account, drv_output)
        ) WITHOUT ROWID",
    )
    .map_err(db_err("create the realisations table"))?;
    if found != Some(SCHEMA_VERSION) {
        tx.execute_batch(MIGRATE_TO_2)
            .map_err(db_err("migrate to schema version 2"))?;
        super::records::create_table(&tx)?;
        tx.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION])
            .map_err(db_err("record schema version"))?;
    }
    // Build ids and traffic, added in place like the realisations.
    super::records::add_build_ids(&tx)?;
    super::accounting::create_table(&tx)?;
    tx.commit().map_err(db_err("commit migration"))?;
    Ok(conn)
}

/// A read-only connection to the database at `file` (opened by [`open`] first).
pub(super) fn open_reader(file: &Path) -> Result<Connection, StoreError> {
    Connection::open_with_flags(
        file,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err("open a reader"))
}

/// An object as the database records it.
#[derive(Debug, Clone)]
pub(super) struct ObjectRow {
    /// Directory name under `objects/`.
    pub key: String,
    pub nar_hash: Hash,
    pub nar_size: u64,
}

fn parse_hash(s: String) -> Result<Hash, StoreError> {
    Hash::parse_any(&s, None).map_err(|_| StoreError::Corrupt {
        field: "nar_hash",
        value: s,
    })
}

fn parse_path(field: &'static str, s: String) -> Result<StorePath, StoreError> {
    StorePath::from_base_name(s.as_bytes()).map_err(|_| StoreError::Corrupt { field, value: s })
}

fn size(field: &'static str, n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt {
        field,
        value: n.to_string(),
    })
}

/// SQLite integers are signed; sizes and times above `i64::MAX` cannot occur in practice and
/// are clamped rather than wrapped.
pub(super) fn to_sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The row id of `path` for `account`, if valid.
pub(super) fn path_id(
    conn: &Connection,
    account: &str,
    path: &StorePath,
) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT id FROM paths WHERE account = ?1 AND path = ?2")
        .and_then(|mut st| {
            st.query_row(params![account, path.base_name()], |row| row.get(0))
                .optional()
        })
        .map_err(db_err("look up path"))
}

/// Records that `drv_output` (`sha256:<hex>!<output>`) of `account` was built at `path`.
pub(super) fn set_realisation(
    conn: &Connection,
    account: &str,
    drv_output: &str,
    path: &StorePath,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO realisations (account, drv_output, path) VALUES (?1, ?2, ?3)",
    )
    .and_then(|mut st| st.execute(params![account, drv_output, path.base_name()]))
    .map_err(db_err("record a realisation"))?;
    Ok(())
}

/// Where `drv_output` of `account` was built, if recorded.
pub(super) fn realisation(
    conn: &Connection,
    account: &str,
    drv_output: &str,
) -> Result<Option<StorePath>, StoreError> {
    let found: Option<String> = conn
        .prepare_cached("SELECT path FROM realisations WHERE account = ?1 AND drv_output = ?2")
        .and_then(|mut st| {
            st.query_row(params![account, drv_output], |row| row.get(0))
                .optional()
        })
        .map_err(db_err("look up a realisation"))?;
    found.map(|p| parse_path("realisation", p)).transpose()
}

/// The valid path of `account` whose hash part is `hash_part`, if any (by the index on
/// `(account, path)`: base names start with the hash part and a dash).
pub(super) fn path_from_hash_part(
    conn: &Connection,
    account: &str,
    hash_part: &str,
) -> Result<Option<StorePath>, StoreError> {
    let (from, to) = (format!("{hash_part}-"), format!("{hash_part}."));
    let found: Option<String> = conn
        .prepare_cached(
            "SELECT path FROM paths WHERE account = ?1 AND path >= ?2 AND path < ?3 LIMIT 1",
        )
        .and_then(|mut st| {
            st.query_row(params![account, from, to], |row| row.get(0))
                .optional()
        })
        .map_err(db_err("look up a hash part"))?;
    found.map(|p| parse_path("path", p)).transpose()
}

/// At most `max` of the paths of `account` that refer to its `path` (none when the path is not
/// valid for it).
pub(super) fn referrers(
    conn: &Connection,
    account: &str,
    path: &StorePath,
    max: usize,
) -> Result<Vec<StorePath>, StoreError> {
    let Some(id) = path_id(conn, account, path)? else {
        return Ok(Vec::new());
    };
    let rows: Vec<String> = conn
        .prepare_cached(
            "SELECT p.path FROM refs r JOIN paths p ON p.id = r.referrer
             WHERE r.reference = ?1 AND p.account = ?2 LIMIT ?3",
        )
        .and_then(|mut st| {
            st.query_map(params![id, account, max as i64], |row| row.get(0))?
                .collect::<Result<_, _>>()
        })
        .map_err(db_err("read referrers"))?;
    rows.into_iter()
        .map(|p| parse_path("referrer", p))
        .collect()
}

/// At most `max` of `account`'s valid paths, in order.
pub(super) fn account_paths(
    conn: &Connection,
    account: &str,
    max: usize,
) -> Result<Vec<StorePath>, StoreError> {
    let rows: Vec<String> = conn
        .prepare_cached("SELECT path FROM paths WHERE account = ?1 ORDER BY path LIMIT ?2")
        .and_then(|mut st| {
            st.query_map(params![account, max as i64], |row| row.get(0))?
                .collect::<Result<_, _>>()
        })
        .map_err(db_err("list paths"))?;
    rows.into_iter().map(|p| parse_path("path", p)).collect()
}

/// Adds `sigs` to `account`'s `path`; `false` when the path is not valid for it.
pub(super) fn add_signatures(
    conn: &mut Connection,
    account: &str,
    path: &StorePath,
    sigs: &BTreeSet<String>,
) -> Result<bool, StoreError> {
    let tx = conn
        .transaction()
        .map_err(db_err("begin adding signatures"))?;
    let Some(id) = path_id(&tx, account, path)? else {
        return Ok(false);
    };
    {
        let mut add = tx
            .prepare_cached("INSERT OR IGNORE INTO sigs (path, sig) VALUES (?1, ?2)")
            .map_err(db_err("add signatures"))?;
        for sig in sigs {
            add.execute(params![id, sig])
                .map_err(db_err("add a signature"))?;
        }
    }
    tx.commit().map_err(db_err("commit signatures"))?;
    Ok(true)
}

/// When `path` was registered for `account` (seconds since the epoch), if valid.
pub(super) fn registration_time(
    conn: &Connection,
    account: &str,
    path: &StorePath,
) -> Result<Option<u64>, StoreError> {
    let t: Option<i64> = conn
        .prepare_cached("SELECT registration_time FROM paths WHERE account = ?1 AND path = ?2")
        .and_then(|mut st| {
            st.query_row(params![account, path.base_name()], |row| row.get(0))
                .optional()
        })
        .map_err(db_err("read the registration time"))?;
    t.map(|t| size("registration_time", t)).transpose()
}

/// The row id of `path` for `account` and the object behind it, if valid.
pub(super) fn path_object(
    conn: &Connection,
    account: &str,
    path: &StorePath,
) -> Result<Option<(i64, ObjectRow)>, StoreError> {
    let row: Option<(i64, String, String, i64)> = conn
        .prepare_cached(
            "SELECT p.id, o.key, o.nar_hash, o.nar_size FROM paths p
             JOIN objects o ON o.key = p.object WHERE p.account = ?1 AND p.path = ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![account, path.base_name()], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()
        })
        .map_err(db_err("look up object of path"))?;
    row.map(|(id, key, hash, size_)| {
        let object = ObjectRow {
            key,
            nar_hash: parse_hash(hash)?,
            nar_size: size("nar_size", size_)?,
        };
        Ok((id, object))
    })
    .transpose()
}

/// Whether an object with this key is registered.
pub(super) fn object_exists(conn: &Connection, key: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM objects WHERE key = ?1")
        .and_then(|mut st| st.exists([key]))
        .map_err(db_err("look up object"))
}

/// The references of row `id`, with their row ids.
pub(super) fn references(conn: &Connection, id: i64) -> Result<Vec<(i64, StorePath)>, StoreError> {
    let rows: Vec<(i64, String)> = conn
        .prepare_cached(
            "SELECT p.id, p.path FROM refs r JOIN paths p ON p.id = r.reference
             WHERE r.referrer = ?1",
        )
        .and_then(|mut st| {
            st.query_map([id], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(db_err("read references"))?;
    rows.into_iter()
        .map(|(id, p)| Ok((id, parse_path("reference", p)?)))
        .collect()
}

/// The rows reachable by references from `queue` (rows of one account) that are not in
/// `seen`, `queue`'s own included; adds them all to `seen`.
pub(super) fn walk_references(
    conn: &Connection,
    mut queue: Vec<(i64, StorePath)>,
    seen: &mut HashSet<i64>,
) -> Result<Vec<(i64, StorePath)>, StoreError> {
    queue.retain(|(id, _)| seen.insert(*id));
    let mut reached = Vec::new();
    while let Some((id, path)) = queue.pop() {
        for (ref_id, reference) in references(conn, id)? {
            if seen.insert(ref_id) {
                queue.push((ref_id, reference));
            }
        }
        reached.push((id, path));
    }
    Ok(reached)
}

/// The metadata of `path` for `account`, if valid.
pub(super) fn path_info(
    conn: &Connection,
    account: &str,
    path: &StorePath,
) -> Result<Option<ValidPathInfo>, StoreError> {
    Ok(path_info_with_id(conn, account, path)?.map(|(_, info)| info))
}

/// [`path_info`] with the row id.
pub(super) fn path_info_with_id(
    conn: &Connection,
    account: &str,
    path: &StorePath,
) -> Result<Option<(i64, ValidPathInfo)>, StoreError> {
    type Row = (i64, String, i64, Option<String>, Option<String>);
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT p.id, o.nar_hash, o.nar_size, p.deriver, p.ca
             FROM paths p JOIN objects o ON o.key = p.object
             WHERE p.account = ?1 AND p.path = ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![account, path.base_name()], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .optional()
        })
        .map_err(db_err("read path info"))?;
    let Some((id, nar_hash, nar_size, deriver, ca)) = row else {
        return Ok(None);
    };
    let nar_size = size("nar_size", nar_size)?;
    let sigs: BTreeSet<String> = conn
        .prepare_cached("SELECT sig FROM sigs WHERE path = ?1")
        .and_then(|mut st| st.query_map([id], |row| row.get(0))?.collect())
        .map_err(db_err("read signatures"))?;
    let info = ValidPathInfo {
        deriver: deriver.map(|d| parse_path("deriver", d)).transpose()?,
        references: references(conn, id)?.into_iter().map(|(_, p)| p).collect(),
        download_size: nar_size,
        nar_size,
        nar_hash: Some(parse_hash(nar_hash)?),
        ca: ca
            .map(|c| {
                ContentAddress::parse(&c).map_err(|_| StoreError::Corrupt {
                    field: "ca",
                    value: c,
                })
            })
            .transpose()?,
        sigs,
    };
    Ok(Some((id, info)))
}

/// Where a reference of a path being registered points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RefTarget<'a> {
    /// A row already in the database (of the same account).
    Row(i64),
    /// A path registered by the same [`insert_paths`] call (itself, for a self-reference).
    New(&'a StorePath),
}

/// What one registration writes.
pub(super) struct NewPath<'a> {
    pub account: &'a str,
    pub path: &'a StorePath,
    pub object: &'a ObjectRow,
    pub deriver: Option<&'a StorePath>,
    pub ca: Option<&'a ContentAddress>,
    pub registration_time: u64,
    pub references: Vec<RefTarget<'a>>,
    pub sigs: &'a BTreeSet<String>,
}

/// The server's clock in milliseconds since the epoch (what build records hold).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The server's clock in seconds since the epoch: what `last_used` records.
pub(super) fn now() -> u64 {
    now_ms() / 1000
}

/// Registers paths (and their objects, if new) in one transaction: all of them or none,
/// used now, and counted in their accounts' usage. References may point at other paths of
/// the same call, in any order.
pub(super) fn insert_paths(conn: &mut Connection, new: &[NewPath<'_>]) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(db_err("begin registration"))?;
    insert_rows(&tx, new, now()).map_err(db_err("register paths"))?;
    crate::failpoint::failpoint!("publish-before-commit");
    tx.commit().map_err(db_err("commit registration"))
}

fn insert_rows(tx: &Transaction<'_>, new: &[NewPath<'_>], now: u64) -> rusqlite::Result<()> {
    let mut add_object = tx.prepare_cached(
        "INSERT INTO objects (key, nar_hash, nar_size) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO NOTHING",
    )?;
    let mut add_path = tx.prepare_cached(
        "INSERT INTO paths (account, path, object, deriver, ca, registration_time, last_used)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
    )?;
    let mut ids = Vec::with_capacity(new.len());
    for p in new {
        add_object.execute(params![
            p.object.key,
            p.object.nar_hash.to_string(),
            to_sql_int(p.object.nar_size)
        ])?;
        let id: i64 = add_path.query_row(
            params![
                p.account,
                p.path.base_name(),
                p.object.key,
                p.deriver.map(StorePath::base_name),
                p.ca.map(ContentAddress::to_string),
                to_sql_int(p.registration_time),
                to_sql_int(now)
            ],
            |row| row.get(0),
        )?;
        charge(tx, p.account, to_sql_int(p.object.nar_size), 1)?;
        ids.push(id);
    }
    let mut add_ref =
        tx.prepare_cached("INSERT INTO refs (referrer, reference) VALUES (?1, ?2)")?;
    let mut add_sig = tx.prepare_cached("INSERT INTO sigs (path, sig) VALUES (?1, ?2)")?;
    let mut new_id = tx.prepare_cached("SELECT id FROM paths WHERE account = ?1 AND path = ?2")?;
    for (p, &id) in new.iter().zip(&ids) {
        for reference in &p.references {
            let target = match *reference {
                RefTarget::Row(row) => row,
                // Inserted above, so the row exists (or the transaction fails).
                RefTarget::New(path) => {
                    new_id.query_row(params![p.account, path.base_name()], |row| row.get(0))?
                }
            };
            add_ref.execute([id, target])?;
        }
        for sig in p.sigs {
            add_sig.execute(params![id, sig])?;
        }
    }
    Ok(())
}

/// Adds `bytes` and `paths` (negative to subtract) to `account`'s usage.
pub(super) fn charge(
    conn: &Connection,
    account: &str,
    bytes: i64,
    paths: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO usage (account, nar_bytes, paths) VALUES (?1, ?2, ?3)
         ON CONFLICT (account) DO UPDATE
         SET nar_bytes = nar_bytes + excluded.nar_bytes, paths = paths + excluded.paths",
    )?
    .execute(params![account, bytes, paths])?;
    Ok(())
}

/// The NAR bytes and number of paths `account` holds (each of its rows counted with its
/// object's whole NAR size, shared or not).
pub(super) fn usage(conn: &Connection, account: &str) -> Result<(u64, u64), StoreError> {
    let row: Option<(i64, i64)> = conn
        .prepare_cached("SELECT nar_bytes, paths FROM usage WHERE account = ?1")
        .and_then(|mut st| {
            st.query_row([account], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()
        })
        .map_err(db_err("read an account's usage"))?;
    let (bytes, paths) = row.unwrap_or((0, 0));
    Ok((size("usage", bytes)?, size("usage", paths)?))
}

/// Marks rows `ids` used at `now` (never moving a later mark back), in one transaction.
pub(super) fn touch(conn: &Connection, ids: &[i64], now: u64) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let tx = conn
        .unchecked_transaction()
        .map_err(db_err("begin marking paths used"))?;
    {
        let mut st = tx
            .prepare_cached("UPDATE paths SET last_used = ?2 WHERE id = ?1 AND last_used < ?2")
            .map_err(db_err("mark paths used"))?;
        for id in ids {
            st.execute(params![id, to_sql_int(now)])
                .map_err(db_err("mark a path used"))?;
        }
    }
    tx.commit().map_err(db_err("commit marking paths used"))
}

/// The keys of all registered objects.
pub(super) fn object_keys(conn: &Connection) -> Result<HashSet<String>, StoreError> {
    conn.prepare("SELECT key FROM objects")
        .and_then(|mut st| st.query_map([], |row| row.get(0))?.collect())
        .map_err(db_err("list objects"))
}

/// All registered objects.
pub(super) fn objects(conn: &Connection) -> Result<Vec<ObjectRow>, StoreError> {
    let rows: Vec<(String, String, i64)> = conn
        .prepare("SELECT key, nar_hash, nar_size FROM objects ORDER BY key")
        .and_then(|mut st| {
            st.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect()
        })
        .map_err(db_err("list objects"))?;
    rows.into_iter()
        .map(|(key, hash, n)| {
            Ok(ObjectRow {
                key,
                nar_hash: parse_hash(hash)?,
                nar_size: size("nar_size", n)?,
            })
        })
        .collect()
}
